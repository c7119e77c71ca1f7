"""The VM layer and the daemon-less vmadm commands, against real qemu."""

from __future__ import annotations

import concurrent.futures
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmadmd.errors import InvalidParameter, InvalidUuid, VmBroken
from vmadmd.vm import props, store
from vmadmd.vm.qemu import DiskFds, build_argv
from vmadmd.vm.store import Store, VmPaths

from .conftest import Env, bios_payload, guest_payload

U = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"


# -- pure parts --------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "..",
        "../etc",
        "/etc/passwd",
        "0B3F1C2E-9A4D-4F5E-8B6A-1C2D3E4F5A6B",
        "0b3f1c2e9a4d4f5e8b6a1c2d3e4f5a6b",
        U + "\0",
        U + "/..",
        U + "\n",  # `$` in a plain match accepts a trailing newline
        "\n" + U,
        "%2e%2e",
        "x" * 5000,
    ],
)
def test_uuid_validation_rejects(bad: str) -> None:
    with pytest.raises(InvalidUuid):
        store.validate_uuid(bad)
    assert not store.is_uuid(bad)
    with pytest.raises(InvalidUuid):
        Store("/nonexistent").paths(bad)


def test_props_validation() -> None:
    vm = props.for_create({"alias": "a", "disks": [{"size": 10}], "nics": [{}]})
    assert vm["ram"] == 256
    assert vm["vcpus"] == 1
    assert vm["vnc_port"] == 0
    assert vm["disks"][0] == {"size": 10, "model": "virtio", "boot": False}
    assert vm["nics"][0]["mac"].startswith("02:08:20:")
    for bad in (
        {"ram": "lots"},
        {"ram": True},
        {"vcpus": 0},
        {"autoboot": "yes"},
        {"frobnicate": 1},
        {"state": "running"},
        {"vnc_password": "123456789"},
        {"vnc_port": 70000},
        {"disks": [{"model": "virtio"}]},
        {"disks": [{"size": 10, "model": "floppy"}]},
        {"nics": [{"netdev": "tap", "ifname": "tap0"}]},  # tap names are derived
        {"nics": [{"nic_tag": "admin", "ifname": "eth0"}]},
        {"nics": [{"mac": "zz:zz"}]},
        {"brand": "bhyve"},
        {"cpu_type": "host; rm -rf /"},
        {"customer_metadata": {"a": 1}},
    ):
        with pytest.raises(InvalidParameter):
            props.for_create(bad)


def test_build_argv() -> None:
    paths = VmPaths("/srv/vms/" + U)
    vm = props.for_create(
        {
            "uuid": U,
            "alias": "web",
            "ram": 512,
            "vcpus": 2,
            "vnc_password": "secret",
            "disks": [{"path": "/d/a.img", "model": "scsi", "boot": True, "image_format": "raw"}],
            "nics": [{"model": "e1000", "mac": "02:08:20:00:00:01", "netdev": "tap"}],
            "qemu_extra_opts": "-kernel /k -append 'console=ttyS0 quiet'",
        }
    )
    argv = build_argv(vm, paths, "qemu-system-x86_64", "tcg", disk_fds=[DiskFds(7)], tap_fds={0: 9})
    joined = " ".join(argv)
    assert argv[argv.index("-uuid") + 1] == U
    assert "-machine pc,accel=tcg" in joined
    assert "-m 512" in joined
    assert "-smp 2" in joined
    assert "-vnc unix:vm.vnc,password=on" in joined
    assert "-qmp unix:vm.qmp,server=on,wait=off" in joined
    # In the foreground (the sandbox kills -daemonize's fork), no pidfile
    # (the launcher writes it), the sandbox with every group denied.
    assert "-pidfile" not in argv
    assert "-daemonize" not in argv
    assert argv[argv.index("-sandbox") + 1] == (
        "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
    )
    assert "virtio-scsi-pci,id=scsi0" in joined
    assert "scsi-hd,drive=disk0,bus=scsi0.0,id=disk0,bootindex=0" in joined
    # The disk is the fd passed, never its path; a raw disk has no backing.
    assert "/d/a.img" not in joined
    assert "fd=7,set=1,opaque=disk0" in joined
    assert '{"driver":"raw","node-name":"disk0","file":"disk0-file"}' in argv
    assert "tap,id=net0,fd=9" in joined  # the tap opened by the launcher
    assert "e1000,netdev=net0,id=net0,mac=02:08:20:00:00:01" in joined
    assert argv[-4:] == ["-kernel", "/k", "-append", "console=ttyS0 quiet"]
    no_vnc = build_argv(
        {**vm, "vnc_port": -1}, paths, "q", "kvm", disk_fds=[DiskFds(7)], tap_fds={0: 9}
    )
    assert "-vnc" not in no_vnc
    assert "accel=kvm" in " ".join(no_vnc)


