"""``imgadm``: sources, import from an IMGAPI on loopback, install, list, delete,
vacuum, create; a VM booted from an imported image reads it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.imgapi import ImgapiServer, make_disk, manifest_for, pack

from .conftest import Env, guest_payload
from .wsclient import WsClient

MARKER = b"IMGADM-MARKER-" + str(os.getpid()).encode()


def imgadm(
    env: Env, *args: str, timeout: float = 120, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``imgadm`` as CI's console script would run it, from this worktree's source."""
    return subprocess.run(
        [sys.executable, "-m", "vmadmd.cli.imgadm", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
        env={**env.environ, **(extra or {})},
    )  # fmt: skip


def ok(res: subprocess.CompletedProcess[str]) -> str:
    assert res.returncode == 0, res.stderr
    return res.stdout


def one_error(res: subprocess.CompletedProcess[str], code: str, rc: int = 1) -> str:
    """A failure: exit ``rc`` and one line, SmartOS's ``imgadm: error (Code): ...``."""
    assert res.returncode == rc, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"imgadm: error ({code}): "), lines[0]
    return lines[0]


def images_dir(env: Env) -> Path:
    return Path(env.zones) / "images"


def visible(env: Env) -> list[str]:
    """What is in the images dir, hidden lock files and the conf aside."""
    d = images_dir(env)
    if not d.exists():
        return []
    return sorted(
        n for n in os.listdir(d) if not (n.startswith(".") and n.endswith(".lock"))
        and n != "imgadm.conf"
    )  # fmt: skip


@pytest.fixture
def server(env: Env) -> Iterator[ImgapiServer]:
    with ImgapiServer(env.tmp / "imgapi") as srv:
        yield srv


@pytest.fixture
def disk(env: Env) -> Path:
    path = env.tmp / "disk.qcow2"
    make_disk(path, 32, MARKER)
    return path


def add_source(env: Env, server: ImgapiServer) -> None:
    out = ok(imgadm(env, "sources", "-a", server.url, "-t", "imgapi"))
    assert out == f'Added "imgapi" image source "{server.url}"\n'


# -- sources ---------------------------------------------------------------------------


def test_sources_as_smartos_prints_them(env: Env, server: ImgapiServer) -> None:
    assert ok(imgadm(env, "sources")) == ""
    add_source(env, server)
    again = ok(imgadm(env, "sources", "-a", server.url, "-t", "imgapi"))
    assert again == f'Already have "imgapi" image source "{server.url}", no change\n'
    assert ok(imgadm(env, "sources")) == f"{server.url}\n"
    assert ok(imgadm(env, "sources", "-l")).split() == [server.url, "imgapi"]
    assert json.loads(ok(imgadm(env, "sources", "-j"))) == [{"url": server.url, "type": "imgapi"}]
    conf = json.loads((images_dir(env) / "imgadm.conf").read_text())
    assert conf == {"sources": [{"url": server.url, "type": "imgapi"}]}
    # Not an IMGAPI (no /ping answer): refused unless -f.
    dead = "http://127.0.0.1:9"
    one_error(imgadm(env, "sources", "-a", dead), "SourceError")
    assert ok(imgadm(env, "sources", "-f", "-a", dead)) == f'Added "imgapi" image source "{dead}"\n'
    # Ansible's module deletes with `-d URL` split into characters.
    chars = list(f" -d {dead}")
    assert ok(imgadm(env, "sources", *chars)) == f'Deleted "imgapi" image source "{dead}"\n'
    gone = ok(imgadm(env, "sources", "-d", dead))
    assert gone == f'Do not have image source "{dead}", no change\n'
    # Bad input: one line, nothing changed.
    one_error(imgadm(env, "sources", "-a", "ftp://x"), "InvalidParameter")
    one_error(imgadm(env, "sources", "-a", server.url + "/x", "-t", "docker"), "Usage")
    one_error(imgadm(env, "sources", "--bogus"), "Usage")
    assert ok(imgadm(env, "sources")) == f"{server.url}\n"
    # A conf that is not JSON: a clear error naming it.
    alt = env.tmp / "alt.conf"
    alt.write_text("{nope")
    res = imgadm(env, "sources", extra={"VMADM_IMGADM_CONF": str(alt)})
    assert str(alt) in one_error(res, "InvalidParameter")
    alt.write_text(json.dumps({"sources": [{"url": "http://a", "type": "imgapi"}]}))
    assert ok(imgadm(env, "--imgadm-conf", str(alt), "sources")) == "http://a\n"


