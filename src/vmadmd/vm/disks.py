"""A VM's disks: which files may be disks, and opening them for qemu.

A disk is ``<zonepath>/disk<N>.*``, made by ``vmadm create`` from a size or
over an image; nothing else ever is: not a host device, not another VM's
disk, not the zone's own files (``vm.json``, ``.vm.lock``, ``qemu.log``,
``qemu.exit``, anything under ``root/``), which root would otherwise open
read-write for qemu.  An image (``<images_dir>/<uuid>.qcow2|.raw``) is shared
by every VM made from it and only ever opened read-only, as the backing
node of such a disk.  Standard library only: ``vmadm`` runs this.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vmadmd.errors import InvalidParameter, StartFailed
from vmadmd.vm.store import VmPaths, VmRecord, validate_uuid

if TYPE_CHECKING:
    from vmadmd.vm.qemu import DiskFds

    DiskList = list[DiskFds]


class Disks:
    """The disk rules of one host: its images dir."""

    def __init__(self, images: str) -> None:
        self.images = images

    def find_image(self, image_uuid: str) -> tuple[str, str]:
        """The image file of ``image_uuid`` in the images dir, and its format."""
        for fmt in ("qcow2", "raw"):
            path = os.path.join(self.images, f"{validate_uuid(image_uuid)}.{fmt}")
            if os.path.isfile(path):
                return path, fmt
        raise InvalidParameter(f"image {image_uuid} not found in {self.images} (as .qcow2 or .raw)")

    def check_disk_path(self, where: str, path: str, zonepath: str) -> str:
        """``path`` as a disk of the VM at ``zonepath``: its canonical path, or
        InvalidParameter saying why it is none.

        A disk is ``<zonepath>/disk<N>.*``, a regular file, found without
        following a link; nothing else is (not /dev/sda, not another VM's
        disk, not the zone's own vm.json, .vm.lock, qemu.log, qemu.exit or
        anything under root/, which root would open read-write).  An image
        is never a disk: it is shared by the VMs made from it, and only ever
        opened read-only, as the backing of a disk made with ``image_uuid``.
        """
        name = self.disk_name(where, path, zonepath)
        try:
            st = disk_lstat(zonepath, name)
        except FileNotFoundError:
            raise InvalidParameter(f"{where} {path} does not exist") from None
        except OSError as err:
            raise InvalidParameter(f"{where} {path}: {err.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise InvalidParameter(f"{where} {path} is not a regular file (links are not followed)")
        return os.path.join(zonepath, name)

    def disk_name(self, where: str, path: str, zonepath: str) -> str:
        """The name in ``zonepath`` of the disk ``path`` names (its form only:
        ``disk<N>.*`` right in the zonepath), else InvalidParameter.

        Judged on the path as written (no link in it is followed, nothing
        under the zone is looked at); the zones root's own links are allowed
        for (``/zones`` a link to ``/data/zones``, say).
        """
        norm = os.path.normpath(path)
        directory, name = os.path.split(norm)
        images = self.images
        for base in {os.path.normpath(images), os.path.realpath(images)}:
            if norm == base or norm.startswith(base + os.sep):
                raise InvalidParameter(
                    f"{where} {path} is in the images dir ({images}): an image is never a "
                    "VM's disk (it is shared and read-only); give image_uuid for a "
                    "copy-on-write disk over it"
                )
        if directory not in {os.path.normpath(zonepath), os.path.realpath(zonepath)}:
            raise InvalidParameter(
                f"{where} {path} is outside the VM's zonepath: a disk is "
                f"{zonepath}/disk<N>.*, made from a size or an image_uuid"
            )
        if not is_disk_name(name):
            raise InvalidParameter(
                f"{where} {path} is not a disk: only {zonepath}/disk<N>.* are (vm.json, "
                ".vm.lock, qemu.log, qemu.exit and root/ are the zone's own)"
            )
        return name

    def open_disks(self, vm: VmRecord, paths: VmPaths) -> DiskList:
        """Each disk (and the image it is made from) opened by us, for qemu to
        use through the fd: qemu, as the VM's user, opens no disk path itself.

        A disk is opened read-write by name in the zonepath (a descriptor on
        it, ``O_NOFOLLOW``) and checked after the open: a regular file with
        one link (a hard link the VM's user made to it elsewhere, or one
        that makes it another file too, refuses the start).  An image is
        opened read-only, so whatever qemu is asked, it cannot write it.
        """

        out: DiskList = []
        try:
            for i, disk in enumerate(vm.get("disks", [])):
                try:
                    out.append(self.open_disk(f"disks[{i}].path", disk, paths.zonepath))
                except (OSError, InvalidParameter) as err:
                    msg = err.strerror if isinstance(err, OSError) else str(err)
                    raise StartFailed(f"VM {vm['uuid']}: disks[{i}]: {msg}") from None
        except BaseException:
            close_disks(out)
            raise
        return out

    def open_disk(self, where: str, disk: Mapping[str, Any], zonepath: str) -> DiskFds:
        """One disk (and its image) opened as ``open_disks`` does: at start,
        and for a disk hot-plugged into a running VM.  Raises OSError or
        InvalidParameter."""
        from vmadmd.vm.qemu import DiskFds

        name = self.disk_name(where, disk["path"], zonepath)
        zfd = os.open(zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = _open_checked(name, zfd, os.O_RDWR, f"{where} {disk['path']}")
        finally:
            os.close(zfd)
        try:
            st = os.fstat(fd)
            if st.st_nlink != 1:
                raise InvalidParameter(
                    f"{where} {disk['path']} has {st.st_nlink} hard links: refused "
                    "(a disk is one file of its own)"
                )
            if disk.get("image_uuid"):
                image, fmt = self.find_image(disk["image_uuid"])
                ifd = _open_checked(image, None, os.O_RDONLY, f"image {image}")
                return DiskFds(fd, ifd, fmt)
            return DiskFds(fd)
        except BaseException:
            os.close(fd)
            raise


def qemu_img_create(path: str, size_mib: int) -> None:
    import subprocess

    res = subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", path, f"{size_mib}M"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    if res.returncode != 0:
        raise InvalidParameter(
            f"qemu-img create failed: {res.stderr.decode(errors='replace').strip()}"
        )


def qemu_img_overlay(path: str, image: str, fmt: str, size_mib: int | None) -> None:
    """A copy-on-write qcow2 at ``path`` over ``image``.

    The backing format is written into the overlay (``-F``), so qemu never
    probes it (a raw image whose first bytes look like qcow2 must stay raw).
    Grown to ``size_mib`` when given, which may not be smaller than the image.
    """
    import json
    import subprocess

    if size_mib is not None:
        res = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", fmt, image],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise InvalidParameter(f"cannot read image {image}: {res.stderr.decode().strip()}")
        virtual = int(json.loads(res.stdout)["virtual-size"])
        if size_mib * 1024 * 1024 < virtual:
            raise InvalidParameter(
                f"disk size {size_mib} MiB is smaller than its image ({virtual >> 20} MiB)"
            )
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b", image, path]
    if size_mib is not None:
        cmd.append(f"{size_mib}M")
    res = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                         check=False)  # fmt: skip
    if res.returncode != 0:
        raise InvalidParameter(
            f"qemu-img create failed: {res.stderr.decode(errors='replace').strip()}"
        )


def close_disks(disks: DiskList) -> None:
    for disk in disks:
        for fd in (disk.fd, disk.image_fd):
            if fd is not None:
                os.close(fd)


def is_disk_name(name: str) -> bool:
    """``disk<N>.<ext>``: the only names in a zonepath that are disks."""
    number, dot, ext = name.removeprefix("disk").partition(".")
    return (
        name.startswith("disk")
        and number.isascii()
        and number.isdigit()
        and bool(dot)
        and ext.isascii()
        and bool(ext)
        and all(c.isalnum() or c in "._-" for c in ext)
    )


def disk_lstat(zonepath: str, name: str) -> os.stat_result:
    """``name`` in ``zonepath``, not followed if it is a link."""
    zfd = os.open(zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return os.stat(name, dir_fd=zfd, follow_symlinks=False)
    finally:
        os.close(zfd)


def _open_checked(path: str, dir_fd: int | None, mode: int, what: str) -> int:
    """``path`` opened with ``mode`` (in ``dir_fd``), never through a link as
    its last component, never blocking (a FIFO), and a regular file."""
    flags = mode | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise InvalidParameter(f"{what} is a symbolic link (not followed)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidParameter(f"{what} is not a regular file (not used)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def own_disk(paths: VmPaths, path: str, uid: int) -> None:
    """A disk of the VM's zonepath to the VM's user, 0600; opened by its name
    there, never through a link."""
    directory, name = os.path.split(path)
    if directory != paths.zonepath or not is_disk_name(name):
        return
    zfd = os.open(paths.zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=zfd)
    finally:
        os.close(zfd)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)


def _no_backing(path: str, fmt: str) -> str:
    """``path`` as qemu-img's ``json:`` filename, a qcow2 with no backing
    opened: whatever its header names is never read."""
    import json

    spec: dict[str, object] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        spec["backing"] = None
    return "json:" + json.dumps(spec)


QCOW2_MAGIC = b"QFI\xfb"


def virtual_size_mib(path: str, fmt: str = "qcow2") -> int:
    """A disk file's size as its guest sees it, in MiB (rounded up).

    Read from the file itself (a qcow2 header's ``size`` field at offset 24,
    big-endian; a raw file's length), opened by name in its directory, no
    link followed, never blocking: no qemu-img process for the shrink check
    of every ``update_disks``.  Anything else is asked of ``qemu-img info``.
    """
    import struct

    directory, name = os.path.split(path)
    dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_checked(name, dfd, os.O_RDONLY, f"disk {path}")
    except OSError as err:
        raise InvalidParameter(f"cannot read disk {path}: {err.strerror}") from None
    finally:
        os.close(dfd)
    try:
        if fmt == "raw":
            size = os.fstat(fd).st_size
        else:
            header = os.pread(fd, 32, 0)
            if fmt != "qcow2" or len(header) < 32 or header[:4] != QCOW2_MAGIC:
                return _qemu_img_size_mib(path, fmt)
            size = struct.unpack(">Q", header[24:32])[0]
    finally:
        os.close(fd)
    return -(-size // (1024 * 1024))


def _qemu_img_size_mib(path: str, fmt: str) -> int:
    """``virtual_size_mib`` by ``qemu-img info`` (while qemu may hold it: ``-U``)."""
    import json
    import subprocess

    res = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", _no_backing(path, fmt)],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise InvalidParameter(
            f"cannot read disk {path}: {res.stderr.decode(errors='replace').strip()}"
        )
    size = int(json.loads(res.stdout)["virtual-size"])
    return -(-size // (1024 * 1024))


def qemu_img_grow(path: str, fmt: str, size_mib: int) -> None:
    """Grow a disk file that no qemu has open to ``size_mib`` (never shrink)."""
    import subprocess

    if virtual_size_mib(path, fmt) >= size_mib:
        return
    res = subprocess.run(
        ["qemu-img", "resize", "-q", _no_backing(path, fmt), f"{size_mib}M"],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        raise InvalidParameter(
            f"qemu-img resize failed: {res.stderr.decode(errors='replace').strip()}"
        )


def delete_disk(paths: VmPaths, path: str) -> None:
    """Remove a disk file of the zonepath (by its name there; nothing else)."""
    directory, name = os.path.split(path)
    if directory != paths.zonepath or not is_disk_name(name):
        return
    zfd = os.open(paths.zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=zfd)
    finally:
        os.close(zfd)