def test_atomic_write_keeps_old_file_on_disk_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Store(str(tmp_path))
    s.create(U, {"uuid": U, "alias": "old"})
    before = Path(s.paths(U).vm_json).read_bytes()

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space left"):
        s.update(U, lambda r: r.update(alias="new"))
    monkeypatch.undo()
    assert Path(s.paths(U).vm_json).read_bytes() == before
    assert sorted(os.listdir(s.paths(U).zonepath)) == [".vm.lock", "root", "vm.json"]


def test_corrupt_and_unknown_version_are_reported(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    s.create(U, {"uuid": U})
    path = Path(s.paths(U).vm_json)
    path.write_text('{"uuid": "' + U + '", "format_ver')
    with pytest.raises(VmBroken, match="corrupt"):
        s.load(U)
    path.write_text(json.dumps({"uuid": U, "format_version": 99}))
    with pytest.raises(VmBroken, match="format version 99"):
        s.load(U)


# -- vmadm against real qemu --------------------------------------------------


def test_lifecycle_with_real_guest(env: Env, guest: dict[str, str]) -> None:
    uuid = env.create(guest_payload(guest, disks=[{"size": 16}], nics=[{}]))
    vm = env.get(uuid)
    assert vm["state"] == "stopped"
    assert vm["zone_state"] == "installed"
    assert vm["zonepath"] == os.path.join(env.zones, uuid)
    assert os.path.exists(vm["disks"][0]["path"])
    assert vm["disks"][0]["image_format"] == "qcow2"
    assert "create_timestamp" in vm
    assert "pid" not in vm
    # The zonepath is deeper than a unix socket address can be.
    assert len(os.path.join(env.zones, uuid, "root/tmp/vm.qmp")) > 108

    assert env.vmadm("start", uuid).returncode == 0
    env.wait_console(uuid)
    vm = env.get(uuid)
    assert vm["state"] == "running"
    assert vm["zone_state"] == "running"
    assert vm["pid"] == env.pid(uuid)
    assert "boot_timestamp" in vm
    assert vm["autoboot"] is True

    listing = env.vmadm("list", "-p", "-o", "uuid,state,alias", check=True).stdout.strip()
    assert listing == f"{uuid}:running:guest"

    res = env.vmadm("stop", uuid, "-F")
    assert res.returncode == 0, res.stderr
    vm = env.get(uuid)
    assert vm["state"] == "stopped"
    assert vm["autoboot"] is False
    assert vm["last_exit"]["reason"] == "stop"
    assert vm["last_exit"]["stage"] in ("sigterm", "sigkill")
    assert env.pid(uuid) is None

    assert env.vmadm("delete", uuid).returncode == 0
    assert not os.path.exists(os.path.join(env.zones, uuid))
    assert env.vmadm("list", "-H").stdout.strip() == ""


def test_qemu_outlives_vmadm(env: Env) -> None:
    uuid = env.create(bios_payload())
    res = env.vmadm("start", uuid)
    assert res.returncode == 0, res.stderr
    pid = env.pid(uuid)
    assert pid is not None
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ppid, pgrp, sid, tty_nr = (int(x) for x in fields[1:5])
    # -daemonize: a session of its own (so a closing terminal or a killed
    # process group of the caller never reaches it), no controlling terminal,
    # and re-parented away from the vmadm process, which has exited.
    assert sid != os.getsid(0)
    assert pgrp != os.getpgrp()
    assert tty_nr == 0
    assert ppid != os.getpid()
    os.killpg(os.getpgrp(), 0)  # our group is alive and qemu is not in it
    assert env.get(uuid)["state"] == "running"


def test_stale_pid_reused_pid_and_zombie_never_look_running(env: Env) -> None:
    uuid = env.create(bios_payload())
    pidfile = env.runtime(uuid) / "vm.pid"
    # A stale pid file naming a pid that does not exist.
    pidfile.write_text("4194000\n")
    assert env.get(uuid)["state"] == "stopped"
    # A reused pid: a live process that is not this VM's qemu.
    other = subprocess.Popen(["sleep", "60"])
    try:
        pidfile.write_text(f"{other.pid}\n")
        assert env.get(uuid)["state"] == "stopped"
        res = env.vmadm("stop", uuid, "-F")
        assert res.returncode == 1
        assert "not running" in res.stderr
        assert other.poll() is None, "vmadm must never signal a pid that is not its qemu"
    finally:
        other.kill()
        other.wait()
    # A zombie whose command line carried the uuid.
    zombie = subprocess.Popen([sys.executable, "-c", "pass", "-uuid", uuid])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
    try:
        pidfile.write_text(f"{zombie.pid}\n")
        assert env.get(uuid)["state"] == "stopped"
    finally:
        zombie.wait()


def _snapshot(root: str) -> dict[str, bytes]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name == ".vm.lock":
                continue
            p = os.path.join(dirpath, name)
            with open(p, "rb") as f:
                out[p] = f.read()
    return out


def test_bad_input_one_line_exit_1_nothing_changed(env: Env) -> None:
    uuid = env.create(bios_payload())
    before = _snapshot(env.zones)
    cases = [
        (["create"], "{not json"),
        (["create"], '{"alias": "x", "frobnicate": 1}'),
        (["create"], '{"ram": "lots"}'),
        (["create"], "[1, 2]"),
        (["create"], json.dumps({"disks": [{"path": "/nonexistent/disk.img"}]})),
        (["get", "../etc"], None),
        (["get", "0B3F1C2E-9A4D-4F5E-8B6A-1C2D3E4F5A6B"], None),
        (["get", U], None),
        (["start", U], None),
        (["update", uuid, "ram=lots"], None),
        (["update", uuid, "frobnicate=1"], None),
        (["update", uuid, "uuid=" + U], None),
        (["update", uuid, "noequals"], None),
        (["delete", U], None),
        (["stop", "-F", uuid], None),
        (["frobnicate"], None),
        (["list", "-o", ","], None),
    ]
    for args, stdin in cases:
        res = env.vmadm(*args, input=stdin)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, (args, res.stderr)
        assert lines[0].startswith("vmadm: "), (args, res.stderr)
        assert res.stdout == "", (args, res.stdout)
    assert _snapshot(env.zones) == before
    # Starting a running VM is refused too.
    assert env.vmadm("start", uuid).returncode == 0
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "already running" in res.stderr


def test_concurrent_updates_lose_no_write(env: Env) -> None:
    uuid = env.create(bios_payload())
    n = 16

    def one(i: int) -> int:
        payload = json.dumps({"set_customer_metadata": {f"key{i}": str(i)}})
        return env.vmadm("update", uuid, "-f", "-", input=payload).returncode

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        assert list(pool.map(one, range(n))) == [0] * n
    meta = env.get(uuid)["customer_metadata"]
    assert meta == {f"key{i}": str(i) for i in range(n)}


def test_update_and_list_formats(env: Env) -> None:
    a = env.create(bios_payload(alias="alpha"))
    b = env.create(bios_payload(alias="beta", ram=96))
    assert env.vmadm("update", a, "ram=80", "autoboot=true", "alias=alpha2").returncode == 0
    vm = env.get(a)
    assert (vm["ram"], vm["autoboot"], vm["alias"]) == (80, True, "alpha2")
    out = env.vmadm("list", check=True).stdout.splitlines()
    assert out[0].split() == ["UUID", "TYPE", "RAM", "STATE", "ALIAS"]
    rows = {line.split()[0]: line.split() for line in out[1:]}
    assert rows[a] == [a, "KVM", "80", "stopped", "alpha2"]
    assert rows[b] == [b, "KVM", "96", "stopped", "beta"]
    assert len(env.vmadm("list", "-H", check=True).stdout.splitlines()) == 2


def test_start_failure_reports_qemu_reason(env: Env, tmp_path: Path) -> None:
    uuid = env.create(bios_payload(disks=[{"size": 1}]))
    disk = Path(env.get(uuid)["disks"][0]["path"])
    aside = tmp_path / "aside.qcow2"
    disk.rename(aside)
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "missing" in res.stderr
    env.vmadm("update", uuid, "qemu_extra_opts=-no-such-option", check=True)
    aside.rename(disk)
    res = env.vmadm("start", uuid)
    assert res.returncode == 1
    assert "no-such-option" in res.stderr
    assert env.get(uuid)["state"] == "stopped"


def test_option_values_are_comma_escaped() -> None:
    paths = VmPaths("/srv/a,b/" + U)
    vm = props.for_create({"uuid": U, "alias": "x,process=sshd", "disks": [{"path": "/d/a,b.img"}]})
    argv = build_argv(vm, paths, "qemu-system-x86_64", "tcg", disk_fds=[DiskFds(3)])
    assert argv[argv.index("-name") + 1] == "x,,process=sshd,debug-threads=on"
    # No path of the host reaches qemu's options: names relative to its
    # working directory, fds for the disks.
    assert "/srv/a" not in " ".join(argv)
    assert "/d/a" not in " ".join(argv)


def test_disk_backing_chain_is_pinned() -> None:
    """A disk made from an image has that image as its backing node, by fd and
    with its format given; any other qcow2 has no backing at all, whatever its
    header names."""
    paths = VmPaths("/srv/vms/" + U)
    vm = props.for_create({"uuid": U, "disks": [{"path": "/d/a.qcow2"}, {"path": "/d/b.qcow2"}]})
    for disk in vm["disks"]:
        disk["image_format"] = "qcow2"
    argv = build_argv(vm, paths, "q", "tcg", disk_fds=[DiskFds(5, 6, "raw"), DiskFds(8)])
    nodes = [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev"]
    by_name = {n["node-name"]: n for n in nodes}
    assert by_name["disk0"] == {"driver": "qcow2", "node-name": "disk0", "file": "disk0-file",
                                "backing": "disk0-image"}  # fmt: skip
    assert by_name["disk0-image"]["driver"] == "raw"
    assert by_name["disk0-image"]["read-only"] is True
    assert by_name["disk0-image-file"]["filename"] == "/dev/fdset/2"
    assert by_name["disk1"]["backing"] is None
    assert by_name["disk1-file"]["filename"] == "/dev/fdset/3"
    assert "fd=6,set=2,opaque=disk0-image" in argv
    assert "fd=8,set=3,opaque=disk1" in argv


def test_commas_boot_and_disguise_nothing(tmp_path: Path) -> None:
    """A comma in an alias or in the zones root: qemu boots, its name is not replaced."""
    env = Env(tmp_path / "with,comma")
    try:
        env.start_daemon()
        uuid = env.run_vm(bios_payload(alias="web,prod"))
        pid = env.pid(uuid)
        assert pid is not None
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        disguised = env.run_vm(bios_payload(alias="x,process=sshd"))
        pid2 = env.pid(disguised)
        assert pid2 is not None
        with open(f"/proc/{pid2}/comm") as f:
            assert f.read().strip() != "sshd"
        assert comm != "sshd"
    finally:
        env.cleanup()


def test_metadata_and_ports_are_bounded() -> None:
    ok = {f"k{i}": "v" * 100 for i in range(100)}
    assert props.validate({"customer_metadata": ok})["customer_metadata"] == ok
    for bad in (
        {"k" * 129: "v"},  # key too long
        {"": "v"},  # empty key
        {f"k{i}": "v" for i in range(props.METADATA_MAX_KEYS + 1)},  # too many keys
        {"big": "v" * (props.METADATA_MAX_BYTES + 1)},  # too large in all
    ):
        with pytest.raises(InvalidParameter, match="customer_metadata"):
            props.validate({"customer_metadata": bad})
    for port in (1, 22, 80, 1023):
        with pytest.raises(InvalidParameter, match="vnc_port"):
            props.validate({"vnc_port": port})
    for port in (-1, 0, 1024, 5900, 65535):
        assert props.validate({"vnc_port": port})["vnc_port"] == port


def test_vnc_password_from_stdin_not_argv(env: Env) -> None:
    uuid = env.create(bios_payload())
    res = env.vmadm("update", uuid, "vnc_password=-", input="s3cr3t\n", check=True)
    assert res.stderr == f"Successfully updated VM {uuid}\n"
    assert env.get(uuid)["vnc_password"] == "s3cr3t"
    res = env.vmadm("update", uuid, "-f", "-", input='{"vnc_password": "0ther"}', check=True)
    assert env.get(uuid)["vnc_password"] == "0ther"
    assert "stdin" in env.vmadm("update", "--help").stdout


@pytest.mark.parametrize("text", ["", "plain", "a b&c=d", "x,y;z/é~_.-", "100%", "\u2603\n"])
@pytest.mark.parametrize("safe", ["", ","])
def test_cli_quote_matches_urllib(text: str, safe: str) -> None:
    from urllib.parse import quote as urllib_quote

    from vmadmd.cli.client import quote

    assert quote(text, safe) == urllib_quote(text, safe=safe)


def test_uuid_check_takes_only_canonical_lower_case_uuids() -> None:
    import uuid as uuidlib

    from vmadmd.errors import InvalidUuid
    from vmadmd.vm.ids import is_uuid, validate_uuid

    good = str(uuidlib.uuid4())
    assert is_uuid(good)
    assert validate_uuid(good) == good
    bad = [
        good.upper(),
        good[:-1],
        good + "0",
        good.replace("-", ""),
        good[:8] + "0" + good[9:],  # a digit where a dash goes
        good[:9] + "-" + good[10:],  # a dash where a digit goes
        good[:35] + "g",
        good[:35] + "\u0660",  # a non-ASCII digit
        good[:35] + "\n",
        "",
        "../" + good[3:],
        None,
        42,
    ]
    for value in bad:
        assert not is_uuid(value), value
        with pytest.raises(InvalidUuid):
            validate_uuid(value)  # type: ignore[arg-type]
