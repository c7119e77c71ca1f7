"""Snapshots (real qemu, the small test guest): live on a running two-disk VM,
on a stopped one, rollback, names, daemon restarts, delete with the VM.

The guest has no file system on its disks: it writes and reads raw blocks
with ``dd`` through its serial console, which is as honest a data check as
a file (what the guest wrote is what it reads back, or not).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from .conftest import Env, guest_payload
from .wsclient import WsClient

NONCES = itertools.count(int(time.time()) % 100000)
OFFSET_MIB = 3  # where the guest writes its marks on each disk


def serial(env: Env, uuid: str, command: str, until: str, timeout: float = 60) -> str:
    """Send ``command`` to the guest's shell; what it printed until ``until``."""

    async def run() -> bytes:
        ws = await WsClient.connect(f"/vm/{uuid}/serial", unix=env.socket)
        try:
            seen = b""
            await ws.send(command.encode() + b"\n")
            async with asyncio.timeout(timeout):
                while until.encode() not in seen:
                    data = await ws.receive(timeout)
                    if data is None:
                        raise AssertionError(f"console closed: {seen!r}")
                    seen += data
            return seen
        finally:
            await ws.close()

    return asyncio.run(run()).decode(errors="replace")


def write_mark(env: Env, uuid: str, dev: str, mark: str, slot: int) -> None:
    """The guest writes ``mark`` (direct I/O, so it is on the disk, not in its
    page cache) into 4 KiB slot ``slot`` past OFFSET_MIB of ``/dev/<dev>``."""
    seek = OFFSET_MIB * 256 + slot
    nonce = next(NONCES)
    serial(env, uuid, f"printf '%-4096s' '{mark}' | dd of=/dev/{dev} bs=4096 seek={seek} "
           f"count=1 oflag=direct 2>/dev/null && echo wrote{nonce}-$((1+1))",
           f"wrote{nonce}-2")  # fmt: skip


def read_marks(env: Env, uuid: str, dev: str, slots: int) -> list[str]:
    """What slots 0..slots-1 of ``/dev/<dev>`` hold, as the guest reads them."""
    skip = OFFSET_MIB * 256
    nonce = next(NONCES)
    out = serial(env, uuid, f"echo begin{nonce}-$((1+1)); dd if=/dev/{dev} bs=4096 skip={skip} "
                 f"count={slots} iflag=direct 2>/dev/null | tr -c 'A-Za-z0-9-' '\\n' | grep . ; "
                 f"echo end{nonce}-$((40+2))", f"end{nonce}-42")  # fmt: skip
    body = out.split(f"begin{nonce}-2", 1)[1].split(f"end{nonce}-42", 1)[0]
    return [w for w in body.split() if w.startswith("MARK-")]


def past_events(env: Env, uuid: str, last: str) -> list[tuple[str, dict[str, Any]]]:
    """The snapshot events of ``uuid`` in the daemon's history (type, data),
    read from ``/events`` until ``last``."""
    seen: list[tuple[str, dict[str, Any]]] = []
    kind = None
    for line in env.client(timeout=30).stream("/events", {"vm": uuid, "last_event_id": "0"}):
        if line.startswith("event: "):
            kind = line.split(": ", 1)[1]
        elif line.startswith("data: ") and kind is not None and kind.startswith("snapshot_"):
            seen.append((kind, json.loads(line[6:])))
            if kind == last:
                break
    return seen


def two_disk_vm(env: Env, guest: dict[str, str]) -> str:
    env.start_daemon()
    return env.run_vm(guest_payload(guest, disks=[{"size": 16}, {"size": 16}]), ready=True)


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stderr


def qemu_img_snapshots(path: Path) -> list[str]:
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                          capture_output=True, check=True, text=True)  # fmt: skip
    return [s["name"] for s in json.loads(info.stdout).get("snapshots", [])]


