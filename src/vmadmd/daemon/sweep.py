"""The start-up sweep: a (re)started daemon picks up every VM.

Until the sweep has looked at a VM, a running one would read as stopped, so
the API holds what depends on VM states.  A request about one VM waits for
that VM alone: it is picked up for the request if the sweep has not reached
it (one refresh per VM, shared by the sweep and the requests), so a daemon
restarting with a thousand VMs answers for any of them within a fraction of
a second instead of after the whole sweep.  VMs with a stop or reboot
pending go first: their deadlines run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

log = logging.getLogger("vmadmd")

SWEEP_WAIT = 10.0  # seconds a request waits for the start-up sweep, at most
BATCH = 32  # VMs picked up at once, the loop yielding between batches

Refresh = Callable[[str], Coroutine[Any, Any, None]]


async def in_batches(
    refresh: Callable[[str], Awaitable[None]], uuids: Iterable[str], batch: int = BATCH
) -> None:
    """``refresh`` every VM, in batches, yielding between them, so the API
    answers while a daemon with a thousand VMs is still picking them up."""
    pending = list(uuids)
    for i in range(0, len(pending), batch):
        await asyncio.gather(*(refresh(u) for u in pending[i : i + batch]))
        await asyncio.sleep(0)


class StartupSweep:
    """Picks up every VM once at start; ``done`` is set after (even on failure)."""

    def __init__(
        self,
        refresh: Refresh,
        list_uuids: Callable[[], list[str]],
        pending: Callable[[str], bool],
    ) -> None:
        self._refresh = refresh
        self._list_uuids = list_uuids
        self._pending = pending  # has a stop or reboot pending: goes first
        self.done = asyncio.Event()
        self._first: dict[str, asyncio.Task[None]] = {}  # each VM's one refresh

    async def run(self) -> list[str]:
        """Sweep every VM; returns their uuids."""
        try:
            uuids = self._list_uuids()
            ordered = sorted(uuids, key=lambda u: not self._pending(u))
            await in_batches(self._pick_up, ordered)
            return uuids
        finally:
            self.done.set()
            self._first.clear()

    def _pick_up(self, uuid: str) -> asyncio.Task[None]:
        task = self._first.get(uuid)
        if task is None:
            task = self._first[uuid] = asyncio.create_task(
                self._refresh(uuid), name=f"pick-up-{uuid}"
            )
        return task

    async def wait_all(self) -> None:
        """Wait for the whole sweep; past ``SWEEP_WAIT`` answer with what is known."""
        try:
            await asyncio.wait_for(self.done.wait(), SWEEP_WAIT)
        except TimeoutError:
            log.warning("start-up sweep still running after %g s: answering anyway", SWEEP_WAIT)

    async def wait_for(self, uuid: str) -> None:
        """Wait until this one VM is picked up (now, if the sweep is elsewhere)."""
        if self.done.is_set():
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._pick_up(uuid)), SWEEP_WAIT)
        except TimeoutError:
            log.warning("VM %s not picked up after %g s: answering anyway", uuid, SWEEP_WAIT)
