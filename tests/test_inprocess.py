"""The monitor, the supervisor and the VNC console in process, against the stand-in.

No daemon process and no qemu: each test serves one stand-in VM
(``harness.standin.ServedVm``) from its own event loop, over real unix
sockets, with a real holder process standing for qemu (its pidfd is what the
supervisor watches).  Fast and deterministic; the same behaviours are also
tested end to end against real qemu in the other modules.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from harness.standin import ServedVm
from vmadmd.daemon import stopping as stopping_mod
from vmadmd.daemon.ending import ending_of
from vmadmd.daemon.events import EventBus
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.monitor import Monitor, Shutdown, VncClient, shutdown_of
from vmadmd.daemon.settings import DaemonSettings, Shared
from vmadmd.daemon.supervisor import VmSupervisor
from vmadmd.daemon.vncconsole import VncConsole
from vmadmd.errors import QmpConnectionLost, QmpRefused, QmpTimeout
from vmadmd.vm import proc
from vmadmd.vm.cgroup import Cgroups
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import iso_now
from vmadmd.vm.sockets import Peer, bind_unix
from vmadmd.vm.store import Store

UUID = "5d2c6a48-33a4-4d5e-9d70-0c0f3c7b1a01"


class Told:
    """A monitor's owner that writes down what it is told, as (event, data)."""

    def __init__(self, into: list[tuple[str, dict[str, Any]]]) -> None:
        self.into = into

    def on_shutdown(self, shutdown: Shutdown) -> None:
        self.into.append(("shutdown", shutdown._asdict()))

    def on_vnc_client(self, client: VncClient) -> None:
        self.into.append(("vnc_client", client._asdict()))

    def on_lifecycle(self, event: str, data: dict[str, Any]) -> None:
        self.into.append((event, data))

    def on_device_deleted(self, device: str) -> None:
        self.into.append(("device_deleted", {"device": device}))


class Rig:
    """A zones root with one VM record, its stand-in, and the daemon's shared parts."""

    def __init__(self, root: Path) -> None:
        self.store = Store(str(root / "zones"))
        self.paths = self.store.create(UUID, {"uuid": UUID, "alias": "inproc", "vnc_port": 0})
        self.store.update(UUID, lambda vm: vm.update(boot_timestamp=iso_now()))
        self.bus = EventBus()
        self.metrics = Metrics()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.shared = Shared(
            settings=DaemonSettings(
                vm=VmSettings(zones_root=self.store.zones_root), qmp_timeout=1.0
            ),
            store=self.store,
            bus=self.bus,
            metrics=self.metrics,
            connect_slots=asyncio.Semaphore(4),
            spawn=self.spawn,
            cgroups=Cgroups(str(root / "no-cgroups")),  # the stand-in's holder stays put
        )
        self.served: ServedVm | None = None
        self.events: list[tuple[str, dict[str, Any]]] = []

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def serve(self, mode: str = "normal") -> ServedVm:
        self.served = await ServedVm.start(self.paths.runtime_dir, UUID, mode)
        return self.served

    def monitor(self, timeout: float = 1.0, served: ServedVm | None = None) -> Monitor:
        """A monitor of ``served`` (the current stand-in by default), its peer
        checked as the supervisor's is."""
        served = served or self.served
        peer = Peer.of(served.holder.pid) if served is not None else None
        return Monitor(
            UUID, self.paths.runtime_dir, self.paths.QMP_NAME, timeout=timeout,
            events=Told(self.events), metrics=self.metrics, connect_timeout=0.5, peer=peer,
        )  # fmt: skip

    def supervisor(self) -> tuple[VmSupervisor, asyncio.Future[Any]]:
        """A started supervisor, and a future that gets its settled exit."""
        found = proc.open_vm_pidfd(self.paths.pid, UUID)
        assert found is not None, "the stand-in's holder is not taken for the VM"
        settled: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

        def on_exit(sup: VmSupervisor) -> None:
            async def settle() -> None:
                settled.set_result(await sup.settle())

            self.spawn(settle(), "settle")

        sup = VmSupervisor(UUID, *found, self.shared, on_exit)
        sup.start(self.store.load(UUID))
        return sup, settled

    def last_exit(self) -> dict[str, Any]:
        value: dict[str, Any] = self.store.load(UUID)["last_exit"]
        return value

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.served is not None:
            await self.served.close()


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        await r.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- the monitor ---------------------------------------------------------------


