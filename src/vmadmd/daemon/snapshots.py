"""Snapshots, as the daemon takes them: live through QMP, else with qemu-img.

Every operation holds the VM's lock (the ``flock`` every ``vmadm`` takes),
so a VM cannot be booted or stopped by anyone else in the middle of it: what
was running when the lock was taken is running until it is released.  On a
running VM, create and delete go to its qemu (one ``transaction`` for all
disks: ``Monitor.snapshot_disks``); on a stopped one, to ``qemu-img`` as the
VM's own user (``vm/snapshots.py``).  The list in ``vm.json`` is written
after qemu or qemu-img has acted.

Rollback is SmartOS's: a running VM is stopped first, through the stop
machinery (a transition with its deadline on disk, forced at once: the disk
state the guest would flush is about to be thrown away), every disk is
restored, the snapshots newer than the one rolled back to are deleted, and
the VM is booted again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.errors import VmadmError, WrongState
from vmadmd.vm import snapshots
from vmadmd.vm.store import VmRecord

if TYPE_CHECKING:
    from vmadmd.daemon.manager import Manager
    from vmadmd.daemon.supervisor import VmSupervisor

log = logging.getLogger("vmadmd.snapshots")

STOP_WAIT = 60.0  # for a forced stop's qemu to be gone and settled


class SnapshotService:
    """The snapshot operations of one daemon."""

    def __init__(self, manager: Manager) -> None:
        self._m = manager

    def list(self, uuid: str) -> list[dict[str, Any]]:
        return snapshots.entries(self._m.load(uuid))

    async def _supervisor(self, uuid: str, record: VmRecord) -> VmSupervisor | None:
        """The VM's supervisor if its qemu runs (the caller holds the VM's lock)."""
        m = self._m
        pid = await asyncio.to_thread(m.layer.pid, uuid, record)
        if pid is None:
            return None
        return await m.running(uuid)

    async def create(self, uuid: str, name: str) -> dict[str, Any]:
        snapshots.validate_name(name)
        m = self._m
        paths = m.store.paths(uuid)
        m.load(uuid)  # 404 before waiting for a lock
        async with vm_lock(m.store, uuid):
            record = m.load(uuid)
            snapshots.check_new(record, name)
            sup = await self._supervisor(uuid, record)
            consistency = "crash"
            if sup is not None:
                names = snapshots.disk_names(record, paths)
                if await sup.snapshot_disks(snapshots.node_names(record), name):
                    consistency = "filesystem"
                entry = snapshots.new_entry(name, snapshots.referenced(paths, names))
            else:
                entry = await asyncio.to_thread(snapshots.create_stopped, paths, record, name)

            def add(vm: VmRecord) -> None:
                vm[snapshots.KEY] = [*snapshots.entries(vm), entry]

            await asyncio.to_thread(m.store.update_locked, uuid, add)
        vm_log(log, uuid).info("snapshot %s taken (%s)", name,
                               "live" if sup is not None else "stopped")  # fmt: skip
        m.bus.emit("snapshot_created", uuid, live=sup is not None,
                   consistency=consistency if sup is not None else "stopped", **entry)  # fmt: skip
        return entry

    async def delete(self, uuid: str, name: str) -> None:
        snapshots.validate_name(name)
        m = self._m
        paths = m.store.paths(uuid)
        m.load(uuid)
        async with vm_lock(m.store, uuid):
            record = m.load(uuid)
            snapshots.find(record, name)
            sup = await self._supervisor(uuid, record)
            if sup is not None:
                await sup.delete_disk_snapshot(snapshots.node_names(record), name)
            else:
                await asyncio.to_thread(snapshots.delete_stopped, paths, record, name)

            def drop(vm: VmRecord) -> None:
                vm[snapshots.KEY] = [s for s in snapshots.entries(vm) if s["name"] != name]

            await asyncio.to_thread(m.store.update_locked, uuid, drop)
        vm_log(log, uuid).info("snapshot %s deleted", name)
        m.bus.emit("snapshot_deleted", uuid, name=name)

    async def rollback(self, uuid: str, name: str) -> dict[str, Any]:
        """Returns ``{"name", "deleted": [newer names], "restarted": bool}``."""
        snapshots.validate_name(name)
        m = self._m
        paths = m.store.paths(uuid)
        snapshots.find(m.load(uuid), name)  # 404s before the VM is stopped
        sup = m.vms.get(uuid)
        if sup is None:
            with contextlib.suppress(WrongState):
                sup = await m.running(uuid)
        was_running = sup is not None
        if sup is not None:
            # Through the stop machinery: the transition is on disk first,
            # and its deadline (now) forces the stop.
            await sup.request_stop(0.001, "stopped")
            await self._gone(uuid)
        async with vm_lock(m.store, uuid):
            record = m.load(uuid)
            snapshots.find(record, name)
            if await asyncio.to_thread(m.layer.pid, uuid, record) is not None:
                raise WrongState(
                    f"VM {uuid} was started again during its rollback: not rolled back"
                )
            deleted = await asyncio.to_thread(snapshots.rollback_stopped, paths, record, name)

            def keep_older(vm: VmRecord) -> None:
                vm[snapshots.KEY] = [s for s in snapshots.entries(vm) if s["name"] not in deleted]

            await asyncio.to_thread(m.store.update_locked, uuid, keep_older)
            if was_running:
                await asyncio.to_thread(m.layer.start_locked, uuid, set_autoboot=False)
        if was_running:
            await m.refresh(uuid)
        vm_log(log, uuid).info("rolled back to snapshot %s (deleted: %s)", name, deleted)
        m.bus.emit("snapshot_rolled_back", uuid, name=name, deleted=deleted,
                   restarted=was_running)  # fmt: skip
        return {"name": name, "deleted": deleted, "restarted": was_running}

    async def _gone(self, uuid: str) -> None:
        """Until the VM's qemu has exited and its exit is settled in vm.json."""
        m = self._m
        deadline = time.monotonic() + STOP_WAIT
        while m.is_running(uuid) or m.is_exiting(uuid):
            if time.monotonic() > deadline:
                raise VmadmError(f"VM {uuid} did not stop within {STOP_WAIT:.0f} s")
            await asyncio.sleep(0.02)
