"""The VM layer: create, start, halt, delete, and what ``vmadm get`` shows.

Used by ``vmadm`` directly and by ``vmadmd`` (from a worker thread: the
per-VM lock is a blocking ``flock``).  ``start`` is the analogue of
``zoneadm boot``: qemu is started confined (its own user, no privileges,
its seccomp sandbox, born in its own cgroup; ``vm/launch.py``), in its own
session with no controlling terminal, re-parented away from whoever started
it, and only reported started once its QMP socket greets.
``halt`` is ``zoneadm halt``: a forced stop.

Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from vmadmd.errors import (
    BadProperty,
    InvalidParameter,
    StartFailed,
    VmadmError,
    VmBroken,
    WrongState,
)
from vmadmd.vm import cgroup, devices, ending, net, proc, props, transition, zonefs
from vmadmd.vm.config import VmSettings, resolve_accel
from vmadmd.vm.disks import (
    Disks,
    close_disks,
    delete_disk,
    disk_lstat,
    own_disk,
    qemu_img_create,
    qemu_img_grow,
    qemu_img_overlay,
    virtual_size_mib,
)
from vmadmd.vm.store import Store, VmPaths, VmRecord, validate_uuid
from vmadmd.vm.transition import Transition
from vmadmd.vm.zonefs import ZoneFileError

# subprocess and uuid are imported where used: `vmadm get/list/info` never
# need them, and every millisecond of import is paid by every vmadm call.

START_TIMEOUT = 60.0
if TYPE_CHECKING:
    from vmadmd.vm.bootopts import BootOptions
    from vmadmd.vm.qemu import DiskFds

    DiskList = list[DiskFds]
    Paths = list[str]


def now_ms() -> int:
    return int(time.time() * 1000)


def iso_now() -> str:
    """Now in UTC as ISO 8601 with milliseconds; such strings sort as times."""
    ms = now_ms()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


class VmLayer:
    """Operations on VMs in one zones root."""

    def __init__(self, settings: VmSettings) -> None:
        self.settings = settings
        self.store = Store(settings.zones_root)
        self.disks = Disks(settings.images)
        self.cgroups = cgroup.Cgroups(
            settings.cgroup_root or cgroup.DEFAULT_ROOT, settings.cgroup_manager
        )

    # -- queries -----------------------------------------------------------

    def pid(self, uuid: str, record: VmRecord | None = None) -> int | None:
        """The pid of the VM's running qemu (identity-checked), else None."""
        if record is None:
            record = self.store.load(uuid)
        return running_pid(self.store, uuid, record)

    def is_running(self, uuid: str) -> bool:
        return self.pid(uuid) is not None

    def get(self, uuid: str) -> dict[str, Any]:
        """The record plus the computed properties, as ``vmadm get`` shows it."""
        record = self.store.load(uuid)
        return with_computed(record, self.store.paths(uuid), self.pid(uuid, record))

    def list(self) -> list[dict[str, Any]]:
        out = []
        for uuid in self.store.list_uuids():
            try:
                out.append(self.get(uuid))
            except (VmBroken, ZoneFileError) as err:
                out.append({"uuid": uuid, "state": "broken", "error": str(err)})
        return out

    # -- create / delete ---------------------------------------------------

    def create(self, payload: object) -> str:
        """Create a VM from a user payload; returns its uuid.  Does not boot it."""
        uuid, vm = self.check_create(payload)
        # The images used stay while their overlays are made and recorded:
        # `imgadm delete` takes the same lock, then looks for users.
        with contextlib.ExitStack() as held:
            used = {str(d["image_uuid"]) for d in vm["disks"] if "image_uuid" in d}
            if used:
                from vmadmd.vm.images import ImageStore

                store = ImageStore(self.settings.images, self.settings.zones_root)
                for image_uuid in sorted(used):
                    held.enter_context(store.lock(validate_uuid(image_uuid)))
            return self._create(uuid, vm)

    def check_create(self, payload: object) -> tuple[str, VmRecord]:
        """A create payload checked as ``create`` checks it, nothing made or
        held: its uuid and record (defaults filled).  ``vmadm validate
        create`` runs this alone."""
        import uuid as uuidlib

        vm = props.for_create(payload)
        uuid = validate_uuid(vm.get("uuid") or str(uuidlib.uuid4()))
        vm["uuid"] = uuid
        zonepath = self.store.paths(uuid).zonepath
        if self.store.exists(uuid) or os.path.exists(zonepath):
            raise InvalidParameter(f"a VM with uuid {uuid} already exists")
        for i, disk in enumerate(vm["disks"]):
            if "image_uuid" in disk:
                self.disks.find_image(disk["image_uuid"])
            elif "path" in disk:
                self.disks.check_disk_path(f"disks[{i}].path", disk["path"], zonepath)
        return uuid, vm

    def create_incoming(
        self, record: VmRecord, sizes: Sequence[int], since_ms: int, workdir: str = ""
    ) -> str:
        """Make a VM arriving by live migration (``vm/migrating.py``): its
        zone, a uid of this host, empty disks of the sizes given.  Not booted."""
        from vmadmd.vm import migrating

        uuid = str(record["uuid"])
        migrating.refuse_existing(
            self.store.exists(uuid) or os.path.exists(self.store.paths(uuid).zonepath), uuid
        )
        uid = record["zone_uid"] = self._new_uid(uuid)
        mig = migrating.Migration("target", "incoming", "", since_ms, workdir)
        record[migrating.KEY] = mig.to_json()
        net.name_taps(record.get("nics", []), uid)
        paths = self.store.create(uuid, {**record, "disks": []})
        try:
            self._own(paths, uid)
            migrating.make_disks(record, sizes, paths.zonepath)
            for disk in record["disks"]:
                own_disk(paths, disk["path"], uid)
            self.store.update(uuid, lambda r: r.update(disks=record["disks"]))
        except BaseException:
            self.store.remove(uuid)
            raise
        return uuid

    def _create(self, uuid: str, vm: VmRecord) -> str:
        # Everything that can be refused is refused before anything is made.
        zonepath = self.store.paths(uuid).zonepath
        images: dict[int, tuple[str, str]] = {}
        for i, disk in enumerate(vm["disks"]):
            if "image_uuid" in disk:
                images[i] = self.disks.find_image(disk["image_uuid"])
            elif "path" in disk:
                # Refused, always: a disk of the zonepath cannot exist before
                # it, and nothing else is a disk (the message says why).
                self.disks.check_disk_path(f"disks[{i}].path", disk["path"], zonepath)
        vm["create_timestamp"] = iso_now()
        vm["zone_uid"] = self._new_uid(uuid)
        net.name_taps(vm["nics"], vm["zone_uid"])  # on a bridge: a tap of its own, made at start
        paths = self.store.create(uuid, {**vm, "disks": []})
        try:
            self._own(paths, vm["zone_uid"])
            for i, disk in enumerate(vm["disks"]):
                disk["path"] = paths.disk(i)
                disk["image_format"] = "qcow2"
                if i in images:
                    image, fmt = images[i]
                    qemu_img_overlay(disk["path"], image, fmt, disk.get("size"))
                else:
                    qemu_img_create(disk["path"], disk["size"])
                own_disk(paths, disk["path"], vm["zone_uid"])
            self.store.update(uuid, lambda r: r.update(disks=vm["disks"]))
        except BaseException:
            self.store.remove(uuid)
            raise
        return uuid

    # -- the VMs' own users ----------------------------------------------------

    def _new_uid(self, uuid: str) -> int:
        """A uid no VM of this host ever had (the host-wide ledger, vm/uids.py)."""
        return new_zone_uid(self.settings, self.store, uuid)

    @staticmethod
    def _own(paths: VmPaths, uid: int) -> None:
        """The zonepath stays root's (vm.json 0600 in it) but can be passed
        through; ``root/`` and everything under it belong to the VM's user."""
        os.chmod(paths.zonepath, 0o711)
        zonefs.own_runtime_dir(paths.zonepath, uid)

    def delete(self, uuid: str) -> None:
        """Halt the VM if it runs, then remove its zonepath."""
        with self.store.lock(uuid):
            vm = self.store.load(uuid)  # 404 for unknown VMs, before anything is killed
            proc.kill_vm(self.store.paths(uuid).pid, uuid, identity_of(vm))
            net.remove_taps(devices.all_nics(vm), _uid_or_none(vm))
            self.cgroups.remove(uuid)
            self.store.remove(uuid)

    # -- start / halt ------------------------------------------------------

    def start(
        self, uuid: str, *, set_autoboot: bool = True, boot: BootOptions | None = None
    ) -> int:
        """Boot the VM; returns qemu's pid.  Raises WrongState if it runs.

        ``boot``: options for this boot only (SmartOS's ``vmadm start``
        options: an order, CDs and disks from the zone root).
        """
        with self.store.lock(uuid):
            return self.start_locked(uuid, set_autoboot=set_autoboot, boot=boot)

    def start_locked(
        self,
        uuid: str,
        *,
        set_autoboot: bool = True,
        boot: BootOptions | None = None,
        incoming: bool = False,
    ) -> int:
        """``start``, for a caller that holds the VM's lock already.

        ``incoming``: qemu waits, paused, for a live migration's state
        (``daemon/migration.py``) instead of booting the guest.
        """
        paths = self.store.paths(uuid)
        vm = self.store.load(uuid)
        if self.pid(uuid, vm) is not None:
            raise WrongState(f"VM {uuid} is already running")
        for i, disk in enumerate(vm.get("disks", [])):
            path = disk.get("path") if isinstance(disk, dict) else None
            if not isinstance(path, str):
                raise StartFailed(f"VM {uuid}: disks[{i}] has no image path")
            try:
                name = self.disks.disk_name(f"disks[{i}].path", path, paths.zonepath)
            except InvalidParameter as err:
                raise StartFailed(f"VM {uuid}: {err}") from None
            try:
                disk_lstat(paths.zonepath, name)
            except OSError:
                raise StartFailed(f"VM {uuid}: disk image {path} is missing") from None
        # This boot's CDs and disks, opened before anything is made: one that
        # cannot be used refuses the start with nothing left behind.
        media_fds: list[int] = []
        if boot is not None and boot.media:
            from vmadmd.vm.bootopts import open_media

            try:
                media_fds = open_media(paths.zonepath, boot.media)
            except InvalidParameter as err:
                raise InvalidParameter(f"VM {uuid}: {err}") from None
        try:
            return self._start_opened(uuid, vm, paths, set_autoboot, boot, media_fds, incoming)
        finally:
            for fd in media_fds:
                os.close(fd)

    def _start_opened(
        self,
        uuid: str,
        vm: VmRecord,
        paths: VmPaths,
        set_autoboot: bool,
        boot: BootOptions | None,
        media_fds: Sequence[int],
        incoming: bool,
    ) -> int:
        uid = self._ensure_uid(uuid, vm, paths)
        self._settle_devices(vm, paths, uid)
        nics = vm.get("nics", [])
        # Named again at every start (a record from before derived names
        # gets them); whatever bears a name already must be this VM's tap.
        net.name_taps(nics, uid)
        net.create_taps(nics, net.parse_nic_tags(self.settings.nic_tags), uid)
        try:
            # Its own cgroup, with SmartOS's limits, named after the uuid:
            # qemu is born in it.
            placement = self.cgroups.prepare(uuid, cgroup.limits_of(vm))
            pid = self._spawn(vm, paths, uid, placement, boot, media_fds, incoming=incoming)
        except BaseException:
            net.remove_taps(nics, uid)
            self.cgroups.remove(uuid)
            raise
        vm["boot_timestamp"] = iso_now()
        vm[devices.LIVE_KEY] = devices.live_at_boot(vm)  # nothing pending any more
        # What makes this qemu itself, so that no look-alike is taken for it.
        vm[IDENTITY_KEY] = proc.identity(pid)
        if set_autoboot:
            vm["autoboot"] = True
        self.store.save(uuid, vm)
        return pid

    def _settle_devices(self, vm: VmRecord, paths: VmPaths, uid: int) -> None:
        """What the last run left for this boot: disks removed with ``delete``
        while it ran are deleted, disks grown in ``vm.json`` are grown (a
        daemon killed before it did), taps of nics it still had are removed."""
        pending = devices.pending_of(vm)
        for change in pending:
            if change["change"] == "remove_disk" and change.get("delete"):
                delete_disk(paths, change["path"])
        sizes = {c["path"]: c["size"] for c in pending if c["change"] == "resize_disk"}
        for disk in vm.get("disks", []):
            if disk.get("path") in sizes:
                try:
                    qemu_img_grow(disk["path"], disk.get("image_format", "qcow2"),
                                  sizes[disk["path"]])  # fmt: skip
                except InvalidParameter as err:
                    raise StartFailed(f"VM {vm['uuid']}: {err}") from None
        names = set(net.tap_names(vm.get("nics", [])))
        gone = [n for n in devices.all_nics(vm) if n.get("ifname") not in names]
        net.remove_taps(gone, uid)

    def _ensure_uid(self, uuid: str, vm: VmRecord, paths: VmPaths) -> int:
        """The VM's own uid; one is given (and its files handed over) to a VM
        created before VMs had users of their own."""
        uid = vm.get("zone_uid")
        if isinstance(uid, int) and uid > 0:
            return uid
        uid = self._new_uid(uuid)
        vm["zone_uid"] = uid
        self.store.save(uuid, vm)
        self._own(paths, uid)
        for disk in vm.get("disks", []):
            with contextlib.suppress(InvalidParameter, OSError):  # start refuses it later
                own_disk(paths, disk["path"], uid)
        return uid

    def _spawn(
        self,
        vm: VmRecord,
        paths: VmPaths,
        uid: int,
        placement: cgroup.Placement,
        boot: BootOptions | None = None,
        media_fds: Sequence[int] = (),
        *,
        incoming: bool = False,
    ) -> int:
        # Here, not at the top: `vmadm list/get` never start a VM, and every
        # millisecond of import is paid by every vmadm call.
        from vmadmd.vm import launch
        from vmadmd.vm.qemu import build_argv

        try:
            zonefs.own_runtime_dir(paths.zonepath, uid)
            for stale in (paths.PID_NAME, paths.QMP_NAME, paths.VNC_NAME, paths.CONSOLE_NAME):
                zonefs.remove_runtime_file(paths.zonepath, stale)
        except OSError as err:
            raise StartFailed(f"VM {vm['uuid']}: its root/tmp: {err.strerror}") from None
        accel = resolve_accel(self.settings.accel)
        groups: tuple[int, ...] = ()
        if accel == "kvm":
            with contextlib.suppress(OSError):
                kvm_gid = os.stat("/dev/kvm").st_gid
                groups = (kvm_gid,) if kvm_gid else ()
        disks = self.disks.open_disks(vm, paths)
        taps: dict[int, int] = {}
        try:
            for i, nic in enumerate(vm.get("nics", [])):
                if nic.get("netdev") == "tap":
                    taps[i] = net.open_tap(str(nic["ifname"]))
            argv = build_argv(
                vm, paths, self.settings.qemu, accel, disk_fds=disks, tap_fds=taps,
                require_vnc_password=self.settings.vnc_require_password,
                user_net=self.settings.user_net, boot=boot, media_fds=media_fds,
                incoming=incoming,
            )  # fmt: skip
            fds = [d.fd for d in disks] + [d.image_fd for d in disks if d.image_fd is not None]
            fds += taps.values()
            fds += media_fds
            # User-mode nics that reach nothing (restricted) need no host
            # network either: qemu gets a namespace of its own (vm/launch.py).
            netns = self.settings.user_net != "nat"
            try:
                return launch.launch(
                    argv, zonepath=paths.zonepath, pass_fds=fds, timeout=START_TIMEOUT,
                    confine=launch.Confinement(uid, uid, groups, placement.procs,
                                               placement.prefix, netns=netns),
                    qmp_name=paths.QMP_NAME, pid_name=paths.PID_NAME,
                )  # fmt: skip
            except StartFailed as err:
                raise StartFailed(f"VM {vm['uuid']}: {err}") from None
        finally:
            close_disks(disks)
            for fd in taps.values():
                os.close(fd)

    def halt(self, uuid: str, *, set_autoboot: bool | None = False) -> str | None:
        """Forced stop: SIGTERM, then SIGKILL, waiting until qemu is gone.

        Clears any pending transition.  Returns the stage that ended qemu, or
        None when it was not running.
        """
        paths = self.store.paths(uuid)
        with self.store.lock(uuid):
            vm = self.store.load(uuid)
            stage = proc.kill_vm(paths.pid, uuid, identity_of(vm))
            net.remove_taps(devices.all_nics(vm), _uid_or_none(vm))
            self.cgroups.remove(uuid)
            vm.pop(transition.KEY, None)
            if stage is not None:
                vm[ending.KEY] = ending.Ending.stopped(stage).to_json(iso_now())
            if set_autoboot is not None:
                vm["autoboot"] = set_autoboot
            self.store.save(uuid, vm)
            return stage

    def update(self, uuid: str, changes: dict[str, Any]) -> tuple[VmRecord, set[str]]:
        """Apply validated changes; returns the new record and the changed keys.

        SmartOS's device changes (``add_disks`` ... ``remove_nics``) change
        ``disks`` and ``nics`` here, in ``vm.json`` (new disk files made first,
        a stopped VM's disks grown or deleted after); a running VM's qemu
        gets them from the daemon (``daemon/hotplug.py``), and what it has
        not got yet is ``pending`` (``vm/devices.py``).
        """
        device_edits = {k: changes.pop(k) for k in devices.DEVICE_KEYS if k in changes}
        if device_edits and ("disks" in changes or "nics" in changes):
            raise InvalidParameter(
                "give disks/nics whole, or add_/update_/remove_disks and _nics, not both"
            )
        checked, edits, checked_sets = parse_update(changes)
        if "disks" in checked:
            self.store.load(uuid)  # an unknown VM is a 404, not a disk that "does not exist"
            zonepath = self.store.paths(uuid).zonepath
            for i, disk in enumerate(checked["disks"]):
                if "path" not in disk:
                    raise InvalidParameter(
                        f"disks[{i}]: an update gives every disk by its path "
                        "(new disks from a size or an image_uuid are made by create)"
                    )
                disk["path"] = self.disks.check_disk_path(
                    f"disks[{i}].path", disk["path"], zonepath
                )
        changed: set[str] = set()
        edit: devices.Edit | None = None

        def apply(vm: VmRecord) -> None:
            if edit is not None:
                for key, items in (("disks", edit.disks), ("nics", edit.nics)):
                    if vm.get(key) != items:
                        changed.add(key)
                    vm[key] = items
                # Deleted by the daemon once qemu let go, or by the next boot.
                live = devices.live_of(vm)
                for disk in live["disks"] if live else []:
                    if disk.get("path") in edit.live_delete:
                        disk["delete"] = True
            uid = vm.get("zone_uid")
            if "nics" in checked and isinstance(uid, int) and uid > 0:
                net.name_taps(checked["nics"], uid)
            if "disks" in checked:
                _keep_backing(vm.get("disks", []), checked["disks"])
            for key, value in checked.items():
                if vm.get(key) != value:
                    changed.add(key)
                vm[key] = value
            for name, (to_set, to_remove) in edits.items():
                if to_set is None and to_remove is None:
                    continue
                current = vm.get(name)
                value = dict(current) if isinstance(current, dict) else {}
                value.update(checked_sets.get(name, {}))
                for key in to_remove or []:
                    value.pop(key, None)
                value = props.validate({name: value})[name]
                if value != current:
                    changed.add(name)
                vm[name] = value

        with self.store.lock(uuid):
            made: Paths = []
            try:
                if device_edits:
                    edit = self._check_edits(uuid, device_edits)
                    made = self._make_disks(uuid, edit)
                record = self.store.update_locked(uuid, apply)
            except BaseException:
                paths = self.store.paths(uuid)
                for path in made:
                    delete_disk(paths, path)
                raise
            if edit is not None and (edit.grow or edit.delete):  # files, after vm.json
                self._files_after(uuid, record, edit)
        if changed & set(cgroup.RESOURCE_KEYS) and self.pid(uuid, record) is not None:
            # A running VM's limits change at once, as SmartOS's do.
            try:
                self.cgroups.apply(uuid, cgroup.limits_of(record))
            except OSError as err:
                raise StartFailed(f"VM {uuid}: saved, but its cgroup refused: {err}") from err
        return record, changed

    def _check_edits(self, uuid: str, edits: dict[str, Any]) -> devices.Edit:
        vm = self.store.load(uuid)
        return devices.check_edits(
            vm, edits, zonepath=self.store.paths(uuid).zonepath, disks=self.disks,
            running=self.pid(uuid, vm) is not None, sizes=virtual_size_mib,
        )  # fmt: skip

    def _make_disks(self, uuid: str, edit: devices.Edit) -> Paths:
        """The new disk files of an update, owned by the VM's user; the paths
        made (removed by the caller if the update goes no further)."""
        paths = self.store.paths(uuid)
        uid = self.store.load(uuid).get("zone_uid")
        made: Paths = []
        try:
            with contextlib.ExitStack() as held:
                for new in edit.make:
                    if new.image_uuid is not None:
                        from vmadmd.vm.images import ImageStore

                        store = ImageStore(self.settings.images, self.settings.zones_root)
                        held.enter_context(store.lock(validate_uuid(new.image_uuid)))
                        image, fmt = self.disks.find_image(new.image_uuid)
                        made.append(new.path)
                        qemu_img_overlay(new.path, image, fmt, new.size)
                    else:
                        made.append(new.path)
                        qemu_img_create(new.path, new.size or 0)
                    if isinstance(uid, int) and uid > 0:
                        own_disk(paths, new.path, uid)
        except BaseException:
            for path in made:
                delete_disk(paths, path)
            raise
        return made

    def _files_after(self, uuid: str, record: VmRecord, edit: devices.Edit) -> None:
        """Once ``vm.json`` says so: a stopped VM's disks grown (a running
        VM's are grown by its qemu, ``block_resize``) and the disks removed
        with ``delete`` deleted (a running VM's once its qemu let go)."""
        paths = self.store.paths(uuid)
        try:
            if self.pid(uuid, record) is None:
                for disk in record.get("disks", []):
                    if disk.get("path") in edit.grow:
                        qemu_img_grow(disk["path"], disk.get("image_format", "qcow2"),
                                      edit.grow[disk["path"]])  # fmt: skip
            for path in edit.delete:
                delete_disk(paths, path)
        except (InvalidParameter, OSError) as err:
            # vm.json has the change: the next boot grows the disk (pending).
            msg = err.strerror if isinstance(err, OSError) else str(err)
            raise StartFailed(
                f"VM {uuid}: saved, but its disk files were not changed: {msg}"
            ) from err


