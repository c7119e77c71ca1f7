"""The VM layer's walls (security review "Zones that hold", findings 3, 4, 5, 7):

- an image is never a VM's disk: opened read-only, attached read-only, and a
  ``path`` into the images dir is refused (``image_uuid`` is the way);
- tap names are derived, never from a payload, and no link is deleted (or
  opened) unless it is a tuntap the VM's own uid owns;
- ``zone_uid`` comes from one host-wide ledger and is never handed out twice;
- only ``<zonepath>/disk<N>.*`` are disks, found without following a link.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.world import World
from vmadmd.vm import net

from .conftest import Env, bios_payload, guest_payload
from .test_operator import SerialClient, qmp

IMAGE = "5a0d1b6e-3c2f-4e8a-9b7d-2f1e0c9a8b7d"


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def make_raw_image(env: Env, size: int = 4 << 20) -> Path:
    """A raw image of random bytes, root's and 0444, as imgadm installs one."""
    images = Path(env.zones) / "images"
    images.mkdir(exist_ok=True)
    image = images / f"{IMAGE}.raw"
    image.write_bytes(os.urandom(size))
    image.chmod(0o444)
    return image


def vm_json(env: Env, uuid: str) -> Path:
    return Path(env.zones) / uuid / "vm.json"


def edit_record(env: Env, uuid: str, **changes: Any) -> None:
    """Write ``changes`` into the VM's vm.json, as an older vmadm could have."""
    path = vm_json(env, uuid)
    record = json.loads(path.read_text())
    record.update(changes)
    path.write_text(json.dumps(record))


def ledger_uids(path: str) -> list[int]:
    with open(path) as f:
        return [int(line.split()[0]) for line in f if line[:1].isdigit()]


# -- finding 5: zone uids from one host-wide ledger ---------------------------------


def test_zone_uids_are_never_handed_out_twice_host_wide(tmp_path: Path) -> None:
    """Two zones roots sharing the host's ledger, creating at once: every uid
    differs; a deleted VM's uid is not given again; VMs from before the ledger
    are taken into it."""
    one, two = World(tmp_path / "one"), World(tmp_path / "two")
    two.extra_env["VMADM_UID_LEDGER"] = one.ledger
    try:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            made = list(
                pool.map(lambda w: (w, w.create(bios_payload())), [one, two, one, two, one, two])
            )
        uids = {uuid: w.get(uuid)["zone_uid"] for w, uuid in made}
        assert len(set(uids.values())) == 6, uids
        assert sorted(ledger_uids(one.ledger)) == sorted(uids.values())
        assert not os.path.exists(two.ledger), "the second root used the shared ledger"
        # Deleted, its uid stays spent: the next VM gets a new one.
        first = made[0][1]
        one.vmadm("delete", first, check=True)
        again = one.create(bios_payload())
        assert one.get(again)["zone_uid"] == max(uids.values()) + 1
        # The ledger line says which VM had it, in which zones root.
        with open(one.ledger) as f:
            line = next(x for x in f if x.startswith(f"{uids[first]} "))
        assert line.split()[1] == first
        assert json.loads(line.split(" ", 3)[3]) == one.zones

        # A zones root whose VMs are older than its ledger: their uids count.
        three = World(tmp_path / "three")
        old = three.create(bios_payload())
        edit_record(three, old, zone_uid=2_000_000_500)
        os.unlink(three.ledger)
        new = three.create(bios_payload())
        assert three.get(new)["zone_uid"] == 2_000_000_501
        assert ledger_uids(three.ledger) == [2_000_000_500, 2_000_000_501]
    finally:
        one.cleanup()
        two.cleanup()


