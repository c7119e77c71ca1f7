"""Guest metadata: one V2 GET's round trip through the agent vs a bare responder.

The VM is the qemu stand-in (``ServedVm``: its holder process serves
``vm.ttyb``, so the agent's peer check passes as with qemu); the client plays
the guest on the other end of ``vm.ttyb`` with a blocking socket, as
cloud-init does on ``/dev/ttyS1``.  The floor is the same event loop and
socket path answering every line with a ready-made reply (no parsing, no
``vm.json``); the agent's figure is the same request answered by
``MetadataAgent`` (parse, ``vm.json`` read in a thread, answer).  What the
daemon adds is the difference of the medians (goal: <= 100 us).  The agent
runs without its rate bound here: a back-to-back loop would otherwise time
the bound (200 requests a second per VM, 50 at once), not the path.

Run: ``.venv/bin/python -m bench.bench_metadata [N]`` (default 3000)

``.venv/bin/python -m bench.bench_metadata debian [ROUNDS]`` (default 1): the
Debian 12 cloud guest (``tools/build-debian-guest.sh``), start -> cloud-init
finished (its "finished at" on the serial console), configured by our
metadata vs by a NoCloud seed ISO (``ci.ds=NoCloud``, the seed as a
read-only virtio disk), the same image and VM shape, booted in turn in one
run under TCG (goal: <= 1.05x).
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

from harness.standin import ServedVm
from vmadmd.daemon import metadata as md
from vmadmd.daemon.mdagent import MetadataAgent
from vmadmd.vm.sockets import Peer
from vmadmd.vm.store import Store

from .common import pct

UUID = "4b1d0c9e-2f3a-4c5d-8e6f-7a8b9c0d1e2f"


def frame(reqid: str, key: str) -> bytes:
    body = f"{reqid} GET {base64.b64encode(key.encode()).decode()}"
    return f"V2 {len(body)} {md.crc32_hex(body)} {body}\n".encode()


def rtts(n: int, once: Callable[[], None]) -> list[float]:
    for _ in range(100):  # warm up
        once()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        once()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def show(name: str, us: list[float]) -> float:
    p50 = statistics.median(us)
    print(f"{name:<36} p50 {p50:7.1f} us  p99 {pct(us, 99):7.1f} us  n={len(us)}")
    return p50


def exchange(sock: socket.socket, request: bytes) -> Callable[[], None]:
    def once() -> None:
        sock.sendall(request)
        got = b""
        while not got.endswith(b"\n"):
            got += sock.recv(4096)

    return once


class Loop:
    """An event loop in a thread of its own (the daemon's), the client in this one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join()


USER_DATA = "#cloud-config\nwrite_files:\n  - path: /etc/vmtest\n    content: x\n"
USER_SCRIPT = "#!/bin/sh\necho VMTEST-USER-SCRIPT >/dev/ttyS0\n"
IMAGE = "d3b1a2c4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"


def debian(rounds: int) -> None:
    """Start -> cloud-init finished: our metadata vs a NoCloud seed."""
    import hashlib
    import json
    import shutil
    import subprocess

    from harness.imgapi import manifest_for
    from harness.world import REPO, _world_readable_dir

    from .common import world

    cache = REPO / ".cache" / "debian"
    subprocess.run([str(REPO / "tools" / "build-debian-guest.sh"), str(cache)], check=True)
    shared = _world_readable_dir("vmadmd-debian-")
    for name in ("vmlinuz", "initrd.img"):
        os.chmod(shutil.copy(cache / name, shared), 0o644)
    with world() as w:
        image = cache / "root.qcow2"
        with open(image, "rb") as raw:
            sha1 = hashlib.file_digest(raw, "sha1").hexdigest()
        manifest = os.path.join(w.tmp, "debian.json")
        with open(manifest, "w") as f:
            json.dump(manifest_for(IMAGE, "debian-12-cloud", sha1, image.stat().st_size,
                                   "none", "qcow2"), f)  # fmt: skip
        subprocess.run([sys.executable, "-m", "vmadmd.cli.imgadm", "install", "-q", "-m",
                        manifest, "-f", str(image)], env=w.environ, check=True)  # fmt: skip
        w.start_daemon()

        def make(append: str, **props: Any) -> str:
            cmdline = f"root=/dev/vda rw console=ttyS0 panic=-1 {append}".strip()
            return w.create({
                "alias": "debian", "ram": 1024, "vcpus": 2, "autoboot": False,
                "disks": [{"image_uuid": IMAGE}],
                "qemu_extra_opts": f"-kernel {shared}/vmlinuz -initrd {shared}/initrd.img "
                                   f"-append '{cmdline}'",
                **props,
            })  # fmt: skip

        ours = make("", hostname="bench", customer_metadata={
            "user-script": USER_SCRIPT, "cloud-init:user-data": USER_DATA})  # fmt: skip
        seeded = make("ci.ds=NoCloud")
        with tempfile.TemporaryDirectory() as seed:
            with open(os.path.join(seed, "meta-data"), "w") as f:
                json.dump({"instance-id": seeded, "local-hostname": "bench"}, f)
            with open(os.path.join(seed, "user-data"), "w") as f:
                f.write(USER_DATA)
            iso = str(w.runtime(seeded) / "seed.iso")
            subprocess.run(["genisoimage", "-quiet", "-output", iso, "-volid", "cidata",
                            "-joliet", "-rock", os.path.join(seed, "user-data"),
                            os.path.join(seed, "meta-data")], check=True)  # fmt: skip
            os.chmod(iso, 0o444)
        extra = (
            w.get(seeded)["qemu_extra_opts"]
            + " -drive file=seed.iso,format=raw,if=virtio,readonly=on"
        )
        w.vmadm("update", seeded, "-f", "-", input=json.dumps({"qemu_extra_opts": extra}),
                check=True)  # fmt: skip

        def boot(uuid: str, want: str) -> float:
            t0 = time.monotonic()
            w.vmadm("start", uuid, check=True)
            w.wait_console(uuid, "finished at", timeout=600)
            took = time.monotonic() - t0
            assert want in w.console(uuid), w.console(uuid)[-2000:]
            w.vmadm("stop", uuid, "-F", check=True)
            return took

        times: dict[str, list[float]] = {"metadata": [], "nocloud": []}
        for _ in range(rounds):
            times["nocloud"].append(boot(seeded, "Datasource DataSourceNoCloud"))
            times["metadata"].append(boot(ours, "Datasource DataSourceSmartOS"))
        for name, took in times.items():
            each = ", ".join(f"{t:.1f}" for t in took)
            print(f"start -> cloud-init finished, {name:<9} "
                  f"median {statistics.median(took):6.1f} s ({each})")  # fmt: skip
        ratio = statistics.median(times["metadata"]) / statistics.median(times["nocloud"])
        print(f"ratio metadata / NoCloud {ratio:.2f}x (goal <= 1.05x)")


def main() -> None:
    if sys.argv[1:2] == ["debian"]:
        debian(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
        return
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    request = frame("0badcafe", "user-script")
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "zones"))
        paths = store.create(
            UUID, {"uuid": UUID, "customer_metadata": {"user-script": "#!/bin/sh\n" * 20}}
        )
        loop = Loop()
        served: ServedVm = loop.run(ServedVm.start(paths.runtime_dir, UUID))

        # The floor: the same socket and loop, a ready-made answer per line.
        canned = md.success(md.Request("GET", "user-script", "0badcafe"), "#!/bin/sh\n" * 20)

        async def floor_side(sock: socket.socket) -> None:
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            while await reader.readline():
                writer.write(canned)
                await writer.drain()

        async def pair() -> tuple[socket.socket, socket.socket]:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            return a, b

        host, guest = loop.run(pair())
        loop.loop.call_soon_threadsafe(lambda: asyncio.ensure_future(floor_side(host)))
        floor = show("bare responder (floor)", rtts(n, exchange(guest, request)))
        guest.close()

        # The path, not the policy: no rate bound (200 requests/s by default,
        # which a back-to-back loop would hit after the first 50).
        agent = MetadataAgent(UUID, store, Peer.of(served.holder.pid), rate=1e9)
        loop.loop.call_soon_threadsafe(agent.start)

        async def guest_end() -> socket.socket:
            return await asyncio.wait_for(served.ttyb.get(), 10)

        sock: socket.socket = loop.run(guest_end())
        sock.setblocking(True)
        agent_p50 = show("GET through the agent (vm.ttyb)", rtts(n, exchange(sock, request)))
        print(f"the daemon adds {agent_p50 - floor:.1f} us at p50 (goal <= 100 us)")
        sock.close()
        loop.run(agent.close())
        loop.run(served.close())
        loop.stop()


if __name__ == "__main__":
    main()
