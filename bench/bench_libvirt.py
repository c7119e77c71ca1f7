"""libvirt 9.0, measured here: the optional anchor of bench_api's libvirt column.

bench_api prints the libvirt figures issue #20 measured from outside. This
bench measures them on this machine instead, in one run: it installs
Debian's libvirt (libvirtd, virsh, the Python bindings of Debian's own
python3) when it is missing, starts ``virtlogd`` and ``libvirtd`` when they
are not running (no systemd here) and stops what it started, and runs 8
transient domains like bench_api's VMs (TCG, 64 MiB, no disk, VNC):

1. ``qemuMonitorCommand(query-version)`` in-process, p50 (bench_api row 1);
2. ``virsh qemu-monitor-command`` whole process against ``python -c pass``
   (row 3);
3. libvirtd exec -> the 8 domains listed (row 4);
4. 16 threads, one connection each, on one domain, 5 s: calls/s, p99,
   libvirtd CPU per call (row 6).

It changes the machine (packages; a ``libvirt-qemu`` system user and ``kvm``
group, as Debian's libvirt-daemon-system would make): run it on a bench
machine.  Run: ``.venv/bin/python -m bench.bench_libvirt``
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

URI = "qemu:///system"
DOMAINS = 8
PACKAGES = ["libvirt-daemon", "libvirt-daemon-driver-qemu", "libvirt-clients", "python3-libvirt"]
DEBIAN_PYTHON = "/usr/bin/python3"

DOMAIN_XML = """<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices><graphics type='vnc' autoport='yes' listen='127.0.0.1'/></devices>
</domain>
"""

# Run by Debian's python3 (the bindings are built for it), prints JSON.
PROBE = r"""
import json, sys, threading, time, statistics
import libvirt, libvirt_qemu

def cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100.0

uri, name, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
ask = '{"execute": "query-version"}'
conn = libvirt.open(uri)
dom = conn.lookupByName(name)
for _ in range(200):
    libvirt_qemu.qemuMonitorCommand(dom, ask, 0)
one = []
for _ in range(2000):
    t0 = time.perf_counter()
    libvirt_qemu.qemuMonitorCommand(dom, ask, 0)
    one.append(time.perf_counter() - t0)

stop = threading.Event()
lat = [[] for _ in range(16)]

def client(i):
    c = libvirt.open(uri)
    d = c.lookupByName(name)
    while not stop.is_set():
        t0 = time.perf_counter()
        libvirt_qemu.qemuMonitorCommand(d, ask, 0)
        lat[i].append(time.perf_counter() - t0)
    c.close()

threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
c0, t0 = cpu(pid), time.perf_counter()
for t in threads:
    t.start()
time.sleep(5)
stop.set()
for t in threads:
    t.join()
took, used = time.perf_counter() - t0, cpu(pid) - c0
calls = sorted(x for per in lat for x in per)
print(json.dumps({
    "one_p50": statistics.median(one),
    "calls_s": len(calls) / took,
    "p99": calls[min(len(calls) - 1, int(len(calls) * 0.99))],
    "cpu_call": used / len(calls),
}))
"""

LISTED = r"""
import sys, time, libvirt
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    try:
        conn = libvirt.open(sys.argv[1])
        if len(conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)) >= int(sys.argv[2]):
            print(time.monotonic())
            break
        conn.close()
    except libvirt.libvirtError:
        pass
    time.sleep(0.002)
