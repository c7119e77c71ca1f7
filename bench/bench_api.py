"""API latency against its floors, in one run.

1. ``GET /vm/<uuid>?type=version`` through vmadmd (persistent HTTP connection)
   against ``query-version`` over a raw QMP socket (qemu's own answer time).
2. ``GET /vm/<uuid>`` (all types) against the same 8 queries sent raw, one
   after another.
3. ``vmadm info <uuid> version`` whole process, against ``python -c pass``.
4. Time from ``vmadmd`` exec to the API answering, with 8 running VMs.

Run: ``.venv/bin/python -m bench.bench_api``
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from vmadmd.daemon.monitor import QUERIES as INFO_QUERIES

from .common import BIN, KeepAliveHttp, RawQmp, bios_payload, summary_ms, world

N = 2000


def main() -> None:
    with world() as w:
        uuids = [w.create(bios_payload(alias="bench")) for _ in range(8)]
        for u in uuids:
            w.vmadm("start", u, check=True)
        uuid = uuids[0]
        qmp_path = f"{w.zones}/{uuid}/root/tmp/vm.qmp"

        # The floor, before the daemon holds the (single-client) QMP socket.
        raw = RawQmp(qmp_path)
        for _ in range(200):
            raw.cmd("query-version")
        floor_one = []
        for _ in range(N):
            t0 = time.perf_counter()
            raw.cmd("query-version")
            floor_one.append(time.perf_counter() - t0)
        floor_all = []
        for _ in range(N // 4):
            t0 = time.perf_counter()
            for cmd in INFO_QUERIES.values():
                raw.cmd(cmd)
            floor_all.append(time.perf_counter() - t0)
        raw.close()

        w.start_daemon()
        startup = w.started_in or 0.0
        for u in uuids:
            w.wait_qmp(u)
        http = KeepAliveHttp(w.socket)
        for _ in range(200):
            http.get(f"/vm/{uuid}?type=version")
        api_one = []
        for _ in range(N):
            t0 = time.perf_counter()
            status, _ = http.get(f"/vm/{uuid}?type=version")
            api_one.append(time.perf_counter() - t0)
            assert status == 200
        api_all = []
        for _ in range(N // 4):
            t0 = time.perf_counter()
            status, _ = http.get(f"/vm/{uuid}")
            api_all.append(time.perf_counter() - t0)
            assert status == 200

        def whole(argv: list[str], n: int = 30) -> list[float]:
            out = []
            for _ in range(n):
                t0 = time.perf_counter()
                subprocess.run(argv, env=w.environ, check=True, capture_output=True)
                out.append(time.perf_counter() - t0)
            return out

        cli = whole([str(BIN / "vmadm"), "info", uuid, "version"])
        py = whole([sys.executable, "-c", "pass"])

        w.stop_daemon()
        restarts = []
        for _ in range(5):
            w.start_daemon()
            restarts.append(w.started_in or 0.0)
            w.stop_daemon()

    med = statistics.median
    print("GET /vm/<uuid>?type=version (vmadmd)  ", summary_ms(api_one))
    print("raw QMP query-version (floor)          ", summary_ms(floor_one))
    print(f"  ratio p50 {med(api_one) / med(floor_one):.2f}x the floor")
    print("GET /vm/<uuid> all types (vmadmd)      ", summary_ms(api_all))
    print("raw QMP, the 8 queries in sequence      ", summary_ms(floor_all))
    print(f"  ratio p50 {med(api_all) / med(floor_all):.2f}x the floor")
    print("vmadm info <uuid> version (process)    ", summary_ms(cli))
    print("python -c pass (process floor)         ", summary_ms(py))
    print(f"vmadmd exec -> API answers, 8 running VMs: first {startup * 1000:.1f} ms, "
          f"restarts p50 {med(restarts) * 1000:.1f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
