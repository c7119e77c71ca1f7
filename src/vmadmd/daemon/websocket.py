"""WebSocket sessions (RFC 6455) on wsproto, for every WebSocket route of the daemon.

The server (``server.py``) accepts the upgrade through h11 (the 101 answer,
its ``Sec-WebSocket-Accept`` from wsproto), then gives this module the
connection and every byte h11 read past the request (``trailing_data``):
from there wsproto alone reads frames.  A ``WebSocket`` is what a session
(``Reply.session``) holds: ``receive`` a message's bytes (a fragment of a
long one as it comes: the sessions here relay byte streams), ``send`` with
back-pressure, ``close`` with a reason.  Pings are answered here.

Bounds: a client whose messages are not consumed stops being read once
``MAX_PENDING`` bytes wait; a client that does not read what it is sent
for the listener's client timeout is cut off (a session would otherwise
wait on it forever).

Also here, the sessions' shared plumbing: ``run_session`` (its sides, the
first to end closes the socket with its reason) and ``serial_relay`` (a
serial console viewer, on the API socket and the console listener alike).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

from wsproto.connection import Connection, ConnectionState, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError, generate_accept_token

if TYPE_CHECKING:
    from vmadmd.daemon.serial import SerialConsole, Viewer

log = logging.getLogger("vmadmd.api")

MAX_PENDING = 1 << 20
CLOSE_OK, CLOSE_GOING_AWAY, CLOSE_PROTOCOL_ERROR = 1000, 1001, 1002


def accept_token(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a client's ``Sec-WebSocket-Key``."""
    return generate_accept_token(key.encode("latin-1")).decode()


class Transport(Protocol):
    """What a WebSocket needs of its connection (``server.HttpProtocol``)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class WebSocket:
    """The server side of one WebSocket connection."""

    def __init__(self, transport: Transport, trailing: bytes = b"") -> None:
        self._transport = transport
        self._conn = Connection(ConnectionType.SERVER)
        self._incoming: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self.closed = False
        self.close_code: int | None = None
        if trailing:
            self.feed(trailing)

    # -- from the connection ---------------------------------------------------

    def feed(self, data: bytes | None) -> None:
        """Bytes read from the client (None: it closed its side)."""
        if self.closed:
            return
        self._conn.receive_data(data)
        try:
            for event in self._conn.events():
                if isinstance(event, Message):
                    payload = event.data
                    if isinstance(event, TextMessage):
                        payload = event.data.encode()
                    if payload:
                        self._incoming.append(bytes(payload))
                        self._pending += len(payload)
                elif isinstance(event, Ping):
                    self._write(self._conn.send(event.response()))
                elif isinstance(event, CloseConnection):
                    self.close_code = event.code
                    if self._conn.state is ConnectionState.REMOTE_CLOSING:
                        self._write(self._conn.send(event.response()))
                    self._end()
                    return
        except RemoteProtocolError as err:
            log.debug("WebSocket protocol error: %s", err)
            with contextlib.suppress(LocalProtocolError):
                self._write(self._conn.send(CloseConnection(CLOSE_PROTOCOL_ERROR, str(err)[:100])))
            self._end()
            return
        if data is None:
            self._end()
            return
        if self._pending > MAX_PENDING and not self._paused:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def connection_lost(self) -> None:
        self.closed = True
        self._wake()

    # -- for the session ---------------------------------------------------------

    async def receive(self) -> bytes | None:
        """The next bytes the client sent; None once the socket is closed."""
        while not self._incoming:
            if self.closed:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = self._incoming.popleft()
        self._pending -= len(data)
        if self._paused and self._pending <= MAX_PENDING // 2:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def send(self, data: bytes) -> None:
        """Send one binary message; waits while the client is behind."""
        if self.closed or self._conn.state is not ConnectionState.OPEN:
            raise ConnectionResetError("the WebSocket is closed")
        self._write(self._conn.send(BytesMessage(data=data)))
        await self._transport.drain()

    async def close(self, code: int = CLOSE_OK, reason: str = "") -> None:
        """Close with ``code`` and ``reason`` (cut to fit a close frame)."""
        if self.closed:
            return
        if self._conn.state is ConnectionState.OPEN:
            reason = reason.encode()[:120].decode(errors="ignore")
            with contextlib.suppress(LocalProtocolError):
                self._write(self._conn.send(CloseConnection(code, reason)))
        self._end()

    # -- inside --------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if data and not self.closed:
            self._transport.write(data)

    def _end(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport.close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def run_session(ws: WebSocket, *sides: Callable[[], Coroutine[Any, Any, str]]) -> None:
    """Run a WebSocket session's sides until the first ends; close with its reason.

    Each side returns why the session ended ("" when the client left); the
    others are cancelled, and the socket is closed with that reason.
    """
    tasks = [asyncio.create_task(side()) for side in sides]
    reason = ""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        reason = next(iter(done)).result()
    except (ConnectionError, OSError, TimeoutError):
        reason = "connection lost"
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    await ws.close(CLOSE_OK, reason)


def idle_side(
    idle_timeout: float, last_input: Callable[[], float]
) -> Callable[[], Coroutine[Any, Any, str]]:
    """A session side that ends it once the client typed nothing for ``idle_timeout``."""

    async def idle() -> str:
        while True:
            left = last_input() + idle_timeout - time.monotonic()
            if left <= 0:
                return "idle timeout"
            await asyncio.sleep(left)

    return idle


async def serial_relay(
    ws: WebSocket, console: SerialConsole, viewer: Viewer, idle_timeout: float | None = None
) -> None:
    """Serve one serial console viewer until either side ends (or it sits idle
    ``idle_timeout`` seconds, when given); closes the socket with the reason."""
    last_input = time.monotonic()

    async def to_viewer() -> str:
        while (chunk := await viewer.next()) is not None:
            await ws.send(chunk)
        return viewer.reason

    async def from_viewer() -> str:
        nonlocal last_input
        while (data := await ws.receive()) is not None:
            last_input = time.monotonic()
            await console.write(data)
        return ""

    sides = [to_viewer, from_viewer]
    if idle_timeout is not None:
        sides.append(idle_side(idle_timeout, lambda: last_input))
    try:
        await run_session(ws, *sides)
    finally:
        console.detach(viewer)
