"""Installed images: ``<images_dir>/<uuid>.json`` (the manifest) beside
``<uuid>.qcow2`` or ``<uuid>.raw`` (the disk the VMs' overlays stand on).

What makes an image installed is its data file, since that is what
``vmadm create`` uses (``VmLayer.find_image``); the manifest describes it.
Both are written under temporary names (``.<uuid>.<pid>.*.tmp``), fsynced,
made root's and 0444, then renamed: the manifest first, the data file last
(the commit), the directory fsynced.  An interrupted install therefore
leaves at most a hidden temp file or a manifest without data, neither of
which counts as installed, and the next install of that uuid sweeps them.
Deletion runs the other way (data first).  Every install and delete of one
uuid holds ``.<uuid>.lock`` (``flock``), so two imports of the same image at
once make one image: the second waits, then finds it installed.

The file's bytes are checked as they arrive, against the manifest's
``files[0]`` (``size``: no byte past it is accepted; ``sha1``: compared at the
end), and decompressed on the way (gzip, bzip2, xz) with a bound on the
output, so a small file cannot inflate into a disk-filling one.  Nothing is
read whole: memory stays flat whatever the image's size.

Types: ``qcow2`` is stored as ``.qcow2`` and must be a qcow2 that names no
backing or external data file (it is opened by root-run tools; its header
must not pull other files in).  ``raw`` and SmartOS's ``zvol`` (a KVM disk,
served as raw bytes, usually gzip-compressed) are stored as ``.raw`` and never
probed: raw bytes that happen to start like a qcow2 header stay raw, as the
overlays pin the backing format.

Standard library only: ``imgadm`` imports this.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
import time

from vmadmd.errors import InvalidParameter, VmadmError
from vmadmd.vm.ids import is_uuid

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any, Protocol

    Manifest = dict[str, Any]

    class Readable(Protocol):
        def readinto(self, buffer: bytearray | memoryview, /) -> int | None: ...


CHUNK = 1 << 20
MANIFEST_LIMIT = 1 << 20
TYPES = ("zvol", "qcow2", "raw")
COMPRESSIONS = ("none", "gzip", "bzip2", "xz")
QCOW2_MAGIC = b"QFI\xfb"
DEFAULT_POOL = "zones"  # SmartOS's; pools are accepted and ignored here
VM_JSON_LIMIT = 2 << 20


# -- errors (SmartOS's codes, printed as `imgadm: error (Code): message`) --------------


class ImageError(VmadmError):
    exit_code = 1


class ImageNotInstalled(ImageError):
    code = "ImageNotInstalled"
    status = 404
    exit_code = 3  # SmartOS's: automation tells "absent" from a failure by it


class ActiveImageNotFound(ImageError):
    code = "ActiveImageNotFound"
    status = 404


class ImageInUse(ImageError):
    code = "ImageHasDependentClones"
    status = 409


class InvalidManifest(ImageError):
    code = "InvalidManifest"
    status = 400


class CorruptImage(ImageError):
    """The file does not match its manifest (size, sha1, compression, format)."""

    code = "DownloadError"
    status = 422


class SourceError(ImageError):
    """An image source could not be reached or answered nonsense."""

    code = "SourceError"
    status = 502


# -- manifests -------------------------------------------------------------------------


def check_manifest(data: object, where: str = "manifest") -> Manifest:
    """``data`` when it is a manifest this host can install, else InvalidManifest."""
    if not isinstance(data, dict):
        raise InvalidManifest(f"{where} is not a JSON object")
    uuid = data.get("uuid")
    if not is_uuid(uuid):
        raise InvalidManifest(f"{where} has no valid uuid (lower-case canonical UUID)")
    for key in ("name", "version"):
        if not isinstance(data.get(key), str) or not data[key]:
            raise InvalidManifest(f"{where} for image {uuid} has no {key}")
    kind = data.get("type")
    if kind not in TYPES:
        raise InvalidManifest(
            f"image {uuid} is of type {kind!r}: only zvol, qcow2 and raw images run here"
        )
    files = data.get("files")
    if not isinstance(files, list) or not files or not isinstance(files[0], dict):
        raise InvalidManifest(f"{where} for image {uuid} has no files")
    first = files[0]
    sha1 = first.get("sha1")
    if not isinstance(sha1, str) or len(sha1) != 40 or not _is_hex(sha1):
        raise InvalidManifest(f"{where} for image {uuid}: files[0].sha1 is not a SHA-1")
    size = first.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise InvalidManifest(f"{where} for image {uuid}: files[0].size is not a size")
    if first.get("compression", "none") not in COMPRESSIONS:
        raise InvalidManifest(
            f"{where} for image {uuid}: compression {first.get('compression')!r} "
            f"is none of {', '.join(COMPRESSIONS)}"
        )
    image_size = data.get("image_size")
    if image_size is not None and (
        not isinstance(image_size, int) or isinstance(image_size, bool) or image_size <= 0
    ):
        raise InvalidManifest(f"{where} for image {uuid}: image_size is not a size in MiB")
    return data


def parse_manifest(raw: bytes, where: str) -> Manifest:
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise InvalidManifest(f"{where} is not JSON: {err}") from None
    return check_manifest(data, where)


def read_manifest_file(path: str) -> Manifest:
    """A manifest from a local file (``imgadm install -m``), bounded."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MANIFEST_LIMIT + 1)
    except OSError as err:
        raise InvalidParameter(f"cannot read manifest {path}: {err.strerror}") from None
    if len(raw) > MANIFEST_LIMIT:
        raise InvalidManifest(f"manifest {path} is larger than {MANIFEST_LIMIT} bytes")
    return parse_manifest(raw, f"manifest {path}")