# The maps `vmadm update` edits key by key (SmartOS's set_X / remove_X).
MAP_PROPS = ("customer_metadata", "internal_metadata", "tags")


class UpdatePlan(NamedTuple):
    """An update payload, checked: the properties given whole, the
    ``set_X``/``remove_X`` edits of each map (as given), and each ``set_X``
    checked."""

    checked: dict[str, Any]
    edits: dict[str, tuple[Any, Any]]
    checked_sets: dict[str, dict[str, Any]]


def parse_update(changes: Mapping[str, Any]) -> UpdatePlan:
    """Every key of an update payload checked, with nothing looked up or
    changed: what ``VmLayer.update`` applies, and all that ``vmadm validate
    update`` runs (each key alone: a key it cannot check without the VM,
    a disk's path in the zone, is checked by ``update`` itself)."""
    changes = dict(changes)
    for key in devices.DEVICE_KEYS:  # checked against the VM's disks/nics by update
        if key in changes and not isinstance(changes.pop(key), list):
            raise InvalidParameter(f"{key} must be a list")
    # SmartOS's set_<map> / remove_<map>, for each map of keys it has them for.
    edits = {
        name: (changes.pop(f"set_{name}", None), changes.pop(f"remove_{name}", None))
        for name in MAP_PROPS
    }
    for name in props.IMMUTABLE:
        if name in changes:
            raise BadProperty(f"{name} cannot be changed")
    checked = props.validate(changes)
    checked_sets: dict[str, dict[str, Any]] = {}
    for name, (to_set, to_remove) in edits.items():
        if to_set is not None:
            if not isinstance(to_set, dict):
                raise InvalidParameter(f"set_{name} must be an object")
            checked_sets[name] = props.validate({name: to_set})[name]
        if to_remove is not None and (
            not isinstance(to_remove, list) or not all(isinstance(k, str) for k in to_remove)
        ):
            raise InvalidParameter(f"remove_{name} must be a list of keys")
    return UpdatePlan(checked, edits, checked_sets)


