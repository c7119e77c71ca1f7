"""Browser consoles: one-time tokens, a noVNC page, and a WebSocket relay to ``vm.vnc``.

Off unless ``--console-listen ADDR:PORT`` is given; it is a separate HTTP
listener from the unix-socket API.  ``POST /vm/<uuid>?action=console`` on
the API mints a token that opens one session, once, within ``ttl`` seconds.
The page at ``/console/<token>`` loads noVNC (the npm package, served from
its install directory) and connects its WebSocket to
``/console/<token>/ws``, which spends the token and relays binary frames to
the VM's VNC socket, reached the same way the TCP listeners reach it
(``vnc.open_upstream``).  Tokens never appear whole in logs.

The listener is the API's own server (``server.py``: h11, wsproto, one
envelope, the client timeout, here ``--console-keepalive``), on TCP and,
with a certificate, TLS.  Both WebSocket channels of a token, the screen
and the serial console, end after ``idle_timeout`` seconds without input.
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import json
import logging
import mimetypes
import os
import secrets
import socket
import ssl
import stat
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vmadmd.daemon.http import (
    Reply,
    Request,
    Router,
    Service,
    error_reply,
    json_reply,
    require_websocket,
)
from vmadmd.daemon.http import websocket_reply as accept
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.server import HttpServer
from vmadmd.daemon.vnc import open_upstream
from vmadmd.daemon.websocket import WebSocket, idle_side, run_session, serial_relay
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


MAX_STATIC = 16 << 20


class NoFile(Exception):
    """What ``read_static`` raises for anything it will not serve."""


def read_static(root: str, relative: str) -> tuple[bytes, str]:
    """A file under ``root`` (noVNC's, xterm.js's), and its content type.

    Each component is opened without following a link, relative to its
    parent's descriptor: nothing outside ``root`` is reachable, by ``..``,
    an encoded slash or a link.  Only regular files, of bounded size.
    """
    parts = relative.split("/")
    if any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise NoFile(relative)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    walk = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fds: list[int] = []
    try:
        fds.append(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        for part in parts[:-1]:
            fds.append(os.open(part, walk, dir_fd=fds[-1]))
        leaf = os.open(parts[-1], flags, dir_fd=fds[-1])
    except OSError:
        raise NoFile(relative) from None
    finally:
        for fd in fds:
            os.close(fd)
    try:
        info = os.fstat(leaf)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_STATIC:
            raise NoFile(relative)
        with os.fdopen(leaf, "rb", closefd=False) as f:
            data = f.read(MAX_STATIC + 1)
    finally:
        os.close(leaf)
    kind = mimetypes.guess_type(parts[-1])[0] or "application/octet-stream"
    if kind in ("application/javascript", "text/javascript"):
        kind = "text/javascript"
    return data, kind


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
        self.tls = tls
        self.keepalive = keepalive
        self.gate = ConnectionGate(max_connections, max_per_client)
        self._refusals = _WarnLimit()
        self._server: HttpServer | None = None

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

    def service(self) -> Service:
        router = Router()
        router.add("/console/{token}", "GET", self.page)
        router.add("/console/{token}/ws", "GET", self.websocket, stream=True)
        router.add("/console/{token}/state", "GET", self.state)
        router.add("/console/{token}/serial", "GET", self.serial, stream=True)
        for prefix, directory in (("/novnc", self.novnc_dir), ("/xterm", self.xterm_dir)):
            if directory:
                router.add(prefix + "/{path*}", "GET", self._static(directory))
        return Service(router)

    def _static(self, directory: str) -> Callable[[Request], Any]:
        async def static(request: Request) -> Reply:
            try:
                data, kind = await asyncio.to_thread(read_static, directory, request.match["path"])
            except NoFile:
                return error_reply(404, "NotFound", "Not Found")
            return Reply(200, data, kind, {"X-Content-Type-Options": "nosniff"})

        return static

    async def start(self) -> None:
        # The client timeout of this listener is --console-keepalive: idle
        # keep-alive connections, trickled requests and TLS handshakes alike.
        self._server = HttpServer(
            self.service(), client_timeout=self.keepalive, max_body=64 * 1024,
            gate=self.gate, tls=self.tls,
        )  # fmt: skip
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.create_server((self.host, self.port), family=family)
        await self._server.start(sock)
        self.port = int(sock.getsockname()[1])
        log.info("browser consoles on %s", self.url_for("").removesuffix("/"))

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close(1.0)

    def _check_origin(self, request: Request) -> None:
        """A browser's WebSocket must come from this listener's own page."""
        origin = request.headers.get("origin")
        if origin is None:
            return  # not a browser: the token is what admits it
        scheme = "https" if self.tls is not None else "http"
        if origin != f"{scheme}://{request.headers.get('host', '')}":
            self._refusals.warn("console WebSocket from a foreign origin %r refused", origin[:80])
            raise Forbidden("this console accepts WebSockets from its own page only")

    async def page(self, request: Request) -> Reply:
        token = request.match["token"]
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
        headers = {
            "Cache-Control": "no-store",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": CSP.format(nonce=nonce),
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
        }
        return Reply(200, body.encode(), "text/html; charset=utf-8", headers)

    async def state(self, request: Request) -> Reply:
        uuid = self.tokens.owner(request.match["token"])
        if uuid is None:
            return json_reply({"state": "unknown"}, status=403)
        state = "running" if self.manager.is_running(uuid) else "stopped"
        return json_reply({"state": state})

    async def serial(self, request: Request) -> Reply:
        """The serial console beside the screen: the token's serial channel."""
        token = request.match["token"]
        require_websocket(request)
        self._check_origin(request)
        uuid = self.tokens.spend(token, "serial")
        if uuid is None:
            self._refusals.warn("console token %s refused (serial)", shown(token))
            raise Forbidden("invalid, used or expired console token")
        console = await self.manager.serial(uuid)  # 409 when not running
        viewer = console.attach()

        async def session(ws: WebSocket) -> None:
            vm_log(log, uuid).info("serial console session opened (token %s)", shown(token))
            await serial_relay(ws, console, viewer, self.idle_timeout)

        return accept(request, session, ("binary",))

    async def websocket(self, request: Request) -> Reply:
        token = request.match["token"]
        require_websocket(request)
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

        async def session(ws: WebSocket) -> None:
            self.manager.metrics.console_sessions.inc()
            vm_log(log, uuid).info("console session opened (token %s)", shown(token))
            try:
                await self._relay(ws, reader, writer)
            finally:
                self.manager.metrics.console_sessions.dec()
                writer.close()
                vm_log(log, uuid).info("console session closed")

        return accept(request, session, ("binary",))

    async def _relay(
        self, ws: WebSocket, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        last_input = time.monotonic()

        async def upstream_to_ws() -> str:
            while data := await reader.read(65536):
                await ws.send(data)
            return "the VM has stopped"

        async def ws_to_upstream() -> str:
            nonlocal last_input
            while (data := await ws.receive()) is not None:
                last_input = time.monotonic()
                writer.write(data)
                await writer.drain()
            return ""

        idle = idle_side(self.idle_timeout, lambda: last_input)
        await run_session(ws, upstream_to_ws, ws_to_upstream, idle)
