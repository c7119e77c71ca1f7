"""Forced-stop lateness: time past the deadline until qemu is gone.

BIOS-only VMs ignore ACPI powerdown, so every stop is forced at its deadline.
Measured by the bench's own pidfd on each qemu, over >= 20 stops, with the
daemon left alone and with a SIGKILL + restart of the daemon between the
request and the deadline.  Also: qemu exit -> VM reported stopped (vm.json
settled) for a cooperating guest.

Run: ``.venv/bin/python -m bench.bench_stop [N]``
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
import time

from harness.world import readable_guest
from vmadmd.cli.client import Client

from .common import bios_payload, summary_ms, world

TIMEOUT = 2.0


def stop_once(w: object, uuid: str, restart: bool) -> float:
    from .common import World

    assert isinstance(w, World)
    w.vmadm("start", uuid, check=True)
    w.wait_qmp(uuid)
    pid = w.pid(uuid)
    assert pid is not None
    fd = os.pidfd_open(pid)
    _, body = Client(w.socket).request(
        "POST", f"/vm/{uuid}", {"action": "stop", "timeout": str(TIMEOUT)}
    )
    expire = float(body["transition"]["expire"]) / 1000
    if restart:
        w.stop_daemon(sig=signal.SIGKILL)
        w.start_daemon()
    ready, _, _ = select.select([fd], [], [], TIMEOUT + 30)
    gone = time.time()
    os.close(fd)
    assert ready
    return gone - expire


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with world() as w:
        w.start_daemon()
        uuid = w.create(bios_payload(alias="bench"))
        plain = [stop_once(w, uuid, restart=False) for _ in range(n)]
        restarted = [stop_once(w, uuid, restart=True) for _ in range(n)]

        # A cooperating guest: qemu exit -> vm.json settled.
        guest = readable_guest()
        g = w.create(
            bios_payload(
                alias="bench",
                ram=128,
                qemu_extra_opts=f"-kernel {guest}/vmlinuz -initrd {guest}/initrd.img "
                "-append 'console=ttyS0 quiet'",
            )
        )
        settle = []
        vm_json = os.path.join(w.zones, g, "vm.json")
        log = os.path.join(w.zones, g, "root/tmp/vm.console.log")
        for _ in range(5):
            w.vmadm("start", g, check=True)
            while "VMTEST-READY" not in open(log, errors="replace").read():  # noqa: SIM115
                time.sleep(0.05)
            w.wait_qmp(g)
            pid = w.pid(g)
            assert pid is not None
            fd = os.pidfd_open(pid)
            Client(w.socket).request("POST", f"/vm/{g}", {"action": "stop", "timeout": "60"})
            select.select([fd], [], [], 30)
            gone = time.time()
            os.close(fd)
            while "transition" in json.load(open(vm_json)):  # noqa: SIM115
                time.sleep(0.0005)
            settle.append(time.time() - gone)

    print(f"forced-stop lateness, daemon left alone      {summary_ms(plain)}")
    print(f"forced-stop lateness, daemon killed+restarted {summary_ms(restarted)}")
    print(f"cooperating guest: qemu exit -> transition cleared on disk {summary_ms(settle)}")


if __name__ == "__main__":
    main()
