"""Day-two changes (issue #32): disks and nics added, grown and removed while
the VM runs, on real qemu (TCG) with the busybox test guest, which answers
on its serial console; refusals; what is pending and the next boot."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.rawqmp import RawQmp, raw_add
from vmadmd.errors import InvalidParameter, WrongState
from vmadmd.vm.devices import LIVE_KEY, check_edits, live_at_boot, pending_of
from vmadmd.vm.disks import Disks
from vmadmd.vm.net import tap_name

from .conftest import Env, RunVm, bios_payload, guest_payload
from .test_operator import SerialClient


def update(env: Env, uuid: str, payload: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return env.vmadm("update", uuid, "-f", "-", input=json.dumps(payload))


def vm_json(env: Env, uuid: str) -> bytes:
    return (Path(env.zones) / uuid / "vm.json").read_bytes()


def in_guest(
    env: Env, uuid: str, command: str, marker: str, timeout: float = 30, *, ready: bool = True
) -> str:
    """Run ``command`` in the guest's shell (its serial console); what it
    printed up to ``marker`` (the guest prints ``marker-42`` when done)."""

    async def run() -> bytes:
        async with SerialClient(env, uuid) as console:
            if ready:  # else: a new daemon's console history may not have it
                await console.until(b"VMTEST-READY")
            start = len(console.seen)
            await console.type(
                f"echo {marker}-$((1+1)); {command}; echo {marker}-$((6*7))\n".encode()
            )
            await console.until(f"{marker}-42".encode(), timeout)
            return console.seen[start:]

    seen = asyncio.run(run()).decode(errors="replace")
    return seen[seen.find(f"{marker}-2") : seen.rfind(f"{marker}-42")]


def wait_in_guest(env: Env, uuid: str, condition: str, marker: str, *, ready: bool = True) -> None:
    """Until the shell test ``condition`` holds in the guest (20 s at most)."""
    out = in_guest(
        env, uuid,
        f"i=0; until {condition}; do sleep 0.1; i=$((i+1)); [ $i -gt 200 ] && break; done; "
        f"{condition} && echo ok-$((1+2))",
        marker, ready=ready,
    )  # fmt: skip
    assert "ok-3" in out, out


def test_a_running_guest_sees_a_disk_come_grow_and_go(env: Env, running_vm: RunVm,
                                                        guest: dict[str, str]) -> None:  # fmt: skip
    uuid = running_vm(guest_payload(guest, disks=[{"size": 32}]), ready=True)
    wait_in_guest(env, uuid, "[ -e /sys/block/vda ]", "first")
    res = update(env, uuid, {"add_disks": [{"size": 64}]})
    assert res.returncode == 0, res.stderr
    assert res.stderr.startswith(f"Successfully updated VM {uuid}"), res.stderr
    assert "warning" not in res.stderr, res.stderr
    vm = env.get(uuid)
    assert [d["size"] for d in vm["disks"]] == [32, 64]
    new = vm["disks"][1]["path"]
    assert new == f"{env.zones}/{uuid}/disk1.qcow2"
    assert "pending" not in vm
    # 64 MiB = 131072 sectors of 512 bytes, without a reboot.
    wait_in_guest(env, uuid, '[ "$(cat /sys/block/vdb/size)" = 131072 ]', "added")
    # Grown: qemu grows the file and the guest sees the new size at once.
    res = update(env, uuid, {"update_disks": [{"path": new, "size": 128}]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    wait_in_guest(env, uuid, '[ "$(cat /sys/block/vdb/size)" = 262144 ]', "grown")
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", new],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(out)["virtual-size"] == 128 << 20
    # Removed (file deleted): the guest lets it go, qemu's nodes and fds go.
    res = update(env, uuid, {"remove_disks": [{"path": new, "delete": True}]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    wait_in_guest(env, uuid, "[ ! -e /sys/block/vdb ]", "gone")
    assert not os.path.exists(new)
    vm = env.get(uuid)
    assert len(vm["disks"]) == 1
    assert "pending" not in vm
    block = env.vmadm("qmp", uuid, '{"execute": "query-named-block-nodes"}', check=True).stdout
    assert "hp-disk1" not in block, block
    fdsets = env.vmadm("qmp", uuid, '{"execute": "query-fdsets"}', check=True).stdout
    assert "hp-disk1" not in fdsets, fdsets
    # Kept by default: removed from the VM, the file stays in the zonepath.
    res = update(env, uuid, {"add_disks": [{"size": 16}]})
    assert res.returncode == 0, res.stderr
    kept = env.get(uuid)["disks"][1]["path"]
    wait_in_guest(env, uuid, "[ -e /sys/block/vdb ]", "again")
    assert update(env, uuid, {"remove_disks": [kept]}).returncode == 0
    wait_in_guest(env, uuid, "[ ! -e /sys/block/vdb ]", "again-gone")
    assert os.path.exists(kept)


def test_refusals_leave_vm_json_unchanged(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm(bios_payload(disks=[{"size": 64, "boot": True}, {"size": 32}]))
    disks = env.get(uuid)["disks"]
    boot, data = disks[0]["path"], disks[1]["path"]
    before = vm_json(env, uuid)
    other = env.create(bios_payload(disks=[{"size": 16}]))
    other_disk = env.get(other)["disks"][0]["path"]
    cases: list[tuple[dict[str, Any], str]] = [
        ({"update_disks": [{"path": data, "size": 16}]}, "never shrunk"),
        ({"add_disks": [{"path": "/etc/passwd"}]}, "outside the VM's zonepath"),
        ({"add_disks": [{"path": other_disk}]}, "outside the VM's zonepath"),
        ({"add_disks": [{"path": f"{env.zones}/{uuid}/vm.json"}]}, "is not a disk"),
        ({"update_disks": [{"path": "/etc/passwd", "size": 100}]}, "outside the VM's zonepath"),
        ({"remove_disks": [boot]}, "boot disk of the running VM"),
        ({"remove_disks": ["/nonexistent-zones/nope/disk0.qcow2"]}, "outside the VM's zonepath"),
        ({"remove_nics": ["02:08:20:00:00:09"]}, "not a nic of this VM"),
        ({"add_disks": [{"size": 0}]}, "between 1 and"),
        ({"add_disks": [{"size": 8, "model": "floppy"}]}, "model must be one of"),
        ({"add_nics": [{"ifname": "eth0"}]}, "ifname cannot be given"),
        ({"add_disks": {"size": 8}}, "must be a list"),
    ]
    for payload, words in cases:
        res = update(env, uuid, payload)
        assert res.returncode == 1, (payload, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (payload, res.stderr)
        assert words in lines[0], (payload, res.stderr)
        assert vm_json(env, uuid) == before, payload
    # The API refuses the same, as a 4xx with the one error shape.
    status, body = env.api("POST", f"/vm/{uuid}", action="apply_devices", unplug_timeout="-1")
    assert status == 400, body
    assert body["error"]["code"], body
    assert sorted(os.listdir(Path(env.zones) / uuid)) == sorted(
        ["disk0.qcow2", "disk1.qcow2", "vm.json", ".vm.lock", "root", "qemu.log", "qemu.exit"]
    )


def test_a_guest_that_keeps_a_disk_and_what_waits_for_the_next_boot(
    env: Env, running_vm: RunVm
) -> None:
    """SeaBIOS alone answers no ACPI eject: the disk is never let go.  vm.json
    says it is removed; the running VM still has it; both say so, and the
    next boot applies it, with the model change that could not be live."""
    uuid = running_vm(bios_payload(disks=[{"size": 16}]))
    res = update(env, uuid, {"add_disks": [{"size": 8}]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    new = env.get(uuid)["disks"][1]["path"]
    assert "hp-disk1.qcow2" in env.vmadm("qmp", uuid, '{"execute": "query-block"}').stdout
    t0 = time.monotonic()
    res = update(env, uuid, {"remove_disks": [new],
                             "update_disks": [{"path": env.get(uuid)["disks"][0]["path"],
                                               "model": "ide"}]})  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 >= 9, "the deadline (10 s) was waited for"
    lines = res.stderr.splitlines()
    assert lines[0] == f"Successfully updated VM {uuid}"
    assert any("remove_disk" in ln and "did not let disk" in ln and "next boot" in ln
               for ln in lines), res.stderr  # fmt: skip
    assert any("update_disk" in ln and "next boot" in ln for ln in lines), res.stderr
    vm = env.get(uuid)
    assert [d["path"] for d in vm["disks"]] == [f"{env.zones}/{uuid}/disk0.qcow2"]
    assert vm["disks"][0]["model"] == "ide"
    assert {(p["change"], p.get("path")) for p in vm["pending"]} == {
        ("remove_disk", new), ("update_disk", vm["disks"][0]["path"]),
    }  # fmt: skip
    # qemu still has it, as vm.json's live part says.
    assert "hp-disk1.qcow2" in env.vmadm("qmp", uuid, '{"execute": "query-block"}').stdout
    # The next boot applies what was pending, and clears it.
    env.vmadm("stop", uuid, "-F", check=True)
    assert len(env.get(uuid)["pending"]) == 2, "a stopped VM still shows its next boot's changes"
    # A stopped VM's disk is grown at once (qemu-img), its guest sees it at boot.
    disk0 = vm["disks"][0]["path"]
    res = update(env, uuid, {"update_disks": [{"path": disk0, "size": 24}]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    assert {"change": "resize_disk", "path": disk0, "size": 24} in env.get(uuid)["pending"]
    info = subprocess.run(["qemu-img", "info", "-U", "--output=json", disk0],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(info)["virtual-size"] == 24 << 20
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    vm = env.get(uuid)
    assert "pending" not in vm, vm
    block = env.vmadm("qmp", uuid, '{"execute": "query-block"}', check=True).stdout
    assert "hp-disk1" not in block, block
    pid = env.pid(uuid)
    assert pid is not None
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    assert b"ide-hd,drive=disk0,id=disk0" in argv
    # A disk over an image, hot-plugged: its image is its read-only backing.
    images = Path(env.zones) / "images"
    images.mkdir(exist_ok=True)
    image_uuid = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b"
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(images / f"{image_uuid}.raw"),
                    "4M"], check=True)  # fmt: skip
    res = update(env, uuid, {"add_disks": [{"image_uuid": image_uuid, "size": 8}]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    nodes = json.loads(
        env.vmadm("qmp", uuid, '{"execute": "query-named-block-nodes"}', check=True).stdout
    )
    by_name = {n["node-name"]: n for n in nodes}
    node = "hp-" + os.path.basename(env.get(uuid)["disks"][1]["path"])
    assert node == "hp-disk2.qcow2", "disk1.qcow2 was kept: the next number is taken"
    top = by_name[node]
    assert top["backing_file_depth"] == 1
    assert by_name[f"{node}-image"]["ro"] is True
    assert top["image"]["virtual-size"] == 8 << 20


def test_a_change_the_daemon_missed_is_pending_until_applied(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    """A daemon that is down (or killed) between vm.json and qemu: the change
    is saved, said to be pending, and applied by the next apply_devices."""
    uuid = running_vm(guest_payload(guest), ready=True)
    env.stop_daemon()
    res = update(env, uuid, {"add_disks": [{"size": 16}], "update_disks": []})
    assert res.returncode == 0, res.stderr
    assert "not applied to the running VM" in res.stderr, res.stderr
    path = env.get(uuid)["disks"][0]["path"]
    assert env.get(uuid)["pending"] == [{"change": "add_disk", "path": path}]
    env.start_daemon()
    env.wait_qmp(uuid)
    assert env.get(uuid)["pending"] == [{"change": "add_disk", "path": path}]
    status, body = env.api("POST", f"/vm/{uuid}", action="apply_devices")
    assert status == 200, body
    assert body["applied"] == [{"change": "add_disk", "path": path}]
    assert body["pending"] == []
    wait_in_guest(env, uuid, "[ -e /sys/block/vda ]", "late", ready=False)
    assert "pending" not in env.get(uuid)


# -- nics ---------------------------------------------------------------------------


@contextlib.contextmanager
def bridge(env: Env) -> Iterator[str]:
    """A network namespace with bridge br-admin (nic tag admin), where vmadm
    and vmadmd run; removed with everything in it."""
    ns = f"vmd2-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (["link", "add", "br-admin", "type", "bridge"],
                    ["link", "set", "br-admin", "up"]):  # fmt: skip
            subprocess.run(["ip", "netns", "exec", ns, "ip", *cmd], check=True)
        env.prefix = ["nsenter", f"--net=/run/netns/{ns}"]
        env.extra_env["VMADM_NIC_TAGS"] = "admin=br-admin"
        yield ns
    finally:
        env.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def links(ns: str) -> dict[str, Any]:
    out = subprocess.run(["ip", "netns", "exec", ns, "ip", "-j", "-d", "link", "show"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return {link["ifname"]: link for link in json.loads(out)}


def test_a_nic_comes_on_its_bridge_and_in_the_guest_and_goes(
    env: Env, guest: dict[str, str]
) -> None:
    with bridge(env) as ns:
        env.start_daemon()
        uuid = env.run_vm(guest_payload(guest), ready=True)
        res = update(env, uuid, {"add_nics": [{"nic_tag": "admin", "model": "virtio",
                                               "ip": "192.0.2.10", "netmask": "255.255.255.0",
                                               "primary": True}]})  # fmt: skip
        assert res.returncode == 0, res.stderr
        assert "warning" not in res.stderr, res.stderr
        nic = env.get(uuid)["nics"][0]
        tap = nic["ifname"]
        link = links(ns)[tap]
        assert link["master"] == "br-admin"
        assert link["linkinfo"]["info_data"]["user"] == env.get(uuid)["zone_uid"]
        wait_in_guest(env, uuid, "[ -e /sys/class/net/eth0 ]", "nic")
        out = in_guest(env, uuid, "cat /sys/class/net/eth0/address", "mac")
        assert nic["mac"] in out, out
        # ip and the like are vm.json's alone (sdc:nics follows); the model waits.
        res = update(env, uuid, {"update_nics": [{"mac": nic["mac"], "ip": "192.0.2.11",
                                                  "model": "e1000"}]})  # fmt: skip
        assert res.returncode == 0, res.stderr
        vm = env.get(uuid)
        assert vm["nics"][0]["ip"] == "192.0.2.11"
        assert vm["nics"][0]["ifname"] == tap
        assert vm["pending"] == [{"change": "update_nic", "mac": nic["mac"],
                                  "properties": ["model"]}]  # fmt: skip
        assert "update_nic" in res.stderr
        assert "next boot" in res.stderr
        # Removed: unplugged from the guest, the tap gone from the bridge.
        res = update(env, uuid, {"remove_nics": [nic["mac"]]})
        assert res.returncode == 0, res.stderr
        wait_in_guest(env, uuid, "[ ! -e /sys/class/net/eth0 ]", "nic-gone")
        env.wait_for(lambda: tap not in links(ns), what="tap removed")
        assert "pending" not in env.get(uuid)


def test_a_hot_plug_qemu_made_before_the_daemon_recorded_it_is_read_back(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    """The daemon killed after qemu plugged a disk and before vm.json's live
    part said so: the next daemon reads qemu's devices back at start-up, and
    nothing is pending (nor plugged twice).  A second monitor of the VM's
    own stands for the killed daemon's last commands."""
    payload = guest_payload(guest)
    payload["qemu_extra_opts"] += " -qmp unix:raw.qmp,server=on,wait=off"
    uuid = running_vm(payload, ready=True)
    env.stop_daemon()
    res = update(env, uuid, {"add_disks": [{"size": 16}]})
    assert res.returncode == 0, res.stderr
    path = env.get(uuid)["disks"][0]["path"]
    assert env.get(uuid)["pending"] == [{"change": "add_disk", "path": path}]
    qmp = RawQmp(str(env.runtime(uuid)), "raw.qmp")
    raw_add(qmp, path, "hp-disk0.qcow2")  # what the killed daemon had sent
    env.start_daemon()
    env.wait_for(lambda: "pending" not in env.get(uuid), timeout=15, what="read back")
    status, body = env.api("POST", f"/vm/{uuid}", action="apply_devices")
    assert status == 200, body
    assert body["applied"] == []
    assert body["failed"] == []
    wait_in_guest(env, uuid, "[ -e /sys/block/vda ]", "read-back", ready=False)
    # Removed through the daemon: the fd set the other monitor made goes too.
    res = update(env, uuid, {"remove_disks": [path]})
    assert res.returncode == 0, res.stderr
    assert "warning" not in res.stderr, res.stderr
    assert qmp.run("query-fdsets") == []


