"""A VM's sockets are trusted only when its own qemu serves them (real qemu).

Everything under a VM's ``root/`` is its user's to replace.  The review that
found the daemon connecting to ``vm.qmp`` by name planted a QMP server there,
restarted the daemon, and received the VM's VNC password and the console's
listening socket.  These tests plant servers at the sockets' names and check
that they are told nothing, and that the VM's requests fail clearly instead
of being answered by the impostor.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
from collections.abc import Iterator

from vmadmd.vm.sockets import bind_unix

from . import rfb
from .conftest import Env, bios_payload


class Planted:
    """A server at one of a VM's socket names, run by someone other than its
    qemu: greets like QMP and records every byte anyone sends it."""

    def __init__(self, path: str, owner: int | None = None) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.sock = bind_unix(path)
        if owner is not None:  # made by the VM's user, as its qemu makes its own
            os.chown(path, owner, owner)
        self.sock.settimeout(0.2)
        self.received = b""
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            with conn:
                conn.settimeout(1)
                with contextlib.suppress(OSError):
                    conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
                    while chunk := conn.recv(4096):
                        self.received += chunk
                        conn.sendall(b'{"return": {"impostor": true}}\r\n')

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(timeout=5)


@contextlib.contextmanager
def planted(path: str, owner: int | None = None) -> Iterator[Planted]:
    server = Planted(path, owner)
    try:
        yield server
    finally:
        server.close()


def test_a_planted_qmp_server_is_told_nothing_after_a_restart(env: Env) -> None:
    """The review's attack: with the daemon stopped, vm.qmp is replaced by
    another server; the restarted daemon must send it nothing (no
    capabilities, no VNC password, no listening socket), and `vmadm qmp`
    must not answer from it."""
    env.start_daemon()
    uuid = env.run_vm(bios_payload(vnc_password="s3cret"))
    env.stop_daemon()
    runtime = env.runtime(uuid)
    # qemu keeps listening on its socket under another name; the name is
    # the impostor's now.
    os.rename(runtime / "vm.qmp", runtime / "vm.qmp.moved")
    uid = env.get(uuid)["zone_uid"]
    with planted(str(runtime / "vm.qmp"), owner=uid) as impostor:
        env.start_daemon("--qmp-timeout", "1")
        env.wait_for(lambda: impostor.accepted >= 1, timeout=10, what="a connection attempt")
        res = env.vmadm("qmp", uuid, json.dumps({"execute": "query-status"}))
        assert res.returncode == 1, res.stdout
        assert "impostor" not in res.stdout
        status, _ = env.api("GET", f"/vm/{uuid}", type="version")
        assert status == 504
        assert impostor.received == b"", impostor.received[:200]
    assert "not by the VM's qemu" in env.daemon_log()
    # The VM itself is untouched: still running, stoppable.
    assert env.pid(uuid) is not None


def test_a_planted_vnc_socket_is_never_reached(env: Env) -> None:
    """A client of the VM's console is never relayed to a server planted at
    vm.vnc: its connection is closed, and the planted server gets nothing."""
    env.start_daemon("--vnc-relay", "proxy")
    uuid = env.run_vm(bios_payload())
    env.wait_for(lambda: env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"] != {}, timeout=10)
    port = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]["port"]
    with rfb.connect("127.0.0.1", port) as sock:
        assert rfb.banner(sock) == b"RFB 003.008\n"
    uid = env.get(uuid)["zone_uid"]
    with planted(str(env.runtime(uuid) / "vm.vnc"), owner=uid) as impostor:
        with rfb.connect("127.0.0.1", port) as sock:
            sock.settimeout(5)
            with contextlib.suppress(ConnectionResetError):
                sock.sendall(b"RFB 003.008\n")
            got = b""
            with contextlib.suppress(ConnectionResetError, socket.timeout):
                got = sock.recv(64)
            assert got == b""  # closed, with nothing from the impostor
        assert impostor.received == b""
    assert "not by the VM's qemu" in env.daemon_log()


def test_root_never_connects_where_the_zone_points(env: Env) -> None:
    """vm.qmp replaced by a link to a socket elsewhere (root's, here one the
    test serves), or root/tmp itself by a link: the daemon never connects
    there (a socket elsewhere might start a service on each connection)."""
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    env.stop_daemon()
    runtime = env.runtime(uuid)
    elsewhere = env.tmp / "elsewhere.sock"
    with planted(str(elsewhere)) as target:
        os.rename(runtime / "vm.qmp", runtime / "vm.qmp.moved")
        os.symlink(elsewhere, runtime / "vm.qmp")
        env.start_daemon("--qmp-timeout", "1")
        assert env.api("GET", f"/vm/{uuid}", type="version")[0] == 504
        assert target.accepted == 0
        # root/tmp as a whole: a link to a directory holding such a socket.
        env.stop_daemon()
        os.unlink(runtime / "vm.qmp")
        os.rename(runtime / "vm.qmp.moved", runtime / "vm.qmp")
        os.rename(runtime, runtime.parent / "tmp.real")
        os.symlink(env.tmp, runtime)
        os.symlink(elsewhere, env.tmp / "vm.qmp")
        env.start_daemon("--qmp-timeout", "1")
        assert env.api("GET", f"/vm/{uuid}", type="version")[0] == 504
        assert target.accepted == 0
    assert "links are not followed" in env.daemon_log()
