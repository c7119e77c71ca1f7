"""How a VM's qemu ended: told from what the daemon saw, and recorded once.

``ending_of`` decides (pure); ``settle_record`` writes it to ``vm.json`` with
the pending transition cleared, under the VM's lock; ``CrashLog`` decides
whether a crashed VM that asks for it (``restart_on_crash``) is booted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any, Literal, NamedTuple

from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.monitor import Shutdown
from vmadmd.daemon.settings import CrashRestart, Shared
from vmadmd.errors import VmadmError, VmNotFound
from vmadmd.vm import ending as ending_mod
from vmadmd.vm import launch, net, transition
from vmadmd.vm.ending import Ending
from vmadmd.vm.layer import iso_now, running_pid
from vmadmd.vm.store import VmRecord
from vmadmd.vm.transition import Transition

log = logging.getLogger("vmadmd.supervisor")

ForceStage = Literal["quit", "sigterm", "sigkill"]

SETTLE_LOCK_WAIT = 3600.0  # an exit is recorded once the VM's lock is free


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


def ending_of(
    shutdown: Shutdown | None,
    forced: ForceStage | None,
    pending: bool,
    status: int | None = None,
) -> Ending:
    """How a VM ended, from what the daemon saw of it.

    ``shutdown`` is what qemu's SHUTDOWN event said (None when none came),
    ``forced`` the forcing step the daemon last took, ``pending`` whether a
    stop or reboot was asked for, ``status`` qemu's wait status as its waiter
    recorded it (None: not known).
    """
    if shutdown is not None and shutdown.cause == "panic":
        return Ending("panic")
    if forced is not None:
        return Ending.stopped(forced)
    if shutdown is None and status != 0:
        return Ending.crashed(status)
    # The guest shut down, or qemu exited cleanly (status 0) with its
    # SHUTDOWN event unseen by the monitor.
    if shutdown is None or shutdown.cause == "guest":
        return Ending.stopped("acpi") if pending else Ending("poweroff")
    # qemu was told to go by someone else: a `quit` on its monitor, a signal.
    stage = {"quit": "quit", "signal": "sigterm"}.get(shutdown.cause, shutdown.detail or "host")
    return Ending.stopped(stage, by="host")


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
        last = vm.get(ending_mod.KEY)
        boot = vm.get("boot_timestamp", "")
        if isinstance(last, dict) and str(last.get("time", "")) >= str(boot):
            recorded = Ending.from_json(last)
        elif ending is not None:
            vm[ending_mod.KEY] = ending.to_json(iso_now())
            recorded = ending

    try:
        # However long another process holds the VM's lock, the exit is
        # recorded once it lets go: waiting costs no thread.
        async with vm_lock(shared.store, uuid, SETTLE_LOCK_WAIT):
            await asyncio.to_thread(shared.store.update_locked, uuid, change)
    except VmadmError as err:
        # Deleted meanwhile, or unreadable: nothing to settle.
        vm_log(log, uuid).info("exited; record not updated: %s", err)
        shared.bus.emit("exited", uuid, **(ending.fields() if ending else {}))
        return Settled(None, None)
    how = recorded.fields() if recorded is not None else {}
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


async def waiter_status(zonepath: str) -> int | None:
    """qemu's wait status from its waiter, which writes it a moment after
    the exit the pidfd showed (None after a second without it, and at once
    for a qemu with no waiter)."""
    loop = asyncio.get_running_loop()
    deadline, delay = loop.time() + 1.0, 0.001
    while loop.time() < deadline:
        status = launch.exit_status(zonepath)
        if status is not None:
            return status
        if not launch.has_waiter(zonepath):
            return None
        await asyncio.sleep(delay)  # it comes within a few ms: look often at first
        delay = min(delay * 2, 0.02)
    return None


async def release_unless_restarted(shared: Shared, uuid: str, nics: list[Any]) -> None:
    """After an exit: the VM's taps and cgroup go with its qemu (best effort:
    the next start redoes both).

    Under the VM's lock, and not once the VM runs again: a start that came
    as soon as the record said "stopped" has made both anew, and removing
    them would cut its network and fail its launch.
    """
    vlog = vm_log(log, uuid)

    def release() -> None:
        store = shared.store
        with contextlib.suppress(VmadmError):  # deleted meanwhile: its taps are still ours
            record = store.load(uuid)
            if running_pid(store, uuid, record):
                vlog.info("started again before its exit was cleaned up: kept its taps")
                return
        for cleanup in (
            functools.partial(net.remove_taps, nics),
            functools.partial(shared.cgroups.remove, uuid),
        ):
            try:
                cleanup()
            except Exception:
                vlog.exception("cleanup after exit failed")

    try:
        async with vm_lock(shared.store, uuid, SETTLE_LOCK_WAIT):
            await asyncio.to_thread(release)
    except VmNotFound:
        # Deleted (`vmadm delete`, a VM migrated away or an incoming one
        # discarded): its deleter removed its taps and cgroup.
        vlog.info("deleted: nothing left to clean up")
    except Exception:
        vlog.exception("cleanup after exit failed")
