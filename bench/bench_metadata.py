"""Guest metadata: one V2 GET's round trip through the agent vs a bare responder.

The VM is the qemu stand-in (``ServedVm``: its holder process serves
``vm.ttyb``, so the agent's peer check passes as with qemu); the client plays
the guest on the other end of ``vm.ttyb`` with a blocking socket, as
cloud-init does on ``/dev/ttyS1``.  The floor is the same event loop and
socket path answering every line with a ready-made reply (no parsing, no
``vm.json``); the agent's figure is the same request answered by
``MetadataAgent`` (parse, ``vm.json`` read in a thread, answer).  What the
daemon adds is the difference of the medians (goal: <= 100 us).  The agent
runs without its rate bound here: a back-to-back loop would otherwise time
the bound (200 requests a second per VM, 50 at once), not the path.

Run: ``.venv/bin/python -m bench.bench_metadata [N]`` (default 3000)
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from harness.standin import ServedVm
from vmadmd.daemon import metadata as md
from vmadmd.daemon.mdagent import MetadataAgent
from vmadmd.vm.sockets import Peer
from vmadmd.vm.store import Store

from .common import pct

UUID = "4b1d0c9e-2f3a-4c5d-8e6f-7a8b9c0d1e2f"


def frame(reqid: str, key: str) -> bytes:
    body = f"{reqid} GET {base64.b64encode(key.encode()).decode()}"
    return f"V2 {len(body)} {md.crc32_hex(body)} {body}\n".encode()


def rtts(n: int, once: Callable[[], None]) -> list[float]:
    for _ in range(100):  # warm up
        once()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def show(name: str, us: list[float]) -> float:
    p50 = statistics.median(us)
    print(f"{name:<36} p50 {p50:7.1f} us  p99 {pct(us, 99):7.1f} us  n={len(us)}")
    return p50


def exchange(sock: socket.socket, request: bytes) -> Callable[[], None]:
    def once() -> None:
        sock.sendall(request)
        got = b""
        while not got.endswith(b"\n"):
            got += sock.recv(4096)

    return once


class Loop:
    """An event loop in a thread of its own (the daemon's), the client in this one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    request = frame("0badcafe", "user-script")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "zones"))
        paths = store.create(
            UUID, {"uuid": UUID, "customer_metadata": {"user-script": "#!/bin/sh\n" * 20}}
        )
        loop = Loop()
        served: ServedVm = loop.run(ServedVm.start(paths.runtime_dir, UUID))

        # The floor: the same socket and loop, a ready-made answer per line.
        canned = md.success(md.Request("GET", "user-script", "0badcafe"), "#!/bin/sh\n" * 20)

        async def floor_side(sock: socket.socket) -> None:
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            while await reader.readline():
                writer.write(canned)
                await writer.drain()

        async def pair() -> tuple[socket.socket, socket.socket]:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            return a, b

        host, guest = loop.run(pair())
        loop.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(floor_side(host)))
        floor = show("bare responder (floor)", rtts(n, exchange(guest, request)))
        guest.close()

        # The path, not the policy: no rate bound (200 requests/s by default,
        # which a back-to-back loop would hit after the first 50).
        agent = MetadataAgent(UUID, store, Peer.of(served.holder.pid), rate=1e9)
        loop.loop.call_soon_threadsafe(agent.start)

        async def guest_end() -> socket.socket:
            return await asyncio.wait_for(served.ttyb.get(), 10)

        sock: socket.socket = loop.run(guest_end())
        sock.setblocking(True)
        agent_p50 = show("GET through the agent (vm.ttyb)", rtts(n, exchange(sock, request)))
        print(f"the daemon adds {agent_p50 - floor:.1f} us at p50 (goal <= 100 us)")
        sock.close()
        loop.run(agent.close())
        loop.run(served.close())
        loop.stop()


if __name__ == "__main__":
    main()
