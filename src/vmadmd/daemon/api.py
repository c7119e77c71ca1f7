"""vmadmd's HTTP API: its routes, independent of the server that reads them.

Handlers take a ``vmadmd.daemon.http.Request``, validate, call the Manager and
shape JSON into a ``Reply``.  ``dispatch`` wraps every call: request id,
metrics, and errors: every error leaves as ``{"error": {"code", "message"}}``
with the status the error carries; anything else that escapes a handler is a
bug: 500, logged with traceback.  The plain routes are served by the front in
``http.py``; the streams (``/events``, the serial WebSocket) by aiohttp
(``web.py``), imported only when one is asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from vmadmd import __version__
from vmadmd.daemon.events import EventBus
from vmadmd.daemon.http import Reply, Request, first_values
from vmadmd.daemon.logs import req_id_var
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.supervisor import parse_types
from vmadmd.errors import (
    InvalidParameter,
    PayloadTooLarge,
    VmadmError,
    WrongState,
    error_document,
)
from vmadmd.vm.store import validate_uuid

if TYPE_CHECKING:
    from aiohttp import web

    from vmadmd.daemon.console import ConsoleServer

log = logging.getLogger("vmadmd.api")

MAX_BODY = 64 * 1024
MAX_QUERY = 8 * 1024
MAX_TIMEOUT = 86400.0

_METHODS = frozenset({"GET", "POST", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"})
BEFORE_SWEEP = frozenset({"/ping", "/openapi.json"})
"""Routes answered at once while the start-up sweep runs; the others wait for
it (a running VM it has not reached yet would read as stopped)."""
WEB_ONLY = frozenset({"/events", "/vm/{uuid}/serial"})
"""Routes aiohttp serves (a stream, a WebSocket); the others are plain."""

Handler = Callable[[Request], Awaitable[Reply]]


def json_reply(data: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(data).encode(), data=data)


def pretty(reply: Reply) -> None:
    """``?pretty=true``: indented, keys sorted, a final newline: what ``vmadm``
    prints, so that it prints the body as it comes (no JSON decoding there)."""
    if reply.data is not None:
        reply.body = (json.dumps(reply.data, indent=2, sort_keys=True) + "\n").encode()


def error_reply(status: int, code: str, message: str, **details: object) -> Reply:
    return json_reply(error_document(code, message, **details), status)


def request_id(given: str | None) -> str:
    """The client's X-Request-Id (bounded), or a new one."""
    given = (given or "")[:64]
    if given and given.isprintable():
        return given
    return f"{random.getrandbits(64):016x}"  # no syscall, unlike uuid4


def params_of(request: Request) -> dict[str, str]:
    """Query parameters, plus a form-encoded POST body as real SmartOS clients send."""
    params = dict(request.query)
    if request.method == "POST" and request.body:
        if len(request.body) > MAX_BODY:
            raise PayloadTooLarge(f"request body larger than {MAX_BODY} bytes")
        ctype = request.content_type
        if ctype == "application/x-www-form-urlencoded":
            for key, value in first_values(request.body.decode("utf-8", "replace")).items():
                params.setdefault(key, value)
        elif ctype == "application/json":
            for key, value in json_body(request).items():
                params.setdefault(str(key), value if isinstance(value, str) else json.dumps(value))
    return params


