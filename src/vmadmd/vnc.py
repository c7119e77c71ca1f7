"""VNC consoles on TCP: one listener per running VM, proxying to ``vm.vnc``.

Every client gets a fresh connection to qemu's VNC unix socket; bytes are
relayed by a pair of asyncio Protocols in the daemon's one event loop (no
process or thread per connection).  Back-pressure is end to end: when one
side's write buffer passes its high-water mark, reading from the other side
pauses, so a slow client costs bounded memory, and an idle session costs
no CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from .metrics import Metrics
from .sockets import connect_unix

log = logging.getLogger("vmadmd.vnc")

WRITE_HIGH_WATER = 512 * 1024
CONNECT_RETRIES = 200  # qemu's VNC socket has a tiny backlog: EAGAIN is retried


async def connect_upstream(directory: str, name: str) -> socket.socket:
    """A fresh connection to qemu's VNC socket.

    qemu's VNC unix socket has a tiny listen backlog: under a burst of
    clients a non-blocking connect fails with EAGAIN, which is retried here
    rather than mistaken for a connection.
    """
    for _ in range(CONNECT_RETRIES):
        try:
            return connect_unix(directory, name, blocking=False)
        except BlockingIOError:
            await asyncio.sleep(0.005)
    raise OSError("the VNC socket's backlog stayed full")


async def open_upstream(
    directory: str, name: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``connect_upstream`` as asyncio streams (for the WebSocket relay)."""
    sock = await connect_upstream(directory, name)
    try:
        return await asyncio.open_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


class _Half(asyncio.Protocol):
    """One side of a proxied session; forwards what it reads to its peer."""

    def __init__(self, session: _Session, *, is_client: bool) -> None:
        self.session = session
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.bytes_in = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        if self.is_client:
            self.session.start()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        metrics = self.session.listener.metrics
        if metrics is not None:
            metrics.vnc_bytes.inc(len(data))
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def eof_received(self) -> bool | None:
        return False  # close this side; connection_lost closes the peer

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.close()


class _Session:
    def __init__(self, listener: VncListener) -> None:
        self.listener = listener
        self.client = _Half(self, is_client=True)
        self.upstream = _Half(self, is_client=False)
        self.closed = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.client.transport is not None
        # Hold the client's bytes until qemu is connected.
        self.client.transport.pause_reading()
        self._task = asyncio.create_task(self._connect_upstream())

    async def _connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            sock = await connect_upstream(self.listener.directory, self.listener.name)
        except OSError as err:
            log.warning("vm %s: VNC upstream connect failed: %s", self.listener.uuid, err)
            self.close()
            return
        if self.closed:
            sock.close()
            return
        try:
            await loop.create_connection(lambda: self.upstream, sock=sock)
        except OSError as err:
            sock.close()
            log.warning("vm %s: VNC upstream failed: %s", self.listener.uuid, err)
            self.close()
            return
        if self.closed:
            if self.upstream.transport is not None:
                self.upstream.transport.close()
            return
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        assert self.client.transport is not None
        self.client.transport.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for half in (self.client, self.upstream):
            if half.transport is not None:
                half.transport.close()
        self.listener._session_closed(self)


class VncListener:
    """A TCP listener for one VM's console."""

    def __init__(
        self,
        uuid: str,
        directory: str,
        name: str,
        host: str,
        port: int,
        metrics: Metrics | None = None,
    ) -> None:
        self.uuid = uuid
        self.metrics = metrics
        self.directory = directory
        self.name = name
        self.host = host
        self.wanted_port = port
        self.port: int | None = None
        self.error: str | None = None
        self._server: asyncio.base_events.Server | None = None
        self.sessions: set[_Session] = set()
        self.bytes_proxied = 0

    async def open(self) -> bool:
        """Bind; on failure keep the reason in ``error`` and return False."""
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                self._new_session, self.host, self.wanted_port, reuse_address=True
            )
        except OSError as err:
            self.error = f"cannot listen on {self.host}:{self.wanted_port}: {err.strerror or err}"
            log.error("vm %s: %s", self.uuid, self.error, extra={"vm": self.uuid})
            if self.metrics is not None:
                self.metrics.vnc_listener_errors.inc()
            return False
        sockname = self._server.sockets[0].getsockname()
        self.port = int(sockname[1])
        return True

    def _new_session(self) -> asyncio.Protocol:
        session = _Session(self)
        self.sessions.add(session)
        return session.client

    def _session_closed(self, session: _Session) -> None:
        self.bytes_proxied += session.client.bytes_in + session.upstream.bytes_in
        self.sessions.discard(session)

    async def close(self) -> None:
        """Stop listening and end every open session."""
        if self._server is not None:
            self._server.close()
            for session in list(self.sessions):
                session.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None
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
