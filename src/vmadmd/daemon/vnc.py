"""VNC consoles on TCP: one listener per running VM.

By default (``--vnc-relay listen``) the daemon binds the listener and gives
the listening socket to qemu (``give_to_qemu``): qemu accepts and serves
every client itself, the daemon is on no session's path, and the console
stays up while the daemon restarts.  Until qemu has it, and for good when
qemu cannot take it, the daemon accepts on it as described next.

A client accepted on the listener is handed to qemu itself:
the daemon passes the connected socket over QMP (``getfd`` +
``add_client``) and closes its copy, so qemu's VNC server talks to the
client directly.  The session then runs at the speed of a plain TCP
connection, costs the daemon nothing, and survives a daemon restart.

When qemu surely has not taken the client (its QMP connection is down or
wedged, it refuses, or it does not have the commands), when ``vm.vnc`` is
no longer the socket qemu bound, or with ``--vnc-relay proxy``, the daemon
relays instead: a fresh connection to qemu's VNC unix socket, bytes moved
client -> qemu with splice(2) through a pipe and qemu -> client through one
fixed buffer, driven by the daemon's one event loop (no process or thread
per connection).  Back-pressure is end to end: a side that cannot take more
stops the other side being read, so a slow client costs bounded memory, and
an idle session costs no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.vm.sockets import Peer, connect_unix_retrying

log = logging.getLogger("vmadmd.vnc")

PIPE_SIZE = 1 << 20  # per direction: the session's whole buffer
MAX_SESSIONS = 256  # relayed sessions per listener
MAX_PENDING = 128  # clients being handed to qemu at once, per listener
BACKLOG = 128  # connections the kernel queues on a listener (qemu would set 1)
RELAY_IDLE = 3600.0  # a relayed session with no byte either way this long is closed
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

# Gives a client's socket fd to qemu: True if qemu took it, False if it
# certainly did not; raises when that is unknown.
Handoff = Callable[[int], Awaitable[bool]]


REBIND_TRIES = 10  # ... 5 ms apart: qemu binds vm.vnc anew on display-update
REBIND_DELAY = 0.005


async def connect_upstream(directory: str, name: str, peer: Peer | None) -> socket.socket:
    """A fresh connection to qemu's VNC socket, served by ``peer`` (the VM's
    qemu: a socket planted at that name is refused, ``WrongPeer``).

    ``display-update`` (the listen mode) makes qemu unlink ``vm.vnc`` and
    bind it again: a connection that lands in between is tried again a few
    times (50 ms in all) before the error stands.
    """
    for _ in range(REBIND_TRIES - 1):
        try:
            return await connect_unix_retrying(directory, name, peer)
        except (FileNotFoundError, ConnectionRefusedError):
            await asyncio.sleep(REBIND_DELAY)
    return await connect_unix_retrying(directory, name, peer)


async def open_upstream(
    directory: str, name: str, peer: Peer | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``connect_upstream`` as asyncio streams (for the WebSocket relay)."""
    sock = await connect_upstream(directory, name, peer)
    try:
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


def file_inode(directory: str, name: str) -> int | None:
    """The inode of ``directory/name``, None if there is nothing there."""
    try:
        return os.stat(os.path.join(directory, name)).st_ino
    except OSError:
        return None


class ListenTable:
    """Which sockets listen on which TCP port, read from ``/proc/net/tcp{,6}``.

    Each read walks every TCP socket of the host, so a daemon picking up a
    thousand VMs at once must not read it once per VM (that was most of a
    restart's 12 s with 1,000 VMs).  A caller gets a read that began after it
    asked, so it sees every socket that existed then; callers that ask while
    a read is under way share the next one.  Thread-safe (called from worker
    threads).
    """

    def __init__(self, tables: tuple[str, ...] = ("/proc/net/tcp", "/proc/net/tcp6")) -> None:
        self._tables = tables
        self._lock = threading.Lock()
        self._began = float("-inf")
        self._ports: dict[int, set[str]] = {}
        self.reads = 0

    def inodes(self, port: int) -> set[str]:
        """The inodes of the sockets listening on ``port`` (any address)."""
        asked = time.monotonic()
        with self._lock:
            if self._began < asked:
                self._began = time.monotonic()
                self._ports = self._read()
                self.reads += 1
            return self._ports.get(port, set())

    def _read(self) -> dict[int, set[str]]:
        ports: dict[int, set[str]] = {}
        for table in self._tables:
            try:
                with open(table, encoding="ascii", errors="replace") as f:
                    next(f, None)  # the header
                    for line in f:
                        fields = line.split()
                        # local_address is HEX_ADDR:HEX_PORT; state 0A is LISTEN.
                        if len(fields) > 9 and fields[3] == "0A":
                            port = int(fields[1].rsplit(":", 1)[1], 16)
                            ports.setdefault(port, set()).add(fields[9])
            except (OSError, ValueError):
                continue
        return ports


