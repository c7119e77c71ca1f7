"""A small client for vmadmd's HTTP API on its unix socket.

Standard library only (``http.client``): ``vmadm`` must start fast, and
importing aiohttp alone costs ~170 ms.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlencode

from .errors import DaemonUnavailable, VmadmError
from .sockets import connect_unix


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = connect_unix(os.path.dirname(self._path) or ".", os.path.basename(self._path))
        self.sock.settimeout(self.timeout)


class ApiError(VmadmError):
    """An error answer from the daemon, with its status and code."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class Client:
    def __init__(self, socket_path: str, timeout: float = 60.0) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(self, timeout: float | None = None) -> _UnixHTTPConnection:
        return _UnixHTTPConnection(self.socket_path, timeout or self.timeout)

    def request(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """Send one request; returns (status, decoded JSON).  Raises ApiError on 4xx/5xx."""
        url = path + ("?" + urlencode(params) if params else "")
        conn = self._open(timeout)
        try:
            try:
                conn.request(method, url, headers={"Accept": "application/json"})
                resp = conn.getresponse()
                body = resp.read()
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise DaemonUnavailable(
                    f"vmadmd is not running (socket {self.socket_path}: {err.strerror})"
                ) from None
            except PermissionError:
                raise DaemonUnavailable(
                    f"vmadmd socket {self.socket_path}: permission denied"
                ) from None
            except TimeoutError:
                raise DaemonUnavailable(f"vmadmd did not answer on {self.socket_path}") from None
            except (http.client.HTTPException, ConnectionError) as err:
                raise DaemonUnavailable(f"vmadmd connection failed: {err}") from None
        finally:
            conn.close()
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = {"raw": body.decode(errors="replace")}
        if resp.status >= 400:
            info = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(
                resp.status,
                str(info.get("code", "Error")),
                str(info.get("message", f"HTTP {resp.status}")),
            )
        return resp.status, data

    def stream(self, path: str, params: dict[str, str] | None = None) -> Iterator[str]:
        """Yield lines of a streaming response (server-sent events)."""
        url = path + ("?" + urlencode(params) if params else "")
        conn = self._open()
        try:
            try:
                conn.connect()
                assert conn.sock is not None
                conn.sock.settimeout(None)
                conn.request("GET", url, headers={"Accept": "text/event-stream"})
                resp = conn.getresponse()
            except (FileNotFoundError, ConnectionRefusedError) as err:
                raise DaemonUnavailable(
                    f"vmadmd is not running (socket {self.socket_path}: {err.strerror})"
                ) from None
            if resp.status >= 400:
                raise ApiError(resp.status, "Error", resp.read().decode(errors="replace"))
            while True:
                line = resp.readline()
                if not line:
                    return
                yield line.decode(errors="replace").rstrip("\r\n")
        finally:
            conn.close()
