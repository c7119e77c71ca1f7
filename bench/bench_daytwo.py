"""Day-two changes (#32): a disk hot-added, and grown, until the guest sees it,
through vmadmd vs the same QMP commands sent raw to the same qemu.

One VM (the busybox test guest, TCG) with one disk, and a second QMP
monitor of its own (``-qmp unix:raw.qmp`` in ``qemu_extra_opts``) for the
baseline, so both paths drive the very same qemu and guest, in turn, in
one run.  The guest's shell (its serial console, held by the bench: no
daemon in the way of the observer) waits in a loop for the change to show
in ``/sys/block`` and prints a marker; a round is timed from the request
sent to the marker read.

- **hot-add**: raw: ``add-fd`` (the file opened by the bench, passed with
  SCM_RIGHTS), two ``blockdev-add``, ``device_add``; vmadmd: ``vmadm
  update`` has written vm.json (untimed: ``VmLayer.update`` in process),
  then ``POST ?action=apply_devices`` (the daemon opens the file, passes it
  and sends the same commands); also ``vmadm update`` whole (a new qcow2
  made, vm.json written, the API called) against raw with the same
  ``qemu-img create`` in front.  Between rounds the disk is unplugged
  (untimed).
- **grow**: raw ``block_resize`` vs ``apply_devices`` after vm.json says the
  new size, and vs ``vmadm update`` whole (its shrink check reads the file's
  size with ``qemu-img info``).

Run: ``.venv/bin/python -m bench.bench_daytwo [ROUNDS]`` (default 8)
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

from harness.rawqmp import RawQmp, raw_add, raw_remove
from harness.world import readable_guest
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer
from vmadmd.vm.sockets import connect_unix

from .common import world


class Console:
    """The guest's shell on its serial port (``vm.console``, held directly)."""

    def __init__(self, directory: str) -> None:
        self.sock = connect_unix(directory, "vm.console")
        self.sock.settimeout(300)  # a loaded 2-CPU host boots TCG guests slowly
        self.seen = b""
        self.n = 0

    def until(self, text: bytes) -> None:
        while text not in self.seen:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the console closed")
            self.seen += chunk
        self.seen = self.seen[self.seen.index(text) + len(text) :]

    def arm(self, condition: str) -> bytes:
        """The guest loops until ``condition``, then prints a marker (returned)."""
        self.n += 1
        marker = f"m{self.n}-"
        self.sock.sendall(
            f"until {condition}; do sleep 0.01; done; echo {marker}$((6*7))\n".encode()
        )
        time.sleep(0.3)  # the loop runs before the change is asked for
        return f"{marker}42".encode()

    def run(self, command: str) -> None:
        self.n += 1
        self.sock.sendall(f"{command}; echo r{self.n}-$((6*7))\n".encode())
        self.until(f"r{self.n}-42".encode())


