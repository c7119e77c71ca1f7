"""Host shutdown and crashes, on real qemu (TCG) with the test guest.

Each guest takes ``SHUTDOWN_DELAY`` seconds after its power button before
it powers off (``vmtest.shutdown_delay``), as a real guest flushing would.

1. Each of N cooperating guests stopped alone (POST stop, then the bench's
   own pidfd sees qemu exit): the slowest of these is the floor.
2. The same N guests, all running, stopped with ``vmadm stop --all`` (the
   whole process, until it has printed every VM's line).  Ratio to the
   floor: 1.0 would be perfectly parallel.
3. Crash -> event: SIGKILL a qemu, time until the daemon's ``exited`` event
   arrives on ``GET /events`` (a streaming client opened beforehand).

Run: ``.venv/bin/python -m bench.bench_shutdown [N] [CRASHES]`` (default 8, 20)
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import signal
import statistics
import subprocess
import sys
import threading
import time

from harness.world import readable_guest
from vmadmd.cli.client import Client

from .common import BIN, World, bios_payload, pct, world

SHUTDOWN_DELAY = 2.0  # each guest takes this long after its power button


def guest_payload() -> dict[str, object]:
    guest = readable_guest()
    return bios_payload(
        alias="guest",
        ram=128,
        qemu_extra_opts=f"-kernel {guest}/vmlinuz -initrd {guest}/initrd.img "
        f"-append 'console=ttyS0 quiet vmtest.shutdown_delay={SHUTDOWN_DELAY}'",
    )


def boot_all(w: World, uuids: list[str]) -> None:
    for uuid in uuids:
        w.vmadm("start", uuid, check=True)
    for uuid in uuids:
        w.wait_console(uuid, count=1, timeout=180)
        w.wait_qmp(uuid, timeout=60)


def stop_alone(w: World, uuid: str) -> float:
    pid = w.pid(uuid)
    assert pid is not None
    fd = os.pidfd_open(pid)
    t0 = time.monotonic()
    Client(w.socket).request("POST", f"/vm/{uuid}", {"action": "stop", "timeout": "60"})
    ready, _, _ = select.select([fd], [], [], 90)
    took = time.monotonic() - t0
    os.close(fd)
    assert ready, "the guest did not power off"
    return took


def crash_to_event(w: World, uuid: str) -> float:
    w.vmadm("start", uuid, check=True)
    w.wait_qmp(uuid)
    kinds: queue.Queue[str] = queue.Queue()

    def follow() -> None:
        with contextlib.suppress(Exception):  # ends when the daemon closes it
            for line in Client(w.socket).stream("/events", {"vm": uuid}):
                if line.startswith("data:"):
                    kinds.put(json.loads(line[5:])["type"])

    threading.Thread(target=follow, daemon=True).start()
    # Subscribed for sure once an event made after the request shows up:
    # resets, until one does (an event before the subscription is not sent).
    subscribed = False
    while not subscribed:
        Client(w.socket).request("POST", f"/vm/{uuid}", {"action": "reset"})
        with contextlib.suppress(queue.Empty):
            while not subscribed:
                subscribed = kinds.get(timeout=0.3) == "reset"
    pid = w.pid(uuid)
    assert pid is not None
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while kinds.get(timeout=30) != "exited":
        pass
    return time.monotonic() - t0


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    crashes = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    with world() as w:
        w.start_daemon()
        uuids = [w.create(guest_payload()) for _ in range(n)]
        alone = []
        for uuid in uuids:
            boot_all(w, [uuid])
            alone.append(stop_alone(w, uuid))
        boot_all(w, uuids)
        t0 = time.monotonic()
        res = subprocess.run(
            [str(BIN / "vmadm"), "stop", "--all", "-t", "60"],
            env=w.environ, capture_output=True, text=True, check=True,
        )  # fmt: skip
        together = time.monotonic() - t0
        lines = res.stdout.strip().splitlines()
        assert len(lines) == n, res.stdout
        by_guest = sum("stopped by the guest" in line for line in lines)
        slowest = max(alone)
        print(f"{n} guests, each stopped alone: slowest {slowest:.3f} s, "
              f"median {statistics.median(alone):.3f} s")  # fmt: skip
        print(f"vmadm stop --all, {n} guests: {together:.3f} s = {together / slowest:.2f}x "
              f"the slowest alone ({by_guest} of {n} by the guest's own power-off)")  # fmt: skip

        plain = w.create(bios_payload(alias="crash"))
        took = [crash_to_event(w, plain) for _ in range(crashes)]
        ms = [t * 1000 for t in took]
        print(f"crash (SIGKILL) -> exited event: p50 {statistics.median(ms):.2f} ms  "
              f"p99 {pct(ms, 99):.2f} ms  n={len(ms)}")  # fmt: skip


if __name__ == "__main__":
    main()
