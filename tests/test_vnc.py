"""VNC consoles on TCP, through the daemon, against real qemu.

The tests that serve a session run in the three modes: ``listen`` (the
default: qemu accepts on the listening socket the daemon gave it),
``handoff`` (each client's socket is given to qemu over QMP) and ``proxy``
(the daemon relays), and check from the daemon's metrics that the mode they
asked for is the one that served every client.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.world import standin_binary
from vmadmd.vm.sockets import bind_unix, connect_unix

from . import rfb
from .conftest import Env, bios_payload
from .test_service import metric, raw_request, rss_kib

OUTCOME = {"listen": "accepted_by_qemu", "handoff": "handed_off", "proxy": "proxied"}


@pytest.fixture(params=["listen", "handoff", "proxy"])
def relay(request: pytest.FixtureRequest) -> str:
    mode: str = request.param
    return mode


def served(env: Env) -> dict[str, float]:
    """How the daemon served its VNC clients so far, by outcome."""
    _, body = raw_request(env, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    if "vmadmd_vnc_clients" not in families:
        return {}
    return {
        outcome: metric(families, "vmadmd_vnc_clients", outcome=outcome)
        for outcome in ("accepted_by_qemu", "handed_off", "proxied", "unknown")
    }


def assert_served_by(env: Env, relay: str, at_least: int) -> None:
    """Every client so far was served the way ``relay`` says (waiting a little:
    a handed-off client can see qemu's banner before the daemon reads qemu's
    answer)."""
    env.wait_for(
        lambda: served(env).get(OUTCOME[relay], 0) >= at_least, timeout=5, what=f"{relay} count"
    )
    counts = served(env)
    assert sum(counts.values()) == counts[OUTCOME[relay]], counts


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def vnc_info(env: Env, uuid: str) -> dict[str, Any]:
    status, body = env.api("GET", f"/vm/{uuid}", type="vnc")
    assert status == 200, body
    info: dict[str, Any] = body["vnc"]
    return info


def wait_listener(env: Env, uuid: str, *, qmp: bool = True) -> dict[str, Any]:
    """The VM's listener once open (and, by default, its QMP up: a client
    that comes earlier is relayed, since qemu cannot be handed it yet)."""
    env.wait_for(lambda: vnc_info(env, uuid) != {}, timeout=10, what="VNC listener")
    if qmp:
        env.wait_qmp(uuid)
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


def screen_size(env: Env, uuid: str) -> tuple[int, int]:
    """The VM's screen as a screenshot (PPM) shows it now."""
    status, _ = env.api("POST", f"/vm/{uuid}", action="sysrq", request="screenshot")
    assert status == 200
    head = (env.runtime(uuid) / "vm.ppm").read_bytes()[:32].split()
    return int(head[1]), int(head[2])


def start_vm(env: Env, **props: Any) -> str:
    uuid = env.create(bios_payload(**props))
    env.vmadm("start", uuid, check=True)
    return uuid


def test_full_handshake_through_tcp_and_listener_lifecycle(env: Env, relay: str) -> None:
    env.start_daemon("--vnc-relay", relay)
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    assert info["host"] == "127.0.0.1"
    assert info["display"] == info["port"] - 5900
    assert len(info["password"]) == 8  # generated: a password is required by default
    # SeaBIOS's text screen (80x25 of 9x16) once it is up: before that qemu
    # shows 640x480 ("not initialized yet").
    env.wait_for(lambda: screen_size(env, uuid) == (720, 400), timeout=20, what="BIOS screen")
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        init = rfb.handshake(sock, info["password"])
    assert (init.width, init.height) == (720, 400)
    assert init.first_rect[2] > 0
    assert init.first_rect[3] > 0
    session = rfb.connect("127.0.0.1", info["port"])
    rfb.handshake(session, info["password"])
    assert_served_by(env, relay, 2)
    # qemu exits: the listener is gone within a second, and so is the
    # open session (the client sees its connection end).
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    session.settimeout(5)
    with pytest.raises((rfb.RfbError, ConnectionResetError)):
        rfb.update(session, rfb.ServerInit(init.width, init.height, "", init.first_rect))
    assert time.monotonic() - t0 < 1.0
    session.close()
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


def test_password_required_and_accepted(env: Env, relay: str) -> None:
    env.start_daemon("--vnc-relay", relay)
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
    assert_served_by(env, relay, 3)


