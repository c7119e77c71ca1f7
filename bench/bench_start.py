"""VM start: ``vmadm start`` until QMP answers, against qemu started bare.

- **floor**: ``python -c pass`` (a process start) and bare qemu: the same
  kind of machine (a BIOS-only VM: ``-vga std``, pvpanic, QMP, VNC),
  started as root in the foreground by this process with no launcher, no
  sandbox, no cgroup, until its QMP socket greets.
- **vmadm start → QMP answering**: the whole ``vmadm start`` process, then
  a ``query-status`` answered on the VM's QMP socket (confined: own user,
  sandbox, cgroup, disk by fd).
- **confinement set-up, in process**: the VM's cgroup made, limited and
  removed, and its ``root/tmp`` handed to its user, per VM.

Run: ``.venv/bin/python -m bench.bench_start [N]`` (default 20 starts).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from .common import RawQmp, World, bios_payload, pct, world

BARE = [
    "qemu-system-x86_64", "-machine", "pc,accel=tcg", "-cpu", "qemu64", "-m", "64",
    "-smp", "1", "-nodefaults", "-no-user-config", "-vga", "std", "-display", "none",
    "-device", "pvpanic", "-qmp", "unix:vm.qmp,server=on,wait=off", "-vnc", "unix:vm.vnc",
]  # fmt: skip


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:7.1f} ms  p90 {pct(values, 90) * 1000:7.1f} ms"


def python_pass(n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        out.append(time.perf_counter() - t0)
    return out


def bare_qemu(n: int) -> list[float]:
    out = []
    for _ in range(n):
        d = tempfile.mkdtemp(prefix="vmadmd-bare-")
        t0 = time.perf_counter()
        proc = subprocess.Popen(BARE, cwd=d, stdin=subprocess.DEVNULL)
        try:
            while True:
                try:
                    sock = socket.socket(socket.AF_UNIX)
                    sock.connect(os.path.join(d, "vm.qmp"))
                    break
                except (FileNotFoundError, ConnectionRefusedError):
                    sock.close()
                    time.sleep(0.001)
            sock.close()
            qmp = RawQmp(os.path.join(d, "vm.qmp"))
            qmp.cmd("query-status")
            out.append(time.perf_counter() - t0)
            qmp.sock.close()
        finally:
            proc.kill()
            proc.wait()
            shutil.rmtree(d, ignore_errors=True)
    return out


def vmadm_start(w: World, uuid: str, n: int) -> list[float]:
    out = []
    qmp_path = os.path.join(w.zones, uuid, "root", "tmp", "vm.qmp")
    for _ in range(n):
        t0 = time.perf_counter()
        w.vmadm("start", uuid, check=True)
        qmp = RawQmp(qmp_path)
        qmp.cmd("query-status")
        out.append(time.perf_counter() - t0)
        qmp.sock.close()
        w.vmadm("stop", "-F", uuid, check=True)
    return out


def confinement_setup(w: World, uuid: str, n: int) -> list[float] | None:
    try:
        from vmadmd.vm import cgroup, zonefs
    except ImportError:
        return None
    if not hasattr(zonefs, "own_runtime_dir"):
        return None  # a version without confinement
    cgroups = cgroup.Cgroups()
    limits = cgroup.limits_of({"ram": 64})
    zonepath = os.path.join(w.zones, uuid)
    uid = int(w.get(uuid)["zone_uid"])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        cgroups.prepare(uuid, limits)
        zonefs.own_runtime_dir(zonepath, uid)
        cgroups.remove(uuid)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    floor_py = python_pass(n)
    floor_qemu = bare_qemu(n)
    with world() as w:
        uuid = w.create(bios_payload(alias="bench-start"))
        starts = vmadm_start(w, uuid, n)
        setup = confinement_setup(w, uuid, 200)
    base = statistics.median(floor_qemu)
    print(f"floor: python -c pass                 {ms(floor_py)}")
    print(f"floor: bare qemu until QMP answers    {ms(floor_qemu)}")
    print(f"vmadm start until QMP answers         {ms(starts)}  "
          f"= {statistics.median(starts) / base:.2f}x bare qemu")  # fmt: skip
    if setup is not None:
        per = statistics.median(setup) * 1e6
        print(f"confinement set-up in process (cgroup made, limited, removed; root/tmp owned): "
              f"p50 {per:.0f} µs per VM")  # fmt: skip


if __name__ == "__main__":
    main()
