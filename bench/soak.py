"""A bounded soak: mixed traffic and chaos for a fixed time, real qemu and stand-ins.

8 real qemu VMs (BIOS only: they ignore the power button, so every graceful
stop is forced at its deadline) and N stand-in VMs (``harness.standin hub``)
under one daemon.  32 clients send a mix of info (all types), NMI,
screenshots, resets and VNC console connections (accepted by the VM itself:
the RFB banner must arrive) to random VMs, while a chaos loop, every couple
of seconds, does one of:

* ``stop``: a graceful stop with a 1 s deadline (forced), then an immediate
  start with the VM layer, racing the daemon's handling of the exit;
* ``kill``: SIGKILL a real qemu, then start it again at once;
* ``stop -F race``: a graceful stop, and the VM layer's forced stop
  (``vmadm stop -F``) right behind it;
* ``start x4``: a stopped VM started from 4 clients at once (exactly one
  may boot it);
* ``daemon kill``: a stop with a 5 s deadline, then the daemon SIGKILLed
  and started again: the new daemon must force that stop on time.

Errors: any 5xx; a 4xx other than the 409 a VM caught stopping or starting
gives; a stop that did not end its VM; a forced stop that landed more than
1 s after its deadline; a start race that booted the VM twice or not at all;
a VM not answering again 30 s after it was started.  Requests that find the
daemon down (while chaos restarts it) are counted apart, not as errors.

Run: ``.venv/bin/python -m bench.soak [SECONDS] [STANDINS]``  (default 600, 1000)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field

import h11

from harness.world import World
from vmadmd.cli.client import Client
from vmadmd.errors import VmadmError
from vmadmd.vm import proc
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer
from vmadmd.vm.sockets import connect_unix

from .bench_scale import ping, rss_kib, start_hub
from .common import pct, world

REAL = 8
CLIENTS = 32
LATE_LIMIT = 1.0  # a forced stop may land this long after its deadline, at most
CHAOS = ("stop", "kill", "stop -F race", "start x4", "daemon kill")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class DaemonDown(Exception):
    """The API socket refused or dropped the connection."""


class Http:
    """A keep-alive HTTP/1.1 client on the API's unix socket (h11)."""

    def __init__(self, socket_path: str) -> None:
        self.path = socket_path
        self._conn: h11.Connection | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def request(self, method: str, target: str) -> tuple[int, bytes]:
        reused = self._conn is not None
        try:
            return await self._request(method, target)
        except (OSError, EOFError, h11.ProtocolError) as err:
            self.close()
            if not reused:
                raise DaemonDown(str(err)) from err
        # A kept-alive connection the server had closed (a restarted daemon):
        # once more on a new one, as HTTP clients do.
        try:
            return await self._request(method, target)
        except (OSError, EOFError, h11.ProtocolError) as err:
            self.close()
            raise DaemonDown(str(err)) from err

    async def _request(self, method: str, target: str) -> tuple[int, bytes]:
        if self._conn is None or self._conn.our_state is not h11.IDLE:
            self.close()
            sock = connect_unix(os.path.dirname(self.path), os.path.basename(self.path))
            sock.setblocking(False)
            self._reader, self._writer = await asyncio.open_connection(sock=sock)
            self._conn = h11.Connection(h11.CLIENT)
        conn, reader, writer = self._conn, self._reader, self._writer
        assert reader is not None
        assert writer is not None
        writer.write(conn.send(h11.Request(method=method, target=target,
                                           headers=[("Host", "soak")])))  # fmt: skip
        writer.write(conn.send(h11.EndOfMessage()))
        status, body = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                if not data:
                    raise EOFError("the daemon closed the connection")
                conn.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("the daemon closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.close()
        return status, bytes(body)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._conn = self._reader = self._writer = None


@dataclass
class Report:
    seconds: float
    served: int = 0
    daemon_down: int = 0
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    lateness: list[float] = field(default_factory=list)  # forced stops: end - deadline
    chaos: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    rss_kib: tuple[int, int] = (0, 0)
    fds: tuple[int, int] = (0, 0)

    def error(self, key: str, sample: str = "") -> None:
        self.errors[key] += 1
        if sample and len(self.samples[key]) < 3:
            self.samples[key].append(sample[:200])

    def lines(self) -> list[str]:
        out = [f"requests served: {self.served}, errors: {sum(self.errors.values())} "
               f"{dict(self.errors) or ''}; requests while the daemon was down: "
               f"{self.daemon_down}"]  # fmt: skip
        out += [f"  sample of {key}: {texts}" for key, texts in self.samples.items()]
        for route, values in sorted(self.latencies.items()):
            out.append(f"  {route:18s} n={len(values):7d}  p50 {pct(values, 50) * 1000:8.2f} ms"
                       f"  p99 {pct(values, 99) * 1000:8.2f} ms")  # fmt: skip
        if self.lateness:
            out.append(f"forced stops: {len(self.lateness)}, lateness after the deadline p50 "
                       f"{pct(self.lateness, 50) * 1000:.0f} ms, p99 "
                       f"{pct(self.lateness, 99) * 1000:.0f} ms, max "
                       f"{max(self.lateness) * 1000:.0f} ms")  # fmt: skip
        out.append(f"chaos: {dict(self.chaos)}")
        out.append(f"daemon RSS {self.rss_kib[0] / 1024:.1f} -> {self.rss_kib[1] / 1024:.1f} MiB;"
                   f" open fds {self.fds[0]} -> {self.fds[1]}")  # fmt: skip
        return out


class Soak:
    def __init__(self, w: World, layer: VmLayer, real: list[str], standins: list[str],
                 seconds: float) -> None:  # fmt: skip
        self.w = w
        self.layer = layer
        self.real = real
        self.standins = standins
        self.report = Report(seconds)
        self.deadline = time.monotonic() + seconds
        # VMs the chaos loop is stopping or starting: a 409 for them is right.
        self.unsettled: set[str] = set()
        self.down = asyncio.Event()  # set while the daemon is being restarted
        self.restarted = -1e9  # monotonic time the last restart ended

    # -- requests --------------------------------------------------------------

    async def call(
        self, http: Http, route: str, method: str, url: str, uuid: str | None
    ) -> tuple[int, bytes]:
        t0 = time.monotonic()
        try:
            status, body = await http.request(method, url)
        except DaemonDown as err:
            if self.down.is_set():
                self.report.daemon_down += 1
                await asyncio.sleep(0.05)
                return 0, b""
            self.report.error(f"{route} connection", str(err))
            return 0, b""
        self.report.latencies[route].append(time.monotonic() - t0)
        self.report.served += 1
        caught = status == 409 and uuid is not None and uuid in self.unsettled
        if status >= 400 and not caught:
            self.report.error(f"{route} {status}", body.decode(errors="replace"))
        return status, body

    async def vnc(self, http: Http, uuid: str) -> None:
        """Find the VM's console port, connect, and read the RFB banner."""
        t0 = time.monotonic()
        port = None
        # A VM just booted opens its listener a moment later; after a daemon
        # restart every console is opened anew (a stand-in's listening socket
        # is held by the hub, not by its "qemu", so it is not adopted as a
        # real qemu's is, but bound and given again): longer then.
        give_up = t0 + (15 if time.monotonic() - self.restarted < 15 else 10)
        while port is None and time.monotonic() < give_up:
            status, body = await self.call(http, "GET vnc", "GET", f"/vm/{uuid}?type=vnc", uuid)
            port = json.loads(body).get("vnc", {}).get("port") if status == 200 else None
            if port is None:
                if uuid in self.unsettled or self.down.is_set():
                    return
                await asyncio.sleep(0.1)
        why, detail = "no listener", f"{'real' if uuid in self.real else 'stand-in'} {uuid}"
        if port is not None:
            writer = None
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 10
                )
                banner = await asyncio.wait_for(reader.readexactly(12), 10)
                why = "" if banner == b"RFB 003.008\n" else f"banner {banner!r}"
            except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
                why = type(err).__name__
            finally:
                if writer is not None:
                    writer.close()
        self.report.latencies["vnc banner"].append(time.monotonic() - t0)
        self.report.served += 1
        if why and uuid not in self.unsettled:
            self.report.error(f"vnc {why}", detail)

    async def client(self) -> None:
        http = Http(self.w.socket)
        while time.monotonic() < self.deadline:
            uuid = random.choice(self.real if random.random() < 0.5 else self.standins)
            kind = random.choices(
                ["info", "nmi", "screenshot", "reset", "vnc"], weights=[60, 10, 10, 10, 10]
            )[0]
            if kind == "vnc":
                await self.vnc(http, uuid)
            elif kind == "info":
                await self.call(http, "GET /vm/{uuid}", "GET", f"/vm/{uuid}", uuid)
            elif kind == "nmi":
                await self.call(http, "nmi", "POST", f"/vm/{uuid}?action=sysrq&request=nmi", uuid)
            elif kind == "screenshot":
                await self.call(http, "screenshot", "POST",
                                f"/vm/{uuid}?action=sysrq&request=screenshot", uuid)  # fmt: skip
            else:
                await self.call(http, "reset", "POST", f"/vm/{uuid}?action=reset", uuid)
        http.close()

    # -- chaos -------------------------------------------------------------------

    async def chaos(self) -> None:
        http = Http(self.w.socket)
        actions = {
            "stop": self.stop_and_start,
            "kill": self.kill_qemu,
            "stop -F race": self.stop_force_race,
            "start x4": self.start_race,
            "daemon kill": self.daemon_kill,
        }
        turn = 0
        while time.monotonic() < self.deadline - 10:
            await asyncio.sleep(1)
            name = CHAOS[turn % len(CHAOS)]  # each in turn, on a random VM
            turn += 1
            uuid = random.choice(self.real)
            self.unsettled.add(uuid)
            try:
                await actions[name](http, uuid)
                self.report.chaos[name] += 1
                await self.answering(http, uuid)
            finally:
                self.unsettled.discard(uuid)
        http.close()

    async def stop(self, http: Http, uuid: str, timeout: float) -> float | None:
        """A graceful stop; its deadline (epoch seconds) when accepted."""
        status, body = await self.call(http, "stop", "POST",
                                       f"/vm/{uuid}?action=stop&timeout={timeout:g}",
                                       uuid)  # fmt: skip
        if status != 202:
            return None
        return float(json.loads(body)["transition"]["expire"]) / 1000

    async def ended(self, uuid: str, give_up: float = 30) -> float | None:
        """When the VM's qemu exited (epoch seconds): taken by a thread blocked
        on its pidfd, so a busy event loop here does not make it late."""
        pid = await asyncio.to_thread(self.layer.pid, uuid)
        if pid is None:
            return time.time()
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return time.time()

        def wait() -> float | None:
            try:
                return time.time() if proc.pidfd_wait(pidfd, give_up) else None
            finally:
                os.close(pidfd)

        end = await asyncio.to_thread(wait)
        if end is None:
            self.report.error("stop did not end the VM in 30 s")
        return end

    def landed(self, deadline: float | None, end: float | None) -> None:
        if deadline is None or end is None:
            return
        late = end - deadline
        self.report.lateness.append(late)
        if late > LATE_LIMIT:
            self.report.error(f"forced stop landed more than {LATE_LIMIT:g} s late",
                              f"{late:.3f} s")  # fmt: skip

    async def start(self, uuid: str) -> bool:
        """Start with the VM layer (as `vmadm start`); False when it was running."""
        try:
            await asyncio.to_thread(self.layer.start, uuid)
        except VmadmError as err:
            if err.code in ("WrongState", "VmBusy"):
                return False
            self.report.error("start failed", str(err))
            return False
        return True

    async def stop_and_start(self, http: Http, uuid: str) -> None:
        deadline = await self.stop(http, uuid, 1)
        self.landed(deadline, await self.ended(uuid))
        await self.start(uuid)  # at once: racing the daemon's handling of the exit

    async def kill_qemu(self, http: Http, uuid: str) -> None:
        pid = await asyncio.to_thread(self.layer.pid, uuid)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await self.ended(uuid)
        await self.start(uuid)

    async def stop_force_race(self, http: Http, uuid: str) -> None:
        await self.stop(http, uuid, 5)
        try:
            await asyncio.to_thread(self.layer.halt, uuid)
        except VmadmError as err:
            self.report.error("stop -F failed", str(err))
        await self.ended(uuid)
        await self.start(uuid)

    async def start_race(self, http: Http, uuid: str) -> None:
        try:
            await asyncio.to_thread(self.layer.halt, uuid)
        except VmadmError as err:
            self.report.error("stop -F failed", str(err))
        booted = await asyncio.gather(*(self.start(uuid) for _ in range(4)))
        if sum(booted) != 1:
            self.report.error("a start race did not boot the VM exactly once", str(booted))

    async def daemon_kill(self, http: Http, uuid: str) -> None:
        # The new daemon must force this stop at its deadline, which it is
        # up before (the restart and its sweep take ~1 s on a busy host).
        deadline = await self.stop(http, uuid, 5)
        self.down.set()
        try:
            old = self.w.daemon
            assert old is not None
            old.kill()
            await asyncio.to_thread(old.wait)
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            await asyncio.to_thread(self.w.start_daemon)
            self.report.latencies["daemon restart"].append(time.monotonic() - t0)
        finally:
            self.restarted = time.monotonic()
            self.down.clear()
        self.landed(deadline, await self.ended(uuid))
        await self.start(uuid)

    async def answering(self, http: Http, uuid: str) -> None:
        """Until the daemon has picked the new qemu up, a 409 is right; then 200."""
        give_up = time.monotonic() + 30
        while time.monotonic() < give_up:
            status, _ = await self.call(http, "GET status", "GET", f"/vm/{uuid}?type=status",
                                        uuid)  # fmt: skip
            if status == 200:
                return
            await asyncio.sleep(0.05)
        self.report.error("VM not answering 30 s after its start")

    async def run(self) -> Report:
        await asyncio.gather(self.chaos(), *(self.client() for _ in range(CLIENTS)))
        return self.report