def test_reload_vnc_noop_keeps_session_and_port_change_moves(env: Env, relay: str) -> None:
    # Without the default password: a password set later is what is tested below.
    env.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"
    env.start_daemon("--vnc-relay", relay)
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        init = rfb.handshake(sock)
        status, body = env.api("POST", f"/vm/{uuid}", action="reload_vnc")
        assert status == 200
        assert body["vnc"]["port"] == info["port"]
        # The open session still works: a whole new screen comes through.
        assert rfb.update(sock, init)
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
    assert status == 200
    assert "next boot" in body["vnc"]["error"]
    assert refused(new_port)


def test_password_change_on_running_vm(env: Env) -> None:
    env.start_daemon()
    uuid = start_vm(env, vnc_password="first")
    port = wait_listener(env, uuid)["port"]
    env.vmadm("update", uuid, "vnc_password=second", check=True)
    info = vnc_info(env, uuid)
    assert info["password"] == "second"
    assert info["port"] == port
    with rfb.connect("127.0.0.1", port) as sock, pytest.raises(rfb.RfbError):
        rfb.handshake(sock, password="first")
    with rfb.connect("127.0.0.1", port) as sock:
        rfb.handshake(sock, password="second")


def test_hundred_concurrent_clients_get_the_banner(env: Env, relay: str) -> None:
    env.start_daemon("--vnc-relay", relay)
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]

    def one(_: int) -> bytes:
        with rfb.connect("127.0.0.1", port, timeout=20) as sock:
            return rfb.banner(sock)

    with concurrent.futures.ThreadPoolExecutor(100) as pool:
        banners = list(pool.map(one, range(100)))
    assert banners == [b"RFB 003.008\n"] * 100
    assert_served_by(env, relay, 100)


def test_clients_that_vanish_leak_no_fd(env: Env, relay: str) -> None:
    daemon = env.start_daemon("--vnc-relay", relay)
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]
    qemu = env.pid(uuid)
    assert qemu is not None

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
    time.sleep(0.5)
    before = {pid: fds(pid) for pid in (daemon.pid, qemu)}
    cycle()
    # Neither the daemon nor qemu (which owns handed-off clients) keeps any.
    env.wait_for(
        lambda: all(fds(pid) <= n for pid, n in before.items()), timeout=5, what="fds released"
    )
    assert_served_by(env, relay, 120)


def test_handed_off_session_outlives_the_daemon(env: Env) -> None:
    """qemu serves a handed-off client itself: killing vmadmd leaves the
    session working, and the restarted daemon opens the listener again."""
    daemon = env.start_daemon("--vnc-relay", "handoff")
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    port = info["port"]
    with rfb.connect("127.0.0.1", port) as sock:
        init = rfb.handshake(sock, info["password"])
        assert served(env)["handed_off"] == 1
        env.stop_daemon(daemon, signal.SIGKILL)
        assert refused(port)
        assert rfb.update(sock, init)  # still served, with no daemon at all
        env.start_daemon("--vnc-relay", "handoff")
        info = wait_listener(env, uuid)
        assert rfb.update(sock, init)
    with rfb.connect("127.0.0.1", info["port"]) as sock:
        rfb.handshake(sock, info["password"])


def listen_backlog(port: int) -> int:
    """The accept-queue limit (``ss``'s Send-Q) of the TCP listener on ``port``."""
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout.split()
    return int(out[2])


def test_qemu_listener_outlives_the_daemon_and_is_taken_back(env: Env) -> None:
    """In the listen mode qemu accepts on the console's socket itself: the
    console works with no daemon at all, a restarted daemon takes the same
    listener back (same port, nothing bound twice), and closing the console
    closes qemu's listener."""
    daemon = env.start_daemon()
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    port, password = info["port"], info["password"]
    # qemu sets a listener's backlog to 1; the daemon sets it back.
    assert listen_backlog(port) == 128
    with rfb.connect("127.0.0.1", port) as sock:
        init = rfb.handshake(sock, password)
        assert_served_by(env, "listen", 1)
        env.stop_daemon(daemon, signal.SIGKILL)
        assert rfb.update(sock, init)
        with rfb.connect("127.0.0.1", port) as other:  # a new client, no daemon
            rfb.handshake(other, password)
        env.start_daemon()
        info = wait_listener(env, uuid)
        # The same generated password (the same qemu): clients keep theirs.
        assert info == {"host": "127.0.0.1", "port": port, "display": port - 5900,
                        "password": password}  # fmt: skip
        assert rfb.update(sock, init)
    with rfb.connect("127.0.0.1", port) as sock:
        rfb.handshake(sock, password)
    assert_served_by(env, "listen", 1)  # counted by the daemon now running
    # A daemon in another mode closes qemu's listener: the console is its own.
    env.stop_daemon()
    env.start_daemon("--vnc-relay", "proxy")
    info = wait_listener(env, uuid)
    new_port = info["port"]
    assert new_port != port
    env.wait_for(lambda: refused(port), timeout=5, what="qemu's listener closed")
    with rfb.connect("127.0.0.1", new_port) as sock:
        rfb.handshake(sock, info["password"])
    assert_served_by(env, "proxy", 1)
    # And in the listen mode, no console closes qemu's listener.
    env.stop_daemon()
    env.start_daemon()
    port = wait_listener(env, uuid)["port"]
    assert env.vmadm("update", uuid, "vnc_port=-1").returncode == 0
    assert vnc_info(env, uuid) == {}
    assert refused(port)
    # The VM's own unix socket is still qemu's (the web console uses it).
    with connect_unix(str(env.runtime(uuid)), "vm.vnc") as unix:
        unix.settimeout(5)
        assert rfb.banner(unix) == b"RFB 003.008\n"


