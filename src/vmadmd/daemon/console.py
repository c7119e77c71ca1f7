"""Browser consoles: one-time tokens, a noVNC page, and a WebSocket relay to ``vm.vnc``.

Off unless ``--console-listen ADDR:PORT`` is given; it is a separate HTTP
listener from the unix-socket API.  ``POST /vm/<uuid>?action=console`` on
the API mints a token that opens one session, once, within ``ttl`` seconds.
The page at ``/console/<token>`` loads noVNC (the npm package, served from
its install directory) and connects its WebSocket to
``/console/<token>/ws``, which spends the token and relays binary frames to
the VM's VNC socket, reached the same way the TCP listeners reach it
(``vnc.open_upstream``).  Tokens never appear whole in logs.
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import json
import logging
import secrets
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.responses import json_errors, run_session, serial_relay
from vmadmd.daemon.vnc import open_upstream
from vmadmd.errors import Forbidden, Unreachable

log = logging.getLogger("vmadmd.console")

TOKEN_TTL = 30.0  # seconds to open the console
STATE_TTL = 3600.0  # how long a spent token may still ask whether its VM runs
MAX_TOKENS = 4096


def shown(token: str) -> str:
    """What of a token may appear in a log line."""
    return token[:6] + "…"


# What one token opens, once each: the screen (noVNC) and the serial console.
CHANNELS = ("screen", "serial")


@dataclass
class _Token:
    uuid: str
    expires: float
    used: set[str] = field(default_factory=set)


class TokenStore:
    """One-time, short-lived tokens; the clock is injected for tests."""

    def __init__(self, ttl: float = TOKEN_TTL, clock: Callable[[], float] = time.monotonic):
        self.ttl = ttl
        self._clock = clock
        self._tokens: OrderedDict[str, _Token] = OrderedDict()

    def issue(self, uuid: str) -> tuple[str, float]:
        self._purge()
        token = secrets.token_urlsafe(24)
        expires = self._clock() + self.ttl
        self._tokens[token] = _Token(uuid, expires)
        while len(self._tokens) > MAX_TOKENS:
            self._tokens.popitem(last=False)
        return token, expires

    def peek(self, token: str) -> str | None:
        """The VM a valid token opens while one of its channels is unspent."""
        entry = self._tokens.get(token)
        if entry is None or len(entry.used) == len(CHANNELS) or self._clock() > entry.expires:
            return None
        return entry.uuid

    def spend(self, token: str, channel: str = "screen") -> str | None:
        """Spend one channel of the token: its VM, once per channel; None when
        missing, expired, or that channel is spent."""
        entry = self._tokens.get(token)
        if entry is None or channel in entry.used or self._clock() > entry.expires:
            return None
        entry.used.add(channel)
        return entry.uuid

    def owner(self, token: str) -> str | None:
        """The VM of a token, spent or not, for a while after it was issued."""
        entry = self._tokens.get(token)
        if entry is None or self._clock() > self._forgotten_at(entry):
            return None
        return entry.uuid

    def _forgotten_at(self, entry: _Token) -> float:
        """When a token, spent or not, is dropped altogether."""
        return entry.expires - self.ttl + STATE_TTL

    def _purge(self) -> None:
        now = self._clock()
        for token in [t for t, e in self._tokens.items() if now > self._forgotten_at(e)]:
            del self._tokens[token]


class ConnectionGate:
    """How many connections the console listener holds: in all, and per client
    address.  Reachable from the network when enabled, it must not let one
    peer take the daemon's file descriptors (then pidfds, QMP reconnects and
    API accepts would fail for every VM)."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self.open: dict[str, int] = {}
        self.refused = 0

    def admit(self, client: str) -> bool:
        if sum(self.open.values()) >= self.total or self.open.get(client, 0) >= self.per_client:
            self.refused += 1
            return False
        self.open[client] = self.open.get(client, 0) + 1
        return True

    def release(self, client: str) -> None:
        left = self.open.get(client, 0) - 1
        if left > 0:
            self.open[client] = left
        else:
            self.open.pop(client, None)


