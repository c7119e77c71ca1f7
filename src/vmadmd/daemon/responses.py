"""How every HTTP listener of the daemon answers errors: one JSON shape.

``{"error": {"code", "message"}}`` with the status the error carries
(``VmadmError.status``); aiohttp's own 4xx (bad method, URI too long) get
the same shape; anything else that escapes a handler is a bug: 500, logged
with its traceback.  Used by the API on the unix socket and by the browser
console listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

from vmadmd.daemon.serial import SerialConsole, Viewer
from vmadmd.errors import VmadmError, error_document

log = logging.getLogger("vmadmd.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_HTTP_CODES = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
    414: "UriTooLong",
}


def error_response(status: int, code: str, message: str, **details: object) -> web.Response:
    return web.json_response(error_document(code, message, **details), status=status)


async def answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler's response, or the JSON error it stands for."""
    try:
        return await handler(request)
    except VmadmError as err:
        return error_response(err.status, err.code, err.message, **err.details())
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, _HTTP_CODES.get(exc.status, "HttpError"), exc.reason)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("bug while serving %s %s", request.method, request.path_qs)
        return error_response(500, "InternalError", "internal error (logged by vmadmd)")


async def run_session(
    ws: web.WebSocketResponse, *sides: Callable[[], Coroutine[Any, Any, str]]
) -> None:
    """Run a WebSocket session's sides until the first ends; close with its reason.

    Each side returns why the session ended ("" when the client left); the
    others are cancelled, and the socket is closed with that reason.
    """
    tasks = [asyncio.create_task(side()) for side in sides]
    reason = ""
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        reason = next(iter(done)).result()
    except (ConnectionError, OSError):
        reason = "connection lost"
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not ws.closed:
        await ws.close(code=WSCloseCode.OK, message=reason.encode()[:120])


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    return await answer(request, handler)


async def serial_relay(ws: web.WebSocketResponse, console: SerialConsole, viewer: Viewer) -> None:
    """Serve one WebSocket viewer until either side ends; closes it with the reason."""

    async def to_viewer() -> str:
        while (chunk := await viewer.next()) is not None:
            await ws.send_bytes(chunk)
        return viewer.reason

    async def from_viewer() -> str:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await console.write(msg.data)
            elif msg.type == WSMsgType.TEXT:
                await console.write(msg.data.encode())
            elif msg.type == WSMsgType.ERROR:
                break
        return ""

    try:
        await run_session(ws, to_viewer, from_viewer)
    finally:
        console.detach(viewer)