def test_client_is_relayed_while_qemu_cannot_take_it(env: Env) -> None:
    """A qemu whose QMP is wedged cannot be handed a client: the daemon
    relays it instead, and the console works as soon as qemu runs again."""
    env.start_daemon("--vnc-relay", "handoff", "--qmp-timeout", "1")
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    port = info["port"]
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        status, _ = env.api("GET", f"/vm/{uuid}", type="version")
        assert status == 504  # the connection is now wedged, reconnecting
        sock = rfb.connect("127.0.0.1", port)
        env.wait_for(lambda: served(env).get("proxied") == 1, timeout=5, what="relayed")
    finally:
        os.kill(pid, signal.SIGCONT)
    with sock:
        rfb.handshake(sock, info["password"])
    assert served(env)["handed_off"] == 0


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [
        ("error", "proxied"),  # errors to everything: cannot say it takes clients
        ("yes", "proxied"),  # an empty success to everything, query-commands too
        ("stall", "proxied"),  # never answers: nothing was passed yet
        ("nofds", "proxied"),  # lists getfd/add_client, but the fd never arrives
        ("stallfds", "unknown"),  # getfd never answered: qemu may hold the client
        ("stalladd", "unknown"),  # add_client never answered, the fd left registered
    ],
)
def test_handoff_refused_or_unanswered(env: Env, mode: str, outcome: str) -> None:
    """The client is relayed whenever qemu surely did not take it, and closed
    when that is unknown (serving it twice would garble both sessions).  Real
    qemu cannot be made to misbehave so on demand: these are the stand-in's
    faulty QMP modes; the relay itself is tested above on real qemu.  (No VNC
    password: one that cannot be set over a faulty QMP keeps the console shut.)"""
    env.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"
    env.start_daemon("--vnc-relay", "handoff", "--qmp-timeout", "1")
    env.extra_env.update(VMADM_QEMU=standin_binary(), VMADMD_STANDIN_QMP=mode)
    uuid = start_vm(env)
    port = wait_listener(env, uuid, qmp=False)["port"]
    env.wait_for(lambda: env.api("GET", "/ping")[1].get("qmp_ready") == 1, what="QMP")
    sock = rfb.connect("127.0.0.1", port, timeout=5)
    t0 = time.monotonic()
    if outcome == "proxied":
        assert rfb.banner(sock) == b"RFB 003.008\n"  # the stand-in's VNC, relayed
    else:
        # Closed once the handoff timed out and QMP reconnected (then the fd
        # left registered under its name, if any, was closed with closefd).
        assert sock.recv(1) == b""
        assert 0.9 < time.monotonic() - t0 < 3
    sock.close()
    env.wait_for(lambda: served(env).get(outcome) == 1, timeout=5, what=outcome)


