"""Live migration between two vmadmd hosts (``vmadm migrate``), real qemu (TCG).

Two "hosts" on this machine (``harness/sshhost.py``): the source in our
network namespace, the target in one of its own with Debian's sshd, reached
with a key made here.  The guest runs a ticker on its serial port throughout
(``TICK n``); its uptime, its ticker and its disk must go on on the target;
any failure must leave the VM running on the source, unchanged, and nothing
on the target.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.sshhost import TwoHosts
from harness.world import World, kill_qemus_under

from .conftest import guest_payload
from .test_daemon import read_events
from .wsclient import WsClient

TICKER = b"(i=0; while true; do echo TICK $i; i=$((i+1)); sleep 0.2; done) &\n"
DISK_MIB = 64
DATA_MIB = 8
# Two daemons, sshd and a TCG guest that fills part of its disk, copied at a
# bandwidth limit that keeps the copy going for seconds: past the suite's
# default 120 s on a loaded machine.
pytestmark = pytest.mark.timeout(480)


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[TwoHosts]:
    two = TwoHosts(tmp_path)
    try:
        two.start()
        two.source.start_daemon()
        two.target.start_daemon()
        yield two
    finally:
        two.close()


def serial(env: World, uuid: str, command: bytes, pattern: str, timeout: float = 60) -> str:
    """Type ``command`` on the guest's serial console; the first match of
    ``pattern`` (its group 1) in what follows."""

    async def run() -> str:
        ws = await WsClient.connect(f"/vm/{uuid}/serial", unix=env.socket)
        try:
            seen = b""
            await ws.send(command)
            async with asyncio.timeout(timeout):
                while True:
                    found = re.search(pattern.encode(), seen)
                    if found:
                        return found.group(1).decode()
                    data = await ws.receive(timeout)
                    if data is None:
                        raise AssertionError(f"console closed: {seen[-2000:]!r}")
                    seen += data
        finally:
            await ws.close()

    return asyncio.run(run())


def uptime(env: World, uuid: str) -> float:
    return float(serial(env, uuid, b"echo UP=$(cut -d' ' -f1 /proc/uptime)=\n", r"UP=([0-9.]+)="))


def disk_sum(env: World, uuid: str) -> str:
    """The md5 of the disk's first DATA_MIB MiB, read from the disk (caches dropped)."""
    cmd = (
        f"sync; echo 3 > /proc/sys/vm/drop_caches; echo SUM=$(dd if=/dev/vda bs=1M "
        f"count={DATA_MIB} 2>/dev/null | md5sum | cut -c1-32)=\n"
    )
    return serial(env, uuid, cmd.encode(), r"SUM=([0-9a-f]{32})=")


def last_tick(env: World, uuid: str) -> int:
    ticks = re.findall(r"TICK (\d+)", env.console(uuid))
    return max(map(int, ticks)) if ticks else -1


def guest_on_source(hosts: TwoHosts, guest: dict[str, str]) -> tuple[str, str]:
    """A running guest with a disk full of data and its ticker; (uuid, disk md5)."""
    src = hosts.source
    payload = guest_payload(guest, disks=[{"size": DISK_MIB, "model": "virtio"}])
    uuid = src.run_vm(payload, ready=True)
    serial(src, uuid, f"dd if=/dev/urandom of=/dev/vda bs=1M count={DATA_MIB} 2>/dev/null; "
           "sync; echo WROTE=$?=\n".encode(), r"WROTE=(\d+)=", timeout=120)  # fmt: skip
    before = disk_sum(src, uuid)
    serial(src, uuid, TICKER, r"TICK (2)")
    return uuid, before


def progress(env: World, uuid: str) -> dict[str, Any]:
    status, body = env.api("GET", f"/vm/{uuid}/migration")
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def start_migration(hosts: TwoHosts, uuid: str, bandwidth: int | None = None) -> None:
    params = {"action": "migrate", "target": hosts.destination}
    if bandwidth is not None:
        params["bandwidth"] = str(bandwidth)
    status, body = hosts.source.api("POST", f"/vm/{uuid}", **params)
    assert status == 202, body


def wait_state(env: World, uuid: str, states: tuple[str, ...], timeout: float = 120) -> str:
    """Until the migration is in one of ``states`` (the RAM phase: with RAM
    on its way); which one."""
    found: list[str] = []

    def reached() -> bool:
        p = progress(env, uuid)
        found[:] = [p["state"]]
        if p["state"] == "migrating_ram" and not (p["ram"] or {}).get("transferred"):
            return False
        return found[0] in states

    env.wait_for(reached, timeout=timeout, what=f"migration state in {states}")
    return found[0]


