"""Settings shared by ``vmadm`` and ``vmadmd``: flag, environment, default.

Standard library only: the CLI imports this and must start fast.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (vmadm start-up)
if TYPE_CHECKING:
    from typing import Literal

    Accel = Literal["kvm", "tcg", "auto"]
    UserNet = Literal["restricted", "nat"]

ACCELS: tuple[Accel, ...] = ("kvm", "tcg", "auto")
# User-mode (slirp) nics: ``restricted`` (restrict=on) keeps the guest from
# the host and the outside alike; ``nat`` lets it reach both, the host's
# 127.0.0.1 included (as 10.0.2.2): every VM's VNC listener and any other
# loopback-only service.
USER_NETS: tuple[UserNet, ...] = ("restricted", "nat")
DEFAULT_USER_NET: UserNet = "restricted"

DEFAULT_ZONES_ROOT = "/zones"
DEFAULT_SOCKET = "/tmp/vmadmd.http"
# Where the systemd unit puts it (its RuntimeDirectory, root's alone);
# vmadm looks there first.
RUN_SOCKET = "/run/vmadmd/vmadmd.http"
DEFAULT_AUTOBOOT_MARKER = "/tmp/.autoboot_vmadmd"
DEFAULT_VNC_BIND = "127.0.0.1"
DEFAULT_QEMU = "qemu-system-x86_64"
DEFAULT_ACCEL: Accel = "auto"
# The VMs' own users: uid (= gid) from here up, one per VM.  Far from login
# users (1000+), from systemd's dynamic users (61184-65519) and from the usual
# subordinate id ranges of containers (100000+, 65536 each), and below 2^31
# for the tools that still take ids as signed.
DEFAULT_ZONE_UID_BASE = 2_000_000_000
# Every uid ever handed out to a VM, host-wide (vm/uids.py): never twice.
DEFAULT_UID_LEDGER = "/var/lib/vmadmd/zone-uids"


def client_socket() -> str:
    """The socket vmadm talks to: $VMADMD_SOCKET, else the unit's, else the default."""
    chosen = os.environ.get("VMADMD_SOCKET", "")
    if chosen:
        return chosen
    return RUN_SOCKET if os.path.exists(RUN_SOCKET) else DEFAULT_SOCKET


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes", "on")


def env_or(name: str, default: str) -> str:
    value = os.environ.get(name, "")
    return value if value else default


def parse_accel(value: str) -> Accel:
    for accel in ACCELS:
        if value == accel:
            return accel
    raise ValueError(f"accel must be kvm, tcg or auto, not {value!r}")


def parse_user_net(value: str) -> UserNet:
    for mode in USER_NETS:
        if value == mode:
            return mode
    raise ValueError(f"user-net must be restricted or nat, not {value!r}")


def vnc_password_required() -> bool:
    """A VNC password is required unless the host opts out with
    ``VMADMD_VNC_NO_PASSWORD=1``.  (``VMADM_VNC_REQUIRE_PASSWORD``, the old
    opt-in, is the default now; set, it wins over the opt-out.)"""
    return env_flag("VMADM_VNC_REQUIRE_PASSWORD") or not env_flag("VMADMD_VNC_NO_PASSWORD")


def kvm_usable() -> bool:
    """True when ``/dev/kvm`` can be opened for reading and writing."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def resolve_accel(accel: Accel) -> Literal["kvm", "tcg"]:
    if accel == "auto":
        return "kvm" if kvm_usable() else "tcg"
    return accel


class VmSettings:
    """What the VM layer needs, whoever drives it.

    (A plain class: a ``typing.NamedTuple`` costs every vmadm call the
    import of typing and ~1 ms of class building.)
    """

    __slots__ = (
        "accel",
        "cgroup_manager",
        "cgroup_root",
        "images_dir",
        "nic_tags",
        "qemu",
        "uid_ledger",
        "user_net",
        "vnc_require_password",
        "zone_uid_base",
        "zones_root",
    )  # fmt: skip

    def __init__(
        self,
        zones_root: str,
        qemu: str = DEFAULT_QEMU,
        accel: Accel = DEFAULT_ACCEL,
        vnc_require_password: bool = True,
        images_dir: str = "",
        nic_tags: str = "",
        cgroup_root: str = "",
        cgroup_manager: str = "auto",
        zone_uid_base: int = DEFAULT_ZONE_UID_BASE,
        uid_ledger: str = DEFAULT_UID_LEDGER,
        user_net: UserNet = DEFAULT_USER_NET,
    ) -> None:
        self.zones_root = zones_root
        self.qemu = qemu
        self.accel = accel
        # Every console requires a password (one is generated for a VM that
        # has none): qemu must be started with VNC auth for it.  Off only
        # with --vnc-no-password / VMADMD_VNC_NO_PASSWORD=1.
        self.vnc_require_password = vnc_require_password
        # User-mode nics: restrict=on unless the host says nat.
        self.user_net = user_net
        # Disk images by uuid (<uuid>.qcow2 or .raw); "" = <zones_root>/images.
        self.images_dir = images_dir
        # Nic tags -> bridges, "admin=br0,external=br1".
        self.nic_tags = nic_tags
        # The cgroup filesystem the VMs' cgroups are made in ("" = /sys/fs/cgroup).
        self.cgroup_root = cgroup_root
        # Who makes the VMs' cgroups: auto (systemd where it is PID 1), systemd, cgroupfs.
        self.cgroup_manager = cgroup_manager
        self.zone_uid_base = zone_uid_base
        # The host-wide ledger of the uids handed out, shared by every zones root.
        self.uid_ledger = uid_ledger

    @property
    def images(self) -> str:
        return self.images_dir or os.path.join(self.zones_root, "images")

    @classmethod
    def from_env(cls) -> VmSettings:
        return cls(
            zones_root=env_or("VMADM_ZONES_ROOT", DEFAULT_ZONES_ROOT),
            qemu=env_or("VMADM_QEMU", DEFAULT_QEMU),
            accel=parse_accel(env_or("VMADM_ACCEL", DEFAULT_ACCEL)),
            vnc_require_password=vnc_password_required(),
            images_dir=os.environ.get("VMADM_IMAGES_DIR", ""),
            nic_tags=os.environ.get("VMADM_NIC_TAGS", ""),
            cgroup_root=os.environ.get("VMADM_CGROUP_ROOT", ""),
            cgroup_manager=env_or("VMADM_CGROUP_MANAGER", "auto"),
            zone_uid_base=int(env_or("VMADM_ZONE_UID_BASE", str(DEFAULT_ZONE_UID_BASE))),
            uid_ledger=env_or("VMADM_UID_LEDGER", DEFAULT_UID_LEDGER),
            user_net=parse_user_net(env_or("VMADM_USER_NET", DEFAULT_USER_NET)),
        )
