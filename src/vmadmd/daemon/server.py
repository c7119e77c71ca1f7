"""The daemon's HTTP server: HTTP/1.1 on h11, WebSocket on wsproto, over asyncio.

One implementation serves both listeners: the API's unix socket and the
browser-console listener (TCP, TLS through asyncio's ``ssl``).  Each
connection is an ``h11.Connection`` fed the bytes asyncio reads; h11 does
all the parsing (request line, headers, ``Content-Length`` or chunked
bodies, HTTP/1.0, ``Expect``, pipelining, upgrades), so no HTTP is parsed
by hand here.  A request, its body read in full, goes to the listener's
``Service.dispatch`` (``http.py``): one envelope for every route.  What the
server refuses itself (a malformed head, a body past the bound, both
``Content-Length`` and ``Transfer-Encoding``: a smuggling vector) is
answered by ``Service.refuse``, in the same JSON shape, and the connection
is closed.

Replies: plain ones with a ``Content-Length`` (a ``HEAD`` gets the head
alone); a stream (``/events``) chunked until it ends, then the connection
closes; a WebSocket: the 101 through h11, then ``websocket.WebSocket``
takes the connection with the bytes h11 read past the request.

Bounds: the client timeout covers each request from the moment one may
begin to its last body byte (idle, a trickled head, a trickled chunked
body: one deadline, not reset by trickled bytes); a request being served
is never cut off, and a client that hangs up does not cancel its request
(a stop goes on).  A stream or WebSocket whose client stops reading is cut
off after the client timeout too.  A head past ``MAX_HEAD`` or a body past
``max_body`` is refused, not buffered.  Requests on one connection are
served in order; a client far ahead of its answers is not read further,
and one that does not read its answers is not served further.  The listen
backlog is ``SOMAXCONN``, not asyncio's 100.

Cost, measured (``bench/bench_ab.py``: this server against the front it
replaced, a hand-written parser for the common requests with aiohttp for the
rest, same run, one VM, 2-core machine kind; see ``bench/README.md``): h11
is the cost on the hot path.  A request parsed and its answer sent through
h11 alone is ~120 µs of CPU here (the hand-written front parsed a head in
~10 µs), and a profile of this server puts nearly all its own time in h11's
``next_event`` and ``send``: daemon CPU per call under 16 clients 215-251 ->
359-399 µs, calls/s -15 to -40% (the 2 cores are shared: 1,500-2,300 ->
1,000-2,400); one client's ``GET ?type=version`` p50 0.78 -> 0.83-0.94 ms.
The WebSocket side is wsproto's: ~37 µs per keystroke round trip
(a frame in, a frame out), the serial round trip p50 177-191 -> 244-286 µs.
Start-up does not pay: restart -> first answer is unchanged (h11 is a few
ms of imports, wsproto is imported at the first WebSocket).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import h11

from vmadmd.daemon.http import Reply, Request, Service, Stream
from vmadmd.daemon.readbuf import read_buffer
from vmadmd.errors import error_document

if TYPE_CHECKING:
    from vmadmd.daemon.websocket import WebSocket

log = logging.getLogger("vmadmd.api")

MAX_HEAD = 32 * 1024
AHEAD_BODY = 64 * 1024
"""A client far ahead of its answers is read no further once this much more
than a head is buffered past the request being served (or ``max_body`` if
smaller); not the largest body a route takes (1 MiB for an arriving VM),
which is read as it comes once the connection is served again."""
STREAM_PENDING = 1 << 20  # a stream's unsent bytes before its writer waits


class Gate(Protocol):
    """Admits connections (the console listener's per-client limits)."""

    def admit(self, client: str) -> bool: ...

    def release(self, client: str) -> None: ...


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _token_in(value: str, token: str) -> bool:
    return token in (part.strip().lower() for part in value.split(","))


class Refusal(NamedTuple):
    """A request head the server will not serve: its answer."""

    status: int
    code: str
    message: str
    headers: dict[str, str]


def request_of(event: h11.Request) -> Request | Refusal:
    """The request h11 read, or why it is refused (what h11 lets through
    that this server does not serve)."""
    headers: dict[str, str] = {}
    size = len(event.target)
    for raw_name, raw_value in event.headers:
        headers.setdefault(raw_name.decode("ascii"), raw_value.decode("latin-1"))
        size += len(raw_name) + len(raw_value) + 4
    if size > MAX_HEAD:
        # h11 bounds a head still coming; one read whole at once is bounded here.
        return Refusal(431, "HeadTooLarge", f"request head larger than {MAX_HEAD} bytes", {})
    if event.http_version not in (b"1.1", b"1.0"):
        version = event.http_version.decode("ascii", "replace")
        return Refusal(505, "HttpVersionNotSupported", f"HTTP/{version} is not served", headers)
    if "transfer-encoding" in headers and "content-length" in headers:
        # RFC 9112 6.1: a request with both is a smuggling attempt or a
        # broken proxy; answered, and the connection not reused.
        return Refusal(400, "BadRequest", "both Transfer-Encoding and Content-Length", headers)
    target = event.target.decode("ascii", "replace")
    path, _, query = target.partition("?")
    method = event.method.decode("ascii")
    upgrade = (
        method == "GET"
        and _token_in(headers.get("upgrade", ""), "websocket")
        and _token_in(headers.get("connection", ""), "upgrade")
        and headers.get("sec-websocket-version") == "13"
        and bool(headers.get("sec-websocket-key"))
    )
    return Request(method, path, query, headers, b"", {}, upgrade)


def _switching(request: Request, reply: Reply) -> h11.InformationalResponse:
    """The 101 that accepts a WebSocket."""
    from vmadmd.daemon.websocket import accept_token

    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept_token(request.headers["sec-websocket-key"])),
        *reply.headers.items(),
    ]
    reason = b"Switching Protocols"
    return h11.InformationalResponse(status_code=101, headers=headers, reason=reason)