# -- the rules alone (no qemu) ----------------------------------------------------------

ZP = "/nonexistent-zones/6f1c2c3e-0b6d-4d5e-9a1b-2c3d4e5f6a7b"
UID = 2_000_000_007


def record(**extra: Any) -> dict[str, Any]:
    vm: dict[str, Any] = {
        "uuid": ZP.rsplit("/", 1)[1], "zone_uid": UID,
        "disks": [{"path": f"{ZP}/disk0.qcow2", "size": 64, "model": "virtio", "boot": True},
                  {"path": f"{ZP}/disk1.qcow2", "size": 32, "model": "virtio", "boot": False}],
        "nics": [{"mac": "02:08:20:00:00:01", "nic_tag": "admin", "netdev": "tap",
                  "ifname": tap_name(UID, 0), "model": "virtio"}],
    }  # fmt: skip
    vm.update(extra)
    return vm


def edit(vm: dict[str, Any], running: bool = False, **edits: Any) -> Any:
    images = Disks("/nonexistent-zones/images")
    return check_edits(vm, edits, zonepath=ZP, disks=images, running=running,
                       sizes=lambda path, fmt: 48)  # fmt: skip


def test_pending_is_the_difference_between_vm_json_and_what_qemu_has() -> None:
    vm = record()
    assert pending_of(vm) == [], "never booted: nothing to compare with"
    vm[LIVE_KEY] = live_at_boot(vm)
    assert pending_of(vm) == []
    vm["disks"][1].update(size=40, model="ide")
    vm["disks"].append({"path": f"{ZP}/disk2.qcow2", "size": 8})
    vm["nics"][0]["model"] = "e1000"
    vm["nics"].append({"mac": "02:08:20:00:00:02"})
    vm[LIVE_KEY]["disks"][0]["delete"] = True
    del vm["disks"][0]
    assert pending_of(vm) == [
        {"change": "update_disk", "path": f"{ZP}/disk1.qcow2", "properties": ["model"]},
        {"change": "resize_disk", "path": f"{ZP}/disk1.qcow2", "size": 40},
        {"change": "add_disk", "path": f"{ZP}/disk2.qcow2"},
        {"change": "remove_disk", "path": f"{ZP}/disk0.qcow2", "delete": True},
        {"change": "update_nic", "mac": "02:08:20:00:00:01", "properties": ["model"]},
        {"change": "add_nic", "mac": "02:08:20:00:00:02"},
    ]