def test_ledger_survives_a_torn_line_and_skips_host_accounts(tmp_path: Path) -> None:
    """A crash mid-append leaves a line without its end: the next record still
    starts a line of its own (else its uid would be read as part of the torn
    one, and handed out again).  A uid that names a host account is skipped."""
    import pwd

    zones = str(tmp_path / "zones")  # the zones root the ledger records, as text only

    from vmadmd.vm import uids

    path = str(tmp_path / "state" / "zone-uids")
    u = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"
    with uids.locked(path) as fd:
        first = uids.allocate(fd, 2_000_000_000, u, zones, "t0", {})
    assert first == 2_000_000_000
    assert os.stat(os.path.dirname(path)).st_mode & 0o777 == 0o700
    with open(path, "a") as f:
        f.write("2000000007 torn")  # no end of line
    with uids.locked(path) as fd:
        second = uids.allocate(fd, 2_000_000_000, u, zones, "t1", {})
    assert second == 2_000_000_008
    with uids.locked(path) as fd:
        assert uids.allocate(fd, 2_000_000_000, u, zones, "t2", {}) == 2_000_000_009
    assert ledger_uids(path) == [2_000_000_000, 2_000_000_007, 2_000_000_008, 2_000_000_009]
    account = pwd.getpwnam("root").pw_uid  # 0: any account will do
    other = str(tmp_path / "other")
    with uids.locked(other) as fd:
        assert uids.allocate(fd, account, u, zones, "t", {}) != account


def test_the_daemon_takes_its_ledger_from_the_flag(env: Env) -> None:
    """``vmadmd --uid-ledger`` (here over the environment's): a VM from before
    VMs had users, booted by the daemon (autoboot), is given its uid there."""
    uuid = env.create(bios_payload())
    record = json.loads(vm_json(env, uuid).read_text())
    del record["zone_uid"]
    record["autoboot"] = True
    vm_json(env, uuid).write_text(json.dumps(record))
    before = ledger_uids(env.ledger)
    flag_ledger = str(env.tmp / "flag-ledger" / "zone-uids")
    env.start_daemon("--uid-ledger", flag_ledger)
    try:
        env.wait_qmp(uuid, timeout=90)
    except AssertionError as err:  # seen once in CI, not reproduced: keep what the daemon said
        raise AssertionError(f"{err}\n{env.daemon_log(tail=20000)}") from None
    uid = env.get(uuid)["zone_uid"]
    assert ledger_uids(flag_ledger) == [uid]
    assert ledger_uids(env.ledger) == before, "the environment's ledger is not the daemon's"
    assert os.stat(flag_ledger).st_mode & 0o777 == 0o600


# -- finding 4: tap names ---------------------------------------------------------


@pytest.fixture
def netns(env: Env) -> Iterator[str]:
    """A network namespace with a bridge br-admin (nic tag admin) that vmadm
    and qemu run in; deleted with every link in it."""
    ns = f"vmw-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        ip(ns, "link", "add", "br-admin", "type", "bridge")
        ip(ns, "link", "set", "br-admin", "up")
        env.prefix = ["nsenter", f"--net=/run/netns/{ns}"]
        env.extra_env["VMADM_NIC_TAGS"] = "admin=br-admin"
        yield ns
    finally:
        env.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def ip(ns: str, *args: str) -> str:
    return subprocess.run(["ip", "-n", ns, *args], check=True, capture_output=True,
                          text=True).stdout  # fmt: skip


def link(ns: str, name: str) -> dict[str, Any] | None:
    links = json.loads(ip(ns, "-j", "-d", "link", "show"))
    return next((x for x in links if x["ifname"] == name), None)


def tun_owner(ns: str, name: str) -> int | None:
    found = link(ns, name)
    assert found is not None, name
    assert found["linkinfo"]["info_kind"] == "tun"
    owner: int | None = found["linkinfo"]["info_data"].get("user")
    return owner