def qemu_status(env: World, uuid: str) -> dict[str, Any]:
    status, body = env.api("GET", f"/vm/{uuid}", type="status")
    assert status == 200, body
    return dict(body["status"])


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def assert_target_clean(hosts: TwoHosts, uuid: str) -> None:
    """Nothing of the VM on the target: no record, no zone, no qemu."""
    tgt = hosts.target
    tgt.wait_for(lambda: not (Path(tgt.zones) / uuid).exists(), timeout=30,
                 what="the target's zone to go")  # fmt: skip
    assert tgt.vmadm("get", uuid).returncode == 1
    assert kill_qemus_under(tgt.zones) == 0, "a qemu was left on the target"


def assert_source_unchanged(hosts: TwoHosts, uuid: str, pid: int, tick: int) -> None:
    """The VM runs on the source, same qemu, guest running, ticker going on."""
    src = hosts.source
    src.wait_for(lambda: "migration" not in src.get(uuid), timeout=60,
                 what="the source's migration record to clear")  # fmt: skip
    vm = src.get(uuid)
    assert vm["state"] == "running", vm
    assert src.pid(uuid) == pid, "the source's qemu was replaced"
    src.wait_for(lambda: qemu_status(src, uuid).get("status") == "running", timeout=30,
                 what="the source guest to run")  # fmt: skip
    src.wait_console(uuid, f"TICK {tick + 10}", timeout=60)


def workdirs() -> set[str]:
    import tempfile

    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("vmadmd-mig-")}


def assert_no_traceback(hosts: TwoHosts, dirs: set[str]) -> None:
    """No daemon failed on a bug; neither left a temp dir of its sockets."""
    hosts.source.wait_for(lambda: workdirs() <= dirs, timeout=30, what="temp dirs to go")
    for env in (hosts.source, hosts.target):
        log = env.daemon_log(None)
        assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]


def test_migrate_running_vm_with_its_disk(hosts: TwoHosts, guest: dict[str, str]) -> None:
    src, tgt = hosts.source, hosts.target
    uuid, before = guest_on_source(hosts, guest)
    dirs = workdirs()
    src_pid = src.pid(uuid)
    assert src_pid is not None
    src_uid = src.get(uuid)["zone_uid"]
    up_before = uptime(src, uuid)
    tick_before = last_tick(src, uuid)
    t0 = time.monotonic()

    res = src.vmadm("migrate", uuid, hosts.destination, timeout=300)
    took = time.monotonic() - t0
    assert res.returncode == 0, f"{res.stderr}\n{src.daemon_log(3000)}\n{tgt.daemon_log(3000)}"
    assert res.stderr.startswith(f"Successfully migrated VM {uuid} to {hosts.destination}")

    # The VM is the target's now: running, its own uid, confined.
    vm = tgt.get(uuid)
    assert vm["state"] == "running", vm
    assert "migration" not in vm
    assert vm["zone_uid"] != src_uid
    pid = tgt.pid(uuid)
    assert pid is not None
    st = proc_status(pid)
    assert st["Uid"].split()[0] == str(vm["zone_uid"])
    assert st["Seccomp"] == "2"
    assert st["NoNewPrivs"] == "1"
    assert uuid in Path(f"/proc/{pid}/cgroup").read_text()
    assert qemu_status(tgt, uuid)["status"] == "running"

    # The guest went on: its ticker counts on, its uptime did not restart.
    tgt.wait_console(uuid, f"TICK {tick_before + 5}", timeout=60)
    up_after = uptime(tgt, uuid)
    assert up_before < up_after < up_before + took + 60, (up_before, up_after, took)
    # Its disk is the same, read back from the target's disk.
    assert disk_sum(tgt, uuid) == before

    # Gone from the source: record, zone, qemu.
    assert src.vmadm("get", uuid).returncode == 1
    assert not (Path(src.zones) / uuid).exists()
    src.wait_for(lambda: not Path(f"/proc/{src_pid}").exists(), what="the source qemu to go")
    done = progress(src, uuid)
    assert done["state"] == "done"
    assert isinstance(done["downtime_ms"], int)
    # Both daemons said so on /events.
    for env, key, value in ((src, "target", hosts.destination), (tgt, "direction", "in")):
        events = read_events(env, lambda evs: any(e["type"] == "migrated" for e in evs))
        migrated = next(e for e in events if e["type"] == "migrated")
        assert (migrated["vm"], migrated[key]) == (uuid, value), migrated
    assert_no_traceback(hosts, dirs)


