"""Shared bench tooling: the harness's private world, percentiles, raw floors (QMP, HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.world import REPO, World, bios_payload, new_cgroup_parents_removed

__all__ = [
    "BIN", "REPO", "AsyncHttp", "KeepAliveHttp", "RawQmp", "World", "bios_payload", "cpu_seconds",
    "pct", "summary_ms", "world",
]  # fmt: skip

BIN = Path(sys.executable).parent


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (clock ticks: 10 ms here)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"p50 {statistics.median(ms):.3f} ms  p99 {pct(ms, 99):.3f} ms  "
        f"min {min(ms):.3f} ms  n={len(ms)}"
    )


@contextlib.contextmanager
def world() -> Iterator[World]:
    """A private world in a temp dir, torn down (every daemon and VM killed) after."""
    root = tempfile.mkdtemp(prefix="vmadmd-bench-")
    w = World(Path(root), deep=False, log_level="warning")
    with new_cgroup_parents_removed():
        try:
            yield w
        finally:
            w.cleanup()
            shutil.rmtree(root, ignore_errors=True)


class RawQmp:
    """A minimal raw QMP client (the floor: qemu's own answer time)."""

    def __init__(self, path: str) -> None:
        from vmadmd.vm.sockets import connect_unix

        self.sock = connect_unix(os.path.dirname(path), os.path.basename(path))
        self.buf = b""
        self._line()  # greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        data: dict[str, Any] = json.loads(line)
        return data

    def cmd(self, name: str) -> Any:
        # Inline, not through replies(): this is the floor the benches divide by.
        self.sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            msg = self._line()
            if "return" in msg or "error" in msg:
                return msg

    def replies(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` replies (``return`` or ``error``), events skipped."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            msg = self._line()
            if "return" in msg or "error" in msg:
                out.append(msg)
        return out

    def close(self) -> None:
        self.sock.close()


class KeepAliveHttp:
    """One persistent HTTP/1.1 connection over the API socket."""

    def __init__(self, path: str) -> None:
        from vmadmd.vm.sockets import connect_unix

        self.sock: socket.socket = connect_unix(os.path.dirname(path), os.path.basename(path))
        self.buf = b""

    def get(self, target: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body


class AsyncHttp:
    """Up to ``limit`` kept-alive HTTP/1.1 connections over the API socket, for
    the load generators (h11's client side: the daemon's own dependency)."""

    def __init__(self, path: str, limit: int) -> None:
        self.path = path
        self.slots = asyncio.Semaphore(limit)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, Any]] = []
        self.open: set[asyncio.StreamWriter] = set()

    async def request(self, method: str, target: str) -> tuple[int, bytes]:
        import h11

        async with self.slots:
            if self.idle:
                reader, writer, conn = self.idle.pop()
            else:
                reader, writer = await asyncio.open_unix_connection(self.path)
                conn = h11.Connection(h11.CLIENT)
                self.open.add(writer)
            head = [("Host", "x"), ("Content-Length", "0")]
            writer.write(
                conn.send(h11.Request(method=method, target=target, headers=head))
                + conn.send(h11.EndOfMessage())
            )
            status, body = 0, bytearray()
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await reader.read(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
                self.idle.append((reader, writer, conn))
            else:
                writer.close()
                self.open.discard(writer)
            return status, bytes(body)

    async def close(self) -> None:
        for writer in self.open:
            writer.close()
        self.open.clear()
        self.idle.clear()
