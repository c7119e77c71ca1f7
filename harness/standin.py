"""A stand-in for qemu: serves a VM's QMP and VNC sockets from Python.

Three uses, one protocol implementation:

* **As the qemu binary** (``VMADM_QEMU=$(harness.world.standin_binary())``,
  a staged copy that a VM's own unprivileged user can run): ``vmadm start``
  runs it with qemu's own command line; it binds ``-qmp``/``-vnc`` sockets
  in its working directory, honours ``-daemonize`` and ``-pidfile`` when
  given, and keeps ``-uuid`` on its command line, so the daemon's real code
  paths (launcher, inotify, pidfd, identity check, QMP, VNC proxy) cannot
  tell it from qemu.
* **In process** (``ServedVm``): the same VM served from a test's own event
  loop, for the in-process tests of the monitor, the supervisor and the
  console (no daemon process, deterministic).  Its ``vm.ttyb`` (the guest's
  ``ttyS1``, the metadata port) hands each connection to the test
  (``ServedVm.ttyb``), which plays the guest; as the qemu binary, the port
  is served by a guest that never asks.
* **As a hub for scale runs** (``python -m harness.standin hub ...``): one
  process serves many VMs (``ServedVm`` each).

The QMP behaviour can be made faulty (``VMADMD_STANDIN_QMP``, or ``mode``):
``normal``; ``garbage`` (unparseable replies); ``half`` (half a greeting,
then silence); ``error`` (an error reply to every command); ``stall`` (a
greeting, then no reply ever); ``ignore_acpi`` (powerdown does nothing);
``yes`` (an empty success to every command, even queries); ``panic_on_nmi``
(an NMI panics the guest: GUEST_PANICKED, then SHUTDOWN with reason
guest-panic); ``nofds`` (fds passed over QMP are lost, so ``getfd`` fails);
``nopci`` (``query-pci`` alone fails); ``stallfds`` (``getfd`` and
``add_client`` are never answered); ``stalladd``
(``add_client`` is never answered, and the fd stays registered, as in qemu,
across connections); ``refuseadd`` (``add_client`` refused, its fd left
registered); ``stalllisten`` (``display-update`` is never answered, the
fd left registered); ``refuselisten`` (``display-update`` refused); ``hostile`` (an NMI makes it
send huge events, forged VNC client fields and a SHUTDOWN with a made-up
reason, then exit: a qemu its guest has taken over).  Like
qemu, it takes client sockets passed over QMP (SCM_RIGHTS, ``getfd``,
``add_client``) and serves them as VNC clients, and accepts VNC clients
itself on a listening socket given with ``display-update`` (telling of each
with ``VNC_CONNECTED``).
``VMADMD_STANDIN_VNC=wire`` replaces its VNC (a banner, then echo) with the
bench's wire protocol (see ``wire_session``), so a console path can be timed
at full speed.

Test and bench tooling: the standard library and vmadmd's own socket helpers.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "standin"},
        "capabilities": ["oob"],
    }
}

CANNED: dict[str, Any] = {
    "qmp_capabilities": {},
    "query-version": GREETING["QMP"]["version"],
    "query-status": {"running": True, "singlestep": False, "status": "running"},
    "query-block": [],
    "query-blockstats": [],
    "query-chardev": [{"label": "serial0", "filename": "unix:vm.console", "frontend-open": True}],
    "query-cpus-fast": [{"cpu-index": 0, "thread-id": 0, "target": "x86_64"}],
    "query-kvm": {"enabled": False, "present": False},
    "query-pci": [{"bus": 0, "devices": []}],
    "inject-nmi": {},
    "set_password": {},
    "send-key": {},
}
CANNED["query-commands"] = [
    {"name": name}
    for name in [*CANNED, "screendump", "system_reset", "system_powerdown", "quit", "getfd",
                 "add_client", "closefd", "display-update", "query-vnc-servers"]
]  # fmt: skip

# A 2x2 black PPM and a matching PNG are enough for the screenshot paths.
PPM = b"P6\n2 2\n255\n" + b"\0" * 12


def _event(name: str, **data: Any) -> bytes:
    return (
        json.dumps(
            {"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}}
        ).encode()
        + b"\n"
    )


# qemu 7.2's SHUTDOWN data for the ways a stand-in VM ends.
GUEST_SHUTDOWN = {"guest": True, "reason": "guest-shutdown"}
QMP_QUIT = {"guest": False, "reason": "host-qmp-quit"}
GUEST_PANIC = {"guest": True, "reason": "guest-panic"}


class FakeVm:
    """One VM's QMP and VNC behaviour."""

    def __init__(
        self,
        mode: str,
        on_quit: Callable[[], None],
        vnc_mode: str = "echo",
        on_listen: Callable[[socket.socket | None], None] | None = None,
    ) -> None:
        self.mode = mode
        self.on_quit = on_quit
        self.on_listen = on_listen  # a VNC listener given: for the holder to hold
        self.vnc_mode = vnc_mode
        self.qmp_busy = False
        self.qmp_conn_open: _FdConn | None = None
        self.received_fds: list[int] = []  # with the last message that carried any
        self.named_fds: dict[str, int] = {}
        self.listener: socket.socket | None = None  # given with display-update
        self.commands: list[str] = []  # every QMP command received, in order
        self.arguments: list[dict[str, Any]] = []  # ... and the arguments of each

    def _took_fds(self, fds: list[int]) -> None:
        """As qemu does: new fds replace those not yet claimed by getfd."""
        for fd in self.received_fds:
            os.close(fd)
        if self.mode == "nofds":  # as if the fds were lost on the way
            for fd in fds:
                os.close(fd)
            fds = []
        self.received_fds = fds

    async def qmp_conn(self, sock: socket.socket) -> None:
        conn = _FdConn(sock, self._took_fds)
        if self.qmp_busy:  # qemu serves one QMP client at a time
            conn.close()
            return
        self.qmp_busy = True
        self.qmp_conn_open = conn
        pump = asyncio.create_task(conn.pump())
        try:
            await self._qmp(conn.reader, conn)
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.qmp_busy = False
            self.qmp_conn_open = None
            pump.cancel()
            conn.close()
            self._took_fds([])

    def _fd_command(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        name = str(args.get("fdname", ""))
        if cmd == "getfd":
            if not self.received_fds:
                return _error("No file descriptor supplied via SCM_RIGHTS")
            fd, *rest = self.received_fds
            self.received_fds = []
            for other in rest:
                os.close(other)
            if name in self.named_fds:
                os.close(self.named_fds[name])
            self.named_fds[name] = fd
            return {"return": {}}
        if cmd == "add_client" and self.mode == "refuseadd" and name in self.named_fds:
            return _error("the stand-in refuses this client (its fd stays registered)")
        fd = self.named_fds.pop(name, -1)
        if fd < 0:
            return _error(f"File descriptor named '{name}' has not been found")
        if cmd == "closefd":
            os.close(fd)
            return {"return": {}}
        if args.get("protocol") != "vnc":  # add_client
            os.close(fd)
            return _error("protocol is invalid")
        self.vnc_client(socket.socket(fileno=fd))
        return {"return": {}}

    def display_update(self, args: dict[str, Any]) -> dict[str, Any]:
        """qemu's display-update for VNC: the listeners become ``addresses``
        (the unix socket it was started with is kept as it is)."""
        if self.mode == "refuselisten":
            return _error("the stand-in refuses to listen")
        fds = []
        for address in args.get("addresses", []):
            if address.get("type") == "fd":
                name = str(address.get("str"))
                fd = self.named_fds.pop(name, -1)
                if fd < 0:
                    return _error(f"File descriptor named '{name}' has not been found")
                fds.append(fd)
        loop = asyncio.get_running_loop()
        if self.listener is not None:
            loop.remove_reader(self.listener.fileno())
            self.listener.close()
            self.listener = None
            if not fds and self.on_listen is not None:
                self.on_listen(None)
        for fd in fds:
            sock = socket.socket(fileno=fd)
            sock.listen(1)  # as qemu does
            sock.setblocking(False)
            loop.add_reader(fd, self._accept, sock)
            self.listener = sock
            if self.on_listen is not None:
                self.on_listen(sock)
        return {"return": {}}

    def vnc_servers(self) -> dict[str, Any]:
        server = [{"family": "unix", "host": "", "service": "vm.vnc", "websocket": False}]
        if self.listener is not None:
            host, port = self.listener.getsockname()[:2]
            tcp = {"family": "ipv4", "host": host, "service": str(port), "websocket": False}
            server.append(tcp)
        return {"return": [{"id": "default", "auth": "none", "clients": [], "server": server}]}

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, (host, port) = listener.accept()
        except OSError:
            return
        conn = self.qmp_conn_open
        if conn is not None:
            info = {"family": "ipv4", "host": host, "service": str(port), "websocket": False}
            conn.write(_event("VNC_CONNECTED", server={}, client=info))
            task = asyncio.create_task(conn.drain())
            _TASKS.add(task)
            task.add_done_callback(_TASKS.discard)
        self.vnc_client(client)

    def vnc_client(self, sock: socket.socket) -> None:
        """Serve one connected VNC client (from the unix socket or add_client)."""
        if self.vnc_mode == "wire":
            threading.Thread(target=wire_session, args=(sock,), daemon=True).start()
            return
        sock.setblocking(False)

        async def serve() -> None:
            reader, writer = await asyncio.open_connection(sock=sock)
            await self.vnc(reader, writer)

        task = asyncio.create_task(serve())
        _TASKS.add(task)
        task.add_done_callback(_TASKS.discard)

    async def _qmp(self, reader: asyncio.StreamReader, writer: _FdConn) -> None:
        greeting = json.dumps(GREETING).encode() + b"\n"
        if self.mode == "half":
            writer.write(greeting[: len(greeting) // 2])
            await writer.drain()
            await reader.read()  # until the client gives up
            return
        writer.write(greeting)
        await writer.drain()
        negotiated = False
        async for msg in _json_stream(reader):
            cmd = msg.get("execute", "") if isinstance(msg, dict) else ""
            self.commands.append(str(cmd))
            args = msg.get("arguments") if isinstance(msg, dict) else None
            self.arguments.append(args if isinstance(args, dict) else {})
            reply: dict[str, Any]
            if self.mode == "garbage" and negotiated:
                writer.write(b'}{"return": garbage\n')
                await writer.drain()
                continue
            if self.mode == "stall" and negotiated:
                continue
            if self.mode == "stallfds" and cmd in ("getfd", "add_client"):
                continue
            if self.mode == "stalladd" and cmd == "add_client":
                continue
            if self.mode == "stalllisten" and cmd == "display-update":
                continue
            if self.mode == "nopci" and cmd == "query-pci":
                reply = {"error": {"class": "GenericError", "desc": "no PCI here"}}
            elif self.mode == "error" and negotiated:
                reply = {"error": {"class": "GenericError", "desc": "stand-in says no"}}
            elif self.mode == "yes" and negotiated:
                reply = {"return": {}}
            elif cmd == "inject-nmi" and self.mode == "panic_on_nmi":
                # As a guest booted with unknown_nmi_panic, with pvpanic and
                # qemu's -action panic=shutdown.
                writer.write(json.dumps({"return": {}, **_id(msg)}).encode() + b"\n")
                writer.write(_event("GUEST_PANICKED", action="pause"))
                writer.write(_event("SHUTDOWN", **GUEST_PANIC))
                await writer.drain()
                self.on_quit()
                return
            elif cmd == "inject-nmi" and self.mode == "hostile":
                # A qemu taken over by its guest: huge events, forged fields,
                # terminal escapes; then it goes, saying whatever it likes.
                writer.write(json.dumps({"return": {}, **_id(msg)}).encode() + b"\n")
                for _ in range(8):
                    writer.write(_event("RESET", guest=True, junk="x" * (1 << 20)))
                writer.write(_event("VNC_CONNECTED", client={
                    "family": "ipv4", "host": "\x1b]52;c;ZXZpbA==\x07" + "h" * 5000,
                    "service": "5900", "websocket": False}))  # fmt: skip
                writer.write(_event("SHUTDOWN", guest=False, reason="\x1b[2J\x1b]0;pwned\x07"))
                await writer.drain()
                self.on_quit()
                return
            elif cmd in CANNED:
                reply = {"return": CANNED[cmd]}
            elif cmd in ("getfd", "add_client", "closefd"):
                reply = self._fd_command(cmd, msg.get("arguments", {}))
            elif cmd == "display-update":
                reply = self.display_update(msg.get("arguments", {}))
            elif cmd == "query-vnc-servers":
                reply = self.vnc_servers()
            elif cmd == "screendump":
                path = msg.get("arguments", {}).get("filename", "")
                with open(path, "wb") as f:
                    f.write(PPM)
                reply = {"return": {}}
            elif cmd == "system_reset":
                writer.write(_event("RESET"))
                reply = {"return": {}}
            elif cmd == "system_powerdown":
                writer.write(_event("POWERDOWN"))
                reply = {"return": {}}
                if self.mode != "ignore_acpi":
                    writer.write(json.dumps({**reply, **_id(msg)}).encode() + b"\n")
                    writer.write(_event("SHUTDOWN", **GUEST_SHUTDOWN))
                    await writer.drain()
                    self.on_quit()
                    return
            elif cmd == "quit":
                writer.write(json.dumps({"return": {}, **_id(msg)}).encode() + b"\n")
                writer.write(_event("SHUTDOWN", **QMP_QUIT))
                await writer.drain()
                self.on_quit()
                return
            else:
                reply = {"error": {"class": "CommandNotFound", "desc": f"no {cmd}"}}
            negotiated = True
            writer.write(json.dumps({**reply, **_id(msg)}).encode() + b"\n")
            await writer.drain()

    async def vnc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An RFB banner, then echo."""
        await _echo(reader, writer, b"RFB 003.008\n")


_TASKS: set[asyncio.Task[None]] = set()


def _error(desc: str) -> dict[str, Any]:
    return {"error": {"class": "GenericError", "desc": desc}}


class _FdConn:
    """A QMP connection read with recvmsg, so fds passed with SCM_RIGHTS arrive
    (asyncio's streams read with recv, which drops them)."""

    def __init__(self, sock: socket.socket, on_fds: Callable[[list[int]], None]) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.on_fds = on_fds
        self.reader = asyncio.StreamReader()
        self.out = bytearray()

    async def pump(self) -> None:
        loop = asyncio.get_running_loop()
        space = socket.CMSG_SPACE(16 * 4)
        fd = self.sock.fileno()
        try:
            while True:
                ready: asyncio.Future[None] = loop.create_future()

                def wake(ready: asyncio.Future[None] = ready) -> None:
                    if not ready.done():  # cancelled meanwhile (the pump is closing)
                        ready.set_result(None)

                loop.add_reader(fd, wake)
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                try:
                    data, ancillary, _, _ = self.sock.recvmsg(65536, space)
                except BlockingIOError:
                    continue
                for level, kind, payload in ancillary:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds = array.array("i")
                        fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                        self.on_fds(list(fds))
                if not data:
                    break
                self.reader.feed_data(data)
        except OSError:
            pass
        self.reader.feed_eof()

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        data, self.out = bytes(self.out), bytearray()
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    def close(self) -> None:
        self.sock.close()


async def _serve_unix(name: str, handler: Callable[[socket.socket], Any]) -> socket.socket:
    """Accept on a unix socket at ``name`` (relative to the cwd, as qemu binds, or absolute)."""
    from vmadmd.vm.sockets import bind_unix

    if os.path.exists(name):
        os.unlink(name)
    sock = bind_unix(name, backlog=64)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()

    def accept() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # EAGAIN: drained; anything else: wait for the next wake-up
                return
            result = handler(conn)
            if asyncio.iscoroutine(result):
                task = asyncio.create_task(result)
                _TASKS.add(task)
                task.add_done_callback(_TASKS.discard)

    loop.add_reader(sock.fileno(), accept)
    return sock


# -- the bench's wire protocol ------------------------------------------------

WIRE_CHUNK = 1 << 20


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def wire_session(conn: socket.socket) -> None:
    """One bench session, blocking: a 9-byte header ``>cQ`` (mode, size), then
    ``U`` sink size bytes and answer ``K``; ``D`` send size bytes; ``P`` echo
    until EOF."""
    conn.setblocking(True)
    try:
        mode, size = struct.unpack(">cQ", _recv_exact(conn, 9))
        view = memoryview(bytearray(WIRE_CHUNK))
        left = size
        if mode == b"U":
            while left:
                got = conn.recv_into(view[: min(WIRE_CHUNK, left)])
                if not got:
                    return
                left -= got
            conn.sendall(b"K")
        elif mode == b"D":
            while left:
                n = min(WIRE_CHUNK, left)
                conn.sendall(view[:n])
                left -= n
        elif mode == b"P":
            while data := conn.recv(64):
                conn.sendall(data)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


async def _json_stream(reader: asyncio.StreamReader) -> AsyncIterator[Any]:
    """JSON values as they arrive: QMP clients need not end them with a newline."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await reader.read(65536):
        buf += chunk.decode(errors="replace")
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                value, end = decoder.raw_decode(buf)
            except ValueError:
                if len(buf) > 1 << 20:
                    return
                break
            buf = buf[end:]
            yield value


def _id(msg: dict[str, Any]) -> dict[str, Any]:
    return {"id": msg["id"]} if "id" in msg else {}


def _opt(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _chardev_path(argv: list[str]) -> str | None:
    """The path of the ``-chardev socket,...,path=P`` qemu's serial port is on."""
    spec = _opt(argv, "-chardev")
    if spec is None or not spec.startswith("socket,"):
        return None
    for part in spec.split(","):
        if part.startswith("path="):
            return part[5:]
    return None


async def serial_echo(sock: socket.socket) -> None:
    """A serial port whose "guest" echoes every byte at once (qemu serves one
    client at a time: later ones wait, as with qemu)."""
    sock.setblocking(False)
    await _echo(*await asyncio.open_connection(sock=sock))


async def _echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bytes = b""
) -> None:
    """Send ``first``, then every byte back, until the peer leaves."""
    try:
        writer.write(first)
        await writer.drain()
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _sink(sock: socket.socket) -> None:
    """A serial port whose "guest" reads everything and says nothing."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


def _unix_name(spec: str | None) -> str | None:
    if spec is None or not spec.startswith("unix:"):
        return None
    return spec[5:].split(",")[0]


async def _serve_one(argv: list[str], ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    vm = FakeVm(
        os.environ.get("VMADMD_STANDIN_QMP", "normal"),
        done.set,
        os.environ.get("VMADMD_STANDIN_VNC", "echo"),
    )
    servers = []
    for flag, handler in (("-qmp", vm.qmp_conn), ("-vnc", vm.vnc_client)):
        name = _unix_name(_opt(argv, flag))
        if name is not None:
            servers.append(await _serve_unix(name, handler))
    serial = _chardev_path(argv)
    if serial is not None:
        servers.append(await _serve_unix(serial, serial_echo))
    if "socket,id=ttyb,path=vm.ttyb,server=on,wait=off" in argv:
        # The guest's ttyS1: a guest that never asks for its metadata.
        servers.append(await _serve_unix("vm.ttyb", _sink))
    pidfile = _opt(argv, "-pidfile")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    for server in servers:
        asyncio.get_running_loop().remove_reader(server.fileno())
        server.close()


def run_as_qemu(argv: list[str]) -> int:
    """Behave like ``qemu-system-x86_64 ... -daemonize``."""
    if "-daemonize" not in argv:
        asyncio.run(_serve_one(argv, None))
        return 0
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ok = os.read(r, 1) == b"1"
        return 0 if ok else 1
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    asyncio.run(_serve_one(argv, w))
    os._exit(0)


# -- hub mode: many VMs from one process ---------------------------------------


# A stand-in VM's "qemu" process, when no C compiler is at hand: listens on
# the sockets it inherited (so it is their server to SO_PEERCRED, as qemu is
# of its own sockets), then becomes a busybox shell (same pid, a few hundred
# KiB: a hub runs a thousand) that says so and lives until killed.  It cannot
# hold a VNC listener (``holder.c`` does), so a restarted daemon re-gives one.
HOLDER = (
    "import os, socket, sys\n"
    "for fd in filter(None, sys.argv[1].split(',')):\n"
    "    socket.socket(fileno=int(fd)).listen(64)\n"
    "os.execvp('busybox', ['busybox', 'sh', '-c', 'echo up; read x', *sys.argv[3:]])\n"
)
_HOLDER_C = os.path.join(os.path.dirname(os.path.abspath(__file__)), "holder.c")
_holder_bin: list[str | None] = []


def holder_binary() -> str | None:
    """``holder.c`` built once (in the checkout's ``.cache``), or None."""
    if _holder_bin:
        return _holder_bin[0]
    import shutil
    import subprocess
    import tempfile

    built: str | None = None
    cache = os.path.join(os.path.dirname(_HOLDER_C), "..", ".cache", "holder")
    target = os.path.join(cache, "holder")
    try:
        fresh = os.path.getmtime(target) >= os.path.getmtime(_HOLDER_C)
    except OSError:
        fresh = False
    if fresh:
        built = target
    elif (cc := shutil.which("cc") or shutil.which("gcc")) is not None:
        os.makedirs(cache, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache)
        os.close(fd)
        ok = subprocess.run([cc, "-O2", "-o", tmp, _HOLDER_C], check=False).returncode == 0
        if ok:
            os.replace(tmp, target)  # two builders at once: either one's binary
            built = target
        else:
            os.unlink(tmp)
    _holder_bin.append(built)
    return built


class ServedVm:
    """One stand-in VM served from the caller's event loop.

    Its "qemu" is a holder process (``HOLDER``) whose command line
    carries ``-uuid <uuid>`` and whose pid is written to ``vm.pid``, so the
    daemon's identity check and pidfd see it as they see qemu; the VM
    "exits" when the holder does (a quit or a powerdown kills it).  Used by
    the hub and by the in-process tests.
    """

    def __init__(self, vm: FakeVm, holder: asyncio.subprocess.Process,
                 servers: list[socket.socket]) -> None:  # fmt: skip
        self.vm = vm
        self.holder = holder
        self.servers = servers
        self.ttyb: asyncio.Queue[socket.socket] = asyncio.Queue()  # guest ends of vm.ttyb
        self.ctl: socket.socket | None = None  # to the holder: listeners it holds
        # As when qemu dies: its sockets close with it.
        self._hang_up = asyncio.create_task(self._close_when_gone())

    async def _close_when_gone(self) -> None:
        await self.holder.wait()
        conn = self.vm.qmp_conn_open
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    @classmethod
    async def start(
        cls,
        runtime_dir: str,
        uuid: str,
        mode: str = "normal",
        *,
        vnc: bool = True,
        vnc_password: bool = False,
    ) -> ServedVm:
        """``vnc_password``: as a qemu started with VNC password auth (what
        vmadm does by default), so a daemon that requires one serves it."""
        os.makedirs(runtime_dir, exist_ok=True)
        holder: list[asyncio.subprocess.Process] = []

        def quit_vm() -> None:
            if holder and holder[0].returncode is None:
                holder[0].kill()

        # The hub's end of the holder's control socket: a VNC listener given
        # to the stand-in is passed on for the holder to hold, as qemu holds
        # its own.
        ctl, holder_ctl = socket.socketpair()

        def hold(listener: socket.socket | None) -> None:
            with contextlib.suppress(OSError):
                if listener is None:
                    ctl.send(b"-")
                else:
                    socket.send_fds(ctl, [b"L"], [listener.fileno()])

        vm = FakeVm(mode, quit_vm, on_listen=hold)
        servers = [await _serve_unix(os.path.join(runtime_dir, "vm.qmp"), vm.qmp_conn)]
        if vnc:
            servers.append(await _serve_unix(os.path.join(runtime_dir, "vm.vnc"), vm.vnc_client))
        # The guest's ttyS1: each connection (the daemon's metadata agent) is
        # handed to the test, which plays the guest on it.
        ttyb: asyncio.Queue[socket.socket] = asyncio.Queue()
        servers.append(await _serve_unix(os.path.join(runtime_dir, "vm.ttyb"), ttyb.put_nowait))
        # qemu's identity and VNC mode are read off the command line.
        vnc_spec = "unix:vm.vnc,password=on" if vnc_password else "unix:vm.vnc"
        argv = ["-uuid", uuid, *(["-vnc", vnc_spec] if vnc else [])]
        # The holder calls listen() on the sockets too: the kernel then names
        # it as their server (SO_PEERCRED), as qemu is for its own sockets,
        # and the daemon's peer check sees the VM's "qemu" serving them.
        fds = [server.fileno() for server in servers]
        built = holder_binary()
        start = [built] if built is not None else [sys.executable, "-S", "-c", HOLDER]
        proc = await asyncio.create_subprocess_exec(
            *start, ",".join(map(str, fds)), str(holder_ctl.fileno()), *argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            pass_fds=[*fds, holder_ctl.fileno()],
        )  # fmt: skip
        holder_ctl.close()
        holder.append(proc)
        # It says so once it listens (and has exec'd: its command line is
        # its own), as qemu writes its pidfile only once it is up.
        assert proc.stdout is not None
        await proc.stdout.readline()
        with open(os.path.join(runtime_dir, "vm.pid"), "w") as f:
            f.write(f"{proc.pid}\n")
        served = cls(vm, proc, servers)
        served.ctl = ctl
        served.ttyb = ttyb
        return served

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """End the "qemu" at once, as a crash or a signal would: no QMP event."""
        if self.holder.returncode is None:
            self.holder.send_signal(sig)

    async def close(self) -> None:
        self.kill()
        await self.holder.wait()
        if self.ctl is not None:
            self.ctl.close()
        loop = asyncio.get_running_loop()
        for server in self.servers:
            loop.remove_reader(server.fileno())
            server.close()


async def hub(zones_root: str, uuids: list[str]) -> None:
    """Serve every listed VM's sockets; each VM's liveness is a holder process."""
    from vmadmd.vm.store import Store

    store = Store(zones_root)
    # As vmadm starts qemu by default: with VNC password auth.
    served = [await ServedVm.start(store.paths(u).runtime_dir, u, vnc_password=True) for u in uuids]
    print(f"standin hub: {len(uuids)} VMs up", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for vm in served:
        await vm.close()


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["hub"]:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        zones_root = argv[1]
        from vmadmd.vm.ids import is_uuid

        # Every VM directory (not the zones root's own files: the uid lock).
        uuids = argv[2:] or sorted(n for n in os.listdir(zones_root) if is_uuid(n))
        asyncio.run(hub(zones_root, uuids))
        return 0
    return run_as_qemu(argv)


if __name__ == "__main__":
    sys.exit(main())