class Impostor:
    """A QMP server planted at one of a VM's socket names by someone other
    than its qemu (the VM's user, say): greets like qemu, answers every
    command, and records every byte it is sent."""

    def __init__(self) -> None:
        self.accepted = 0
        self.received = b""
        self.server: asyncio.Server | None = None

    async def start(self, path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.server = await asyncio.start_unix_server(self._serve, sock=bind_unix(path))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        writer.write(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
        with contextlib.suppress(OSError):
            while line := await reader.readline():
                self.received += line
                ident = json.loads(line).get("id")
                writer.write(json.dumps({"return": {}, "id": ident}).encode() + b"\r\n")
        writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_monitor_refuses_a_socket_its_qemu_does_not_serve(rig: Rig) -> None:
    """Finding 1: a QMP server planted at vm.qmp (after a daemon restart, say)
    gets no byte: no capabilities, no VNC password, no fd; the VM's
    commands fail as for an unreachable qemu."""
    await rig.serve()
    impostor = Impostor()
    await impostor.start(rig.paths.qmp)  # replaces the stand-in's socket at that name
    mon = rig.monitor(timeout=0.5)
    mon.start()
    try:
        with pytest.raises(QmpTimeout):
            await mon.set_vnc_password("secret")
        await asyncio.sleep(0.3)  # a few more connection attempts
        assert impostor.accepted >= 1  # it was reached ...
        assert impostor.received == b""  # ... and told nothing
        assert not mon.ready
        assert "not by the VM's qemu" in str(mon.last_error)
    finally:
        impostor.close()
        await mon.close()


async def test_monitor_never_attaches_to_the_next_qemu_of_its_vm(rig: Rig) -> None:
    """Issue "Stops that always end": the VM started again at once binds
    vm.qmp anew; the previous qemu's monitor, reconnecting, must not take
    the new qemu's only QMP slot.  Once told its qemu is gone, it stops
    trying, and commands fail at once with 409, not 504."""
    first = await rig.serve()
    old = rig.monitor(timeout=2.0)
    old.start()
    await until(lambda: old.ready)
    first.kill()
    await first.holder.wait()
    with pytest.raises((QmpConnectionLost, QmpTimeout)):
        await old.query("status")  # the connection broke: it reconnects
    second = await ServedVm.start(rig.paths.runtime_dir, UUID)
    try:
        await asyncio.sleep(0.5)  # reconnection attempts at the new socket
        assert second.vm.commands == []  # not one byte reached the new qemu
        new = rig.monitor(served=second)
        new.start()
        try:
            await until(lambda: new.ready)
            assert (await new.query("status"))["running"] is True
        finally:
            await new.close()
        old.qemu_gone()
        t0 = time.monotonic()
        with pytest.raises(QmpConnectionLost):
            await old.query("status")
        assert time.monotonic() - t0 < 0.2
    finally:
        await old.close()
        await second.close()


async def test_monitor_typed_operations_and_events(rig: Rig) -> None:
    """Each typed operation sends its one command with its arguments, and
    what qemu tells comes back typed (a lifecycle event, how it shut down)."""
    served = await rig.serve()
    mon = rig.monitor()
    mon.start()
    try:
        version = await mon.query("version")
        assert version["qemu"]["major"] == 7
        assert {"getfd", "add_client", "system_powerdown"} <= await mon.query_commands()
        await mon.reset()
        await until(lambda: any(name == "RESET" for name, _ in rig.events))
        await mon.inject_nmi()
        await mon.set_vnc_password("secret")
        await mon.wake_display()
        await mon.powerdown()  # the stand-in's guest obeys: SHUTDOWN (guest)
        await until(lambda: any(name == "shutdown" for name, _ in rig.events))
    finally:
        await mon.close()
    sent = list(zip(served.vm.commands, served.vm.arguments, strict=True))
    assert sent[0] == ("qmp_capabilities", {})
    assert ("system_reset", {}) in sent
    assert ("inject-nmi", {}) in sent
    assert ("set_password", {"protocol": "vnc", "password": "secret"}) in sent
    assert ("send-key", {"keys": [{"type": "qcode", "data": "shift"}]}) in sent
    assert ("system_powerdown", {}) in sent
    shutdown = next(data for name, data in rig.events if name == "shutdown")
    assert shutdown == {"cause": "guest", "detail": "guest-shutdown"}
    assert rig.metrics.qmp_commands.labels("query-version", "ok").value == 1


async def test_monitor_refusal_is_typed_with_qemus_class(rig: Rig) -> None:
    await rig.serve("error")
    mon = rig.monitor()
    mon.start()
    try:
        with pytest.raises(QmpRefused) as caught:
            await mon.query("status")
        assert caught.value.error_class == "GenericError"
        assert "stand-in says no" in caught.value.desc
        assert mon.ready  # a refusal leaves the connection as it was
    finally:
        await mon.close()


async def test_monitor_stalled_peer_times_out_and_is_dropped(rig: Rig) -> None:
    await rig.serve("stall")
    mon = rig.monitor(timeout=0.3)
    mon.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(QmpTimeout):
            await mon.query("version")
        assert time.monotonic() - t0 < 1.0
        assert mon.last_error is not None
        assert "timed out" in mon.last_error
        # Reconnected in the background (the stall only starts after the
        # first command), and the next command is bounded again.
        with pytest.raises(QmpTimeout):
            await mon.query("version")
    finally:
        await mon.close()


async def test_monitor_others_in_flight_on_a_stalled_peer_time_out_too(rig: Rig) -> None:
    """One command's timeout drops a stalled connection: the others still
    awaiting an answer on it were not answered either (504, not 409)."""
    await rig.serve("stall")
    mon = rig.monitor(timeout=5.0)
    mon.start()
    try:
        for _ in range(200):  # connected: the stall starts after the handshake
            if mon.ready:
                break
            await asyncio.sleep(0.01)
        slow = asyncio.create_task(mon.query("version"))  # its own deadline is 5 s away
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        with pytest.raises(QmpTimeout):
            await mon.query_commands(timeout=0.3)
        with pytest.raises(QmpTimeout, match="did not answer query-version"):
            await slow
        assert time.monotonic() - t0 < 1.5
    finally:
        await mon.close()


async def test_monitor_garbage_breaks_the_connection_not_the_caller(rig: Rig) -> None:
    await rig.serve("garbage")
    mon = rig.monitor(timeout=0.5)
    mon.start()
    try:
        with pytest.raises((QmpConnectionLost, QmpTimeout)) as caught:
            await mon.query("version")
        assert not isinstance(caught.value, QmpRefused)
    finally:
        await mon.close()


async def test_monitor_half_greeting_never_connects(rig: Rig) -> None:
    await rig.serve("half")
    mon = rig.monitor(timeout=0.4)
    mon.start()
    try:
        with pytest.raises(QmpTimeout, match="no QMP connection"):
            await mon.query("version")
        assert not mon.ready
    finally:
        await mon.close()


async def test_monitor_batch_one_refused_the_others_answered(rig: Rig) -> None:
    """Pipelined queries: qemu refusing one costs only that one."""
    await rig.serve("nopci")
    mon = rig.monitor()
    mon.start()
    try:
        version, pci, status = await mon.query_all(["version", "pci", "status"])
        assert version["qemu"]["major"] == 7
        assert isinstance(pci, QmpRefused)
        assert pci.desc == "no PCI here"
        assert status["status"] == "running"
        assert mon.ready  # the connection stays
        assert (await mon.query("version"))["qemu"]["major"] == 7
    finally:
        await mon.close()
    metric = rig.metrics.qmp_commands
    assert metric.labels("query-pci", "error").value == 1
    assert metric.labels("query-status", "ok").value == 1


async def test_monitor_batch_stalled_times_out_whole_and_bounded(rig: Rig) -> None:
    """A stall mid-batch: every unanswered query is a timeout at the one
    deadline (not one deadline per query), and the connection is dropped."""
    await rig.serve("stall")
    mon = rig.monitor(timeout=0.3)
    mon.start()
    try:
        t0 = time.monotonic()
        results = await mon.query_all(["version", "kvm", "cpus", "pci"])
        assert time.monotonic() - t0 < 0.6
        assert all(isinstance(r, QmpTimeout) for r in results), results
        assert mon.last_error is not None
        assert "timed out" in mon.last_error
    finally:
        await mon.close()
    assert rig.metrics.qmp_timeouts.labels().value == 4


async def test_monitor_batch_on_garbage_fails_every_query_typed(rig: Rig) -> None:
    await rig.serve("garbage")
    mon = rig.monitor(timeout=0.5)
    mon.start()
    try:
        results = await mon.query_all(["version", "kvm", "status"])
        assert all(isinstance(r, (QmpConnectionLost, QmpTimeout)) for r in results), results
    finally:
        await mon.close()


async def test_monitor_closed_fails_at_once(rig: Rig) -> None:
    await rig.serve()
    mon = rig.monitor()
    mon.start()
    await mon.query("version")
    await mon.close()
    t0 = time.monotonic()
    with pytest.raises(QmpConnectionLost):
        await mon.query("version")
    assert time.monotonic() - t0 < 0.1


async def test_monitor_hands_a_client_to_qemu(rig: Rig) -> None:
    await rig.serve()
    mon = rig.monitor()
    mon.start()
    ours, theirs = socket.socketpair()
    try:
        await until(lambda: mon.ready)
        # Commands in flight around the handoff: the fd waits for them.
        queries = [asyncio.create_task(mon.query("status")) for _ in range(5)]
        assert await mon.add_vnc_client(theirs.fileno(), timeout=1.0)
        await asyncio.gather(*queries)
        theirs.close()
        # The stand-in serves from this loop: read without blocking it.
        reader, writer = await asyncio.open_connection(sock=ours)
        assert await asyncio.wait_for(reader.readexactly(12), 2) == b"RFB 003.008\n"
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 2) == b"ping"
        writer.close()
    finally:
        ours.close()
        await mon.close()


@pytest.mark.parametrize("mode", ["yes", "nofds", "error", "refuseadd"])
async def test_monitor_does_not_hand_off_where_qemu_cannot_take_it(rig: Rig, mode: str) -> None:
    """Told apart from an unknown outcome: the caller may serve the client
    another way.  Nothing is left registered in qemu (refuseadd: getfd took
    the fd, add_client refused it, closefd let it go) and QMP goes on."""
    served = await rig.serve(mode)
    mon = rig.monitor()
    mon.start()
    ours, theirs = socket.socketpair()
    try:
        await until(lambda: mon.ready)
        assert not await mon.add_vnc_client(theirs.fileno(), timeout=1.0)
        assert served.vm.named_fds == {}
        assert mon.ready
        sent = served.vm.commands
        assert "query-commands" in sent
        if mode in ("yes", "error"):
            # qemu cannot say it has getfd and add_client: nothing is passed.
            assert "getfd" not in sent
        elif mode == "nofds":
            # The fd never reached qemu: getfd fails, add_client is refused.
            assert sent[-2:] == ["getfd", "add_client"]
        else:  # refuseadd: getfd took the fd, add_client refused it, closefd let it go
            assert sent[-3:] == ["getfd", "add_client", "closefd"]
            assert rig.metrics.qmp_commands.labels("closefd", "ok").value == 1
    finally:
        ours.close()
        theirs.close()
        await mon.close()


# -- the supervisor: how a VM ends -----------------------------------------------


async def test_stop_obeyed_by_the_guest(rig: Rig) -> None:
    await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    t0 = time.time()
    pending = await sup.request_stop(30, "stopped")
    assert abs(pending.expire_ms / 1000 - (t0 + 30)) < 1
    assert sup.state == "stopping"
    cleared, ending = await asyncio.wait_for(settled, 5)
    assert cleared is not None
    assert cleared.to == "stopped"
    assert ending is not None
    assert ending.fields() == {"reason": "stop", "stage": "acpi"}
    assert rig.last_exit()["reason"] == "stop"
    assert rig.last_exit()["stage"] == "acpi"
    assert "transition" not in rig.store.load(UUID)


async def test_stop_forced_at_the_deadline_by_quit(rig: Rig) -> None:
    await rig.serve("ignore_acpi")
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    pending = await sup.request_stop(0.3, "start")
    await asyncio.wait_for(settled, 5)
    late = time.time() - pending.expire_ms / 1000
    assert 0 <= late < 1.0
    assert rig.last_exit() | {"time": 0} == {"reason": "stop", "stage": "quit", "time": 0}


async def test_stop_forced_by_sigterm_when_qmp_stalls(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stopping_mod, "QUIT_WAIT", 0.2)
    await rig.serve("stall")
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    await sup.request_stop(0.2, "stopped")  # powerdown is not answered: bounded
    await asyncio.wait_for(settled, 8)
    assert rig.last_exit()["stage"] == "sigterm"


async def test_a_stop_is_forced_at_its_deadline_with_no_qmp_at_all(rig: Rig) -> None:
    """A deadline is a deadline: with no QMP connection ever (half a greeting,
    then silence) the stop is still forced on time, by signal, without
    waiting for a `quit` that cannot be sent."""
    await rig.serve("half")
    sup, settled = rig.supervisor()
    pending = await sup.request_stop(0.5, "stopped")
    await asyncio.wait_for(settled, 8)
    late = time.time() - pending.expire_ms / 1000
    assert 0 <= late < 1.0, f"forced {late:.2f} s after its deadline"
    assert rig.last_exit()["stage"] == "sigterm"


async def test_a_stop_is_not_queued_behind_a_stuck_operation(rig: Rig) -> None:
    """A stop is accepted, and forced on time, while another operation holds
    the VM (a user's command waiting on a wedged qemu, here the lock held)."""
    await rig.serve("ignore_acpi")
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    await sup.lock.acquire()
    try:
        pending = await asyncio.wait_for(sup.request_stop(0.3, "stopped"), 2)
        await asyncio.wait_for(settled, 5)
    finally:
        sup.lock.release()
    assert 0 <= time.time() - pending.expire_ms / 1000 < 1.0
    assert rig.last_exit()["stage"] == "quit"


async def test_a_hostile_qemu_costs_bounded_memory_and_forges_nothing(rig: Rig) -> None:
    """The review: a qemu taken over by its guest sends 1 MiB events (they
    were kept whole in the event history), a VNC client with terminal
    escapes, and a SHUTDOWN whose reason (kept as last_exit's stage, printed
    by `vmadm stop --all`) is an escape sequence."""
    from vmadmd.vm.ending import Ending

    await rig.serve("hostile")
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    await sup.nmi()
    await asyncio.wait_for(settled, 5)
    kept = [e.as_dict() for e in rig.bus.since(0) if e.type == "qmp_event"]
    assert any(e["event"] == "RESET" for e in kept), kept
    assert all(len(json.dumps(e)) < 8192 for e in kept)
    last = Ending.of(rig.store.load(UUID))
    assert last is not None
    assert last.fields() == {"reason": "stop", "stage": "unknown", "by": "host"}
    assert all(c.isprintable() for c in last.words())


async def test_guest_poweroff_with_no_stop_pending(rig: Rig) -> None:
    await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    await sup.monitor.powerdown()  # as if the guest powered itself off
    assert (await asyncio.wait_for(settled, 5)).cleared is None
    assert rig.last_exit()["reason"] == "poweroff"


async def test_a_qemu_killed_by_a_signal_is_a_crash(rig: Rig) -> None:
    served = await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    served.kill(signal.SIGSEGV)
    await asyncio.wait_for(settled, 5)
    assert rig.last_exit()["reason"] == "crash"
    crashes = rig.metrics.vm_exits.labels("crash", "").value
    assert crashes == 1


def _existing(paths: list[str]) -> list[str]:
    return [path for path in paths if os.path.isdir(path)]


async def _running_with_cgroup(rig: Rig) -> tuple[ServedVm, asyncio.Future[Any], list[str]]:
    """A supervised stand-in VM whose (fake) cgroup directories exist."""
    served = await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    dirs = list(rig.shared.cgroups.dirs(UUID).values())
    for path in dirs:
        os.makedirs(path)
    return served, settled, dirs


async def test_exit_cleanup_removes_the_cgroup(rig: Rig) -> None:
    served, settled, dirs = await _running_with_cgroup(rig)
    served.kill()
    await asyncio.wait_for(settled, 5)
    assert _existing(dirs) == []


async def test_exit_cleanup_spares_a_vm_started_again_meanwhile(rig: Rig) -> None:
    """A start that lands before the daemon has cleaned up after the
    previous qemu (found by the soak: `vmadm stop` then an immediate start
    lost the new qemu's cgroup, and its taps) keeps what it made."""
    served, settled, dirs = await _running_with_cgroup(rig)
    # Hold the VM's lock as `vmadm start` does while it boots the VM again.
    lock = rig.store.try_lock(UUID)
    assert lock is not None
    again = None
    try:
        served.kill()
        await until(lambda: served.holder.returncode is not None)
        again = await ServedVm.start(rig.paths.runtime_dir, UUID)  # the new "qemu"
    finally:
        os.close(lock)
    try:
        await asyncio.wait_for(settled, 5)
        assert rig.last_exit()["reason"] == "crash"
        assert _existing(dirs) == dirs  # the new qemu's, kept
    finally:
        if again is not None:
            await again.close()


async def test_a_qemu_with_no_waiter_is_settled_without_waiting_for_one(rig: Rig) -> None:
    """No waiter (a qemu the previous version started; the stand-in): its
    status is not waited for (it was a second per exit before)."""
    served = await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    t0 = time.monotonic()
    served.kill(signal.SIGKILL)
    await asyncio.wait_for(settled, 5)
    assert time.monotonic() - t0 < 0.5
    last = rig.last_exit()
    assert last["reason"] == "crash"
    assert "signal" not in last  # which one is not known without a waiter


async def test_a_waiters_status_written_late_is_waited_for(rig: Rig) -> None:
    served = await rig.serve()
    status = Path(rig.paths.zonepath) / "qemu.exit"
    status.write_bytes(b"")  # as the launcher leaves it for the waiter
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    served.kill(signal.SIGKILL)
    await asyncio.sleep(0.2)
    assert not settled.done()
    status.write_text(f"{128 + signal.SIGSYS}\n")
    await asyncio.wait_for(settled, 5)
    last = rig.last_exit()
    assert (last["reason"], last["signal"]) == ("crash", "SIGSYS")


async def test_a_guest_panic_is_told_apart(rig: Rig) -> None:
    await rig.serve("panic_on_nmi")
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    await sup.nmi()
    await asyncio.wait_for(settled, 5)
    assert rig.last_exit()["reason"] == "panic"
    assert any(e.type == "exited" and e.data.get("reason") == "panic" for e in rig.bus.since(0))


async def test_an_ending_already_recorded_for_this_boot_is_kept(rig: Rig) -> None:
    served = await rig.serve()
    sup, settled = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    # `vmadm stop -F` records its own ending (under the lock) as it kills.
    rig.store.update(UUID, lambda vm: vm.update(
        last_exit={"reason": "stop", "stage": "sigkill", "time": iso_now()}))  # fmt: skip
    served.kill()
    await asyncio.wait_for(settled, 5)
    assert rig.last_exit()["stage"] == "sigkill"


def test_ending_rules() -> None:
    def ending(shutdown: dict[str, Any] | None, *args: Any) -> dict[str, Any]:
        told = shutdown_of(shutdown) if shutdown is not None else None
        return ending_of(told, *args).fields()

    guest = {"guest": True, "reason": "guest-shutdown"}
    assert ending(guest, None, False) == {"reason": "poweroff"}
    assert ending(guest, None, True) == {"reason": "stop", "stage": "acpi"}
    assert ending(None, "sigkill", True) == {"reason": "stop", "stage": "sigkill"}
    assert ending({"guest": True, "reason": "guest-panic"}, "quit", True)["reason"] == "panic"
    assert ending(None, None, False)["reason"] == "crash"
    quit_by_host = ending({"guest": False, "reason": "host-qmp-quit"}, None, False)
    assert quit_by_host == {"reason": "stop", "stage": "quit", "by": "host"}
    by_signal = ending({"guest": False, "reason": "host-signal"}, None, False)
    assert by_signal == {"reason": "stop", "stage": "sigterm", "by": "host"}
    odd = ending({"guest": False, "reason": "host-ui"}, None, False)
    assert odd == {"reason": "stop", "stage": "host-ui", "by": "host"}
    # With the wait status qemu's waiter recorded: which signal, which status;
    # a clean exit whose SHUTDOWN went unseen is the guest's own.
    assert ending(None, None, False, 128 + 31) == {"reason": "crash", "signal": "SIGSYS"}
    assert ending(None, None, False, 1) == {"reason": "crash", "status": 1}
    assert ending(None, None, False, 0) == {"reason": "poweroff"}
    assert ending(None, None, True, 0) == {"reason": "stop", "stage": "acpi"}


# -- the VNC console -------------------------------------------------------------


async def test_upstream_connect_rides_out_qemu_binding_vm_vnc_anew(tmp_path: Path) -> None:
    """display-update makes qemu unlink vm.vnc and bind it again: a console
    connection that lands in between is tried again, briefly."""
    from vmadmd.daemon.vnc import connect_upstream
    from vmadmd.vm.sockets import bind_unix

    async def bind_later() -> socket.socket:
        await asyncio.sleep(0.02)
        return bind_unix(str(tmp_path / "vm.vnc"))

    binder = asyncio.create_task(bind_later())
    sock = await connect_upstream(str(tmp_path), "vm.vnc", None)  # nothing there yet
    sock.close()
    (await binder).close()
    os.unlink(tmp_path / "vm.vnc")
    t0 = time.monotonic()
    with pytest.raises(FileNotFoundError):  # nothing comes: the error stands, soon
        await connect_upstream(str(tmp_path), "vm.vnc", None)
    assert time.monotonic() - t0 < 0.5


@pytest.mark.parametrize("relay", ["listen", "handoff", "proxy"])
async def test_console_serves_clients_and_closes(rig: Rig, relay: str) -> None:
    await rig.serve()
    mon = rig.monitor()
    mon.start()
    gone = asyncio.Event()
    console = VncConsole(
        UUID, rig.paths, mon, bind="127.0.0.1", relay=relay, qmp_timeout=1.0,
        qemu_auth=False, bus=rig.bus, metrics=rig.metrics, gone=gone.is_set,
    )  # fmt: skip
    try:
        await until(lambda: mon.ready)
        await console.open(rig.store.load(UUID))
        info = console.info()
        assert info["host"] == "127.0.0.1"
        assert info["port"] > 0
        reader, writer = await asyncio.open_connection("127.0.0.1", info["port"])
        assert await asyncio.wait_for(reader.readexactly(12), 2) == b"RFB 003.008\n"
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 2) == b"hello"
        writer.close()
        if relay == "listen":  # the stand-in accepted it on the socket it was given
            assert console.listener is not None
            assert console.listener.in_qemu
            assert rig.metrics.vnc_clients.labels("handed_off").value == 0
        else:
            outcome = "handed_off" if relay == "handoff" else "proxied"
            assert rig.metrics.vnc_clients.labels(outcome).value == 1
        # A password qemu was not started for: the console stays closed.
        record = rig.store.load(UUID) | {"vnc_password": "pw"}
        assert "error" in await console.reload(record)
        with pytest.raises(ConnectionRefusedError):  # qemu's listener closed too
            await asyncio.open_connection("127.0.0.1", info["port"])
    finally:
        await console.close()
        await mon.close()
    assert console.info() == {}
    events = [json.dumps(e.as_dict()) for e in rig.bus.since(0)]
    assert any('"vnc_up"' in e for e in events)
    assert any('"vnc_down"' in e for e in events)