class _GatedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the gate.

    Written by hand because aiohttp has no connection limits: the listening
    server makes these, each admitting its connection (or closing it at
    once) and then handing every call to aiohttp's own protocol.
    """

    def __init__(self, gate: ConnectionGate, make: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._make = make
        self._inner: asyncio.Protocol | None = None
        self._client = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
        if not self._gate.admit(self._client):
            if isinstance(transport, asyncio.Transport):
                transport.abort()
            else:
                transport.close()
            return
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._gate.release(self._client)
            self._inner.connection_lost(exc)


class _WarnLimit:
    """At most one warning per ``period`` seconds; the ones held back are counted."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._last = -period
        self._held = 0

    def warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.period:
            self._held += 1
            return
        if self._held:
            msg += " (and %d more like it)"
            args = (*args, self._held)
        self._last, self._held = now, 0
        log.warning(msg, *args)


# The page's Content-Security-Policy: everything from this listener, scripts
# only with this response's nonce, no framing.
CSP = (
    "default-src 'self'; script-src 'self' 'nonce-{nonce}'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'"
)


def script_json(value: object) -> str:
    """JSON safe inside an HTML <script> element, whatever strings it holds."""
    text = json.dumps(value)
    for char, escaped in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                          ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


class ConsoleServer:
    def __init__(
        self,
        manager: Manager,
        host: str,
        port: int,
        novnc_dir: str | None,
        *,
        xterm_dir: str | None = None,
        ttl: float = TOKEN_TTL,
        idle_timeout: float = 600.0,
        tls: ssl.SSLContext | None = None,
        keepalive: float = 15.0,
        max_connections: int = 256,
        max_per_client: int = 16,
    ) -> None:
        self.manager = manager
        self.host = host
        self.port = port
        self.novnc_dir = novnc_dir
        self.xterm_dir = xterm_dir
        self.tokens = TokenStore(ttl)
        self.idle_timeout = idle_timeout
        self.sessions: set[web.WebSocketResponse] = set()
        self.tls = tls
        self.keepalive = keepalive
        self.gate = ConnectionGate(max_connections, max_per_client)
        self._refusals = _WarnLimit()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None

    def url_for(self, token: str) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://{host}:{self.port}/console/{token}"

    async def mint(self, uuid: str) -> dict[str, Any]:
        """A one-time console URL for a running VM."""
        await self.manager.running(uuid)
        token, expires = self.tokens.issue(uuid)
        vm_log(log, uuid).info("console token %s issued", shown(token))
        wall_expires = time.time() + (expires - time.monotonic())
        return {"uuid": uuid, "url": self.url_for(token), "expires": int(wall_expires * 1000)}

    # -- HTTP --------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[json_errors])
        app.router.add_get("/console/{token}", self.page)
        app.router.add_get("/console/{token}/ws", self.websocket)
        app.router.add_get("/console/{token}/state", self.state)
        app.router.add_get("/console/{token}/serial", self.serial)
        if self.novnc_dir:
            app.router.add_static("/novnc", self.novnc_dir, follow_symlinks=False)
        if self.xterm_dir:
            app.router.add_static("/xterm", self.xterm_dir, follow_symlinks=False)
        return app

    async def start(self) -> None:
        # Idle keep-alive connections are let go after `keepalive` seconds
        # (aiohttp's default holds them for an hour).
        self._runner = web.AppRunner(
            self.app(), access_log=None, handle_signals=False, keepalive_timeout=self.keepalive
        )
        await self._runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family, backlog=128)
        sock.setblocking(False)
        server = self._runner.server
        assert server is not None
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _GatedProtocol(self.gate, server), sock=sock, ssl=self.tls
        )
        self.port = int(sock.getsockname()[1])
        log.info("browser consoles on %s", self.url_for("").removesuffix("/"))

    async def close(self) -> None:
        for ws in list(self.sessions):
            await ws.close(code=1001, message=b"vmadmd is shutting down")
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _check_origin(self, request: web.Request) -> None:
        """A browser's WebSocket must come from this listener's own page."""
        origin = request.headers.get("Origin")
        if origin is None:
            return  # not a browser: the token is what admits it
        scheme = "https" if self.tls is not None else "http"
        if origin != f"{scheme}://{request.host}":
            self._refusals.warn("console WebSocket from a foreign origin %r refused", origin[:80])
            raise Forbidden("this console accepts WebSockets from its own page only")

    async def page(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        uuid = self.tokens.peek(token)
        if uuid is None:
            raise Forbidden("This console link is invalid, used or expired.")
        config = {
            "token": token,
            "uuid": uuid,
            "name": self.manager.alias(uuid),
            # Sent by the page when qemu asks (the token holder has the console anyway).
            "password": self.manager.vnc_password(uuid),
        }
        template = importlib.resources.files("vmadmd.daemon").joinpath("console.html").read_text()
        nonce = secrets.token_urlsafe(16)
        body = (
            template.replace("{{title}}", html.escape(str(config["name"])))
            .replace("{{config}}", script_json(config))
            .replace("{{nonce}}", nonce)
        )
        return web.Response(
            text=body,
            content_type="text/html",
            headers={
                "Cache-Control": "no-store",
                "Referrer-Policy": "no-referrer",
                "Content-Security-Policy": CSP.format(nonce=nonce),
                "X-Frame-Options": "DENY",
                "X-Content-Type-Options": "nosniff",
            },
        )

    async def state(self, request: web.Request) -> web.Response:
        uuid = self.tokens.owner(request.match_info["token"])
        if uuid is None:
            return web.json_response({"state": "unknown"}, status=403)
        state = "running" if self.manager.is_running(uuid) else "stopped"
        return web.json_response({"state": state})

    async def serial(self, request: web.Request) -> web.StreamResponse:
        """The serial console beside the screen: the token's serial channel."""
        token = request.match_info["token"]
        self._check_origin(request)
        uuid = self.tokens.spend(token, "serial")
        if uuid is None:
            self._refusals.warn("console token %s refused (serial)", shown(token))
            raise Forbidden("invalid, used or expired console token")
        console = await self.manager.serial(uuid)  # 409 when not running
        viewer = console.attach()
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=64 * 1024)
        try:
            await ws.prepare(request)
        except BaseException:
            console.detach(viewer)
            raise
        self.sessions.add(ws)
        vm_log(log, uuid).info("serial console session opened (token %s)", shown(token))
        try:
            await serial_relay(ws, console, viewer)
        finally:
            self.sessions.discard(ws)
        return ws

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        self._check_origin(request)
        uuid = self.tokens.spend(token)
        if uuid is None:
            self._refusals.warn("console token %s refused", shown(token))
            raise Forbidden("invalid, used or expired console token")
        directory, name, peer = await self.manager.vnc_socket(uuid)  # 409 when not running
        # Connect to qemu before accepting the WebSocket: a refused session
        # gets a plain HTTP error, and no byte reaches qemu without a token.
        try:
            reader, writer = await open_upstream(directory, name, peer)
        except OSError as err:
            raise Unreachable(f"cannot reach the VM's console: {err}") from err
        ws = web.WebSocketResponse(protocols=("binary",), max_msg_size=1 << 20)
        await ws.prepare(request)
        self.sessions.add(ws)
        self.manager.metrics.console_sessions.inc()
        vm_log(log, uuid).info("console session opened (token %s)", shown(token))
        try:
            await self._relay(ws, reader, writer)
        finally:
            self.sessions.discard(ws)
            self.manager.metrics.console_sessions.dec()
            writer.close()
            vm_log(log, uuid).info("console session closed")
        return ws

    async def _relay(
        self, ws: web.WebSocketResponse, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        last_input = time.monotonic()

        async def upstream_to_ws() -> str:
            while data := await reader.read(65536):
                await ws.send_bytes(data)
            return "the VM has stopped"

        async def ws_to_upstream() -> str:
            nonlocal last_input
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    last_input = time.monotonic()
                    writer.write(msg.data)
                    await writer.drain()
                elif msg.type == WSMsgType.ERROR:
                    break
            return ""

        async def idle() -> str:
            while True:
                left = last_input + self.idle_timeout - time.monotonic()
                if left <= 0:
                    return "idle timeout"
                await asyncio.sleep(left)

        await run_session(ws, upstream_to_ws, ws_to_upstream, idle)