def line(name: str, values: list[float], floor: float | None = None) -> float:
    p50 = statistics.median(values) * 1000
    ratio = f"  {p50 / floor:.2f}x" if floor else ""
    print(f"{name:<58} p50 {p50:8.1f} ms  min {min(values) * 1000:8.1f} ms{ratio}")
    return p50


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    shared = readable_guest()
    with world() as w:
        payload = {
            "alias": "daytwo", "ram": 128, "autoboot": False, "disks": [{"size": 16}],
            "qemu_extra_opts": (
                f"-kernel {shared}/vmlinuz -initrd {shared}/initrd.img "
                "-append 'console=ttyS0 quiet' -qmp unix:raw.qmp,server=on,wait=off"
            ),
        }  # fmt: skip
        uuid = w.create(payload)
        w.vmadm("start", uuid, check=True)
        runtime = str(w.runtime(uuid))
        console = Console(runtime)  # ours before the daemon's
        console.until(b"VMTEST-READY")
        w.start_daemon()
        w.wait_qmp(uuid)
        qmp = RawQmp(runtime, "raw.qmp")
        os.environ.update(w.environ)  # the VM layer, in this process, on this world
        layer = VmLayer(VmSettings.from_env())
        zonepath = f"{w.zones}/{uuid}"
        spare = f"{zonepath}/disk9.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", spare, "8M"], check=True)
        t: dict[str, list[float]] = {k: [] for k in ("raw", "api", "raw+img", "cli")}
        grow: dict[str, list[float]] = {k: [] for k in ("raw", "api", "cli")}
        seen = "[ -e /sys/block/vdb ]"
        gone = "[ ! -e /sys/block/vdb ]"

        def timed(condition: str, act: Any) -> float:
            marker = console.arm(condition)
            t0 = time.perf_counter()
            act()
            console.until(marker)
            return time.perf_counter() - t0

        def daemon_remove() -> None:
            path = layer.get(uuid)["disks"][1]["path"]
            body = json.dumps({"remove_disks": [{"path": path, "delete": True}]})
            w.vmadm("update", uuid, "-f", "-", check=True, input=body)
            console.run(f"while ! {gone}; do sleep 0.01; done")

        for _ in range(rounds):
            # Hot-add, raw (the file exists) vs apply_devices (vm.json written).
            t["raw"].append(timed(seen, lambda: raw_add(qmp, spare, "rawdisk")))
            raw_remove(qmp, "rawdisk")
            console.run(f"while ! {gone}; do sleep 0.01; done")
            layer.update(uuid, {"add_disks": [{"size": 8}]})
            t["api"].append(timed(seen, lambda: w.client().request(
                "POST", f"/vm/{uuid}", {"action": "apply_devices"})))  # fmt: skip
            daemon_remove()
            # Whole: qemu-img create + raw vs vmadm update.
            os.unlink(spare)

            def made_and_raw() -> None:
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", spare, "8M"],
                               check=True)  # fmt: skip
                raw_add(qmp, spare, "rawdisk")

            t["raw+img"].append(timed(seen, made_and_raw))
            raw_remove(qmp, "rawdisk")
            console.run(f"while ! {gone}; do sleep 0.01; done")
            t["cli"].append(timed(seen, lambda: w.vmadm(
                "update", uuid, "-f", "-", check=True,
                input=json.dumps({"add_disks": [{"size": 8}]}))))  # fmt: skip
            daemon_remove()
            # Grow vda by 1 MiB each time, three ways.
            for how in ("raw", "api", "cli"):
                size = layer.get(uuid)["disks"][0]["size"] + 1
                want = f'[ "$(cat /sys/block/vda/size)" = {size * 2048} ]'
                if how == "raw":
                    # vm.json follows (untimed), so the next rounds agree with qemu.
                    args = {"node-name": "disk0", "size": size << 20}
                    grow[how].append(timed(want, partial(qmp.run, "block_resize", args)))

                    def follow(vm: dict[str, Any], size: int = size) -> None:
                        vm["disks"][0]["size"] = vm["live_devices"]["disks"][0]["size"] = size

                    layer.store.update(uuid, follow)
                elif how == "api":
                    layer.update(uuid, {"update_disks": [{"path": f"{zonepath}/disk0.qcow2",
                                                          "size": size}]})  # fmt: skip
                    grow[how].append(timed(want, lambda: w.client().request(
                        "POST", f"/vm/{uuid}", {"action": "apply_devices"})))  # fmt: skip
                else:
                    body = json.dumps(
                        {"update_disks": [{"path": f"{zonepath}/disk0.qcow2", "size": size}]}
                    )
                    cli = partial(w.vmadm, "update", uuid, "-f", "-", check=True, input=body)
                    grow[how].append(timed(want, cli))
        print(
            f"{rounds} rounds, TCG, busybox guest; request sent -> the guest's /sys/block shows it"
        )
        floor = line("hot-add: raw QMP (add-fd, 2 blockdev-add, device_add)", t["raw"])
        line("hot-add: POST apply_devices (vm.json written before)", t["api"], floor)
        floor = line("hot-add: qemu-img create + raw QMP", t["raw+img"])
        line("hot-add: vmadm update add_disks (whole process)", t["cli"], floor)
        floor = line("grow: raw block_resize", grow["raw"])
        line("grow: POST apply_devices (vm.json written before)", grow["api"], floor)
        line("grow: vmadm update update_disks (whole process)", grow["cli"], floor)
        console.sock.close()


if __name__ == "__main__":
    main()
