"""What a route sees of HTTP, and the one envelope every request goes through.

No I/O here: ``server.py`` reads requests (h11) and hands each, parsed and
with its body read, to ``Service.dispatch``; the routes (``api.py`` on the
API socket, ``console.py`` on the browser-console listener) take a
``Request`` and give a ``Reply``.  A reply is plain (status, body), a stream
(``stream``: server-sent events) or a WebSocket session (``session``).

``Service.dispatch`` is the envelope, the same for every route of every
listener, plain, stream or WebSocket: the request id (the client's
``X-Request-Id``, bounded, or a new one), the gate a route may wait behind
(the API's start-up sweep), the query bound, the JSON error shape
``{"error": {"code", "message"}}`` with the status the error carries, and
the access record (a debug line, and the listener's metrics).  Anything
else that escapes a handler is a bug: 500, logged with its traceback.  The
server answers what it refuses itself (a malformed head, a body too large)
through ``Service.refuse``: the same shape, the same record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from vmadmd.daemon.logs import req_id_var
from vmadmd.errors import InvalidParameter, VmadmError, error_document

if TYPE_CHECKING:
    from vmadmd.daemon.websocket import WebSocket

log = logging.getLogger("vmadmd.api")

MAX_QUERY = 8 * 1024

_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})


def first_values(query_string: str) -> dict[str, str]:
    """The parameters of a query string (or a form body); a repeated name
    keeps its first value."""
    params: dict[str, str] = {}
    for key, value in parse_qsl(query_string, keep_blank_values=True):
        params.setdefault(key, value)
    return params


class Request:
    """One parsed request, its body read, independent of the server that read it."""

    __slots__ = (
        "_query",
        "body",
        "headers",
        "match",
        "method",
        "path",
        "query_string",
        "upgrade",
    )

    def __init__(
        self,
        method: str,
        path: str,
        query_string: str,
        headers: dict[str, str],
        body: bytes,
        match: dict[str, str],
        upgrade: bool = False,
    ) -> None:
        self.method = method
        self.path = path  # as sent (percent-encoded); ``match`` holds decoded segments
        self.query_string = query_string
        self.headers = headers  # names lower-cased; a repeated name keeps its first value
        self.body = body
        self.match = match
        self.upgrade = upgrade  # a well-formed WebSocket upgrade (RFC 6455, version 13)
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


class Stream:
    """What a streaming reply writes to (server-sent events)."""

    async def send(self, data: bytes) -> None:  # pragma: no cover - the server's
        raise NotImplementedError


StreamFn = Callable[[Stream], Awaitable[None]]
SessionFn = Callable[["WebSocket"], Awaitable[None]]


class Reply:
    __slots__ = ("body", "content_type", "data", "headers", "session", "status", "stream")

    def __init__(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: dict[str, str] | None = None,
        data: object = None,
        *,
        stream: StreamFn | None = None,
        session: SessionFn | None = None,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers or {}
        self.data = data  # what a JSON body encodes, to encode it another way
        # A stream: the head goes out, then ``stream`` writes until it returns;
        # the connection ends with it.
        self.stream = stream
        # A WebSocket: the upgrade is accepted and ``session`` runs on it.  It
        # is called once whatever happens, even on a connection already gone
        # (its socket then reads as closed), so it always releases what the
        # handler took for it.
        self.session = session


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), data=data)


def error_reply(status: int, code: str, message: str, **details: object) -> Reply:
    return json_reply(error_document(code, message, **details), status)


def websocket_reply(
    request: Request, session: SessionFn, subprotocols: tuple[str, ...] = ()
) -> Reply:
    """Accept the request's WebSocket upgrade; ``session`` runs on it.

    The first of ``subprotocols`` the client offers is chosen (a browser
    fails a handshake that offered one and got none back).
    """
    require_websocket(request)
    offered = [p.strip() for p in request.headers.get("sec-websocket-protocol", "").split(",")]
    headers = {}
    for protocol in subprotocols:
        if protocol in offered:
            headers["Sec-WebSocket-Protocol"] = protocol
            break
    return Reply(101, b"", headers=headers, session=session)


def require_websocket(request: Request) -> None:
    """Refuse (400) a plain request to a WebSocket route, before it costs anything."""
    if not request.upgrade:
        raise InvalidParameter("this is a WebSocket: send an upgrade (RFC 6455, version 13)")


def pretty(reply: Reply) -> None:
    """``?pretty=true``: indented, keys sorted, a final newline: what ``vmadm``
    prints, so that it prints the body as it comes (no JSON decoding there)."""
    if reply.data is not None:
        reply.body = (json.dumps(reply.data, indent=2, sort_keys=True) + "\n").encode()


def request_id(given: str | None) -> str:
    """The client's X-Request-Id (bounded), or a new one."""
    given = (given or "")[:64]
    if given and given.isascii() and given.isprintable():  # it goes back out in a header
        return given
    return f"{random.getrandbits(64):016x}"  # no syscall, unlike uuid4


Handler = Callable[[Request], Awaitable[Reply]]
Record = Callable[[str, str, int, float], None]
"""(route, method, status, seconds): a listener's metrics for one request."""