IDENTITY_KEY = "qemu_identity"


def new_zone_uid(settings: VmSettings, store: Store, uuid: str) -> int:
    """A uid no VM of this host ever had (the host-wide ledger, vm/uids.py)."""
    from vmadmd.vm import uids

    with uids.locked(settings.uid_ledger) as ledger:
        # The VMs of this zones root, read under the ledger's lock: those
        # from before the ledger are taken into it.
        known: dict[int, str] = {}
        for other in store.list_uuids():
            with contextlib.suppress(VmadmError):
                uid = store.load(other).get("zone_uid")
                if isinstance(uid, int) and uid > 0:
                    known[uid] = other
        return uids.allocate(
            ledger, settings.zone_uid_base, uuid, store.zones_root, iso_now(), known
        )


def _keep_backing(old: list[Any], new: list[dict[str, Any]]) -> None:
    """A disk's image and format belong to its file, not to the payload: a
    disk given again by its path keeps them (without its ``image_uuid`` a
    disk made over an image would boot with no backing, its data unreadable)."""
    was = {d.get("path"): d for d in old if isinstance(d, dict)}
    for disk in new:
        before = was.get(disk["path"], {})
        for key in ("image_uuid", "image_format"):
            if key in before and key not in disk:
                disk[key] = before[key]