def label(manifest: Manifest | None) -> str:
    """``name@version``, as SmartOS names an image in its messages."""
    if manifest is None:
        return "-@-"
    return f"{manifest.get('name', '-')}@{manifest.get('version', '-')}"


def extension(manifest: Manifest) -> str:
    return "qcow2" if manifest["type"] == "qcow2" else "raw"


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in text)


# -- decompression ---------------------------------------------------------------------


class Inflater:
    """One compressed stream (or several concatenated, as pigz and pbzip2
    write them) turned into bounded pieces of output: a 1 MiB input of zeros
    never becomes 1 GiB in memory at once."""

    def __init__(self, compression: str) -> None:
        self.compression = compression
        self._new()

    def _new(self) -> None:
        import bz2
        import lzma
        import zlib

        self.d: Any
        # What a corrupt stream raises (zlib's and lzma's own errors are neither
        # OSError nor ValueError).
        self.errors = (OSError, ValueError, EOFError, zlib.error, lzma.LZMAError)
        if self.compression == "gzip":
            self.d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self.compression == "bzip2":
            self.d = bz2.BZ2Decompressor()
        elif self.compression == "xz":
            self.d = lzma.LZMADecompressor(lzma.FORMAT_XZ)  # not AUTO: zeros parse as .lzma
        else:
            raise ValueError(self.compression)

    def feed(self, data: bytes | memoryview) -> Iterator[bytes]:
        pending = bytes(data)
        while pending:
            if self.d.eof:  # a stream ended: what follows is the next one
                self._new()
            try:
                if self.compression == "gzip":
                    out = self.d.decompress(pending, CHUNK)
                    yield out
                    # Input held back (unconsumed_tail) or output cut at CHUNK: more to come.
                    while not self.d.eof and (self.d.unconsumed_tail or len(out) == CHUNK):
                        out = self.d.decompress(self.d.unconsumed_tail, CHUNK)
                        yield out
                else:
                    yield self.d.decompress(pending, CHUNK)
                    while not self.d.eof and not self.d.needs_input:
                        yield self.d.decompress(b"", CHUNK)
            except self.errors as err:
                raise CorruptImage(
                    f"the image file is not valid {self.compression}: {err}"
                ) from None
            pending = self.d.unused_data if self.d.eof else b""

    def finish(self) -> None:
        if not self.d.eof:
            raise CorruptImage(f"the image file's {self.compression} stream is truncated")


# -- the images dir --------------------------------------------------------------------