"""


def ensure_installed() -> None:
    if shutil.which("libvirtd") and os.path.exists(DEBIAN_PYTHON):
        probe = subprocess.run([DEBIAN_PYTHON, "-c", "import libvirt_qemu"], capture_output=True)
        if probe.returncode == 0:
            return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                   check=True, env=env, stdout=subprocess.DEVNULL)  # fmt: skip


def ensure_qemu_user() -> None:
    """libvirt's QEMU driver will not start without its user (Debian's
    libvirt-daemon-system makes it)."""
    if subprocess.run(["getent", "group", "kvm"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "kvm"], check=True)
    if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--gid", "kvm",
                        "--home-dir", "/var/lib/libvirt", "libvirt-qemu"], check=True)  # fmt: skip
    if subprocess.run(["getent", "group", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["groupadd", "--system", "libvirt-qemu"], check=True)


def wait_path(path: str) -> None:
    for _ in range(1000):
        if os.path.exists(path):
            return
        time.sleep(0.01)
    raise RuntimeError(f"{path} did not appear")


def running(name: str) -> int | None:
    out = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def virsh(*args: str) -> str:
    done = subprocess.run(["virsh", "-c", URI, *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"virsh {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def start_libvirtd() -> tuple[int, float]:
    """(pid, seconds from exec until the domains are listed)."""
    listed = subprocess.Popen(
        [DEBIAN_PYTHON, "-c", LISTED, URI, str(DOMAINS)], stdout=subprocess.PIPE, text=True
    )
    t0 = time.monotonic()
    subprocess.run(["libvirtd", "-d"], check=True)
    out, _ = listed.communicate(timeout=60)
    if not out.strip():
        raise RuntimeError("libvirtd did not list the domains within 30 s")
    pid = running("libvirtd")
    assert pid is not None
    return pid, float(out) - t0


def stop_libvirtd(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    for _ in range(500):
        if running("libvirtd") is None:
            return
        time.sleep(0.01)
    raise RuntimeError("libvirtd did not stop")


def process_p50(argv: list[str], n: int = 30) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ensure_installed()
    ensure_qemu_user()
    for d in ("/var/log/libvirt", "/var/lib/libvirt", "/run/libvirt"):
        os.makedirs(d, exist_ok=True)
    started_logd = running("virtlogd") is None
    if started_logd:
        subprocess.run(["virtlogd", "-d"], check=True)
        wait_path("/run/libvirt/virtlogd-sock")
    ours = running("libvirtd") is None
    if ours:
        subprocess.run(["libvirtd", "-d"], check=True)
        wait_path("/run/libvirt/libvirt-sock")
    names = [f"vmadmd-bench-{i}" for i in range(DOMAINS)]
    slices = set(glob.glob("/sys/fs/cgroup/*/machine"))  # libvirt makes its own
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                path = os.path.join(tmp, f"{name}.xml")
                with open(path, "w") as f:
                    f.write(DOMAIN_XML.format(name=name))
                virsh("create", path)
        time.sleep(2)  # past SeaBIOS's start, as bench_api's VMs are
        pid = running("libvirtd")
        assert pid is not None
        probe = subprocess.run(
            [DEBIAN_PYTHON, "-c", PROBE, URI, names[0], str(pid)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        figures = json.loads(probe.stdout)
        ask = '{"execute": "query-version"}'
        cli = process_p50(["virsh", "-c", URI, "qemu-monitor-command", names[0], ask])
        py = process_p50([sys.executable, "-c", "pass"])
        restarts = []
        for _ in range(5):
            stop_libvirtd(pid)
            pid, took = start_libvirtd()
            restarts.append(took)
    finally:
        for name in names:
            subprocess.run(["virsh", "-c", URI, "destroy", name], capture_output=True)
        if ours and (pid := running("libvirtd")) is not None:
            stop_libvirtd(pid)
        if started_logd and (logd := running("virtlogd")) is not None:
            os.kill(logd, signal.SIGTERM)
        for made in set(glob.glob("/sys/fs/cgroup/*/machine")) - slices:
            remove_empty_tree(made)
    print(f"libvirt {virsh_version()}, {DOMAINS} transient domains (TCG, 64 MiB, no disk)")
    print(f"1. qemuMonitorCommand query-version in-process p50 {figures['one_p50'] * 1000:.3f} ms")
    print(f"3. virsh qemu-monitor-command p50 {cli * 1000:.1f} ms; python -c pass p50 "
          f"{py * 1000:.1f} ms ({cli / py:.2f}x)")  # fmt: skip
    ms = [x * 1000 for x in restarts]
    print(f"4. libvirtd exec -> {DOMAINS} domains listed: p50 {statistics.median(ms):.1f} ms "
          f"(min {min(ms):.1f}, max {max(ms):.1f})")  # fmt: skip
    print(f"6. 16 clients on one domain: {figures['calls_s']:.0f} calls/s, "
          f"p99 {figures['p99'] * 1000:.1f} ms, libvirtd CPU "
          f"{figures['cpu_call'] * 1e6:.0f} µs per call")  # fmt: skip


def remove_empty_tree(top: str) -> None:
    """rmdir a cgroup directory and its children, deepest first (empty ones only)."""
    for root, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        with contextlib.suppress(OSError):
            os.rmdir(root)


def virsh_version() -> str:
    out = subprocess.run(["virsh", "--version"], capture_output=True, text=True).stdout
    return out.strip()


if __name__ == "__main__":
    main()
