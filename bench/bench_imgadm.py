"""``imgadm import`` of a large image from a loopback IMGAPI, against curl.

One process run, no daemon: the harness's IMGAPI server (``sendfile``) serves
an image of SIZE MiB (random bytes: nothing to gain from holes or
compression); each round imports it with ``imgadm import -q`` (download,
size and sha1 checked, fsync, 0444, rename) and runs the floor, ``curl URL |
tee FILE | sha1sum; sync FILE`` (the same bytes fetched, hashed and written
durably by three processes in parallel).  The image is deleted between
rounds.  ``curl | sha1sum`` alone (nothing written) is shown for scale.
Reported: median throughput of each, the ratio (goal >= 0.8x), and
imgadm's peak RSS for a 64 MiB and a SIZE MiB image (flat: streamed).

Run: ``.venv/bin/python -m bench.bench_imgadm [SIZE_MIB] [ROUNDS]`` (default 1024, 5)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.imgapi import ImgapiServer


def random_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time of ``cmd`` and its peak RSS (KiB), from its own rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    took = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed ({proc.returncode})")
    return took, usage.ru_maxrss


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed for the floor: ./tools/setup.sh installs it")
    root = Path(tempfile.mkdtemp(prefix="vmadmd-bench-imgadm-"))
    try:
        zones = root / "zones"
        zones.mkdir()
        src = Path(__file__).resolve().parents[1] / "src"
        env = {**os.environ, "VMADM_ZONES_ROOT": str(zones),
               "PYTHONPATH": f"{src}:{os.environ.get('PYTHONPATH', '')}"}  # fmt: skip
        imgadm = [sys.executable, "-m", "vmadmd.cli.imgadm"]
        with ImgapiServer(root / "served") as server:
            small_disk, big_disk = root / "small.raw", root / "big.raw"
            random_file(small_disk, 64)
            random_file(big_disk, size)
            small = server.publish(small_disk, kind="raw")["uuid"]
            big = server.publish(big_disk, kind="raw")["uuid"]
            big_disk.unlink()
            small_disk.unlink()
            subprocess.run([*imgadm, "sources", "-a", server.url], env=env, check=True,
                           stdout=subprocess.DEVNULL)  # fmt: skip
            url = f"{server.url}/images/{big}/file"
            out = root / "curl.out"
            floor = ["sh", "-c", f"curl -sf {url} | tee {out} | sha1sum >/dev/null && sync {out}"]
            fetch_only = ["sh", "-c", f"curl -sf {url} | sha1sum >/dev/null"]
            ours: list[float] = []
            theirs: list[float] = []
            bare: list[float] = []
            rss_big = 0
            for _ in range(rounds):
                took, rss = run([*imgadm, "import", "-q", big], env)
                ours.append(took)
                rss_big = max(rss_big, rss)
                subprocess.run([*imgadm, "delete", big], env=env, check=True,
                               stdout=subprocess.DEVNULL)  # fmt: skip
                took, _ = run(floor, env)
                theirs.append(took)
                out.unlink()
                bare.append(run(fetch_only, env)[0])
            _, rss_small = run([*imgadm, "import", "-q", small], env)
        mib_s_ours = size / statistics.median(ours)
        mib_s_floor = size / statistics.median(theirs)
        print(f"imgadm import, {size} MiB     {mib_s_ours:8.1f} MiB/s  "
              f"(median of {rounds}: {statistics.median(ours):.2f} s)")  # fmt: skip
        print(f"curl | tee | sha1sum; sync  {mib_s_floor:8.1f} MiB/s  "
              f"(median of {rounds}: {statistics.median(theirs):.2f} s)")  # fmt: skip
        print(f"(curl | sha1sum, no write     {size / statistics.median(bare):8.1f} MiB/s)")
        print(f"ratio {mib_s_ours / mib_s_floor:.2f}x the floor (goal >= 0.8x)")
        print(f"imgadm peak RSS: {rss_small / 1024:.1f} MiB for 64 MiB, "
              f"{rss_big / 1024:.1f} MiB for {size} MiB")  # fmt: skip
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
