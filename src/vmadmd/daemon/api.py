"""vmadmd's HTTP API: its routes, independent of the server that reads them.

Handlers take a ``vmadmd.daemon.http.Request``, validate, call the Manager and
shape JSON into a ``Reply``: plain, the ``/events`` stream, or the serial
console's WebSocket session.  Every request goes through the one envelope
(``http.Service``): request id, the start-up sweep gate, bounds, metrics,
and every error as ``{"error": {"code", "message"}}`` with the status the
error carries.  ``server.py`` serves it on the API socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from vmadmd import __version__
from vmadmd.daemon.events import EventBus
from vmadmd.daemon.http import (
    Handler,
    Reply,
    Request,
    Router,
    Service,
    Stream,
    error_reply,
    first_values,
    json_reply,
    require_websocket,
    websocket_reply,
)
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.supervisor import parse_types
from vmadmd.errors import (
    InvalidParameter,
    PayloadTooLarge,
    VmadmError,
    WrongState,
)
from vmadmd.vm import snapshots
from vmadmd.vm.store import validate_uuid
from vmadmd.vm.transition import TransitionTo

if TYPE_CHECKING:
    from vmadmd.daemon.console import ConsoleServer
    from vmadmd.daemon.websocket import WebSocket

MAX_BODY = 64 * 1024
# A VM arriving by live migration brings its vm.json (at most 1 MiB): only
# that route takes a body past MAX_BODY.
MAX_INCOMING_BODY = (1 << 20) + MAX_BODY
MAX_TIMEOUT = 86400.0
KEEPALIVE = 15.0  # an idle event stream sends a comment this often

BEFORE_SWEEP = frozenset({"/ping", "/openapi.json"})
"""Routes answered at once while the start-up sweep runs; the others wait for
it (a running VM it has not reached yet would read as stopped)."""
STREAMS = frozenset({"/events", "/vm/{uuid}/serial"})
"""Routes that hold their connection (a stream, a WebSocket): no HEAD."""

__all__ = ["MAX_BODY", "MAX_INCOMING_BODY", "Api", "error_reply", "json_reply"]


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


def json_body(request: Request, limit: int = MAX_BODY) -> dict[str, Any]:
    """The request's JSON object body."""
    if len(request.body) > limit:
        raise PayloadTooLarge(f"request body larger than {limit} bytes")
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
            "/events": {"GET": self.events},
            "/vm/{uuid}": {"GET": self.info, "POST": self.action},
            "/vm/{uuid}/info": {"GET": self.info},
            "/vm/{uuid}/screenshot.png": {"GET": self.screenshot_png},
            "/vm/{uuid}/qmp": {"POST": self.qmp},
            "/vm/{uuid}/serial": {"GET": self.serial},
            "/vm/{uuid}/snapshots": {"GET": self.list_snapshots, "POST": self.create_snapshot},
            "/vm/{uuid}/snapshots/{name}": {
                "GET": self.get_snapshot,
                "POST": self.snapshot_action,
                "DELETE": self.delete_snapshot,
            },
            "/vm/{uuid}/migration": {"GET": self.migration},
            "/vms/incoming": {"POST": self.incoming},
            "/vm/{uuid}/incoming": {"GET": self.arrival, "POST": self.incoming_action},
        }
        router = Router()
        for pattern, methods in self.routes.items():
            for method, handler in methods.items():
                router.add(pattern, method, handler, stream=pattern in STREAMS)
        self.service = Service(
            router, gate=self._gate, record=metrics.api_request, in_flight=metrics.api_in_flight
        )
        self.resolve = self.service.resolve
        self.dispatch = self.service.dispatch

    def _gate(self, route: str, request: Request) -> Awaitable[None] | None:
        """Hold what depends on VMs' states until the start-up sweep has
        picked them up: a route about one VM waits for that VM alone."""
        if self.manager.startup.done.is_set() or route in BEFORE_SWEEP:
            return None
        uuid = request.match.get("uuid")
        if uuid is not None:
            try:
                return self.manager.startup.wait_for(validate_uuid(uuid))
            except VmadmError:
                return None  # the route itself refuses it (400)
        return self.manager.startup.wait_all()

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
        return json_reply(await (await self.manager.running(uuid)).info(types))

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
        vm = await self.manager.running(uuid)
        return json_reply({"return": await vm.passthrough(body)})

    # -- snapshots -------------------------------------------------------------

    async def list_snapshots(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        return json_reply(self.manager.snapshots.list(uuid))

    async def create_snapshot(self, request: Request) -> Reply:
        """Body ``{"name": NAME}`` (or ``name=`` as a parameter)."""
        uuid = validate_uuid(request.match["uuid"])
        name = params_of(request).get("name")
        entry = await self.manager.snapshots.create(uuid, snapshots.validate_name(name))
        return json_reply(entry, status=201)

    async def get_snapshot(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        name = snapshots.validate_name(request.match["name"])
        record = self.manager.load(uuid)
        return json_reply(snapshots.entries(record)[snapshots.find(record, name)])

    async def snapshot_action(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        name = snapshots.validate_name(request.match["name"])
        action = params_of(request).get("action")
        if action != "rollback":
            raise InvalidParameter("action must be rollback")
        return json_reply(await self.manager.snapshots.rollback(uuid, name))

    async def delete_snapshot(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        name = snapshots.validate_name(request.match["name"])
        await self.manager.snapshots.delete(uuid, name)
        return json_reply({"name": name, "deleted": True})

    async def serial(self, request: Request) -> Reply:
        """The serial console as a WebSocket (binary frames both ways)."""
        from vmadmd.daemon.websocket import serial_relay

        uuid = validate_uuid(request.match["uuid"])
        console = (await self.manager.running(uuid)).serial  # 404 / 409 before any upgrade
        require_websocket(request)
        viewer = console.attach()

        async def session(ws: WebSocket) -> None:
            await serial_relay(ws, console, viewer)

        return websocket_reply(request, session)

    async def events(self, request: Request) -> Reply:
        """Server-sent events: with Last-Event-ID, what followed it (from the
        bounded history) first; without, from now."""
        vm = request.query.get("vm")
        if vm is not None:
            validate_uuid(vm)
        ready = request.query.get("ready", "false")
        if ready not in ("true", "false"):
            raise InvalidParameter("ready must be true or false")
        last_raw = request.headers.get("last-event-id", request.query.get("last_event_id"))
        bus = self.bus
        try:
            last_id = bus.last_id if last_raw is None else int(last_raw)
        except ValueError:
            raise InvalidParameter("Last-Event-ID must be an integer") from None

        async def stream(out: Stream) -> None:
            sub = bus.subscribe(vm)
            try:
                if ready == "true":
                    # SmartOS's ready marker (`vmadm events -r`): subscribed,
                    # so every event from here on reaches this stream.  No
                    # id: it is not part of the history.
                    import uuid as uuidlib

                    marker = {"type": "ready", "time": time.time(), "uuid": str(uuidlib.uuid4())}
                    await out.send(f"event: ready\ndata: {json.dumps(marker)}\n\n".encode())
                lost = bus.gap(last_id) if last_raw is not None else None
                if lost is not None:
                    # The history no longer holds what followed Last-Event-ID:
                    # say so, rather than resume as if nothing was missed.
                    gap = {"type": "gap", "from": lost[0], "to": lost[1]}
                    await out.send(f"event: gap\ndata: {json.dumps(gap)}\n\n".encode())
                for past in bus.since(last_id, vm):
                    await out.send(_sse(past.id, past.type, past.as_dict()))
                while True:
                    try:
                        event = await asyncio.wait_for(sub.queue.get(), KEEPALIVE)
                    except TimeoutError:
                        await out.send(b": keep-alive\n\n")
                        continue
                    if event is None:  # dropped for being too slow
                        return
                    if event.id > last_id:
                        await out.send(_sse(event.id, event.type, event.as_dict()))
            finally:
                bus.unsubscribe(sub)

        headers = {"Cache-Control": "no-cache"}
        return Reply(200, b"", "text/event-stream", headers, stream=stream)

    # -- live migration (daemon/migration.py) ------------------------------------

    async def migration(self, request: Request) -> Reply:
        """Where this VM's outgoing migration stands (or how it ended)."""
        uuid = validate_uuid(request.match["uuid"])
        return json_reply(self.manager.migrations.progress(uuid).to_json())

    async def incoming(self, request: Request) -> Reply:
        """A VM arriving: made here, its qemu waiting for disks and state."""
        body = json_body(request, MAX_INCOMING_BODY)
        if set(body) - {"vm", "disk_sizes", "receiver"}:
            raise InvalidParameter('the body has "vm", "disk_sizes" and "receiver" only')
        migs = self.manager.migrations
        reply = await migs.receive(body.get("vm"), body.get("disk_sizes"), body.get("receiver"))
        return json_reply(reply)

    async def arrival(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        return json_reply(self.manager.migrations.arrival(uuid))

    async def incoming_action(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        action = params_of(request).get("action")
        migs = self.manager.migrations
        if action == "commit":
            return json_reply(await migs.commit(uuid))
        if action == "abort":
            await migs.abort(uuid)
            return json_reply({"uuid": uuid, "state": "discarded"})
        raise InvalidParameter("action must be commit or abort")

    async def screenshot_png(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        data = await (await self.manager.running(uuid)).screenshot_png()
        return Reply(200, data, "image/png")

    async def action(self, request: Request) -> Reply:
        uuid = validate_uuid(request.match["uuid"])
        params = params_of(request)
        action = params.get("action")
        m = self.manager
        if action == "stop" or action == "reboot":
            timeout = parse_timeout(params.get("timeout"))
            to: TransitionTo = "start" if action == "reboot" else "stopped"
            transition = await (await m.running(uuid)).request_stop(timeout, to)
            return json_reply({"uuid": uuid, "transition": transition.to_json()}, status=202)
        if action == "start":
            from vmadmd.vm.bootopts import BootOptions

            # Options for this boot only, in a JSON body (see openapi.json).
            has_json = bool(request.body) and request.content_type == "application/json"
            if not has_json and set(params) - {"action"}:
                raise InvalidParameter(
                    "start takes its options in a JSON body "
                    '({"order": ..., "cdrom": [...], "disk": [...]})'
                )
            boot = BootOptions.from_json(json_body(request)) if has_json else None
            m.load(uuid)  # 404 first
            await m.boot(uuid, reason="start", boot=boot, set_autoboot=True)
            return json_reply({"uuid": uuid, "state": m.state(uuid)})
        if action == "reset":
            await (await m.running(uuid)).reset()
            return json_reply({"uuid": uuid, "action": "reset"})
        if action == "sysrq":
            request_kind = params.get("request")
            if request_kind not in ("nmi", "screenshot"):
                raise InvalidParameter("request must be nmi or screenshot")
            vm = await m.running(uuid)
            if request_kind == "nmi":
                await vm.nmi()
                return json_reply({"uuid": uuid, "request": "nmi"})
            path = await vm.screenshot("ppm")
            return json_reply({"uuid": uuid, "request": "screenshot", "path": path})
        if action in ("reload_vnc", "reload_display"):
            vnc = await m.reload_vnc(uuid)
            return json_reply({"uuid": uuid, "vnc": vnc})
        if action == "apply_devices":
            from vmadmd.daemon.hotplug import parse_unplug_timeout

            timeout = parse_unplug_timeout(params.get("unplug_timeout"))
            result = await m.apply_devices(uuid, timeout)
            return json_reply({"uuid": uuid, **result})
        if action == "migrate":
            target = params.get("target")
            if not target:
                raise InvalidParameter("target is required: an ssh destination, [user@]host")
            raw = params.get("bandwidth")
            try:
                bandwidth = int(raw) if raw else None
            except ValueError:
                raise InvalidParameter("bandwidth must be a whole number of MiB/s") from None
            progress = await m.migrations.start(uuid, target, bandwidth)
            return json_reply(progress.to_json(), status=202)
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


def _sse(event_id: int, type_: str, data: dict[str, Any]) -> bytes:
    return f"id: {event_id}\nevent: {type_}\ndata: {json.dumps(data)}\n\n".encode()