# -- import, list, get, delete ---------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "bzip2", "xz"])
def test_import_list_get_delete(
    env: Env, server: ImgapiServer, disk: Path, compression: str
) -> None:
    manifest = server.publish(disk, compression=compression, image_size=32)
    uuid = manifest["uuid"]
    add_source(env, server)
    avail = json.loads(ok(imgadm(env, "avail", "-j")))
    assert [a["manifest"]["uuid"] for a in avail] == [uuid]
    assert avail[0]["source"] == server.url
    table = ok(imgadm(env, "avail")).splitlines()
    assert table[0].split() == ["UUID", "NAME", "VERSION", "OS", "TYPE", "PUB"]
    assert table[1].split() == [uuid, "test-image", "1.0.0", "linux", "qcow2", "2026-01-02"]
    out = ok(imgadm(env, "import", "-P", "zones", "-q", uuid)).splitlines()
    assert out[-1] == f"Imported image {uuid} (test-image@1.0.0)"
    assert out[0] == f'Importing {uuid} (test-image@1.0.0) from "{server.url}"'
    # On disk: the manifest and the decompressed qcow2, root's and read-only.
    data = images_dir(env) / f"{uuid}.qcow2"
    assert visible(env) == [f"{uuid}.json", f"{uuid}.qcow2"]
    assert data.read_bytes() == disk.read_bytes()
    for path in (data, images_dir(env) / f"{uuid}.json"):
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o444), path
    assert json.loads((images_dir(env) / f"{uuid}.json").read_text()) == manifest
    # Again: skipped, as SmartOS says it.
    again = ok(imgadm(env, "import", "-P", "zones", "-q", uuid))
    assert again == f"Image {uuid} (test-image@1.0.0) is already installed, skipping\n"
    # list, get.
    listed = json.loads(ok(imgadm(env, "list", "-j")))
    assert [i["manifest"] for i in listed] == [manifest]
    assert listed[0]["zpool"] == "zones"
    assert ok(imgadm(env, "list", "-H", "-o", "uuid,type", "type=qcow2")).split() == [uuid, "qcow2"]
    assert ok(imgadm(env, "list", "-H", "type=zvol")) == ""
    assert json.loads(ok(imgadm(env, "get", uuid)))["manifest"] == manifest
    # delete, then ImageNotInstalled (exit 3) for delete and get.
    assert ok(imgadm(env, "delete", "-P", "zones", uuid)) == f"Deleted image {uuid}\n"
    assert visible(env) == []
    one_error(imgadm(env, "delete", "-P", "zones", uuid), "ImageNotInstalled", rc=3)
    one_error(imgadm(env, "get", uuid), "ImageNotInstalled", rc=3)
    missing = "00000000-0000-4000-8000-000000000000"
    res = imgadm(env, "import", "-P", "zones", "-q", missing)
    assert "ActiveImageNotFound" in one_error(res, "ActiveImageNotFound")


def test_zvol_and_raw_images_are_stored_raw(env: Env, server: ImgapiServer) -> None:
    raw = env.tmp / "disk.raw"
    make_disk(raw, 8, b"QFI\xfb raw bytes that start like a qcow2 header", fmt="raw")
    zvol = server.publish(raw, compression="gzip", kind="zvol", image_size=8)
    plain = server.publish(raw, kind="raw")
    add_source(env, server)
    for m in (zvol, plain):
        ok(imgadm(env, "import", "-q", m["uuid"]))
        stored = images_dir(env) / f"{m['uuid']}.raw"
        assert stored.read_bytes() == raw.read_bytes(), "never probed: raw stays raw"


