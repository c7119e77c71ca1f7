"""Boot order and install media: the ``boot`` property and ``vmadm start <uuid>
[order=X[,once=Y]] [cdrom=PATH,MODEL ...] [disk=PATH,MODEL ...]``.

The install test boots real qemu (TCG) from a CD the test makes with
Debian's xorriso and isolinux (the test guest's kernel and initramfs, and
an isolinux.cfg whose kernel command line says which medium it came from),
put in the VM's zone root; the VM's own disk holds a second, hybrid
(disk-bootable) image that says ``disk``.  With ``order=cd,once=d`` the
first boot comes from the CD; the guest then reboots itself (``reboot -f``
on its serial console: qemu resets, it does not restart) and comes back
from the disk.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import READY, Env
from tests.test_operator import SerialClient
from vmadmd.errors import InvalidParameter
from vmadmd.vm.bootopts import BootMedium, BootOptions
from vmadmd.vm.qemu import DiskFds, build_argv
from vmadmd.vm.store import VmPaths

ISOLINUX = Path("/usr/lib/ISOLINUX")
LDLINUX = Path("/usr/lib/syslinux/modules/bios/ldlinux.c32")


# -- the options, pure -------------------------------------------------------


def test_start_options_parse_as_smartos_has_them() -> None:
    opts = BootOptions.from_args(
        ["order=cd,once=d", "cdrom=/install.iso,ide", "disk=/extra.img,virtio", "cdrom=/b.iso,scsi"]
    )
    assert (opts.order, opts.once, opts.boot) == ("cd", "d", "order=cd,once=d")
    assert opts.media == (
        BootMedium("cdrom", "/install.iso", "ide"),
        BootMedium("disk", "/extra.img", "virtio"),
        BootMedium("cdrom", "/b.iso", "scsi"),
    )
    assert BootOptions.from_json(opts.to_json()).to_json() == opts.to_json()
    for bad, why in (
        (["order=cd", "order=dc"], "only once"),
        (["order=cx"], "letters"),
        (["order=cd,once=dd"], "at most once"),
        (["order=cd,twice=d"], "order=X"),
        (["cdrom=/install.iso"], "PATH,MODEL"),
        (["cdrom=/install.iso,floppy"], "model must be one of"),
        (["cdrom=install.iso,ide"], "absolute"),
        (["cdrom=/../../etc/shadow,ide"], "leaves the zone root"),
        (["cdrom=/,ide"], "names no file"),
        (["kernel=/vmlinuz"], "unknown start option"),
        (["order"], "key=value"),
    ):
        with pytest.raises(InvalidParameter, match=why):
            BootOptions.from_args(bad)


def _argv(vm: dict[str, Any], boot: BootOptions | None, media_fds: list[int]) -> list[str]:
    paths = VmPaths("/nonexistent-zones/" + vm["uuid"])
    fds = [DiskFds(10 + i) for i in range(len(vm.get("disks", [])))]
    return build_argv(vm, paths, "qemu-system-x86_64", "tcg", disk_fds=fds, boot=boot,
                      media_fds=media_fds)  # fmt: skip


def test_boot_order_and_media_on_qemus_command_line() -> None:
    vm: dict[str, Any] = {
        "uuid": "2ad5b6d8-0e26-4d7f-9a51-1f7b4e1d2c3a", "ram": 128, "vcpus": 1,
        "disks": [{"path": "/nonexistent-zones/x/disk0.qcow2", "model": "virtio", "boot": True}],
    }  # fmt: skip
    # No order anywhere: as before, the boot disk first by bootindex, no -boot.
    argv = _argv(vm, None, [])
    assert "-boot" not in argv
    assert "virtio-blk-pci,drive=disk0,id=disk0,bootindex=0" in argv
    # The VM's own order: -boot, and no bootindex to override it.
    argv = _argv({**vm, "boot": "order=dc"}, None, [])
    assert argv[argv.index("-boot") + 1] == "order=dc"
    assert "virtio-blk-pci,drive=disk0,id=disk0" in argv
    # This boot's options win; its CD is read-only raw over its fd, in an
    # fd set after the disks'.
    boot = BootOptions.from_args(["order=cd,once=d", "cdrom=/i.iso,ide", "disk=/e.img,scsi"])
    argv = _argv({**vm, "boot": "order=dc"}, boot, [20, 21])
    assert argv[argv.index("-boot") + 1] == "order=cd,once=d"
    joined = " ".join(argv)
    assert "-add-fd fd=20,set=3,opaque=cd0" in joined
    assert '"node-name":"cd0-file","filename":"/dev/fdset/3","read-only":true' in joined
    assert '"driver":"raw","node-name":"cd0","file":"cd0-file","read-only":true' in joined
    assert "ide-cd,drive=cd0" in argv
    assert "-add-fd fd=21,set=4,opaque=extra1" in joined
    assert '"driver":"raw","node-name":"extra1","file":"extra1-file"}' in joined
    assert "scsi-hd,drive=extra1,bus=scsi0.0" in argv
    assert "virtio-scsi-pci,id=scsi0" in argv
    with pytest.raises(ValueError, match="boot media"):
        _argv(vm, boot, [20])


def test_boot_property_is_checked_and_updatable(env: Env) -> None:
    uuid = env.create({"alias": "b", "autoboot": False, "boot": "order=cd"})
    assert env.get(uuid)["boot"] == "order=cd"
    env.vmadm("update", uuid, "boot=order=dc,once=n", check=True)
    assert env.get(uuid)["boot"] == "order=dc,once=n"
    res = env.vmadm("update", uuid, "boot=order=dz")
    assert res.returncode == 1
    assert res.stderr.startswith("vmadm: boot: order takes the letters")
    assert env.get(uuid)["boot"] == "order=dc,once=n"
    res = env.vmadm("create", input=json.dumps({"boot": "cd"}))
    assert res.returncode == 1
    assert "order=X[,once=Y]" in res.stderr


# -- real qemu ---------------------------------------------------------------


def _iso(tmp: Path, guest: dict[str, str], medium: str, *, hybrid: bool) -> Path:
    """A bootable ISO of the test guest whose kernel command line names ``medium``."""
    if not (ISOLINUX / "isolinux.bin").exists() or shutil.which("xorriso") is None:
        pytest.fail("xorriso and isolinux are needed (tools/setup.sh installs them)")
    tree = tmp / f"tree-{medium}"
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy(ISOLINUX / "isolinux.bin", tree / "isolinux")
    shutil.copy(LDLINUX, tree / "isolinux")
    shutil.copy(guest["kernel"], tree / "vmlinuz")
    shutil.copy(guest["initrd"], tree / "initrd.img")
    (tree / "isolinux" / "isolinux.cfg").write_text(
        "DEFAULT vmtest\nPROMPT 0\nTIMEOUT 0\nLABEL vmtest\n  KERNEL /vmlinuz\n"
        f"  APPEND initrd=/initrd.img console=ttyS0 quiet panic=-1 vmtest.media={medium}\n"
    )
    out = tmp / f"{medium}.iso"
    cmd = ["xorriso", "-as", "mkisofs", "-quiet", "-o", str(out),
           "-b", "isolinux/isolinux.bin", "-c", "isolinux/boot.cat",
           "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table"]  # fmt: skip
    if hybrid:
        cmd += ["-isohybrid-mbr", str(ISOLINUX / "isohdpfx.bin")]
    subprocess.run([*cmd, str(tree)], check=True, capture_output=True, timeout=120)
    return out


def _install_vm(env: Env) -> tuple[str, Path, int]:
    """A stopped VM with one disk; returns its uuid, zonepath and zone uid."""
    uuid = env.create({"alias": "install", "ram": 128, "autoboot": False,
                       "disks": [{"size": 64, "model": "virtio"}]})  # fmt: skip
    vm = env.get(uuid)
    return uuid, Path(vm["zonepath"]), int(vm["zone_uid"])


def _in_zone_root(zonepath: Path, uid: int, src: Path, name: str) -> Path:
    """``src`` copied into the zone root as its user would have put it there."""
    dest = zonepath / "root" / name
    shutil.copy(src, dest)
    os.chown(dest, uid, uid)
    return dest


async def _cmdline(env: Env, uuid: str, nth: int) -> str:
    """The guest's /proc/cmdline, asked on its serial console once it has
    printed its ready marker ``nth`` times."""
    env.wait_console(uuid, READY, count=nth, timeout=180)
    marker, end = f"cmdline-{nth}: ", f" :end-{nth}."
    async with SerialClient(env, uuid) as serial:
        # Spelled so that the shell's echo of the line typed is not the
        # answer (and the console's history holds the earlier answers).
        await serial.type(
            f"echo cmdline-$((0+{nth})): $(cat /proc/cmdline) :end-$((0+{nth})).\n".encode()
        )
        await serial.until(marker.encode(), 30)
        async with asyncio.timeout(10):
            while end not in serial.seen.decode(errors="replace").rsplit(marker, 1)[1]:
                data = await serial.ws.receive(10)
                assert data is not None, "the console closed"
                serial.seen += data
        text = serial.seen.decode(errors="replace")
    return text.rsplit(marker, 1)[1].split(end, 1)[0]


@pytest.mark.timeout(600)  # three TCG boots through the BIOS and isolinux
def test_install_from_cd_once_then_back_to_the_disk(
    env: Env, guest: dict[str, str], tmp_path: Path
) -> None:
    cd = _iso(tmp_path, guest, "cd", hybrid=False)
    disk_image = _iso(tmp_path, guest, "disk", hybrid=True)
    env.start_daemon()
    uuid, zonepath, uid = _install_vm(env)
    # The VM's disk holds the disk-bootable image (as an installed system would).
    disk = zonepath / "disk0.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(disk_image),
                    str(disk)], check=True, capture_output=True, timeout=120)  # fmt: skip
    os.chown(disk, uid, uid)
    os.chmod(disk, 0o600)
    _in_zone_root(zonepath, uid, cd, "install.iso")

    res = env.vmadm("start", uuid, "order=cd,once=d", "cdrom=/install.iso,ide", check=True)
    assert res.stderr == f"Successfully started VM {uuid}\n"
    env.wait_qmp(uuid)
    pid = env.pid(uuid)
    assert pid is not None
    # qemu was told so, and has the CD read-only.
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert argv[argv.index(b"-boot") + 1] == b"order=cd,once=d"
    block = env.api("GET", f"/vm/{uuid}", type="block")[1]["block"]
    cds = [b for b in block if b.get("inserted", {}).get("node-name") == "cd0"]
    assert cds
    assert cds[0]["inserted"]["ro"] is True

    first = asyncio.run(_cmdline(env, uuid, 1))
    assert "vmtest.media=cd" in first, first

    # A reboot from inside the guest: qemu resets (same process) and the
    # BIOS follows the normal order again: the disk.
    async def reboot() -> None:
        async with SerialClient(env, uuid) as serial:
            await serial.type(b"reboot -f\n")
            await serial.until(b"reboot: Restarting system", 30)

    asyncio.run(reboot())
    env.wait_console(uuid, READY, count=2, timeout=180)
    second = asyncio.run(_cmdline(env, uuid, 2))
    assert "vmtest.media=disk" in second, second
    assert env.pid(uuid) == pid
    assert env.console(uuid).count("vmtest.media=cd") == 1

    # A new qemu (stop, start without options): no -boot, no CD.
    env.vmadm("stop", uuid, "-F", check=True)
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    new_pid = env.pid(uuid)
    assert new_pid is not None
    with open(f"/proc/{new_pid}/cmdline", "rb") as f:
        assert b"-boot" not in f.read().split(b"\0")
    block = env.api("GET", f"/vm/{uuid}", type="block")[1]["block"]
    assert [b["inserted"]["node-name"] for b in block if "inserted" in b] == ["disk0"]


@pytest.mark.timeout(300)
def test_start_through_the_api_with_a_cd(env: Env, guest: dict[str, str], tmp_path: Path) -> None:
    cd = _iso(tmp_path, guest, "cd", hybrid=False)
    env.start_daemon()
    uuid, zonepath, uid = _install_vm(env)
    (zonepath / "root" / "media").mkdir()
    os.chown(zonepath / "root" / "media", uid, uid)
    _in_zone_root(zonepath, uid, cd, "media/install.iso")
    body = {"order": "dc", "cdrom": [{"path": "/media/install.iso", "model": "scsi"}]}
    status, reply = _post_json(env, uuid, body)
    assert status == 200, reply
    assert reply == {"uuid": uuid, "state": "running"}
    assert env.get(uuid)["autoboot"] is True
    env.wait_console(uuid, READY, timeout=120)
    assert "vmtest.media=cd" in asyncio.run(_cmdline(env, uuid, 1))
    # Started already: 409; bad options: 400, nothing started.
    assert _post_json(env, uuid, {})[0] == 409
    assert _post_json(env, uuid, {"order": "cx"})[0] == 400
    # Options anywhere but the JSON body are refused, not ignored.
    assert env.api("POST", f"/vm/{uuid}", action="start", order="cd")[0] == 400


def _post_json(env: Env, uuid: str, body: dict[str, Any]) -> tuple[int, Any]:
    from vmadmd.cli.client import ApiError

    try:
        return env.client().request("POST", f"/vm/{uuid}", {"action": "start"}, body=body)
    except ApiError as err:
        return err.status, {"error": {"code": err.code, "message": err.message}}


def test_refused_media_start_nothing(env: Env, tmp_path: Path) -> None:
    uuid, zonepath, _ = _install_vm(env)
    root = zonepath / "root"
    secret = tmp_path / "secret.iso"
    secret.write_bytes(b"root's, not the guest's")
    os.chmod(secret, 0o600)
    os.symlink(secret, root / "link.iso")  # the guest's user can make this
    os.symlink("/", root / "up")  # ... and this
    os.mkfifo(root / "pipe.iso")
    (root / "dir.iso").mkdir()
    (root / "real.iso").write_bytes(b"\0" * 2048)
    os.link(root / "real.iso", root / "hard.iso")
    before = (zonepath / "vm.json").read_bytes()
    for arg, why in (
        ("cdrom=/link.iso,ide", "symbolic link"),
        (f"cdrom=/up{secret},ide", "symbolic link or no directory"),
        ("cdrom=/pipe.iso,ide", "not a regular file"),
        ("cdrom=/dir.iso,ide", "not a regular file"),
        ("cdrom=/missing.iso,ide", "does not exist"),
        ("cdrom=/hard.iso,ide", "2 hard links"),
        ("disk=/link.iso,virtio", "symbolic link"),
        ("cdrom=/../secret.iso,ide", "leaves the zone root"),
    ):
        res = env.vmadm("start", uuid, "order=cd,once=d", arg, timeout=30)
        assert res.returncode == 1, (arg, res.stderr)
        assert res.stderr.count("\n") == 1, res.stderr
        assert why in res.stderr, (arg, res.stderr)
        assert env.pid(uuid) is None
        assert (zonepath / "vm.json").read_bytes() == before
    assert json.loads(before)["autoboot"] is False
    # The same refusals through the API: a 400 with the error's shape.
    env.start_daemon()
    status, body = _post_json(env, uuid, {"cdrom": [{"path": "/pipe.iso", "model": "ide"}]})
    assert status == 400
    assert "not a regular file" in body["error"]["message"]
    assert env.pid(uuid) is None
