"""A small RFB (VNC) client for tests: version, security, init, one update."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from Crypto.Cipher import DES


class RfbError(Exception):
    pass


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise RfbError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def vnc_auth_response(password: str, challenge: bytes) -> bytes:
    """VNC authentication: DES with the password's bits reversed in each byte."""
    key = password.encode()[:8].ljust(8, b"\0")
    key = bytes(int(f"{b:08b}"[::-1], 2) for b in key)
    return DES.new(key, DES.MODE_ECB).encrypt(challenge)


@dataclass
class ServerInit:
    width: int
    height: int
    name: str
    first_rect: tuple[int, int, int, int, int]
    bytes_per_pixel: int = 4


def connect(host: str, port: int, timeout: float = 10) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def banner(sock: socket.socket) -> bytes:
    return recv_exact(sock, 12)


def handshake(
    sock: socket.socket, password: str | None = None, *, first_update: bool = True
) -> ServerInit:
    """Full RFB 3.8 handshake and (unless told not to) one framebuffer update."""
    version = banner(sock)
    if version != b"RFB 003.008\n":
        raise RfbError(f"unexpected banner {version!r}")
    sock.sendall(b"RFB 003.008\n")
    (count,) = struct.unpack("B", recv_exact(sock, 1))
    if count == 0:
        (n,) = struct.unpack(">I", recv_exact(sock, 4))
        raise RfbError(recv_exact(sock, n).decode(errors="replace"))
    types = list(recv_exact(sock, count))
    if password is None:
        if 1 not in types:
            raise RfbError(f"server requires authentication (types {types})")
        sock.sendall(b"\x01")
    else:
        if 2 not in types:
            raise RfbError(f"server does not offer VNC auth (types {types})")
        sock.sendall(b"\x02")
        challenge = recv_exact(sock, 16)
        sock.sendall(vnc_auth_response(password, challenge))
    (result,) = struct.unpack(">I", recv_exact(sock, 4))
    if result != 0:
        reason = b""
        try:
            (n,) = struct.unpack(">I", recv_exact(sock, 4))
            reason = recv_exact(sock, n)
        except (RfbError, OSError):
            pass
        raise RfbError(f"security handshake failed: {reason.decode(errors='replace')}")
    sock.sendall(b"\x01")  # ClientInit: shared
    width, height = struct.unpack(">HH", recv_exact(sock, 4))
    pixel_format = recv_exact(sock, 16)
    (name_len,) = struct.unpack(">I", recv_exact(sock, 4))
    name = recv_exact(sock, name_len).decode(errors="replace")
    init = ServerInit(width, height, name, (0, 0, 0, 0, 0), pixel_format[0] // 8)
    if first_update:
        init.first_rect = update(sock, init)[0]
    return init


def update(sock: socket.socket, init: ServerInit) -> list[tuple[int, int, int, int, int]]:
    """Ask for the whole screen (non-incremental) and read the whole update.

    No SetEncodings was sent, so the server may only use raw rectangles:
    their pixels are read to the last byte, leaving the stream at a message
    boundary.
    """
    sock.sendall(struct.pack(">BBHHHH", 3, 0, 0, 0, init.width, init.height))
    msg_type, _, nrects = struct.unpack(">BBH", recv_exact(sock, 4))
    if msg_type != 0 or nrects < 1:
        raise RfbError(f"expected a FramebufferUpdate, got type {msg_type} with {nrects} rects")
    rects = []
    for _ in range(nrects):
        rect = struct.unpack(">HHHHi", recv_exact(sock, 12))
        if rect[4] != 0:
            raise RfbError(f"unexpected encoding {rect[4]} without SetEncodings")
        recv_exact(sock, rect[2] * rect[3] * init.bytes_per_pixel)
        rects.append(rect)
    return rects
