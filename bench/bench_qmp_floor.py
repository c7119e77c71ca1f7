"""Row 2's floor: how qemu answers the 8 info queries, sequential or pipelined.

A bare qemu (no guest, no disk, like bench_api's VMs) under each
accelerator this machine can run, driven over its raw QMP socket with a
blocking client: ``query-version`` alone, the 8 queries of ``GET
/vm/<uuid>`` one after another, and the same 8 sent in one write. When
the pipelined time is the sequential one, qemu works through the commands
one at a time at the same pace however they arrive, and no client,
pipelining or not, gets the 8 answers sooner than the sum of qemu's own
times: what a client adds on top of that sum is its whole cost.

Run: ``.venv/bin/python -m bench.bench_qmp_floor``
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time

from vmadmd.daemon.monitor import QUERIES

N = 300
COMMANDS = list(QUERIES.values())


class Qmp:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.reply()  # the greeting
        self.one("qmp_capabilities")

    def reply(self) -> dict[str, object]:
        while True:
            line = self.file.readline()
            if not line:
                raise EOFError("qemu closed QMP")
            msg: dict[str, object] = json.loads(line)
            if "event" not in msg:
                return msg

    def one(self, cmd: str) -> None:
        self.sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        self.reply()

    def pipelined(self, cmds: list[str]) -> None:
        self.sock.sendall(b"".join(json.dumps({"execute": c}).encode() + b"\n" for c in cmds))
        for _ in cmds:
            self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def measure(accel: str, tmp: str) -> str:
    path = os.path.join(tmp, f"{accel}.qmp")
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", accel, "-m", "64", "-display", "none", "-nodefaults",
         "-qmp", f"unix:{path},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(path):
            if qemu.poll() is not None or time.monotonic() > deadline:
                err = qemu.stderr.read().decode().strip() if qemu.stderr else ""
                return f"{accel}: qemu did not start ({err.splitlines()[-1:]})"
            time.sleep(0.02)
        time.sleep(1)  # past the firmware's first steps
        qmp = Qmp(path)
        single, seq, pipe = [], [], []
        for _ in range(N):
            t0 = time.perf_counter()
            qmp.one("query-version")
            t1 = time.perf_counter()
            for cmd in COMMANDS:
                qmp.one(cmd)
            t2 = time.perf_counter()
            qmp.pipelined(COMMANDS)
            t3 = time.perf_counter()
            single.append(t1 - t0)
            seq.append(t2 - t1)
            pipe.append(t3 - t2)
        qmp.close()
        med = statistics.median
        return (
            f"{accel}: query-version p50 {med(single) * 1e3:.3f} ms; the {len(COMMANDS)} "
            f"queries in sequence {med(seq) * 1e3:.3f} ms, pipelined {med(pipe) * 1e3:.3f} ms "
            f"({med(pipe) / med(seq):.2f}x sequential)"
        )
    finally:
        qemu.kill()
        qemu.wait()


def main() -> None:
    tmp = tempfile.mkdtemp(prefix="vmadmd-qmpfloor-")
    try:
        for accel in ("tcg", "kvm"):
            print(measure(accel, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