def test_tap_names_are_derived_and_other_links_survive(env: Env, netns: str) -> None:
    ns = netns
    # ifname in a payload: refused, naming the property; nothing made.
    before = sorted(os.listdir(env.zones))
    res = env.vmadm("create", input=json.dumps(bios_payload(nics=[
        {"nic_tag": "admin", "ifname": "eth0"}])))  # fmt: skip
    assert res.returncode == 1
    assert "nics[0].ifname" in res.stderr
    assert len(res.stderr.splitlines()) == 1
    assert sorted(os.listdir(env.zones)) == before

    uuid = env.create(bios_payload(nics=[{"nic_tag": "admin"}, {"netdev": "tap"}]))
    vm = env.get(uuid)
    uid = vm["zone_uid"]
    tap0, tap1 = (nic["ifname"] for nic in vm["nics"])
    assert (tap0, tap1) == (net.tap_name(uid, 0), net.tap_name(uid, 1))
    assert tap0.startswith("vmt")
    assert len(tap0) <= 15
    assert net.uid_of_tap(tap0) == uid
    saved = vm_json(env, uuid).read_bytes()
    res = env.vmadm("update", uuid, "-f", "-", input=json.dumps(
        {"nics": [{"nic_tag": "admin", "ifname": "br-admin"}]}))  # fmt: skip
    assert res.returncode == 1
    assert "nics[0].ifname" in res.stderr
    assert vm_json(env, uuid).read_bytes() == saved

    # A host's veth pair bearing the tap's name: the start is refused and the
    # pair is left alone (the old code deleted it).
    ip(ns, "link", "add", tap0, "type", "veth", "peer", "name", "peer-" + tap0[-6:])
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert f"a link named {tap0} exists and is not this VM's tap (a veth link" in res.stderr
    assert link(ns, tap0) is not None
    assert link(ns, "peer-" + tap0[-6:]) is not None
    assert env.get(uuid)["state"] == "stopped"
    ip(ns, "link", "del", tap0)

    # Another uid's tap (another VM's live tap, say): refused, it survives;
    # for the untagged nic too (root could attach to it).
    for name in (tap0, tap1):
        ip(ns, "tuntap", "add", "dev", name, "mode", "tap", "user", "12345")
        res = env.vmadm("start", uuid)
        assert res.returncode == 1
        assert f"a link named {name} exists" in res.stderr
        assert "owned by uid 12345" in res.stderr
        assert tun_owner(ns, name) == 12345
        ip(ns, "link", "del", name)
    # A tap with no owner at all is no more the VM's.
    ip(ns, "tuntap", "add", "dev", tap0, "mode", "tap")
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "owned by no uid" in res.stderr
    ip(ns, "link", "del", tap0)

    # The VM's own tap, left behind by a qemu nobody saw exit: replaced.
    ip(ns, "tuntap", "add", "dev", tap0, "mode", "tap", "user", str(uid))
    stale = link(ns, tap0)
    assert stale is not None
    env.vmadm("start", uuid, check=True)
    made = link(ns, tap0)
    assert made is not None
    assert made["ifindex"] != stale["ifindex"]
    assert made["master"] == "br-admin"
    assert tun_owner(ns, tap0) == uid
    env.vmadm("stop", uuid, "-F", check=True)
    assert link(ns, tap0) is None

    # A record from before derived names: its name is recomputed at start,
    # and a link of the old name (here the host's veth) is not touched.
    old_name = f"vm{uuid[:8]}n0"
    record = json.loads(vm_json(env, uuid).read_text())
    record["nics"][0]["ifname"] = old_name
    record["nics"][1]["ifname"] = "br-admin"
    vm_json(env, uuid).write_text(json.dumps(record))
    ip(ns, "link", "add", old_name, "type", "veth", "peer", "name", "peer-old")
    env.vmadm("start", uuid, check=True)
    assert [nic["ifname"] for nic in env.get(uuid)["nics"]] == [tap0, tap1]
    assert tun_owner(ns, tap0) == uid
    assert link(ns, old_name) is not None
    assert link(ns, "br-admin") is not None
    env.vmadm("stop", uuid, "-F", check=True)
    assert link(ns, old_name) is not None
    assert link(ns, tap0) is None


def test_only_taps_of_the_derived_form_are_removed() -> None:
    """Names and their uid (the daemon removes a tap by its recorded name,
    without the record's uid: the name must say it)."""
    assert net.tap_name(2_000_000_000, 0) == "vmtx2qxvkn0"
    assert net.tap_name(2**32 - 2, 9999) == "vmt1z141z2n9999"
    with pytest.raises(Exception, match="no tap name fits"):
        net.tap_name(2**32 - 2, 10000)
    for name in ("vmtx2qxvkn0", "vmt1z141z2n9999", "vmtnnnn1"):
        uid = net.uid_of_tap(name)
        assert uid is not None
        assert net.tap_name(uid, int(name.rpartition("n")[2])) == name
    for name in ("vm0b3f1c2en0", "eth0", "vmtx2qxvkn", "vmt0x2qxvkn0", "vmtX2QXVKn0",
                 "vmtx2qxvkn00", "vmtx2qxvkn٣", "vmtn0", "vmt-1n0"):  # fmt: skip
        assert net.uid_of_tap(name) is None, name