def test_target_dies_mid_copy(hosts: TwoHosts, guest: dict[str, str]) -> None:
    src, tgt = hosts.source, hosts.target
    uuid, before = guest_on_source(hosts, guest)
    dirs = workdirs()
    pid = src.pid(uuid)
    assert pid is not None
    start_migration(hosts, uuid, bandwidth=8)  # a 64 MiB disk: seconds of copying
    wait_state(src, uuid, ("copying_disks",))
    target_pid = tgt.pid(uuid)
    assert target_pid is not None
    os.kill(target_pid, signal.SIGKILL)
    assert wait_state(src, uuid, ("failed", "done")) == "failed"
    assert_source_unchanged(hosts, uuid, pid, last_tick(src, uuid))
    assert_target_clean(hosts, uuid)
    assert disk_sum(src, uuid) == before
    assert_no_traceback(hosts, dirs)


def test_ssh_connection_drops(hosts: TwoHosts, guest: dict[str, str]) -> None:
    src = hosts.source
    uuid, before = guest_on_source(hosts, guest)
    dirs = workdirs()
    pid = src.pid(uuid)
    assert pid is not None
    start_migration(hosts, uuid, bandwidth=8)
    wait_state(src, uuid, ("copying_disks",))
    sessions = hosts.sshd_sessions()
    assert sessions, "no ssh session on the target"
    for session in sessions:
        os.kill(session, signal.SIGKILL)  # the connection drops, as a cut cable would
    assert wait_state(src, uuid, ("failed", "done")) == "failed"
    assert_source_unchanged(hosts, uuid, pid, last_tick(src, uuid))
    assert_target_clean(hosts, uuid)
    assert disk_sum(src, uuid) == before
    assert_no_traceback(hosts, dirs)


@pytest.mark.parametrize("phase", ["copying_disks", "migrating_ram"])
def test_source_daemon_killed_mid_migration(
    hosts: TwoHosts, guest: dict[str, str], phase: str
) -> None:
    src = hosts.source
    uuid, before = guest_on_source(hosts, guest)
    dirs = workdirs()
    pid = src.pid(uuid)
    assert pid is not None
    start_migration(hosts, uuid, bandwidth=8)
    wait_state(src, uuid, (phase,))
    src.stop_daemon(sig=signal.SIGKILL)
    record = json.loads((Path(src.zones) / uuid / "vm.json").read_text())
    assert record["migration"]["role"] == "source", "the migration was not persisted"
    src.start_daemon()
    assert_source_unchanged(hosts, uuid, pid, last_tick(src, uuid))
    assert_target_clean(hosts, uuid)
    assert disk_sum(src, uuid) == before
    assert_no_traceback(hosts, dirs)


def test_target_daemon_killed_mid_migration(hosts: TwoHosts, guest: dict[str, str]) -> None:
    src, tgt = hosts.source, hosts.target
    uuid, before = guest_on_source(hosts, guest)
    dirs = workdirs()
    pid = src.pid(uuid)
    assert pid is not None
    start_migration(hosts, uuid, bandwidth=8)
    wait_state(src, uuid, ("copying_disks",))
    tgt.stop_daemon(sig=signal.SIGKILL)
    record = json.loads((Path(tgt.zones) / uuid / "vm.json").read_text())
    assert record["migration"] == {**record["migration"], "role": "target", "state": "incoming"}
    tgt.start_daemon()
    assert wait_state(src, uuid, ("failed", "done")) == "failed"
    assert_source_unchanged(hosts, uuid, pid, last_tick(src, uuid))
    assert_target_clean(hosts, uuid)
    assert disk_sum(src, uuid) == before
    assert_no_traceback(hosts, dirs)


def test_migrate_refuses_bad_targets(hosts: TwoHosts, guest: dict[str, str]) -> None:
    src = hosts.source
    uuid = src.run_vm(guest_payload(guest))
    for bad in ("-oProxyCommand=sh", "root@host;reboot", ""):
        res = src.vmadm("migrate", uuid, bad)
        assert res.returncode == 1
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    status, body = src.api("POST", f"/vm/{uuid}", action="migrate", target="-x")
    assert status == 400, body
    assert "migration" not in src.get(uuid)
