"""``imgadm create``: an image (manifest and file) from a stopped VM's first disk.

The disk is flattened by ``qemu-img convert -O qcow2`` into a standalone
qcow2 (the image it was made from folded in), then optionally compressed;
the manifest's ``sha1`` and ``size`` are those of the file as written, so
``imgadm install -m M -f F`` on any host checks it as an import does.

The disk's backing chain is spelled out to ``qemu-img`` (a ``json:``
filename), never read from the disk's header: the VM's own user owns that
file, and a header naming ``/etc/shadow`` as its backing file must not put
root's secrets into an image.

Standard library only.
"""

from __future__ import annotations

import json
import os
import time

from vmadmd.errors import InvalidParameter, VmadmError, WrongState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from vmadmd.vm.config import VmSettings
    from vmadmd.vm.images import Manifest

RESERVED = ("uuid", "files", "type")


QCOW2_MAGIC = b"QFI\xfb"
QCOW2_INCOMPAT_DATA_FILE = 1 << 2


def qcow2_data_file(path: str) -> bool:
    """Whether the qcow2 at ``path`` keeps its data in an external file its
    header names (incompatible feature bit 2, qcow2 version 3).  Read
    without following a link or blocking."""
    import struct

    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        head = os.pread(fd, 80, 0)
    finally:
        os.close(fd)
    if len(head) < 80 or head[:4] != QCOW2_MAGIC:
        return False
    (version,) = struct.unpack_from(">I", head, 4)
    if version < 3:
        return False
    (incompatible,) = struct.unpack_from(">Q", head, 72)
    return bool(incompatible & QCOW2_INCOMPAT_DATA_FILE)


def _source_spec(path: str, fmt: str, backing: tuple[str, str] | None) -> str:
    spec: dict[str, Any] = {"driver": fmt, "file": {"driver": "file", "filename": path}}
    if fmt == "qcow2":
        spec["backing"] = (
            None
            if backing is None
            else {"driver": backing[1], "file": {"driver": "file", "filename": backing[0]}}
        )
    return "json:" + json.dumps(spec)


def create_image(
    settings: VmSettings,
    vm_uuid: str,
    fields: dict[str, Any],
    compression: str,
    output: str,
) -> tuple[Manifest, str, str]:
    """Make the image; returns its manifest and the two paths written."""
    import subprocess
    import uuid as uuidlib

    from vmadmd.vm.layer import VmLayer

    for key in RESERVED:
        if key in fields:
            raise InvalidParameter(f"the manifest's {key} is made by imgadm create, not given")
    for key in ("name", "version"):
        if not isinstance(fields.get(key), str) or not fields[key]:
            raise InvalidParameter(f"imgadm create needs {key}=... (a string)")
    if "/" in fields["name"] + fields["version"]:
        raise InvalidParameter("name and version may not contain '/'")
    compression = {"gz": "gzip"}.get(compression, compression)
    layer = VmLayer(settings)
    layer.store.load(vm_uuid)  # VmNotFound before anything else
    if os.path.isdir(output):
        prefix = os.path.join(output, f"{fields['name']}-{fields['version']}")
    else:
        prefix = output
    suffix = {"none": "", "gzip": ".gz", "xz": ".xz"}[compression]
    manifest_path = prefix + ".imgmanifest"
    file_path = prefix + ".qcow2" + suffix
    # The work files in a directory of our own (0700) beside the output: not
    # at names anyone could guess and plant a link at (the output may be /tmp).
    import shutil
    import tempfile

    work = tempfile.mkdtemp(prefix=".imgadm-", dir=os.path.dirname(os.path.abspath(prefix)))
    flat = os.path.join(work, "flat.qcow2")
    packed = os.path.join(work, "packed")
    manifest_tmp = os.path.join(work, "manifest")
    try:
        with layer.store.lock(vm_uuid):
            vm = layer.store.load(vm_uuid)
            if layer.is_running(vm_uuid):
                raise WrongState(f"VM {vm_uuid} is running: stop it before making an image")
            disks = vm.get("disks") or []
            if not disks or not isinstance(disks[0], dict) or "path" not in disks[0]:
                raise InvalidParameter(f"VM {vm_uuid} has no disk to make an image of")
            disk = disks[0]
            zonepath = layer.store.paths(vm_uuid).zonepath
            layer.disks.check_disk_path("disks[0].path", disk["path"], zonepath)
            # Root reads the disk for qemu-img: whatever its header names
            # besides the data itself would be read as root too.  The backing
            # is spelled out below; an external data file is refused (the VM
            # is stopped and its lock held: nothing of its user runs to
            # change the header meanwhile).
            if qcow2_data_file(disk["path"]):
                raise InvalidParameter(
                    f"VM {vm_uuid}'s disk names an external data file: not made into an image"
                )
            backing = layer.disks.find_image(disk["image_uuid"]) if disk.get("image_uuid") else None
            res = subprocess.run(
                ["qemu-img", "convert", "-O", "qcow2",
                 _source_spec(disk["path"], disk.get("image_format", "qcow2"), backing), flat],
                stdin=subprocess.DEVNULL, capture_output=True, timeout=3600, check=False,
            )  # fmt: skip
            if res.returncode != 0:
                msg = res.stderr.decode(errors="replace").strip()
                raise VmadmError(f"qemu-img convert failed: {msg}")
        info = subprocess.run(
            ["qemu-img", "info", "--output=json", "-f", "qcow2", flat],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=True,
        )  # fmt: skip
        virtual = int(json.loads(info.stdout)["virtual-size"])
        sha1, size = _pack(flat, packed, compression)
        manifest: Manifest = {
            "v": 2,
            "uuid": str(uuidlib.uuid4()),
            "os": "other",
            "state": "active",
            "disabled": False,
            "public": False,
            "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "image_size": -(-virtual // (1 << 20)),
            "requirements": {},
            **fields,
            "type": "qcow2",
            "files": [{"sha1": sha1, "size": size, "compression": compression}],
        }
        from vmadmd.vm.images import check_manifest

        check_manifest(manifest)
        os.chmod(packed, 0o600)
        os.rename(packed, file_path)
        fd = os.open(manifest_tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with open(fd, "w") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.rename(manifest_tmp, manifest_path)
    except OSError as err:
        raise VmadmError(f"imgadm create: {err.filename or prefix}: {err.strerror}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return manifest, manifest_path, file_path


def _pack(src: str, dst: str, compression: str) -> tuple[str, int]:
    """``src`` to ``dst`` (compressed as asked), streamed; the sha1 and size written."""
    import hashlib

    sha1 = hashlib.sha1()
    size = 0
    compressor: Any = None
    if compression == "gzip":
        import zlib

        compressor = zlib.compressobj(6, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    elif compression == "xz":
        import lzma

        compressor = lzma.LZMACompressor(preset=3)
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while True:
            chunk = fin.read(1 << 20)
            if not chunk:
                break
            out = compressor.compress(chunk) if compressor is not None else chunk
            sha1.update(out)
            size += len(out)
            fout.write(out)
        if compressor is not None:
            out = compressor.flush()
            sha1.update(out)
            size += len(out)
            fout.write(out)
        fout.flush()
        os.fsync(fout.fileno())
    return sha1.hexdigest(), size