class Router:
    """Routes by pattern and method, matched segment by segment.

    ``{name}`` matches one non-empty segment, percent-decoded; a final
    ``{name*}`` matches the rest of the path (one or more segments, each
    decoded, joined by ``/``).  Segments are split before they are decoded,
    so an encoded ``%2F`` never makes a new one.  ``HEAD`` is served by a
    route's ``GET``, unless the route is a stream (a WebSocket, events): a
    HEAD would hold the connection for nothing.
    """

    def __init__(self) -> None:
        self.routes: dict[str, dict[str, Handler]] = {}
        self.streams: set[str] = set()
        self._patterns: list[tuple[tuple[str, ...], str]] = []

    def add(self, pattern: str, method: str, handler: Handler, *, stream: bool = False) -> None:
        if pattern not in self.routes:
            self.routes[pattern] = {}
            # "/vm/{uuid}/x" -> ("vm", "{uuid}", "x")
            self._patterns.append((tuple(pattern.split("/")[1:]), pattern))
        self.routes[pattern][method] = handler
        if stream:
            self.streams.add(pattern)

    def allowed(self, route: str) -> frozenset[str]:
        methods = set(self.routes[route])
        if "GET" in methods and route not in self.streams:
            methods.add("HEAD")
        return frozenset(methods)

    def resolve(self, method: str, path: str) -> tuple[str | None, dict[str, str], frozenset[str]]:
        """(route, path parameters, allowed methods); route None when none
        matched (with the methods the path allows, if any: a 405, not a 404)."""
        segments = path.split("/")[1:]
        for shape, route in self._patterns:
            match = _match(shape, segments)
            if match is None:
                continue
            allowed = self.allowed(route)
            if method in allowed:
                return route, match, allowed
            return None, {}, allowed
        return None, {}, frozenset()


def _match(shape: tuple[str, ...], segments: list[str]) -> dict[str, str] | None:
    rest = shape[-1].endswith("*}") if shape else False
    if len(shape) != len(segments) and not (rest and len(segments) >= len(shape)):
        return None
    match: dict[str, str] = {}
    for i, want in enumerate(shape):
        got = segments[i]
        if want[:1] == "{":
            if rest and i == len(shape) - 1:
                match[want[1:-2]] = "/".join(_decoded(s) for s in segments[i:])
                return match
            if not got:
                return None
            match[want[1:-1]] = _decoded(got)
        elif want != _decoded(got):
            return None
    return match


def _decoded(segment: str) -> str:
    return unquote(segment, errors="replace") if "%" in segment else segment


class Service:
    """The envelope of one listener: every request of every route goes through
    ``dispatch`` (or, refused by the server before it had a route, ``refuse``).

    ``gate(route, request)`` is awaited before a route runs (the API holds
    a VM's routes until the start-up sweep has picked that VM up); ``record`` counts each answer.
    """

    def __init__(
        self,
        router: Router,
        *,
        gate: Callable[[str, Request], Awaitable[None] | None] | None = None,
        record: Record | None = None,
        in_flight: Any = None,
    ) -> None:
        self.router = router
        self.resolve = router.resolve
        self.gate = gate
        self._record = record
        self.in_flight = in_flight  # a gauge with inc() and dec(), or None

    async def dispatch(self, request: Request, route: str | None, allowed: frozenset[str]) -> Reply:
        """Serve one request: request id, gate, bounds, and the JSON error shape."""
        req_id = request_id(request.headers.get("x-request-id"))
        req_id_var.set(req_id)  # each request runs in its own task: its own context
        t0 = time.monotonic()
        if route is None:
            if allowed:
                reply = error_reply(405, "MethodNotAllowed", "Method Not Allowed")
                reply.headers["Allow"] = ",".join(sorted(allowed))
            else:
                reply = error_reply(404, "NotFound", "Not Found")
        elif len(request.query_string) > MAX_QUERY:
            reply = error_reply(414, "UriTooLong", "query string too long")
        else:
            if self.in_flight is not None:
                self.in_flight.inc()
            try:
                if self.gate is not None and (waiting := self.gate(route, request)) is not None:
                    await waiting
                method = "GET" if request.method == "HEAD" else request.method
                reply = await self.call(self.router.routes[route][method], request)
            finally:
                if self.in_flight is not None:
                    self.in_flight.dec()
            wanted = "pretty" in request.query_string and request.query.get("pretty") == "true"
            if wanted and reply.status < 300:
                pretty(reply)
        reply.headers["X-Request-Id"] = req_id
        self.record(route or "unmatched", request.method, reply.status, time.monotonic() - t0)
        return reply

    def refuse(self, status: int, code: str, message: str, headers: dict[str, str]) -> Reply:
        """The answer to a request the server refused before routing it."""
        reply = error_reply(status, code, message)
        reply.headers["X-Request-Id"] = request_id(headers.get("x-request-id"))
        self.record("unmatched", "other", status, 0.0)
        return reply

    async def call(self, handler: Handler, request: Request) -> Reply:
        """The handler's reply, or the JSON error it stands for."""
        try:
            return await handler(request)
        except VmadmError as err:
            return error_reply(err.status, err.code, err.message, **err.details())
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("bug while serving %s %s", request.method, request.path)
            return error_reply(500, "InternalError", "internal error (logged by vmadmd)")

    def record(self, route: str, method: str, status: int, took: float) -> None:
        log.debug("%s %s -> %d in %.1f ms", method, route, status, took * 1000)
        if self._record is not None:
            # Bounded label values: a client must not be able to mint new series.
            self._record(route, method if method in _METHODS else "other", status, took)