class _Stream(Stream):
    def __init__(self, protocol: HttpProtocol) -> None:
        self.protocol = protocol

    async def send(self, data: bytes) -> None:
        self.protocol.send_data(data)
        await self.protocol.flow.drain()


class HttpProtocol(asyncio.BufferedProtocol):
    """One client connection: h11 until an upgrade, wsproto after it."""

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.client = ""
        self.admitted = False
        self.busy = False  # a request of this connection is being served
        self.ahead = 0  # bytes read past the request being served (in h11's buffer)
        self.flow = Flow(self.loop, server.client_timeout)
        self.idle = IdleTimer(self.loop, server.client_timeout, self._idle_expired)
        self.ws: WebSocket | None = None
        self.task: asyncio.Task[None] | None = None
        # The request being read.
        self.request: Request | None = None
        self.body = bytearray()
        self.refused = False

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = self.flow.transport = transport
        gate = self.server.gate
        if gate is not None:
            peer = transport.get_extra_info("peername")
            self.client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            if not gate.admit(self.client):
                transport.abort()
                return
        self.admitted = True
        self.server.connections.add(self)
        self.idle.arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.flow.lost()
        self.idle.disarm()
        self.server.connections.discard(self)
        if self.admitted and self.server.gate is not None:
            self.server.gate.release(self.client)
        self.admitted = False
        if self.ws is not None:
            self.ws.connection_lost()
        if self.task is not None and (self.ws is not None or self._streaming):
            self.task.cancel()  # a stream or session ends with its client; a request does not

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(read_buffer()[:nbytes])  # copied out of the shared buffer at once
        if self.ws is not None:
            self.ws.feed(data)
            return
        if self.refused:
            return
        self.conn.receive_data(data)
        if self.busy or self.flow.write_paused:
            self.ahead += nbytes
            if self._too_far_ahead():
                self.flow.pause_reading()  # a client far ahead of its answers
            return
        self._advance()

    def _too_far_ahead(self) -> bool:
        return self.ahead > MAX_HEAD + min(self.server.max_body, AHEAD_BODY)

    def eof_received(self) -> bool | None:
        if self.ws is not None:
            self.ws.feed(None)
            return True
        if self.refused or self._streaming:
            self.close()  # a stream's client that hangs up is gone: end it now
            return True
        self.conn.receive_data(b"")
        if not self.busy and not self.flow.write_paused:
            self._advance()
        return True  # keep the write side open for the answer in flight

    def pause_writing(self) -> None:
        self.flow.writing_paused()  # the client does not read its answers: serve no more

    def resume_writing(self) -> None:
        self.flow.writing_resumed()
        if not self.busy and not self.flow.gone and self.ws is None:
            if not self._too_far_ahead():
                self.flow.resume_reading()
            self._advance()

    # -- for streams and sessions -------------------------------------------------

    def close(self) -> None:
        self.idle.disarm()
        self.flow.close()

    def send_data(self, data: bytes) -> None:
        self.flow.write(self.conn.send(h11.Data(data=data)))

    @property
    def _streaming(self) -> bool:
        return self.conn.our_state is h11.SEND_BODY and self.busy and self.ws is None

    # -- requests ------------------------------------------------------------

    def _advance(self) -> None:
        """Read events until a request is whole (then serve it) or more bytes are needed."""
        if self.refused or self.flow.gone:
            return  # a refused connection is only drained until it closes
        conn = self.conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as err:
                status = err.error_status_hint
                if status == 431:  # h11's hint for a head past MAX_HEAD
                    self._refuse(431, "HeadTooLarge", f"request head larger than {MAX_HEAD} bytes")
                else:
                    self._refuse(status, "BadRequest", f"malformed HTTP request: {err}"[:200])
                return
            if event is h11.NEED_DATA:
                # Nothing is being served: what comes next is this request's
                # (h11 hands its body on as it comes), so read on.
                self.ahead = 0
                self.flow.resume_reading()
                return
            if event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                if not self._begin(event):
                    return
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > self.server.max_body:
                    self._too_large()
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._dispatch()
                return
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _begin(self, event: h11.Request) -> bool:
        request = request_of(event)
        if isinstance(request, Refusal):
            self._refuse(*request)
            return False
        length = request.headers.get("content-length", "0")
        if length.isdigit() and int(length) > self.server.max_body:
            self.request = request
            self._too_large()
            return False
        self.request = request
        self.body = bytearray()
        if self.conn.they_are_waiting_for_100_continue:
            self.flow.write(self.conn.send(h11.InformationalResponse(status_code=100, headers=[])))
        return True

    def _too_large(self) -> None:
        headers = self.request.headers if self.request is not None else {}
        limit = self.server.max_body
        self._refuse(413, "PayloadTooLarge", f"request body larger than {limit} bytes", headers)

    def _refuse(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        """Answer a request the server will not serve, and end the connection."""
        self.refused = True
        self.idle.disarm()
        reply = self.server.service.refuse(status, code, message, headers or {})
        reply.headers["Connection"] = "close"
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError):
                self._send_plain(reply, head_only=False)
        transport = self.transport
        if transport is not None and transport.can_write_eof() and not self.flow.gone:
            # Linger: the client may still be sending (a body refused half-way);
            # closing with its bytes unread would reset the connection and lose
            # the answer.  What it sends is read and dropped until it closes,
            # at most for the client timeout.
            transport.write_eof()
            self.busy = False
            self.idle.arm()
            return
        self.close()

    def _dispatch(self) -> None:
        request = self.request
        assert request is not None
        request.body = bytes(self.body)
        self.body = bytearray()
        self.request = None
        self.busy = True
        # What is buffered past this request (pipelined ones): usually nothing.
        self.ahead = len(self.conn.trailing_data[0])
        if self._too_far_ahead():
            self.flow.pause_reading()
        self.idle.disarm()  # served, never cut off
        route, match, allowed = self.server.service.resolve(request.method, request.path)
        request.match = match
        self.task = self.server.spawn(self._serve(request, route, allowed))

    async def _serve(self, request: Request, route: str | None, allowed: frozenset[str]) -> None:
        try:
            reply = await self.server.service.dispatch(request, route, allowed)
        except Exception:  # dispatch answers errors itself: this is a bug
            log.exception("bug while serving %s %s", request.method, request.path)
            body = error_document("InternalError", "internal error (logged by vmadmd)")
            reply = Reply(500, json.dumps(body).encode())
        if reply.session is not None:
            await self._upgrade(request, reply)
            return
        if self.flow.gone:
            return
        try:
            if reply.stream is not None:
                await self._stream(reply)
                return
            self._send_plain(reply, head_only=request.method == "HEAD")
        except h11.LocalProtocolError:
            log.exception("bug while answering %s %s", request.method, request.path)
            self.close()
            return
        self._next_cycle()

    def _send_plain(self, reply: Reply, *, head_only: bool) -> None:
        headers = [
            ("Content-Type", reply.content_type),
            ("Content-Length", str(len(reply.body))),
            *reply.headers.items(),
        ]
        conn = self.conn
        head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        out = conn.send(head)
        if reply.body and not head_only:
            out += conn.send(h11.Data(data=reply.body))
        out += conn.send(h11.EndOfMessage())
        self.flow.write(out)

    def _next_cycle(self) -> None:
        """The answer is out: on to the client's next request, if it may send one."""
        conn = self.conn
        if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
            self.close()  # MUST_CLOSE (HTTP/1.0, Connection: close) or a broken exchange
            return
        conn.start_next_cycle()
        self.busy = False
        self.task = None
        self.idle.arm()
        if self.flow.write_paused:
            return  # resume_writing goes on
        if not self._too_far_ahead():
            self.flow.resume_reading()
        self._advance()

    async def _stream(self, reply: Reply) -> None:
        assert reply.stream is not None
        headers = [("Content-Type", reply.content_type), *reply.headers.items()]
        head = h11.Response(status_code=reply.status, headers=headers, reason=_reason(reply.status))
        self.flow.write(self.conn.send(head))
        try:
            await reply.stream(_Stream(self))
            if not self.flow.gone:
                self.flow.write(self.conn.send(h11.EndOfMessage()))
        except (ConnectionError, TimeoutError, h11.LocalProtocolError):
            pass
        finally:
            self.close()  # an ended stream ends the connection

    async def _upgrade(self, request: Request, reply: Reply) -> None:
        """Accept the WebSocket (when the client is still there) and run the session."""
        from vmadmd.daemon.websocket import WebSocket

        assert reply.session is not None
        ws = WebSocket(self.flow)
        if self.flow.gone:
            ws.connection_lost()
        else:
            self.flow.write(self.conn.send(_switching(request, reply)))
            trailing, _ = self.conn.trailing_data
            self.ws = ws
            if trailing:
                ws.feed(trailing)
            self.flow.resume_reading()
        try:
            await reply.session(ws)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            await ws.close()
            self.close()

    def _idle_expired(self) -> None:
        if self.flow.gone or self.transport is None or self.busy or self.ws is not None:
            return  # served (or upgraded): arm() sets a new timer when it is over
        log.debug("client timeout: closing a connection")
        self.close()


