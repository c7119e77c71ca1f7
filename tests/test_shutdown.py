"""Host shutdown and crashes, against real qemu: every guest gets its power
button and one deadline; a crash or a panic is told from a power-off."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time

from harness.world import tool

from .conftest import Env, RunVm, bios_payload, guest_payload
from .test_daemon import read_events
from .test_operator import SerialClient
from .test_transitions import ExitWatch

LATE_MAX = 0.25


def test_stop_all_powers_off_the_willing_and_forces_the_deaf(
    env: Env, guest: dict[str, str]
) -> None:
    env.start_daemon()
    willing = [env.create(guest_payload(guest, autoboot=True)) for _ in range(2)]
    deaf = env.create(guest_payload(guest, ignore_acpi=True, autoboot=True))
    uuids = [*willing, deaf]
    for uuid in uuids:
        env.wait_console(uuid)
        env.wait_qmp(uuid)
    t0 = time.monotonic()
    res = env.vmadm("stop", "--all", "-t", "5")
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    assert took < 7.5, took  # the deadline, the forcing step, the settling
    lines = dict(line.split(None, 1) for line in res.stdout.strip().splitlines())
    assert set(lines) == set(uuids), res.stdout
    for uuid in willing:
        assert lines[uuid] == "stopped by the guest (ACPI power button)"
        assert env.get(uuid)["last_exit"]["stage"] == "acpi"
    assert lines[deaf] == "forced at the deadline (quit)"
    for uuid in uuids:
        vm = env.get(uuid)
        assert vm["state"] == "stopped"
        assert vm["autoboot"] is True, "a host shutdown leaves autoboot as it was"

    # The next host boot (no marker, a new daemon) brings them all back.
    env.stop_daemon()
    os.unlink(env.marker)
    env.start_daemon()
    env.wait_for(
        lambda: all(env.get(u)["state"] == "running" for u in uuids), timeout=30, what="booted"
    )


def test_stop_all_survives_a_daemon_killed_after_the_202(env: Env, running_vm: RunVm) -> None:
    uuids = [running_vm(bios_payload()) for _ in range(2)]  # SeaBIOS ignores ACPI
    watches = [ExitWatch(env, u) for u in uuids]
    status, body = env.api("POST", "/vms", action="stop", timeout="3")
    assert status == 202, body
    assert sorted(body["stopping"]) == sorted(uuids)
    expire = {u: env.get(u)["transition_expire"] for u in uuids}
    assert env.daemon is not None
    env.stop_daemon(env.daemon, signal.SIGKILL)
    env.start_daemon()
    for uuid, watch in zip(uuids, watches, strict=True):
        late = watch.wait(15) - expire[uuid] / 1000
        assert 0 <= late < LATE_MAX, late


def test_stop_all_with_nothing_running_and_bad_input(env: Env) -> None:
    env.start_daemon()
    assert env.api("POST", "/vms", action="stop", timeout="5") == (202, {"stopping": []})
    assert env.api("POST", "/vms", action="stop")[0] == 400
    assert env.api("POST", "/vms", action="reboot", timeout="5")[0] == 400
    res = env.vmadm("stop", "--all", "-t", "5")
    assert res.returncode == 0
    assert res.stdout == ""
    for args in (("stop",), ("stop", "--all", "-F"), ("stop", "--all", "-t", "0")):
        res = env.vmadm(*args)
        assert res.returncode == 1, args
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_a_guest_panic_is_recorded_as_a_panic(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    uuid = running_vm(guest_payload(guest), ready=True)
    watch = ExitWatch(env, uuid)

    async def panic() -> None:
        async with SerialClient(env, uuid) as console:
            await console.until(b"VMTEST-READY")
            await console.type(b"echo c > /proc/sysrq-trigger\n")
            code, reason = await console.until_closed(timeout=30)
            assert reason == "the guest kernel panicked", (code, reason)

    asyncio.run(panic())
    watch.wait(20)
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", what="stopped")
    assert env.get(uuid)["last_exit"]["reason"] == "panic"
    assert env.metric("vmadmd_vm_exits", reason="panic") == 1
    events = read_events(env, lambda evs: any(e["type"] == "exited" for e in evs), vm=uuid)
    assert next(e for e in events if e["type"] == "exited")["reason"] == "panic"


def test_restart_on_crash_backs_off_and_gives_up(env: Env) -> None:
    env.start_daemon("--crash-restart-delay", "0.5", "--crash-restart-limit", "2")
    uuid = env.run_vm(bios_payload(restart_on_crash=True))
    plain = env.run_vm(bios_payload())
    waited = []
    for _ in range(2):
        pid = env.pid(uuid)
        assert pid is not None
        t0 = time.monotonic()
        os.kill(pid, signal.SIGSEGV)
        env.wait_for(lambda: env.pid(uuid) not in (None, pid), timeout=15, what="restarted")  # noqa: B023
        waited.append(time.monotonic() - t0)
        assert env.get(uuid)["last_exit"]["reason"] == "crash"
        env.wait_qmp(uuid)
    # Back-off: 0.5 s, then 1 s before the boot (which itself takes a moment).
    assert waited[0] >= 0.5, waited
    assert waited[1] >= 1.0, waited
    # The third crash within the window is one too many: it stays down.
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGSEGV)
    events = read_events(
        env, lambda evs: any(e["type"] == "restart_given_up" for e in evs), vm=uuid
    )
    assert [e["type"] for e in events].count("restart_scheduled") == 2
    assert env.get(uuid)["state"] == "stopped"
    assert env.metric("vmadmd_crash_restarts", outcome="restarted") == 2
    assert env.metric("vmadmd_crash_restarts", outcome="given_up") == 1
    # A VM without the flag is recorded as crashed and left alone.
    plain_pid = env.pid(plain)
    assert plain_pid is not None
    os.kill(plain_pid, signal.SIGSEGV)
    env.wait_for(lambda: env.get(plain)["state"] == "stopped", what="plain stopped")
    assert env.get(plain)["last_exit"]["reason"] == "crash"
    assert not any(
        e["type"] == "restart_scheduled"
        for e in read_events(env, lambda evs: any(e["type"] == "exited" for e in evs), vm=plain)
    )


def test_vmadm_stop_clears_autoboot_before_asking(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm(bios_payload())  # SeaBIOS ignores the power button
    env.vmadm("update", uuid, "autoboot=true", check=True)
    stopper = subprocess.Popen(
        [tool("vmadm"), "stop", uuid, "-t", "30"], env=env.environ,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        env.wait_for(lambda: env.get(uuid)["state"] == "stopping", what="stop asked")
        # Interrupted while it waits: the flag is already off.
        stopper.kill()
        stopper.wait(timeout=10)
        assert env.get(uuid)["autoboot"] is False
    finally:
        if stopper.poll() is None:
            stopper.kill()
