"""The registry of running VMs: uuid -> ``VmSupervisor``, and the cross-VM work.

It learns about VMs from inotify (see ``watch``) and from each supervisor's
pidfd, never by polling: ``refresh`` brings the view of one VM in line with
what is on disk and in ``/proc`` (attach a qemu it does not hold yet, settle
a transition whose qemu went away while no daemon watched).  Everything
done to one VM is its supervisor's; what spans VMs (the start-up sweep,
booting, what the API lists) is here.  Disk writes and flock waits run in
worker threads so the loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from vmadmd.daemon.ending import CrashLog, Settled, settle_record
from vmadmd.daemon.events import EventBus
from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.migration import Migrations
from vmadmd.daemon.settings import DaemonSettings, Shared
from vmadmd.daemon.snapshots import SnapshotService
from vmadmd.daemon.stats import VmStatsCollector
from vmadmd.daemon.supervisor import VmSupervisor
from vmadmd.daemon.sweep import StartupSweep, in_batches
from vmadmd.errors import StartFailed, VmadmError, VmBroken, VmBusy, WrongState
from vmadmd.vm import migrating, transition
from vmadmd.vm.bootopts import BootOptions
from vmadmd.vm.layer import VmLayer, running_pidfd, state_of
from vmadmd.vm.sockets import Peer
from vmadmd.vm.store import VmRecord

log = logging.getLogger("vmadmd.manager")

CONNECT_CONCURRENCY = 64  # QMP connects in flight at once (start-up with many VMs)


class Manager:
    def __init__(self, settings: DaemonSettings, bus: EventBus, metrics: Metrics) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.layer = VmLayer(settings.vm)
        self.store = self.layer.store
        self.vms: dict[str, VmSupervisor] = {}
        # VMs whose qemu exited and whose exit is being settled: a refresh
        # must not settle it a second time.
        self._exiting: set[str] = set()
        self._restarts = CrashRestarts(self, CrashLog(settings.crash_restart))
        # VMs whose vm.json could not be read the last time it was looked at.
        self._broken: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.closing = False
        # Until the start-up sweep has looked at a VM, a running one would
        # read as stopped: the API holds what depends on it (Api._gate).
        self.startup = StartupSweep(
            self.refresh_safely, self.store.list_uuids, self._has_transition
        )
        self._shared = Shared(
            settings=settings,
            store=self.store,
            bus=bus,
            metrics=metrics,
            connect_slots=asyncio.Semaphore(CONNECT_CONCURRENCY),
            spawn=self._spawn,
            cgroups=self.layer.cgroups,
        )
        metrics.watch_state(self._state_snapshot)
        self.snapshots = SnapshotService(self)
        self.migrations = Migrations(self, settings.migration)
        self.stats = VmStatsCollector(lambda: [sup.stats_state for sup in self.vms.values()])
        metrics.add_collector(self.stats)

    # -- helpers -----------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def load(self, uuid: str) -> VmRecord:
        """The VM's record; VmNotFound / VmBroken / InvalidUuid as appropriate."""
        return self.store.load(uuid)

    async def running(self, uuid: str) -> VmSupervisor:
        """The supervisor of a running VM, else WrongState (after a 404 check).

        On a miss, look again: a qemu started a moment ago (or while the
        start-up sweep is still going) may not have reached us yet.
        """
        sup = self.vms.get(uuid)
        if sup is None:
            self.load(uuid)
            await self.refresh(uuid)
            sup = self.vms.get(uuid)
            if sup is None:
                raise WrongState(f"VM {uuid} is not running")
        return sup

    def state(self, uuid: str) -> str:
        """The VM's state as the daemon knows it (the one rule: ``state_of``)."""
        sup = self.vms.get(uuid)
        return state_of(sup is not None, sup.transition if sup is not None else None)

    def listing(self) -> list[dict[str, Any]]:
        """Every VM with its state and alias (broken ones with why)."""
        out: list[dict[str, Any]] = []
        for uuid in self.store.list_uuids():
            try:
                record = self.load(uuid)
            except VmadmError as err:
                out.append({"uuid": uuid, "state": "broken", "error": err.message})
                continue
            out.append({"uuid": uuid, "state": self.state(uuid),
                        "alias": record.get("alias")})  # fmt: skip
        return out

    def alias(self, uuid: str) -> str:
        """What a page may call the VM: its alias, else its uuid."""
        return str(self.load(uuid).get("alias") or uuid)

    def vnc_password(self, uuid: str) -> str | None:
        """The password the VM's console asks for now: its own, or the one
        generated for its qemu (the browser console sends it for the user)."""
        sup = self.vms.get(uuid)
        current = sup.console.password() if sup is not None else None
        return current or self.load(uuid).get("vnc_password") or None

    def connection_counts(self) -> dict[str, int]:
        """How far the daemon is in picking up its running VMs."""
        return connection_counts(self.vms.values())

    def _state_snapshot(self) -> dict[str, float]:
        return {
            **state_counts(self.vms.values(), len(self.store.list_uuids()), len(self._broken)),
            "event_subscribers": self.bus.subscribers,
        }

    # -- discovery ---------------------------------------------------------

    async def scan_all(self) -> list[str]:
        """``scan`` every VM in the zones root; returns their uuids."""
        uuids = self.store.list_uuids()
        await self.scan(uuids)
        return uuids

    def running_uuids(self) -> set[str]:
        return set(self.vms)

    async def scan(self, uuids: Iterable[str]) -> None:
        """Pick up every VM: attach running ones, settle stale transitions."""
        await in_batches(self.refresh_safely, uuids)

    def _has_transition(self, uuid: str) -> bool:
        try:
            return bool(self.load(uuid).get(transition.KEY))
        except VmadmError:
            return False

    async def refresh_safely(self, uuid: str) -> None:
        """refresh(), with a failure confined to its VM (logged as the bug it is)."""
        try:
            await self.refresh(uuid)
        except Exception:
            vm_log(log, uuid).exception("cannot pick up this VM")

    async def refresh(self, uuid: str) -> None:
        """Bring our view of one VM in line with reality.  Idempotent."""
        if self.closing:
            return
        if uuid in self._exiting:
            return  # its pidfd has told us it exited
        sup = self.vms.get(uuid)
        if sup is not None:
            # Its pidfd tells us when it exits; a changed alias is still news.
            with contextlib.suppress(VmadmError):
                sup.learn(self.load(uuid))
            return
        try:
            record = self.load(uuid)
        except VmBroken:
            self._broken.add(uuid)
            return
        except VmadmError:
            self._broken.discard(uuid)
            return
        self._broken.discard(uuid)
        try:
            found = running_pidfd(self.store, uuid, record)
        except VmadmError as err:  # a file planted at vm.pid: not this VM's qemu
            vm_log(log, uuid).warning("not picked up: %s", err)
            return
        if found is not None:
            self._attach(uuid, record, *found)
        if migrating.KEY in record:
            # A migration a previous daemon left half-done (or ours, which
            # ``settle`` leaves alone).
            self.migrations.settle_soon(uuid, record, found is not None)
        if found is None and record.get(transition.KEY):
            # qemu went away while no daemon watched: finish the transition.
            settled = await settle_record(self._shared, uuid, None)
            # A reboot's second half boots qemu: not inside the sweep, which
            # the API waits for.
            self._spawn(self._after_exit(uuid, settled), f"after-exit-{uuid}")

    def _attach(self, uuid: str, record: VmRecord, pid: int, pidfd: int) -> None:
        sup = VmSupervisor(uuid, pid, pidfd, self._shared, self._on_exit)
        self.vms[uuid] = sup
        sup.start(record)

    def _on_exit(self, sup: VmSupervisor) -> None:
        if self.vms.get(sup.uuid) is sup:
            del self.vms[sup.uuid]
        self._exiting.add(sup.uuid)
        self._spawn(self._handle_exit(sup), f"exit-{sup.uuid}")

    async def _handle_exit(self, sup: VmSupervisor) -> None:
        try:
            settled = await sup.settle()
        finally:
            self._exiting.discard(sup.uuid)
        if self.closing:
            return
        # `vmadm start` may have booted a new qemu while this exit was being
        # settled; its vm.json event was ignored meanwhile.
        await self.refresh_safely(sup.uuid)
        await self._after_exit(sup.uuid, settled)

    async def _after_exit(self, uuid: str, settled: Settled) -> None:
        """A reboot's second half (boot again), or a restart after a crash."""
        if uuid in self.vms:
            return  # already running again
        if settled.cleared is not None and settled.cleared.to == "start":
            with contextlib.suppress(VmadmError):  # logged and emitted by boot()
                await self.boot(uuid, reason="reboot")
        elif settled.ending is not None and settled.ending.reason in ("panic", "crash"):
            self._spawn(self._restarts.run(uuid), f"restart-{uuid}")

    async def boot(
        self,
        uuid: str,
        *,
        reason: str,
        boot: BootOptions | None = None,
        set_autoboot: bool = False,
    ) -> float:
        """Start the VM through the VM layer; returns how long qemu took to come up.

        ``boot``: options for this boot only; ``set_autoboot``: as ``vmadm
        start`` does (a reboot or a restart leaves the flag alone).
        """
        t0 = time.monotonic()
        try:
            async with vm_lock(self.store, uuid):
                await asyncio.to_thread(
                    self.layer.start_locked, uuid, set_autoboot=set_autoboot, boot=boot
                )
        except VmBusy as err:  # not "already running": its lock stayed taken
            vm_log(log, uuid).error("%s failed: %s", reason, err)
            self.bus.emit("boot_failed", uuid, reason=reason, error=str(err))
            raise StartFailed(err.message) from err
        except WrongState:
            vm_log(log, uuid).info("%s: already running", reason)
            await self.refresh(uuid)  # someone else booted it: make sure we hold it
            raise
        except VmadmError as err:
            vm_log(log, uuid).error("%s failed: %s", reason, err)
            self.bus.emit("boot_failed", uuid, reason=reason, error=str(err))
            raise
        took = time.monotonic() - t0
        vm_log(log, uuid).info("booted (%s) in %.3f s", reason, took)
        await self.refresh(uuid)
        return took

    # -- what the API asks of one VM -------------------------------------------

    async def apply_devices(self, uuid: str, unplug_timeout: float) -> dict[str, Any]:
        """A running VM's qemu brought to its ``vm.json`` disks and nics where
        it can; a stopped VM has nothing to apply (all of it is for its boot)."""
        try:
            sup = await self.running(uuid)  # 404 first; a qemu started a moment ago
        except WrongState:
            from vmadmd.vm.devices import pending_of

            return {"applied": [], "failed": [], "pending": pending_of(self.load(uuid))}
        return await sup.apply_devices(unplug_timeout)

    async def reload_vnc(self, uuid: str) -> dict[str, Any]:
        record = self.load(uuid)
        sup = self.vms.get(uuid)
        if sup is None:
            return {}
        return await sup.reload_vnc(record)

    async def stop_all(self, timeout: float) -> list[str]:
        """Host shutdown: a graceful stop of every running VM at once.

        Each VM gets its own persisted transition (a daemon killed meanwhile
        still forces each at its deadline) with the same deadline; ``autoboot``
        is left alone, so the next host boot brings them back.  Returns the
        uuids whose stop was accepted.
        """
        sups = list(self.vms.values())
        results = await asyncio.gather(
            *(sup.request_stop(timeout, "stopped") for sup in sups), return_exceptions=True
        )
        accepted = []
        for sup, result in zip(sups, results, strict=True):
            if isinstance(result, BaseException):
                vm_log(log, sup.uuid).warning("not stopped with the others: %s", result)
            else:
                accepted.append(sup.uuid)
        log.info("stopping every VM (%d) within %.0f s", len(accepted), timeout)
        self.bus.emit("stop_all", None, uuids=accepted, timeout=timeout)
        return sorted(accepted)

    async def vnc_socket(self, uuid: str) -> tuple[str, str, Peer | None]:
        """Where a running VM's qemu serves VNC: (directory, name, the qemu
        that must be serving it), once its console has opened (in the listen
        mode that makes qemu bind the socket anew)."""
        sup = await self.running(uuid)
        await sup.console_settled()
        return sup.paths.runtime_dir, sup.paths.VNC_NAME, sup.monitor.peer

    def is_running(self, uuid: str) -> bool:
        return uuid in self.vms

    def is_exiting(self, uuid: str) -> bool:
        """Whether the VM's qemu has exited and its exit is being settled."""
        return uuid in self._exiting

    # -- shutdown ----------------------------------------------------------

    async def close(self) -> None:
        """Let go of every VM (they keep running)."""
        self.closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*(sup.detach() for sup in self.vms.values()), return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        self.vms.clear()


