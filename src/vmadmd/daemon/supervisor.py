"""One running VM, owned: its qemu's pidfd, QMP monitor, VNC console, lock and deadline.

A ``VmSupervisor`` exists from the moment the daemon sees a VM's qemu until
that qemu has exited and its exit is settled in ``vm.json``.  Everything
done to one VM goes through its supervisor, serialised by its operation
lock; nothing here touches another VM.

Stops and reboots: the deadline is written to ``vm.json`` before the guest
hears anything, so a daemon killed at any point still forces the stop in
time when it comes back (``start`` re-arms a transition found on disk).
Until the deadline the power button is pressed again every couple of
seconds (a guest still booting can miss one); at the deadline the stop is
forced: ``quit`` over QMP, then SIGTERM, then SIGKILL through the pidfd,
each step bounded.

How the VM ended is recorded as ``last_exit`` (see ``Ending``): the daemon
learns it from qemu's ``SHUTDOWN`` event (``guest: true`` for the guest's
own power-off, ``reason: guest-panic`` after a pvpanic report) and from
which forcing step, if any, it took; a qemu that goes away with no
shutdown at all crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

from vmadmd.daemon.events import EventBus
from vmadmd.daemon.locks import LOCK_WAIT, vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.monitor import QUERIES, Monitor
from vmadmd.daemon.qmppolicy import check_hmp, check_qmp
from vmadmd.daemon.serial import SerialConsole
from vmadmd.daemon.stats import (
    BLOCKSTATS_PERIOD,
    DiskStats,
    nic_counters,
    parse_blockstats,
    snapshot,
)
from vmadmd.daemon.vncconsole import VncConsole, qemu_vnc_mode
from vmadmd.errors import InvalidParameter, QmpRefused, QmpTimeout, VmadmError, VmBusy, WrongState
from vmadmd.vm import cgroup, launch, net, proc, transition, zonefs
from vmadmd.vm.config import VmSettings
from vmadmd.vm.layer import identity_of, iso_now, now_ms
from vmadmd.vm.store import Store, VmRecord
from vmadmd.vm.transition import Transition, TransitionTo

log = logging.getLogger("vmadmd.supervisor")

INFO_TYPES = (*QUERIES, "vnc")  # the default set
EXTRA_TYPES = ("stats",)  # only when asked for

ForceStage = Literal["quit", "sigterm", "sigkill"]

POWERDOWN_RESEND = 2.0  # a guest still booting can miss one ACPI press
QUIT_WAIT = 2.0
DRAIN_WAIT = 0.5  # for qemu's last events once its exit is seen
SETTLE_LOCK_WAIT = 3600.0  # an exit is recorded once the VM's lock is free
MAX_SCREENSHOT = 64 << 20


@dataclass
class CrashRestart:
    """restart_on_crash's back-off: ``delay`` doubling per crash up to
    ``max_delay``; more than ``limit`` crashes within ``window`` s: no more."""

    delay: float = 1.0
    max_delay: float = 60.0
    limit: int = 5
    window: float = 600.0


class CrashLog:
    """restart_on_crash's decision: how long to wait before booting a crashed
    VM again, or None when it crashed too often lately.  Pure; the clock is
    given.  Kept in the daemon's memory (a restarted daemon starts afresh)."""

    def __init__(self, policy: CrashRestart) -> None:
        self.policy = policy
        self._crashes: dict[str, list[float]] = {}

    def crashed(self, uuid: str, now: float) -> tuple[int, float | None]:
        """Record a crash at ``now``: (crashes in the window, delay or None)."""
        window = self.policy.window
        history = [t for t in self._crashes.get(uuid, []) if now - t < window]
        history.append(now)
        self._crashes[uuid] = history
        if len(history) > self.policy.limit:
            return len(history), None
        return len(history), min(self.policy.delay * 2 ** (len(history) - 1), self.policy.max_delay)


@dataclass
class DaemonSettings:
    vm: VmSettings
    vnc_bind: str = "127.0.0.1"
    qmp_timeout: float = 5.0
    # "listen": qemu accepts on the console's listening socket itself (the
    # daemon gives it over QMP; "handoff" where it cannot take it);
    # "handoff": give each console client to qemu's VNC server over QMP,
    # relaying only when qemu cannot take one; "proxy": always relay.
    vnc_relay: str = "listen"
    crash_restart: CrashRestart = field(default_factory=CrashRestart)


