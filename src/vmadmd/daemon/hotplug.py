"""Day-two changes applied to a running VM: its qemu made to match ``vm.json``.

``vmadm update`` (the VM layer) writes ``disks`` and ``nics`` first; then
the daemon, asked (``POST /vm/<uuid>?action=apply_devices``), brings the
running qemu as close to them as qemu allows, one change at a time, and
writes ``live_devices`` (``vm/devices.py``) after each change qemu
confirmed.  What it could not do stays the difference between the two:
``pending``, applied by the next boot.

- **A disk added**: opened here (``Disks.open_disk``: by name in the
  zonepath, no link followed, one link), passed to qemu as an fd set
  (``add-fd``), then ``blockdev-add`` and ``device_add`` of a virtio disk
  whose id is named after its file (``hp-disk3.qcow2``).  Only virtio disks
  are hot-plugged; an ide or scsi one waits for the next boot.
- **A disk grown**: ``block_resize`` (qemu grows the file through its fd,
  and the guest sees the new size at once).
- **A disk removed**: ``device_del``, then qemu's ``DEVICE_DELETED`` awaited
  up to a deadline (the guest must let the disk go); then ``blockdev-del``
  and ``remove-fd``, and the file deleted if the update said ``delete``.
  A guest that does not let go by the deadline keeps the disk: it stays in
  ``live_devices`` (pending), and the caller is told.  If the guest lets go
  later, the late ``DEVICE_DELETED`` triggers another pass.
- **A nic added**: its tap made on its tag's bridge (``vm/net.py``),
  opened here, passed with ``getfd`` and ``netdev_add``, then
  ``device_add`` with its MAC; **removed**: ``device_del`` (awaited as for
  disks), ``netdev_del``, the tap removed.
- **Model and boot order** changes apply at the next boot; a nic's
  ``ip``/``netmask``/``gateway``/``primary`` need nothing from qemu (the
  guest's ``sdc:nics`` is computed from ``vm.json``).

**Killed half-way.**  ``sync`` reads qemu's own device ids (``qom-list
/machine/peripheral``; every device has an id) and corrects
``live_devices`` from them: a device unplugged after its deadline, or one
qemu added just before a daemon was killed, is taken for what it is.  The
daemon reads back when it finds a VM running with something pending
(start-up, or a VM seen anew), after a step whose outcome qemu left
unknown, and at a late ``DEVICE_DELETED``; it hot-plugs nothing on its own
then: a change it finds undone stays pending, shown by ``vmadm get``,
until the next ``apply_devices`` or the next boot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.monitor import Monitor
from vmadmd.errors import InvalidParameter, QmpFailed, QmpTimeout, StartFailed, VmadmError
from vmadmd.vm import devices, net
from vmadmd.vm.disks import Disks, close_disks, delete_disk
from vmadmd.vm.store import Store, VmRecord

log = logging.getLogger("vmadmd.hotplug")

UNPLUG_TIMEOUT = 10.0  # for the guest to let a device go
MAX_UNPLUG_TIMEOUT = 600.0


class Hotplug:
    """One running VM's device changes (the supervisor holds its lock around each pass)."""

    def __init__(
        self,
        uuid: str,
        store: Store,
        disks: Disks,
        monitor: Monitor,
        nic_tags: str,
        user_net: str,
    ) -> None:
        self.uuid = uuid
        self.store = store
        self.disks = disks
        self.monitor = monitor
        self.nic_tags = nic_tags
        self.user_net = user_net
        self.paths = store.paths(uuid)
        self._log = vm_log(log, uuid)

    async def _change_live(self, change: Callable[[dict[str, Any]], None]) -> VmRecord:
        """``live_devices`` changed in ``vm.json`` (under the VM's lock)."""

        def update(vm: VmRecord) -> None:
            live = devices.live_of(vm)
            if live is not None:
                change(live)

        async with vm_lock(self.store, self.uuid):
            return await asyncio.to_thread(self.store.update_locked, self.uuid, update)

    # -- reading qemu back --------------------------------------------------------------

    async def sync(self, *, only_pending: bool = False) -> VmRecord | None:
        """``live_devices`` corrected from qemu's own devices; None for a VM
        whose qemu was started before ``live_devices`` existed.

        ``only_pending``: not a word to qemu when nothing is pending (a
        daemon killed half-way through a change always leaves it pending:
        ``vm.json`` is written first), so finding 1,000 VMs running at
        start-up costs no query each."""
        record = await asyncio.to_thread(self.store.load, self.uuid)
        live = devices.live_of(record)
        if live is None:
            return None
        if only_pending and not devices.pending_of(record):
            return record
        ids = await self.monitor.device_ids()
        gone_disks = [d for d in live["disks"] if d.get("node") not in ids]
        gone_nics = [n for n in live["nics"] if n.get("id") not in ids]
        known = {d.get("node") for d in live["disks"]} | {n.get("id") for n in live["nics"]}
        found_disks = [
            dict(d, node=devices.hot_node(d["path"]))
            for d in record.get("disks", [])
            if devices.hot_node(d["path"]) in ids - known
        ]
        found_nics = [
            dict(n, id=devices.hot_nic_id(n["mac"]))
            for n in record.get("nics", [])
            if devices.hot_nic_id(n["mac"]) in ids - known
        ]
        if not (gone_disks or gone_nics or found_disks or found_nics):
            return record
        fdsets = await self.monitor.fdsets()
        for disk in found_disks:
            node = disk["node"]
            disk["fdsets"] = fdsets.get(node, []) + fdsets.get(f"{node}-image", [])
        for disk in gone_disks:  # the guest let it go after its deadline
            await self._forget_disk(disk)
        for nic in gone_nics:
            await self.monitor.delete_netdev(str(nic["id"]))
            await asyncio.to_thread(net.remove_taps, [nic], _uid(record))
        self._log.info(
            "devices read back from qemu: %d gone, %d found",
            len(gone_disks) + len(gone_nics), len(found_disks) + len(found_nics),
        )  # fmt: skip

        def fix(live: dict[str, Any]) -> None:
            gone_paths = {d.get("path") for d in gone_disks}
            gone_macs = {n.get("mac") for n in gone_nics}
            live["disks"] = [d for d in live["disks"] if d.get("path") not in gone_paths]
            live["nics"] = [n for n in live["nics"] if n.get("mac") not in gone_macs]
            live["disks"] += [_live_disk(d) for d in found_disks]
            live["nics"] += [_live_nic(n) for n in found_nics]

        return await self._change_live(fix)

    async def _forget_disk(self, disk: dict[str, Any]) -> None:
        """A disk qemu's device no longer uses: its nodes and fd sets go, and
        its file if it was removed with ``delete``."""
        node = str(disk.get("node"))
        await self.monitor.delete_nodes([node, f"{node}-file", f"{node}-image",
                                         f"{node}-image-file"])  # fmt: skip
        for fdset in disk.get("fdsets", []):
            if isinstance(fdset, int):
                await self.monitor.remove_fdset(fdset)
        if disk.get("delete"):
            await asyncio.to_thread(delete_disk, self.paths, str(disk["path"]))

    # -- one pass ---------------------------------------------------------------------

    async def apply(self, unplug_timeout: float = UNPLUG_TIMEOUT) -> dict[str, Any]:
        """Bring qemu to ``vm.json``'s disks and nics where it can; what was
        applied, what failed (and why), what is still pending."""
        applied: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        # No read-back first: live_devices is already right (read back when
        # the daemon found the VM, after a failed step, at a late unplug),
        # and the guest should see the change without a query's delay.
        record = await asyncio.to_thread(self.store.load, self.uuid)
        if devices.live_of(record) is None:
            return {
                "applied": [], "pending": devices.pending_of(record),
                "failed": [{"error": "this VM's qemu was started by an older vmadmd: "
                                     "device changes apply at its next boot"}],
            }  # fmt: skip
        for change in devices.pending_of(record):
            kind = change["change"]
            step = {
                "add_disk": self._add_disk,
                "resize_disk": self._resize_disk,
                "remove_disk": self._remove_disk,
                "add_nic": self._add_nic,
                "remove_nic": self._remove_nic,
            }.get(kind)
            if step is None:
                continue  # model, boot order: at the next boot
            try:
                record = await step(record, change, unplug_timeout)
            except (VmadmError, OSError) as err:
                msg = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                self._log.warning("%s not applied live: %s", kind, msg)
                failed.append({**change, "error": msg})
                if isinstance(err, (QmpTimeout, QmpFailed)):  # qemu may have acted
                    with contextlib.suppress(VmadmError):
                        record = await self.sync() or record
                continue
            applied.append(change)
        record = await asyncio.to_thread(self.store.load, self.uuid)
        return {"applied": applied, "failed": failed, "pending": devices.pending_of(record)}

    # -- the steps --------------------------------------------------------------------

    async def _add_disk(
        self, record: VmRecord, change: dict[str, Any], _timeout: float
    ) -> VmRecord:
        disk = _find(record.get("disks"), "path", change["path"])
        if disk.get("model", "virtio") != "virtio":
            raise InvalidParameter(
                f"a {disk.get('model')} disk is not hot-plugged (only virtio): at the next boot"
            )
        node = devices.hot_node(disk["path"])
        fds = await asyncio.to_thread(self.disks.open_disk, "disk", disk, self.paths.zonepath)
        fdsets: list[int] = []
        try:
            image: tuple[int, str] | None = None
            if fds.image_fd is not None:
                fdsets.append(await self.monitor.add_fdset(fds.image_fd, f"{node}-image"))
                image = (fdsets[-1], fds.image_format or "raw")
            fdsets.append(await self.monitor.add_fdset(fds.fd, node))
            await self.monitor.plug_disk(
                node, fdsets[-1], disk.get("image_format", "qcow2"), image=image
            )
        except BaseException:
            for fdset in fdsets:
                with contextlib.suppress(VmadmError):
                    await self.monitor.remove_fdset(fdset)
            raise
        finally:
            close_disks([fds])  # qemu has its own copies
        entry = _live_disk(dict(disk, node=node, fdsets=fdsets))
        return await self._change_live(lambda live: live["disks"].append(entry))

    async def _resize_disk(
        self, record: VmRecord, change: dict[str, Any], _timeout: float
    ) -> VmRecord:
        live = devices.live_of(record) or {"disks": []}
        entry = _find(live["disks"], "path", change["path"])
        size = int(change["size"])
        await self.monitor.resize_disk(str(entry["node"]), size << 20)

        def grown(live: dict[str, Any]) -> None:
            for disk in live["disks"]:
                if disk.get("path") == change["path"]:
                    disk["size"] = size

        return await self._change_live(grown)

    async def _remove_disk(
        self, record: VmRecord, change: dict[str, Any], timeout: float
    ) -> VmRecord:
        live = devices.live_of(record) or {"disks": []}
        entry = _find(live["disks"], "path", change["path"])
        node = str(entry["node"])
        if not await self.monitor.unplug(node, timeout):
            raise QmpFailed(
                f"the guest did not let disk {change['path']} go within {timeout:g} s: it "
                "stays attached until the next boot (or until the guest lets it go)"
            )
        await self._forget_disk(entry)
        return await self._change_live(
            lambda live: live.update(
                disks=[d for d in live["disks"] if d.get("path") != change["path"]]
            )
        )

    async def _add_nic(self, record: VmRecord, change: dict[str, Any], _timeout: float) -> VmRecord:
        nic = _find(record.get("nics"), "mac", change["mac"])
        dev_id = devices.hot_nic_id(nic["mac"])
        uid = _uid(record)
        tap_fd: int | None = None
        if net.is_tap(nic):
            if uid is None or not nic.get("ifname"):
                raise InvalidParameter("the nic has no tap name: at the next boot")
            tags = net.parse_nic_tags(self.nic_tags)
            try:
                await asyncio.to_thread(net.create_taps, [nic], tags, uid)
                tap_fd = await asyncio.to_thread(net.open_tap, str(nic["ifname"]))
            except StartFailed as err:
                raise InvalidParameter(str(err)) from None
        try:
            await self.monitor.plug_nic(
                dev_id, str(nic.get("model", "virtio")), str(nic["mac"]), tap_fd=tap_fd,
                restrict=self.user_net != "nat",
            )  # fmt: skip
        except BaseException:
            if tap_fd is not None:
                await asyncio.to_thread(net.remove_taps, [nic], uid)
            raise
        finally:
            if tap_fd is not None:
                os.close(tap_fd)
        entry = _live_nic(dict(nic, id=dev_id))
        return await self._change_live(lambda live: live["nics"].append(entry))

    async def _remove_nic(
        self, record: VmRecord, change: dict[str, Any], timeout: float
    ) -> VmRecord:
        live = devices.live_of(record) or {"nics": []}
        entry = _find(live["nics"], "mac", change["mac"])
        dev_id = str(entry["id"])
        if not await self.monitor.unplug(dev_id, timeout):
            raise QmpFailed(
                f"the guest did not let nic {change['mac']} go within {timeout:g} s: it stays "
                "until the next boot (or until the guest lets it go)"
            )
        await self.monitor.delete_netdev(dev_id)
        await asyncio.to_thread(net.remove_taps, [entry], _uid(record))
        return await self._change_live(
            lambda live: live.update(
                nics=[n for n in live["nics"] if n.get("mac") != change["mac"]]
            )
        )


def _find(items: object, key: str, value: object) -> dict[str, Any]:
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and item.get(key) == value:
            return item
    raise InvalidParameter(f"no device with {key} {value} (changed meanwhile)")


def _live_disk(disk: dict[str, Any]) -> dict[str, Any]:
    keys = ("path", "node", "fdsets", "model", "boot", "size", "image_uuid")
    return {k: disk[k] for k in keys if k in disk}


def _live_nic(nic: dict[str, Any]) -> dict[str, Any]:
    return {k: nic[k] for k in ("mac", "id", "model", "netdev", "ifname", "nic_tag") if k in nic}


def _uid(record: VmRecord) -> int | None:
    uid = record.get("zone_uid")
    return uid if isinstance(uid, int) and uid > 0 else None


def parse_unplug_timeout(raw: str | None) -> float:
    if raw is None or raw == "":
        return UNPLUG_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        raise InvalidParameter("unplug_timeout must be a number of seconds") from None
    if not 0 < value <= MAX_UNPLUG_TIMEOUT:
        raise InvalidParameter(f"unplug_timeout must be in (0, {MAX_UNPLUG_TIMEOUT:g}] s")
    return value
