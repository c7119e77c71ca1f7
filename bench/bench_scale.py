"""Scale: 10, 100 and 1,000 VMs under one daemon, served by the qemu stand-in hub.

For each N: time from ``vmadmd`` exec until the API answers, and until every
QMP connection is up and every VNC listener open; daemon RSS per VM (RSS
with N minus RSS with an empty zones root, over N); event latency from a
qemu exit (SIGKILL of the VM's process) to the ``exited`` event; and, at
N = 50, info throughput with 64 concurrent clients.

Run: ``.venv/bin/python -m bench.bench_scale [N ...]``  (default 10 100 1000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

from vmadmd.cli.client import Client
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer
from vmadmd.vm.sockets import connect_unix

from .common import BIN, AsyncHttp, KeepAliveHttp, World, pct, world


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def ping(w: World) -> dict[str, Any]:
    data: dict[str, Any] = Client(w.socket, timeout=10).request("GET", "/ping")[1]
    return data


def start_hub(w: World) -> subprocess.Popen[str]:
    hub = subprocess.Popen(
        [sys.executable, "-m", "harness.standin", "hub", w.zones],
        stdout=subprocess.PIPE,
        text=True,
        env=w.environ,
        start_new_session=True,
    )
    assert hub.stdout is not None
    line = hub.stdout.readline()
    assert "up" in line, line
    return hub


class EventWatch:
    """Follows /events in a thread and timestamps each event's arrival."""

    def __init__(self, w: World) -> None:
        self.arrivals: dict[tuple[str, str], float] = {}
        self.sock = connect_unix(os.path.dirname(w.socket), os.path.basename(w.socket))
        self.sock.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        buf = b""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            now = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    self.arrivals.setdefault((event["type"], event.get("vm", "")), now)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


async def throughput(w: World, uuids: list[str], clients: int, seconds: float) -> tuple[int, int]:
    ok = errors = 0
    session = AsyncHttp(w.socket, clients)
    try:
        deadline = time.monotonic() + seconds

        async def worker(i: int) -> None:
            nonlocal ok, errors
            n = i
            while time.monotonic() < deadline:
                uuid = uuids[n % len(uuids)]
                n += clients
                status, _ = await session.request("GET", f"/vm/{uuid}")
                if status == 200:
                    ok += 1
                else:
                    errors += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    finally:
        await session.close()
    return ok, errors