def connection_counts(vms: Iterable[VmSupervisor]) -> dict[str, int]:
    """How many running VMs there are, and how many have QMP and a console."""
    vms = list(vms)
    return {
        "running_vms": len(vms),
        "qmp_ready": sum(1 for sup in vms if sup.monitor.ready),
        "vnc_listeners": sum(
            1
            for sup in vms
            if sup.console.listener is not None and sup.console.listener.port is not None
        ),
    }


def state_counts(vms: Iterable[VmSupervisor], total: int, broken: int) -> dict[str, float]:
    """The VMs by state, and the console sessions, for /metrics."""
    vms = list(vms)
    stopping = sum(1 for sup in vms if sup.transition is not None)
    return {
        "vms_running": len(vms) - stopping,
        "vms_stopping": stopping,
        "vms_stopped": max(0, total - len(vms) - broken),
        "vms_broken": broken,
        "vnc_sessions": sum(
            len(sup.console.listener.sessions) for sup in vms if sup.console.listener is not None
        ),
        "vnc_listeners": connection_counts(vms)["vnc_listeners"],
    }


class CrashRestarts:
    """Boots a crashed VM again when it asks for it (``restart_on_crash``),
    with back-off (``CrashLog``): past the limit the VM stays down (a crash
    loop must not burn the host)."""

    def __init__(self, manager: Manager, crashes: CrashLog) -> None:
        self._manager = manager
        self._crashes = crashes

    def _wanted(self, uuid: str) -> bool:
        try:
            return bool(self._manager.load(uuid).get("restart_on_crash"))
        except VmadmError:
            return False

    async def run(self, uuid: str) -> None:
        m = self._manager
        if not self._wanted(uuid):
            return
        crashes, delay = self._crashes.crashed(uuid, time.monotonic())
        if delay is None:
            vm_log(log, uuid).error("crashed %d times within %.0f s: not restarted again",
                                    crashes, self._crashes.policy.window)  # fmt: skip
            m.metrics.crash_restarts.labels("given_up").inc()
            m.bus.emit("restart_given_up", uuid, crashes=crashes)
            return
        vm_log(log, uuid).warning("restarting after a crash in %.1f s (crash %d of at most %d)",
                                  delay, crashes, self._crashes.policy.limit)  # fmt: skip
        m.bus.emit("restart_scheduled", uuid, delay=delay, crashes=crashes)
        await asyncio.sleep(delay)
        if m.closing or m.is_running(uuid) or not self._wanted(uuid):
            return
        with contextlib.suppress(VmadmError):  # logged and emitted by boot()
            await m.boot(uuid, reason="restart after a crash")
            m.metrics.crash_restarts.labels("restarted").inc()
