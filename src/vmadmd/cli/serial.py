"""``vmadm console``: the VM's serial console in this terminal.

It speaks WebSocket (RFC 6455) to ``GET /vm/<uuid>/serial`` on the daemon's
unix socket.  Written by hand on the standard library because the CLI must
stay on it (every ``vmadm`` call pays its imports; a WebSocket library costs
more to import than this whole command takes to start), and because the
client side needs only the little the daemon's own server uses: one
handshake, masked binary frames out, unfragmented binary, close and ping
frames in.

The terminal is put in raw mode so every key reaches the guest; Ctrl-]
detaches (as in telnet and ``virsh console``).  The terminal's mode is
restored on every way out: detach, the VM stopping (the daemon says why),
the connection dropping, SIGTERM or SIGHUP.
"""

from __future__ import annotations

import _socket
import base64
import contextlib
import hashlib
import json
import os
import select
import signal
import struct
import sys
from typing import Any

from vmadmd.cli.client import ApiError
from vmadmd.errors import DaemonUnavailable

DETACH = b"\x1d"  # Ctrl-]
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEADER = 64 * 1024
MAX_FRAME = 16 << 20

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def handshake(sock: _socket.socket, path: str) -> bytes:
    """Upgrade the connection; returns bytes already read past the handshake.

    An error answer (409: the VM is not running, 404: no such VM) raises
    ApiError with the daemon's own message.
    """
    key = base64.b64encode(os.urandom(16))
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: vmadmd\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk or len(buf) > MAX_HEADER:
            raise DaemonUnavailable("vmadmd closed the connection during the console handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if status != 101:
        length = int(headers.get("content-length", "0") or 0)
        while len(rest) < min(length, MAX_HEADER):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        try:
            error = json.loads(rest[:length]).get("error", {})
        except (ValueError, AttributeError):
            error = {}
        raise ApiError(status, str(error.get("code", "Error")),
                       str(error.get("message", f"HTTP {status}")))  # fmt: skip
    accept = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
    if headers.get("sec-websocket-accept") != accept:
        raise DaemonUnavailable("vmadmd answered the console handshake wrongly")
    return rest


def frame(opcode: int, payload: bytes) -> bytes:
    """One masked frame (a client must mask what it sends)."""
    head = bytes([0x80 | opcode])
    n = len(payload)
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + masked


class FrameReader:
    """Frames out of a byte stream: feed bytes, get (opcode, payload) pairs."""

    def __init__(self) -> None:
        self.buf = b""
        self._parts: list[bytes] = []
        self._opcode = OP_BINARY

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self.buf += data
        out: list[tuple[int, bytes]] = []
        while True:
            parsed = self._one()
            if parsed is None:
                return out
            out.append(parsed)

    def _one(self) -> tuple[int, bytes] | None:
        if len(self.buf) < 2:
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, at = b1 & 0x7F, 2
        if n == 126:
            if len(self.buf) < 4:
                return None
            n, at = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            if len(self.buf) < 10:
                return None
            n, at = struct.unpack(">Q", self.buf[2:10])[0], 10
        if n > MAX_FRAME:
            raise DaemonUnavailable("vmadmd sent an oversized console frame")
        mask = b""
        if b1 & 0x80:
            mask, at = self.buf[at : at + 4], at + 4
        if len(self.buf) < at + n:
            return None
        payload, self.buf = self.buf[at : at + n], self.buf[at + n :]
        if mask:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        opcode, final = b0 & 0x0F, bool(b0 & 0x80)
        if opcode >= OP_CLOSE:  # control frames are never fragmented
            return opcode, payload
        if opcode != OP_CONT:
            self._opcode = opcode
        self._parts.append(payload)
        if not final:
            return self._one()
        whole, self._parts = b"".join(self._parts), []
        return self._opcode, whole


class _Leave(Exception):
    """A signal asked vmadm to go (the terminal is restored on the way out)."""


def _leave(signum: int, _frame: Any) -> None:
    raise _Leave(signal.Signals(signum).name)


def session(sock: _socket.socket, leftover: bytes, stdin: int, stdout: int) -> str:
    """Relay the terminal and the console until one ends; returns why it ended."""
    import termios
    import tty

    is_tty = os.isatty(stdin)
    saved = termios.tcgetattr(stdin) if is_tty else None
    reader = FrameReader()
    try:
        if is_tty:
            tty.setraw(stdin, termios.TCSANOW)
        pending = reader.feed(leftover)
        while True:
            for opcode, payload in pending:
                if opcode in (OP_BINARY, OP_TEXT):
                    os.write(stdout, payload)
                elif opcode == OP_PING:
                    sock.sendall(frame(OP_PONG, payload))
                elif opcode == OP_CLOSE:
                    with contextlib.suppress(OSError):
                        sock.sendall(frame(OP_CLOSE, payload[:2]))
                    return payload[2:].decode(errors="replace") or "the console closed"
            ready, _, _ = select.select([stdin, sock.fileno()], [], [])
            pending = []
            if stdin in ready:
                data = os.read(stdin, 4096)
                if not data:
                    return "end of input"
                if DETACH in data:
                    before = data.split(DETACH, 1)[0]
                    if before:
                        sock.sendall(frame(OP_BINARY, before))
                    with contextlib.suppress(OSError):
                        sock.sendall(frame(OP_CLOSE, struct.pack(">H", 1000)))
                    return "detached"
                sock.sendall(frame(OP_BINARY, data))
            if sock.fileno() in ready:
                data = sock.recv(65536)
                if not data:
                    return "the connection to vmadmd closed"
                pending = reader.feed(data)
    except _Leave as sig:
        return f"terminated by {sig}"
    except OSError as err:
        return f"the connection to vmadmd failed: {err.strerror or err}"
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def run(sock: _socket.socket, uuid: str) -> str:
    """The whole ``vmadm console``: handshake, banner, session; returns why it ended.

    SIGTERM and SIGHUP end it from the start, through the same way out.
    """
    old = {s: signal.signal(s, _leave) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        leftover = handshake(sock, f"/vm/{uuid}/serial")
        sys.stderr.write(f"[Connected to the serial console of VM {uuid}; Ctrl-] detaches]\r\n")
        sys.stderr.flush()
        return session(sock, leftover, sys.stdin.fileno(), sys.stdout.fileno())
    except _Leave as sig:
        return f"terminated by {sig}"
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
