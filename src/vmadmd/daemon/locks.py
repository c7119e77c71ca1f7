"""Taking a VM's lock from the daemon without tying up a thread.

The lock is a ``flock`` on a file in the zonepath (see ``store``), shared
with every ``vmadm``.  A blocking ``flock`` in a worker thread would wait as
long as whoever holds it (a ``vmadm stop -F`` suspended with Ctrl-Z holds it
for good), and a handful of such waits fill the default thread pool, after
which every VM's exits and stops queue behind them.  Here the lock is tried
without blocking, from the event loop, with back-off, up to a deadline that
turns into ``VmBusy`` (409) for that VM alone.  Only the short work done
under the lock (read, change, atomic write of ``vm.json``) goes to a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from vmadmd.errors import VmBusy
from vmadmd.vm.store import Store

LOCK_WAIT = 10.0  # an API request's wait for a VM's lock
FIRST_DELAY = 0.002
MAX_DELAY = 0.2


@contextlib.asynccontextmanager
async def vm_lock(store: Store, uuid: str, timeout: float = LOCK_WAIT) -> AsyncIterator[None]:
    """Hold the VM's lock for the block; VmBusy when it stays taken ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = FIRST_DELAY
    while (fd := store.try_lock(uuid)) is None:
        if loop.time() >= deadline:
            raise VmBusy(
                f"VM {uuid} is busy: its lock has been held by another process for {timeout:g} s"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, MAX_DELAY)
    try:
        yield
    finally:
        os.close(fd)
