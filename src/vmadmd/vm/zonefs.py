"""Reading what lies under a VM's ``root/``: treated as written by an attacker.

Once qemu runs as the VM's own user, ``<zonepath>/root/tmp`` is writable by
whoever escapes the guest into qemu.  Every file the daemon or ``vmadm``
takes from there is opened here: each path component relative to the one
before with ``O_NOFOLLOW`` (no symlink is ever followed, not even for
``root`` or ``tmp``), ``O_NONBLOCK`` (a FIFO cannot block the caller),
then checked to be a regular file, and read with a size bound.  A planted
file makes the one request that met it fail with ``ZoneFileError``.

Standard library only: the CLI imports this.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat

from vmadmd.errors import WrongState

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY


class ZoneFileError(WrongState):
    """A file under a VM's root/ is not what the daemon put there."""

    code = "ZoneFileError"


def open_dir(base: str, *names: str) -> int:
    """An fd for ``base/names...``, each of ``names`` opened without following links.

    ``base`` itself (the zonepath) is root's and trusted.
    """
    fd = os.open(base, _DIR_FLAGS)
    try:
        for name in names:
            nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except BaseException:
        os.close(fd)
        raise
    return fd


def own_runtime_dir(zonepath: str, uid: int) -> None:
    """``<zonepath>/root`` and ``root/tmp`` made if missing, and handed to the
    VM's user (uid = gid, 0700): each opened without following a link, so a
    ``root`` or ``tmp`` the VM's user replaced with a link is refused
    (ZoneFileError), never followed as root."""
    fd = os.open(zonepath, _DIR_FLAGS)
    try:
        for name in ("root", "tmp"):
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=fd)
            try:
                nxt = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as err:
                if err.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise ZoneFileError(f"{name} in {zonepath} is not a directory "
                                        "(not followed)") from None  # fmt: skip
                raise
            os.close(fd)
            fd = nxt
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


def read_file(dir_fd: int, name: str, limit: int) -> bytes:
    """The whole of a regular file ``name`` in ``dir_fd``, at most ``limit`` bytes.

    Raises FileNotFoundError when there is nothing there, ZoneFileError for
    a link, a FIFO, a device, a directory, or a file larger than ``limit``.
    """
    try:
        fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise ZoneFileError(f"{name} is not a regular file (not followed)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ZoneFileError(f"{name} is not a regular file (not read)")
        if st.st_size > limit:
            raise ZoneFileError(f"{name} is larger than {limit} bytes (not read)")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ZoneFileError(f"{name} grew past {limit} bytes while read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_runtime_file(zonepath: str, name: str, limit: int) -> bytes:
    """``read_file`` of ``<zonepath>/root/tmp/<name>``."""
    dfd = open_dir(zonepath, "root", "tmp")
    try:
        return read_file(dfd, name, limit)
    finally:
        os.close(dfd)


def take_runtime_file(zonepath: str, name: str, limit: int) -> bytes:
    """Read ``<zonepath>/root/tmp/<name>`` as ``read_file`` does, then remove it."""
    dfd = open_dir(zonepath, "root", "tmp")
    try:
        data = read_file(dfd, name, limit)
        with contextlib.suppress(OSError):
            os.unlink(name, dir_fd=dfd)
        return data
    finally:
        os.close(dfd)


def remove_runtime_file(zonepath: str, name: str) -> None:
    """Remove ``<zonepath>/root/tmp/<name>`` if there (a link itself, not its target)."""
    dfd = open_dir(zonepath, "root", "tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