def test_install_from_local_files(env: Env, disk: Path) -> None:
    uuid = "3f0c9a2e-1b7d-4e5a-9c8b-2d6e4f1a0b9c"
    packed = env.tmp / "img.gz"
    sha1, size = pack(disk, packed, "gzip")
    mpath = env.tmp / "img.json"
    mpath.write_text(json.dumps(manifest_for(uuid, "local", sha1, size, "gzip", "qcow2")))
    out = ok(imgadm(env, "install", "-m", str(mpath), "-f", str(packed)))
    assert out == f"Installed image {uuid} (local@1.0.0)\n"
    assert (images_dir(env) / f"{uuid}.qcow2").read_bytes() == disk.read_bytes()
    # Root's alone: no VM's user reads another tenant's image by path (qemu
    # gets images as fds).
    assert os.stat(images_dir(env)).st_mode & 0o777 == 0o700
    again = ok(imgadm(env, "install", "-m", str(mpath), "-f", str(packed)))
    assert "is already installed, skipping" in again


# -- bad input leaves nothing behind ---------------------------------------------------


def test_bad_manifests_and_files_are_refused(env: Env, disk: Path) -> None:
    uuid = "5b2f3c4d-6e7f-4a8b-9c0d-1e2f3a4b5c6d"
    packed = env.tmp / "img.gz"
    sha1, size = pack(disk, packed, "gzip")
    good = manifest_for(uuid, "bad", sha1, size, "gzip", "qcow2")
    mpath = env.tmp / "m.json"

    def install(manifest: object, file: Path = packed) -> str:
        mpath.write_text(manifest if isinstance(manifest, str) else json.dumps(manifest))
        res = imgadm(env, "install", "-m", str(mpath), "-f", str(file))
        assert visible(env) == [], "nothing left behind"
        return one_error(res, res.stderr.split("(")[1].split(")")[0])

    assert "not JSON" in install("{not json")
    assert "no valid uuid" in install({k: v for k, v in good.items() if k != "uuid"})
    assert "no files" in install({k: v for k, v in good.items() if k != "files"})
    assert "zone-dataset" in install({**good, "type": "zone-dataset"})
    assert "compression" in install({**good, "files": [{**good["files"][0], "compression": "zip"}]})
    wrong_sha = {**good, "files": [{**good["files"][0], "sha1": "0" * 40}]}
    assert "does not match" in install(wrong_sha)
    small = {**good, "files": [{**good["files"][0], "size": size - 1}]}
    assert "larger than its manifest" in install(small)
    big = {**good, "files": [{**good["files"][0], "size": size + 1}]}
    assert "truncated" in install(big)
    # A file that inflates past what its manifest says the disk holds.
    zeros = env.tmp / "zeros.raw"
    with open(zeros, "wb") as f:
        f.truncate(64 << 20)
    bomb = env.tmp / "bomb.gz"
    bsha, bsize = pack(zeros, bomb, "gzip")
    inflating = {**manifest_for(uuid, "bomb", bsha, bsize, "gzip", "zvol"), "image_size": 8}
    assert "decompresses past" in install(inflating, bomb)
    # Not gzip at all, and a qcow2 that names a backing file.
    plain = {"sha1": sha1p(disk), "size": disk.stat().st_size, "compression": "gzip"}
    assert "not valid gzip" in install({**good, "files": [plain]}, disk)
    over = env.tmp / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(disk),
                    str(over)], check=True)  # fmt: skip
    backed = {**good, "files": [{"sha1": sha1p(over), "size": over.stat().st_size,
                                 "compression": "none"}]}  # fmt: skip
    assert "backing" in install(backed, over)


def sha1p(path: Path) -> str:
    return pack(path, path.with_suffix(".copy"), "none")[0]


