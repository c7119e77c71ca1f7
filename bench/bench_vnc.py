"""VNC console throughput and round trips, each path against the same server.

The VM is the qemu stand-in (``harness/standin.py``) with its VNC replaced by
the bench's wire protocol (``VMADMD_STANDIN_VNC=wire``): qemu's own VNC
server cannot sink or source a GiB, the stand-in serves the same protocol
on its unix socket and on client sockets handed over QMP, as qemu does.
Paths, interleaved over ROUNDS rounds (medians reported):

* ``unix``    a direct connection to ``vm.vnc`` (the issue's baseline);
* ``tcp``     a direct TCP connection to a server of the same code: the
              floor of any console reached over TCP;
* ``socat``   ``socat -b65536`` TCP -> ``vm.vnc``, a process per connection;
* ``listen``  the daemon's console port, default mode: the listening socket
              was given to the VM over QMP (``display-update``), which
              accepts and serves its clients itself;
* ``handoff`` the daemon's listener with ``--vnc-relay handoff``: each
              client is handed to the VM over QMP and served directly;
* ``proxy``   the daemon's listener with ``--vnc-relay proxy`` (the relay
              used when a qemu cannot take a client).

Each moves SIZE bytes client->server ("up") and server->client ("down"),
then runs a 64-byte ping-pong.  Then the same console paths (unix,
listen, handoff, proxy) against a real qemu (TCG, SeaBIOS screen): time from
connect() to the RFB ServerInit (four round trips with qemu's VNC server;
qemu paces framebuffer updates by its refresh timer, so update rates would
time the timer, not the path).  Run:
``.venv/bin/python -m bench.bench_vnc [MiB] [rounds]``
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

from harness.standin import wire_session
from harness.world import standin_binary
from tests import rfb
from vmadmd.cli.client import Client
from vmadmd.vm.sockets import connect_unix

from .common import World, bios_payload, pct, world

CHUNK = 1 << 20
PINGS = 3000

Connect = Callable[[], socket.socket]


def serve_tcp(sock: socket.socket) -> None:
    """The ``tcp`` path's server: the stand-in's wire sessions, on TCP."""
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=wire_session, args=(conn,), daemon=True).start()


def run_path(connect: Connect, size: int) -> dict[str, float]:
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
    if s.family != socket.AF_UNIX:
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
    return {
        "up": up,
        "down": down,
        "rtt50": statistics.median(rtts) * 1e6,
        "rtt99": pct(rtts, 99) * 1e6,
    }


def tcp(port: int) -> Connect:
    return lambda: socket.create_connection(("127.0.0.1", port))


def vnc_port(w: World, uuid: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        _, info = Client(w.socket).request("GET", f"/vm/{uuid}", {"type": "vnc"})
        if info["vnc"].get("port"):
            return int(info["vnc"]["port"])
        time.sleep(0.02)
    raise RuntimeError("no VNC listener")


HANDSHAKES = 300


def run_qemu(connect: Connect) -> dict[str, float]:
    """connect() to ServerInit with a real qemu's VNC server, one after another."""
    times = []
    for _ in range(HANDSHAKES):
        t0 = time.perf_counter()
        with connect() as s:
            s.settimeout(30)
            rfb.handshake(s, first_update=False)
            times.append(time.perf_counter() - t0)
    return {"p50": statistics.median(times) * 1e3, "p99": pct(times, 99) * 1e3}


Results = dict[str, list[dict[str, float]]]


def medians(results: Results) -> dict[str, dict[str, float]]:
    """Per path, the median of each figure over the rounds."""
    return {
        name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        for name, runs in results.items()
    }


def via_daemon(
    w: World, uuid: str, run: Callable[[Connect], dict[str, float]], results: Results
) -> None:
    """One round of ``run`` through the daemon's listener, in each relay mode."""
    for relay in ("listen", "handoff", "proxy"):
        w.start_daemon("--vnc-relay", relay)
        w.wait_qmp(uuid)
        results.setdefault(relay, []).append(run(tcp(vnc_port(w, uuid))))
        w.stop_daemon()


