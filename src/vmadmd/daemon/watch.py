"""The sysevent analogue: inotify on the zones root and on each zonepath.

A VM appearing or disappearing shows as a directory created or removed in
the zones root; a VM starting shows as its ``vm.json`` being replaced (the
VM layer records ``boot_timestamp`` once qemu is up).  Exits are not
watched here: each running qemu has a pidfd in the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from asyncinotify import Inotify, Mask, Watch

from vmadmd.daemon.logs import vm_log
from vmadmd.vm.store import is_uuid

log = logging.getLogger("vmadmd.watch")

ROOT_MASK = Mask.CREATE | Mask.DELETE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.ONLYDIR
# vm.json is only ever renamed into place (MOVED_TO).  No CLOSE_WRITE: the
# VM's user may open and close its own disks in the zonepath as fast as it
# likes, and each close would be an event (the second review flooded the
# queue that way, forcing a rescan of every VM each time).
ZONE_MASK = Mask.MOVED_TO | Mask.DELETE | Mask.ONLYDIR


class ZonesWatcher:
    def __init__(
        self,
        zones_root: str,
        on_change: Callable[[str], Awaitable[None]],
        on_overflow: Callable[[], Coroutine[Any, Any, None]],
    ) -> None:
        self.zones_root = zones_root
        self._on_change = on_change
        self._on_overflow = on_overflow
        self._inotify: Inotify | None = None
        self._zone_watches: dict[str, Watch] = {}
        self._watch_uuid: dict[Watch, str] = {}
        self._task: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()
        self._overflow_task: asyncio.Task[None] | None = None
        self._rescan_again = False

    def start(self) -> None:
        """Start watching (synchronously: nothing is missed after this returns)."""
        os.makedirs(self.zones_root, exist_ok=True)
        self._inotify = Inotify()
        self._root_watch = self._inotify.add_watch(self.zones_root, ROOT_MASK)
        for name in os.listdir(self.zones_root):
            if is_uuid(name):
                self._watch_zone(name)
        self._task = asyncio.create_task(self._run(), name="zones-watcher")

    def _watch_zone(self, uuid: str) -> None:
        assert self._inotify is not None
        if uuid in self._zone_watches:
            return
        try:
            watch = self._inotify.add_watch(os.path.join(self.zones_root, uuid), ZONE_MASK)
        except OSError:
            return  # removed meanwhile, or not a directory
        self._zone_watches[uuid] = watch
        self._watch_uuid[watch] = uuid

    def _unwatch_zone(self, uuid: str) -> None:
        watch = self._zone_watches.pop(uuid, None)
        if watch is not None:
            self._watch_uuid.pop(watch, None)
        if watch is not None and self._inotify is not None:
            with contextlib.suppress(OSError, ValueError):
                self._inotify.rm_watch(watch)

    async def _run(self) -> None:
        assert self._inotify is not None
        async for event in self._inotify:
            try:
                self._handle(event.mask, event.watch, event.name)
            except Exception:
                log.exception("inotify event handling failed")

    def _handle(self, mask: Mask, watch: Watch | None, name: os.PathLike[str] | None) -> None:
        if mask & Mask.Q_OVERFLOW:
            # One rescan at a time, and one more after it at most.
            if self._overflow_task is not None and not self._overflow_task.done():
                self._rescan_again = True
                return
            log.warning("inotify queue overflowed; rescanning every VM")
            self._overflow_task = asyncio.create_task(self._rescan())
            return
        if mask & Mask.IGNORED:
            return
        entry = os.fspath(name) if name is not None else ""
        if watch is self._root_watch:
            if not is_uuid(entry):
                return
            if mask & (Mask.CREATE | Mask.MOVED_TO):
                self._watch_zone(entry)
            elif mask & (Mask.DELETE | Mask.MOVED_FROM):
                self._unwatch_zone(entry)
            self._notify(entry)
            return
        uuid = self._watch_uuid.get(watch) if watch is not None else None
        if uuid is not None and entry == "vm.json":
            self._notify(uuid)

    async def _rescan(self) -> None:
        while True:
            self._rescan_again = False
            try:
                await self._on_overflow()
            except Exception:
                log.exception("rescan after an inotify overflow failed")
            if not self._rescan_again:
                return

    def _notify(self, uuid: str) -> None:
        """Coalesce: at most one refresh running per VM, and one more queued."""
        if uuid in self._pending:
            self._dirty.add(uuid)
            return
        self._pending[uuid] = asyncio.create_task(self._refresh(uuid), name=f"refresh-{uuid}")

    async def _refresh(self, uuid: str) -> None:
        try:
            while True:
                self._dirty.discard(uuid)
                try:
                    await self._on_change(uuid)
                except Exception:
                    vm_log(log, uuid).exception("refresh failed")
                if uuid not in self._dirty:
                    return
        finally:
            self._pending.pop(uuid, None)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._pending.values()):
            task.cancel()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
