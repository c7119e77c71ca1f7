"""Live migration of an idle guest: qemu's downtime, and the total time of
``vmadm migrate`` against a raw qemu → qemu migration of the same guest and
disk, rounds interleaved in one run.

The guest: the test kernel + busybox initramfs, 256 MiB of RAM, idle at its
shell prompt, one 256 MiB qcow2 disk with 32 MiB written (``qemu-io``, before
boot).  Ours: ``vmadm migrate UUID root@TARGET`` between two daemons of this
machine, the target in its own network namespace behind Debian's sshd
(``harness/sshhost.py``): the whole command, from its start to its exit (ssh,
the target's VM and qemu made, disks mirrored over NBD, RAM, commit).  Raw:
the same guest in a bare qemu (root, no confinement), and the steps a user
would script by hand over QMP: start the target qemu (``-incoming defer
-S``), NBD-export its empty disk on a unix socket, ``blockdev-mirror``, once
ready ``migrate`` over a unix socket, ``block-job-cancel``, ``cont``; timed
from the target qemu's start to its ``cont``.  No ssh, no daemon.

Run: ``.venv/bin/python -m bench.bench_migrate [ROUNDS]``
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness.sshhost import TwoHosts
from harness.world import new_cgroup_parents_removed, readable_guest

RAM = 256
DISK_MIB = 256
DATA_MIB = 32
APPEND = "console=ttyS0 quiet panic=-1"


class Qmp:
    """A bare QMP client (commands with arguments, events skipped)."""

    def __init__(self, path: str) -> None:
        deadline = time.monotonic() + 30
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.file = self.sock.makefile("rb")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, command: str, **arguments: Any) -> Any:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode())
        while True:
            msg = json.loads(self.file.readline())
            if "error" in msg:
                raise RuntimeError(f"{command}: {msg['error']}")
            if "return" in msg:
                return msg["return"]

    def until(self, query: str, cond: Any, period: float = 0.01) -> Any:
        while True:
            reply = self.cmd(query)
            if cond(reply):
                return reply
            time.sleep(period)


def fill(disk: str) -> None:
    """DATA_MIB MiB of a pattern at the start of a qcow2 disk."""
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0xa5 0 {DATA_MIB}M", disk],
                   check=True, capture_output=True)  # fmt: skip


def qemu_argv(guest: str, workdir: str, name: str, disk: str, *extra: str) -> list[str]:
    return [
        "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-m", str(RAM),
        "-nodefaults", "-display", "none", "-vga", "std",
        "-qmp", f"unix:{workdir}/{name}.qmp,server=on,wait=off",
        "-serial", f"file:{workdir}/{name}.serial",
        "-blockdev", json.dumps({"driver": "file", "node-name": "disk0-file", "filename": disk}),
        "-blockdev", json.dumps({"driver": "qcow2", "node-name": "disk0", "file": "disk0-file"}),
        "-device", "virtio-blk-pci,drive=disk0",
        "-kernel", f"{guest}/vmlinuz", "-initrd", f"{guest}/initrd.img", "-append", APPEND,
        *extra,
    ]  # fmt: skip


def raw_round(guest: str) -> tuple[float, int]:
    """A bare qemu → qemu migration with its disk: (total s, qemu's downtime ms)."""
    d = tempfile.mkdtemp(prefix="vmadmd-bench-raw-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        src_disk, dst_disk = f"{d}/src.qcow2", f"{d}/dst.qcow2"
        for disk in (src_disk, dst_disk):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", disk, f"{DISK_MIB}M"],
                           check=True)  # fmt: skip
        fill(src_disk)
        procs.append(subprocess.Popen(qemu_argv(guest, d, "src", src_disk)))
        serial = Path(f"{d}/src.serial")
        while "VMTEST-READY" not in (serial.read_text(errors="replace") if serial.exists() else ""):
            time.sleep(0.05)
        src = Qmp(f"{d}/src.qmp")
        t0 = time.monotonic()
        procs.append(subprocess.Popen(qemu_argv(guest, d, "dst", dst_disk,
                                                "-incoming", "defer", "-S")))  # fmt: skip
        dst = Qmp(f"{d}/dst.qmp")
        dst.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": f"{d}/nbd.sock"}})
        dst.cmd("block-export-add", type="nbd", id="e0", name="disk0", writable=True,
                **{"node-name": "disk0"})  # fmt: skip
        nbd = {"type": "unix", "path": f"{d}/nbd.sock"}
        src.cmd("blockdev-add", driver="nbd", export="disk0", server=nbd, **{"node-name": "tgt0"})
        src.cmd("blockdev-mirror", device="disk0", target="tgt0", sync="full",
                **{"job-id": "m0"})  # fmt: skip
        src.until("query-block-jobs", lambda jobs: jobs and jobs[0]["ready"])
        dst.cmd("migrate-incoming", uri=f"unix:{d}/mig.sock")
        src.cmd("migrate", uri=f"unix:{d}/mig.sock")
        info = src.until("query-migrate", lambda s: s["status"] in ("completed", "failed"))
        assert info["status"] == "completed", info
        src.cmd("block-job-cancel", device="m0")
        src.until("query-block-jobs", lambda jobs: not jobs)
        dst.until("query-migrate", lambda s: s.get("status") == "completed")
        dst.cmd("nbd-server-stop")
        dst.cmd("cont")
        return time.monotonic() - t0, int(info["downtime"])
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(d, ignore_errors=True)


def our_round(hosts: TwoHosts, guest: str) -> tuple[float, int]:
    """``vmadm migrate`` of the same guest and disk: (total s, qemu's downtime ms)."""
    src, tgt = hosts.source, hosts.target
    payload = {
        "alias": "bench", "ram": RAM, "autoboot": False,
        "disks": [{"size": DISK_MIB, "model": "virtio"}],
        "qemu_extra_opts": f"-kernel {guest}/vmlinuz -initrd {guest}/initrd.img "
                           f"-append '{APPEND}'",
    }  # fmt: skip
    uuid = src.create(payload)
    fill(os.path.join(src.zones, uuid, "disk0.qcow2"))
    src.vmadm("start", uuid, check=True)
    src.wait_console(uuid)
    src.wait_qmp(uuid)
    t0 = time.monotonic()
    res = src.vmadm("migrate", uuid, hosts.destination, timeout=600)
    took = time.monotonic() - t0
    if res.returncode != 0:
        raise SystemExit(f"vmadm migrate failed: {res.stderr}\n{src.daemon_log(4000)}")
    _, p = src.api("GET", f"/vm/{uuid}/migration")
    tgt.vmadm("delete", uuid, check=True)
    return took, int(p["downtime_ms"])


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    guest = readable_guest()
    root = Path(tempfile.mkdtemp(prefix="vmadmd-bench-"))
    hosts = TwoHosts(root, deep=False, log_level="warning")
    ours: list[tuple[float, int]] = []
    raw: list[tuple[float, int]] = []
    with new_cgroup_parents_removed():
        try:
            hosts.start()
            hosts.source.start_daemon()
            hosts.target.start_daemon()
            for i in range(rounds):
                ours.append(our_round(hosts, guest))
                raw.append(raw_round(guest))
                print(f"round {i + 1}: vmadm migrate {ours[-1][0]:.2f} s (downtime "
                      f"{ours[-1][1]} ms); raw qemu {raw[-1][0]:.2f} s (downtime {raw[-1][1]} ms)",
                      flush=True)  # fmt: skip
        finally:
            hosts.close()
            with contextlib.suppress(OSError):
                shutil.rmtree(root)
    ours_t = statistics.median(t for t, _ in ours)
    raw_t = statistics.median(t for t, _ in raw)
    print(f"idle {RAM} MiB guest, {DISK_MIB} MiB disk ({DATA_MIB} MiB written), {rounds} rounds:")
    print(f"  downtime (qemu's): vmadm migrate p50 {statistics.median(d for _, d in ours):.0f} ms "
          f"max {max(d for _, d in ours)} ms (goal <= 100 ms); raw p50 "
          f"{statistics.median(d for _, d in raw):.0f} ms")  # fmt: skip
    print(f"  total: vmadm migrate p50 {ours_t:.2f} s, raw qemu -> qemu p50 {raw_t:.2f} s: "
          f"{ours_t / raw_t:.2f}x (goal <= 1.2x)")  # fmt: skip


if __name__ == "__main__":
    main()