class ImageStore:
    """The images dir: what is installed, installing, deleting."""

    def __init__(self, images_dir: str, zones_root: str) -> None:
        self.dir = images_dir
        self.zones_root = zones_root

    # paths
    def data_path(self, uuid: str, ext: str) -> str:
        return os.path.join(self.dir, f"{uuid}.{ext}")

    def manifest_path(self, uuid: str) -> str:
        return os.path.join(self.dir, f"{uuid}.json")

    def ensure_dir(self) -> None:
        # Root's alone: qemu gets each image as a read-only fd the launcher
        # opens, so no VM's user needs a path into it, and none may read
        # another tenant's image (one made from its VM, say).
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        st = os.stat(self.dir)
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            os.chmod(self.dir, 0o700)

    @contextlib.contextmanager
    def lock(self, uuid: str) -> Iterator[None]:
        """This uuid's install/delete lock (waits for the holder)."""
        self.ensure_dir()
        fd = os.open(
            os.path.join(self.dir, f".{uuid}.lock"),
            os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # queries
    def data_file(self, uuid: str) -> str | None:
        """The installed data file of ``uuid``, else None."""
        for ext in ("qcow2", "raw"):
            path = self.data_path(uuid, ext)
            if os.path.isfile(path):
                return path
        return None

    def manifest(self, uuid: str) -> Manifest | None:
        """The stored manifest (None when absent or unreadable)."""
        try:
            with open(self.manifest_path(uuid), "rb") as f:
                raw = f.read(MANIFEST_LIMIT + 1)
            data = json.loads(raw)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def installed(self) -> list[str]:
        """The uuids of the installed images, sorted."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        found = set()
        for name in names:
            stem, _, ext = name.rpartition(".")
            if ext in ("qcow2", "raw") and is_uuid(stem):
                found.add(stem)
        return sorted(found)

    def info(self, uuid: str) -> dict[str, Any] | None:
        """SmartOS's shape for an installed image: ``{"manifest", "zpool"}`` (+ path)."""
        path = self.data_file(uuid)
        if path is None:
            return None
        manifest = self.manifest(uuid)
        if manifest is None:  # put there by hand (see `imgadm update`)
            kind = "qcow2" if path.endswith(".qcow2") else "raw"
            manifest = {"uuid": uuid, "type": kind}
        return {"manifest": manifest, "zpool": DEFAULT_POOL, "path": path}

    def users(self, wanted: Iterable[str] | None = None) -> dict[str, list[str]]:
        """Image uuid -> the VMs whose disks are made from it.

        Read from every ``vm.json`` of the zones root (root's files, not the
        zones' own).  A ``vm.json`` that does not parse is counted as using
        every wanted image whose uuid appears in its bytes: an unreadable VM
        must not lose its backing image to a vacuum.  The VM's disk files are
        asked too (the backing file named in a qcow2 header): ``vmadm create``
        makes a disk's overlay before it records the disk in ``vm.json``, and
        an image must not go in between.  A header can only add a use, never
        hide one, so a disk's user writing it gains nothing.
        """
        users: dict[str, list[str]] = {}
        wanted_set = set(wanted) if wanted is not None else None
        try:
            names = sorted(os.listdir(self.zones_root))
        except FileNotFoundError:
            return users
        for vm in names:
            if not is_uuid(vm):
                continue
            try:
                fd = os.open(
                    os.path.join(self.zones_root, vm, "vm.json"),
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                )
            except OSError:
                continue
            with os.fdopen(fd, "rb") as f:
                raw = f.read(VM_JSON_LIMIT)
            try:
                record = json.loads(raw)
                disks = record.get("disks", []) if isinstance(record, dict) else []
                used = {
                    d["image_uuid"]
                    for d in disks
                    if isinstance(d, dict) and isinstance(d.get("image_uuid"), str)
                }
            except ValueError:
                text = raw.decode("utf-8", "replace")
                pool = wanted_set if wanted_set is not None else set(self.installed())
                used = {u for u in pool if u in text}
            used |= self._backing_images(os.path.join(self.zones_root, vm))
            for image in sorted(used):
                if wanted_set is None or image in wanted_set:
                    users.setdefault(image, []).append(vm)
        return users

    def _backing_images(self, zonepath: str) -> set[str]:
        """Images named as backing files by the qcow2 disks of a zonepath."""
        found: set[str] = set()
        dirs = {self.dir, os.path.realpath(self.dir)}
        try:
            names = os.listdir(zonepath)
        except OSError:
            return found
        for name in names:
            if not (name.startswith("disk") and name.endswith(".qcow2")):
                continue
            backing = _qcow2_backing(os.path.join(zonepath, name))
            if backing is None or os.path.dirname(backing) not in dirs:
                continue
            stem, _, ext = os.path.basename(backing).rpartition(".")
            if ext in ("qcow2", "raw") and is_uuid(stem):
                found.add(stem)
        return found

    def leftovers(self) -> list[str]:
        """Uuids with remains of an interrupted install (temp files, a manifest
        without its data), for ``vacuum`` to sweep."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        found = set()
        for name in names:
            if name.startswith(".") and name.endswith(".tmp") and is_uuid(name[1:37]):
                found.add(name[1:37])
            elif name.endswith(".json") and is_uuid(name[:-5]) and not self.data_file(name[:-5]):
                found.add(name[:-5])
        return sorted(found)

    # changes
    def sweep(self, uuid: str) -> None:
        """Leftovers of interrupted installs of ``uuid`` (caller holds its lock)."""
        prefix = f".{uuid}."
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir(self.dir):
                if name.startswith(prefix) and name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.dir, name))
        if self.data_file(uuid) is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.manifest_path(uuid))

    def install(
        self,
        manifest: Manifest,
        read: Readable,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write the image from ``read`` (the file as served: compressed), checked
        against ``manifest``; the caller holds the uuid's lock and has checked
        that it is not installed."""
        uuid = manifest["uuid"]
        first = manifest["files"][0]
        size: int = first["size"]
        compression = first.get("compression", "none")
        ext = extension(manifest)
        self.ensure_dir()
        self.sweep(uuid)
        tmp = os.path.join(self.dir, f".{uuid}.{os.getpid()}.{ext}.tmp")
        mtmp = os.path.join(self.dir, f".{uuid}.{os.getpid()}.json.tmp")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, 0o600)
            try:
                _copy_checked(read, fd, manifest, size, compression, progress)
                if ext == "qcow2":
                    _check_qcow2(tmp, fd)
                _seal(fd)
            finally:
                os.close(fd)
            payload = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
            fd = os.open(mtmp, flags, 0o600)
            try:
                _write_all(fd, payload)
                _seal(fd)
            finally:
                os.close(fd)
            # The manifest first, the data file last: the data file is the commit.
            os.rename(mtmp, self.manifest_path(uuid))
            os.rename(tmp, self.data_path(uuid, ext))
        except OSError as err:
            raise ImageError(f"cannot write image {uuid} in {self.dir}: {err.strerror}") from None
        finally:
            for path in (tmp, mtmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        _fsync_dir(self.dir)

    def replace_manifest(self, uuid: str, manifest: Manifest) -> None:
        """A new manifest for an installed image (``imgadm update``)."""
        mtmp = os.path.join(self.dir, f".{uuid}.{os.getpid()}.json.tmp")
        payload = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(mtmp, flags, 0o600)
            try:
                _write_all(fd, payload)
                _seal(fd)
            finally:
                os.close(fd)
            os.rename(mtmp, self.manifest_path(uuid))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(mtmp)
        _fsync_dir(self.dir)

    def remove(self, uuid: str) -> None:
        """Remove an installed image (the caller holds its lock and checked its users).

        The data file goes first: from then on it is not installed."""
        for ext in ("qcow2", "raw"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.data_path(uuid, ext))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.manifest_path(uuid))
        _fsync_dir(self.dir)
        # The lock file stays: unlinking it while another process waits on it
        # would let a third lock a new file and run beside that one.