# -- findings 3 and 7: what a disk may be ------------------------------------------


def test_only_zone_disks_are_disks(env: Env) -> None:
    image = make_raw_image(env)
    digest = sha1(image)
    before = sorted(os.listdir(env.zones))
    # create: a path into the images dir (or anywhere) is no disk.
    for path in (str(image), str(image.parent / ".." / "images" / image.name)):
        res = env.vmadm("create", input=json.dumps(bios_payload(disks=[{"path": path}])))
        assert res.returncode == 1
        assert "is in the images dir" in res.stderr
        assert "image_uuid" in res.stderr
        assert len(res.stderr.splitlines()) == 1
    assert sorted(os.listdir(env.zones)) == before

    uuid = env.create(bios_payload(disks=[{"size": 1}]))
    zonepath = Path(env.zones) / uuid
    disk = zonepath / "disk0.qcow2"
    runtime = zonepath / "root" / "tmp"
    (zonepath / "qemu.log").write_text("x")
    (zonepath / "qemu.exit").write_text("0")
    (runtime / "planted").write_bytes(b"\0" * 4096)
    (zonepath / "disk7.qcow2").symlink_to(zonepath / "vm.json")
    saved = vm_json(env, uuid).read_bytes()
    refused = {
        str(image): "is in the images dir",
        str(zonepath / "vm.json"): "is not a disk",
        str(zonepath / ".vm.lock"): "is not a disk",
        str(zonepath / "qemu.log"): "is not a disk",
        str(zonepath / "qemu.exit"): "is not a disk",
        str(runtime / "planted"): "is outside the VM's zonepath",
        f"{zonepath}/root/tmp/../../vm.json": "is not a disk",
        f"{runtime}/../../disk0.qcow2/../vm.json": "is not a disk",
        str(zonepath / "disk9.qcow2"): "does not exist",
        str(zonepath / "disk7.qcow2"): "is not a regular file",
    }
    for path, why in refused.items():
        res = env.vmadm("update", uuid, "-f", "-", input=json.dumps({"disks": [{"path": path}]}))
        assert res.returncode == 1, path
        assert why in res.stderr, (path, res.stderr)
        assert vm_json(env, uuid).read_bytes() == saved, path
    # An unknown VM is that, not a disk that does not exist.
    unknown = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"
    res = env.vmadm("update", unknown, "-f", "-", input=json.dumps(
        {"disks": [{"path": f"{env.zones}/{unknown}/disk0.qcow2"}]}))  # fmt: skip
    assert res.returncode == 1
    assert "no such VM" in res.stderr
    # The VM's own disk, however spelled, is one; kept by its canonical path.
    spelled = f"{zonepath}//root/../disk0.qcow2"
    env.vmadm("update", uuid, "-f", "-", input=json.dumps({"disks": [{"path": spelled}]}),
              check=True)  # fmt: skip
    assert env.get(uuid)["disks"][0]["path"] == str(disk)

    # At start, whatever an older vmadm let into vm.json is refused again.
    good = json.loads(vm_json(env, uuid).read_text())["disks"]
    for path, why in (
        (str(image), "is in the images dir"),
        (str(zonepath / "vm.json"), "is not a disk"),
        (str(zonepath / "qemu.log"), "is not a disk"),
        (str(runtime / "planted"), "is outside the VM's zonepath"),
    ):
        edit_record(env, uuid, disks=[{"path": path, "image_format": "raw"}])
        res = env.vmadm("start", uuid)
        assert res.returncode == 1, path
        assert why in res.stderr, (path, res.stderr)
    assert sha1(image) == digest
    edit_record(env, uuid, disks=good)
    # The disk's name made a link to the zone's vm.json: not followed.
    disk.rename(zonepath / "disk0.aside")
    disk.symlink_to(zonepath / "vm.json")
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "is a symbolic link (not followed)" in res.stderr, res.stderr
    disk.unlink()
    (zonepath / "disk0.aside").rename(disk)
    # A hard link to the disk (one the VM's user made under root/, say): refused.
    os.link(disk, runtime / "hard")
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "has 2 hard links" in res.stderr
    (runtime / "hard").unlink()
    env.vmadm("start", uuid, check=True)
    env.vmadm("stop", uuid, "-F", check=True)
    assert sha1(image) == digest