LISTENING = ListenTable()


def listens_on(pid: int, port: int, table: ListenTable = LISTENING) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port``.

    What qemu says over QMP (``query-vnc-servers``) is qemu's word, and a
    qemu taken over by its guest may claim any port (another VM's console,
    say): a port is adopted as this VM's console only when the kernel shows
    the listening socket among that very process's fds.
    """
    inodes = table.inodes(port)
    if not inodes:
        return False
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


class _Pump:
    """Moves bytes one way, ``src`` -> ``dst``, through a pipe with splice(2).

    Written by hand: no library relays between two sockets inside an asyncio
    loop with splice.  The bytes never enter Python (measured here: asyncio
    Protocols move ~1.2-2.6 GB/s, splice through a pipe ~4.3 GB/s).  The
    buffer is the only one: while ``dst`` cannot take more, ``src`` is not
    read, so a slow peer costs one buffer (bounded memory), never a queue.
    Subclasses change only how the buffer is filled and drained.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: int, dst: int, session: _Session
    ) -> None:
        self.loop = loop
        self.src = src
        self.dst = dst
        self.session = session
        self.pipe = self._make_buffer()
        self.buffered = 0
        self.reading = False
        self.writing = False

    def _make_buffer(self) -> tuple[int, ...]:
        """The pipe that is this direction's buffer (read end, write end)."""
        pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe_w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return pipe_r, pipe_w

    def _fill(self) -> int:
        """Read from ``src`` into the (empty) buffer; 0 at EOF."""
        return os.splice(self.src, self.pipe[1], PIPE_SIZE, flags=SPLICE_FLAGS)

    def _drain(self) -> int:
        """Write buffered bytes to ``dst``; returns how many went."""
        return os.splice(self.pipe[0], self.dst, self.buffered, flags=SPLICE_FLAGS)

    def start(self) -> None:
        self._read_on()

    def _read_on(self) -> None:
        if not self.reading:
            self.loop.add_reader(self.src, self._on_readable)
            self.reading = True

    def _read_off(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src)
            self.reading = False

    def _on_readable(self) -> None:
        try:
            n = self._fill()
        except BlockingIOError:
            return  # spurious wake-up
        except OSError:
            self.session.close()
            return
        if n == 0:  # EOF: the session is over
            self.session.close()
            return
        self.buffered = n
        self.session.last_active = self.loop.time()
        self.session.listener.metrics.vnc_bytes.inc(n)
        self._flush()

    def _flush(self) -> None:
        while self.buffered:
            try:
                n = self._drain()
            except BlockingIOError:
                # dst is full: stop reading src until dst drains.
                self._read_off()
                if not self.writing:
                    self.loop.add_writer(self.dst, self._on_writable)
                    self.writing = True
                return
            except OSError:
                self.session.close()
                return
            self.buffered -= n
        self._read_on()

    def _on_writable(self) -> None:
        self.loop.remove_writer(self.dst)
        self.writing = False
        self._flush()

    def close(self) -> None:
        self._read_off()
        if self.writing:
            self.loop.remove_writer(self.dst)
            self.writing = False
        for fd in self.pipe:
            with contextlib.suppress(OSError):
                os.close(fd)