class IdleTimer:
    """A connection's client timeout: ``timeout`` from ``arm()`` to send its
    next request whole.

    One timer per connection, moved forward lazily: serving a request costs
    no timer of its own (``disarm`` only marks it).
    """

    __slots__ = ("_on_expire", "deadline", "loop", "timeout", "timer")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, timeout: float, on_expire: Callable[[], None]
    ) -> None:
        self.loop = loop
        self.timeout = timeout
        self._on_expire = on_expire
        self.deadline = float("inf")
        self.timer: asyncio.TimerHandle | None = None

    def arm(self) -> None:
        self.deadline = self.loop.time() + self.timeout
        if self.timer is None:
            self.timer = self.loop.call_at(self.deadline, self._expire)

    def disarm(self) -> None:
        self.deadline = float("inf")

    def _expire(self) -> None:
        self.timer = None
        if self.deadline == float("inf"):
            return  # disarmed: arm() sets a new timer
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._expire)
        else:
            self._on_expire()


class Flow:
    """One connection's writes and back-pressure, both ways: what the request
    loop, a stream and a WebSocket session (its transport) share.

    A client that does not read its answers pauses the server's writing
    (``writing_paused``): ``drain`` then waits, at most the client timeout,
    and the connection is closed past it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.read_paused = False
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None
        self.gone = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.gone:
            self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the client is behind: at most the client timeout."""
        if self.gone:
            raise ConnectionResetError("the client is gone")
        if not self.write_paused:
            return
        if self.drained is None or self.drained.done():
            self.drained = self.loop.create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self.drained), self.timeout)
        except TimeoutError:
            self.close()
            raise

    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def writing_paused(self) -> None:
        self.write_paused = True

    def writing_resumed(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def lost(self) -> None:
        self.gone = True
        if self.drained is not None and not self.drained.done():
            self.drained.set_exception(ConnectionResetError("the client is gone"))


class HttpServer:
    """One listener: its socket, its service (routes and envelope), its bounds."""

    def __init__(
        self,
        service: Service,
        *,
        client_timeout: float,
        max_body: int,
        gate: Gate | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.service = service
        self.client_timeout = client_timeout
        self.max_body = max_body
        self.gate = gate
        self.tls = tls
        self.connections: set[HttpProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, sock: socket.socket) -> None:
        """Serve on a bound socket: listening with a backlog of ``SOMAXCONN``."""
        loop = self.loop = asyncio.get_running_loop()
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            self.server = await loop.create_unix_server(
                lambda: HttpProtocol(self), sock=sock, backlog=socket.SOMAXCONN
            )
        else:
            self.server = await loop.create_server(
                lambda: HttpProtocol(self),
                sock=sock,
                backlog=socket.SOMAXCONN,
                ssl=self.tls,
                ssl_handshake_timeout=self.client_timeout if self.tls is not None else None,
            )

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in a task of its own, tracked until it ends.

        The task takes itself out of ``tasks`` as it ends, rather than by a
        done callback: a callback is one more event-loop turn per request.
        """
        assert self.loop is not None
        own: list[asyncio.Task[None]] = []

        async def run() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("HTTP server task failed")
            finally:
                self.tasks.discard(own[0])

        own.append(self.loop.create_task(run()))
        self.tasks.add(own[0])
        return own[0]

    async def close(self, grace: float, reason: str = "vmadmd is shutting down") -> None:
        """Stop accepting; end streams and WebSockets (with ``reason``); let
        requests in flight finish (bounded); close the rest."""
        # Stop accepting new connections.
        if self.server is not None:
            self.server.close()
        # End sessions and streams now; close idle connections.
        for conn in list(self.connections):
            if conn.ws is not None:
                await conn.ws.close(1001, reason)
            if conn.ws is not None or conn._streaming or not conn.busy:
                if conn.task is not None:
                    conn.task.cancel()
                conn.close()
        # Let plain requests finish, within the grace period.
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn.close()
        with contextlib.suppress(Exception):
            if self.server is not None:
                await self.server.wait_closed()