def test_checked_edits_follow_create_and_smartos_rules() -> None:
    vm = record()
    vm[LIVE_KEY] = live_at_boot(vm)
    # A nic whose unplug did not happen keeps its tap name: a new one gets another.
    vm["nics"] = []
    out = edit(vm, running=True, add_nics=[{"nic_tag": "admin", "mac": "02:08:20:00:00:09"}])
    assert out.nics[0]["ifname"] == tap_name(UID, 1)
    assert out.nics[0]["netdev"] == "tap"
    with pytest.raises(InvalidParameter, match="taken by another nic"):
        edit(vm, running=True, add_nics=[{"mac": "02:08:20:00:00:01"}])
    vm = record()
    # SmartOS's remove_disks: paths; ours also {"path", "delete"}.
    out = edit(vm, remove_disks=[f"{ZP}/disk1.qcow2"])
    assert [d["path"] for d in out.disks] == [f"{ZP}/disk0.qcow2"]
    assert out.delete == []
    out = edit(vm, remove_disks=[{"path": f"{ZP}/disk1.qcow2", "delete": True}])
    assert out.delete == [f"{ZP}/disk1.qcow2"]
    # The boot disk goes only from a stopped VM.
    assert edit(vm, remove_disks=[f"{ZP}/disk0.qcow2"]).disks[0]["path"].endswith("disk1.qcow2")
    vm[LIVE_KEY] = live_at_boot(vm)
    with pytest.raises(WrongState, match="boot disk of the running VM"):
        edit(vm, running=True, remove_disks=[f"{ZP}/disk0.qcow2"])
    # Never shrunk: not below vm.json's size, nor below the file's (48 here).
    with pytest.raises(InvalidParameter, match="never shrunk"):
        edit(vm, update_disks=[{"path": f"{ZP}/disk1.qcow2", "size": 40}])
    out = edit(vm, update_disks=[{"path": f"{ZP}/disk1.qcow2", "size": 50, "boot": False}])
    assert out.grow == {f"{ZP}/disk1.qcow2": 50}
    with pytest.raises(InvalidParameter, match="only one disk"):
        edit(vm, update_disks=[{"path": f"{ZP}/disk1.qcow2", "boot": True}])
    with pytest.raises(InvalidParameter, match="cannot be updated"):
        edit(vm, update_disks=[{"path": f"{ZP}/disk1.qcow2", "image_uuid": ZP[-36:]}])
    # update_nics: keyed by mac; primary moves; the tap name stays.
    vm["nics"].append({"mac": "02:08:20:00:00:02", "netdev": "user", "primary": True})
    out = edit(vm, update_nics=[{"mac": "02:08:20:00:00:01", "primary": True, "ip": "10.0.0.2"}])
    assert out.nics[0]["ifname"] == tap_name(UID, 0)
    assert out.nics[0]["ip"] == "10.0.0.2"
    assert [n.get("primary") for n in out.nics] == [True, False]
    with pytest.raises(InvalidParameter, match="unknown property 'add_cdroms'"):
        edit(vm, add_cdroms=[])
