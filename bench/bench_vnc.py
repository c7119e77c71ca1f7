"""VNC proxy throughput and round trips: direct unix socket, socat, vmadmd.

The daemon proxies TCP clients to ``<zonepath>/root/tmp/vm.vnc``.  For a
transfer benchmark we need a peer that sinks and sources bytes at wire speed,
which qemu's VNC server is not, so once the daemon has opened the VM's
listener the bench binds its own server at that path (the daemon connects to
the path for every client, so its real proxy code is what is measured).

Each path moves SIZE bytes client->server ("up") and server->client
("down"), then runs a 64-byte ping-pong.  Run:
``.venv/bin/python -m bench.bench_vnc [MiB]``
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from vmadmd.client import Client
from vmadmd.sockets import bind_unix, connect_unix

from .common import pct, world

CHUNK = 1 << 20
PINGS = 3000


def serve(path: str, ready: threading.Event | None = None) -> None:
    sock = bind_unix(path, backlog=64)
    if ready is not None:
        ready.set()
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf


def handle(conn: socket.socket) -> None:
    try:
        mode, size = struct.unpack(">cQ", _recv_exact(conn, 9))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        if mode == b"U":
            left = size
            while left:
                got = conn.recv_into(view[: min(CHUNK, left)])
                if not got:
                    return
                left -= got
            conn.sendall(b"K")
        elif mode == b"D":
            left = size
            while left:
                n = min(CHUNK, left)
                conn.sendall(view[:n])
                left -= n
        elif mode == b"P":
            while True:
                data = conn.recv(64)
                if not data:
                    return
                conn.sendall(data)
    except (EOFError, OSError):
        pass
    finally:
        conn.close()


def run_path(name: str, connect: Callable[[], socket.socket], size: int) -> dict[str, float]:
    buf = memoryview(bytearray(CHUNK))
    # Up.
    s = connect()
    t0 = time.perf_counter()
    s.sendall(struct.pack(">cQ", b"U", size))
    left = size
    while left:
        n = min(CHUNK, left)
        s.sendall(buf[:n])
        left -= n
    assert s.recv(1) == b"K"
    up = size / (time.perf_counter() - t0) / 1e6
    s.close()
    # Down.
    s = connect()
    t0 = time.perf_counter()
    s.sendall(struct.pack(">cQ", b"D", size))
    left = size
    while left:
        n = s.recv_into(buf)
        assert n
        left -= n
    down = size / (time.perf_counter() - t0) / 1e6
    s.close()
    # Ping-pong.
    s = connect()
    if s.family == socket.AF_INET:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(struct.pack(">cQ", b"P", 0))
    msg = b"x" * 64
    rtts = []
    for _ in range(PINGS):
        t0 = time.perf_counter()
        s.sendall(msg)
        echoed = b""
        while len(echoed) < 64:
            echoed += s.recv(64)
        rtts.append(time.perf_counter() - t0)
    s.close()
    res = {
        "up": up,
        "down": down,
        "rtt50": statistics.median(rtts) * 1e6,
        "rtt99": pct(rtts, 99) * 1e6,
    }
    print(
        f"{name:8s} up {up:8.0f} MB/s  down {down:8.0f} MB/s  "
        f"RTT p50 {res['rtt50']:6.1f} us  p99 {res['rtt99']:6.1f} us",
        flush=True,
    )
    return res


def main() -> None:
    size = (int(sys.argv[1]) if len(sys.argv) > 1 else 1024) << 20
    with world() as w:
        w.start_daemon()
        uuid = w.create()
        w.vmadm("start", uuid)
        w.wait_qmp(uuid)
        _, info = Client(w.socket).request("GET", f"/vm/{uuid}", {"type": "vnc"})
        port = info["vnc"]["port"]
        rundir = os.path.join(w.zones, uuid, "root", "tmp")
        vnc = os.path.join(rundir, "vm.vnc")
        os.unlink(vnc)  # qemu keeps its listening socket; new clients reach ours
        server = multiprocessing.Process(target=serve, args=(vnc,), daemon=True)
        server.start()
        while not os.path.exists(vnc):
            time.sleep(0.01)

        direct = run_path("direct", lambda: connect_unix(rundir, "vm.vnc"), size)
        socat_port = 0
        socat: subprocess.Popen[bytes] | None = None
        if shutil.which("socat"):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                socat_port = probe.getsockname()[1]
            socat = subprocess.Popen(
                ["socat", "-b65536", f"TCP-LISTEN:{socat_port},bind=127.0.0.1,reuseaddr,fork",
                 f"UNIX-CONNECT:{vnc}"],
            )  # fmt: skip
            time.sleep(0.3)
            via_socat = run_path(
                "socat", lambda: socket.create_connection(("127.0.0.1", socat_port)), size
            )
            socat.terminate()
        daemon = run_path("vmadmd", lambda: socket.create_connection(("127.0.0.1", port)), size)
        server.terminate()

    print()
    for name, res in (("socat", via_socat if socat else None), ("vmadmd", daemon)):
        if res is None:
            continue
        print(
            f"{name:8s} vs direct: up {res['up'] / direct['up']:.2f}x  "
            f"down {res['down'] / direct['down']:.2f}x  "
            f"RTT p50 +{res['rtt50'] - direct['rtt50']:.1f} us"
        )


if __name__ == "__main__":
    main()
