"""The API socket's HTTP/1.1 front: plain requests served here, the rest by aiohttp.

Why not aiohttp for everything (``bench/bench_api.py``, 8 VMs, this machine
kind): importing aiohttp was ~90 ms of the daemon's ~120 ms of imports, so
restart -> first answer took 136-155 ms against libvirtd's 117 ms.  With this
front and aiohttp imported only on first need, the daemon's imports are
~66 ms and restart -> first answer 79-91 ms.  (Per request the front alone
changed little: ``GET /vm/<uuid>?type=version`` stayed at ~2.8x raw QMP until
the QMP path lost its per-command task and its mmap per read; see
``monitor.py``, ``readbuf.py``.)  Every route the CLI uses is a plain request:
a head, an optional ``Content-Length`` body, one JSON answer.  Those are
served here.

Anything else goes to aiohttp, unchanged: the front stops reading, imports
and sets up aiohttp's server on first need, and gives it the connection
(``transport.set_protocol``) with every byte it has read.  That covers the
WebSocket serial console, the ``/events`` stream, ``HEAD`` and other methods,
chunked or ``Expect:`` bodies, percent-encoded paths, HTTP/1.0, over-long or
malformed heads (aiohttp answers those with its 4xx, as before).  So the
edge cases keep the behaviour aiohttp gave them, and this module parses only
the well-formed common case.

Bounds, as aiohttp had them: a connection idle (or a request incomplete) for
``client_timeout`` seconds is closed, armed when a request may begin, not
reset by trickled bytes; a head past ``MAX_HEAD`` bytes or a body past
``max_body`` is not buffered further.  Requests on one connection are served
in order; a client that hangs up does not cancel its request (a stop goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from vmadmd.daemon.readbuf import read_buffer
from vmadmd.errors import error_document

if TYPE_CHECKING:
    import socket

log = logging.getLogger("vmadmd.api")

MAX_HEAD = 32 * 1024  # past this without the end of a head: aiohttp answers it
MAX_LINE = 16 * 1024  # aiohttp's bound on a request or header line (its 400)


def first_values(query_string: str) -> dict[str, str]:
    """The parameters of a query string (or a form body); a repeated name
    keeps its first value."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        params.setdefault(key, value)
    return params


class Request:
    """One parsed request, independent of the server that read it."""

    __slots__ = ("_query", "body", "headers", "match", "method", "path", "query_string")

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
        match: dict[str, str],
    ) -> None:
        self.method = method
        self.path = path
        self.query_string = query_string
        self.headers = headers  # names lower-cased; a repeated name keeps its first value
        self.body = body
        self.match = match
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (``first_values``), parsed once: not to be changed."""
        if self._query is None:
            self._query = first_values(self.query_string)
        return self._query

    @property
    def content_type(self) -> str:
        value = self.headers.get("content-type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()


class Reply:
    __slots__ = ("body", "content_type", "data", "headers", "status")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
        data: object = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}
        self.data = data  # what a JSON body encodes, to encode it another way


Dispatch = Callable[[Request, str | None, frozenset[str]], Awaitable[Reply]]
"""Serves a request: the route it matched (its pattern; None when none did,
with the methods its path allows, if any: a 405 rather than a 404)."""
Resolve = Callable[[str, str], "tuple[str | None, dict[str, str], frozenset[str]]"]
"""(method, path) -> (route pattern or None, path parameters, methods the path allows)."""
WebFactory = Callable[[], Awaitable[Callable[[], asyncio.Protocol]]]


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def render(reply: Reply, close: bool) -> bytes:
    head = [
        f"HTTP/1.1 {reply.status} {_reason(reply.status)}",
        f"Content-Type: {reply.content_type}",
        f"Content-Length: {len(reply.body)}",
    ]
    head.extend(f"{name}: {value}" for name, value in reply.headers.items())
    if close:
        head.append("Connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + reply.body


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, target, headers) of a well-formed HTTP/1.1 head, else None.

    None means "not the common case": aiohttp is given the request.
    """
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    if max(map(len, lines)) > MAX_LINE:
        return None
    if not text.replace("\r\n", "").replace("\t", " ").isprintable():
        return None  # a bare CR or LF, or another control character
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] != "HTTP/1.1" or parts[0] not in ("GET", "POST"):
        return None
    target = parts[1]
    if not target.startswith("/") or "%" in target or "#" in target:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            return None
        name = name.lower()
        if name == "content-length" and name in headers:
            return None  # two lengths: not ours to pick one
        headers.setdefault(name, value.strip())
    for refused in ("transfer-encoding", "upgrade", "expect"):
        if refused in headers:
            return None
    return parts[0], target, headers


