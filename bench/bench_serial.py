"""Serial console: a keystroke's round trip through the daemon vs straight on vm.console.

The VM is the qemu stand-in, whose serial port echoes every byte at once, so
what is timed is the path, not a guest's shell.  First without a daemon, a
client straight on ``vm.console`` (the floor); then with the daemon holding
``vm.console`` and the client on ``GET /vm/<uuid>/serial`` (WebSocket, the
same stdlib client ``vmadm console`` uses).  One byte out, one byte back,
N times each.

Run: ``.venv/bin/python -m bench.bench_serial [N]`` (default 3000)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

from harness.world import standin_binary
from vmadmd.cli import serial as ws
from vmadmd.vm.sockets import connect_unix

from .common import bios_payload, pct, world


def rtts(n: int, once: Callable[[], None]) -> list[float]:
    for _ in range(50):  # warm up
        once()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def show(name: str, us: list[float]) -> float:
    p50 = statistics.median(us)
    print(f"{name:<34} p50 {p50:7.1f} us  p99 {pct(us, 99):7.1f} us  n={len(us)}")
    return p50


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    with world() as w:
        w.extra_env["VMADM_QEMU"] = standin_binary()
        uuid = w.create(bios_payload(alias="serial"))
        w.vmadm("start", uuid, check=True)

        direct = connect_unix(str(w.runtime(uuid)), "vm.console")

        def straight() -> None:
            direct.sendall(b"x")
            assert direct.recv(1) == b"x"

        floor = show("straight on vm.console (floor)", rtts(n, straight))
        direct.close()

        w.start_daemon()
        w.wait_qmp(uuid)
        sock = w.client().connect()
        leftover = ws.handshake(sock, f"/vm/{uuid}/serial")
        reader = ws.FrameReader()
        reader.feed(leftover)

        def through_daemon() -> None:
            sock.sendall(ws.frame(ws.OP_BINARY, b"x"))
            got = b""
            while not got:
                for opcode, payload in reader.feed(sock.recv(65536)):
                    if opcode == ws.OP_BINARY:
                        got += payload

        via = show("through vmadmd (WebSocket)", rtts(n, through_daemon))
        sock.close()
        print(f"the daemon adds {via - floor:.1f} us per keystroke round trip (p50)")


if __name__ == "__main__":
    main()