# -- the copy --------------------------------------------------------------------------


def output_limit(manifest: Manifest, compression: str) -> int | None:
    """How many bytes a compressed file may inflate to, from ``image_size``
    (MiB): a raw disk is exactly that big; a qcow2 holds at most that much
    data plus its metadata.  None when the manifest does not say (the disk's
    free space is then the bound)."""
    image_size = manifest.get("image_size")
    if compression == "none" or not isinstance(image_size, int):
        return None
    virtual = image_size << 20
    if extension(manifest) == "raw":
        return virtual
    return virtual + virtual // 8 + (64 << 20)


def _copy_checked(
    read: Readable,
    fd: int,
    manifest: Manifest,
    size: int,
    compression: str,
    progress: Callable[[int], None] | None,
) -> None:
    import hashlib

    sha1 = hashlib.sha1()
    seen = 0
    written = 0
    limit = output_limit(manifest, compression)
    inflater = Inflater(compression) if compression != "none" else None
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    last = 0.0
    while True:
        try:
            n = read.readinto(view)
        except TimeoutError:
            raise SourceError("the image file stopped coming (timed out)") from None
        except OSError as err:
            raise SourceError(f"reading the image file failed: {err}") from None
        if not n:
            break
        seen += n
        if seen > size:
            raise CorruptImage(
                f"image {manifest['uuid']}: the file is larger than its manifest's "
                f"size ({size} bytes): refused"
            )
        piece = view[:n]
        sha1.update(piece)
        if inflater is None:
            _write_all(fd, piece)
        else:
            for out in inflater.feed(piece):
                written += len(out)
                if limit is not None and written > limit:
                    raise CorruptImage(
                        f"image {manifest['uuid']}: the file decompresses past its "
                        f"image_size ({manifest['image_size']} MiB): refused"
                    )
                _write_all(fd, out)
        if progress is not None:
            now = time.monotonic()
            if now - last > 0.1:
                progress(seen)
                last = now
    if seen != size:
        raise CorruptImage(
            f"image {manifest['uuid']}: got {seen} bytes of {size}: the file is truncated"
        )
    if inflater is not None:
        inflater.finish()
    want = manifest["files"][0]["sha1"].lower()
    if sha1.hexdigest() != want:
        raise CorruptImage(
            f"image {manifest['uuid']}: sha1 {sha1.hexdigest()} does not match the "
            f"manifest's {want}: refused"
        )
    if progress is not None:
        progress(seen)


