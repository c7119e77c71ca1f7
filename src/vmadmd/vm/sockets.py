"""Unix sockets at paths longer than the 108-byte ``sun_path`` limit.

qemu is started with its runtime directory as working directory and binds
short relative names there.  To connect, we open the directory with
``O_PATH`` and connect to ``/proc/self/fd/<N>/<name>``, which the kernel
resolves through the open directory: the address stays short however deep
the zones root is.  Standard library only; the ``socket`` module (its enums
cost the CLI ~4 ms of start-up) only where a full socket object is made.
"""

from __future__ import annotations

import _socket
import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (vmadm start-up)
if TYPE_CHECKING:
    import socket
    from typing import TypeVar

    S = TypeVar("S", bound=_socket.socket)

SUN_PATH_MAX = 107  # 108 bytes including the terminating NUL


def stream_socket() -> socket.socket:
    import socket

    return socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)


def connect_unix(directory: str, name: str, *, blocking: bool = True) -> socket.socket:
    """Connect a stream socket to ``directory/name``.

    Raises ``OSError`` like ``socket.connect`` would.  A non-blocking connect
    may raise ``BlockingIOError`` (EAGAIN: the listener's backlog is full);
    callers retry that.
    """
    return connect_with(stream_socket(), directory, name, blocking=blocking)


def connect_with(sock: S, directory: str, name: str, *, blocking: bool = True) -> S:
    """``connect_unix`` for a socket made by the caller (the CLI: a bare ``_socket``)."""
    try:
        sock.setblocking(blocking)
        full = os.path.join(directory, name)
        if len(full.encode()) <= SUN_PATH_MAX:
            sock.connect(full)
        else:
            dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.connect(f"/proc/self/fd/{dfd}/{name}")
            finally:
                os.close(dfd)
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    import struct

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def trusted_uid(uid: int) -> bool:
    """Whether a socket's server may be believed: root's, or our own user's."""
    return uid in (0, os.getuid())


def bind_unix(path: str, backlog: int = 128) -> socket.socket:
    """A listening stream socket at ``path`` (any length)."""
    sock = stream_socket()
    try:
        if len(path.encode()) <= SUN_PATH_MAX:
            sock.bind(path)
        else:
            dfd = os.open(os.path.dirname(path) or ".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                sock.bind(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
            finally:
                os.close(dfd)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


EAGAIN_TRIES = 200
EAGAIN_DELAY = 0.005


async def connect_unix_retrying(directory: str, name: str) -> socket.socket:
    """A non-blocking ``connect_unix``, retrying EAGAIN for up to a second.

    qemu's unix sockets have tiny listen backlogs: under a burst of
    connections a non-blocking connect fails with EAGAIN, which means "try
    again", not "refused".  Other errors are raised at once.
    """
    import asyncio  # not at the top: the CLI imports this module

    for _ in range(EAGAIN_TRIES):
        try:
            return connect_unix(directory, name, blocking=False)
        except BlockingIOError:
            await asyncio.sleep(EAGAIN_DELAY)
    raise OSError(f"the listen backlog of {name} stayed full")
