"""VM properties: which exist, their types, defaults and validation.

A subset of SmartOS ``vmadm``'s JSON.  Everything the user gives is checked
here before anything reaches the disk.  Standard library only.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any

from vmadmd.errors import BadProperty, InvalidParameter

DISK_MODELS = ("virtio", "ide", "scsi")
NIC_MODELS = ("virtio", "e1000", "rtl8139")
NETDEVS = ("user", "tap")
VNC_PASSWORD_MAX = 8  # qemu's VNC (DES) password limit

# Computed by `vmadm get`; never stored, never settable.
COMPUTED = (
    "state",
    "zone_state",
    "pid",
    "transition_to",
    "transition_expire",
    "zonepath",
    "pending",
)
# Stored by the VM layer and the daemon; never settable by a user.
INTERNAL = (
    "create_timestamp", "boot_timestamp", "transition", "last_exit", "qemu_identity", "zone_uid",
    "live_devices",
    "snapshots",
)  # fmt: skip

_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _int(name: str, lo: int, hi: int) -> Callable[[object], int]:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidParameter(f"{name} must be an integer, not {type(v).__name__}")
        if not lo <= v <= hi:
            raise InvalidParameter(f"{name} must be between {lo} and {hi}, not {v}")
        return v

    return check


def _bool(name: str) -> Callable[[object], bool]:
    def check(v: object) -> bool:
        if not isinstance(v, bool):
            raise InvalidParameter(f"{name} must be true or false, not {v!r}")
        return v

    return check


def _str(name: str, max_len: int = 4096) -> Callable[[object], str]:
    def check(v: object) -> str:
        if not isinstance(v, str):
            raise InvalidParameter(f"{name} must be a string, not {type(v).__name__}")
        if len(v) > max_len:
            raise InvalidParameter(f"{name} is longer than {max_len} characters")
        if "\0" in v:
            raise InvalidParameter(f"{name} must not contain a NUL character")
        return v

    return check


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(v: object) -> str:
        if v not in choices:
            raise InvalidParameter(f"{name} must be one of {', '.join(choices)}")
        return str(v)

    return check


def _brand(v: object) -> str:
    if v != "kvm":
        raise InvalidParameter(
            f"brand {v!r} is not supported: this vmadm runs KVM virtual machines (brand 'kvm')"
        )
    return "kvm"


def _uuid_value(name: str) -> Callable[[object], str]:
    def check(v: object) -> str:
        s = _str(name, 36)(v)
        if not _UUID_RE.fullmatch(s):
            raise InvalidParameter(f"{name} must be a lower-case canonical UUID")
        return s

    return check


# SmartOS properties that mean nothing here: accepted and kept as given, so
# that payloads written for SmartOS (Ansible's vmadm module, Salt, scripts)
# work unchanged.  A property that is neither SmartOS's nor ours is refused.
SMARTOS_KEPT = frozenset({
    "archive_on_delete", "billing_id", "datasets", "delegate_dataset", "dns_domain",
    "do_not_inventory", "docker", "filesystems", "firewall_enabled", "flexible_disk_size",
    "fs_allowed", "hostname", "image_uuid", "indestructible_delegated",
    "indestructible_zoneroot", "internal_metadata", "internal_metadata_namespace",
    "internal_metadata_namespaces",
    "kernel_version", "limit_priv", "maintain_resolvers", "max_locked_memory", "max_swap",
    "mdata_exec_timeout", "nowait", "owner_uuid", "package_name", "package_version",
    "qemu_opts", "quota", "resolvers", "routes", "server_uuid", "spice_opts", "spice_password",
    "tags", "tmpfs", "vga", "virtio_txburst", "virtio_txtimer", "zfs_data_compression",
    "zfs_data_recsize", "zfs_filesystem_limit", "zfs_io_priority", "zfs_root_compression",
    "zfs_root_recsize", "zfs_snapshot_limit", "zpool",
})  # fmt: skip
SMARTOS_DISK_KEPT = frozenset({
    "block_size", "compression", "image_name", "image_size", "media", "nocreate",
    "refreservation", "zpool", "uuid",
})  # fmt: skip
SMARTOS_NIC_KEPT = frozenset({
    "allow_dhcp_spoofing", "allow_ip_spoofing", "allow_mac_spoofing",
    "allow_restricted_traffic", "allow_unfiltered_promisc", "allowed_ips",
    "blocked_outgoing_ports", "gateways", "interface", "ips", "mtu", "network_uuid",
})  # fmt: skip
NIC_KEPT = ("ip", "netmask", "gateway", "primary", "vlan_id")  # kept as given, for now


def _alias(v: object) -> str:
    """Printable text: an alias is shown in tables, logs and page titles, where a
    control character (ESC starting a terminal sequence, a newline forging a
    line) would act rather than show."""
    s = _str("alias", ALIAS_MAX)(v)
    if not s.isprintable():
        raise InvalidParameter(
            "alias must be printable text (no control, format or line-separator characters)"
        )
    return s


# Each SmartOS property kept as given: at most this much JSON (tags and
# internal_metadata get customer_metadata's room); vm.json as a whole is
# capped by the store (MAX_VM_JSON).
KEPT_MAX_BYTES = 64 * 1024
KEPT_LARGE = frozenset({"tags", "internal_metadata"})
ALIAS_MAX = 256


def _kept(where: str, value: object, limit: int = KEPT_MAX_BYTES) -> object:
    import json  # here: the CLI's start-up time

    try:
        size = len(json.dumps(value, ensure_ascii=False).encode())
    except (TypeError, ValueError) as err:  # not JSON (only a Python caller can do that)
        raise InvalidParameter(f"{where} is not JSON: {err}") from None
    if size > limit:
        raise InvalidParameter(
            f"{where} is {size} bytes of JSON, more than the {limit // 1024} KiB allowed"
        )
    return value


def _vnc_password(v: object) -> str:
    s = _str("vnc_password", VNC_PASSWORD_MAX)(v)
    if not s.isprintable():
        raise InvalidParameter("vnc_password must be printable characters")
    return s


def _cpu_type(v: object) -> str:
    s = _str("cpu_type", 128)(v)
    if not re.match(r"^[A-Za-z0-9_.,=+-]+$", s):
        raise InvalidParameter("cpu_type has characters qemu would not accept")
    return s


# customer_metadata bounds (SmartOS documents none; these keep vm.json, which
# every vmadm call reads, small): keys of 1-128 characters, at most 1,024 of
# them, and 256 KiB of keys and values in all (room for a user-script).
METADATA_KEY_MAX = 128
METADATA_MAX_KEYS = 1024
METADATA_MAX_BYTES = 256 * 1024


def _metadata(v: object) -> dict[str, str]:
    if not isinstance(v, dict):
        raise InvalidParameter("customer_metadata must be an object of strings")
    if len(v) > METADATA_MAX_KEYS:
        raise InvalidParameter(f"customer_metadata has more than {METADATA_MAX_KEYS} keys")
    out: dict[str, str] = {}
    total = 0
    for key, value in v.items():
        key = str(key)
        if not 1 <= len(key) <= METADATA_KEY_MAX:
            raise InvalidParameter(
                f"customer_metadata keys must be 1 to {METADATA_KEY_MAX} characters"
            )
        if not isinstance(value, str):
            raise InvalidParameter(f"customer_metadata.{key[:40]} must be a string")
        total += len(key.encode()) + len(value.encode())
        if total > METADATA_MAX_BYTES:
            raise InvalidParameter(
                f"customer_metadata is larger than {METADATA_MAX_BYTES // 1024} KiB"
            )
        out[key] = value
    return out


def _vnc_port(v: object) -> int:
    port = _int("vnc_port", -1, 65535)(v)
    if 0 < port < 1024:
        raise InvalidParameter(
            "vnc_port must be 0 (any free port), -1 (no console) or 1024-65535, "
            f"not a privileged port ({port})"
        )
    return port


BOOT_DEVICES = "cdn"  # SmartOS's: c the (first) hard disk, d the first CD-ROM, n the network


def parse_boot(text: str, where: str = "boot") -> tuple[str, str | None]:
    """SmartOS's boot order, ``order=X[,once=Y]``: (X, Y or None).

    X and Y are letters of ``cdn``, each at most once.  ``once`` is the
    order of the next boot only: qemu goes back to X at the first reset
    (``-boot order=X,once=Y``), a reboot from inside the guest included.
    """
    order: str | None = None
    once: str | None = None
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in ("order", "once") or (order if key == "order" else once):
            raise InvalidParameter(f"{where} must be order=X[,once=Y] (X, Y of c, d, n), "
                                   f"not {text[:60]!r}")  # fmt: skip
        if not value or any(c not in BOOT_DEVICES for c in value) or len(set(value)) != len(value):
            raise InvalidParameter(
                f"{where}: {key} takes the letters c (disk), d (CD-ROM), n (network), "
                f"each at most once, not {value[:20]!r}"
            )
        if key == "order":
            order = value
        else:
            once = value
    if order is None:
        raise InvalidParameter(f"{where} must start with order=X (X of c, d, n)")
    return order, once


def _boot(v: object) -> str:
    s = _str("boot", 64)(v)
    order, once = parse_boot(s)
    return f"order={order}" + (f",once={once}" if once else "")


def _disk(i: int, v: object, *, where: str = "") -> dict[str, Any]:
    where = where or f"disks[{i}]"
    if not isinstance(v, dict):
        raise InvalidParameter(f"{where} must be an object")
    ours = {"size", "path", "model", "boot", "image_format", "image_uuid"}
    unknown = set(v) - ours - SMARTOS_DISK_KEPT
    if unknown:
        raise InvalidParameter(f"{where}: unknown property {sorted(unknown)[0]!r}")
    disk: dict[str, Any] = {k: _kept(f"{where}.{k}", v[k]) for k in SMARTOS_DISK_KEPT if k in v}
    if "size" in v:
        disk["size"] = _int(f"{where}.size", 1, 16 * 1024 * 1024)(v["size"])
    if "path" in v:
        path = _str(f"{where}.path")(v["path"])
        if not path.startswith("/"):
            raise InvalidParameter(f"{where}.path must be absolute")
        disk["path"] = path
    if "image_uuid" in v:
        disk["image_uuid"] = _uuid_value(f"{where}.image_uuid")(v["image_uuid"])
        if "path" in disk:
            raise InvalidParameter(f"{where}: give image_uuid or path, not both")
    if "size" not in disk and "path" not in disk and "image_uuid" not in disk:
        raise InvalidParameter(f"{where} needs a size (MiB), an image_uuid or a path")
    if "model" in v:  # else the VM's disk_driver
        if v["model"] not in DISK_MODELS:
            raise InvalidParameter(f"{where}.model must be one of {', '.join(DISK_MODELS)}")
        disk["model"] = v["model"]
    disk["boot"] = _bool(f"{where}.boot")(v.get("boot", False))
    if "image_format" in v:
        fmt = v["image_format"]
        if fmt not in ("qcow2", "raw"):
            raise InvalidParameter(f"{where}.image_format must be qcow2 or raw")
        disk["image_format"] = fmt
    return disk


def random_mac() -> str:
    """A locally administered unicast MAC (SmartOS's old 02:08:20 prefix)."""
    return "02:08:20:" + ":".join(f"{b:02x}" for b in os.urandom(3))


def _nic(i: int, v: object, *, where: str = "") -> dict[str, Any]:
    where = where or f"nics[{i}]"
    if not isinstance(v, dict):
        raise InvalidParameter(f"{where} must be an object")
    ours = {"model", "mac", "netdev", "ifname", "nic_tag", *NIC_KEPT}
    unknown = set(v) - ours - SMARTOS_NIC_KEPT
    if unknown:
        raise InvalidParameter(f"{where}: unknown property {sorted(unknown)[0]!r}")
    kept = {k: _kept(f"{where}.{k}", v[k]) for k in (*SMARTOS_NIC_KEPT, *NIC_KEPT) if k in v}
    model = v.get("model")  # else the VM's nic_driver
    if model is not None and model not in NIC_MODELS:
        raise InvalidParameter(f"{where}.model must be one of {', '.join(NIC_MODELS)}")
    mac = v.get("mac") or random_mac()
    if not isinstance(mac, str) or not _MAC_RE.match(mac.lower()):
        raise InvalidParameter(f"{where}.mac must look like 02:08:20:aa:bb:cc")
    netdev = v.get("netdev", "user")
    if netdev not in NETDEVS:
        raise InvalidParameter(f"{where}.netdev must be user or tap")
    nic: dict[str, Any] = {**kept, "mac": mac.lower(), "netdev": netdev}
    if model is not None:
        nic["model"] = model
    if "nic_tag" in v:
        tag = _str(f"{where}.nic_tag", 64)(v["nic_tag"])
        if not _IFNAME_RE.match(tag):
            raise InvalidParameter(f"{where}.nic_tag has characters a tag cannot have")
        nic["nic_tag"] = tag
    if "ifname" in v:
        # Root deletes and opens the link of a tap's name: a name a payload
        # chose could be the host's or another VM's (vm/net.py derives them).
        raise InvalidParameter(
            f"{where}.ifname cannot be given: tap names are derived from the VM's zone_uid"
        )
    return nic


def _disks(v: object) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise InvalidParameter("disks must be a list")
    return [_disk(i, d) for i, d in enumerate(v)]


def _nics(v: object) -> list[dict[str, Any]]:
    if not isinstance(v, list):
        raise InvalidParameter("nics must be a list")
    return [_nic(i, n) for i, n in enumerate(v)]


VALIDATORS: dict[str, Callable[[object], Any]] = {
    "uuid": _str("uuid", 36),
    "alias": _alias,
    "brand": _brand,
    "ram": _int("ram", 16, 1024 * 1024),
    "vcpus": _int("vcpus", 1, 256),
    "autoboot": _bool("autoboot"),
    "autoboot_order": _int("autoboot_order", -1000000, 1000000),
    "disks": _disks,
    "nics": _nics,
    "vnc_port": _vnc_port,
    "vnc_password": _vnc_password,
    "cpu_type": _cpu_type,
    "qemu_extra_opts": _str("qemu_extra_opts", 65536),
    "customer_metadata": _metadata,
    "disk_driver": _choice("disk_driver", DISK_MODELS),
    "nic_driver": _choice("nic_driver", NIC_MODELS),
    # SmartOS's resource controls, kept now, applied by the VM's cgroup.
    "max_physical_memory": _int("max_physical_memory", 16, 64 * 1024 * 1024),
    "cpu_cap": _int("cpu_cap", 0, 100 * 1024),
    "cpu_shares": _int("cpu_shares", 1, 1 << 16),
    "max_lwps": _int("max_lwps", 1, 1 << 22),
    # Beyond SmartOS (and libvirt's on_crash=restart): boot the VM again
    # after a guest panic or a qemu crash, with back-off and a limit.
    "restart_on_crash": _bool("restart_on_crash"),
    # SmartOS's boot order (`order=cd`), qemu's -boot; absent: the disk
    # marked `boot` first (bootindex), as before this property was read.
    "boot": _boot,
}

# Properties `vmadm update` may not change.
IMMUTABLE = ("uuid", "brand")

DEFAULTS: dict[str, Any] = {
    "brand": "kvm",
    "ram": 256,
    "vcpus": 1,
    "autoboot": True,  # as in SmartOS: a new VM boots unless told otherwise
    "disks": [],
    "nics": [],
    "vnc_port": 0,
    "customer_metadata": {},
}

# How `key=value` on the command line is read for each property.
SCALAR_KINDS: dict[str, type] = {
    "alias": str,
    "ram": int,
    "vcpus": int,
    "autoboot": bool,
    "autoboot_order": int,
    "vnc_port": int,
    "vnc_password": str,
    "cpu_type": str,
    "qemu_extra_opts": str,
    "restart_on_crash": bool,
    "boot": str,
    "disk_driver": str,
    "nic_driver": str,
    "max_physical_memory": int,
    "cpu_cap": int,
    "cpu_shares": int,
    "max_lwps": int,
}


def validate(props: Mapping[str, object]) -> dict[str, Any]:
    """Check every given property; unknown or computed names are errors."""
    out: dict[str, Any] = {}
    for name, value in props.items():
        if name in COMPUTED or name in INTERNAL:
            raise BadProperty(f"{name} is read-only")
        if name in SMARTOS_KEPT:
            # SmartOS's, meaning nothing here: kept as given, within a bound.
            limit = METADATA_MAX_BYTES if name in KEPT_LARGE else KEPT_MAX_BYTES
            out[name] = _kept(name, value, limit)
            continue
        check = VALIDATORS.get(name)
        if check is None:
            raise BadProperty(f"unknown property {name!r}")
        out[name] = check(value)
    return out


def with_drivers(vm: dict[str, Any]) -> dict[str, Any]:
    """Disks and nics without a model take the VM's disk_driver / nic_driver."""
    for disk in vm.get("disks", []):
        disk.setdefault("model", vm.get("disk_driver", "virtio"))
    for nic in vm.get("nics", []):
        nic.setdefault("model", vm.get("nic_driver", "virtio"))
    return vm


def for_create(props: object) -> dict[str, Any]:
    """Validate a `vmadm create` payload and fill the defaults."""
    if not isinstance(props, dict):
        raise InvalidParameter("a VM payload must be a JSON object")
    props = dict(props)
    name = props.pop("name", None)  # Ansible's vmadm module sends `name`
    if name is not None and "alias" not in props:
        props["alias"] = name
    checked = validate(props)
    out = dict(DEFAULTS)
    out.update(checked)
    return with_drivers(out)


def parse_cli_value(name: str, text: str) -> object:
    """Read ``key=value`` the way SmartOS ``vmadm update`` does, by property type."""
    kind = SCALAR_KINDS.get(name)
    if kind is None:
        if name in VALIDATORS:
            raise InvalidParameter(f"{name} can only be set from JSON (-f)")
        raise InvalidParameter(f"unknown property {name!r}")
    if kind is bool:
        if text in ("true", "false"):
            return text == "true"
        raise InvalidParameter(f"{name} must be true or false, not {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise InvalidParameter(f"{name} must be an integer, not {text!r}") from None
    return text


def payload_problems(
    payload: Mapping[str, object], check: Callable[[dict[str, object]], object]
) -> dict[str, list[str]]:
    """SmartOS's ``vmadm validate`` report of ``payload`` under ``check``.

    ``check`` is the very function the action runs on its payload before it
    changes anything (create's, update's): it is given each property alone,
    so that every bad one is named, not just the first.  A property
    ``check`` refuses as such (BadProperty) is a bad property, one it
    refuses for its value a bad value.  Nothing here requires a property:
    every one has a default, so ``missing_properties`` stays empty.
    """
    bad_properties: list[str] = []
    bad_values: list[str] = []
    for key, value in payload.items():
        try:
            check({key: value})
        except BadProperty:
            bad_properties.append(key)
        except InvalidParameter:
            bad_values.append(key)
    return {"bad_properties": bad_properties, "bad_values": bad_values,
            "missing_properties": []}  # fmt: skip
