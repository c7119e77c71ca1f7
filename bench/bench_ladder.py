"""Where row 1 of bench_api goes: a ladder of HTTP -> QMP proxies, one VM.

``GET ...?type=version`` over a persistent HTTP connection, timed as in
bench_api, through stand-alone asyncio proxies (each its own process, one
QMP connection, as the daemon) that add one kind of work per rung:

* ``callbacks``: two Protocols, the QMP reply written back from the read
  callback: the least any asyncio proxy can do (four process wake-ups per
  call where the raw client has two);
* ``task``: a task per request awaiting a future, as any coroutine server;
* ``task+parse+json``: plus the daemon's HTTP parser (h11, a connection
  per request here: a bound on its cost) and the JSON decode and encode of
  the answer;

then the daemon itself, all against raw QMP, in the same run (two rounds,
interleaved).  What the daemon costs above the last rung is its routing,
the VM lookup, metrics, request ids, timers and the QMP command layer.

Run: ``.venv/bin/python -m bench.bench_ladder``
"""

from __future__ import annotations

import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from .common import REPO, KeepAliveHttp, RawQmp, bios_payload, cpu_seconds, world

N = 3000
MODES = ("callbacks", "task", "task+parse+json")

PROXY = r"""
import asyncio, json, os, socket, sys
import h11

MODE = sys.argv[3]
ASK = b'{"execute": "query-version"}\n'


class Qmp(asyncio.Protocol):
    def __init__(self):
        self.buf = b""
        self.waiter = None

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            waiter, self.waiter = self.waiter, None
            if waiter is not None:
                waiter(line)


class Http(asyncio.Protocol):
    def __init__(self, qmp):
        self.qmp = qmp
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport):
        self.transport = transport

    def answer(self, body):
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
        self.transport.write(head + body)

    def data_received(self, data):
        if MODE == "callbacks":
            self.qmp.waiter = self.answer
            self.qmp.transport.write(ASK)
        else:
            self.loop.create_task(self.serve(data))

    async def serve(self, data):
        if MODE == "task+parse+json":
            conn = h11.Connection(h11.SERVER)
            conn.receive_data(data)
            conn.next_event()
        reply = self.loop.create_future()
        self.qmp.waiter = reply.set_result
        self.qmp.transport.write(ASK)
        body = await reply
        if MODE == "task+parse+json":
            body = json.dumps({"version": json.loads(body)["return"]}).encode()
        self.answer(body)


async def main(directory, name, http_path):
    loop = asyncio.get_running_loop()
    fd = os.open(directory, os.O_PATH)
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(f"/proc/self/fd/{fd}/{name}")
    os.close(fd)
    reader = sock.makefile("rb", buffering=0)
    reader.readline()
    sock.sendall(b'{"execute": "qmp_capabilities"}\n')
    reader.readline()
    sock.setblocking(False)
    qmp = Qmp()
    await loop.create_unix_connection(lambda: qmp, sock=sock)
    await loop.create_unix_server(lambda: Http(qmp), http_path)
    print("ready", flush=True)
    await asyncio.sleep(3600)


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[4]))
"""


def timed(call: Callable[[], object], pid: int | None = None) -> tuple[float, float]:
    """p50 of N calls in ms, after 300 to warm up; and the CPU time ``pid``
    spent per call meanwhile, in µs (0 without a pid)."""
    for _ in range(300):
        call()
    out = []
    cpu0 = cpu_seconds(pid) if pid else 0.0
    for _ in range(N):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    cpu = (cpu_seconds(pid) - cpu0) / N * 1e6 if pid else 0.0
    return statistics.median(out) * 1000, cpu


def main() -> None:
    results: dict[str, list[tuple[float, float]]] = {}
    with world() as w, tempfile.TemporaryDirectory(prefix="vmadmd-ladder-") as tmp:
        script = os.path.join(tmp, "proxy.py")
        with open(script, "w") as f:
            f.write(PROXY)
        uuid = w.create(bios_payload(alias="ladder"))
        w.vmadm("start", uuid, check=True)
        rundir = os.path.join(w.zones, uuid, "root", "tmp")
        w.wait_for(lambda: os.path.exists(os.path.join(rundir, "vm.qmp")), what="vm.qmp")
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        for _ in range(2):
            raw = RawQmp(os.path.join(rundir, "vm.qmp"))
            results.setdefault("raw QMP (floor)", []).append(
                timed(functools.partial(raw.cmd, "query-version"))
            )
            raw.close()
            for mode in MODES:
                http_path = os.path.join(tmp, f"{mode}.sock")
                proxy = subprocess.Popen(
                    [sys.executable, script, rundir, "vm.qmp", mode, http_path],
                    stdout=subprocess.PIPE,
                    env=env,
                )
                try:
                    assert proxy.stdout is not None
                    proxy.stdout.readline()
                    http = KeepAliveHttp(http_path)
                    results.setdefault(f"proxy: {mode}", []).append(
                        timed(functools.partial(http.get, "/vm/x?type=version"), proxy.pid)
                    )
                    http.sock.close()
                finally:
                    proxy.kill()
                    proxy.wait()
            daemon = w.start_daemon()
            w.wait_qmp(uuid)
            api = KeepAliveHttp(w.socket)
            results.setdefault("vmadmd", []).append(
                timed(functools.partial(api.get, f"/vm/{uuid}?type=version"), daemon.pid)
            )
            api.sock.close()
            w.stop_daemon()
    floor = statistics.median(p50 for p50, _ in results["raw QMP (floor)"])
    print(f"GET ?type=version, p50 of {N} calls, one VM, two rounds; the server's CPU per call")
    for name, rounds in results.items():
        runs = ", ".join(f"{p50:.3f}" for p50, _ in rounds)
        ratio = statistics.median(p50 for p50, _ in rounds) / floor
        cpu = ", ".join(f"{c:.0f}" for _, c in rounds) + " µs" if rounds[0][1] else "-"
        print(f"{name:26s} {runs} ms  ({ratio:.2f}x the floor)  CPU {cpu}")


if __name__ == "__main__":
    main()
