"""The API's aiohttp side, set up on first need.

aiohttp serves what the front in ``http.py`` does not parse: the ``/events``
stream, the serial console's WebSocket, and any connection the front handed
over (an unusual method, a chunked body, a percent-encoded path, a malformed
head: aiohttp's own 4xx).  The plain routes are the same handlers as the
front's (``Api.dispatch``), so a handed-over connection gets the same answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from vmadmd.daemon.api import MAX_BODY, MAX_QUERY, Api, request_id
from vmadmd.daemon.events import Event, Subscriber
from vmadmd.daemon.http import MAX_LINE, Request
from vmadmd.daemon.logs import req_id_var
from vmadmd.daemon.responses import Handler, answer, error_response, serial_relay
from vmadmd.errors import InvalidParameter
from vmadmd.vm.store import validate_uuid

log = logging.getLogger("vmadmd.api")

KEEPALIVE = 15.0
GONE_POLL = 0.5  # how often a quiet event stream checks that its client is still there


class _MalformedRequestFilter(logging.Filter):
    """aiohttp logs a client's malformed HTTP at ERROR with a traceback; it is
    answered with a 400 and is not ours to alarm about: keep it at debug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("aiohttp.server").addFilter(_MalformedRequestFilter())


def build_app(api: Api) -> web.Application:
    streams = _Streams(api)
    app = web.Application(client_max_size=MAX_BODY)
    # No HEAD for a stream (it would hold the connection for nothing): the
    # catch-all answers it 405.
    for route, handler in (("/events", streams.events), ("/vm/{uuid}/serial", streams.serial)):
        app.router.add_get(route, streams.wrap(route, handler), allow_head=False)
    app.router.add_route("*", "/{tail:.*}", streams.plain)
    return app


async def start_runner(api: Api, *, client_timeout: float, grace: float) -> web.AppRunner:
    runner = web.AppRunner(
        build_app(api),
        handle_signals=False,
        access_log=None,
        shutdown_timeout=grace,
        # aiohttp arms this from the first byte of a connection, so it
        # also bounds a client that trickles its request (slowloris).
        keepalive_timeout=client_timeout,
        max_line_size=MAX_LINE,
        max_field_size=MAX_LINE,
    )
    await runner.setup()
    return runner


def protocol_factory(runner: web.AppRunner) -> Callable[[], asyncio.Protocol]:
    server = runner.server
    assert server is not None
    return server


class _Streams:
    def __init__(self, api: Api) -> None:
        self.api = api

    async def plain(self, request: web.Request) -> web.StreamResponse:
        """A plain route on a handed-over connection: the front's handlers."""
        method = "GET" if request.method == "HEAD" else request.method
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            too_large = f"request body larger than {MAX_BODY} bytes"
            return error_response(413, "PayloadTooLarge", too_large)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        route, match, allowed = self.api.resolve(method, request.path)
        req = Request(method, request.path, request.rel_url.raw_query_string, headers, body, match)
        reply = await self.api.dispatch(req, route, allowed)
        return web.Response(
            status=reply.status,
            body=reply.body,
            headers={"Content-Type": reply.content_type, **reply.headers},
        )

    def wrap(self, route: str, handler: Handler) -> Handler:
        """Request id, metrics and the JSON error shape, for a stream."""

        async def served(request: web.Request) -> web.StreamResponse:
            req_id = request_id(request.headers.get("X-Request-Id"))
            request["req_id"] = req_id
            req_id_var.set(req_id)
            t0 = time.monotonic()
            metrics = self.api.metrics
            metrics.api_in_flight.inc()
            try:
                if len(request.rel_url.raw_query_string) > MAX_QUERY:
                    resp: web.StreamResponse = error_response(
                        414, "UriTooLong", "query string too long"
                    )
                else:
                    manager = self.api.manager
                    if not manager.swept.is_set():
                        await manager.wait_swept()  # see BEFORE_SWEEP
                    resp = await answer(request, handler)
            finally:
                metrics.api_in_flight.dec()
            if not resp.prepared:
                resp.headers["X-Request-Id"] = req_id
            self.api.record(route, request.method, resp.status, time.monotonic() - t0)
            return resp

        return served

    async def serial(self, request: web.Request) -> web.StreamResponse:
        """The serial console as a WebSocket (binary frames both ways)."""
        uuid = validate_uuid(request.match_info["uuid"])
        console = await self.api.manager.serial(uuid)  # 404 / 409 before any upgrade
        viewer = console.attach()
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        try:
            await ws.prepare(request)
        except BaseException:
            console.detach(viewer)
            raise
        await serial_relay(ws, console, viewer)
        return ws

    async def events(self, request: web.Request) -> web.StreamResponse:
        params = request.query
        vm = params.get("vm")
        if vm is not None:
            validate_uuid(vm)
        # Standard SSE: with Last-Event-ID, replay what followed it (from the
        # bounded history); without, start from now.
        last_raw = request.headers.get("Last-Event-ID", params.get("last_event_id"))
        try:
            last_id = self.api.bus.last_id if last_raw is None else int(last_raw)
        except ValueError:
            raise InvalidParameter("Last-Event-ID must be an integer") from None
        sub = self.api.bus.subscribe(vm)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        resp.headers["X-Request-Id"] = request["req_id"]
        resp.force_close()  # an ended stream (e.g. a dropped slow consumer) ends the connection
        try:
            await resp.prepare(request)
            lost = self.api.bus.gap(last_id) if last_raw is not None else None
            if lost is not None:
                # The history no longer holds what followed Last-Event-ID:
                # say so, rather than resume as if nothing was missed.
                gap = {"type": "gap", "from": lost[0], "to": lost[1]}
                await resp.write(f"event: gap\ndata: {json.dumps(gap)}\n\n".encode())
            for past in self.api.bus.since(last_id, vm):
                await resp.write(_sse(past.id, past.type, past.as_dict()))
            quiet = 0.0
            while True:
                try:
                    event = await asyncio.wait_for(_next(sub), GONE_POLL)
                except TimeoutError:
                    # aiohttp does not cancel a handler whose client hung up:
                    # look, so that a gone follower stops being one.
                    if request.transport is None or request.transport.is_closing():
                        break
                    quiet += GONE_POLL
                    if quiet >= KEEPALIVE:
                        await resp.write(b": keep-alive\n\n")
                        quiet = 0.0
                    continue
                quiet = 0.0
                if event is None:  # dropped for being too slow
                    break
                if event.id <= last_id:
                    continue
                await resp.write(_sse(event.id, event.type, event.as_dict()))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.api.bus.unsubscribe(sub)
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp


async def _next(sub: Subscriber) -> Event | None:
    return await sub.queue.get()


def _sse(event_id: int, type_: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n".encode()