def test_pid_of_a_stand_in_is_identity_checked(tmp_path: Path) -> None:
    """The holder trick relies on the identity check reading argv: keep it honest."""
    pid_path = tmp_path / "vm.pid"
    pid_path.write_text(f"{os.getpid()}\n")
    assert proc.find_vm_pid(str(pid_path), UUID) is None


# -- the event bus -----------------------------------------------------------------


def test_event_bus_says_when_history_was_lost() -> None:
    from vmadmd.daemon.events import EventBus

    bus = EventBus(history=4)
    for i in range(10):
        bus.emit("tick", None, n=i)
    assert bus.gap(last_id=2) == (3, 6)  # ids 7-10 are still held
    assert bus.gap(last_id=6) is None
    assert [e.id for e in bus.since(6)] == [7, 8, 9, 10]


def test_event_bus_rate_limits_a_noisy_vm_alone() -> None:
    from vmadmd.daemon import events

    bus = events.EventBus()
    passed = sum(bus.emit_limited("RESET", "qmp_event", "vm-a") for _ in range(100))
    assert passed == int(events.RATE_BURST)
    assert bus.emit_limited("RESET", "qmp_event", "vm-b"), "another VM is not held back"
    assert bus.emit_limited("SHUTDOWN", "qmp_event", "vm-a"), "another kind is not either"
    time.sleep(1.1 / events.RATE_PER_SECOND)
    assert bus.emit_limited("RESET", "qmp_event", "vm-a")
    last = [e for e in bus.since(0) if e.vm == "vm-a"][-1]
    assert last.data["suppressed"] == 100 - int(events.RATE_BURST)