@pytest.mark.parametrize(
    ("mode", "outcomes"),
    [
        ("normal", {"accepted_by_qemu"}),  # the stand-in accepts on the socket it was given
        ("refuselisten", {"handed_off"}),  # refused: the daemon keeps the listener
        # Never answered: qemu may accept on it or not; the daemon accepts too,
        # so every client is served by one of them.
        ("stalllisten", {"handed_off", "proxied"}),
    ],
)
def test_listener_refused_or_unanswered(env: Env, mode: str, outcomes: set[str]) -> None:
    """The listen mode when qemu refuses the listening socket or never
    answers: the console still serves every client, through the daemon."""
    env.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"
    env.start_daemon("--qmp-timeout", "1")
    env.extra_env.update(VMADM_QEMU=standin_binary(), VMADMD_STANDIN_QMP=mode)
    uuid = start_vm(env)
    port = wait_listener(env, uuid, qmp=False)["port"]
    assert "error" not in vnc_info(env, uuid)
    for _ in range(3):
        with rfb.connect("127.0.0.1", port, timeout=5) as sock:
            assert rfb.banner(sock) == b"RFB 003.008\n"

    def counted() -> float:
        return sum(served(env).get(outcome, 0) for outcome in outcomes)

    env.wait_for(lambda: counted() == 3, timeout=5, what=f"{outcomes}")
    assert sum(served(env).values()) == 3


def test_a_replaced_vnc_socket_is_never_what_clients_reach(env: Env) -> None:
    """Once another socket is put at vm.vnc, clients are neither handed to
    qemu (its socket is not the one there) nor relayed to the newcomer (it
    is not served by the VM's qemu): they are closed, and it gets nothing."""
    env.start_daemon("--vnc-relay", "handoff")
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]
    with rfb.connect("127.0.0.1", port) as sock:
        assert rfb.banner(sock) == b"RFB 003.008\n"
    assert_served_by(env, "handoff", 1)
    path = str(env.runtime(uuid) / "vm.vnc")
    os.unlink(path)
    with bind_unix(path) as server, rfb.connect("127.0.0.1", port) as sock:
        server.settimeout(2)
        sock.settimeout(5)
        assert sock.recv(64) == b""  # closed by the daemon
        with contextlib.suppress(TimeoutError):
            conn, _ = server.accept()  # the daemon's connection, if queued ...
            with conn:
                conn.settimeout(2)
                assert conn.recv(64) == b""  # ... closed before a byte was sent
    assert served(env) == {"accepted_by_qemu": 0, "handed_off": 1, "proxied": 1, "unknown": 0}


def test_client_that_does_not_read_costs_bounded_memory(env: Env, relay: str) -> None:
    """A VM sending faster than its console client reads: the relay holds at
    most its one buffer, then stops reading the VM (a handed-off client costs
    the daemon nothing at all).  Real qemu throttles its own VNC output, so the
    stand-in's wire mode plays a VM that sends 1 GiB as fast as it can."""
    daemon = env.start_daemon("--vnc-relay", relay)
    env.extra_env.update(VMADM_QEMU=standin_binary(), VMADMD_STANDIN_VNC="wire")
    uuid = start_vm(env)
    port = wait_listener(env, uuid)["port"]
    before = rss_kib(daemon.pid)
    with rfb.connect("127.0.0.1", port) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"D" + (1 << 30).to_bytes(8, "big"))  # send me 1 GiB
        time.sleep(2)  # ... and do not read
        grown = rss_kib(daemon.pid) - before
        t0 = time.monotonic()
        assert env.api("GET", "/ping")[0] == 200
        assert time.monotonic() - t0 < 0.5
        # The session is intact: the VM's bytes still come.
        got = 0
        while got < 64 << 20:
            chunk = sock.recv(1 << 20)
            assert chunk
            got += len(chunk)
    assert grown < 4 * 1024, f"daemon grew {grown} KiB"
    assert_served_by(env, relay, 1)


def test_a_handoff_cut_short_leaves_qemu_holding_nothing(env: Env) -> None:
    """qemu stopped (SIGSTOP) between receiving a client's fd and answering:
    the daemon lets go of the client, and once qemu runs again it must not
    keep the socket open with nobody serving it."""
    env.start_daemon("--vnc-relay", "handoff", "--qmp-timeout", "1")
    uuid = start_vm(env)
    info = wait_listener(env, uuid)
    port = info["port"]
    with rfb.connect("127.0.0.1", port) as sock:
        assert rfb.banner(sock) == b"RFB 003.008\n"
    # The banner can come before the daemon has read qemu's answer.
    env.wait_for(lambda: served(env).get("handed_off") == 1, timeout=5, what="handed off")
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    try:
        sock = rfb.connect("127.0.0.1", port, timeout=15)
        env.wait_for(lambda: served(env).get("unknown") == 1, timeout=5, what="cut short")
    finally:
        os.kill(pid, signal.SIGCONT)
    with sock:
        assert sock.recv(64) == b""  # closed, not held open by qemu
    with rfb.connect("127.0.0.1", port) as sock:
        rfb.handshake(sock, info["password"])
