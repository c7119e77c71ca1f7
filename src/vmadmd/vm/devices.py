"""Day-two device changes: SmartOS's ``add_disks`` / ``update_disks`` /
``remove_disks`` / ``add_nics`` / ``update_nics`` / ``remove_nics``, checked
against a VM's record, and what is still pending.

Two lists say what a VM has.  ``disks`` and ``nics`` in ``vm.json`` are what
the user asked for: an update changes them first (``vm.json`` is written
before qemu hears anything), and the next boot builds qemu from them.
``live_devices`` (internal, never shown as such) is what the VM's qemu has
*now*: written at each boot from ``disks``/``nics``, then changed by the
daemon after each hot-plug or unplug qemu confirmed.  **What is pending is
the difference between the two** (``pending_of``): computed, never stored,
so no step can leave it wrong:

- a daemon killed between the write of ``vm.json`` and the hot-plug leaves
  the change in ``disks``/``nics`` and not in ``live_devices``: ``vmadm get``
  shows it as pending (to be applied by the next boot, or by the daemon's
  next ``apply_devices`` of that VM);
- a daemon killed after qemu acted and before ``live_devices`` was written
  is caught by the next attach, which reads qemu's own device list (every
  device has an id named after its disk file or MAC) and corrects
  ``live_devices`` (``daemon/hotplug.py``);
- a change qemu refused (the guest kept a disk past the deadline, no free
  slot) leaves ``live_devices`` as qemu has it: pending, and said so;
- a stopped VM's ``live_devices`` is what it last ran with: its pending
  list is what its next boot changes, and that boot clears it.

Standard library only: ``vmadm`` runs this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from vmadmd.errors import InvalidParameter, WrongState
from vmadmd.vm import net, props
from vmadmd.vm.disks import Disks, is_disk_name

LIVE_KEY = "live_devices"
DEVICE_KEYS = (
    "add_disks", "update_disks", "remove_disks", "add_nics", "update_nics", "remove_nics",
)  # fmt: skip
MAX_ITEMS = 64  # per list in one update
DISK_UPDATABLE = ("size", "model", "boot")
NIC_UPDATABLE = ("model", "nic_tag", *props.NIC_KEPT)


# -- names qemu knows the devices by ---------------------------------------------------


def boot_node(index: int) -> str:
    """The node and device id of disk ``index`` as qemu is started (vm/qemu.py)."""
    return f"disk{index}"


def hot_node(path: str) -> str:
    """The node and device id of a disk hot-plugged from ``path`` (its file
    name, unique in the zonepath: ``hp-disk3.qcow2``)."""
    return "hp-" + os.path.basename(path)


def boot_nic_id(index: int) -> str:
    return f"net{index}"


def hot_nic_id(mac: str) -> str:
    return "hn-" + mac.replace(":", "")


def live_at_boot(vm: Mapping[str, Any]) -> dict[str, Any]:
    """``live_devices`` for a qemu just started from ``vm``."""
    disks = []
    for i, disk in enumerate(vm.get("disks", [])):
        fdsets = [2 * i + 1] + ([2 * i + 2] if disk.get("image_uuid") else [])
        disks.append({
            "path": disk["path"], "node": boot_node(i), "fdsets": fdsets,
            **{k: disk[k] for k in ("model", "boot", "size", "image_uuid") if k in disk},
        })  # fmt: skip
    nics = []
    for i, nic in enumerate(vm.get("nics", [])):
        nics.append({
            "mac": nic["mac"], "id": boot_nic_id(i),
            **{k: nic[k] for k in ("model", "netdev", "ifname", "nic_tag") if k in nic},
        })  # fmt: skip
    return {"disks": disks, "nics": nics}


def live_of(vm: Mapping[str, Any]) -> dict[str, Any] | None:
    """The VM's ``live_devices``, when it has one of a usable form."""
    live = vm.get(LIVE_KEY)
    if not isinstance(live, dict):
        return None
    if not isinstance(live.get("disks"), list) or not isinstance(live.get("nics"), list):
        return None
    return live