def test_bad_sources_are_one_clear_error(env: Env, server: ImgapiServer, disk: Path) -> None:
    manifest = server.publish(disk, compression="gzip")
    uuid = manifest["uuid"]
    add_source(env, server)
    fast = {"VMADM_IMGADM_TIMEOUT": "1"}
    for route, fault, words in (
        ("manifest", "garbage", "garbage"),
        ("manifest", "notjson", "not JSON"),
        ("manifest", "hang", "timed out"),
        ("file", "garbage", "garbage"),
        ("file_bytes", "flip", "(DownloadError)"),  # a gzip or sha1 error
        ("file", "hang", "timed out"),
        ("file_bytes", "truncate", "truncated"),
    ):
        server.faults = {route: fault}
        t0 = time.monotonic()
        res = imgadm(env, "import", "-q", uuid, extra=fast)
        assert time.monotonic() - t0 < 10, f"{fault}: bounded"
        assert words in res.stderr, (fault, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1
        assert res.returncode == 1
        assert visible(env) == [], f"{route}/{fault}: nothing left"
    server.faults = {"list": "garbage"}
    one_error(imgadm(env, "avail", extra=fast), "SourceError")
    server.faults = {}
    assert ok(imgadm(env, "import", "-q", uuid)).endswith(
        f"Imported image {uuid} (test-image@1.0.0)\n"
    )


def test_interrupted_import_leaves_nothing_installed(
    env: Env, server: ImgapiServer, disk: Path
) -> None:
    manifest = server.publish(disk)
    uuid = manifest["uuid"]
    add_source(env, server)
    server.faults = {"file_bytes": "trickle"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vmadmd.cli.imgadm", "import", "-q", uuid],
        env=env.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    d = images_dir(env)
    env.wait_for(lambda: any(n.endswith(".tmp") and os.path.getsize(d / n) > 0
                             for n in os.listdir(d)), what="a partial download")  # fmt: skip
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert all(n.startswith(".") for n in visible(env)), visible(env)
    assert json.loads(ok(imgadm(env, "list", "-j"))) == []
    res = subprocess.run([sys.executable, "-c", (
        "import sys; from vmadmd.vm.layer import VmLayer; from vmadmd.vm.config import VmSettings\n"
        f"VmLayer(VmSettings.from_env()).disks.find_image({uuid!r})")],
        env=env.environ, capture_output=True, text=True, check=False)  # fmt: skip
    assert "not found" in res.stderr, "vmadm sees no image"
    # Vacuum sweeps the leftover silently (it was no image); the next import installs it.
    assert visible(env) != []
    assert ok(imgadm(env, "vacuum", "-f")) == ""
    assert visible(env) == []
    server.faults = {}
    ok(imgadm(env, "import", "-q", uuid))
    assert visible(env) == [f"{uuid}.json", f"{uuid}.qcow2"]


def test_two_imports_at_once_make_one_image(env: Env, server: ImgapiServer, disk: Path) -> None:
    manifest = server.publish(disk)
    uuid = manifest["uuid"]
    add_source(env, server)
    server.faults = {"file_bytes": "trickle"}
    server.trickle_delay = 0.005
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "vmadmd.cli.imgadm", "import", "-q", uuid],
            env=env.environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    last = sorted(o.strip().splitlines()[-1] for o, _ in outs)
    assert last == [
        f"Image {uuid} (test-image@1.0.0) is already installed, skipping",
        f"Imported image {uuid} (test-image@1.0.0)",
    ], outs
    assert server.requests.count(f"/images/{uuid}/file") == 1, "downloaded once"
    assert visible(env) == [f"{uuid}.json", f"{uuid}.qcow2"]


# -- with VMs: boot, in use, vacuum, create --------------------------------------------


def serial_read(env: Env, uuid: str, command: bytes, until: bytes) -> bytes:
    async def run() -> bytes:
        ws = await WsClient.connect(f"/vm/{uuid}/serial", unix=env.socket)
        try:
            seen = b""
            await ws.send(command)
            async with asyncio.timeout(60):
                while until not in seen:
                    data = await ws.receive(60)
                    if data is None:
                        raise AssertionError(f"console closed: {seen!r}")
                    seen += data
            return seen
        finally:
            await ws.close()

    return asyncio.run(run())


def fd_flags_of(pid: int, target: str) -> list[int]:
    """The open flags of every fd of ``pid`` on ``target``."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                found += [int(x.split()[1], 8) for x in f if x.startswith("flags:")]
        except OSError:
            continue
    return found


def test_vm_from_an_imported_image(
    env: Env, server: ImgapiServer, disk: Path, guest: dict[str, str]
) -> None:
    manifest = server.publish(disk, compression="gzip", image_size=32)
    uuid = manifest["uuid"]
    # And an uncompressed zvol (raw bytes) for a second disk.
    raw = env.tmp / "second.raw"
    make_disk(raw, 8, MARKER + b"-SECOND", fmt="raw")
    zvol = server.publish(raw, kind="zvol", name="second")["uuid"]
    add_source(env, server)
    ok(imgadm(env, "import", "-q", uuid))
    ok(imgadm(env, "import", "-q", zvol))
    env.start_daemon()
    disks = [{"image_uuid": uuid}, {"image_uuid": zvol}]
    vm = env.run_vm(guest_payload(guest, disks=disks), ready=True)
    # The guest reads the images' bytes through its disks.
    seen = serial_read(env, vm, b"for d in vda vdb; do dd if=/dev/$d bs=1M skip=1 count=1"
                       b" 2>/dev/null | head -c 64; echo; done; echo done-$((40+2))\n",
                       b"done-42")  # fmt: skip
    assert MARKER + b"\x00" in seen, seen[-500:]
    assert MARKER + b"-SECOND" in seen, seen[-500:]
    # qemu holds the image read-only.
    pid = env.pid(vm)
    assert pid is not None
    image = str(images_dir(env) / f"{uuid}.qcow2")
    flags = fd_flags_of(pid, image)
    assert flags, "qemu has the image open"
    assert all(f & os.O_ACCMODE == os.O_RDONLY for f in flags), flags
    # In use: delete refused, vacuum keeps it.
    res = imgadm(env, "delete", uuid)
    assert vm in one_error(res, "ImageHasDependentClones")
    assert ok(imgadm(env, "vacuum", "-f")) == ""
    assert json.loads(ok(imgadm(env, "list", "-j")))[0]["clones"] == 1
    # create: refused while the VM runs; from the stopped VM, an image that installs.
    one_error(imgadm(env, "create", vm, "name=made", "version=2"), "WrongState")
    env.vmadm("stop", vm, "-F", check=True)
    out_dir = env.tmp / "made"
    out_dir.mkdir()
    made = ok(imgadm(env, "create", "-c", "xz", vm, "name=made", "version=2", "-o", str(out_dir)))
    new_uuid = made.split()[2]
    mpath, fpath = out_dir / "made-2.imgmanifest", out_dir / "made-2.qcow2.xz"
    assert made.splitlines()[1:] == [f"Manifest: {mpath}", f"Image file: {fpath}"]
    created = json.loads(mpath.read_text())
    assert created["type"] == "qcow2"
    assert created["files"][0]["compression"] == "xz"
    assert created["image_size"] == 32
    ok(imgadm(env, "install", "-m", str(mpath), "-f", str(fpath)))
    flat = images_dir(env) / f"{new_uuid}.qcow2"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(flat)],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info, "flattened"
    # The new image carries the guest's bytes: a second VM reads the marker from it.
    vm2 = env.run_vm(guest_payload(guest, disks=[{"image_uuid": new_uuid}]), ready=True)
    seen = serial_read(env, vm2, b"dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 64;"
                       b" echo; echo done-$((40+2))\n", b"done-42")  # fmt: skip
    assert MARKER in seen
    # Vacuum: nothing while both are in use; each image once its VM is gone.
    assert ok(imgadm(env, "vacuum", "-f")) == ""
    env.vmadm("delete", vm, check=True)
    deleted = ok(imgadm(env, "vacuum", "-f")).splitlines()
    assert sorted(deleted) == sorted([f"Deleted image {uuid} (test-image@1.0.0)",
                                      f"Deleted image {zvol} (second@1.0.0)"])  # fmt: skip
    env.vmadm("delete", vm2, check=True)
    assert ok(imgadm(env, "delete", new_uuid)) == f"Deleted image {new_uuid}\n"
    assert visible(env) == []
    assert ok(imgadm(env, "vacuum", "-f")) == ""


def test_an_image_under_a_disk_not_yet_recorded_stays(
    env: Env, server: ImgapiServer, disk: Path
) -> None:
    """``vmadm create`` makes a disk's overlay before it writes the disk into
    ``vm.json``: an image in that window is in use all the same."""
    uuid = server.publish(disk)["uuid"]
    add_source(env, server)
    ok(imgadm(env, "import", "-q", uuid))
    vm = env.create({"alias": "window", "ram": 64, "autoboot": False,
                     "disks": [{"image_uuid": uuid}]})  # fmt: skip
    vm_json = Path(env.zones) / vm / "vm.json"
    record = json.loads(vm_json.read_text())
    record["disks"] = []  # as between the overlay's making and its record
    vm_json.write_text(json.dumps(record))
    assert vm in one_error(imgadm(env, "delete", uuid), "ImageHasDependentClones")
    assert ok(imgadm(env, "vacuum", "-f")) == ""
    assert (images_dir(env) / f"{uuid}.qcow2").exists()


def test_update_rereads_manifests(env: Env, server: ImgapiServer, disk: Path) -> None:
    manifest = server.publish(disk)
    uuid = manifest["uuid"]
    add_source(env, server)
    ok(imgadm(env, "import", "-q", uuid))
    assert ok(imgadm(env, "update")) == ""
    server.images[uuid][0]["description"] = "now described"
    assert ok(imgadm(env, "update", uuid)).startswith(f"Updated image {uuid} (test-image@1.0.0)")
    assert json.loads(ok(imgadm(env, "get", uuid)))["manifest"]["description"] == "now described"
    missing = "00000000-0000-4000-8000-000000000000"
    one_error(imgadm(env, "update", missing), "ImageNotInstalled", rc=3)
    # An image put in the images dir by hand (as before imgadm): listed, and
    # update gives it the manifest its source serves.
    by_hand = server.publish(disk, name="by-hand")
    (images_dir(env) / f"{by_hand['uuid']}.qcow2").write_bytes(disk.read_bytes())
    rows = ok(imgadm(env, "list", "-H", "-o", "uuid,name,type", f"uuid={by_hand['uuid']}"))
    assert rows.split() == [by_hand["uuid"], "-", "qcow2"]
    assert "Updated image" in ok(imgadm(env, "update"))
    assert json.loads(ok(imgadm(env, "get", by_hand["uuid"])))["manifest"] == by_hand


# -- pure ------------------------------------------------------------------------------


def test_inflater_bounds_its_output_and_reads_concatenated_streams() -> None:
    import bz2
    import gzip
    import lzma

    from vmadmd.vm.images import CHUNK, CorruptImage, Inflater

    zeros = bytes(8 << 20)
    for name, compress in (("gzip", gzip.compress), ("bzip2", bz2.compress),
                           ("xz", lzma.compress)):  # fmt: skip
        packed = compress(zeros) + compress(b"tail")  # two streams, as pigz/pbzip2 write
        inflater = Inflater(name)
        pieces = [
            p for i in range(0, len(packed), 4096) for p in inflater.feed(packed[i : i + 4096])
        ]
        inflater.finish()
        assert b"".join(pieces) == zeros + b"tail", name
        assert max(len(p) for p in pieces) <= CHUNK, f"{name}: never more than a chunk at once"
        cut = Inflater(name)
        list(cut.feed(packed[: len(packed) // 3]))
        with pytest.raises(CorruptImage, match="truncated"):
            cut.finish()
        with pytest.raises(CorruptImage, match=f"not valid {name}"):
            list(Inflater(name).feed(b"\x00" * 64))


def test_manifests_are_checked() -> None:
    from vmadmd.vm.images import InvalidManifest, check_manifest, output_limit

    good = manifest_for("5b2f3c4d-6e7f-4a8b-9c0d-1e2f3a4b5c6d", "n", "a" * 40, 10, "gzip", "zvol")
    assert check_manifest(good) is good
    bad: list[object] = [
        [], {**good, "uuid": good["uuid"].upper()}, {**good, "type": "lx-dataset"},
        {**good, "files": []}, {**good, "files": [{"sha1": "x", "size": 1}]},
        {**good, "files": [{"sha1": "a" * 40, "size": True}]}, {**good, "image_size": "1"},
        {k: v for k, v in good.items() if k != "version"},
    ]  # fmt: skip
    for item in bad:
        with pytest.raises(InvalidManifest):
            check_manifest(item)
    assert output_limit({**good, "image_size": 8}, "gzip") == 8 << 20, "raw: exactly its size"
    assert output_limit({**good, "image_size": 8}, "none") is None
    assert output_limit(good, "gzip") is None


def test_sources_shim_only_rejoins_single_characters() -> None:
    from vmadmd.cli.imgadm import _sources_shim

    url = "http://127.0.0.1:1"
    assert _sources_shim(["sources", *f" -d {url}"]) == ["sources", "-d", url]
    assert _sources_shim(["sources", "-f", *f" -d {url}"]) == ["sources", "-f", "-d", url]
    assert _sources_shim(["sources", "-d", url]) == ["sources", "-d", url]
    assert _sources_shim(["list", "a", "b", "c", "d"]) == ["list", "a", "b", "c", "d"]


# -- the progress bar, and create's backing chain ----------------------------------------


def test_progress_bar_only_on_a_terminal(env: Env, server: ImgapiServer, disk: Path) -> None:
    import pty

    uuids = [server.publish(disk)["uuid"] for _ in range(3)]
    add_source(env, server)
    for uuid, quiet, shown in ((uuids[0], False, True), (uuids[1], True, False)):
        master, slave = pty.openpty()
        try:
            res = subprocess.run(
                [sys.executable, "-m", "vmadmd.cli.imgadm", "import", *(["-q"] if quiet else []),
                 uuid], env=env.environ, stdout=subprocess.PIPE, stderr=slave, timeout=60,
                check=True,
            )  # fmt: skip
            os.close(slave)
            seen = b""
            while True:
                try:
                    piece = os.read(master, 65536)
                except OSError:
                    break
                if not piece:
                    break
                seen += piece
        finally:
            os.close(master)
        assert (b"100.0%" in seen) == shown, seen
        assert res.stdout.decode().splitlines()[-1].startswith(f"Imported image {uuid}")
    piped = imgadm(env, "import", uuids[2])  # stderr a pipe: no bar
    assert ok(piped)
    assert piped.stderr == ""


def test_create_never_follows_a_backing_file_named_in_the_disk(env: Env) -> None:
    """The VM's user owns its disk: a header naming a host file as backing
    must not put that file into the image."""
    secret = env.tmp / "secret.raw"
    secret.write_bytes(b"TOP-SECRET-HOST-BYTES" * 4096)
    vm = env.create({"alias": "plain", "ram": 64, "autoboot": False, "disks": [{"size": 1}]})
    path = env.get(vm)["disks"][0]["path"]
    subprocess.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "raw", "-b", str(secret),
                    path], check=True)  # fmt: skip
    out = env.tmp / "out"
    out.mkdir()
    made = ok(imgadm(env, "create", vm, "name=plain", "version=1", "-o", str(out)))
    assert made.startswith("Created image ")
    image = (out / "plain-1.qcow2").read_bytes()
    assert b"TOP-SECRET" not in image
    made_file = str(out / "plain-1.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", made_file],
                                     capture_output=True, check=True).stdout)  # fmt: skip
    assert "backing-filename" not in info
    assert info["virtual-size"] == 1 << 20
    # Bad input: one line each, nothing written.
    for args, code in ((["name=x"], "InvalidParameter"), (["version=1"], "InvalidParameter"),
                       (["name=x", "version=1", "files=[]"], "InvalidParameter"),
                       (["name=x", "version=1", "-c", "lz4"], "Usage")):  # fmt: skip
        one_error(imgadm(env, "create", vm, *args, "-o", str(out)), code)
    missing = "00000000-0000-4000-8000-000000000000"
    one_error(imgadm(env, "create", missing, "name=x", "version=1"), "VmNotFound")
    assert sorted(os.listdir(out)) == ["plain-1.imgmanifest", "plain-1.qcow2"]


def test_create_never_reads_an_external_data_file_named_in_the_disk(env: Env) -> None:
    """The review: a header with an external data file (data_file=/etc/shadow,
    data_file_raw=on) made root's qemu-img copy that host file into the image."""
    vm = env.create({"alias": "plain", "ram": 64, "autoboot": False, "disks": [{"size": 1}]})
    path = env.get(vm)["disks"][0]["path"]
    secret = env.tmp / "secret.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o",
                    f"data_file={secret},data_file_raw=on", path, "1M"], check=True)  # fmt: skip
    with open(secret, "r+b") as f:
        f.write(b"TOP-SECRET-HOST-BYTES" * 4096)
    out = env.tmp / "out"
    out.mkdir()
    one_error(imgadm(env, "create", vm, "name=plain", "version=1", "-o", str(out)),
              "InvalidParameter")  # fmt: skip
    assert os.listdir(out) == []
