"""VNC consoles on TCP, through the daemon, against real qemu."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import socket
from typing import Any

import pytest

from . import rfb
from .conftest import Env, bios_payload


def vnc_info(env: Env, uuid: str) -> dict[str, Any]:
    status, body = env.api("GET", f"/vm/{uuid}", type="vnc")
    assert status == 200, body
    info: dict[str, Any] = body["vnc"]
    return info


def wait_listener(env: Env, uuid: str) -> dict[str, Any]:
    env.wait_for(lambda: vnc_info(env, uuid) != {}, timeout=10, what="VNC listener")
    return vnc_info(env, uuid)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_vm(env: Env, **props: Any) -> str:
    uuid = env.create(bios_payload(**props))
    env.vmadm("start", uuid, check=True)
    return uuid


def test_full_handshake_through_tcp_and_listener_lifecycle(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    assert info["host"] == "127.0.0.1" and info["display"] == info["port"] - 5900
    assert "password" not in info
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        init = rfb.handshake(sock)
    assert (init.width, init.height) == (720, 400) or init.width >= 640
    assert init.first_rect[2] > 0 and init.first_rect[3] > 0
    # qemu exits: the listener is gone within a second.
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    took = env.wait_for(lambda: refused(info["port"]), timeout=5, what="listener closed")
    assert took < 1.0


def test_fixed_port_no_console_and_port_conflict(env: Env) -> None:
    env.start_daemon()
    port = free_port()
    first = start_vm(env, vnc_port=port)
    assert wait_listener(env, first)["port"] == port
    second = start_vm(env, vnc_port=port)
    env.wait_qmp(second)
    env.wait_for(lambda: "error" in vnc_info(env, second), timeout=5, what="conflict")
    assert str(port) in vnc_info(env, second)["error"]
    # The first keeps its port and works; the daemon serves everything else.
    with rfb.connect("127.0.0.1", port) as sock:
        assert rfb.banner(sock) == b"RFB 003.008\n"
    none = start_vm(env, vnc_port=-1)
    env.wait_qmp(none)
    assert vnc_info(env, none) == {}
    assert not os.path.exists(env.runtime(none) / "vm.vnc")


def test_password_required_and_accepted(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env, vnc_password="s3cret")
    info = wait_listener(env, uuid)
    assert info["password"] == "s3cret"
    with rfb.connect("127.0.0.1", info["port"]) as sock, pytest.raises(rfb.RfbError, match="auth"):
        rfb.handshake(sock)
    with rfb.connect("127.0.0.1", info["port"]) as sock, pytest.raises(rfb.RfbError):
        rfb.handshake(sock, password="wrong")
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        init = rfb.handshake(sock, password="s3cret")
    assert init.width > 0


def test_reload_vnc_noop_keeps_session_and_port_change_moves(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        rfb.handshake(sock)
        status, body = env.api("POST", f"/vm/{uuid}", action="reload_vnc")
        assert status == 200 and body["vnc"]["port"] == info["port"]
        # The open session still works: ask for another update.
        sock.sendall(bytes([3, 0, 0, 0, 0, 0, 0, 16, 0, 16]))
        assert rfb.recv_exact(sock, 1) == b"\x00"
    new_port = free_port()
    res = env.vmadm("update", uuid, f"vnc_port={new_port}")
    assert res.returncode == 0, res.stderr
    assert vnc_info(env, uuid)["port"] == new_port
    assert refused(info["port"])
    with rfb.connect("127.0.0.1", new_port) as sock:
        rfb.handshake(sock)
    # A password set on a qemu started without VNC auth cannot be enforced
    # until the next boot: the console closes rather than stay open.
    env.vmadm("update", uuid, "vnc_password=abc", check=True)
    status, body = env.api("POST", f"/vm/{uuid}", action="reload_display")
    assert status == 200 and "next boot" in body["vnc"]["error"]
    assert refused(new_port)


def test_password_change_on_running_vm(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env, vnc_password="first")
    port = wait_listener(env, uuid)["port"]
    env.vmadm("update", uuid, "vnc_password=second", check=True)
    info = vnc_info(env, uuid)
    assert info["password"] == "second" and info["port"] == port
    with rfb.connect("127.0.0.1", port) as sock, pytest.raises(rfb.RfbError):
        rfb.handshake(sock, password="first")
    with rfb.connect("127.0.0.1", port) as sock:
        rfb.handshake(sock, password="second")


def test_hundred_concurrent_clients_get_the_banner(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]

    def one(_: int) -> bytes:
        with rfb.connect("127.0.0.1", port, timeout=20) as sock:
            return rfb.banner(sock)

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        banners = list(pool.map(one, range(100)))
    assert banners == [b"RFB 003.008\n"] * 100


def test_clients_that_vanish_leak_no_fd(env: Env) -> None:
    daemon = env.start_daemon()
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]
    fd_dir = f"/proc/{daemon.pid}/fd"

    def cycle() -> None:
        for _ in range(30):
            sock = rfb.connect("127.0.0.1", port)
            rfb.banner(sock)
            sock.sendall(b"RFB 003.008\n")
            sock.close()  # mid-handshake
            sock = rfb.connect("127.0.0.1", port)
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
            sock.close()  # reset before anything

    cycle()
    env.wait_for(lambda: True, timeout=0.5)
    before = len(os.listdir(fd_dir))
    cycle()
    env.wait_for(lambda: len(os.listdir(fd_dir)) <= before, timeout=5, what="fds released")
    assert len(os.listdir(fd_dir)) <= before
