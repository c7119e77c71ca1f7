"""Two daemons' source trees against each other, in one run, rounds interleaved.

For a change to the request path (the HTTP stack, say): the daemon of each
tree (``PYTHONPATH`` of its process) on the same VM, same client, same
machine load.  Rows, as bench_api has them but smaller: 1. ``GET
/vm/<uuid>?type=version`` on one kept-alive connection; 2. ``GET
/vm/<uuid>`` (all types); 4. restart -> first answer; 6. 16 clients (calls/s,
p99, daemon CPU per call); and bench_serial's keystroke round trip (on the
qemu stand-in).  One real VM (BIOS only, TCG), not 8.

Run: ``.venv/bin/python -m bench.bench_ab OLD_SRC NEW_SRC [ROUNDS]``, e.g. an
old tree from ``git archive <commit> src | tar -x -C /tmp/old``.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
from typing import Any

from harness.world import standin_binary
from vmadmd.cli import serial as ws

from .bench_api import restart
from .common import KeepAliveHttp, World, bios_payload, cpu_seconds, pct, world

N = 1500
CLIENTS = 16
LOAD_SECONDS = 3.0
RESTARTS = 5


def load(w: World, uuid: str, pid: int) -> tuple[float, float, float]:
    """(calls/s, p99 ms, daemon CPU µs per call) for CLIENTS clients."""
    stop = threading.Event()
    lat: list[list[float]] = [[] for _ in range(CLIENTS)]

    def client(i: int) -> None:
        http = KeepAliveHttp(w.socket)
        while not stop.is_set():
            t0 = time.perf_counter()
            status, _ = http.get(f"/vm/{uuid}?type=version")
            lat[i].append(time.perf_counter() - t0)
            assert status == 200

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    for t in threads:
        t.start()
    time.sleep(LOAD_SECONDS)
    stop.set()
    for t in threads:
        t.join()
    took, cpu = time.perf_counter() - t0, cpu_seconds(pid) - cpu0
    calls = [x for per in lat for x in per]
    return len(calls) / took, pct(calls, 99) * 1000, cpu / len(calls) * 1e6


def timed(n: int, once: Any) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        out.append(time.perf_counter() - t0)
    return out


def gets(http: KeepAliveHttp, target: str, n: int) -> list[float]:
    return timed(n, lambda: http.get(target))


def main() -> None:
    trees = {"old": sys.argv[1], "new": sys.argv[2]}
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    res: dict[str, dict[str, list[Any]]] = {
        name: {"one": [], "all": [], "load": [], "first": [], "serial": []} for name in trees
    }
    with world() as w:
        uuid = w.create(bios_payload(alias="ab"))
        w.vmadm("start", uuid, check=True)
        for _ in range(rounds):
            for name, src in trees.items():
                env = {"PYTHONPATH": src}
                daemon = w.start_daemon(env=env)
                w.wait_qmp(uuid)
                http = KeepAliveHttp(w.socket)
                for _ in range(200):
                    http.get(f"/vm/{uuid}?type=version")
                res[name]["one"] += gets(http, f"/vm/{uuid}?type=version", N)
                res[name]["all"] += gets(http, f"/vm/{uuid}", N // 4)
                res[name]["load"].append(load(w, uuid, daemon.pid))
                w.stop_daemon()
                for _ in range(RESTARTS):
                    res[name]["first"].append(restart(w, 1, env=env)[0])
                    w.stop_daemon()
    with world() as w:
        w.extra_env["VMADM_QEMU"] = standin_binary()
        uuid = w.create(bios_payload(alias="serial"))
        w.vmadm("start", uuid, check=True)
        for _ in range(rounds):
            for name, src in trees.items():
                w.start_daemon(env={"PYTHONPATH": src})
                w.wait_qmp(uuid)
                sock = w.client().connect()
                reader = ws.FrameReader()
                reader.feed(ws.handshake(sock, f"/vm/{uuid}/serial"))

                def keystroke(sock: Any = sock, reader: ws.FrameReader = reader) -> None:
                    sock.sendall(ws.frame(ws.OP_BINARY, b"x"))
                    got = b""
                    while not got:
                        for opcode, payload in reader.feed(sock.recv(65536)):
                            if opcode == ws.OP_BINARY:
                                got += payload

                timed(100, keystroke)
                res[name]["serial"] += timed(N, keystroke)
                sock.close()
                w.stop_daemon()
    med = statistics.median
    for name, r in res.items():
        calls = ", ".join(f"{x[0]:.0f}" for x in r["load"])
        p99 = ", ".join(f"{x[1]:.1f}" for x in r["load"])
        cpu = ", ".join(f"{x[2]:.0f}" for x in r["load"])
        print(f"{name} ({trees[name]}):")
        print(f"  1. ?type=version p50 {med(r['one']) * 1e3:.3f} ms, "
              f"p99 {pct(r['one'], 99) * 1e3:.3f} ms")  # fmt: skip
        print(f"  2. all types p50 {med(r['all']) * 1e3:.3f} ms")
        print(f"  4. restart -> first answer p50 {med(r['first']) * 1e3:.1f} ms")
        print(f"  6. {CLIENTS} clients: {calls} calls/s; p99 {p99} ms; CPU/call {cpu} µs")
        print(f"  serial keystroke round trip p50 {med(r['serial']) * 1e6:.0f} µs, "
              f"p99 {pct(r['serial'], 99) * 1e6:.0f} µs")  # fmt: skip


if __name__ == "__main__":
    main()