def real_qemu(rounds: int) -> dict[str, dict[str, float]]:
    results: Results = {}
    with world() as w:
        # The handshake measured is the password-less one (as the earlier
        # figures): the console's default password is opted out of.
        w.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"
        uuid = w.create(bios_payload(alias="bench"))
        w.vmadm("start", uuid, check=True)
        rundir = os.path.join(w.zones, uuid, "root", "tmp")
        # qemu writes its pidfile (which `vmadm start` waits for) before it
        # binds its sockets.
        w.wait_for(lambda: os.path.exists(os.path.join(rundir, "vm.vnc")), what="vm.vnc")
        for _ in range(rounds):
            results.setdefault("unix", []).append(run_qemu(lambda: connect_unix(rundir, "vm.vnc")))
            via_daemon(w, uuid, run_qemu, results)
    return medians(results)


def main() -> None:
    size = (int(sys.argv[1]) if len(sys.argv) > 1 else 1024) << 20
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    qemu = real_qemu(rounds)
    os.environ.update(VMADM_QEMU=standin_binary(), VMADMD_STANDIN_VNC="wire")
    results: Results = {}
    with world() as w:
        uuid = w.create(bios_payload(alias="bench"))
        w.vmadm("start", uuid, check=True)
        rundir = os.path.join(w.zones, uuid, "root", "tmp")
        vnc = os.path.join(rundir, "vm.vnc")

        listener = socket.create_server(("127.0.0.1", 0))
        tcp_server = multiprocessing.Process(target=serve_tcp, args=(listener,), daemon=True)
        tcp_server.start()
        socat: subprocess.Popen[bytes] | None = None
        socat_port = 0
        if shutil.which("socat"):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                socat_port = probe.getsockname()[1]
            socat = subprocess.Popen(
                ["socat", "-b65536", f"TCP-LISTEN:{socat_port},bind=127.0.0.1,reuseaddr,fork",
                 f"UNIX-CONNECT:{vnc}"],
            )  # fmt: skip
            time.sleep(0.3)
        try:
            for _ in range(rounds):
                paths: list[tuple[str, Connect]] = [
                    ("unix", lambda: connect_unix(rundir, "vm.vnc")),
                    ("tcp", tcp(listener.getsockname()[1])),
                ]
                if socat is not None:
                    paths.append(("socat", tcp(socat_port)))
                for name, connect in paths:
                    results.setdefault(name, []).append(run_path(connect, size))
                via_daemon(w, uuid, lambda connect: run_path(connect, size), results)
        finally:
            if socat is not None:
                socat.terminate()
            tcp_server.terminate()

    med = medians(results)
    print(f"{size >> 20} MiB each way, {PINGS} pings, median of {rounds} rounds")
    for name, res in med.items():
        print(
            f"{name:8s} up {res['up']:6.0f} MB/s  down {res['down']:6.0f} MB/s  "
            f"RTT p50 {res['rtt50']:6.1f} us  p99 {res['rtt99']:6.1f} us"
        )
    print()
    for base in ("unix", "tcp"):
        for name, res in med.items():
            if name in ("unix", base):
                continue
            print(
                f"{name:8s} vs {base:5s}: up {res['up'] / med[base]['up']:.2f}x  "
                f"down {res['down'] / med[base]['down']:.2f}x  "
                f"RTT p50 {res['rtt50'] - med[base]['rtt50']:+.1f} us"
            )
    print(f"\nreal qemu (TCG), connect -> ServerInit, {HANDSHAKES} times, median of {rounds}")
    for name, res in qemu.items():
        print(
            f"{name:8s} p50 {res['p50']:.3f} ms  p99 {res['p99']:.3f} ms  "
            f"(p50 {res['p50'] - qemu['unix']['p50']:+.3f} ms vs unix)"
        )


if __name__ == "__main__":
    main()