def soak(seconds: float, n_standins: int, real: int = REAL) -> Report:
    """Run the soak in a world of its own; the report."""
    with world() as w:
        # Timed, not measured: a daemon traced by coverage (when a test runs
        # the soak under pytest --cov) is several times slower.
        w.measured = False
        layer = VmLayer(VmSettings(zones_root=w.zones, accel="tcg", uid_ledger=w.ledger))
        standins = [layer.create({"alias": f"s{i}", "autoboot": False}) for i in range(n_standins)]
        hub = start_hub(w)  # serves every VM present now: the stand-ins
        reals = [layer.create({"alias": f"real{i}", "ram": 64, "autoboot": False})
                 for i in range(real)]  # fmt: skip
        for uuid in reals:
            layer.start(uuid)
        try:
            w.start_daemon()
            give_up = time.monotonic() + 120
            while ping(w)["qmp_ready"] < n_standins + real:
                if time.monotonic() > give_up:
                    raise RuntimeError(f"daemon did not pick up every VM: {ping(w)}")
                time.sleep(0.05)
            time.sleep(1)
            assert w.daemon is not None
            rss0, fds0 = rss_kib(w.daemon.pid), fds(w.daemon.pid)
            report = asyncio.run(Soak(w, layer, reals, standins, seconds).run())
            time.sleep(2)
            assert w.daemon is not None
            # The last daemon's figures (chaos restarts it).
            report.rss_kib = (rss0, rss_kib(w.daemon.pid))
            report.fds = (fds0, fds(w.daemon.pid))
            Client(w.socket).request("GET", "/ping")
        finally:
            w.stop_daemon()
            hub.send_signal(signal.SIGTERM)
            hub.wait(timeout=60)
    return report


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 600
    n_standins = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    report = soak(seconds, n_standins)
    print(f"soak: {seconds:.0f} s, {REAL} real qemu + {n_standins} stand-ins, {CLIENTS} clients")
    print("\n".join(report.lines()))


if __name__ == "__main__":
    main()
