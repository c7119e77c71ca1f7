"""``vmadm send`` / ``vmadm receive``: a stopped VM as one stream, and back.

The stream (version 1) is::

    VMADM-STREAM 1\\n
    {"version": 1, "uuid": U, "sent_at": T, "files": [{"name", "size"}, ...]}\\n
    for each file, in that order: its ``size`` bytes, then its sha256 as
        64 hex digits and \\n
    END <sha256 of every byte before this line but the files' own>\\n

The first file is ``vm.json``, the others the VM's disks (``disk<N>.*``),
sent as their files are: a disk made over an image keeps its
``image_uuid``, and the receiving host must have that image (``imgadm
import``); the disks' internal snapshots travel inside them, their list in
``vm.json``.  Nothing may follow the trailer.  The trailer's sum covers the files through
their sha256 lines (each file's bytes are hashed once at each end, not twice:
hashing is what bounds the stream's speed).

``send`` reads the files as root, as bytes only (nothing interprets a disk
the VM's user could have written): each opened relative to the zonepath
without following a link, a regular file with one link, under the VM's
lock, which it holds until the end, so the VM cannot be booted meanwhile.

``receive`` writes everything into a directory of its own in the zones root
(``.receive-*``: not a uuid, so neither ``vmadm`` nor the daemon sees it),
checks every file's sha256 and the whole stream's, and only then gives the
VM a uid of its own (the sender's means nothing here), hands it its files,
and renames the directory into place with ``RENAME_NOREPLACE``: the daemon
sees the VM appear (inotify) as it sees ``vmadm create``'s.  A truncated
or corrupt stream, or a VM that exists, leaves nothing behind.

Both are the CLI's (``vmadm`` runs as root on the host and reads the zones
root directly, as ``create`` and ``delete`` do): the bytes go straight
between the files and the pipe, never through the daemon's API.

Standard library only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import time

from vmadmd.errors import InvalidParameter, VmadmError, VmExists, WrongState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO

    from vmadmd.vm.config import VmSettings

MAGIC = b"VMADM-STREAM 1\n"
VERSION = 1
MAX_HEADER = 64 * 1024
MAX_FILES = 64
CHUNK = 1 << 20
SHA_HEX = 64
# What a received vm.json may not bring: the sender's runtime state.
RUNTIME_KEYS = ("qemu_identity", "transition", "boot_timestamp", "zone_uid")


class StreamError(VmadmError):
    """The stream is not a whole, intact ``vmadm send`` stream."""

    code = "StreamError"
    status = 400


# -- send -------------------------------------------------------------------------


def send(settings: VmSettings, uuid: str, out: int) -> int:
    """Write VM ``uuid`` (stopped) as a stream to fd ``out``; returns bytes written."""
    from vmadmd.vm.disks import _open_checked
    from vmadmd.vm.layer import VmLayer
    from vmadmd.vm.snapshots import disk_names

    layer = VmLayer(settings)
    store = layer.store
    store.load(uuid)  # VmNotFound before the lock
    paths = store.paths(uuid)
    fds: list[int] = []
    with store.lock(uuid):
        record = store.load(uuid)
        if layer.pid(uuid, record) is not None:
            raise WrongState(f"VM {uuid} is running: stop it before sending it")
        try:
            names = disk_names(record, paths) if record.get("disks") else []
            zfd = os.open(paths.zonepath, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                for name in names:
                    fds.append(_open_checked(name, zfd, os.O_RDONLY, f"disk {name}"))
                    if os.fstat(fds[-1]).st_nlink != 1:
                        raise WrongState(f"VM {uuid}: disk {name} has hard links: not sent")
            finally:
                os.close(zfd)
            vm_json = store.encode(uuid, record)  # vm.json as written, its version in it
            files: list[dict[str, Any]] = [{"name": "vm.json", "size": len(vm_json)}]
            files += [
                {"name": n, "size": os.fstat(fd).st_size} for n, fd in zip(names, fds, strict=True)
            ]
            header = {"version": VERSION, "uuid": uuid, "files": files,
                      "sent_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
            writer = _Writer(out)
            writer.write(MAGIC)
            writer.write(json.dumps(header, sort_keys=True).encode() + b"\n")
            digest = hashlib.sha256(vm_json).hexdigest()
            writer.write(vm_json, hashed=False)
            writer.write(digest.encode() + b"\n")
            for entry, fd in zip(files[1:], fds, strict=True):
                writer.write_file(fd, int(entry["size"]), str(entry["name"]))
            writer.write(b"END " + writer.total.hexdigest().encode() + b"\n")
            return writer.count
        finally:
            for fd in fds:
                os.close(fd)


def big_pipe(fd: int) -> None:
    """A pipe at ``fd`` made to hold 1 MiB (64 KiB by default): fewer, larger
    reads and writes at each end.  Nothing when ``fd`` is no pipe."""
    import fcntl

    with contextlib.suppress(OSError, AttributeError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, CHUNK)


class _Writer:
    """Writes to an fd, keeping the sha256 of all it wrote."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.total = hashlib.sha256()
        self.count = 0

    def write(self, data: bytes | memoryview, *, hashed: bool = True) -> None:
        if hashed:
            self.total.update(data)
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.count += len(data)

    def write_file(self, fd: int, size: int, name: str) -> None:
        """``size`` bytes of ``fd`` (a file that may not change meanwhile),
        then their sha256 line."""
        own = hashlib.sha256()
        buf = bytearray(CHUNK)
        left = size
        offset = 0
        while left:
            n = os.preadv(fd, [memoryview(buf)[: min(CHUNK, left)]], offset)
            if n == 0:
                raise VmadmError(f"disk {name} shrank while it was sent")
            chunk = memoryview(buf)[:n]
            own.update(chunk)
            self.write(chunk, hashed=False)  # its own sha256 line is in the total
            left -= n
            offset += n
        self.write(own.hexdigest().encode() + b"\n")