def test_live_snapshot_then_rollback_restores_both_disks(env: Env, guest: dict[str, str]) -> None:
    vm = two_disk_vm(env, guest)
    zone = Path(env.zones) / vm
    for dev in ("vda", "vdb"):
        write_mark(env, vm, dev, f"MARK-before-{dev}", 0)
    assert ok(env.vmadm("create-snapshot", vm, "before:1")) == (
        f"Created snapshot before:1 for VM {vm}\n"
    )
    # Every VM has the guest agent's channel; this guest runs no agent (its
    # port is closed), so the snapshot was crash-consistent, and took no wait.
    _, info = env.client().request("GET", f"/vm/{vm}", {"type": "chardev"})
    agent = [c for c in info["chardev"] if c["label"] == "qga0"]
    assert agent == [{"label": "qga0", "filename": agent[0]["filename"], "frontend-open": False}]
    for dev in ("vda", "vdb"):
        write_mark(env, vm, dev, f"MARK-after-{dev}", 1)
    ok(env.vmadm("create-snapshot", vm, "later%2"))
    got = env.get(vm)["snapshots"]
    assert [s["name"] for s in got] == ["before:1", "later%2"]
    assert all(isinstance(s["size"], int) and s["size"] > 0 for s in got)
    assert got[0]["created_at"] < got[1]["created_at"]
    # Both disks have both, in their own files (nothing else was made).
    for disk in ("disk0.qcow2", "disk1.qcow2"):
        assert qemu_img_snapshots(zone / disk) == ["before:1", "later%2"]
    assert sorted(p.name for p in zone.iterdir() if p.name.startswith("disk")) == [
        "disk0.qcow2", "disk1.qcow2"]  # fmt: skip
    _, body = env.client().request("GET", "/vm/" + vm + "/snapshots")
    assert [s["name"] for s in body] == ["before:1", "later%2"]
    pid = env.pid(vm)
    ok(env.vmadm("rollback-snapshot", vm, "before:1"))
    # Stopped (a new qemu), restored, booted again, the newer snapshot gone.
    new_pid = env.pid(vm)
    assert new_pid is not None
    assert new_pid != pid
    env.wait_console(vm)  # the new boot's ready line (its own console log)
    env.wait_qmp(vm)
    for dev in ("vda", "vdb"):
        assert read_marks(env, vm, dev, 2) == [f"MARK-before-{dev}"]
    assert [s["name"] for s in env.get(vm)["snapshots"]] == ["before:1"]
    status, body = env.api("GET", "/vm/" + vm + "/snapshots/later%252")
    assert status == 404, body
    events = past_events(env, vm, "snapshot_rolled_back")
    assert [kind for kind, _ in events] == [
        "snapshot_created", "snapshot_created", "snapshot_rolled_back"]  # fmt: skip
    assert events[0][1]["consistency"] == "crash"
    assert events[0][1]["name"] == "before:1"
    assert events[2][1]["deleted"] == ["later%2"]
    last_exit = env.get(vm).get("last_exit", {})
    assert last_exit.get("reason") == "stop", last_exit


def test_one_instant_for_both_disks(env: Env, guest: dict[str, str]) -> None:
    """The guest writes a counter to vda then vdb, over and over; a snapshot
    taken meanwhile and rolled back to shows vdb at vda's count or one behind
    (one transaction drains both disks at once)."""
    vm = two_disk_vm(env, guest)
    loop = ("i=0; while [ $i -lt 100000 ]; do i=$((i+1)); "
            "printf '%-4096s' MARK-$i | dd of=/dev/vda bs=4096 seek=768 count=1 oflag=direct "
            "2>/dev/null; printf '%-4096s' MARK-$i | dd of=/dev/vdb bs=4096 seek=768 count=1 "
            "oflag=direct 2>/dev/null; done &")  # fmt: skip
    serial(env, vm, loop + " echo loop_$((1+1))", "loop_2")
    time.sleep(3)  # some hundreds of rounds
    ok(env.vmadm("create-snapshot", vm, "mid"))
    ok(env.vmadm("rollback-snapshot", vm, "mid"))
    env.wait_console(vm)
    env.wait_qmp(vm)
    a, b = read_marks(env, vm, "vda", 1), read_marks(env, vm, "vdb", 1)
    assert (len(a), len(b)) == (1, 1), (a, b)
    na, nb = int(a[0].split("-")[1]), int(b[0].split("-")[1])
    assert na > 0, (na, nb)
    assert na - nb in (0, 1), (na, nb)