def test_an_image_is_never_written(env: Env, guest: dict[str, str]) -> None:
    """A guest writing all over a disk made from an image changes its own
    copy-on-write disk, never the image: the image is opened read-only (the
    fd qemu holds) and attached read-only (its block nodes)."""
    image = make_raw_image(env)
    digest = sha1(image)
    env.start_daemon()
    uuid = env.run_vm(guest_payload(guest, disks=[{"image_uuid": IMAGE}]), ready=True)
    pid = env.pid(uuid)
    assert pid is not None
    held = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            held[os.readlink(f"/proc/{pid}/fd/{fd}")] = fd
    assert str(image) in held, "qemu reaches the image through the fd it was given"
    with open(f"/proc/{pid}/fdinfo/{held[str(image)]}") as f:
        flags = int(next(x for x in f if x.startswith("flags:")).split()[1], 8)
    assert flags & os.O_ACCMODE == os.O_RDONLY
    status, body = qmp(env, uuid, {"execute": "query-named-block-nodes"})
    assert status == 200, body
    assert isinstance(body, dict)
    nodes = {n["node-name"]: n for n in body["return"]}
    assert nodes["disk0-image"]["ro"] is True
    assert nodes["disk0-image-file"]["ro"] is True
    assert nodes["disk0"]["ro"] is False

    async def overwrite() -> None:
        async with SerialClient(env, uuid) as console:
            # The marker is computed, so the echo of the typed line cannot match.
            await console.type(
                b"dd if=/dev/urandom of=/dev/vda bs=64k count=64 conv=fsync && sync"
                b" && echo wrote-$((40+2))\n"
            )
            await console.until(b"wrote-42", timeout=60)

    asyncio.run(overwrite())
    env.vmadm("stop", uuid, "-F", check=True)
    assert sha1(image) == digest, "the guest changed the image"
    overlay = Path(env.get(uuid)["disks"][0]["path"])
    assert overlay.stat().st_size > 4 << 20, "the writes landed in the VM's own disk"

    # The image named as the disk itself (as an older vmadm let one be):
    # the start is refused, the image untouched.
    edit_record(env, uuid, disks=[{"path": str(image), "image_format": "raw"}])
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "is in the images dir" in res.stderr
    assert sha1(image) == digest


def test_a_disk_given_again_by_its_path_keeps_its_image(env: Env) -> None:
    """`vmadm update` with the disks (by path, as `vmadm get` shows them, an
    image_uuid being refused beside a path) keeps each disk's image: without
    it a disk made over an image would boot with no backing."""
    make_raw_image(env)
    uuid = env.create(bios_payload(disks=[{"image_uuid": IMAGE}]))
    disk = env.get(uuid)["disks"][0]
    assert disk["image_uuid"] == IMAGE
    payload = {"disks": [{"path": disk["path"], "model": "ide", "boot": True}]}
    env.vmadm("update", uuid, input=json.dumps(payload), check=True)
    after = env.get(uuid)["disks"][0]
    assert after["model"] == "ide"
    assert (after["image_uuid"], after["image_format"]) == (IMAGE, disk["image_format"])


def test_a_zone_closing_its_disks_in_a_loop_costs_no_rescan(env: Env) -> None:
    """The second review: the VM's user opens and closes its own disk by path
    as fast as it can; each close was an inotify event on the zonepath,
    overflowing the queue and forcing a rescan of every VM each time."""
    uuid = env.create(bios_payload(disks=[{"size": 1}, {"size": 1}]))
    disks = [d["path"] for d in env.get(uuid)["disks"]]
    env.start_daemon()
    for _ in range(50000):  # two in turn: the kernel merges only repeats of one
        for disk in disks:
            os.close(os.open(disk, os.O_WRONLY))
    assert env.api("GET", "/ping")[0] == 200
    assert "inotify queue overflowed" not in env.daemon_log(tail=None)