# -- receive ------------------------------------------------------------------------


class _Reader:
    """Reads exact amounts from an fd, keeping the sha256 of all it read."""

    def __init__(self, src: BinaryIO | int) -> None:
        self.fd = src if isinstance(src, int) else src.fileno()
        self.total = hashlib.sha256()
        self.count = 0

    def exact(self, n: int, *, hashed: bool = True) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            r = os.readv(self.fd, [view[got:]])
            if r == 0:
                raise StreamError(
                    f"the stream ends early (truncated after {self.count + got} bytes)"
                )
            got += r
        if hashed:
            self.total.update(buf)
        self.count += n
        return bytes(buf) if n < 4096 else buf  # type: ignore[return-value]

    def line(self, limit: int, *, hashed: bool = True) -> bytes:
        """One line (with its \\n), at most ``limit`` bytes; read a byte at a
        time: only the short header and trailer lines are read so."""
        out = bytearray()
        while not out.endswith(b"\n"):
            if len(out) >= limit:
                raise StreamError("the stream's header or trailer is malformed (corrupt)")
            out += self.exact(1, hashed=hashed)
        return bytes(out)

    def at_end(self) -> bool:
        return os.read(self.fd, 1) == b""


def _check_header(raw: bytes) -> dict[str, Any]:
    from vmadmd.vm.disks import is_disk_name
    from vmadmd.vm.store import MAX_VM_JSON, is_uuid

    try:
        header = json.loads(raw)
    except ValueError:
        raise StreamError("the stream's header is not JSON (corrupt)") from None
    if not isinstance(header, dict) or header.get("version") != VERSION:
        raise StreamError(f"the stream is not version {VERSION} (or corrupt)")
    uuid, files = header.get("uuid"), header.get("files")
    if not isinstance(uuid, str) or not is_uuid(uuid):
        raise StreamError("the stream's uuid is not a canonical uuid")
    if not isinstance(files, list) or not 1 <= len(files) <= MAX_FILES:
        raise StreamError("the stream's file list is malformed")
    seen: set[str] = set()
    for i, entry in enumerate(files):
        name = entry.get("name") if isinstance(entry, dict) else None
        size = entry.get("size") if isinstance(entry, dict) else None
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int):
            raise StreamError(f"the stream's file {i} is malformed")
        if size < 0 or name in seen:
            raise StreamError(f"the stream's file {name!r} is malformed")
        if (i == 0) != (name == "vm.json") or (i > 0 and not is_disk_name(name)):
            raise StreamError(f"the stream carries {name!r}: only vm.json, then disk<N>.* files")
        seen.add(name)
    if files[0]["size"] > MAX_VM_JSON:
        raise StreamError("the stream's vm.json is too large")
    return header


def receive(settings: VmSettings, src: BinaryIO | int) -> str:
    """Create the VM a stream on ``src`` carries; returns its uuid."""
    import shutil
    import tempfile

    from vmadmd.vm.store import Store

    store = Store(settings.zones_root)
    reader = _Reader(src)
    if reader.exact(len(MAGIC)) != MAGIC:
        raise StreamError("not a vmadm send stream (or not version 1)")
    header = _check_header(reader.line(MAX_HEADER)[:-1])
    uuid = str(header["uuid"])
    if store.exists(uuid) or os.path.lexists(store.paths(uuid).zonepath):
        raise VmExists(f"a VM with uuid {uuid} already exists: not received")
    os.makedirs(settings.zones_root, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".receive-", dir=settings.zones_root)
    try:
        dfd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            vm_json = _receive_files(reader, header["files"], dfd)
            # The trailer's sum is of every byte before it.
            expected = b"END " + reader.total.hexdigest().encode() + b"\n"
            if reader.line(len(expected), hashed=False) != expected:
                raise StreamError("the stream's checksum does not match (corrupt)")
            if not reader.at_end():
                raise StreamError("the stream goes on past its end (corrupt)")
            _install(settings, store, uuid, vm_json, header["files"], staging, dfd)
        finally:
            os.close(dfd)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return uuid