def test_stopped_vm_snapshots_names_restart_and_delete(env: Env, guest: dict[str, str]) -> None:
    env.start_daemon()
    vm = env.create(guest_payload(guest, disks=[{"size": 16}, {"size": 16}]))
    zone = Path(env.zones) / vm
    # Names as SmartOS allows them, checked before anything is done.
    for bad in ("", "a" * 65, "a b", "a/b", "../x", "-c", "é", "x\n"):
        res = env.vmadm("create-snapshot", vm, bad)
        assert res.returncode == 1, bad
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        status, body = env.client().request("GET", "/ping")
        assert status == 200
    status, body = env.api("POST", f"/vm/{vm}/snapshots", name="a" * 65)
    assert (status, body["error"]["code"]) == (400, "InvalidParameter"), body
    status, body = env.api("POST", f"/vm/{vm}/snapshots/{'b' * 65}", action="rollback")
    assert status == 400, body
    assert qemu_img_snapshots(zone / "disk0.qcow2") == []
    # Stopped: qemu-img, as the VM's user.
    ok(env.vmadm("create-snapshot", vm, "a" * 64))
    ok(env.vmadm("create-snapshot", vm, "s2"))
    res = env.vmadm("create-snapshot", vm, "s2")
    assert res.returncode == 1, res.stderr
    assert "already has a snapshot" in res.stderr, res.stderr
    for disk in ("disk0.qcow2", "disk1.qcow2"):
        assert qemu_img_snapshots(zone / disk) == ["a" * 64, "s2"]
        assert (zone / disk).stat().st_uid == env.get(vm)["zone_uid"]
    # They survive a daemon restart (vm.json and the files).
    env.stop_daemon()
    env.start_daemon()
    assert [s["name"] for s in env.get(vm)["snapshots"]] == ["a" * 64, "s2"]
    ok(env.vmadm("delete-snapshot", vm, "s2"))
    res = env.vmadm("delete-snapshot", vm, "s2")
    assert res.returncode == 1, res.stderr
    assert "no snapshot" in res.stderr, res.stderr
    assert qemu_img_snapshots(zone / "disk1.qcow2") == ["a" * 64]
    # Rollback of a stopped VM leaves it stopped.
    ok(env.vmadm("rollback-snapshot", vm, "a" * 64))
    assert env.get(vm)["state"] == "stopped"
    # Orphans (snapshots vm.json does not list: a daemon killed between
    # taking one and writing vm.json) are dropped, stopped or live, not
    # doubled (qcow2 keeps two of one name, and -a would take the older).
    for disk in ("disk0.qcow2", "disk1.qcow2"):
        for orphan in ("orph", "live-orph"):
            subprocess.run(["qemu-img", "snapshot", "-c", orphan, str(zone / disk)], check=True)
    ok(env.vmadm("create-snapshot", vm, "orph"))
    ok(env.vmadm("start", vm))
    env.wait_qmp(vm)
    ok(env.vmadm("create-snapshot", vm, "live-orph"))
    ok(env.vmadm("stop", vm, "-F"))
    for disk in ("disk0.qcow2", "disk1.qcow2"):
        assert qemu_img_snapshots(zone / disk) == ["a" * 64, "orph", "live-orph"]
    assert [s["name"] for s in env.get(vm)["snapshots"]] == ["a" * 64, "orph", "live-orph"]
    # Removed with the VM.
    ok(env.vmadm("delete", vm))
    assert not zone.exists()
    assert not re.search(r"Traceback", env.daemon_log(None))
    assert os.path.exists(env.socket)


# -- send | receive ------------------------------------------------------------------


