"""Each VM's files belong to a user of its own (its zone_uid): one VM's user can
read nothing of another VM's, nor the VM's own vm.json."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.world import World, bios_payload
from vmadmd.vm.config import DEFAULT_ZONE_UID_BASE
from vmadmd.vm.sockets import connect_unix


@pytest.fixture
def open_world() -> Iterator[World]:
    """A world whose directories others may pass through (pytest's temp dirs
    are 0700: no uid but root could reach anything in them)."""
    root = tempfile.mkdtemp(prefix="vmadmd-zones-")
    os.chmod(root, 0o711)
    world = World(Path(root), deep=False)
    os.chmod(world.zones, 0o711)
    try:
        yield world
    finally:
        world.cleanup()
        shutil.rmtree(root, ignore_errors=True)


def as_uid(uid: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
    )  # fmt: skip


def test_each_vm_has_its_own_user_and_files(open_world: World) -> None:
    env = open_world
    a = env.create(bios_payload(disks=[{"size": 8}]))
    b = env.create(bios_payload(disks=[{"size": 8}]))
    vm_a, vm_b = env.get(a), env.get(b)
    uid_a, uid_b = vm_a["zone_uid"], vm_b["zone_uid"]
    assert uid_a != uid_b
    assert min(uid_a, uid_b) >= DEFAULT_ZONE_UID_BASE
    for vm, uid in ((vm_a, uid_a), (vm_b, uid_b)):
        zonepath = Path(vm["zonepath"])
        assert (zonepath / "root").stat().st_uid == uid
        assert (zonepath / "root" / "tmp").stat().st_uid == uid
        disk = Path(vm["disks"][0]["path"])
        assert (disk.stat().st_uid, disk.stat().st_mode & 0o777) == (uid, 0o600)
        vm_json = zonepath / "vm.json"
        assert (vm_json.stat().st_uid, vm_json.stat().st_mode & 0o777) == (0, 0o600)
    # A's user reads its own disk, and nothing of B's, nor its own vm.json.
    assert as_uid(uid_a, "head", "-c", "4", vm_a["disks"][0]["path"]).returncode == 0
    for target in (vm_b["disks"][0]["path"], f"{vm_b['zonepath']}/root/tmp",
                   f"{vm_a['zonepath']}/vm.json"):  # fmt: skip
        res = (
            as_uid(uid_a, "ls", "-l", target)
            if target.endswith("tmp")
            else as_uid(uid_a, "head", "-c", "4", target)
        )
        assert res.returncode != 0, target
        assert "Permission denied" in res.stderr, (target, res.stderr)
    # Not settable, and never given again, not even once its VM is deleted
    # (what it left behind stays out of a new VM's reach).
    res = env.vmadm("update", a, "-f", "-", input=json.dumps({"zone_uid": 0}))
    assert res.returncode == 1
    assert "read-only" in res.stderr
    env.vmadm("delete", a, check=True)
    c = env.create(bios_payload())
    assert env.get(c)["zone_uid"] > max(uid_a, uid_b), "a deleted VM's uid is never reused"


def proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def test_qemu_runs_confined(env: World) -> None:
    """Two running VMs: each qemu as its own user with no privilege at all, in
    its seccomp sandbox, born in its own cgroup, reaching its disk through an
    fd; in a zones root whose ancestors are closed to it (pytest's 0700 temp
    dir), so it needs no path outside its root/tmp."""
    env.start_daemon()
    a = env.run_vm(bios_payload(disks=[{"size": 8}]))
    b = env.run_vm(bios_payload())
    assert any(not os.stat(p).st_mode & 0o001 for p in Path(env.zones).parents)
    uids = set()
    for uuid in (a, b):
        vm = env.get(uuid)
        pid, uid = vm["pid"], vm["zone_uid"]
        uids.add(uid)
        status = proc_status(pid)
        assert status["Uid"].split() == [str(uid)] * 4, status["Uid"]
        assert status["Gid"].split() == [str(uid)] * 4, status["Gid"]
        assert status["Groups"] == ""
        assert status["Seccomp"] == "2"
        assert status["NoNewPrivs"] == "1"
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, (caps, status[caps])
        with open(f"/proc/{pid}/cgroup") as f:
            assert f"/vmadmd/{uuid}" in f.read()
        assert os.readlink(f"/proc/{pid}/cwd") == f"{vm['zonepath']}/root/tmp"
        # No host path on its command line: names relative to root/tmp, fds.
        assert vm["zonepath"].encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert len(uids) == 2
    assert 0 not in uids
    disk = env.get(a)["disks"][0]["path"]
    pid_a = env.get(a)["pid"]
    held = {os.readlink(f"/proc/{pid_a}/fd/{fd}") for fd in os.listdir(f"/proc/{pid_a}/fd")}
    assert disk in held, "the disk is reached through the fd it was given"


def test_sandbox_kills_a_qemu_that_would_spawn(env: World) -> None:
    """spawn=deny for real: a monitor command that makes qemu fork a program
    (a migration to ``exec:``) kills it with SIGSYS, the program never runs,
    and the daemon records the crash with its signal (qemu's waiter saw it).

    The API's pass-through refuses ``migrate``; a second monitor that
    ``qemu_extra_opts`` opens (root's to use, as the VM's options are) stands
    for a guest that broke into qemu."""
    shared = tempfile.mkdtemp(prefix="vmadmd-spawn-")
    os.chmod(shared, 0o1777)  # the VM's user could write here, if it ran anything
    marker = Path(shared) / "spawned"
    try:
        env.start_daemon()
        extra = "-qmp unix:extra.qmp,server=on,wait=off"
        uuid = env.run_vm(bios_payload(qemu_extra_opts=extra))
        res = env.vmadm("qmp", uuid, "--hmp", f'migrate "exec:touch {marker}"')
        assert "only 'info ...' passes" in res.stderr
        with connect_unix(str(env.runtime(uuid)), "extra.qmp") as monitor:
            monitor.settimeout(10)
            reader = monitor.makefile("rb")
            reader.readline()  # the greeting
            migrate = {"execute": "migrate", "arguments": {"uri": f"exec:touch {marker}"}}
            for command in ({"execute": "qmp_capabilities"}, migrate):
                monitor.sendall(json.dumps(command).encode() + b"\n")
                with contextlib.suppress(OSError):
                    reader.readline()
        env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=20, what="killed")
        last = env.get(uuid)["last_exit"]
        assert (last["reason"], last.get("signal")) == ("crash", "SIGSYS"), last
        assert not marker.exists()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_vm_from_before_users_gets_one_at_start(env: World) -> None:
    """A VM created before VMs had users of their own (no zone_uid in its
    record, root/ and disk root's) is given a user when it starts, and its
    files are handed over; its qemu runs as that user."""
    uuid = env.create(bios_payload(disks=[{"size": 8}]))
    vm_json = Path(env.zones) / uuid / "vm.json"
    record = json.loads(vm_json.read_text())
    record.pop("zone_uid")
    vm_json.write_text(json.dumps(record))
    zonepath = Path(env.zones) / uuid
    for path in (zonepath / "root", zonepath / "root" / "tmp", Path(record["disks"][0]["path"])):
        os.chown(path, 0, 0)
    env.vmadm("start", uuid, check=True)
    vm = env.get(uuid)
    uid = vm["zone_uid"]
    assert uid >= DEFAULT_ZONE_UID_BASE
    assert proc_status(vm["pid"])["Uid"].split()[0] == str(uid)
    assert (zonepath / "root" / "tmp").stat().st_uid == uid
    assert Path(vm["disks"][0]["path"]).stat().st_uid == uid
    env.vmadm("stop", uuid, "-F", check=True)


def test_a_qemu_started_by_the_previous_version_is_still_served(env: World) -> None:
    """Upgrade: a qemu the previous vmadmd started (as root, -daemonize, so
    working in "/", with a pidfile) is picked up, and its screenshot lands in
    its root/tmp (given the whole path), not in "/"."""
    uuid = env.create(bios_payload())
    runtime = env.runtime(uuid)
    subprocess.run(
        ["qemu-system-x86_64", "-uuid", uuid, "-machine", "pc,accel=tcg", "-m", "64",
         "-nodefaults", "-vga", "std", "-display", "none",
         "-qmp", "unix:vm.qmp,server=on,wait=off", "-pidfile", str(runtime / "vm.pid"),
         "-daemonize"],
        cwd=runtime, check=True,
    )  # fmt: skip
    pid = int((runtime / "vm.pid").read_text())
    try:
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        assert proc_status(pid)["Uid"].split()[0] == "0"
        env.start_daemon()
        env.wait_qmp(uuid)
        res = env.vmadm("sysrq", uuid, "screenshot")
        assert res.returncode == 0, res.stderr
        assert (runtime / "vm.ppm").read_bytes().startswith(b"P6")
        assert not os.path.exists("/vm.ppm")
    finally:
        # Working in "/", it is not found by the world's clean-up.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
