"""vmadmd's HTTP API (aiohttp, on a unix socket).

Handlers parse and validate, call the Manager, and shape JSON.  Every error
leaves as ``{"error": {"code", "message"}}`` with the status the error carries;
anything else that escapes a handler is a bug: 500, logged with traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import logging
import math
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from vmadmd import __version__
from vmadmd.daemon.console import ConsoleServer
from vmadmd.daemon.events import Event, EventBus, Subscriber
from vmadmd.daemon.logs import req_id_var
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.responses import Handler, answer, error_response
from vmadmd.daemon.serial import relay as serial_relay
from vmadmd.daemon.supervisor import parse_types
from vmadmd.errors import (
    InvalidParameter,
    PayloadTooLarge,
    WrongState,
)
from vmadmd.vm.store import validate_uuid

log = logging.getLogger("vmadmd.api")

METRICS_KEY = web.AppKey("metrics", Metrics)
MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
MAX_TIMEOUT = 86400.0
KEEPALIVE = 15.0
GONE_POLL = 0.5  # how often a quiet event stream checks that its client is still there


_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    req_id = request.headers.get("X-Request-Id", "")[:64] or uuidlib.uuid4().hex[:16]
    request["req_id"] = req_id
    req_id_var.set(req_id)  # each request runs in its own task: its own context
    t0 = time.monotonic()
    metrics = request.app[METRICS_KEY]
    metrics.api_in_flight.inc()
    try:
        if len(request.rel_url.raw_query_string) > MAX_QUERY:
            resp: web.StreamResponse = error_response(414, "UriTooLong", "query string too long")
        else:
            resp = await answer(request, handler)
    finally:
        metrics.api_in_flight.dec()
    if not resp.prepared:
        resp.headers["X-Request-Id"] = req_id
    took = time.monotonic() - t0
    log.debug("%s %s -> %d in %.1f ms", request.method, request.path, resp.status, took * 1000)
    info = request.match_info.route.resource
    route = info.canonical if info is not None else "unmatched"
    # Bounded label values: a client must not be able to mint new series.
    method = request.method if request.method in _METHODS else "other"
    metrics.api_requests.labels(route, method, str(resp.status)).inc()
    metrics.api_latency.labels(route).observe(took)
    return resp


async def params_of(request: web.Request) -> dict[str, str]:
    """Query parameters, plus a form-encoded POST body as real SmartOS clients send."""
    params = dict(request.query)
    if request.method == "POST" and request.can_read_body:
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise PayloadTooLarge(f"request body larger than {MAX_BODY} bytes")
        ctype = request.content_type
        if ctype == "application/x-www-form-urlencoded":
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, str):
                    params.setdefault(key, value)
        elif ctype == "application/json":
            for key, value in (await json_body(request)).items():
                params.setdefault(str(key), value if isinstance(value, str) else json.dumps(value))
    return params


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body (bounded by the app's client_max_size)."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise PayloadTooLarge(f"request body larger than {MAX_BODY} bytes")
    try:
        body = await request.json()
    except ValueError as err:
        raise InvalidParameter(f"request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidParameter("the body must be a JSON object")
    return body


def parse_timeout(raw: str | None) -> float:
    if raw is None or raw == "":
        raise InvalidParameter("timeout is required (seconds, > 0)")
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter(f"timeout must be a number of seconds, not {raw[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise InvalidParameter("timeout must be a positive number of seconds")
    if value > MAX_TIMEOUT:
        raise InvalidParameter(f"timeout must be at most {MAX_TIMEOUT:.0f} s (one day)")
    return value


class Api:
    def __init__(
        self,
        manager: Manager,
        bus: EventBus,
        status: Callable[[], dict[str, Any]],
        metrics: Metrics,
        console: ConsoleServer | None = None,
    ) -> None:
        self.console = console
        self.manager = manager
        self.bus = bus
        self.status = status
        self.metrics = metrics
        self.started = time.monotonic()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
        app[METRICS_KEY] = self.metrics
        app.router.add_get("/ping", self.ping)
        app.router.add_get("/vms", self.list_vms)
        app.router.add_get("/openapi.json", self.openapi)
        app.router.add_get("/events", self.events)
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/vm/{uuid}", self.info)
        app.router.add_get("/vm/{uuid}/info", self.info)
        app.router.add_get("/vm/{uuid}/screenshot.png", self.screenshot_png)
        app.router.add_post("/vm/{uuid}", self.action)
        app.router.add_post("/vms", self.vms_action)
        app.router.add_post("/vm/{uuid}/qmp", self.qmp)
        app.router.add_get("/vm/{uuid}/serial", self.serial)
        return app

    # -- routes ------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        body = {
            "ok": True,
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            **self.manager.connection_counts(),
        }
        body.update(self.status())
        return web.json_response(body)

    async def list_vms(self, request: web.Request) -> web.Response:
        return web.json_response(self.manager.listing())

    async def vms_action(self, request: web.Request) -> web.Response:
        params = await params_of(request)
        action = params.get("action")
        if action != "stop":
            raise InvalidParameter("action must be stop")
        stopping = await self.manager.stop_all(parse_timeout(params.get("timeout")))
        return web.json_response({"stopping": stopping}, status=202)

    async def metrics_page(self, request: web.Request) -> web.Response:
        await self.manager.stats.refresh()
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        text = importlib.resources.files("vmadmd.daemon").joinpath("openapi.json").read_text()
        return web.Response(text=text, content_type="application/json")

    async def info(self, request: web.Request) -> web.Response:
        uuid = validate_uuid(request.match_info["uuid"])
        params = await params_of(request)
        raw = params.get("type", params.get("types"))
        types = parse_types(raw)
        return web.json_response(await self.manager.info(uuid, types))

    async def serial(self, request: web.Request) -> web.StreamResponse:
        """The serial console as a WebSocket (binary frames both ways)."""
        uuid = validate_uuid(request.match_info["uuid"])
        console = await self.manager.serial(uuid)  # 404 / 409 before any upgrade
        viewer = console.attach()
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        try:
            await ws.prepare(request)
        except BaseException:
            console.detach(viewer)
            raise
        await serial_relay(ws, console, viewer)
        return ws

    async def qmp(self, request: web.Request) -> web.Response:
        uuid = validate_uuid(request.match_info["uuid"])
        body = await json_body(request)
        if "hmp" in body:
            if set(body) != {"hmp"} or not isinstance(body["hmp"], str):
                raise InvalidParameter('a human monitor request is {"hmp": "TEXT"} alone')
        else:
            cmd, args = body.get("execute"), body.get("arguments")
            if not isinstance(cmd, str) or not cmd or len(cmd) > 128:
                raise InvalidParameter('the body needs "execute": a QMP command name, or "hmp"')
            if set(body) - {"execute", "arguments"}:
                raise InvalidParameter('a QMP request has "execute" and "arguments" only')
            if args is not None and not isinstance(args, dict):
                raise InvalidParameter('"arguments" must be an object')
        return web.json_response({"return": await self.manager.passthrough(uuid, body)})

    async def screenshot_png(self, request: web.Request) -> web.Response:
        uuid = validate_uuid(request.match_info["uuid"])
        data = await self.manager.screenshot_png(uuid)
        return web.Response(body=data, content_type="image/png")

    async def action(self, request: web.Request) -> web.Response:
        uuid = validate_uuid(request.match_info["uuid"])
        params = await params_of(request)
        action = params.get("action")
        m = self.manager
        if action == "stop" or action == "reboot":
            timeout = parse_timeout(params.get("timeout"))
            transition = await m.request_stop(
                uuid, timeout, "start" if action == "reboot" else "stopped"
            )
            return web.json_response({"uuid": uuid, "transition": transition.to_json()}, status=202)
        if action == "reset":
            await m.reset(uuid)
            return web.json_response({"uuid": uuid, "action": "reset"})
        if action == "sysrq":
            request_kind = params.get("request")
            if request_kind == "nmi":
                await m.nmi(uuid)
                return web.json_response({"uuid": uuid, "request": "nmi"})
            if request_kind == "screenshot":
                path = await m.screenshot(uuid, "ppm")
                return web.json_response({"uuid": uuid, "request": "screenshot", "path": path})
            raise InvalidParameter("request must be nmi or screenshot")
        if action in ("reload_vnc", "reload_display"):
            vnc = await m.reload_vnc(uuid)
            return web.json_response({"uuid": uuid, "vnc": vnc})
        if action == "console":
            m.load(uuid)
            if self.console is None:
                raise WrongState(
                    "this vmadmd serves no browser consoles (start it with --console-listen)"
                )
            return web.json_response(await self.console.mint(uuid))
        if action is None:
            raise InvalidParameter("action is required")
        raise InvalidParameter(f"unknown action {action[:40]!r}")

    async def events(self, request: web.Request) -> web.StreamResponse:
        params = await params_of(request)
        vm = params.get("vm")
        if vm is not None:
            validate_uuid(vm)
        # Standard SSE: with Last-Event-ID, replay what followed it (from the
        # bounded history); without, start from now.
        last_raw = request.headers.get("Last-Event-ID", params.get("last_event_id"))
        try:
            last_id = self.bus.last_id if last_raw is None else int(last_raw)
        except ValueError:
            raise InvalidParameter("Last-Event-ID must be an integer") from None
        sub = self.bus.subscribe(vm)
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        resp.headers["X-Request-Id"] = request["req_id"]
        resp.force_close()  # an ended stream (e.g. a dropped slow consumer) ends the connection
        try:
            await resp.prepare(request)
            lost = self.bus.gap(last_id) if last_raw is not None else None
            if lost is not None:
                # The history no longer holds what followed Last-Event-ID:
                # say so, rather than resume as if nothing was missed.
                gap = {"type": "gap", "from": lost[0], "to": lost[1]}
                await resp.write(f"event: gap\ndata: {json.dumps(gap)}\n\n".encode())
            for past in self.bus.since(last_id, vm):
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
            self.bus.unsubscribe(sub)
        with contextlib.suppress(Exception):
            await resp.write_eof()
        return resp


async def _next(sub: Subscriber) -> Event | None:
    return await sub.queue.get()


def _sse(event_id: int, type_: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n".encode()