def send_receive(a: Env, b: Env, uuid: str) -> subprocess.CompletedProcess[bytes]:
    """``vmadm send UUID | vmadm receive`` from world a into world b (a pipe)."""
    from harness.world import tool

    sender = subprocess.Popen([tool("vmadm"), "send", uuid], env=a.environ,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert sender.stdout is not None
    receiver = subprocess.run([tool("vmadm"), "receive"], env=b.environ, stdin=sender.stdout,
                              capture_output=True, timeout=300, check=False)  # fmt: skip
    sender.stdout.close()
    assert sender.wait(timeout=60) == 0, sender.stderr.read() if sender.stderr else ""
    return receiver


def receive_bytes(b: Env, data: bytes) -> subprocess.CompletedProcess[bytes]:
    from harness.world import tool

    return subprocess.run([tool("vmadm"), "receive"], env=b.environ, input=data,
                          capture_output=True, timeout=120, check=False)  # fmt: skip


def test_send_receive_between_zones_roots(env: Env, guest: dict[str, str], tmp_path: Path) -> None:
    from harness.world import World

    other = World(tmp_path / "host-b")
    # Two hosts' worth of zones roots on one machine: one uid ledger, so the
    # received VM's user is not the sender's.
    other.extra_env["VMADM_UID_LEDGER"] = env.ledger
    try:
        env.start_daemon()
        vm = env.run_vm(guest_payload(guest, disks=[{"size": 16}]), ready=True)
        write_mark(env, vm, "vda", "MARK-sent", 0)
        res = env.vmadm("send", vm)
        assert res.returncode == 1, res.stderr
        assert "running" in res.stderr, res.stderr
        ok(env.vmadm("stop", vm, "-F"))
        ok(env.vmadm("create-snapshot", vm, "kept"))
        with (tmp_path / "vm.stream").open("wb") as f:
            subprocess.run([tool_path("vmadm"), "send", vm], env=env.environ, stdout=f,
                           check=True, timeout=120)  # fmt: skip
        stream = (tmp_path / "vm.stream").read_bytes()
        assert stream.startswith(b"VMADM-STREAM 1\n")
        other.start_daemon()
        zones_b = Path(other.zones)
        # Truncated anywhere, a byte flipped anywhere, or more after its end:
        # nothing is created.
        disk_at = stream.index(b"QFI\xfb")  # the disk's qcow2 header
        bad = {
            "truncated in the disk": stream[: disk_at + 5000],
            "truncated before the trailer": stream[:-70],
            "truncated in the header": stream[:30],
            "a byte flipped in the disk": flip(stream, disk_at + 70000),
            "a byte flipped in vm.json": flip(stream, stream.index(b'"alias"') + 3),
            "a byte flipped in the header": flip(stream, stream.index(b'"size"') + 2),
            "a byte flipped in the trailer": flip(stream, len(stream) - 5),
            "more after its end": stream + b"x",
            "empty": b"",
        }
        for why, data in bad.items():
            got_bad = receive_bytes(other, data)
            assert got_bad.returncode == 1, why
            assert len(got_bad.stderr.strip().splitlines()) == 1, (why, got_bad.stderr)
            assert list(zones_b.iterdir()) == [], (why, list(zones_b.iterdir()))
        # Whole, through a pipe: the same VM (uuid, disk, snapshots) on host b.
        moved = send_receive(env, other, vm)
        assert moved.returncode == 0, moved.stderr
        assert moved.stderr.decode() == f"Successfully received VM {vm}\n"
        again = send_receive(env, other, vm)
        assert again.returncode == 1, again.stderr
        assert b"already exists" in again.stderr, again.stderr
        got = other.get(vm)
        sent = env.get(vm)
        assert got["zone_uid"] != sent["zone_uid"]
        assert got["snapshots"] == sent["snapshots"]
        assert got["disks"][0]["path"] == f"{other.zones}/{vm}/disk0.qcow2"
        assert (zones_b / vm / "disk0.qcow2").stat().st_uid == got["zone_uid"]
        assert sorted(p.name for p in zones_b.iterdir()) == [vm]
        # It boots on host b, with what the guest wrote on host a.
        ok(other.vmadm("start", vm))
        other.wait_console(vm)
        other.wait_qmp(vm)
        assert read_marks(other, vm, "vda", 1) == ["MARK-sent"]
        # Its snapshot came along, inside the disk.
        assert qemu_img_snapshots(zones_b / vm / "disk0.qcow2") == ["kept"]
    finally:
        other.cleanup()


def tool_path(name: str) -> str:
    from harness.world import tool

    return tool(name)


def flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def test_guest_agent_freezes_around_a_live_snapshot(env: Env, guest: dict[str, str]) -> None:
    """A guest whose agent answers on org.qemu.guest_agent.0 is frozen for
    the snapshot and thawed after (the agent here is a stand-in, a shell loop
    speaking qemu-ga's protocol on the real virtio-serial port: see
    tools/build-guest-agent.sh)."""
    import shutil

    from harness.world import REPO

    cache = REPO / ".cache" / "guest-agent"
    subprocess.run([str(REPO / "tools" / "build-guest-agent.sh"), str(REPO / ".cache" / "guest"),
                    str(cache)], check=True)  # fmt: skip
    initrd = Path(guest["initrd"]).parent / "agent-initrd.img"
    shutil.copy(cache / "initrd.img", initrd)
    os.chmod(initrd, 0o644)
    env.start_daemon()
    payload = guest_payload({**guest, "initrd": str(initrd)}, disks=[{"size": 16}])
    vm = env.run_vm(payload, ready=True)
    # The guest holds its agent's port open (qemu says so).
    env.wait_for(
        lambda: any(c["label"] == "qga0" and c["frontend-open"]
                    for c in env.client().request("GET", f"/vm/{vm}",
                                                  {"type": "chardev"})[1]["chardev"]),
        timeout=30, what="the guest agent's port open",
    )  # fmt: skip
    ok(env.vmadm("create-snapshot", vm, "frozen"))
    events = past_events(env, vm, "snapshot_created")
    assert events[-1][1]["consistency"] == "filesystem", events
    nonce = next(NONCES)
    out = serial(env, vm, f"echo b{nonce}-$((1+1)); cat /tmp/agent.log; echo e{nonce}-$((1+1))",
                 f"e{nonce}-2")  # fmt: skip
    assert out.split(f"b{nonce}-2", 1)[1].split(f"e{nonce}-2")[0].split() == ["frozen", "thawed"]