def _check_qcow2(path: str, fd: int) -> None:
    """A qcow2 image names no backing file and no external data file."""
    import subprocess

    head = os.pread(fd, 4, 0)
    if head != QCOW2_MAGIC:
        raise CorruptImage("the image's type is qcow2, and its file is not a qcow2")
    res = subprocess.run(
        ["qemu-img", "info", "--output=json", "-f", "qcow2", path],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    if res.returncode != 0:
        msg = res.stderr.decode(errors="replace").strip().splitlines()
        raise CorruptImage(f"the image is not a usable qcow2: {msg[-1] if msg else '?'}")
    info = json.loads(res.stdout)
    data = info.get("format-specific", {}).get("data", {})
    if "backing-filename" in info or "full-backing-filename" in info or "data-file" in data:
        raise CorruptImage(
            "the qcow2 image names a backing or data file: an image must stand alone"
        )


def _qcow2_backing(path: str) -> str | None:
    """The backing file a qcow2's header names (None: none, or not a qcow2).

    The file is the VM user's: opened without following a link or blocking,
    a regular file only, and only the header's few bytes read."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        head = os.pread(fd, 20, 0)
        if len(head) < 20 or head[:4] != QCOW2_MAGIC:
            return None
        offset = int.from_bytes(head[8:16], "big")
        size = int.from_bytes(head[16:20], "big")
        if not offset or not 0 < size <= 1023:
            return None
        return os.pread(fd, size, offset).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _seal(fd: int) -> None:
    """Durable, root's, read-only: what every VM may share."""
    os.fsync(fd)
    if os.geteuid() == 0:
        os.fchown(fd, 0, 0)
    os.fchmod(fd, 0o444)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as err:
            if err.errno == errno.EINTR:
                continue
            raise
        view = view[n:]


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def progress_bar(total: int, title: str) -> Callable[[int], None] | None:
    """A one-line bar on stderr when it is a terminal (else None)."""
    if not sys.stderr.isatty():
        return None
    start = time.monotonic()

    def show(done: int) -> None:
        frac = min(1.0, done / total) if total else 1.0
        width = 30
        bar = "=" * int(frac * width)
        rate = done / max(1e-6, time.monotonic() - start) / (1 << 20)
        sys.stderr.write(
            f"\r{title} [{bar:<{width}}] {frac * 100:5.1f}% {done >> 20} MiB  {rate:6.1f} MiB/s"
        )
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
