"""The VM store: ``<zones_root>/<uuid>/vm.json`` and every path beside it.

``vm.json`` is the source of truth.  It is written atomically (temp file,
fsync, rename, fsync of the directory) and carries a format version that is
checked on every read.  Writers are serialised per VM with ``flock`` on a lock
file in the zonepath, so two ``vmadm`` processes and the daemon never lose an
update.  A uuid is validated before any path is built from it.

Standard library only: the CLI imports this.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Callable, Iterator

from vmadmd.errors import InvalidParameter, VmBroken, VmExists, VmNotFound
from vmadmd.vm.ids import is_uuid, validate_uuid

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (vmadm start-up)
FORMAT_VERSION = 1
FORMAT_KEY = "format_version"
# vm.json is read whole by every vmadm call and daemon lookup: a record
# bigger than this is never written (a 10 MB ``tags`` once was).
MAX_VM_JSON = 1024 * 1024

__all__ = ["Store", "VmPaths", "is_uuid", "validate_uuid"]

if TYPE_CHECKING:
    from typing import Any

    VmRecord = dict[str, Any]
else:
    VmRecord = dict


class VmPaths:
    """Every per-VM path, built in one place from a validated uuid.

    (A plain class, not a dataclass: importing dataclasses costs the CLI ~9 ms.)
    """

    __slots__ = ("zonepath",)

    def __init__(self, zonepath: str) -> None:
        self.zonepath = zonepath

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VmPaths) and other.zonepath == self.zonepath

    def __hash__(self) -> int:
        return hash(self.zonepath)

    def __repr__(self) -> str:
        return f"VmPaths({self.zonepath!r})"

    @property
    def vm_json(self) -> str:
        return os.path.join(self.zonepath, "vm.json")

    @property
    def lock(self) -> str:
        return os.path.join(self.zonepath, ".vm.lock")

    @property
    def runtime_dir(self) -> str:
        """``root/tmp``: qemu runs here, so its sockets can use short names."""
        return os.path.join(self.zonepath, "root", "tmp")

    # Socket names are relative to runtime_dir: see vmadmd.sockets.
    QMP_NAME = "vm.qmp"
    VNC_NAME = "vm.vnc"
    CONSOLE_NAME = "vm.console"
    CONSOLE_LOG_NAME = "vm.console.log"
    PID_NAME = "vm.pid"
    SCREENSHOT_NAME = "vm.ppm"

    @property
    def qmp(self) -> str:
        return os.path.join(self.runtime_dir, self.QMP_NAME)

    @property
    def vnc(self) -> str:
        return os.path.join(self.runtime_dir, self.VNC_NAME)

    @property
    def console(self) -> str:
        return os.path.join(self.runtime_dir, self.CONSOLE_NAME)

    @property
    def console_log(self) -> str:
        return os.path.join(self.runtime_dir, self.CONSOLE_LOG_NAME)

    @property
    def screenshot(self) -> str:
        return os.path.join(self.runtime_dir, self.SCREENSHOT_NAME)

    @property
    def pid(self) -> str:
        return os.path.join(self.runtime_dir, self.PID_NAME)

    def disk(self, index: int) -> str:
        return os.path.join(self.zonepath, f"disk{index}.qcow2")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_json(data: object) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def atomic_write_json(path: str, data: object | bytes) -> None:
    """Write ``data`` (or bytes encoded already) to ``path`` so a reader sees
    the old or the new file, whole.

    On any failure (disk full included) the old file is left untouched and the
    temp file removed.
    """
    directory = os.path.dirname(path)
    tmp = f"{path}.tmp.{os.getpid()}"
    payload = data if isinstance(data, bytes) else encode_json(data)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


class Store:
    """The zones root and the VMs in it."""

    def __init__(self, zones_root: str) -> None:
        self.zones_root = zones_root

    def paths(self, uuid: str) -> VmPaths:
        return VmPaths(os.path.join(self.zones_root, validate_uuid(uuid)))

    def exists(self, uuid: str) -> bool:
        return os.path.exists(self.paths(uuid).vm_json)

    def list_uuids(self) -> list[str]:
        try:
            names = os.listdir(self.zones_root)
        except FileNotFoundError:
            return []
        return sorted(
            n
            for n in names
            if is_uuid(n) and os.path.exists(os.path.join(self.zones_root, n, "vm.json"))
        )

    def _lock_fd(self, uuid: str) -> int:
        try:
            return os.open(self.paths(uuid).lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise VmNotFound(f"no such VM: {uuid}") from None

    @contextlib.contextmanager
    def lock(self, uuid: str) -> Iterator[None]:
        """Hold the VM's exclusive lock (blocking) for the block's duration."""
        fd = self._lock_fd(uuid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def try_lock(self, uuid: str) -> int | None:
        """Take the VM's lock if it is free, without waiting: the held fd
        (closing it releases the lock), or None."""
        fd = self._lock_fd(uuid)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def load(self, uuid: str) -> VmRecord:
        """Read the VM's record, without the format key."""
        path = self.paths(uuid).vm_json
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise VmNotFound(f"no such VM: {uuid}") from None
        except OSError as err:
            raise VmBroken(f"VM {uuid}: cannot read vm.json: {err.strerror}") from err
        return parse_record(uuid, raw)

    def save(self, uuid: str, record: VmRecord) -> None:
        """Write the record (caller holds the lock); InvalidParameter, and
        nothing written, when it would make vm.json too big."""
        path = self.paths(uuid).vm_json
        atomic_write_json(path, self._encode(uuid, record, path))

    def encode(self, uuid: str, record: VmRecord) -> bytes:
        """The record as vm.json's bytes (format version in), within MAX_VM_JSON."""
        return self._encode(uuid, record)

    def _encode(self, uuid: str, record: VmRecord, path: str | None = None) -> bytes:
        """The record as vm.json's bytes, within MAX_VM_JSON.

        A vm.json already past the cap (written before there was one) may
        still be rewritten no bigger than it is, so it can be shrunk.
        """
        data = {k: v for k, v in record.items() if k != FORMAT_KEY}
        data[FORMAT_KEY] = FORMAT_VERSION
        payload = encode_json(data)
        if len(payload) > MAX_VM_JSON:
            try:
                old = os.stat(path).st_size if path else 0
            except OSError:
                old = 0
            if len(payload) > old:
                raise InvalidParameter(
                    f"VM {uuid}: vm.json would be {len(payload)} bytes, more than the "
                    f"{MAX_VM_JSON // 1024} KiB allowed: make metadata, tags or other "
                    "properties smaller"
                )
        return payload

    def update(self, uuid: str, change: Callable[[VmRecord], None]) -> VmRecord:
        """Load, change in place, and save the record, all under the VM's lock."""
        with self.lock(uuid):
            return self.update_locked(uuid, change)

    def update_locked(self, uuid: str, change: Callable[[VmRecord], None]) -> VmRecord:
        """``update``, for a caller that holds the VM's lock already."""
        record = self.load(uuid)
        change(record)
        self.save(uuid, record)
        return record

    def create(self, uuid: str, record: VmRecord) -> VmPaths:
        """Make the zonepath and write the first record; fails if it exists."""
        paths = self.paths(uuid)
        self._encode(uuid, record)  # too big: refused before anything is made
        os.makedirs(self.zones_root, exist_ok=True)
        try:
            os.mkdir(paths.zonepath, 0o700)
        except FileExistsError:
            raise VmExists(f"a VM with uuid {uuid} already exists") from None
        os.makedirs(paths.runtime_dir, 0o700, exist_ok=True)
        with self.lock(uuid):
            self.save(uuid, record)
        return paths

    def remove(self, uuid: str) -> None:
        """Remove the zonepath; vm.json goes first so the VM vanishes at once."""
        import shutil  # only `delete` needs it

        paths = self.paths(uuid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(paths.vm_json)
        try:
            shutil.rmtree(paths.zonepath)
        except FileNotFoundError:
            pass
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise


def parse_record(uuid: str, raw: bytes) -> VmRecord:
    """Parse and version-check a vm.json payload."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise VmBroken(f"VM {uuid}: vm.json is corrupt: {err}") from err
    if not isinstance(data, dict):
        raise VmBroken(f"VM {uuid}: vm.json is not a JSON object")
    version = data.pop(FORMAT_KEY, None)
    if version != FORMAT_VERSION:
        raise VmBroken(
            f"VM {uuid}: vm.json has format version {version!r}, this vmadm reads {FORMAT_VERSION}"
        )
    if data.get("uuid") != uuid:
        raise VmBroken(f"VM {uuid}: vm.json names another uuid ({data.get('uuid')!r})")
    return data