async def test_console_caps_sessions_and_handoffs_and_reaps_idle_relays(rig: Rig) -> None:
    from vmadmd.daemon.vnc import VncListener

    await rig.serve("stallfds")  # hand-offs never complete: they stay pending
    mon = rig.monitor(timeout=5.0)
    mon.start()
    await until(lambda: mon.ready)
    relay = VncListener(UUID, rig.paths.runtime_dir, "vm.vnc", "127.0.0.1", 0, rig.metrics,
                        max_sessions=2, idle_timeout=0.4)  # fmt: skip
    handing = VncListener(UUID, rig.paths.runtime_dir, "vm.vnc", "127.0.0.1", 0, rig.metrics,
                          functools.partial(mon.add_vnc_client, timeout=5.0),
                          lambda: os.stat(rig.paths.vnc).st_ino, max_pending=2)  # fmt: skip
    try:
        assert await relay.open()
        assert await handing.open()
        streams = [await asyncio.open_connection("127.0.0.1", relay.port) for _ in range(3)]
        for reader, _ in streams[:2]:
            assert await asyncio.wait_for(reader.readexactly(12), 2) == b"RFB 003.008\n"
        assert await asyncio.wait_for(streams[2][0].read(), 2) == b"", "the third is refused"
        # Idle relays are let go (no byte either way for 0.4 s).
        for reader, _ in streams[:2]:
            assert await asyncio.wait_for(reader.read(), 3) == b""
        assert not relay.sessions
        # Hand-offs: two pending (qemu does not answer), the third refused at once.
        pending = [await asyncio.open_connection("127.0.0.1", handing.port) for _ in range(2)]
        await until(lambda: len(handing._pending) == 2)
        reader, _ = await asyncio.open_connection("127.0.0.1", handing.port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert rig.metrics.vnc_clients.labels("refused").value == 2
        for _, writer in [*streams, *pending]:
            writer.close()
    finally:
        await relay.close()
        await handing.close()
        await mon.close()


async def test_info_returns_what_answered_and_the_error_of_what_did_not(rig: Rig) -> None:
    await rig.serve("nopci")
    sup, _ = rig.supervisor()
    await until(lambda: sup.monitor.ready)
    out = await sup.info(["version", "pci", "status"])
    assert out["version"]["qemu"]["major"] == 7
    assert out["status"]["status"] == "running"
    assert out["pci"]["error"]["code"] == "QmpRefused"
    assert "no PCI here" in out["pci"]["error"]["message"]
    # Only when nothing answered is the failure the answer.
    with pytest.raises(QmpRefused):
        await sup.info(["pci"])


def test_crash_log_backs_off_then_gives_up() -> None:
    from vmadmd.daemon.ending import CrashLog
    from vmadmd.daemon.settings import CrashRestart

    log = CrashLog(CrashRestart(delay=1.0, max_delay=3.0, limit=3, window=100.0))
    assert log.crashed(UUID, 0.0) == (1, 1.0)
    assert log.crashed(UUID, 1.0) == (2, 2.0)
    assert log.crashed(UUID, 2.0) == (3, 3.0)  # doubled, but capped
    assert log.crashed(UUID, 3.0) == (4, None)  # one too many within the window
    assert log.crashed("other", 3.0) == (1, 1.0), "counted per VM"
    assert log.crashed(UUID, 150.0) == (1, 1.0), "old crashes leave the window"


async def test_api_holds_vm_states_until_the_start_up_sweep(rig: Rig) -> None:
    """Before the sweep reaches a running VM it would read as stopped: the API
    answers /ping at once and holds /vms (and the other VM routes) until the
    sweep is done, so no client is told a running VM is stopped."""
    from vmadmd.daemon.api import Api
    from vmadmd.daemon.http import Request
    from vmadmd.daemon.manager import Manager

    await rig.serve()
    vm = VmSettings(zones_root=rig.store.zones_root, cgroup_root=rig.shared.cgroups.root)
    manager = Manager(DaemonSettings(vm=vm, qmp_timeout=1.0), rig.bus, rig.metrics)
    api = Api(manager, rig.bus, dict, rig.metrics)

    async def get(path: str, query: str = "") -> tuple[int, Any]:
        route, match, allowed = api.resolve("GET", path)
        reply = await api.dispatch(Request("GET", path, query, {}, b"", match), route, allowed)
        return reply.status, json.loads(reply.body)

    try:
        assert (await asyncio.wait_for(get("/ping"), 5))[0] == 200
        assert manager.state(UUID) == "stopped"  # what /vms would say now
        listing = asyncio.ensure_future(get("/vms"))
        await asyncio.sleep(0.2)
        assert not listing.done()
        # A request for one VM does not wait for the whole sweep: its VM is
        # picked up for it (and only once: the sweep finds it done).
        status, info = await asyncio.wait_for(get(f"/vm/{UUID}", "type=version"), 5)
        assert status == 200
        assert "version" in info
        sup = manager.vms[UUID]
        assert not listing.done()
        await manager.startup.run()
        assert manager.vms[UUID] is sup
        status, vms = await asyncio.wait_for(listing, 5)
        assert status == 200
        assert [(vm["uuid"], vm["state"]) for vm in vms] == [(UUID, "running")]
        # Once swept, nothing waits.
        assert (await asyncio.wait_for(get("/vms"), 1))[0] == 200
    finally:
        await manager.close()


async def test_a_command_does_not_queue_behind_other_vms_start_up_connects(rig: Rig) -> None:
    """A daemon restarting with a thousand VMs connects their monitors a
    bounded number at a time; a command for one VM connects its monitor at
    once instead of waiting for a slot (here: none is ever free)."""
    served = await rig.serve()
    mon = Monitor(
        UUID, rig.paths.runtime_dir, rig.paths.QMP_NAME, timeout=2.0, events=Told(rig.events),
        metrics=rig.metrics, connect_slots=asyncio.Semaphore(0), peer=Peer.of(served.holder.pid),
    )  # fmt: skip
    mon.start()
    try:
        await asyncio.sleep(0.3)
        assert not mon.ready  # queued for a slot
        assert (await mon.query("status"))["running"] is True
        assert mon.ready
    finally:
        await mon.close()


def test_listen_table_reads_once_for_callers_that_ask_together() -> None:
    """Adopting a VNC port reads the host's TCP table; a thousand VMs picked
    up at once share reads, and a read never predates the question."""
    from concurrent.futures import ThreadPoolExecutor

    from vmadmd.daemon.vnc import ListenTable, listens_on

    table = ListenTable()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert table.inodes(port) == set()  # bound, not listening
        s.listen()
        # A read that began after the socket listened sees it.
        assert len(table.inodes(port)) == 1
        assert listens_on(os.getpid(), port, table)
        assert not listens_on(1, port, table)  # held by this process, not by init
        reads = table.reads
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda _: listens_on(os.getpid(), port, table), range(200)))
        assert all(found)
        assert table.reads - reads < 200


async def test_a_sweep_that_never_ends_holds_requests_for_a_bounded_time(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vmadmd.daemon import manager as manager_mod
    from vmadmd.daemon import sweep
    from vmadmd.daemon.api import Api
    from vmadmd.daemon.http import Request

    monkeypatch.setattr(sweep, "SWEEP_WAIT", 0.3)
    vm = VmSettings(zones_root=rig.store.zones_root, cgroup_root=rig.shared.cgroups.root)
    manager = manager_mod.Manager(DaemonSettings(vm=vm), rig.bus, rig.metrics)
    api = Api(manager, rig.bus, dict, rig.metrics)
    route, match, allowed = api.resolve("GET", "/vms")
    try:
        t0 = time.monotonic()
        reply = await asyncio.wait_for(
            api.dispatch(Request("GET", "/vms", "", {}, b"", match), route, allowed), 5
        )
        assert reply.status == 200
        assert 0.3 <= time.monotonic() - t0 < 3
    finally:
        await manager.close()