def running_pid(store: Store, uuid: str, record: VmRecord) -> int | None:
    """The pid of the VM's running qemu, identity-checked against the boot
    recorded in ``record`` (the one lookup every caller makes), else None."""
    return proc.find_vm_pid(store.paths(uuid).pid, uuid, identity_of(record))


def running_pidfd(store: Store, uuid: str, record: VmRecord) -> tuple[int, int] | None:
    """``running_pid`` with a pidfd on that very process: ``(pid, fd)``."""
    return proc.open_vm_pidfd(store.paths(uuid).pid, uuid, identity_of(record))


def identity_of(record: VmRecord) -> proc.Identity | None:
    """The identity recorded when the VM's current qemu was booted, if any."""
    value = record.get(IDENTITY_KEY)
    return value if isinstance(value, dict) else None


def state_of(running: bool, pending: Transition | None) -> str:
    """A VM's state: the one rule, for ``vmadm get``, the API and the metrics."""
    if not running:
        return "stopped"
    return "stopping" if pending is not None else "running"


def with_computed(record: VmRecord, paths: VmPaths, pid: int | None) -> dict[str, Any]:
    out = dict(record)
    out.pop(transition.KEY, None)
    out.pop(IDENTITY_KEY, None)
    out.pop(devices.LIVE_KEY, None)
    pending_devices = devices.pending_of(record)
    if pending_devices:
        out["pending"] = pending_devices
    pending = Transition.of(record) if pid is not None else None
    out["state"] = state_of(pid is not None, pending)
    out["zone_state"] = "running" if pid is not None else "installed"
    out["zonepath"] = paths.zonepath
    if pid is not None:
        out["pid"] = pid
    if pending is not None:
        out["transition_to"] = pending.to
        out["transition_expire"] = pending.expire_ms
    return out


def _uid_or_none(vm: VmRecord) -> int | None:
    uid = vm.get("zone_uid")
    return uid if isinstance(uid, int) and uid > 0 else None
