"""One VM's serial console, held by the daemon and shared by its viewers.

qemu's serial chardev is a unix socket server that serves one client at a
time, and a client that does not read stalls the guest's serial output.  The
daemon is that one client for as long as the VM runs: it reads everything
(so the guest never stalls), keeps the last ``HISTORY`` bytes, and hands
each chunk to every viewer (WebSocket clients of ``GET /vm/<uuid>/serial``, served by
``websocket.serial_relay``,
``vmadm console``, the browser page).  A new viewer first receives the
history, so attaching to a quiet console still shows its last prompt.
Whatever any viewer types goes to the guest.  qemu's own log of the port
(``root/tmp/vm.console.log``) is untouched.

A viewer that cannot keep up is dropped once ``VIEWER_BACKLOG`` bytes wait
for it: one slow viewer costs bounded memory and never slows the others or
the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from vmadmd.daemon.logs import vm_log
from vmadmd.errors import WrongState
from vmadmd.vm.sockets import Peer, connect_unix_retrying

log = logging.getLogger("vmadmd.serial")

HISTORY = 64 * 1024
VIEWER_BACKLOG = 1 << 20
MAX_VIEWERS = 64
RECONNECT_DELAY = 0.05
MAX_RECONNECT_DELAY = 5.0


class Viewer:
    """One attached viewer: a queue of chunks, ended by None, and why it ended."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.pending = 0
        self.reason = ""

    def offer(self, chunk: bytes) -> bool:
        """Queue a chunk; False when the viewer is too far behind."""
        if self.pending + len(chunk) > VIEWER_BACKLOG:
            return False
        self.pending += len(chunk)
        self.queue.put_nowait(chunk)
        return True

    def end(self, reason: str) -> None:
        if not self.reason:
            self.reason = reason
            self.queue.put_nowait(None)

    async def next(self) -> bytes | None:
        chunk = await self.queue.get()
        if chunk is not None:
            self.pending -= len(chunk)
        return chunk


async def hold_port(
    directory: str,
    name: str,
    peer: Peer | None,
    session: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    closed: Callable[[], bool],
    log: logging.LoggerAdapter[logging.Logger],
    what: str,
) -> None:
    """Hold one of qemu's chardev sockets (served by ``peer``) for ``session``
    while ``closed()`` is false: connect again when it drops, backing off
    (at most ``MAX_RECONNECT_DELAY``) while it cannot be reached."""
    delay = RECONNECT_DELAY
    while not closed():
        try:
            sock = await connect_unix_retrying(directory, name, peer)
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as err:
            # qemu not listening yet, or going away (its pidfd decides), a
            # qemu without this port, or a socket not its qemu's: back off.
            log.debug("%s not reachable: %s", what, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RECONNECT_DELAY)
            continue
        delay = RECONNECT_DELAY
        log.debug("%s connected", what)
        try:
            await session(reader, writer)
        except OSError as err:
            log.debug("%s connection lost: %s", what, err)
        finally:
            writer.close()
        await asyncio.sleep(RECONNECT_DELAY)


class SerialConsole:
    def __init__(self, uuid: str, directory: str, name: str, peer: Peer | None = None) -> None:
        self.uuid = uuid
        self._peer = peer  # the qemu that must serve the port (no planted socket)
        self._directory = directory
        self._name = name
        self._log = vm_log(log, uuid)
        self._history = bytearray()
        self._viewers: set[Viewer] = set()
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"serial-{self.uuid}")

    @property
    def connected(self) -> bool:
        return self._writer is not None

    async def _run(self) -> None:
        """Hold qemu's serial socket; reconnect if it drops while the VM runs."""

        async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writer = writer
            try:
                while chunk := await reader.read(65536):
                    self._publish(chunk)
            finally:
                self._writer = None

        await hold_port(self._directory, self._name, self._peer, session,
                        lambda: self._closed, self._log, "serial console")  # fmt: skip

    def _publish(self, chunk: bytes) -> None:
        self._history += chunk
        if len(self._history) > HISTORY:
            del self._history[: len(self._history) - HISTORY]
        for viewer in list(self._viewers):
            if not viewer.offer(chunk):
                self._drop(viewer, "this viewer fell too far behind the console")

    def _drop(self, viewer: Viewer, reason: str) -> None:
        self._viewers.discard(viewer)
        viewer.end(reason)

    def attach(self) -> Viewer:
        """A new viewer, first given the last ``HISTORY`` bytes of output."""
        if self._closed:
            raise WrongState(f"VM {self.uuid} is not running")
        if len(self._viewers) >= MAX_VIEWERS:
            raise WrongState(f"VM {self.uuid}: {MAX_VIEWERS} serial viewers already attached")
        viewer = Viewer()
        if self._history:
            viewer.offer(bytes(self._history))
        self._viewers.add(viewer)
        return viewer

    def detach(self, viewer: Viewer) -> None:
        self._viewers.discard(viewer)

    async def write(self, data: bytes) -> None:
        """Type into the guest's serial port (dropped while not connected)."""
        writer = self._writer
        if writer is None or not data:
            return
        writer.write(data)
        with contextlib.suppress(OSError):
            await writer.drain()

    async def close(self, reason: str) -> None:
        """The VM stopped (or the daemon is leaving): end every viewer with ``reason``."""
        self._closed = True
        for viewer in list(self._viewers):
            self._drop(viewer, reason)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
