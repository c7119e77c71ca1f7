"""Stops that always end, and VMs that get their QMP back (real qemu).

From the soak that found them: a VM stopped (1 s, forced) and started again
at once lost its QMP for good (the previous qemu's monitor took the new
qemu's only QMP slot), and a stop sent while the daemon had no QMP was never
forced.  A stop's deadline needs nothing but the qemu's pidfd; a monitor
belongs to one qemu.
"""

from __future__ import annotations

import concurrent.futures
import time

from vmadmd.vm.sockets import connect_unix

from .conftest import Env, bios_payload
from .test_transitions import LATE_MAX, ExitWatch, stop


def test_a_stop_ends_a_vm_whose_qmp_slot_someone_else_holds(env: Env) -> None:
    """qemu serves one QMP client at a time; with its slot held by another
    client (the VM's user can connect to its own vm.qmp) the daemon never
    gets QMP, and the stop is still forced at its deadline, by signal."""
    uuid = env.create(bios_payload())
    env.vmadm("start", uuid, check=True)
    holder = connect_unix(str(env.runtime(uuid)), "vm.qmp")
    try:
        assert holder.recv(1) == b"{"  # qemu greets it: the slot is taken
        env.start_daemon("--qmp-timeout", "1")
        watch = ExitWatch(env, uuid)
        transition = stop(env, uuid, 1)
        gone = watch.wait(15)
        late = gone - transition["expire"] / 1000
        # SIGTERM at the deadline (no `quit` is tried without QMP).
        assert 0 <= late < LATE_MAX + 0.25, late
    finally:
        holder.close()
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=5, what="stopped")
    assert env.get(uuid)["last_exit"]["stage"] == "sigterm"


def test_a_vm_started_again_at_once_gets_its_qmp_back(env: Env) -> None:
    """Stop (forced at 1 s) and start at once, three times: each new qemu is
    answering through the daemon within seconds, and meanwhile a request
    for the VM gets its answer or a 409, never a 5xx."""
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    statuses: set[int] = set()
    for _ in range(3):
        watch = ExitWatch(env, uuid)
        stop(env, uuid, 1)
        watch.wait(15)
        env.vmadm("start", uuid, check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = env.api("GET", f"/vm/{uuid}", type="status,vnc")[0]
            statuses.add(status)
            if status == 200:
                break
            time.sleep(0.02)
        else:
            raise AssertionError(f"no QMP 10 s after the start:\n{env.daemon_log()}")
    assert statuses <= {200, 409}, statuses
    assert "listen backlog" not in env.daemon_log()


def test_four_starts_at_once_boot_the_vm_once(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: env.vmadm("start", uuid), range(4)))
    codes = sorted(r.returncode for r in results)
    assert codes == [0, 1, 1, 1], [r.stderr for r in results]
    assert all("already running" in r.stderr or r.returncode == 0 for r in results), [
        r.stderr for r in results
    ]
    env.wait_qmp(uuid)
    assert env.get(uuid)["state"] == "running"
