"""Each VM's files belong to a user of its own (its zone_uid): one VM's user can
read nothing of another VM's, nor the VM's own vm.json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.world import World, bios_payload
from vmadmd.vm.config import DEFAULT_ZONE_UID_BASE


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
    # Not settable, and not reused while the VM exists.
    res = env.vmadm("update", a, "-f", "-", input=json.dumps({"zone_uid": 0}))
    assert res.returncode == 1
    assert "read-only" in res.stderr
    env.vmadm("delete", a, check=True)
    c = env.create(bios_payload())
    assert env.get(c)["zone_uid"] == uid_a, "a deleted VM's uid is free again"
    assert env.get(c)["zone_uid"] != uid_b
