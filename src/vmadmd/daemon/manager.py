"""The one owner of cross-VM state in the daemon.

For every running VM it holds a ``VmRuntime``: the qemu pid and a pidfd that
tells the event loop the moment qemu exits, the QMP ``Monitor``, the VNC
listener, a per-VM operation lock and the transition timer.  It learns about
VMs from inotify (see ``watch``) and from the pidfds, never by polling.

Policy lives in small functions (``merge_transition``); mechanism (QMP,
signals, files) at the edges.  Disk writes and flock waits run in worker
threads so the loop never blocks on them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import itertools
import logging
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from vmadmd.daemon.events import EventBus
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.monitor import Monitor
from vmadmd.daemon.vnc import Handoff, VncListener, file_inode
from vmadmd.errors import InvalidParameter, QmpFailed, QmpTimeout, VmadmError, WrongState
from vmadmd.vm import proc
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import VmLayer, iso_now, now_ms
from vmadmd.vm.store import VmPaths, VmRecord

log = logging.getLogger("vmadmd.manager")

INFO_QUERIES: dict[str, str] = {
    "block": "query-block",
    "blockstats": "query-blockstats",
    "chardev": "query-chardev",
    "cpus": "query-cpus-fast",  # qemu 7.2 has no query-cpus
    "kvm": "query-kvm",
    "pci": "query-pci",
    "version": "query-version",
    "status": "query-status",
}
INFO_TYPES = (*INFO_QUERIES, "vnc")

TransitionTo = Literal["stopped", "start"]
ExitStage = Literal["guest", "quit", "sigterm", "sigkill"]

CONNECT_CONCURRENCY = 64  # QMP connects in flight at once (start-up with many VMs)
POWERDOWN_RESEND = 2.0  # a guest still booting can miss one ACPI press
QUIT_WAIT = 2.0
SIGTERM_WAIT = 3.0
SIGKILL_WAIT = 10.0


@dataclass
class DaemonSettings:
    vm: VmSettings
    vnc_bind: str = "127.0.0.1"
    qmp_timeout: float = 5.0
    # "handoff": give console clients to qemu's VNC server over QMP, relaying
    # only when qemu cannot take one; "proxy": always relay.
    vnc_relay: str = "handoff"


def merge_transition(
    current: dict[str, Any] | None, to: TransitionTo, expire: int
) -> dict[str, Any]:
    """The transition after a new stop/reboot request.

    A pending deadline is never extended (a second, later stop does not buy
    the guest more time); an earlier one pre-empts it.  The latest request
    decides where the VM goes afterwards.
    """
    if current and isinstance(current.get("expire"), int):
        expire = min(expire, current["expire"])
    return {"state": "stopping", "to": to, "expire": expire}


@dataclass(eq=False)
class VmRuntime:
    uuid: str
    paths: VmPaths
    pid: int
    pidfd: int
    monitor: Monitor
    vnc: VncListener | None = None
    vnc_key: tuple[int, str | None] | None = None
    op_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    transition: dict[str, Any] | None = None
    timer: asyncio.Task[None] | None = None
    exit_stage: ExitStage | None = None
    vnc_task: asyncio.Task[None] | None = None
    # The inode of the vm.vnc socket file qemu bound (see qemu_vnc_inode).
    vnc_inode: int | None = None
    # How this qemu's VNC server was started: None (no -vnc), or whether it
    # requires password auth.  Only a new qemu can change either.
    qemu_vnc_auth: bool | None = None


def qemu_vnc_mode(argv: list[str]) -> bool | None:
    """From qemu's argv: None without -vnc, else whether password auth is on."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-vnc":
            return "password=on" in value.split(",")
    return None


