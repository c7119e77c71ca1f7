"""A WebSocket client for tests (wsproto's client side, over asyncio streams).

Independent of the daemon's server code (which uses wsproto's server side
and h11), so a test that speaks through it checks the wire, not the server
against itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl as ssl_mod
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)


class Refused(Exception):
    """The server answered the upgrade with an HTTP error."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"HTTP {status}: {body[:200]!r}")
        self.status = status
        self.body = body

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = json.loads(self.body)["error"]
        return error


class WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.messages: list[bytes] = []
        self.close_code: int | None = None
        self.close_reason = ""
        self.subprotocol: str | None = None

    @classmethod
    async def connect(
        cls,
        path: str,
        *,
        unix: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl_mod.SSLContext | None = None,
        origin: str | None = None,
        subprotocols: tuple[str, ...] = (),
    ) -> WsClient:
        if unix is not None:
            reader, writer = await asyncio.open_unix_connection(unix)
        else:
            reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        client = cls(reader, writer)
        extra = [(b"Origin", origin.encode())] if origin is not None else []
        writer.write(
            client.ws.send(
                Request(
                    host=f"{host}:{port}" if unix is None else "vmadmd",
                    target=path,
                    subprotocols=list(subprotocols),
                    extra_headers=extra,
                )
            )
        )
        status, body = 0, b""
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            client.ws.receive_data(data or None)
            for event in client.ws.events():
                if isinstance(event, AcceptConnection):
                    client.subprotocol = event.subprotocol
                    return client
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        writer.close()
                        raise Refused(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished:
                        writer.close()
                        raise Refused(status, body)
            if not data:
                writer.close()
                raise Refused(status, body)

    async def receive(self, timeout: float = 10) -> bytes | None:
        """The next message's bytes; None once closed (``close_code``, ``close_reason``)."""
        while True:
            self._events()
            if self.messages:
                return self.messages.pop(0)
            if self.close_code is not None:
                return None
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            self.ws.receive_data(data or None)
            if not data:
                self._events()
                if self.close_code is None:
                    self.close_code = 1006

    def _events(self) -> None:
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self.messages.append(bytes(event.data))
            elif isinstance(event, TextMessage):
                self.messages.append(event.data.encode())
            elif isinstance(event, Ping):
                self.writer.write(self.ws.send(event.response()))
            elif isinstance(event, CloseConnection):
                self.close_code, self.close_reason = event.code, event.reason or ""

    async def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data=data)))
        await self.writer.drain()

    async def close(self) -> None:
        if self.close_code is None:
            with contextlib.suppress(Exception):  # already closing: nothing to say
                self.writer.write(self.ws.send(CloseConnection(code=1000)))
        self.writer.close()
