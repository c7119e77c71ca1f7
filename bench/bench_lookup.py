"""``vmadm lookup`` and ``vmadm list`` over many VMs, whole process, against ``python -c pass``.

Half the VMs have a qemu stand-in holder running (so their state needs the
identity check: ``vm.pid`` and ``/proc``), half are stopped.

Run: ``.venv/bin/python -m bench.bench_lookup [N] [RUNS]`` (default 1000, 10)
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time

from harness.standin import ServedVm
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer

from .common import BIN, world


def timed(cmd: list[str], env: dict[str, str], runs: int) -> float:
    took = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1000


async def hold(layer: VmLayer, uuids: list[str]) -> list[ServedVm]:
    return [await ServedVm.start(layer.store.paths(u).runtime_dir, u, vnc=False) for u in uuids]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    with world() as w:
        layer = VmLayer(VmSettings(zones_root=w.zones, uid_ledger=w.ledger))
        uuids = [layer.create({"alias": f"v{i}", "ram": 64 + i % 5, "autoboot": False})
                 for i in range(n)]  # fmt: skip
        loop = asyncio.new_event_loop()
        served = loop.run_until_complete(hold(layer, uuids[: n // 2]))
        env = w.environ
        floor = timed([sys.executable, "-c", "pass"], env, runs)
        print(f"python -c pass (floor)              p50 {floor:6.1f} ms")
        for args in (["lookup", "-j", "-o", "uuid,state"], ["list"], ["lookup", "alias=v7"]):
            ms = timed([str(BIN / "vmadm"), *args], env, runs)
            print(f"vmadm {' '.join(args):<30} p50 {ms:6.1f} ms = {ms / floor:.1f}x the floor "
                  f"({n} VMs, {n // 2} running)")  # fmt: skip
        for vm in served:
            loop.run_until_complete(vm.close())
        loop.close()


if __name__ == "__main__":
    main()