class _CopyPump(_Pump):
    """The same pump, copying through one fixed buffer instead of splicing.

    Used for qemu -> client: splicing *from* a unix socket moves one small
    skb per call here (measured: ~1.1 GB/s against ~1.6 GB/s copying through
    a 1 MiB buffer), while splicing from TCP is the fast way the other way.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, src: int, dst: int, session: _Session
    ) -> None:
        self.buf = bytearray(PIPE_SIZE)
        self.view = memoryview(self.buf)
        self.offset = 0
        super().__init__(loop, src, dst, session)

    def _make_buffer(self) -> tuple[int, ...]:
        return ()  # no pipe: the bytearray is the buffer

    def _fill(self) -> int:
        self.offset = 0
        return os.readv(self.src, [self.buf])

    def _drain(self) -> int:
        n = os.write(self.dst, self.view[self.offset : self.offset + self.buffered])
        self.offset += n
        return n


class _Session:
    """A client and its own connection to qemu, relayed both ways."""

    def __init__(self, listener: VncListener, client: socket.socket) -> None:
        self.listener = listener
        self.client = client
        self.upstream: socket.socket | None = None
        self.pumps: list[_Pump] = []
        self.closed = False
        self._task: asyncio.Task[None] | None = None
        self.last_active = asyncio.get_running_loop().time()

    def start(self) -> None:
        # Nothing is read from the client until qemu is connected.
        self._task = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        try:
            upstream = await connect_upstream(
                self.listener.directory, self.listener.name, self.listener.peer
            )
        except OSError as err:
            vm_log(log, self.listener.uuid).warning("VNC upstream connect failed: %s", err)
            self.close()
            return
        if self.closed:
            upstream.close()
            return
        self.upstream = upstream
        loop = asyncio.get_running_loop()
        self.pumps = [
            _Pump(loop, self.client.fileno(), upstream.fileno(), self),
            _CopyPump(loop, upstream.fileno(), self.client.fileno(), self),
        ]
        for pump in self.pumps:
            pump.start()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for pump in self.pumps:
            pump.close()
        for sock in (self.client, self.upstream):
            if sock is not None:
                sock.close()
        self.listener.sessions.discard(self)


class VncListener:
    """A TCP listener for one VM's console."""

    def __init__(
        self,
        uuid: str,
        directory: str,
        name: str,
        host: str,
        port: int,
        metrics: Metrics,
        handoff: Handoff | None = None,
        qemu_inode: Callable[[], int | None] | None = None,
        *,
        max_sessions: int = MAX_SESSIONS,
        max_pending: int = MAX_PENDING,
        idle_timeout: float = RELAY_IDLE,
        peer: Peer | None = None,
    ) -> None:
        self.uuid = uuid
        self.peer = peer  # the qemu that must serve vm.vnc
        self.max_sessions = max_sessions
        self.max_pending = max_pending
        self.idle_timeout = idle_timeout
        self._reaper: asyncio.Task[None] | None = None
        self.metrics = metrics
        self.handoff = handoff
        # The inode of the socket file qemu bound, when known (see
        # _upstream_is_qemu).
        self.qemu_inode = qemu_inode
        self.directory = directory
        self.name = name
        self.host = host
        self.wanted_port = port
        self.port: int | None = None
        self.error: str | None = None
        self._sock: socket.socket | None = None
        self.sessions: set[_Session] = set()  # proxied by the daemon
        self._pending: set[asyncio.Task[None]] = set()  # handoffs under way (kept referenced)
        # qemu accepts on the listening socket itself (see give_to_qemu):
        # True once it does, None while that is unknown.
        self.in_qemu: bool | None = False

    async def open(self) -> bool:
        """Bind; on failure keep the reason in ``error`` and return False."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            # SO_REUSEADDR lets a restarted daemon rebind a port with old
            # connections in TIME_WAIT; it never lets two listeners share one.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.wanted_port))
            sock.listen(BACKLOG)
            sock.setblocking(False)
        except OSError as err:
            sock.close()
            self.error = f"cannot listen on {self.host}:{self.wanted_port}: {err.strerror or err}"
            vm_log(log, self.uuid).error("%s", self.error)
            self.metrics.vnc_listener_errors.inc()
            return False
        self._sock = sock
        self.port = int(sock.getsockname()[1])
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept)
        self._reaper = asyncio.create_task(self._reap_idle(), name=f"vnc-idle-{self.uuid}")
        return True

    def adopt(self, port: int) -> None:
        """qemu already accepts on ``port`` (given it by an earlier daemon)."""
        self.port = port
        self.in_qemu = True

    async def give_to_qemu(self, give: Callable[[int], Awaitable[bool]]) -> bool:
        """Let qemu accept on this listener itself; the daemon stops accepting.

        Until then the daemon accepted (handing clients off or relaying
        them), so a client that came early was served too.  When it is
        unknown whether qemu took the socket (no answer), both may accept
        from the one queue: each client is served whole by one of them.
        """
        sock = self._sock
        if sock is None:
            return False
        self.in_qemu = None
        # A copy of our own: closing the listener meanwhile must not let its
        # number be reused (and passed) for another file.
        fd = os.dup(sock.fileno())
        try:
            given = await give(fd)
        except Exception as err:
            vm_log(log, self.uuid).warning("VNC listener given to qemu or not: %s", err)
            return False
        finally:
            os.close(fd)
        if not given:
            self.in_qemu = False
            return False
        self.in_qemu = True
        # The same socket as qemu's copy: qemu set its backlog to 1, which
        # would turn a burst of clients away (SYNs dropped, 1 s retries).
        with contextlib.suppress(OSError):
            sock.listen(BACKLOG)
        if self._sock is sock:
            asyncio.get_running_loop().remove_reader(sock.fileno())
            self._sock = None
        sock.close()
        return True

    async def _reap_idle(self) -> None:
        """End relayed sessions with no byte either way for ``idle_timeout`` s."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(self.idle_timeout / 4, 30.0))
            now = loop.time()
            for session in list(self.sessions):
                if now - session.last_active > self.idle_timeout:
                    vm_log(log, self.uuid).info("relayed VNC session idle: closed")
                    session.close()

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(64):  # drain a burst, then let others run
            try:
                client, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: this client only
                vm_log(log, self.uuid).warning("VNC accept failed: %s", err)
                return
            if len(self.sessions) >= self.max_sessions or len(self._pending) >= self.max_pending:
                # One console's clients must not take the daemon's fds.
                client.close()
                self._count("refused")
                continue
            client.setblocking(False)
            with contextlib.suppress(OSError):
                client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.handoff is None:
                self._proxy(client)
            else:
                task = asyncio.create_task(self._hand_off(client, self.handoff))
                self._pending.add(task)
                task.add_done_callback(self._pending.discard)

    def _proxy(self, client: socket.socket) -> None:
        session = _Session(self, client)
        self.sessions.add(session)
        session.start()
        self._count("proxied")

    def _upstream_is_qemu(self) -> bool:
        """Whether ``vm.vnc`` is still the socket file qemu bound.

        A handed-off client reaches qemu's VNC server, not whatever is at
        ``vm.vnc``; the two are the same while nobody has put another socket
        there (a stat per client: microseconds, no connection).
        """
        qemus = self.qemu_inode() if self.qemu_inode is not None else None
        return qemus is not None and file_inode(self.directory, self.name) == qemus

    async def _hand_off(self, client: socket.socket, handoff: Handoff) -> None:
        """Give the client to qemu; relay it ourselves only if qemu surely has not."""
        try:
            taken = self._upstream_is_qemu() and await handoff(client.fileno())
        except asyncio.CancelledError:
            client.close()  # the daemon is shutting down
            raise
        except Exception as err:
            # qemu may or may not hold the client now: serving it twice
            # would garble both sessions, so the daemon lets go of it (qemu
            # serves it, or it sees its connection close).
            vm_log(log, self.uuid).warning("VNC handoff cut short, client left to qemu: %s", err)
            client.close()
            self._count("unknown")
            return
        if taken:
            client.close()  # qemu has its own copy
            self._count("handed_off")
        elif self._sock is None:
            client.close()  # closed meanwhile
        else:
            self._proxy(client)

    def _count(self, outcome: str) -> None:
        self.metrics.vnc_clients.labels(outcome).inc()

    async def close(self) -> None:
        """Stop listening and end every session the daemon relays.

        Sessions handed to qemu are qemu's: they end when their client
        leaves or qemu exits (as an established session did in SmartOS when
        vmadmd closed a VM's VNC server).
        """
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._reaper is not None:
            self._reaper.cancel()
        # Handoffs under way are left to finish: cancelling one after qemu
        # got the fd would leave qemu holding a client nobody serves.
        for session in list(self.sessions):
            session.close()

    def info(self, password: str | None) -> dict[str, Any]:
        if self.error is not None:
            return {"error": self.error}
        if self.port is None:
            return {}
        out: dict[str, Any] = {"host": self.host, "port": self.port}
        if self.port >= 5900:
            out["display"] = self.port - 5900
        else:
            out["display"] = None
        if password:
            out["password"] = password
        return out
