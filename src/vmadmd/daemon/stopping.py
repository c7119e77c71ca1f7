"""One VM's pending stop or reboot: its deadline, kept, pressed for, forced.

The deadline is written to ``vm.json`` before the guest hears anything, so
a daemon killed at any point still forces the stop in time when it comes
back (the supervisor re-arms a transition found on disk).  Until the
deadline the power button is pressed again every couple of seconds (a
guest still booting can miss one), beside the timer and never in its way;
at the deadline the stop is forced: ``quit`` over QMP when the connection is
up, then SIGTERM, then SIGKILL through the qemu's pidfd, each step bounded.
Nothing here waits for QMP to force: a qemu whose monitor never connects
ends on time all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from typing import cast

from vmadmd.daemon.ending import ForceStage
from vmadmd.daemon.locks import LOCK_WAIT, vm_lock
from vmadmd.daemon.monitor import Monitor
from vmadmd.daemon.settings import Shared
from vmadmd.errors import VmadmError, VmBusy, WrongState
from vmadmd.vm import proc, transition
from vmadmd.vm.layer import now_ms
from vmadmd.vm.store import VmRecord
from vmadmd.vm.transition import Transition, TransitionTo

POWERDOWN_RESEND = 2.0  # a guest still booting can miss one ACPI press
QUIT_WAIT = 2.0


class Stopping:
    """A running VM's stop or reboot, from request to forced end."""

    def __init__(
        self,
        uuid: str,
        shared: Shared,
        monitor: Monitor,
        exited: asyncio.Event,
        send_signal: Callable[[signal.Signals], bool],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.uuid = uuid
        self._shared = shared
        self._monitor = monitor
        self._exited = exited
        self._signal = send_signal  # False once qemu is gone
        self._log = log
        # Stops and reboots queue among themselves only: a stop never waits
        # behind a QMP operation (a screendump stuck on a wedged qemu must
        # not keep its deadline from being set).
        self._stop_lock = asyncio.Lock()
        self.transition: Transition | None = None
        self.forced: ForceStage | None = None  # the forcing step last taken
        self._timer: asyncio.Task[None] | None = None

    def resume(self, record: VmRecord) -> None:
        """Re-arm a transition found on disk (a daemon restarted meanwhile)."""
        self.transition = Transition.of(record)
        if self.transition is not None:
            self.arm()

    def cancel(self) -> None:
        """The qemu has exited: the timer has nothing left to do."""
        if self._timer is not None and self._timer is not asyncio.current_task():
            self._timer.cancel()

    async def request(self, timeout: float, to: TransitionTo) -> Transition:
        """Persist the deadline and arm it, then press the power button.

        From the moment the deadline is on disk, the stop is forced at it
        whatever else happens: the timer runs on its own (the power button
        below may wait for a QMP connection that never comes) and forcing
        needs nothing but this qemu's pidfd.
        """
        async with self._exclusive(LOCK_WAIT, self._stop_lock):
            if self._exited.is_set():
                raise WrongState(f"VM {self.uuid} is not running")
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
            self.arm()
            await self._powerdown()
            return merged

    @contextlib.asynccontextmanager
    async def _exclusive(self, timeout: float, lock: asyncio.Lock) -> AsyncIterator[None]:
        """``lock``, then the VM's vm.json lock, within ``timeout`` in all
        (VmBusy past it): requests queued behind a held lock give up
        together, not one wait after another."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(lock.acquire(), timeout)
        except TimeoutError:
            raise VmBusy(f"VM {self.uuid} is busy with another operation") from None
        try:
            async with vm_lock(self._shared.store, self.uuid, max(deadline - loop.time(), 0.0)):
                yield
        finally:
            lock.release()

    async def _powerdown(self) -> None:
        try:
            await self._monitor.powerdown()
        except VmadmError as err:
            # The deadline still holds; the timer re-sends and then forces.
            self._log.warning("the power button press failed: %s", err)

    def arm(self) -> None:
        if self._timer is not None and not self._timer.done():
            self._timer.cancel()
        self._timer = self._shared.spawn(self._run_transition(), f"transition-{self.uuid}")

    async def _run_transition(self) -> None:
        while not self._exited.is_set():
            assert self.transition is not None
            left = self.transition.seconds_left(time.time())
            if left <= 0:
                break
            if await self._wait_exit(min(left, POWERDOWN_RESEND)):
                return
            if self.transition.seconds_left(time.time()) > 0.5 and self._monitor.ready:
                # Beside the timer, never in its way: a press that waits on
                # a slow qemu must not push the deadline back.
                self._shared.spawn(self._powerdown(), f"powerdown-{self.uuid}")
        if not self._exited.is_set():
            await self.force()

    async def force(self) -> ForceStage | None:
        """quit over QMP, then SIGTERM, then SIGKILL, each bounded.

        Returns the step that ended qemu (None if it survived SIGKILL).
        """
        self._log.info("deadline reached; forcing the stop")
        self._shared.bus.emit("transition_forced", self.uuid)
        if self._monitor.ready:
            # `quit` only over a connection that is up: waiting for one
            # would spend the forcing ladder's time on a qemu that may never
            # answer (the signals below need no QMP).
            self.forced = "quit"
            with contextlib.suppress(VmadmError):
                await self._monitor.quit(timeout=QUIT_WAIT)
            if await self._wait_exit(QUIT_WAIT):
                return "quit"
        for stage, sig, wait in proc.SIGNAL_LADDER:
            self.forced = cast(ForceStage, stage)
            if not self._signal(sig):
                return self.forced  # already gone
            if await self._wait_exit(wait):
                return self.forced
        self._log.error("qemu survived SIGKILL")
        return None

    async def _wait_exit(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True