def _receive_files(reader: _Reader, files: list[dict[str, Any]], dfd: int) -> bytes:
    """Each file into ``dfd``, its sha256 checked; returns vm.json's bytes."""
    vm_json = b""
    for entry in files:
        name, size = str(entry["name"]), int(entry["size"])
        own = hashlib.sha256()
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dfd)  # fmt: skip
        writeback = _Writeback(fd)
        try:
            left = size
            while left:
                chunk = reader.exact(min(CHUNK, left), hashed=False)
                own.update(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
                if name == "vm.json":
                    vm_json += chunk
                writeback.wrote(len(chunk))
            os.fsync(fd)
        finally:
            os.close(fd)
        if reader.exact(SHA_HEX + 1) != own.hexdigest().encode() + b"\n":
            raise StreamError(f"the stream's {name} does not match its sha256 (corrupt)")
    return vm_json


class _Writeback:
    """Starts the write-back of a file being received as it grows
    (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` every ``WRITEBACK`` bytes), so
    the ``fsync`` at its end, before the VM is said received, does not find
    the whole file still to write.  Nothing where libc has no such call."""

    WRITEBACK = 32 << 20
    _call: Any = None

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.done = 0
        self.written = 0
        if _Writeback._call is None:
            import ctypes

            try:
                call = ctypes.CDLL(None, use_errno=True).sync_file_range
                call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
                _Writeback._call = call
            except (OSError, AttributeError):
                _Writeback._call = False

    def wrote(self, n: int) -> None:
        self.written += n
        if self.written - self.done >= self.WRITEBACK and self._call:
            self._call(self.fd, self.done, self.written - self.done, 2)  # SYNC_FILE_RANGE_WRITE
            self.done = self.written


def _install(
    settings: VmSettings,
    store: Any,
    uuid: str,
    vm_json: bytes,
    files: list[dict[str, Any]],
    staging: str,
    dfd: int,
) -> None:
    """The verified files made into VM ``uuid``: its record checked and made
    this host's (a uid of its own, its paths, its taps), its files handed
    to its user, the directory renamed into place."""
    from vmadmd.vm import net, props, zonefs
    from vmadmd.vm.disks import Disks
    from vmadmd.vm.layer import new_zone_uid
    from vmadmd.vm.store import atomic_write_json, parse_record

    record = _parse_sent(uuid, vm_json, parse_record)
    paths = store.paths(uuid)
    disk_files = {str(f["name"]) for f in files[1:]}
    disks = record.get("disks") or []
    if not isinstance(disks, list):
        raise StreamError("the stream's vm.json has malformed disks")
    named: list[str] = []
    for i, disk in enumerate(disks):
        path = disk.get("path") if isinstance(disk, dict) else None
        name = os.path.basename(path) if isinstance(path, str) else ""
        if name not in disk_files or name in named:
            raise StreamError(f"the stream's vm.json: disks[{i}] is not one of the files sent")
        named.append(name)
        disk["path"] = os.path.join(paths.zonepath, name)
        if disk.get("image_uuid"):
            Disks(settings.images).find_image(str(disk["image_uuid"]))  # must be here
    if set(named) != disk_files:
        raise StreamError("the stream carries files its vm.json does not name as disks")
    # What a user could have given is checked as `vmadm update` checks it.
    plain = {k: v for k, v in record.items()
             if k not in props.COMPUTED and k not in props.INTERNAL
             and k not in ("uuid", "brand", "disks")}  # fmt: skip
    try:
        props.validate(plain)
    except InvalidParameter as err:
        raise StreamError(f"the stream's vm.json: {err}") from None
    for key in RUNTIME_KEYS:
        record.pop(key, None)
    uid = new_zone_uid(settings, store, uuid)
    record["zone_uid"] = uid
    net.name_taps(record.get("nics") or [], uid)
    for name in named:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        try:
            os.fchown(fd, uid, uid)
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    os.unlink("vm.json", dir_fd=dfd)
    atomic_write_json(os.path.join(staging, "vm.json"), store.encode(uuid, record))
    os.makedirs(os.path.join(staging, "root", "tmp"), 0o700, exist_ok=True)
    zonefs.own_runtime_dir(staging, uid)
    os.chmod(staging, 0o711)
    _rename_noreplace(staging, paths.zonepath)


def _parse_sent(uuid: str, vm_json: bytes, parse: Any) -> dict[str, Any]:
    from vmadmd.errors import VmBroken

    try:
        record: dict[str, Any] = parse(uuid, vm_json)
    except VmBroken as err:
        raise StreamError(f"the stream's vm.json: {err}") from None
    return record


def _rename_noreplace(src: str, dst: str) -> None:
    """``rename(src, dst)`` that fails if ``dst`` exists (``renameat2`` with
    ``RENAME_NOREPLACE``): two receives of one uuid never merge."""
    import ctypes
    import errno

    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_noreplace = -100, 1
    res = libc.renameat2(at_fdcwd, src.encode(), at_fdcwd, dst.encode(), rename_noreplace)
    if res != 0:
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise VmExists(f"a VM with uuid {os.path.basename(dst)} already exists: not received")
        raise OSError(err, os.strerror(err), dst)
    with contextlib.suppress(OSError):
        fd = os.open(os.path.dirname(dst), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
