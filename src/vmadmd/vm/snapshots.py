"""Disk snapshots: internal qcow2 snapshots, one of each disk, under one name.

Why internal snapshots (``qemu-img snapshot`` on a stopped VM,
``blockdev-snapshot-internal-sync`` in one QMP ``transaction`` on a running
one) rather than external overlays: each disk stays the one file
``<zonepath>/disk<N>.qcow2`` that the launcher opens and passes to the
confined qemu as an fd.  An overlay chain would add files qemu must be
given (``blockdev-add`` over an fd for each new overlay), rollback would
mean swapping files under a running chain, and delete would mean a
``block-commit``/``block-stream``; with internal snapshots, create and
delete are metadata in the file qemu already holds, and rollback is
``qemu-img snapshot -a`` on the stopped disk.

What is kept where: the snapshots themselves are in the qcow2 files (they
go with the VM's files: delete, send); their list (``snapshots``:
``[{"name", "created_at", "size"}]``, oldest first) is in ``vm.json``,
written after qemu or qemu-img made them.  ``size`` is the bytes the disk
files held when the snapshot was taken (what it pins, as ZFS's
``referenced``): qcow2 keeps no count of the clusters one snapshot alone
holds.

``qemu-img`` reads files the VM's user owns (a guest that broke into qemu
could have rewritten their headers): it runs as that user, with no
privileges (``setpriv``), with an address-space limit, on the disk as an fd
we opened without following a link (``/dev/fd/N``), with no backing file
(the header's is never followed).  Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from vmadmd.errors import InvalidParameter, VmadmError, WrongState
from vmadmd.vm.store import VmPaths, VmRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

KEY = "snapshots"
NAME_MAX = 64
NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.:%")
QEMU_IMG_TIMEOUT = 600.0
QEMU_IMG_MEMORY = 4 << 30  # address space for qemu-img (RLIMIT_AS): its thread stacks count
FIRST_FD = 3  # where the disk fd lands in qemu-img


class SnapshotNotFound(VmadmError):
    code = "SnapshotNotFound"
    status = 404


class SnapshotExists(VmadmError):
    code = "SnapshotExists"
    status = 409


def validate_name(name: object) -> str:
    """A snapshot name as SmartOS allows: 1 to 64 of ``[A-Za-z0-9-_.:%]``."""
    if not isinstance(name, str) or not name:
        raise InvalidParameter("a snapshot name is a non-empty string")
    if len(name) > NAME_MAX:
        raise InvalidParameter(f"a snapshot name is at most {NAME_MAX} characters")
    if not set(name) <= NAME_CHARS:
        raise InvalidParameter(
            f"a snapshot name is made of A-Z a-z 0-9 - _ . : % only, not {name[:NAME_MAX]!r}"
        )
    return name


def entries(record: VmRecord) -> list[dict[str, Any]]:
    """The VM's snapshots, oldest first."""
    value = record.get(KEY)
    if not isinstance(value, list):
        return []
    return [s for s in value if isinstance(s, dict) and isinstance(s.get("name"), str)]


def find(record: VmRecord, name: str) -> int:
    """The index of snapshot ``name`` in ``entries(record)``, else SnapshotNotFound."""
    for i, snap in enumerate(entries(record)):
        if snap["name"] == name:
            return i
    raise SnapshotNotFound(f"VM {record.get('uuid')} has no snapshot {name!r}")


def check_new(record: VmRecord, name: str) -> None:
    """``name`` is free and every disk can have internal snapshots (qcow2)."""
    if any(s["name"] == name for s in entries(record)):
        raise SnapshotExists(f"VM {record.get('uuid')} already has a snapshot {name!r}")
    disks = record.get("disks") or []
    if not disks:
        raise WrongState(f"VM {record.get('uuid')} has no disk to snapshot")
    for i, disk in enumerate(disks):
        if not isinstance(disk, dict) or disk.get("image_format", "qcow2") != "qcow2":
            raise WrongState(f"VM {record.get('uuid')}: disks[{i}] is not qcow2 (no snapshots)")


def disk_names(record: VmRecord, paths: VmPaths) -> list[str]:
    """Each disk's file name in the zonepath (``disk<N>.*`` only)."""
    from vmadmd.vm.disks import is_disk_name

    out = []
    for i, disk in enumerate(record.get("disks") or []):
        path = disk.get("path") if isinstance(disk, dict) else None
        directory, name = os.path.split(str(path))
        if directory != paths.zonepath or not is_disk_name(name):
            raise WrongState(f"VM {record.get('uuid')}: disks[{i}] is not a disk of its zonepath")
        out.append(name)
    return out


def node_names(record: VmRecord) -> list[str]:
    """The block node of each disk in a running qemu (``vm/qemu.py`` names them)."""
    return [f"disk{i}" for i in range(len(record.get("disks") or []))]