@dataclass
class Shared:
    """What every supervisor is given by the manager."""

    settings: DaemonSettings
    store: Store
    bus: EventBus
    metrics: Metrics
    connect_slots: asyncio.Semaphore
    spawn: Callable[[Coroutine[Any, Any, Any], str], asyncio.Task[Any]]
    cgroups: cgroup.Cgroups


# How a VM last ended, as kept in vm.json's "last_exit" (without "time").
Ending = dict[str, Any]


def parse_types(raw: str | None) -> list[str]:
    """The info types asked for (all of them when none)."""
    if raw is None or raw == "" or raw == "all":
        return list(INFO_TYPES)
    types = [t.strip() for t in raw.split(",") if t.strip()]
    known = (*INFO_TYPES, *EXTRA_TYPES)
    for t in types:
        if t not in known:
            raise InvalidParameter(f"unknown info type {t!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(types))


def ending_of(
    shutdown: dict[str, Any] | None,
    forced: ForceStage | None,
    pending: bool,
    status: int | None = None,
) -> Ending:
    """How a VM ended, from what the daemon saw of it.

    ``shutdown`` is the data of qemu's SHUTDOWN event (None when none came),
    ``forced`` the forcing step the daemon last took, ``pending`` whether a
    stop or reboot was asked for, ``status`` qemu's wait status as its waiter
    recorded it (None: not known).
    """
    reason = str(shutdown.get("reason", "")) if shutdown is not None else ""
    if reason == "guest-panic":
        return {"reason": "panic"}
    if forced is not None:
        return {"reason": "stop", "stage": forced}
    if shutdown is None and status != 0:
        if status is None:
            return {"reason": "crash",
                    "detail": "qemu exited without shutting down (signal or abort)"}  # fmt: skip
        return {"reason": "crash", **launch.describe_status(status)}
    # The guest shut down, or qemu exited cleanly (status 0) with its
    # SHUTDOWN event unseen by the monitor.
    if shutdown is None or shutdown.get("guest") is True:
        return {"reason": "stop", "stage": "acpi"} if pending else {"reason": "poweroff"}
    # qemu was told to go by someone else: a `quit` on its monitor, a signal.
    stage = {"host-qmp-quit": "quit", "host-signal": "sigterm"}.get(reason, reason or "host")
    return {"reason": "stop", "stage": stage, "by": "host"}


class Settled(NamedTuple):
    """What settling an exit found: the transition it cleared, how the VM ended."""

    cleared: Transition | None
    ending: Ending | None


async def settle_record(shared: Shared, uuid: str, ending: Ending | None) -> Settled:
    """qemu is gone: clear the transition and record how it ended.

    ``ending`` None: not known (qemu went away while no daemon watched).  An
    ending already recorded for this boot (``vmadm stop -F`` writes its own)
    is kept.
    """
    cleared: Transition | None = None
    recorded: Ending | None = None

    def change(vm: VmRecord) -> None:
        nonlocal cleared, recorded
        cleared = Transition.from_json(vm.pop(transition.KEY, None))
        last = vm.get("last_exit")
        boot = vm.get("boot_timestamp", "")
        if isinstance(last, dict) and str(last.get("time", "")) >= str(boot):
            recorded = {k: v for k, v in last.items() if k != "time"}
        elif ending is not None:
            vm["last_exit"] = {**ending, "time": iso_now()}
            recorded = ending

    try:
        # However long another process holds the VM's lock, the exit is
        # recorded once it lets go: waiting costs no thread.
        async with vm_lock(shared.store, uuid, SETTLE_LOCK_WAIT):
            await asyncio.to_thread(shared.store.update_locked, uuid, change)
    except VmadmError as err:
        # Deleted meanwhile, or unreadable: nothing to settle.
        vm_log(log, uuid).info("exited; record not updated: %s", err)
        shared.bus.emit("exited", uuid, **(ending or {}))
        return Settled(None, None)
    how = recorded or {}
    reason = str(how.get("reason", "unknown"))
    level = logging.WARNING if reason in ("panic", "crash") else logging.INFO
    told = " ".join(f"{k}={v}" for k, v in how.items()) or "unknown"
    vm_log(log, uuid).log(level, "exited (%s)", told, extra={"reason": reason})
    shared.bus.emit("exited", uuid, **how)
    if recorded is not None:
        shared.metrics.vm_exits.labels(reason, str(how.get("stage", ""))).inc()
    if cleared is not None:
        shared.bus.emit("transition_cleared", uuid, to=cleared.to)
    return Settled(cleared, recorded)


class VmSupervisor:
    def __init__(
        self,
        uuid: str,
        pid: int,
        pidfd: int,
        shared: Shared,
        on_exit: Callable[[VmSupervisor], None],
    ) -> None:
        self.uuid = uuid
        self.pid = pid
        self._log = vm_log(log, uuid)
        self.paths = shared.store.paths(uuid)
        self._pidfd = pidfd
        self._shared = shared
        self._on_exit = on_exit
        settings = shared.settings
        self.monitor = Monitor(
            uuid,
            self.paths.runtime_dir,
            self.paths.QMP_NAME,
            timeout=settings.qmp_timeout,
            on_event=self._on_qmp_event,
            metrics=shared.metrics,
            connect_slots=shared.connect_slots,
        )
        self.exited = asyncio.Event()
        self.console = VncConsole(
            uuid, self.paths, self.monitor,
            bind=settings.vnc_bind, relay=settings.vnc_relay,
            qmp_timeout=settings.qmp_timeout, qemu_auth=qemu_vnc_mode(proc.cmdline(pid)),
            bus=shared.bus, metrics=shared.metrics, gone=self.exited.is_set,
            require_password=settings.vm.vnc_require_password,
        )  # fmt: skip
        self.serial = SerialConsole(uuid, self.paths.runtime_dir, self.paths.CONSOLE_NAME)
        self.lock = asyncio.Lock()  # one operation at a time on this VM
        self.transition: Transition | None = None
        self._timer: asyncio.Task[None] | None = None
        self._console_task: asyncio.Task[None] | None = None
        self._forced: ForceStage | None = None
        self._shutdown: dict[str, Any] | None = None
        self._stats_task: asyncio.Task[None] | None = None
        # For the statistics (see stats.py): what to call it, its taps, the
        # last block counters.
        self.alias = ""
        self.nics: list[str] = []
        self._nic_records: list[Any] = []
        self.disk_stats: dict[str, DiskStats] = {}

    @property
    def state(self) -> str:
        return "stopping" if self.transition is not None else "running"

    def learn(self, record: VmRecord) -> None:
        """Take what the statistics name the VM by from its (new) record."""
        self.alias = str(record.get("alias") or "")
        self._nic_records = list(record.get("nics", []))
        self.nics = [
            str(nic["ifname"])
            for nic in record.get("nics", [])
            if isinstance(nic, dict) and nic.get("netdev") == "tap" and nic.get("ifname")
        ]

    def start(self, record: VmRecord) -> None:
        """Watch the qemu, connect QMP, open the console, re-arm a pending stop."""
        self.learn(record)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_pidfd)
        self.monitor.start()
        self.serial.start()
        self._log.info("running (pid %d)", self.pid)
        self._shared.bus.emit("started", self.uuid, pid=self.pid)
        self._console_task = self._shared.spawn(self.console.open(record), f"vnc-{self.uuid}")
        self._stats_task = self._shared.spawn(self._poll_blockstats(), f"stats-{self.uuid}")
        self.transition = Transition.of(record)
        if self.transition is not None:
            self._arm()

    def _on_qmp_event(self, name: str, data: dict[str, Any]) -> None:
        if name == "SHUTDOWN":
            self._shutdown = data
        elif name == "VNC_CONNECTED":
            self.console.client_connected(data)
            return
        if name in ("SHUTDOWN", "POWERDOWN", "RESET", "STOP", "RESUME", "GUEST_PANICKED"):
            self._log.debug("QMP event %s", name)
            # Rate-limited: a guest in a reset loop must not flood the history.
            self._shared.bus.emit_limited(name, "qmp_event", self.uuid, event=name, data=data)

    # -- exit ----------------------------------------------------------------

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _on_pidfd(self) -> None:
        self._close_pidfd()
        self.exited.set()
        self._on_exit(self)

    def ending(self, status: int | None = None) -> Ending:
        """How this qemu ended, from what was seen of it."""
        return ending_of(self._shutdown, self._forced, self.transition is not None, status)

    async def _exit_status(self) -> int | None:
        """qemu's wait status from its waiter, which writes it a moment after
        the exit the pidfd showed (None after a second without it, and at
        once for a qemu with no waiter)."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + 1.0, 0.001
        while loop.time() < deadline:
            status = launch.exit_status(self.paths.zonepath)
            if status is not None:
                return status
            if not launch.has_waiter(self.paths.zonepath):
                return None
            await asyncio.sleep(delay)  # it comes within a few ms: look often at first
            delay = min(delay * 2, 0.02)
        return None

    async def settle(self) -> Settled:
        """After qemu's exit: record it, close the console and the monitor.

        The caller boots the VM again when the transition it cleared went
        ``to: start`` (or after a crash, when the VM asks for that).
        """
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()
        for task in (self._console_task, self._stats_task):
            if task is not None:
                task.cancel()
        await self.monitor.drain(DRAIN_WAIT)
        # Only an exit nothing explains needs the status (which signal).
        unexplained = self._shutdown is None and self._forced is None
        status = await self._exit_status() if unexplained else None
        # The record first: that is what `vmadm get/stop` wait for.
        settled = await settle_record(self._shared, self.uuid, self.ending(status))
        self._shared.bus.forget(self.uuid)
        why = {"panic": "the guest kernel panicked", "crash": "qemu crashed"}
        await self.serial.close(
            why.get(str((settled.ending or {}).get("reason")), "the VM stopped")
        )
        await self.console.close()
        await self.monitor.close()
        # Its taps and its cgroup go with it (best effort: the next start
        # redoes both); last, as the cgroup may wait for qemu to be reaped.
        # Under the VM's lock, and not once the VM runs again: a start that
        # came as soon as the record said "stopped" has made both anew, and
        # removing them would cut its network and fail its launch.
        try:
            async with vm_lock(self._shared.store, self.uuid, SETTLE_LOCK_WAIT):
                await asyncio.to_thread(self._release_unless_restarted)
        except Exception:
            self._log.exception("cleanup after exit failed")
        return settled

    def _release_unless_restarted(self) -> None:
        """Remove the VM's taps and cgroup, unless a new qemu of it runs (lock held)."""
        store = self._shared.store
        with contextlib.suppress(VmadmError):  # deleted meanwhile: its taps are still ours
            record = store.load(self.uuid)
            if proc.find_vm_pid(store.paths(self.uuid).pid, self.uuid, identity_of(record)):
                self._log.info("started again before its exit was cleaned up: kept its taps")
                return
        for cleanup in (
            functools.partial(net.remove_taps, self._nic_records),
            functools.partial(self._shared.cgroups.remove, self.uuid),
        ):
            try:
                cleanup()
            except Exception:
                self._log.exception("cleanup after exit failed")

    async def detach(self) -> None:
        """Let go of the VM (daemon shutdown): it keeps running."""
        self._close_pidfd()
        if self._stats_task is not None:
            self._stats_task.cancel()
        await asyncio.gather(
            self.monitor.close(),
            self.console.detach(),
            self.serial.close("vmadmd is shutting down; the VM keeps running"),
            return_exceptions=True,
        )

    def _alive(self) -> None:
        if self.exited.is_set():
            raise WrongState(f"VM {self.uuid} is not running")

    # -- QMP operations --------------------------------------------------------

    async def info(self, types: list[str]) -> dict[str, Any]:
        """Every type asked for; one that failed carries ``{"error": ...}``.

        Only when no query answered at all does the failure become the
        answer (a wedged qemu: 504), as one failing query must not hide the
        others (SmartOS returned what it had).
        """
        queries = [t for t in types if t in QUERIES]
        results = await self.monitor.query_all(queries) if queries else []
        failures = [r for r in results if isinstance(r, BaseException)]
        if queries and len(failures) == len(queries):
            # A timeout outranks other failures: it is what the caller must
            # see (504) when qemu is wedged.
            raise sorted(failures, key=lambda e: not isinstance(e, QmpTimeout))[0]
        out: dict[str, Any] = {}
        for kind, result in zip(queries, results, strict=True):
            if isinstance(result, VmadmError):
                out[kind] = {"error": {"code": result.code, "message": result.message}}
            elif isinstance(result, BaseException):
                raise result
            else:
                out[kind] = result
        if "vnc" in types:
            out["vnc"] = self.console.info()
        if "stats" in types:
            out["stats"] = await self.stats()
        return {t: out[t] for t in types if t in out}

    async def stats(self) -> dict[str, Any]:
        """CPU, memory, disk and nic counters (block counters refreshed now)."""
        with contextlib.suppress(VmadmError):
            self.disk_stats = parse_blockstats(await self.monitor.query("blockstats"))
        nics = await asyncio.to_thread(nic_counters, self.nics) if self.nics else {}
        return snapshot(self, self._shared.cgroups.memory_limit(self.uuid), nics)

    async def _poll_blockstats(self) -> None:
        """Keep the block counters fresh for /metrics, one query per period."""
        await asyncio.sleep(random.uniform(0, BLOCKSTATS_PERIOD))  # spread the VMs out
        while True:
            with contextlib.suppress(VmadmError):
                self.disk_stats = parse_blockstats(await self.monitor.query("blockstats"))
            await asyncio.sleep(BLOCKSTATS_PERIOD)

    async def reset(self) -> None:
        async with self.lock:
            await self.monitor.reset()
        self._shared.bus.emit("reset", self.uuid)

    async def nmi(self) -> None:
        async with self.lock:
            await self.monitor.inject_nmi()

    async def screenshot(self, fmt: Literal["ppm", "png"]) -> str:
        """Write a screenshot into the VM's root/tmp; returns its path."""
        async with self.lock:
            return await self._screendump(fmt)

    async def screenshot_png(self) -> bytes:
        """A PNG screenshot, read back (and removed) under the VM's lock."""
        async with self.lock:
            path = await self._screendump("png")
            return await asyncio.to_thread(
                zonefs.take_runtime_file,
                self.paths.zonepath,
                os.path.basename(path),
                MAX_SCREENSHOT,
            )

    async def _screendump(self, fmt: Literal["ppm", "png"]) -> str:
        path = self.paths.screenshot if fmt == "ppm" else self.paths.screenshot[:-4] + ".png"
        # Whatever lies at that name goes first: qemu opens the path itself.
        await asyncio.to_thread(zonefs.remove_runtime_file, self.paths.zonepath,
                                os.path.basename(path))  # fmt: skip
        # Wake a blanked console first, as a user would with a key press.
        with contextlib.suppress(QmpRefused):
            await self.monitor.wake_display()
        # A name relative to qemu's working directory (root/tmp): qemu, as the
        # VM's user, may not be able to pass the zones root's ancestors.  A
        # qemu started by an older vmadmd (with -daemonize, as root, working
        # in "/") is given the whole path instead, until it is restarted.
        name = os.path.basename(path)
        if not self._works_in_runtime_dir():
            name = path
        await self.monitor.screendump(name, fmt)
        return path

    def _works_in_runtime_dir(self) -> bool:
        try:
            here = os.path.join(os.path.realpath(self.paths.zonepath), "root", "tmp")
            return os.readlink(f"/proc/{self.pid}/cwd") == here
        except OSError:
            return True  # gone: the command fails on its own

    async def passthrough(self, request: dict[str, Any]) -> Any:
        """``{"execute", "arguments"}`` or ``{"hmp"}`` from a user, serialised with
        the daemon's own operations on this VM.  Logged by command name only:
        arguments can hold secrets."""
        try:  # refused at once (400/403), not after the VM's lock
            if "hmp" in request:
                check_hmp(str(request["hmp"]))
            else:
                check_qmp(str(request["execute"]), request.get("arguments"))
        except VmadmError as err:  # 403 off the allowlist, 400 an empty line
            self._log.warning("monitor pass-through refused: %s", err.message)
            raise
        async with self.lock:
            if "hmp" in request:
                line = str(request["hmp"])
                self._log.info("human monitor pass-through: %s", line.split(None, 1)[0][:40])
                return await self.monitor.hmp(line)
            cmd = str(request["execute"])
            self._log.info("QMP pass-through: %s", cmd[:80])
            return await self.monitor.passthrough(cmd, request.get("arguments"))

    async def console_settled(self) -> None:
        """Wait (bounded) until the VNC console has opened, however it ends."""
        task = self._console_task
        if task is not None and not task.done():
            # asyncio.wait: neither the task's failure nor a timeout raises,
            # and the task is never cancelled by the waiter.
            await asyncio.wait({task}, timeout=self._shared.settings.qmp_timeout)

    async def reload_vnc(self, record: VmRecord) -> dict[str, Any]:
        async with self.lock:
            if self._console_task is not None and not self._console_task.done():
                await self._console_task
            return await self.console.reload(record)

    # -- stop / reboot -----------------------------------------------------------

    async def request_stop(self, timeout: float, to: TransitionTo) -> Transition:
        """Persist the deadline, then press the power button; forced at the deadline."""
        async with self._exclusive(LOCK_WAIT):
            self._alive()
            expire = now_ms() + int(timeout * 1000)
            merged: Transition | None = None

            def change(vm: VmRecord) -> None:
                nonlocal merged
                merged = transition.request(Transition.of(vm), to, expire)
                vm[transition.KEY] = merged.to_json()

            # The deadline is on disk before the guest hears anything: a
            # daemon killed from here on still forces the stop in time.
            await asyncio.to_thread(self._shared.store.update_locked, self.uuid, change)
            assert merged is not None
            self.transition = merged
            self._shared.bus.emit("transition_set", self.uuid, **merged.to_json())
            what = "reboot" if to == "start" else "stop"
            self._log.info("%s requested, forced at %d", what, merged.expire_ms)
            await self._powerdown()
            self._arm()
            return merged

    @contextlib.asynccontextmanager
    async def _exclusive(self, timeout: float) -> AsyncIterator[None]:
        """This VM's operation lock, then its vm.json lock, within ``timeout``
        in all (VmBusy past it): requests queued behind a held lock give up
        together, not one wait after another."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self.lock.acquire(), timeout)
        except TimeoutError:
            raise VmBusy(f"VM {self.uuid} is busy with another operation") from None
        try:
            async with vm_lock(self._shared.store, self.uuid, max(deadline - loop.time(), 0.0)):
                yield
        finally:
            self.lock.release()

    async def _powerdown(self) -> None:
        try:
            await self.monitor.powerdown()
        except VmadmError as err:
            # The deadline still holds; the timer re-sends and then forces.
            self._log.warning("system_powerdown failed: %s", err)

    def _arm(self) -> None:
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
        self._timer = self._shared.spawn(self._run_transition(), f"transition-{self.uuid}")

    async def _run_transition(self) -> None:
        while not self.exited.is_set():
            assert self.transition is not None
            left = self.transition.seconds_left(time.time())
            if left <= 0:
                break
            if await self._wait_exit(min(left, POWERDOWN_RESEND)):
                return
            if self.transition.seconds_left(time.time()) > 0.5:
                await self._powerdown()
        if not self.exited.is_set():
            await self.force_stop()

    async def force_stop(self) -> ForceStage | None:
        """quit over QMP, then SIGTERM, then SIGKILL, each bounded.

        Returns the step that ended qemu (None if it survived SIGKILL).
        """
        self._log.info("deadline reached; forcing the stop")
        self._shared.bus.emit("transition_forced", self.uuid)
        self._forced = "quit"
        with contextlib.suppress(VmadmError):
            await self.monitor.quit(timeout=QUIT_WAIT)
        if await self._wait_exit(QUIT_WAIT):
            return "quit"
        for stage, sig, wait in proc.SIGNAL_LADDER:
            self._forced = cast(ForceStage, stage)
            if self._pidfd < 0 or not proc.pidfd_signal(self._pidfd, sig):
                return self._forced  # already gone
            if await self._wait_exit(wait):
                return self._forced
        self._log.error("qemu survived SIGKILL")
        return None

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self.exited.wait(), timeout)
        except TimeoutError:
            return False
        return True