def cpu_ms(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")


def scrape(
    w: World, times: int = 20, *, pinging: bool = False
) -> tuple[float, float, int, list[float]]:
    """GET /metrics: p50 wall time, the daemon's CPU per scrape, per-VM series
    count; and the latencies of GET /ping sent back to back meanwhile (what
    a scrape costs everyone else)."""
    assert w.daemon is not None
    took = []
    pings: list[float] = []
    done = threading.Event()

    def ping_meanwhile() -> None:
        http = KeepAliveHttp(w.socket)
        while not done.is_set():
            t0 = time.monotonic()
            http.get("/ping")
            pings.append(time.monotonic() - t0)
        http.sock.close()

    pinger = threading.Thread(target=ping_meanwhile)
    if pinging:
        pinger.start()
    cpu0 = cpu_ms(w.daemon.pid)
    body = ""
    try:
        for _ in range(times):
            t0 = time.monotonic()
            _, answer = w.client().request("GET", "/metrics")
            took.append(time.monotonic() - t0)
            body = answer["raw"]
    finally:
        done.set()
        if pinging:
            pinger.join()
    cpu = (cpu_ms(w.daemon.pid) - cpu0) / times
    series = sum(1 for line in body.splitlines() if line.startswith("vmadmd_vm_"))
    return statistics.median(took) * 1000, cpu, series, pings


def one_size(n: int) -> dict[str, Any]:
    with world() as w:
        # Baseline: the same daemon with an empty zones root.
        w.start_daemon()
        time.sleep(1.0)
        assert w.daemon is not None
        rss0 = rss_kib(w.daemon.pid)
        w.stop_daemon()

        layer = VmLayer(VmSettings(zones_root=w.zones, uid_ledger=w.ledger))
        uuids = [layer.create({"alias": f"s{i}", "ram": 64, "autoboot": False}) for i in range(n)]
        hub = start_hub(w)
        try:
            w.start_daemon()
            t_api = w.started_in or 0.0
            t0 = time.monotonic() - t_api
            while True:
                p = ping(w)
                if p["qmp_ready"] == n and p["vnc_listeners"] == n:
                    break
                if time.monotonic() - t0 > 120:
                    raise RuntimeError(f"not all VMs picked up after 120 s: {p}")
                time.sleep(0.005)
            t_all = time.monotonic() - t0
            time.sleep(1.0)
            assert w.daemon is not None
            rss_n = rss_kib(w.daemon.pid)

            result: dict[str, Any] = {
                "n": n,
                "api_s": t_api,
                "all_s": t_all,
                "kib_per_vm": (rss_n - rss0) / n,
                "rss0_mib": rss0 / 1024,
                "rssn_mib": rss_n / 1024,
            }
            result["scrape_ms"], result["scrape_cpu_ms"], result["series"], _ = scrape(w)
            result["busy_scrape_ms"], _, _, pings = scrape(w, pinging=True)
            result["ping_p50_ms"] = statistics.median(pings) * 1000
            result["ping_p99_ms"] = pct(pings, 99) * 1000
            result["ping_max_ms"] = max(pings) * 1000
            if n >= 50:
                ok, errors = asyncio.run(throughput(w, uuids[:50], 64, 10.0))
                result["rps"] = ok / 10.0
                result["errors"] = errors

            # Event latency: qemu exit -> `exited` event.
            watch = EventWatch(w)
            time.sleep(0.3)
            latencies = []
            for uuid in uuids[: min(50, n)]:
                pid = w.pid(uuid)
                assert pid is not None
                t_kill = time.monotonic()
                os.kill(pid, signal.SIGKILL)
                deadline = t_kill + 10
                while ("exited", uuid) not in watch.arrivals and time.monotonic() < deadline:
                    time.sleep(0.0005)
                latencies.append(watch.arrivals[("exited", uuid)] - t_kill)
            watch.close()
            result["event_p50_ms"] = statistics.median(latencies) * 1000
            result["event_p99_ms"] = pct(latencies, 99) * 1000
            return result
        finally:
            w.stop_daemon()
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=30)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [10, 100, 1000]
    assert (BIN / "vmadmd").exists()
    rows = [one_size(n) for n in sizes]
    print(f"{'VMs':>6} {'API up':>9} {'all up':>9} {'RSS/VM':>9} {'RSS':>9} "
          f"{'exit->event p50/p99':>22} {'info req/s (64 clients, 50 VMs)':>34}")  # fmt: skip
    for r in rows:
        rps = f"{r['rps']:.0f}, {r['errors']} errors" if "rps" in r else "-"
        print(
            f"{r['n']:>6} {r['api_s'] * 1000:>7.0f}ms {r['all_s'] * 1000:>7.0f}ms "
            f"{r['kib_per_vm']:>6.1f}KiB {r['rssn_mib']:>6.1f}MiB "
            f"{r['event_p50_ms']:>9.2f} / {r['event_p99_ms']:>6.2f} ms {rps:>34}"
        )
    print(f"(daemon RSS with an empty zones root: {rows[0]['rss0_mib']:.1f} MiB)")
    for r in rows:
        print(
            f"{r['n']:>6} VMs: GET /metrics p50 {r['scrape_ms']:.1f} ms, daemon CPU "
            f"{r['scrape_cpu_ms']:.1f} ms per scrape, {r['series']} per-VM series; with "
            f"GET /ping sent back to back meanwhile: scrape p50 {r['busy_scrape_ms']:.1f} ms, "
            f"/ping p50 {r['ping_p50_ms']:.2f} ms, p99 {r['ping_p99_ms']:.2f} ms, max "
            f"{r['ping_max_ms']:.1f} ms"
        )


if __name__ == "__main__":
    main()
