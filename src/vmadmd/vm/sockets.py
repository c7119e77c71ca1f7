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


def peer_cred(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a connected unix socket:
    for a listening server, the process that called ``listen()``."""
    import struct

    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return int(pid), int(uid)


def peer_uid(sock: _socket.socket) -> int:
    """The uid of the process at the other end of a connected unix socket."""
    return peer_cred(sock)[1]


class WrongPeer(ConnectionRefusedError):
    """A VM's socket is served by some other process than its qemu.

    A ``ConnectionRefusedError``: to whoever retries a connection, a socket
    planted by the VM's user is worth exactly as much as no socket.
    """

    def __init__(self, message: str, pid: int) -> None:
        super().__init__(message)
        self.pid = pid  # the server that answered instead


class Peer:
    """The one process a VM's sockets may be served by: its qemu (pid, uid).

    Everything under a VM's ``root/`` is the VM's user's to replace: a
    socket there, or ``root/tmp`` itself, may be a link to another VM's
    socket, the daemon's own API, or a server the VM's user runs.  No
    socket is trusted by its name: a connection whose server is not the
    recorded qemu is closed before a byte is sent (``check``).
    """

    __slots__ = ("pid", "uid")

    def __init__(self, pid: int, uid: int) -> None:
        self.pid = pid
        self.uid = uid

    @classmethod
    def of(cls, pid: int) -> Peer:
        """The process ``pid`` (already identity-checked by the caller) with
        the uid it runs as now (qemu is started as its VM's user)."""
        try:
            uid = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            uid = -1  # gone: nothing will match
        return cls(pid, uid)

    def check(self, sock: _socket.socket, name: str) -> None:
        """Close ``sock`` and raise WrongPeer unless its server is this process."""
        pid, uid = peer_cred(sock)
        if pid != self.pid or uid != self.uid:
            sock.close()
            raise WrongPeer(
                f"{name} is served by pid {pid} (uid {uid}), not by the VM's qemu "
                f"(pid {self.pid}, uid {self.uid}): refused",
                pid,
            )

    def __repr__(self) -> str:
        return f"Peer(pid={self.pid}, uid={self.uid})"


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


async def connect_unix_retrying(
    directory: str, name: str, peer: Peer | None = None
) -> socket.socket:
    """A non-blocking ``connect_unix``, retrying EAGAIN for up to a second.

    qemu's unix sockets have tiny listen backlogs: under a burst of
    connections a non-blocking connect fails with EAGAIN, which means "try
    again", not "refused".  Other errors are raised at once.  With ``peer``,
    the server must be that process (``Peer.check``: WrongPeer otherwise,
    nothing sent).
    """
    import asyncio  # not at the top: the CLI imports this module

    for _ in range(EAGAIN_TRIES):
        try:
            if peer is None:
                sock = connect_unix(directory, name, blocking=False)
            else:
                sock = _connect_vm_socket(directory, name, peer)
        except BlockingIOError:
            await asyncio.sleep(EAGAIN_DELAY)
            continue
        if peer is not None:
            peer.check(sock, name)
        return sock
    raise OSError(f"the listen backlog of {name} stayed full")


def _connect_vm_socket(directory: str, name: str, peer: Peer) -> socket.socket:
    """A non-blocking connection to the VM's socket ``directory/name``, only
    when it is a socket its qemu's user made: the directory (the zone's
    ``root/tmp``) is not followed if it is a link, and neither is the name,
    so root never connects to a socket elsewhere the VM's user points at.
    (Who answers is checked after: ``Peer.check``.)"""
    import stat

    try:
        dfd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise WrongPeer(f"{directory}: {err.strerror} (links are not followed)", -1) from None
    try:
        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != peer.uid:
            raise WrongPeer(
                f"{name} is not a socket of the VM's qemu (uid {st.st_uid}, not {peer.uid}): "
                "refused",
                -1,
            )
        sock = stream_socket()
        try:
            sock.setblocking(False)
            sock.connect(f"/proc/self/fd/{dfd}/{name}")
        except BaseException:
            sock.close()
            raise
        return sock
    finally:
        os.close(dfd)