class Manager:
    def __init__(self, settings: DaemonSettings, bus: EventBus, metrics: Metrics) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics
        self.layer = VmLayer(settings.vm)
        self.store = self.layer.store
        self.vms: dict[str, VmRuntime] = {}
        # VMs whose qemu exited and whose exit is being settled: a refresh
        # must not settle it a second time.
        self._exiting: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._connect_slots = asyncio.Semaphore(CONNECT_CONCURRENCY)
        metrics.watch_state(self._state_snapshot)

    # -- helpers -----------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
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

    def running(self, uuid: str) -> VmRuntime:
        """The runtime of a running VM, else WrongState (after a 404 check)."""
        rt = self.vms.get(uuid)
        if rt is None:
            self.load(uuid)
            raise WrongState(f"VM {uuid} is not running")
        return rt

    def connection_counts(self) -> dict[str, int]:
        """How far the daemon is in picking up its running VMs."""
        return {
            "running_vms": len(self.vms),
            "qmp_ready": sum(1 for rt in self.vms.values() if rt.monitor.ready),
            "vnc_listeners": sum(
                1 for rt in self.vms.values() if rt.vnc is not None and rt.vnc.port is not None
            ),
        }

    def _state_snapshot(self) -> dict[str, float]:
        running = sum(1 for rt in self.vms.values() if not rt.transition)
        total = len(self.store.list_uuids())
        return {
            "vms_running": running,
            "vms_stopping": len(self.vms) - running,
            "vms_stopped": max(0, total - len(self.vms)),
            "vnc_sessions": sum(len(rt.vnc.sessions) for rt in self.vms.values() if rt.vnc),
            "vnc_listeners": self.connection_counts()["vnc_listeners"],
        }

    # -- discovery ---------------------------------------------------------

    async def scan(self, uuids: Iterable[str], batch: int = 32) -> None:
        """Pick up every VM: attach running ones, settle stale transitions.

        In batches, yielding between them, so the API answers while a daemon
        with a thousand VMs is still picking them up.
        """
        pending = list(uuids)
        for i in range(0, len(pending), batch):
            await asyncio.gather(*(self.refresh_safely(u) for u in pending[i : i + batch]))
            await asyncio.sleep(0)

    async def refresh_safely(self, uuid: str) -> None:
        """refresh(), with a failure confined to its VM (logged as the bug it is)."""
        try:
            await self.refresh(uuid)
        except Exception:
            log.exception("vm %s: cannot pick up this VM", uuid, extra={"vm": uuid})

    async def refresh(self, uuid: str) -> None:
        """Bring our view of one VM in line with reality.  Idempotent."""
        if self._closing:
            return
        if uuid in self.vms or uuid in self._exiting:
            return  # its pidfd tells us when it exits, or has told us
        try:
            record = self.load(uuid)
        except VmadmError:
            return
        found = proc.open_vm_pidfd(self.store.paths(uuid).pid, uuid)
        if found is not None:
            if uuid in self.vms:  # attached meanwhile
                os.close(found[1])
                return
            self._attach(uuid, record, *found)
        elif record.get("transition"):
            # qemu went away while no daemon watched: finish the transition.
            cleared = await self._settle_exit(uuid, None)
            if cleared.get("to") == "start":
                with contextlib.suppress(VmadmError):
                    await self.boot(uuid, reason="reboot")

    def _attach(self, uuid: str, record: VmRecord, pid: int, pidfd: int) -> None:
        paths = self.store.paths(uuid)
        monitor = Monitor(
            uuid,
            paths.runtime_dir,
            paths.QMP_NAME,
            timeout=self.settings.qmp_timeout,
            on_event=lambda name, data: self._on_qmp_event(uuid, name, data),
            metrics=self.metrics,
            connect_slots=self._connect_slots,
        )
        rt = VmRuntime(
            uuid=uuid,
            paths=paths,
            pid=pid,
            pidfd=pidfd,
            monitor=monitor,
            qemu_vnc_auth=qemu_vnc_mode(proc.cmdline(pid)),
        )
        self.vms[uuid] = rt
        asyncio.get_running_loop().add_reader(pidfd, self._on_pidfd, rt)
        monitor.start()
        log.info("vm %s: running (pid %d)", uuid, pid)
        self.bus.emit("started", uuid, pid=pid)
        rt.vnc_task = self._spawn(self._open_vnc(rt, record), f"vnc-{uuid}")
        transition = record.get("transition")
        if isinstance(transition, dict) and isinstance(transition.get("expire"), int):
            rt.transition = transition
            self._arm(rt)

    def _on_qmp_event(self, uuid: str, name: str, data: dict[str, Any]) -> None:
        if name in ("SHUTDOWN", "POWERDOWN", "RESET", "STOP", "RESUME"):
            log.debug("vm %s: QMP event %s", uuid, name)
            self.bus.emit("qmp_event", uuid, event=name, data=data)

    # -- exit --------------------------------------------------------------

    def _on_pidfd(self, rt: VmRuntime) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(rt.pidfd)
        os.close(rt.pidfd)
        rt.pidfd = -1
        rt.exited.set()
        if self.vms.get(rt.uuid) is rt:
            del self.vms[rt.uuid]
        self._exiting.add(rt.uuid)
        self._spawn(self._handle_exit(rt), f"exit-{rt.uuid}")

    async def _handle_exit(self, rt: VmRuntime) -> None:
        try:
            if rt.timer is not None and rt.timer is not asyncio.current_task():
                rt.timer.cancel()
            if rt.vnc_task is not None:
                rt.vnc_task.cancel()
            # The record first: that is what `vmadm get/stop` wait for.
            cleared = await self._settle_exit(rt.uuid, rt.exit_stage or "guest")
            if rt.vnc is not None:
                await rt.vnc.close()
                self.bus.emit("vnc_down", rt.uuid)
            await rt.monitor.close()
        finally:
            self._exiting.discard(rt.uuid)
        if self._closing:
            return
        if cleared.get("to") == "start":
            with contextlib.suppress(VmadmError):  # logged and emitted by boot()
                await self.boot(rt.uuid, reason="reboot")
        else:
            # `vmadm start` may have booted a new qemu while this exit was
            # being settled; its vm.json event was ignored meanwhile.
            await self.refresh_safely(rt.uuid)

    async def _settle_exit(self, uuid: str, stage: ExitStage | None) -> dict[str, Any]:
        """qemu is gone: clear the transition and record how it ended.

        Returns the transition it cleared (empty if none).
        """
        cleared: dict[str, Any] = {}
        ended_by = stage  # or what the VM layer recorded (e.g. `vmadm stop -F`)

        def change(vm: VmRecord) -> None:
            nonlocal ended_by
            transition = vm.pop("transition", None)
            if transition:
                cleared.update(transition)
            last = vm.get("last_exit")
            boot = vm.get("boot_timestamp", "")
            already = isinstance(last, dict) and str(last.get("time", "")) >= str(boot)
            if stage is not None and not already:
                vm["last_exit"] = {"stage": stage, "time": iso_now()}
            recorded = vm.get("last_exit")
            if stage is not None and isinstance(recorded, dict):
                ended_by = recorded.get("stage", stage)

        try:
            await asyncio.to_thread(self.store.update, uuid, change)
        except VmadmError as err:
            # Deleted meanwhile, or unreadable: nothing to settle.
            log.info("vm %s: exited; record not updated: %s", uuid, err)
            self.bus.emit("exited", uuid, stage=stage)
            return {}
        log.info("vm %s: exited (stage %s)", uuid, ended_by or "unknown", extra={"vm": uuid})
        self.bus.emit("exited", uuid, stage=ended_by)
        if ended_by:
            self.metrics.stops.labels(ended_by).inc()
        if cleared:
            self.bus.emit("transition_cleared", uuid, to=cleared.get("to"))
        return cleared

    async def boot(self, uuid: str, *, reason: str) -> float:
        """Start the VM through the VM layer; returns how long qemu took to come up."""
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.layer.start, uuid, set_autoboot=False)
        except WrongState:
            log.info("vm %s: %s: already running", uuid, reason)
            await self.refresh(uuid)  # someone else booted it: make sure we hold it
            raise
        except VmadmError as err:
            log.error("vm %s: %s failed: %s", uuid, reason, err)
            self.bus.emit("boot_failed", uuid, reason=reason, error=str(err))
            raise
        took = time.monotonic() - t0
        log.info("vm %s: booted (%s) in %.3f s", uuid, reason, took)
        await self.refresh(uuid)
        return took

    # -- VNC ---------------------------------------------------------------

    async def _open_vnc(self, rt: VmRuntime, record: VmRecord) -> None:
        port = record.get("vnc_port", 0)
        password = record.get("vnc_password") or None
        rt.vnc_key = (port, password)
        if port == -1:
            return
        handoff: Handoff | None = None
        if self.settings.vnc_relay == "handoff":
            timeout = self.settings.qmp_timeout
            handoff = functools.partial(rt.monitor.add_vnc_client, timeout=timeout)
        listener = VncListener(
            rt.uuid, rt.paths.runtime_dir, rt.paths.VNC_NAME, self.settings.vnc_bind, port,
            self.metrics, handoff, lambda: self.qemu_vnc_inode(rt),
        )  # fmt: skip
        mismatch = vnc_mismatch(rt.qemu_vnc_auth, bool(password))
        if mismatch is not None:
            # Never serve a console with weaker protection than asked for.
            listener.error = mismatch
            self.metrics.vnc_listener_errors.inc()
            rt.vnc = listener
            log.warning("vm %s: %s", rt.uuid, mismatch)
            return
        if password:
            try:
                await rt.monitor.execute("set_password", {"protocol": "vnc", "password": password})
            except VmadmError as err:
                listener.error = f"cannot set the VNC password: {err}"
                rt.vnc = listener
                log.error("vm %s: %s", rt.uuid, listener.error)
                return
        if await listener.open():
            self.bus.emit("vnc_up", rt.uuid, port=listener.port)
            log.info("vm %s: VNC on %s:%s", rt.uuid, listener.host, listener.port)
            if not password and not is_loopback(listener.host):
                log.warning(
                    "vm %s: VNC console on %s:%s without a vnc_password: "
                    "whoever reaches that address has the console",
                    rt.uuid, listener.host, listener.port, extra={"vm": rt.uuid},
                )  # fmt: skip
        if rt.exited.is_set():
            await listener.close()
            return
        rt.vnc = listener

    async def reload_vnc(self, uuid: str) -> dict[str, Any]:
        record = self.load(uuid)
        rt = self.vms.get(uuid)
        if rt is None:
            return {}
        async with rt.op_lock:
            if rt.vnc_task is not None and not rt.vnc_task.done():
                await rt.vnc_task
            key = (record.get("vnc_port", 0), record.get("vnc_password") or None)
            if key == rt.vnc_key:
                return self.vnc_info(rt)
            port, password = key
            listener = rt.vnc
            if (
                rt.vnc_key is not None
                and port == rt.vnc_key[0]
                and password
                and rt.qemu_vnc_auth
                and listener is not None
                and listener.error is None
            ):
                # Only the password changed: qemu takes a new one in place;
                # the listener (and its port) stay.
                await rt.monitor.execute("set_password", {"protocol": "vnc", "password": password})
                rt.vnc_key = key
                return self.vnc_info(rt)
            if rt.vnc is not None:
                await rt.vnc.close()
                rt.vnc = None
                self.bus.emit("vnc_down", uuid)
            await self._open_vnc(rt, record)
            return self.vnc_info(rt)

    @staticmethod
    def qemu_vnc_inode(rt: VmRuntime) -> int | None:
        """The inode of the vm.vnc socket file this qemu bound, once known.

        Taken the first time it is asked for with QMP connected: qemu
        answers QMP only from its main loop, after its VNC socket is bound
        (its pidfile, which the daemon may see first, comes earlier).  While
        the file there is still that one, qemu's VNC server is what listens
        at vm.vnc.
        """
        if rt.vnc_inode is None and rt.monitor.ready:
            rt.vnc_inode = file_inode(rt.paths.runtime_dir, rt.paths.VNC_NAME)
        return rt.vnc_inode

    @staticmethod
    def vnc_info(rt: VmRuntime) -> dict[str, Any]:
        """The listener as it is, with the password qemu was given (if any)."""
        if rt.vnc is None:
            return {}
        return rt.vnc.info(rt.vnc_key[1] if rt.vnc_key else None)

    # -- QMP operations ----------------------------------------------------

    async def info(self, uuid: str, types: list[str]) -> dict[str, Any]:
        rt = self.running(uuid)  # vm.json is read only when the VM is not running
        queries = [t for t in types if t in INFO_QUERIES]
        results = await asyncio.gather(
            *(rt.monitor.execute(INFO_QUERIES[t]) for t in queries), return_exceptions=True
        )
        # A timeout outranks other failures: it is what the caller must see
        # (504) when qemu is wedged.
        failures = [r for r in results if isinstance(r, BaseException)]
        for failure in sorted(failures, key=lambda e: not isinstance(e, QmpTimeout)):
            raise failure
        out: dict[str, Any] = dict(zip(queries, results, strict=True))
        if "vnc" in types:
            out["vnc"] = self.vnc_info(rt)
        return {t: out[t] for t in types if t in out}

    async def reset(self, uuid: str) -> None:
        rt = self.running(uuid)
        async with rt.op_lock:
            await rt.monitor.execute("system_reset")
        self.bus.emit("reset", uuid)

    async def nmi(self, uuid: str) -> None:
        rt = self.running(uuid)
        async with rt.op_lock:
            await rt.monitor.execute("inject-nmi")

    async def screenshot(self, uuid: str, fmt: Literal["ppm", "png"] = "ppm") -> str:
        """Write a screenshot; returns its path."""
        rt = self.running(uuid)
        path = rt.paths.screenshot if fmt == "ppm" else rt.paths.screenshot[:-4] + ".png"
        async with rt.op_lock:
            # Wake a blanked console first, as a user would with a key press.
            with contextlib.suppress(QmpFailed):
                await rt.monitor.execute("send-key", {"keys": [{"type": "qcode", "data": "shift"}]})
            args: dict[str, Any] = {"filename": path}
            if fmt == "png":
                args["format"] = "png"  # qemu >= 7.1
            await rt.monitor.execute("screendump", args)
        return path

    # -- stop / reboot -----------------------------------------------------

    async def request_stop(self, uuid: str, timeout: float, to: TransitionTo) -> dict[str, Any]:
        """Persist the deadline, then press the power button; forced at the deadline."""
        rt = self.running(uuid)
        async with rt.op_lock:
            if rt.exited.is_set():
                raise WrongState(f"VM {uuid} is not running")
            expire = now_ms() + int(timeout * 1000)
            result: dict[str, Any] = {}

            def change(vm: VmRecord) -> None:
                transition = merge_transition(vm.get("transition"), to, expire)
                vm["transition"] = transition
                result.update(transition)

            # The deadline is on disk before the guest hears anything: a
            # daemon killed from here on still forces the stop in time.
            await asyncio.to_thread(self.store.update, uuid, change)
            rt.transition = dict(result)
            self.bus.emit("transition_set", uuid, **result)
            log.info(
                "vm %s: %s requested, forced at %d",
                uuid, "reboot" if to == "start" else "stop", result["expire"],
            )  # fmt: skip
            await self._powerdown(rt)
            self._arm(rt)
            return result

    async def _powerdown(self, rt: VmRuntime) -> None:
        try:
            await rt.monitor.execute("system_powerdown")
        except VmadmError as err:
            # The deadline still holds; the timer re-sends and then forces.
            log.warning("vm %s: system_powerdown failed: %s", rt.uuid, err)

    def _arm(self, rt: VmRuntime) -> None:
        if rt.timer is not None and not rt.timer.done():
            rt.timer.cancel()
        rt.timer = self._spawn(self._transition_timer(rt), f"transition-{rt.uuid}")

    async def _transition_timer(self, rt: VmRuntime) -> None:
        while not rt.exited.is_set():
            assert rt.transition is not None
            left = rt.transition["expire"] / 1000 - time.time()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(rt.exited.wait(), min(left, POWERDOWN_RESEND))
                return
            except TimeoutError:
                pass
            if rt.transition["expire"] / 1000 - time.time() > 0.5:
                await self._powerdown(rt)
        if not rt.exited.is_set():
            await self.force_stop(rt)

    async def force_stop(self, rt: VmRuntime) -> ExitStage | None:
        """quit over QMP, then SIGTERM, then SIGKILL, each bounded."""
        log.info("vm %s: deadline reached; forcing the stop", rt.uuid)
        self.bus.emit("transition_forced", rt.uuid)
        stage: ExitStage
        rt.exit_stage = "quit"
        with contextlib.suppress(VmadmError):
            await rt.monitor.execute("quit", timeout=QUIT_WAIT)
        if await self._wait_exit(rt, QUIT_WAIT):
            return "quit"
        for stage, sig, wait in (
            ("sigterm", signal.SIGTERM, SIGTERM_WAIT),
            ("sigkill", signal.SIGKILL, SIGKILL_WAIT),
        ):
            rt.exit_stage = stage
            if rt.pidfd < 0 or not proc.pidfd_signal(rt.pidfd, sig):
                return stage  # already gone
            if await self._wait_exit(rt, wait):
                return stage
        log.error("vm %s: qemu survived SIGKILL", rt.uuid)
        return None

    @staticmethod
    async def _wait_exit(rt: VmRuntime, timeout: float) -> bool:
        try:
            await asyncio.wait_for(rt.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- shutdown ----------------------------------------------------------

    async def close(self) -> None:
        """Let go of every VM (they keep running)."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for task in list(self._tasks):
            task.cancel()
        for rt in list(self.vms.values()):
            if rt.pidfd >= 0:
                loop.remove_reader(rt.pidfd)
                os.close(rt.pidfd)
                rt.pidfd = -1
        await asyncio.gather(
            *(rt.monitor.close() for rt in self.vms.values()),
            *(rt.vnc.close() for rt in self.vms.values() if rt.vnc is not None),
            return_exceptions=True,
        )
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        self.vms.clear()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def vnc_mismatch(qemu_auth: bool | None, want_password: bool) -> str | None:
    """Why this qemu cannot serve the console as configured, or None."""
    if qemu_auth is None:
        return "this qemu was started without a VNC server; the console comes with the next boot"
    if want_password and not qemu_auth:
        return (
            "vnc_password was set after this qemu started without password auth; "
            "the console stays closed until the next boot"
        )
    if not want_password and qemu_auth:
        return (
            "vnc_password was removed, but this qemu requires one until the next boot; "
            "the console stays closed until then"
        )
    return None


def parse_types(raw: str | None) -> list[str]:
    if raw is None or raw == "" or raw == "all":
        return list(INFO_TYPES)
    types = [t.strip() for t in raw.split(",") if t.strip()]
    for t in types:
        if t not in INFO_TYPES:
            raise InvalidParameter(f"unknown info type {t!r}; known: {', '.join(INFO_TYPES)}")
    return list(dict.fromkeys(types))
