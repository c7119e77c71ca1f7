"""A bounded soak: mixed traffic for a fixed time against real qemu and stand-ins.

8 real qemu VMs (BIOS only) and 1,000 stand-in VMs (harness.standin hub) under
one daemon. 32 concurrent clients send a mix of info (all types), NMI,
screenshots, resets and VNC console connections (accepted by the VM itself:
the RFB banner must arrive) to random VMs, while a chaos loop stops a real VM
(graceful with a 1 s deadline, which forces it) and boots it again with the
VM layer. At the end: requests served, errors (a 5xx, or a 4xx other than
the 409s a VM caught stopped gives), p99 per route, and the daemon's RSS and
open file descriptors at start and end.

Run: ``.venv/bin/python -m bench.soak [SECONDS] [STANDINS]``  (default 600, 1000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict

from vmadmd.cli.client import Client
from vmadmd.errors import WrongState
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer

from .bench_scale import ping, rss_kib, start_hub
from .common import AsyncHttp, pct, world

REAL = 8
CLIENTS = 32


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(seconds: float, socket_path: str, real: list[str], standins: list[str],
               layer: VmLayer) -> tuple[dict[str, list[float]], dict[str, int], int]:  # fmt: skip
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    samples: dict[str, list[str]] = defaultdict(list)
    served = 0
    stopped: set[str] = set()
    session = AsyncHttp(socket_path, CLIENTS + 4)
    deadline = time.monotonic() + seconds
    try:

        async def call(route: str, method: str, url: str, uuid: str) -> None:
            nonlocal served
            t0 = time.monotonic()
            status, body = await session.request(method, url)
            latencies[route].append(time.monotonic() - t0)
            served += 1
            caught_stopped = status == 409 and uuid in stopped
            if status >= 500 or (status >= 400 and not caught_stopped):
                key = f"{route} {status}"
                errors[key] += 1
                if len(samples[key]) < 3:
                    samples[key].append(body.decode(errors="replace")[:200])

        async def vnc(uuid: str) -> None:
            """Find the VM's console port, connect, and read the RFB banner."""
            nonlocal served
            t0 = time.monotonic()
            port = None
            give_up = t0 + 5  # a VM just booted opens its listener a moment later
            while port is None and time.monotonic() < give_up:
                status, raw = await session.request("GET", f"/vm/{uuid}?type=vnc")
                body = json.loads(raw) if status == 200 else {}
                port = body.get("vnc", {}).get("port")
                if port is None:
                    if uuid in stopped:
                        return
                    await asyncio.sleep(0.1)
            why = "no listener"
            if port is not None:
                writer = None
                try:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection("127.0.0.1", port), 10
                    )
                    banner = await asyncio.wait_for(reader.readexactly(12), 10)
                    why = "" if banner == b"RFB 003.008\n" else f"banner {banner!r}"
                except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
                    why = type(err).__name__
                finally:
                    if writer is not None:
                        writer.close()
            latencies["vnc banner"].append(time.monotonic() - t0)
            served += 1
            if why and uuid not in stopped:
                errors[f"vnc {why}"] += 1

        async def client() -> None:
            while time.monotonic() < deadline:
                uuid = random.choice(real if random.random() < 0.5 else standins)
                kind = random.choices(
                    ["info", "nmi", "screenshot", "reset", "vnc"], weights=[60, 10, 10, 10, 10]
                )[0]
                if kind == "vnc":
                    await vnc(uuid)
                elif kind == "info":
                    await call("GET /vm/{uuid}", "GET", f"/vm/{uuid}", uuid)
                elif kind == "nmi":
                    await call("nmi", "POST", f"/vm/{uuid}?action=sysrq&request=nmi", uuid)
                elif kind == "screenshot":
                    await call("screenshot", "POST", f"/vm/{uuid}?action=sysrq&request=screenshot",
                               uuid)  # fmt: skip
                else:
                    await call("reset", "POST", f"/vm/{uuid}?action=reset", uuid)

        async def chaos() -> None:
            while time.monotonic() < deadline - 5:
                await asyncio.sleep(2)
                uuid = random.choice(real)
                stopped.add(uuid)
                await call("stop", "POST", f"/vm/{uuid}?action=stop&timeout=1", uuid)
                give_up = time.monotonic() + 30
                while layer.is_running(uuid):
                    if time.monotonic() > give_up:
                        errors["stop did not end the VM in 30 s"] += 1
                        break
                    await asyncio.sleep(0.1)
                with contextlib.suppress(WrongState):
                    await asyncio.to_thread(layer.start, uuid)
                # Until the daemon has picked the new qemu up, a 409 is right.
                give_up = time.monotonic() + 30
                while time.monotonic() < give_up:
                    status, _ = await session.request("GET", f"/vm/{uuid}?type=status")
                    if status == 200:
                        break
                    await asyncio.sleep(0.05)
                stopped.discard(uuid)

        await asyncio.gather(chaos(), *(client() for _ in range(CLIENTS)))
    finally:
        await session.close()
    for key, texts in samples.items():
        print(f"  sample of {key}: {texts}")
    return latencies, errors, served


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 600
    n_standins = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    with world() as w:
        layer = VmLayer(VmSettings(zones_root=w.zones, accel="tcg"))
        standins = [layer.create({"alias": f"s{i}", "autoboot": False}) for i in range(n_standins)]
        hub = start_hub(w)  # serves every VM present now: the stand-ins
        real = [layer.create({"alias": f"real{i}", "ram": 64, "autoboot": False})
                for i in range(REAL)]  # fmt: skip
        for uuid in real:
            layer.start(uuid)
        try:
            w.start_daemon()
            assert w.daemon is not None
            give_up = time.monotonic() + 120
            while ping(w)["qmp_ready"] < n_standins + REAL:
                if time.monotonic() > give_up:
                    raise RuntimeError(f"daemon did not pick up every VM: {ping(w)}")
                time.sleep(0.05)
            time.sleep(1)
            pid = w.daemon.pid
            rss0, fds0 = rss_kib(pid), fds(pid)
            latencies, errors, served = asyncio.run(soak(seconds, w.socket, real, standins, layer))
            time.sleep(2)
            rss1, fds1 = rss_kib(pid), fds(pid)
            _, metrics = Client(w.socket).request("GET", "/metrics")
            vnc_outcomes = [
                line.split("vmadmd_vnc_clients_total", 1)[1]
                for line in metrics["raw"].splitlines()
                if line.startswith("vmadmd_vnc_clients_total")
            ]
        finally:
            w.stop_daemon()
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=30)
    print(f"soak: {seconds:.0f} s, {REAL} real qemu + {n_standins} stand-ins, {CLIENTS} clients")
    print(f"requests served: {served}, errors: {sum(errors.values())} {dict(errors) or ''}")
    for route, values in sorted(latencies.items()):
        print(f"  {route:18s} n={len(values):7d}  p50 {pct(values, 50) * 1000:7.2f} ms  "
              f"p99 {pct(values, 99) * 1000:7.2f} ms")  # fmt: skip
    print(f"daemon RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB; open fds {fds0} -> {fds1}")
    print(f"VNC clients by outcome: {', '.join(vnc_outcomes) or 'none'}")


if __name__ == "__main__":
    main()