class FrontProtocol(asyncio.BufferedProtocol):
    """One client connection of the front."""

    def __init__(self, front: Front) -> None:
        self.front = front
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.busy = False  # a request of this connection is being served
        self.write_paused = False
        self.closing = False
        self.gone = False
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.loop = asyncio.get_running_loop()  # made by the server, in its loop

    # -- asyncio callbacks ---------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.front.connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self._disarm()
        self.front.connections.discard(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return read_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        self.buf += read_buffer()[:nbytes]  # copied out of the shared buffer at once
        if self.busy or self.write_paused:
            if len(self.buf) > MAX_HEAD + self.front.max_body and self.transport is not None:
                self.transport.pause_reading()  # a client far ahead of its answers
            return
        self._next()

    def pause_writing(self) -> None:
        self.write_paused = True  # the client does not read its answers: serve no more

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.busy and not self.gone:
            if self.transport is not None:
                self.transport.resume_reading()
            if self.buf:
                self._next()

    def eof_received(self) -> bool | None:
        if not self.busy:
            self._close()
        else:
            self.closing = True
        return True  # keep the write side open for the answer in flight

    # -- requests ------------------------------------------------------------

    def _next(self) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._hand_over()
            return
        parsed = parse_head(self.buf[:end])
        if parsed is None:
            self._hand_over()
            return
        method, target, headers = parsed
        raw_length = headers.get("content-length", "0")
        if not raw_length.isdigit() or (method == "GET" and raw_length != "0"):
            self._hand_over()
            return
        length = int(raw_length)
        if length > self.front.max_body:
            self._hand_over()  # aiohttp answers 413 for it, as it always did
            return
        start = end + 4
        if len(self.buf) < start + length:
            return  # the body is still coming (the timer still runs)
        path, _, query = target.partition("?")
        route, match, allowed = self.front.resolve(method, path)
        if route in self.front.web_only:
            self._hand_over()  # a stream or a WebSocket: aiohttp serves it
            return
        body = self.buf[start : start + length]
        self.buf = self.buf[start + length :]
        self.busy = True
        if headers.get("connection", "").lower() == "close":
            self.closing = True
        request = Request(method, path, query, headers, body, match)
        self.front.spawn(self._serve(request, route, allowed))

    async def _serve(self, request: Request, route: str | None, allowed: frozenset[str]) -> None:
        try:
            reply = await self.front.dispatch(request, route, allowed)
        except Exception:  # dispatch answers errors itself: this is a bug
            log.exception("bug while serving %s %s", request.method, request.path)
            body = json.dumps(error_document("InternalError", "internal error (logged by vmadmd)"))
            reply = Reply(500, body.encode())
        if self.transport is not None and not self.gone:
            self.transport.write(render(reply, self.closing))
        self.busy = False
        if self.gone:
            return
        if self.closing:
            self._close()
            return
        self._arm()
        if self.write_paused:
            return  # resume_writing goes on
        if self.transport is not None:
            self.transport.resume_reading()
        if self.buf:
            self._next()

    # -- hand-over to aiohttp ------------------------------------------------

    def _hand_over(self) -> None:
        assert self.transport is not None
        self._disarm()
        self.busy = True  # nothing more is parsed here
        self.transport.pause_reading()
        self.front.spawn(self._give())

    async def _give(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            factory = await self.front.web()
        except Exception:
            log.exception("cannot set up the HTTP server for %r", self.buf[:80])
            transport.abort()
            return
        if self.gone:
            return
        self.front.connections.discard(self)
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self.buf:
            protocol.data_received(self.buf)
        self.buf = b""
        transport.resume_reading()

    # -- timers --------------------------------------------------------------

    def _arm(self) -> None:
        """The client has ``client_timeout`` from now to send its next request.

        One timer per connection, moved forward lazily: serving a request
        costs no timer of its own.
        """
        loop = self.loop
        self.deadline = loop.time() + self.front.client_timeout
        if self.timer is None:
            self.timer = loop.call_at(self.deadline, self._expire)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        if self.gone or self.transport is None:
            return
        loop = self.loop
        if self.busy:  # a request being served is never cut off: look again later
            self.timer = loop.call_at(loop.time() + self.front.client_timeout, self._expire)
        elif loop.time() < self.deadline:
            self.timer = loop.call_at(self.deadline, self._expire)
        else:
            self._close()

    def _close(self) -> None:
        self._disarm()
        if self.transport is not None:
            self.transport.close()


class Front:
    """The API socket's server: serves plain requests, hands the rest to aiohttp."""

    def __init__(
        self,
        dispatch: Dispatch,
        resolve: Resolve,
        web: WebFactory,
        *,
        web_only: frozenset[str],
        client_timeout: float,
        max_body: int,
    ) -> None:
        self.dispatch = dispatch
        self.resolve = resolve
        self.web = web
        self.web_only = web_only
        self.client_timeout = client_timeout
        self.max_body = max_body
        self.connections: set[FrontProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, sock: socket.socket) -> None:
        loop = self.loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(lambda: FrontProtocol(self), sock=sock)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in a task of its own, tracked until it ends.

        The task takes itself out of ``tasks`` as it ends, rather than by a
        done callback: a callback is one more event-loop turn per request
        (``GET ?type=version``, one VM, back to back: 0.325 -> 0.284 ms p50).
        """
        assert self.loop is not None
        own: list[asyncio.Task[None]] = []

        async def run() -> None:
            try:
                await coro
            except Exception:
                log.exception("HTTP front task failed")
            finally:
                self.tasks.discard(own[0])

        own.append(self.loop.create_task(run()))
        self.tasks.add(own[0])

    async def close(self, grace: float) -> None:
        """Stop accepting; let requests in flight finish (bounded); close the rest."""
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            if not conn.busy:
                conn._close()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=grace)
        for task in list(self.tasks):
            task.cancel()
        for conn in list(self.connections):
            conn._close()
        with contextlib.suppress(Exception):
            if self.server is not None:
                await self.server.wait_closed()