def referenced(paths: VmPaths, names: list[str]) -> int:
    """Bytes the disk files hold now (allocated, not apparent)."""
    zfd = os.open(paths.zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        total = 0
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(name, dir_fd=zfd, follow_symlinks=False).st_blocks * 512
        return total
    finally:
        os.close(zfd)


def iso_now() -> str:
    ms = int(time.time() * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def new_entry(name: str, size: int) -> dict[str, Any]:
    return {"name": name, "created_at": iso_now(), "size": size}


# -- on a stopped VM: qemu-img as the VM's user --------------------------------------


def _qemu_img_argv(uid: int, fd: int, op: str, name: str) -> list[str]:
    from vmadmd.vm.launch import resolve_program

    spec = {
        "driver": "qcow2",
        "backing": None,  # the header's backing file is never opened
        "file": {"driver": "file", "filename": f"/dev/fd/{fd}"},
    }
    return [
        resolve_program("setpriv"), f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
        resolve_program("prlimit"), f"--as={QEMU_IMG_MEMORY}", "--",
        resolve_program("qemu-img"), "snapshot", op, name, "json:" + json.dumps(spec),
    ]  # fmt: skip


def qemu_img_snapshot(paths: VmPaths, disk: str, uid: object, op: str, name: str) -> None:
    """``qemu-img snapshot -c|-a|-d NAME`` on the disk ``disk`` of the zonepath,
    as the VM's user (the caller holds the VM's lock and the VM is stopped)."""
    import subprocess

    from vmadmd.vm.disks import _open_checked
    from vmadmd.vm.launch import launcher_env

    if op not in ("-c", "-a", "-d"):
        raise ValueError(op)
    validate_name(name)  # never an option to qemu-img
    if not isinstance(uid, int) or uid <= 0:
        raise WrongState(f"{paths.zonepath}: the VM has no user of its own to run qemu-img as")
    zfd = os.open(paths.zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_checked(disk, zfd, os.O_RDWR, f"disk {disk}")
    finally:
        os.close(zfd)
    try:
        st = os.fstat(fd)
        if st.st_nlink != 1 or st.st_uid != uid:
            raise WrongState(f"disk {disk}: not a file of the VM's own (hard links or owner)")
        res = subprocess.run(
            _qemu_img_argv(uid, fd, op, name),
            stdin=subprocess.DEVNULL, capture_output=True, timeout=QEMU_IMG_TIMEOUT,
            check=False, env=launcher_env(), pass_fds=(fd,), cwd="/",
        )  # fmt: skip
    finally:
        os.close(fd)
    if res.returncode != 0:
        lines = res.stderr.decode(errors="replace").strip().splitlines()
        raise VmadmError(f"qemu-img snapshot {op} {name} on {disk}: {lines[-1] if lines else '?'}")


def create_stopped(paths: VmPaths, record: VmRecord, name: str) -> dict[str, Any]:
    """Snapshot every disk of a stopped VM (the caller holds its lock); all
    or none: a disk that fails has the ones before it undone.  Returns the
    new entry (not yet recorded)."""
    names = disk_names(record, paths)
    done: list[str] = []
    try:
        for disk in names:
            drop_orphans(paths, disk, record.get("zone_uid"), name)
            qemu_img_snapshot(paths, disk, record.get("zone_uid"), "-c", name)
            done.append(disk)
    except BaseException:
        for disk in done:
            with contextlib.suppress(VmadmError, OSError):
                qemu_img_snapshot(paths, disk, record.get("zone_uid"), "-d", name)
        raise
    return new_entry(name, referenced(paths, names))


ORPHANS_MAX = 8


def drop_orphans(paths: VmPaths, disk: str, uid: object, name: str) -> None:
    """Delete snapshots named ``name`` that ``vm.json`` does not list (the
    caller checked): left by a create whose record was never written (a
    daemon killed in between).  qcow2 takes two snapshots of one name, and
    a rollback would restore the older one."""
    for _ in range(ORPHANS_MAX):
        try:
            qemu_img_snapshot(paths, disk, uid, "-d", name)
        except VmadmError as err:
            if "not found" in err.message.lower():
                return
            raise


def delete_stopped(paths: VmPaths, record: VmRecord, name: str) -> None:
    """Delete snapshot ``name`` of every disk of a stopped VM.  A disk that
    no longer has it (a delete cut short before) is not an error."""
    for disk in disk_names(record, paths):
        try:
            qemu_img_snapshot(paths, disk, record.get("zone_uid"), "-d", name)
        except VmadmError as err:
            if "not found" not in err.message.lower():
                raise


def rollback_stopped(paths: VmPaths, record: VmRecord, name: str) -> list[str]:
    """Restore every disk of a stopped VM to ``name``, then delete the
    snapshots newer than it (SmartOS's rule); returns the names deleted."""
    index = find(record, name)
    for disk in disk_names(record, paths):
        qemu_img_snapshot(paths, disk, record.get("zone_uid"), "-a", name)
    newer = [s["name"] for s in entries(record)[index + 1 :]]
    for other in newer:
        delete_stopped(paths, record, other)
    return newer