def json_body(request: Request) -> dict[str, Any]:
    """The request's JSON object body."""
    if len(request.body) > MAX_BODY:
        raise PayloadTooLarge(f"request body larger than {MAX_BODY} bytes")
    try:
        body = json.loads(request.body)
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
        self.routes: dict[str, dict[str, Handler]] = {
            "/ping": {"GET": self.ping},
            "/vms": {"GET": self.list_vms, "POST": self.vms_action},
            "/openapi.json": {"GET": self.openapi},
            "/metrics": {"GET": self.metrics_page},
            "/vm/{uuid}": {"GET": self.info, "POST": self.action},
            "/vm/{uuid}/info": {"GET": self.info},
            "/vm/{uuid}/screenshot.png": {"GET": self.screenshot_png},
            "/vm/{uuid}/qmp": {"POST": self.qmp},
        }
        for web_only in WEB_ONLY:
            self.routes[web_only] = {"GET": self._web_only}
        # "/vm/{uuid}/x" -> ("vm", "{uuid}", "x"), matched segment by segment
        self._patterns = [(tuple(p.split("/")[1:]), p) for p in self.routes]

    def app(self) -> web.Application:
        """The aiohttp application: every route (the streams, and the plain ones
        for connections the front handed over)."""
        from vmadmd.daemon.web import build_app

        return build_app(self)

    # -- serving -----------------------------------------------------------

    def resolve(self, method: str, path: str) -> tuple[str | None, dict[str, str], frozenset[str]]:
        """(route, path parameters, allowed methods) of a request.

        ``{uuid}`` matches one non-empty segment, as aiohttp's router does.
        """
        segments = path.split("/")[1:]
        for shape, route in self._patterns:
            if len(shape) != len(segments):
                continue
            match: dict[str, str] = {}
            for want, got in zip(shape, segments, strict=True):
                if want[:1] == "{":
                    if not got:
                        break
                    match[want[1:-1]] = got
                elif want != got:
                    break
            else:
                methods = self.routes[route]
                if method in methods:
                    return route, match, frozenset(methods)
                return None, {}, frozenset(methods)
        return None, {}, frozenset()

    async def dispatch(self, request: Request, route: str | None, allowed: frozenset[str]) -> Reply:
        """Serve one request: request id, metrics, and the JSON error shape."""
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
            self.metrics.api_in_flight.inc()
            try:
                if not self.manager.swept.is_set() and route not in BEFORE_SWEEP:
                    await self.manager.wait_swept()
                reply = await self.call(self.routes[route][request.method], request)
            finally:
                self.metrics.api_in_flight.dec()
            wanted = "pretty" in request.query_string and request.query.get("pretty") == "true"
            if wanted and reply.status < 300:
                pretty(reply)
        reply.headers["X-Request-Id"] = req_id
        self.record(route or "unmatched", request.method, reply.status, time.monotonic() - t0)
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
        # Bounded label values: a client must not be able to mint new series.
        method = method if method in _METHODS else "other"
        self.metrics.api_request(route, method, status, took)

    async def _web_only(self, request: Request) -> Reply:
        """A stream reached as a plain request (a HEAD): GET it."""
        reply = error_reply(405, "MethodNotAllowed", f"{request.path} is a stream: GET it")
        reply.headers["Allow"] = "GET"
        return reply

    # -- routes ------------------------------------------------------------

    async def ping(self, request: Request) -> Reply:
        body = {
            "ok": True,
            "version": __version__,
            "uptime": round(time.monotonic() - self.started, 3),
            **self.manager.connection_counts(),
        }
        body.update(self.status())
        return json_reply(body)

    async def list_vms(self, request: Request) -> Reply:
        return json_reply(self.manager.listing())

    async def vms_action(self, request: Request) -> Reply:
        params = params_of(request)
        action = params.get("action")
        if action != "stop":
            raise InvalidParameter("action must be stop")
        stopping = await self.manager.stop_all(parse_timeout(params.get("timeout")))
        return json_reply({"stopping": stopping}, status=202)

    async def metrics_page(self, request: Request) -> Reply:
        await self.manager.stats.refresh()
        return Reply(200, *await self.metrics.page())

    async def openapi(self, request: Request) -> Reply:
        import importlib.resources  # here: ~3 ms of start-up otherwise

        data = importlib.resources.files("vmadmd.daemon").joinpath("openapi.json").read_bytes()
        return Reply(200, data, "application/json; charset=utf-8")

    async def info(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        params = params_of(request)
        raw = params.get("type", params.get("types"))
        types = parse_types(raw)
        return json_reply(await self.manager.info(uuid, types))

    async def qmp(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        body = json_body(request)
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
        return json_reply({"return": await self.manager.passthrough(uuid, body)})

    async def screenshot_png(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        data = await self.manager.screenshot_png(uuid)
        return Reply(200, data, "image/png")

    async def action(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        params = params_of(request)
        action = params.get("action")
        m = self.manager
        if action == "stop" or action == "reboot":
            timeout = parse_timeout(params.get("timeout"))
            transition = await m.request_stop(
                uuid, timeout, "start" if action == "reboot" else "stopped"
            )
            return json_reply({"uuid": uuid, "transition": transition.to_json()}, status=202)
        if action == "reset":
            await m.reset(uuid)
            return json_reply({"uuid": uuid, "action": "reset"})
        if action == "sysrq":
            request_kind = params.get("request")
            if request_kind == "nmi":
                await m.nmi(uuid)
                return json_reply({"uuid": uuid, "request": "nmi"})
            if request_kind == "screenshot":
                path = await m.screenshot(uuid, "ppm")
                return json_reply({"uuid": uuid, "request": "screenshot", "path": path})
            raise InvalidParameter("request must be nmi or screenshot")
        if action in ("reload_vnc", "reload_display"):
            vnc = await m.reload_vnc(uuid)
            return json_reply({"uuid": uuid, "vnc": vnc})
        if action == "console":
            m.load(uuid)
            if self.console is None:
                raise WrongState(
                    "this vmadmd serves no browser consoles (start it with --console-listen)"
                )
            return json_reply(await self.console.mint(uuid))
        if action is None:
            raise InvalidParameter("action is required")
        raise InvalidParameter(f"unknown action {action[:40]!r}")