def all_nics(vm: Mapping[str, Any]) -> list[Any]:
    """The nics of the record and those its qemu still has (a nic removed
    from ``nics`` whose unplug did not happen): every tap the VM may hold."""
    nics = list(vm.get("nics", []))
    live = live_of(vm)
    if live is not None:
        names = {n.get("ifname") for n in nics if isinstance(n, dict)}
        nics += [n for n in live["nics"] if isinstance(n, dict) and n.get("ifname") not in names]
    return nics


# -- what is pending ----------------------------------------------------------------------


def _by(items: object, key: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items if isinstance(items, list) else []:
        if isinstance(item, dict) and isinstance(item.get(key), str):
            out[item[key]] = item
    return out


def pending_of(vm: Mapping[str, Any]) -> list[dict[str, Any]]:
    """What differs between the record and what its qemu has (or last had):
    each change the next boot (or the daemon's next apply) makes."""
    live = live_of(vm)
    if live is None:
        return []
    out: list[dict[str, Any]] = []
    want, have = _by(vm.get("disks"), "path"), _by(live["disks"], "path")
    driver = vm.get("disk_driver", "virtio")
    for path, disk in want.items():
        now = have.get(path)
        if now is None:
            out.append({"change": "add_disk", "path": path})
            continue
        changed = [
            k
            for k, default in (("model", driver), ("boot", False))
            if disk.get(k, default) != now.get(k, default)
        ]
        if changed:
            out.append({"change": "update_disk", "path": path, "properties": changed})
        size, live_size = disk.get("size"), now.get("size")
        if isinstance(size, int) and (not isinstance(live_size, int) or size > live_size):
            out.append({"change": "resize_disk", "path": path, "size": size})
    for path in have.keys() - want.keys():
        entry: dict[str, Any] = {"change": "remove_disk", "path": path}
        if have[path].get("delete"):
            entry["delete"] = True
        out.append(entry)
    want, have = _by(vm.get("nics"), "mac"), _by(live["nics"], "mac")
    driver = vm.get("nic_driver", "virtio")
    for mac, nic in want.items():
        now = have.get(mac)
        if now is None:
            out.append({"change": "add_nic", "mac": mac})
            continue
        changed = [
            k
            for k, default in (("model", driver), ("nic_tag", None))
            if nic.get(k, default) != now.get(k, default)
        ]
        if changed:
            out.append({"change": "update_nic", "mac": mac, "properties": changed})
    out += [{"change": "remove_nic", "mac": mac} for mac in have.keys() - want.keys()]
    return out


# -- checking an update --------------------------------------------------------------------


class NewDisk:
    """A disk file an update makes (from a size, or over an image)."""

    def __init__(self, path: str, size: int | None, image_uuid: str | None) -> None:
        self.path = path
        self.size = size
        self.image_uuid = image_uuid


class Edit:
    """An update's device changes, checked: the new lists, and the work on
    files they need (made before ``vm.json`` is written, removed if it is not;
    grown or deleted after).  (Plain classes: ``dataclasses`` would cost
    every ``vmadm`` call its import.)"""

    def __init__(self, disks: list[dict[str, Any]], nics: list[dict[str, Any]]) -> None:
        self.disks = disks
        self.nics = nics
        self.make: list[NewDisk] = []
        self.grow: dict[str, int] = {}  # path -> new size (MiB)
        self.delete: list[str] = []  # removed with "delete": true
        self.live_delete: list[str] = []  # ... while the running qemu still has them


def _items(edits: Mapping[str, Any], key: str) -> list[Any]:
    value = edits.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidParameter(f"{key} must be a list")
    if len(value) > MAX_ITEMS:
        raise InvalidParameter(f"{key} has more than {MAX_ITEMS} entries")
    return value


def _free_disk_paths(zonepath: str, taken: set[str]) -> Any:
    """``<zonepath>/disk<N>.qcow2`` for N = 0, 1, ... with no file of that
    number and no disk of the record (or of its qemu) bearing it."""
    numbers = set()
    try:
        names = os.listdir(zonepath)
    except OSError:
        names = []
    for name in [*names, *(os.path.basename(p) for p in taken)]:
        if is_disk_name(name):
            numbers.add(name.removeprefix("disk").partition(".")[0])
    n = 0
    while True:
        if str(n) not in numbers:
            numbers.add(str(n))
            yield os.path.join(zonepath, f"disk{n}.qcow2")
        n += 1


def _free_tap_names(uid: int, taken: set[str]) -> Any:
    index = 0
    while True:
        name = net.tap_name(uid, index)
        if name not in taken:
            taken.add(name)
            yield name
        index += 1


def check_edits(
    vm: Mapping[str, Any],
    edits: Mapping[str, Any],
    *,
    zonepath: str,
    disks: Disks,
    running: bool,
    sizes: Any,
) -> Edit:
    """The record's new ``disks`` and ``nics`` after ``edits`` (the device keys
    of an update payload), every rule of create applied; InvalidParameter or
    WrongState (nothing changed) otherwise.  ``sizes(path, fmt)``: a disk
    file's virtual size in MiB (a shrink is refused against the file too)."""
    unknown = set(edits) - set(DEVICE_KEYS)
    if unknown:
        raise InvalidParameter(f"unknown property {sorted(unknown)[0]!r}")
    new_disks = [dict(d) for d in vm.get("disks", []) if isinstance(d, dict)]
    new_nics = [dict(n) for n in vm.get("nics", []) if isinstance(n, dict)]
    live = live_of(vm) if running else None
    live_disks = _by(live["disks"], "path") if live else {}
    live_nics = _by(live["nics"], "mac") if live else {}
    edit = Edit(new_disks, new_nics)

    def disk_at(where: str, path: object) -> int:
        if not isinstance(path, str):
            raise InvalidParameter(f"{where} must be a disk's path (a string)")
        norm = os.path.normpath(path)
        for i, disk in enumerate(new_disks):
            if os.path.normpath(str(disk.get("path"))) == norm:
                return i
        disks.disk_name(where, path, zonepath)  # outside the zone: says so
        raise InvalidParameter(f"{where} {path} is not a disk of this VM")

    # remove_disks: paths (SmartOS's form), or {"path", "delete": true}.
    for i, item in enumerate(_items(edits, "remove_disks")):
        where = f"remove_disks[{i}]"
        delete = False
        if isinstance(item, dict):
            if set(item) - {"path", "delete"}:
                raise InvalidParameter(f"{where} has only path and delete")
            delete = props.VALIDATORS["autoboot"](item.get("delete", False)) is True
            item = item.get("path")
        index = disk_at(where, item)
        disk = new_disks.pop(index)
        path = str(disk["path"])
        if running and path in live_disks and disk.get("boot"):
            raise WrongState(
                f"{where} {path} is the boot disk of the running VM: stop the VM to remove it"
            )
        if delete:
            (edit.live_delete if running and path in live_disks else edit.delete).append(path)
    # update_disks: keyed by path.
    for i, item in enumerate(_items(edits, "update_disks")):
        where = f"update_disks[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameter(f"{where} must be an object")
        extra = set(item) - {"path", *DISK_UPDATABLE} - props.SMARTOS_DISK_KEPT
        if extra:
            raise InvalidParameter(f"{where}: {sorted(extra)[0]!r} cannot be updated")
        disk = new_disks[disk_at(f"{where}.path", item.get("path"))]
        for key in props.SMARTOS_DISK_KEPT & set(item):
            disk[key] = props._kept(f"{where}.{key}", item[key])
        if "model" in item:
            disk["model"] = props._choice(f"{where}.model", props.DISK_MODELS)(item["model"])
        if "boot" in item:
            disk["boot"] = props._bool(f"{where}.boot")(item["boot"])
        if "size" in item:
            size = props._int(f"{where}.size", 1, 16 * 1024 * 1024)(item["size"])
            before = disk.get("size")
            actual = sizes(disk["path"], disk.get("image_format", "qcow2"))
            floor = max(before if isinstance(before, int) else 0, actual)
            if size < floor:
                raise InvalidParameter(
                    f"{where}.size {size} MiB is smaller than the disk ({floor} MiB): "
                    "a disk is never shrunk"
                )
            if size != before:
                disk["size"] = size
                if size > actual:
                    edit.grow[disk["path"]] = size
    if sum(1 for d in new_disks if d.get("boot")) > 1:
        raise InvalidParameter("only one disk can have boot: true")
    # add_disks: made here, from a size or an image (or a kept disk file of
    # the zonepath given by its path).
    taken = {str(d.get("path")) for d in new_disks} | set(live_disks)
    free = _free_disk_paths(zonepath, taken)
    for i, item in enumerate(_items(edits, "add_disks")):
        where = f"add_disks[{i}]"
        disk = props._disk(i, item, where=where)
        disk.setdefault("model", vm.get("disk_driver", "virtio"))
        if "path" in disk:
            path = disks.check_disk_path(f"{where}.path", disk["path"], zonepath)
            if path in taken:
                raise InvalidParameter(f"{where}.path {path} is a disk of this VM already")
            disk["path"] = path
            disk.setdefault("image_format", "qcow2")
            if "size" in disk:
                raise InvalidParameter(f"{where}: an existing disk takes no size (update it)")
        else:
            if "image_uuid" in disk:
                disks.find_image(disk["image_uuid"])  # refused before anything is made
            disk["path"] = next(free)
            disk["image_format"] = "qcow2"
            edit.make.append(NewDisk(disk["path"], disk.get("size"), disk.get("image_uuid")))
        taken.add(disk["path"])
        if disk.get("boot") and any(d.get("boot") for d in new_disks):
            raise InvalidParameter(f"{where}: only one disk can have boot: true")
        new_disks.append(disk)
    _check_nics(vm, edits, edit, live_nics)
    return edit


def _check_nics(
    vm: Mapping[str, Any], edits: Mapping[str, Any], edit: Edit, live_nics: dict[str, Any]
) -> None:
    nics = edit.nics
    uid = vm.get("zone_uid")

    def nic_at(where: str, mac: object) -> int:
        if not isinstance(mac, str):
            raise InvalidParameter(f"{where} must be a nic's mac (a string)")
        for i, nic in enumerate(nics):
            if str(nic.get("mac")) == mac.lower():
                return i
        raise InvalidParameter(f"{where} {mac[:40]} is not a nic of this VM")

    for i, mac in enumerate(_items(edits, "remove_nics")):
        nics.pop(nic_at(f"remove_nics[{i}]", mac))
    taps = {str(n["ifname"]) for n in [*nics, *live_nics.values()] if n.get("ifname")}
    free = _free_tap_names(uid, taps) if isinstance(uid, int) and uid > 0 else None

    def name_tap(where: str, nic: dict[str, Any]) -> None:
        if net.is_tap(nic):
            nic["netdev"] = "tap"
            if not nic.get("ifname"):
                if free is None:
                    raise InvalidParameter(f"{where}: the VM has no zone_uid to name a tap by")
                nic["ifname"] = next(free)
        else:
            nic.pop("ifname", None)

    for i, item in enumerate(_items(edits, "update_nics")):
        where = f"update_nics[{i}]"
        if not isinstance(item, dict):
            raise InvalidParameter(f"{where} must be an object")
        extra = set(item) - {"mac", *NIC_UPDATABLE} - props.SMARTOS_NIC_KEPT
        if extra:
            raise InvalidParameter(f"{where}: {sorted(extra)[0]!r} cannot be updated")
        index = nic_at(f"{where}.mac", item.get("mac"))
        current = nics[index]
        merged = {k: v for k, v in current.items() if k not in ("ifname", "netdev")}
        if current.get("netdev") == "tap" and not current.get("nic_tag"):
            merged["netdev"] = "tap"
        merged.update({k: v for k, v in item.items() if k != "mac"})
        nic = props._nic(index, merged, where=where)
        if nic.get("nic_tag") == current.get("nic_tag") and current.get("ifname"):
            nic["ifname"] = current["ifname"]
        name_tap(where, nic)
        nics[index] = nic
        if nic.get("primary") is True:
            for other in nics:
                if other is not nic and other.get("primary") is True:
                    other["primary"] = False
    macs = {str(n["mac"]) for n in nics} | set(live_nics)
    for i, item in enumerate(_items(edits, "add_nics")):
        where = f"add_nics[{i}]"
        nic = props._nic(i, item, where=where)
        if nic["mac"] in macs:
            raise InvalidParameter(f"{where}.mac {nic['mac']} is taken by another nic of this VM")
        macs.add(nic["mac"])
        nic.setdefault("model", vm.get("nic_driver", "virtio"))
        name_tap(where, nic)
        nics.append(nic)
