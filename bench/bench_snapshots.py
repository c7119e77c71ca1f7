"""Snapshots and send | receive (#33).

1. A live snapshot of a running two-disk VM (BIOS only: no guest agent),
   ``POST /vm/U/snapshots`` request -> 201 (the QMP transaction done and
   ``vm.json`` written), N times; beside it, ``qemu-img snapshot -c`` of the
   same two disks of a stopped VM (the daemon's path for one).
2. ``vmadm send U | vmadm receive`` of a VM whose one disk is a 1 GiB qcow2
   full of data, from one zones root into another, vs ``cat disk | cat >
   file`` of the same file in the same run, rounds interleaved (both from
   the page cache; the received VM deleted between rounds).

Run: ``.venv/bin/python -m bench.bench_snapshots [N] [MiB]``
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from harness.world import World, tool
from vmadmd.cli.client import Client

from .common import bios_payload, summary_ms, world


def live_snapshots(w: World, n: int) -> tuple[list[float], list[float]]:
    w.start_daemon()
    uuid = w.run_vm(bios_payload(alias="snap", disks=[{"size": 64}, {"size": 64}]))
    client = Client(w.socket, timeout=60)
    live = []
    for i in range(n):
        t0 = time.perf_counter()
        status, _ = client.request("POST", f"/vm/{uuid}/snapshots", body={"name": f"s{i}"})
        live.append(time.perf_counter() - t0)
        assert status == 201
    w.vmadm("stop", uuid, "-F", check=True)
    stopped = []
    for i in range(n):
        t0 = time.perf_counter()
        status, _ = client.request("POST", f"/vm/{uuid}/snapshots", body={"name": f"t{i}"})
        stopped.append(time.perf_counter() - t0)
        assert status == 201
    w.vmadm("delete", uuid, check=True)
    return live, stopped


def filled_qcow2(path: Path, mib: int) -> None:
    """A qcow2 of ``mib`` MiB whose every cluster holds (random) data."""
    raw = path.with_suffix(".raw")
    with raw.open("wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(path)],
                   check=True)  # fmt: skip
    raw.unlink()


def send_receive(a: World, b: World, uuid: str) -> float:
    t0 = time.perf_counter()
    sender = subprocess.Popen([tool("vmadm"), "send", uuid], env=a.environ,
                              stdout=subprocess.PIPE)  # fmt: skip
    assert sender.stdout is not None
    subprocess.run([tool("vmadm"), "receive"], env=b.environ, stdin=sender.stdout,
                   check=True, stderr=subprocess.DEVNULL)  # fmt: skip
    sender.stdout.close()
    assert sender.wait() == 0
    took = time.perf_counter() - t0
    b.vmadm("delete", uuid, check=True)
    return took


def cat_cat(src: Path, dst: Path, sync: bool = False) -> float:
    t0 = time.perf_counter()
    tail = f"; sync '{dst}'" if sync else ""
    subprocess.run(f"cat '{src}' | cat > '{dst}'{tail}", shell=True, check=True)
    took = time.perf_counter() - t0
    dst.unlink()
    return took


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    rounds = 5
    with world() as w:
        live, stopped = live_snapshots(w, n)
        print(f"live snapshot, 2 disks (request -> done): {summary_ms(live)}")
        print(f"stopped VM, 2 disks (qemu-img as the VM's user): {summary_ms(stopped)}")

        other = World(w.tmp / "host-b", deep=False, log_level="warning")
        other.extra_env["VMADM_UID_LEDGER"] = w.ledger
        try:
            uuid = w.create(bios_payload(alias="sent", disks=[{"size": mib}]))
            disk = Path(w.zones) / uuid / "disk0.qcow2"
            uid = disk.stat().st_uid
            filled_qcow2(disk, mib)
            os.chown(disk, uid, uid)
            os.chmod(disk, 0o600)
            size = disk.stat().st_size
            out = w.tmp / "cat.out"
            ours, base, synced = [], [], []
            for _ in range(rounds):
                base.append(cat_cat(disk, out))
                synced.append(cat_cat(disk, out, sync=True))
                ours.append(send_receive(w, other, uuid))
            mb = size / (1 << 20)
            b50, o50 = sorted(base)[rounds // 2], sorted(ours)[rounds // 2]
            s50 = sorted(synced)[rounds // 2]
            print(f"disk file {mb:.0f} MiB, {rounds} rounds interleaved (medians):")
            print(f"  cat disk | cat > file:     {b50:.3f} s  ({mb / b50:.0f} MiB/s)")
            print(f"  cat disk | cat > file; sync file: {s50:.3f} s  ({mb / s50:.0f} MiB/s)")
            print(
                f"  vmadm send | vmadm receive (checksummed, fsync'ed): {o50:.3f} s  "
                f"({mb / o50:.0f} MiB/s)"
            )
            print(
                f"  ratio (throughput, ours / cat): {b50 / o50:.2f}x  (goal >= 0.8x); "
                f"ours / (cat; sync): {s50 / o50:.2f}x"
            )
        finally:
            other.cleanup()
            shutil.rmtree(other.tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
