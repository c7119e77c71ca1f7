"""Autoboot: time from daemon start to all N flagged VMs running with QMP answering.

N = 8 BIOS-only VMs, with ``--autoboot-concurrency 1`` and at its default.
Run: ``.venv/bin/python -m bench.bench_autoboot [N]``
"""

from __future__ import annotations

import os
import signal
import sys
import time

from .common import World, bios_payload, world


def one_run(w: World, uuids: list[str], *extra: str) -> float:
    for uuid in uuids:
        pid = w.pid(uuid)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    while any(w.pid(u) is not None for u in uuids):
        time.sleep(0.01)
    if os.path.exists(w.marker):
        os.unlink(w.marker)
    t0 = time.monotonic()
    w.start_daemon(*extra)
    for uuid in uuids:
        w.wait_qmp(uuid, timeout=120)
    took = time.monotonic() - t0
    w.stop_daemon()
    return took


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    default = 2 * (os.cpu_count() or 1)
    with world() as w:
        uuids = [w.create(bios_payload(alias="bench", autoboot=True)) for _ in range(n)]
        serial = [one_run(w, uuids, "--autoboot-concurrency", "1") for _ in range(3)]
        parallel = [one_run(w, uuids) for _ in range(3)]
    print(f"autoboot of {n} VMs, concurrency 1:            best {min(serial):.3f} s  "
          f"runs {', '.join(f'{t:.3f}' for t in serial)}")  # fmt: skip
    print(f"autoboot of {n} VMs, concurrency {default} (default): best {min(parallel):.3f} s  "
          f"runs {', '.join(f'{t:.3f}' for t in parallel)}")  # fmt: skip
    print(f"speed-up {min(serial) / min(parallel):.2f}x")


if __name__ == "__main__":
    main()
