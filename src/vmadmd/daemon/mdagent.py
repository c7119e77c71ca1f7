"""One running VM's metadata agent: the host end of its ``ttyS1``.

qemu serves the guest's second serial port as a unix socket (``vm.ttyb``,
SmartOS's name) that serves one client at a time; the daemon is that client
for as long as the VM runs, connecting as it does to every socket of the VM:
only when the VM's own qemu serves it (``Peer``), so a socket planted in
``root/tmp`` gets nothing.  Requests are answered by ``daemon/metadata.py``
from ``vm.json`` read afresh for each (a ``vmadm update`` is seen by the
guest's next request), and the guest's writes go to ``vm.json`` under the
VM's lock, as ``vmadm update`` does.

Whatever the guest writes costs the daemon bounded memory and time: a line
longer than ``MAX_LINE`` is discarded as it arrives (never held whole), and
requests are taken at most ``RATE`` a second (``BURST`` at once) and
``BYTE_RATE`` bytes a second, and writes to ``vm.json`` at most
``WRITE_RATE`` a second (``WRITE_BURST``).  Past the
rate the agent stops reading: the guest's serial port fills and its writes
wait, so a flood slows the guest that sends it, and no one else.  Nothing
the guest sends is logged but escaped and cut short.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

from vmadmd.daemon import metadata
from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.serial import hold_port
from vmadmd.errors import VmadmError, VmBroken, VmNotFound
from vmadmd.vm.qemu import TTYB_NAME
from vmadmd.vm.sockets import Peer
from vmadmd.vm.store import Store, VmRecord

log = logging.getLogger("vmadmd.metadata")

RATE = 200.0  # requests a second, per VM
BURST = 50
# A write is a vm.json rewrite (fsync, and the daemon's own refresh of the
# VM on seeing it): fewer of those.
WRITE_RATE = 10.0
WRITE_BURST = 20
# And bytes of requests parsed: a qemu the guest took over can write to the
# socket far faster than any UART (at most two of the longest lines at once).
BYTE_RATE = 4 << 20
BYTE_BURST = 2 * metadata.MAX_LINE
CHUNK = 65536
LOCK_WAIT = 5.0  # a guest's write waits this long for the VM's lock


class LineReader:
    """Lines out of chunks, none longer than ``limit``: an overlong line is
    dropped byte by byte as it comes (``overlong`` counts them)."""

    def __init__(self, limit: int = metadata.MAX_LINE) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False
        self.overlong = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif len(self._buf) + end - start <= self.limit:
                self._buf += chunk[start:end]
                lines.append(bytes(self._buf))
            else:
                self.overlong += 1
            self._buf.clear()
            start = end + 1
        if not self._skipping:
            self._buf += chunk[start:]
            if len(self._buf) > self.limit:
                self._buf.clear()
                self._skipping = True
                self.overlong += 1
        return lines


class Bucket:
    """A token bucket: ``take`` says how long to wait before the next request."""

    def __init__(self, rate: float = RATE, burst: int = BURST) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self, n: float = 1.0) -> float:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class MetadataAgent:
    def __init__(
        self,
        uuid: str,
        store: Store,
        peer: Peer | None,
        rate: float = RATE,
        write_rate: float = WRITE_RATE,
    ) -> None:
        self.uuid = uuid
        self.rate = rate
        self._writes = Bucket(write_rate, WRITE_BURST)
        self._store = store
        self._directory = store.paths(uuid).runtime_dir
        self._peer = peer  # the qemu that must serve vm.ttyb (no planted socket)
        self._log = vm_log(log, uuid)
        self._vm_json = store.paths(uuid).vm_json
        self._cached: tuple[tuple[int, int, int], VmRecord] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.lines = 0  # lines taken from the guest (tests)
        self.served = 0  # requests answered

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"metadata-{self.uuid}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        """Hold vm.ttyb while the VM runs; connect again if it drops."""
        await hold_port(self._directory, TTYB_NAME, self._peer, self.serve,
                        lambda: self._closed, self._log, "metadata port")  # fmt: skip

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer every request on one connection, until it ends."""
        lines = LineReader()
        bucket = Bucket(self.rate)
        # (Scaled with the request rate: a bench that lifts one lifts both.)
        volume = Bucket(BYTE_RATE * self.rate / RATE, BYTE_BURST)
        while chunk := await reader.read(CHUNK):
            for line in lines.feed(chunk):
                self.lines += 1
                wait = max(bucket.take(), volume.take(len(line)))
                if wait > 0:
                    await asyncio.sleep(wait)  # and read nothing meanwhile
                reply = await self.handle(line)
                if reply:
                    writer.write(reply)
                    await writer.drain()

    async def handle(self, line: bytes) -> bytes | None:
        """The reply to one line (None: a frame dropped)."""
        parsed = metadata.parse_line(line)
        if parsed is None:
            self._log.debug("metadata frame dropped (bad length, checksum or form)")
            return None
        if isinstance(parsed, bytes):
            return parsed
        self.served += 1
        try:
            record = await self._record()
        except VmadmError as err:
            return metadata.failure(parsed, f"Unable to load metadata: {err.message}")
        out = metadata.answer(parsed, record)
        if isinstance(out, bytes):
            return out
        return await self._write(out)

    async def _record(self) -> VmRecord:
        """The VM's record as ``vm.json`` holds it now.

        Read again (in a thread) whenever the file is another one than last
        time: every writer replaces it by a rename, so a new inode, size or
        mtime means new contents, and a ``stat`` (of root's file, outside
        the VM's ``root/``) is all an unchanged record costs a request.
        """
        try:
            st = os.stat(self._vm_json)
        except FileNotFoundError:
            raise VmNotFound(f"no such VM: {self.uuid}") from None
        except OSError as err:
            raise VmBroken(f"VM {self.uuid}: cannot read vm.json: {err.strerror}") from err
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._cached is None or self._cached[0] != stamp:
            record = await asyncio.to_thread(self._store.load, self.uuid)
            self._cached = (stamp, record)
        return self._cached[1]

    async def _write(self, change: metadata.Change) -> bytes:
        """A guest's PUT or DELETE, made to vm.json under the VM's lock."""
        request = change.request
        wait = self._writes.take()
        if wait > 0:
            await asyncio.sleep(wait)
        verb = "PUT" if change.value is not None else "DELETE"
        self._log.info("guest %s of %s key %s", verb, change.which,
                       metadata.printable(change.key))  # fmt: skip
        try:
            async with vm_lock(self._store, self.uuid, LOCK_WAIT):
                await asyncio.to_thread(
                    self._store.update_locked,
                    self.uuid,
                    lambda vm: metadata.apply_change(vm, change),
                )
        except VmadmError as err:
            return metadata.failure(request, err.message)
        return metadata.success(request, "OK")
