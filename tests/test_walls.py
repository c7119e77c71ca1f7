"""The walls around a VM that the security review found open ("Zones that hold"):

- a guest's user-mode nic reaches neither the host nor the outside unless the
  host says ``--user-net nat``; a VNC console requires a password unless the
  host says ``--vnc-no-password`` (finding 2);
- the monitor pass-through lets through only an allowlist, and HMP ``info``
  (finding 6);
- what is stored is bounded, an alias is printable, text output escaped
  (finding 11).

Against real qemu and real vmadm/vmadmd processes; the policy's parsing also
as pure cases.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmadmd.daemon.qmppolicy import check_hmp, check_qmp, hmp_command_name
from vmadmd.errors import Forbidden, InvalidParameter

from . import rfb
from .conftest import Env, RunVm, bios_payload, guest_payload
from .test_operator import SerialClient, qmp

# -- finding 6: the pass-through's allowlist ---------------------------------------


@pytest.mark.parametrize(
    ("line", "name"),
    [
        ("info status", "info"),
        ("  \t info   vnc", "info"),
        ("closefd/x", "closefd"),  # qemu ends the name at '/'
        ("x/10i $pc", "x"),
        ("\fmigrate exec:true", "migrate"),
        ("info\0; migrate exec:true", "info"),  # C string: qemu stops at the NUL
        ("\u00a0migrate", "\u00a0migrate"),  # not a C space: part of the name to qemu
        ("", ""),
        ("   ", ""),
    ],
)
def test_hmp_command_name_as_qemu_reads_it(line: str, name: str) -> None:
    assert hmp_command_name(line) == name


def test_policy_allows_reads_and_the_guest_only() -> None:
    for cmd in ("query-status", "query-vnc", "x-query-roms", "qom-list", "send-key",
                "input-send-event", "system_wakeup", "inject-nmi"):  # fmt: skip
        check_qmp(cmd, {})
    check_qmp("human-monitor-command", {"command-line": "info block"})
    for cmd in ("change-vnc-password", "screendump", "migrate", "chardev-add", "netdev_add",
                "dump-guest-memory", "nbd-server-start", "quit", "qom-set", "qom-get", "getfd",
                "device_add", "object-add", "query", "QUERY-STATUS", ""):  # fmt: skip
        with pytest.raises(Forbidden):
            check_qmp(cmd, {})
    for line in ("closefd/x", "change vnc password", "drive_add 0 file=/etc/shadow", "i"):
        with pytest.raises(Forbidden):
            check_hmp(line)
        with pytest.raises(Forbidden):
            check_qmp("human-monitor-command", {"command-line": line})
    with pytest.raises(InvalidParameter):
        check_hmp(" \t")


@contextlib.contextmanager
def open_dir() -> Iterator[Path]:
    """A directory any uid may write (the VM's user among them): if a refused
    command ran after all, its file would appear here."""
    path = Path(tempfile.mkdtemp(prefix="vmadmd-walls-"))
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_every_seen_bypass_is_refused_and_reads_still_pass(env: Env, running_vm: RunVm) -> None:
    """Each command the review passed through, by QMP and by HMP (and the HMP
    through QMP's human-monitor-command), is 403 now; qemu acted on none."""
    uuid = running_vm()
    nbd = free_port()
    with open_dir() as out:
        qmp_refused: list[dict[str, Any]] = [
            {"execute": "change-vnc-password", "arguments": {"password": ""}},
            {"execute": "nbd-server-start",
             "arguments": {"addr": {"type": "inet", "data": {"host": "0.0.0.0",
                                                             "port": str(nbd)}}}},
            {"execute": "blockdev-add",
             "arguments": {"driver": "file", "node-name": "x", "filename": "/etc/passwd"}},
            {"execute": "screendump", "arguments": {"filename": f"{out}/shot.ppm"}},
            {"execute": "screendump", "arguments": {"filename": "vm.ppm"}},
            {"execute": "migrate", "arguments": {"uri": f"exec:touch {out}/migrated"}},
            {"execute": "chardev-add",
             "arguments": {"id": "c9", "backend": {"type": "socket", "data": {
                 "addr": {"type": "inet", "data": {"host": "127.0.0.1", "port": str(nbd)}},
                 "server": True, "wait": False}}}},
            {"execute": "netdev_add",
             "arguments": {"type": "user", "id": "n9", "hostfwd": [{"str": f"tcp::{nbd}-:22"}]}},
            {"execute": "dump-guest-memory",
             "arguments": {"paging": False, "protocol": f"file:{out}/memory"}},
            {"execute": "quit"},
            {"execute": "set_password", "arguments": {"protocol": "vnc", "password": ""}},
        ]  # fmt: skip
        hmp_refused = [
            "change vnc password",
            "closefd/x",
            "  closefd/x",
            f"drive_add 0 file={out}/x,if=none,id=d9",
            f"nbd_server_start 0.0.0.0:{nbd}",
            f"screendump {out}/shot.ppm",
            f'migrate "exec:touch {out}/migrated"',
            f"chardev-add socket,id=c9,host=127.0.0.1,port={nbd},server=on,wait=off",
            f"netdev_add user,id=n9,hostfwd=tcp::{nbd}-:22",
            f"\tdump-guest-memory {out}/memory",
            "quit",
        ]
        for body in qmp_refused:
            status, answer = qmp(env, uuid, body)
            assert status == 403, (body, status, answer)
        for line in hmp_refused:
            assert qmp(env, uuid, {"hmp": line})[0] == 403, line
            via = {"execute": "human-monitor-command", "arguments": {"command-line": line}}
            assert qmp(env, uuid, via)[0] == 403, line
        assert list(out.iterdir()) == [], "nothing written"
    assert not listening(nbd), "no listener opened"
    assert not (env.runtime(uuid) / "vm.ppm").exists()
    assert env.get(uuid)["state"] == "running"
    # The VNC password is still required (it was not emptied).
    info = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]
    with rfb.connect("127.0.0.1", info["port"]) as sock, pytest.raises(rfb.RfbError):
        rfb.handshake(sock)

    # What passes still works against qemu.
    allowed: list[dict[str, Any]] = [
        {"execute": "query-status"},
        {"execute": "query-vnc"},
        {"execute": "x-query-roms"},
        {"execute": "qom-list", "arguments": {"path": "/machine"}},
        {"execute": "send-key", "arguments": {"keys": [{"type": "qcode", "data": "shift"}]}},
        {"execute": "inject-nmi"},
    ]
    for body in allowed:
        status, answer = qmp(env, uuid, body)
        assert status == 200, (body, status, answer)
    for line in ("info status", "  info   vnc", "info block"):
        status, answer = qmp(env, uuid, {"hmp": line})
        assert status == 200, (line, answer)
    # A line that names no command is a bad request (it was a 500).
    for line in ("", " \t "):
        assert qmp(env, uuid, {"hmp": line})[0] == 400, repr(line)
    res = env.vmadm("qmp", uuid, "--hmp", "migrate exec:true")
    env.wait_for(lambda: "refused: human monitor command 'migrate'" in env.daemon_log(None),
                 what="the refusal logged")  # fmt: skip
    assert res.returncode == 1
    assert "only 'info ...' passes" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = env.vmadm("qmp", uuid, '{"execute": "screendump", "arguments": {"filename": "x"}}')
    assert "vmadm sysrq UUID screenshot" in res.stderr


# -- finding 2: user-mode nics and VNC passwords -------------------------------------


@pytest.mark.parametrize(("mode", "on_host"), [(None, False), ("nat", True)])
def test_qemu_opens_nothing_on_the_hosts_network_unless_nat(
    env: Env, mode: str | None, on_host: bool
) -> None:
    """The second review: qemu itself (a guest that took it over, or
    qemu_extra_opts) could listen on the host's loopback, squatting another
    VM's console port, and reach every loopback service.  By default
    (restricted) qemu runs in a network namespace of its own: its -gdb
    listener is not on the host, whose VNC console still works (the
    listening socket is given to qemu as an fd)."""
    if mode is not None:
        env.extra_env["VMADM_USER_NET"] = mode
    env.start_daemon()
    port = free_port()
    uuid = env.run_vm(bios_payload(qemu_extra_opts=f"-gdb tcp:127.0.0.1:{port}"))
    pid = env.pid(uuid)
    assert pid is not None
    own_ns = os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
    assert own_ns is not on_host
    reached = True
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        reached = False
    assert reached is on_host
    env.wait_for(lambda: "port" in env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"])
    info = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        rfb.handshake(sock, info["password"])


@pytest.mark.parametrize(("mode", "reaches"), [(None, False), ("nat", True)])
def test_user_nic_reaches_the_hosts_loopback_only_with_nat(
    env: Env, guest: dict[str, str], mode: str | None, reaches: bool
) -> None:
    """A guest dials 10.0.2.2 (slirp's name for the host's 127.0.0.1) on a port the
    test listens on: by default (restricted: restrict=on) nothing arrives; with
    --user-net nat (VMADM_USER_NET) the guest gets through."""
    if mode is not None:
        env.extra_env["VMADM_USER_NET"] = mode
    env.start_daemon()
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(0.2)
        port = server.getsockname()[1]
        uuid = env.run_vm(guest_payload(guest, nics=[{"model": "virtio"}]), ready=True)
        pid = env.pid(uuid)
        assert pid is not None
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        netdev = next(a for a in argv if a.startswith(b"user,"))
        assert (b"restrict=on" in netdev) is not reaches, netdev

        async def dial() -> None:
            async with SerialClient(env, uuid) as console:
                await console.until(b"VMTEST-READY")
                await console.type(
                    b"ip link set eth0 up; ip addr add 10.0.2.15/24 dev eth0; "
                    b"echo from-guest | timeout 6 nc 10.0.2.2 " + str(port).encode() + b"; "
                    b"echo dialled-$((6*7))\n"
                )
                await console.until(b"dialled-42", timeout=40)

        got = b""

        def accept() -> None:
            nonlocal got
            with contextlib.suppress(TimeoutError):
                conn, _ = server.accept()
                with conn:
                    conn.settimeout(5)
                    got = conn.recv(64)

        async def both() -> None:
            dialling = asyncio.create_task(dial())
            while not dialling.done() and not got:
                await asyncio.to_thread(accept)
            await dialling

        asyncio.run(both())
    assert (got == b"from-guest\n") is reaches, got


def vnc_info(env: Env, uuid: str) -> dict[str, Any]:
    def opened() -> bool:
        return bool(env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"])

    env.wait_for(opened, timeout=15, what="VNC listener")
    info: dict[str, Any] = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]
    return info


def test_vnc_requires_a_generated_password_by_default(env: Env) -> None:
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    pid = env.pid(uuid)
    assert pid is not None
    assert b"unix:vm.vnc,password=on" in Path(f"/proc/{pid}/cmdline").read_bytes()
    vnc_info(env, uuid)
    # `vmadm info UUID vnc` shows it; it is never stored.
    shown = json.loads(env.vmadm("info", uuid, "vnc", check=True).stdout)["vnc"]
    password = shown["password"]
    assert len(password) == 8
    assert "vnc_password" not in env.get(uuid)
    with (
        rfb.connect("127.0.0.1", shown["port"]) as sock,
        pytest.raises(rfb.RfbError, match="requires authentication"),
    ):
        rfb.handshake(sock)
    with rfb.connect("127.0.0.1", shown["port"]) as sock:
        assert rfb.handshake(sock, password).width > 0
    # The same after the daemon restarts (derived from the host's key, root's
    # alone, and this qemu's identity); another one for the next boot.
    key = Path(env.zones) / ".vnc-key"
    assert key.stat().st_mode & 0o777 == 0o600
    env.stop_daemon()
    env.start_daemon()
    assert vnc_info(env, uuid)["password"] == password
    env.vmadm("stop", uuid, "-F", check=True)
    env.vmadm("start", uuid, check=True)
    env.wait_for(lambda: vnc_info(env, uuid).get("password") not in (None, password),
                 timeout=15, what="a new password")  # fmt: skip
    # The old opt-in is accepted and changes nothing.
    other = env.create(bios_payload())
    env.vmadm("start", other, check=True, extra_env={"VMADM_VNC_REQUIRE_PASSWORD": "1"})
    assert len(vnc_info(env, other)["password"]) == 8


def test_vnc_no_password_is_an_explicit_opt_out(env: Env) -> None:
    env.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"  # vmadm's and vmadmd's
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    info = vnc_info(env, uuid)
    assert "password" not in info
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        assert rfb.handshake(sock).width > 0


def test_vmadm_and_vmadmd_disagreeing_never_weaken_the_console(env: Env) -> None:
    """A qemu vmadm started with password auth keeps it under a daemon told
    --vnc-no-password (a password is generated: without one qemu admits nobody);
    a qemu started without auth under a daemon that requires one gets no console."""
    env.start_daemon("--vnc-no-password")
    uuid = env.run_vm(bios_payload())
    info = vnc_info(env, uuid)
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        assert rfb.handshake(sock, info["password"]).width > 0
    env.stop_daemon()
    env.start_daemon()
    weak = env.create(bios_payload())
    env.vmadm("start", weak, check=True, extra_env={"VMADMD_VNC_NO_PASSWORD": "1"})
    assert "next boot" in vnc_info(env, weak)["error"]


# -- finding 11: bounds and escaping --------------------------------------------------


def one_line_error(res: Any) -> str:
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    return str(lines[0])


def zonepaths(env: Env) -> set[str]:
    return {p.name for p in Path(env.zones).iterdir() if p.is_dir()}


def test_kept_properties_and_vm_json_are_bounded(env: Env) -> None:
    before = zonepaths(env)
    huge = {"tags": {"blob": "x" * (10 << 20)}}
    err = one_line_error(env.vmadm("create", input=json.dumps(bios_payload(**huge))))
    assert "tags is" in err
    assert "KiB allowed" in err
    # A nic's kept property too.
    nic = {"nics": [{"model": "virtio", "ips": ["10.0.0.1/24"] * 20000}]}
    res = env.vmadm("create", input=json.dumps(bios_payload(**nic)))
    assert "nics[0].ips" in one_line_error(res)
    # Each within its bound, vm.json over 1 MiB together: refused, nothing made.
    big = {
        "customer_metadata": {"k": "c" * (250 << 10)},
        "tags": {"t": "t" * (250 << 10)},
        "internal_metadata": {"i": "i" * (250 << 10)},
        **{name: "p" * (60 << 10) for name in
           ("billing_id", "package_name", "package_version", "hostname", "dns_domain")},
    }  # fmt: skip
    err = one_line_error(env.vmadm("create", input=json.dumps(bios_payload(**big))))
    assert "vm.json would be" in err
    assert "1024 KiB" in err
    assert zonepaths(env) == before, "nothing created"
    # The same as updates: vm.json is left as it was.
    uuid = env.create(bios_payload())
    vm_json = Path(env.zones) / uuid / "vm.json"
    was = vm_json.read_bytes()
    for change in (huge, big):
        res = env.vmadm("update", uuid, "-f", "-", input=json.dumps(change))
        one_line_error(res)
        assert vm_json.read_bytes() == was
    # A vm.json past the cap from before there was one can still be shrunk.
    record = json.loads(was)
    record["tags"] = {"blob": "x" * (2 << 20)}
    vm_json.write_text(json.dumps(record))
    env.vmadm("update", uuid, "-f", "-", input='{"tags": {}}', check=True)
    assert vm_json.stat().st_size < 4096


def test_alias_is_printable_and_text_output_escaped(env: Env) -> None:
    for alias in ("evil\x1b]2;owned\x07", "two\nlines", "rtl\u202eoverride"):
        err = one_line_error(env.vmadm("create", input=json.dumps(bios_payload(alias=alias))))
        assert "alias must be printable" in err
    uuid = env.create(bios_payload(alias="café ok"))
    res = env.vmadm("update", uuid, "alias=bad\x1b[2J")
    assert "alias must be printable" in one_line_error(res)
    # A vm.json from before the check, with an escape sequence in its alias.
    vm_json = Path(env.zones) / uuid / "vm.json"
    record = json.loads(vm_json.read_text())
    record["alias"] = "red\x1b[31malert\r\n"
    vm_json.write_text(json.dumps(record))
    for args in (("list",), ("list", "-p", "-o", "uuid,alias"), ("list", "-H")):
        out = env.vmadm(*args, check=True).stdout
        assert "\x1b" not in out
        assert "\r" not in out
        assert "red\\x1b[31malert\\r\\n" in out
    # JSON output keeps it exact (json escapes it).
    got = json.loads(env.vmadm("lookup", "-j", "-o", "alias", check=True).stdout)
    assert got == [{"alias": "red\x1b[31malert\r\n"}]


def test_text_logs_escape_what_users_chose(env: Env) -> None:
    env.start_daemon("--log-format", "text")
    # A VM from before aliases had to be printable: qemu's -name carries it.
    uuid = env.create(bios_payload(alias="placeholder"))
    vm_json = Path(env.zones) / uuid / "vm.json"
    vm_json.write_text(vm_json.read_text().replace("placeholder", "old\\u001b[5malias"))
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    out = env.vmadm("qmp", uuid, "--hmp", "info name", check=True).stdout
    assert out == "old\\x1b[5malias\n", out
    status, _ = qmp(env, uuid, {"execute": "query-\x1b[2Jx\nforged"})
    assert status == 422  # allowed by its prefix, unknown to qemu
    env.wait_for(lambda: "forged" in env.daemon_log(tail=None), what="logged")
    log = env.daemon_log(tail=None)
    assert "query-\\x1b[2Jx\\nforged" in log
    assert "\x1b" not in log
    assert not any(line.startswith("forged") for line in log.splitlines())
