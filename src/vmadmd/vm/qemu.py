"""qemu's command line, built from a VM's properties.

A pure function: no I/O, so it is tested without qemu.  qemu runs as the
VM's own unprivileged user with its runtime directory (``root/tmp``) as its
working directory, and needs no path outside it: sockets and the console log
are names relative to it (so a deep zones root never hits the unix socket
path limit either), and disks are fds the launcher opened and passed
(``-add-fd``, ``/dev/fdset/N``), so the zones root's ancestors may be closed
to the VM's user.  qemu stays in the foreground (no ``-daemonize``, whose
fork the sandbox's ``spawn=deny`` kills) and writes no pidfile (it would
resolve the file's absolute path through those ancestors); the launcher
does both jobs (``vm/launch.py``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from vmadmd.vm.props import parse_boot
from vmadmd.vm.store import VmPaths

if TYPE_CHECKING:
    from vmadmd.vm.bootopts import BootMedium, BootOptions
    from vmadmd.vm.config import UserNet

# The guest's second serial port (its ttyS1), where it asks for its
# metadata: SmartOS's name for the socket, relative to qemu's working directory.
TTYB_NAME = "vm.ttyb"

# The guest agent's channel (qemu-guest-agent listens on the port of that
# name in the guest); the daemon freezes file systems through it for a
# snapshot (daemon/guestagent.py).
AGENT_CHARDEV = "qga0"
AGENT_SOCKET = "vm.qga"
AGENT_PORT = "org.qemu.guest_agent.0"

NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}

# qemu's seccomp sandbox, every group of syscalls denied.  qemu 7.2 takes
# them together when it is started unprivileged and in the foreground:
# ``spawn=deny`` kills a ``-daemonize`` (its fork is a denied clone) and
# ``-runas`` needs the setuid that ``elevateprivileges=deny`` forbids.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class DiskFds(NamedTuple):
    """The fds a disk is opened through, as the child process will see them.

    ``fd`` is the disk itself (read-write); ``image_fd`` its backing image
    (read-only, ``image_format``), for a disk made from an image.
    """

    fd: int
    image_fd: int | None = None
    image_format: str | None = None


def esc(value: str) -> str:
    """A value inside a qemu option string: a comma is written twice.

    Unescaped, ``alias: "x,process=sshd"`` would add an option (renaming the
    process), and a comma in a path would cut it short.
    """
    return value.replace(",", ",,")


def _blockdev(options: dict[str, Any]) -> list[str]:
    return ["-blockdev", json.dumps(options, separators=(",", ":"))]


def _node_over_fd(
    node: str,
    fd: int,
    fdset: int,
    fmt: str,
    *,
    backing: str | None = None,
    read_only: bool = False,
) -> list[str]:
    """``fd`` as fd set ``fdset``, a file node over it and a ``fmt`` node on
    top named ``node``; a qcow2 gets exactly the backing given (None: none)."""
    ro: dict[str, Any] = {"read-only": True} if read_only else {}
    top: dict[str, Any] = {"driver": fmt, "node-name": node, "file": f"{node}-file", **ro}
    if fmt == "qcow2":
        top["backing"] = backing
    return [
        "-add-fd", f"fd={fd},set={fdset},opaque={node}",
        *_blockdev({"driver": "file", "node-name": f"{node}-file",
                    "filename": f"/dev/fdset/{fdset}", **ro}),
        *_blockdev(top),
    ]  # fmt: skip


def _medium_opts(index: int, medium: BootMedium, fd: int, fdset: int) -> list[str]:
    """A CD (read-only) or a disk for this boot only, raw over its passed fd.

    Raw, never probed: a file the VM's user wrote into the zone root is
    only data, whatever its first bytes say.  A ``virtio`` CD is a
    read-only virtio disk (there is no virtio CD drive); the BIOS counts it
    as a hard disk.
    """
    cd = medium.kind == "cdrom"
    node = f"{'cd' if cd else 'extra'}{index}"
    args = _node_over_fd(node, fd, fdset, "raw", read_only=cd)
    if medium.model == "virtio":
        args += ["-device", f"virtio-blk-pci,drive={node}"]
    elif medium.model == "ide":
        args += ["-device", f"{'ide-cd' if cd else 'ide-hd'},drive={node}"]
    else:  # scsi
        args += ["-device", f"{'scsi-cd' if cd else 'scsi-hd'},drive={node},bus=scsi0.0"]
    return args


def boot_order(vm: Mapping[str, Any], boot: BootOptions | None) -> str | None:
    """qemu's ``-boot`` value: this boot's order, else the VM's ``boot``
    property, else None (the disk marked ``boot`` goes first, by bootindex)."""
    if boot is not None and boot.boot is not None:
        return boot.boot
    value = vm.get("boot")
    if not isinstance(value, str):
        return None
    order, once = parse_boot(value)
    return f"order={order}" + (f",once={once}" if once else "")


def _disk_opts(
    index: int, disk: Mapping[str, Any], fds: DiskFds, *, bootindex: bool = True
) -> list[str]:
    """A disk as ``-blockdev`` nodes over passed fds, and its device.

    The backing chain is spelled out, never probed from the image: a disk
    made from an image gets that image (read-only, its format given) as its
    backing node, and every other qcow2 gets none, so a header naming
    ``/etc/shadow`` as its backing file opens nothing.
    """
    node = f"disk{index}"
    args: list[str] = []
    backing: str | None = None
    if fds.image_fd is not None:
        backing = f"{node}-image"
        args += _node_over_fd(backing, fds.image_fd, 2 * index + 2, fds.image_format or "raw",
                              read_only=True)  # fmt: skip
    fmt = disk.get("image_format", "qcow2")
    args += _node_over_fd(node, fds.fd, 2 * index + 1, fmt, backing=backing)
    # The device's id is its node's name: how a day-two change finds it.
    # A bootindex beats -boot's order in SeaBIOS: none is set where an order is.
    boot = f",id={node}" + (",bootindex=0" if disk.get("boot") and bootindex else "")
    model = disk.get("model", "virtio")
    if model == "virtio":
        args += ["-device", f"virtio-blk-pci,drive={node}{boot}"]
    elif model == "ide":
        args += ["-device", f"ide-hd,drive={node}{boot}"]
    else:  # scsi
        args += ["-device", f"scsi-hd,drive={node},bus=scsi0.0{boot}"]
    return args


def build_argv(
    vm: Mapping[str, Any],
    paths: VmPaths,
    qemu: str,
    accel: Literal["kvm", "tcg"],
    *,
    disk_fds: Sequence[DiskFds],
    tap_fds: Mapping[int, int] | None = None,
    require_vnc_password: bool = True,
    user_net: UserNet = "restricted",
    boot: BootOptions | None = None,
    media_fds: Sequence[int] = (),
    incoming: bool = False,
) -> list[str]:
    """The full argv for ``vm``; run it with ``cwd=paths.runtime_dir`` and
    ``disk_fds`` (one per disk) and ``tap_fds`` (nic index -> an fd on its
    tap, for every tap nic) open.

    ``require_vnc_password``: qemu's VNC server demands a password even when
    the VM sets none (the daemon gives it a generated one).  ``user_net``:
    ``restricted`` starts user-mode nics with ``restrict=on``, so the guest
    reaches neither the host (whose 127.0.0.1 slirp maps to 10.0.2.2) nor
    the outside; ``nat`` lets it reach both.  ``boot``: options for this
    boot only (an order, CDs and disks from the zone root, whose fds are
    ``media_fds``, one per medium).  ``incoming``: the target of a
    live migration (``-incoming defer -S``: it waits for ``migrate-incoming``
    and stays paused once the state is in, until the daemon says ``cont``).
    """
    uuid = vm["uuid"]
    cpu = vm.get("cpu_type") or ("host" if accel == "kvm" else "qemu64")
    argv = [
        qemu,
        "-name", f"{esc(vm.get('alias') or uuid)},debug-threads=on",
        "-uuid", uuid,
        "-machine", f"pc,accel={accel}",
        "-cpu", cpu,
        "-m", str(vm["ram"]),
        "-smp", str(vm["vcpus"]),
        "-nodefaults",
        "-no-user-config",
        "-vga", "std",
        "-display", "none",
        "-qmp", f"unix:{paths.QMP_NAME},server=on,wait=off",
        "-chardev",
        f"socket,id=serial0,path={paths.CONSOLE_NAME},server=on,wait=off,"
        f"logfile={paths.CONSOLE_LOG_NAME},logappend=off",
        "-serial", "chardev:serial0",
        # SmartOS's metadata port (the daemon's agent holds it) and identity:
        # cloud-init picks its SmartOS datasource when the DMI product name
        # starts with "SmartDC", then asks on ttyS1.
        "-chardev", f"socket,id=ttyb,path={TTYB_NAME},server=on,wait=off",
        "-serial", "chardev:ttyb",
        "-smbios", f"type=1,manufacturer=Joyent,product=SmartDC HVM,"
                   f"serial={esc(uuid)},uuid={esc(uuid)}",
        # A guest kernel that panics says so (GUEST_PANICKED), and the VM
        # stops (SHUTDOWN with reason guest-panic): recorded as a panic, and
        # restarted if the VM asks for it (restart_on_crash).
        "-device", "pvpanic",
        "-action", "panic=shutdown",
        # The guest agent's channel, on every VM (see AGENT_CHARDEV).
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id={AGENT_CHARDEV},path={AGENT_SOCKET},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name={AGENT_PORT}",
        "-sandbox", SANDBOX,
    ]  # fmt: skip
    if vm.get("vnc_port", 0) != -1:
        vnc = f"unix:{paths.VNC_NAME}"
        if vm.get("vnc_password") or require_vnc_password:
            # qemu refuses every VNC client until the daemon sets the
            # password over QMP (set_password).
            vnc += ",password=on"
        argv += ["-vnc", vnc]
    disks = vm.get("disks", [])
    if len(disk_fds) != len(disks):
        raise ValueError(f"{len(disks)} disks but {len(disk_fds)} disk fds")
    media = boot.media if boot is not None else ()
    if len(media_fds) != len(media):
        raise ValueError(f"{len(media)} boot media but {len(media_fds)} fds")
    if any(d.get("model") == "scsi" for d in disks) or any(m.model == "scsi" for m in media):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    order = boot_order(vm, boot)
    if order is not None:
        argv += ["-boot", order]
    for i, disk in enumerate(disks):
        argv += _disk_opts(i, disk, disk_fds[i], bootindex=order is None)
    # After the VM's own disks (their fd sets are 1 .. 2 * len(disks)).
    for j, (medium, fd) in enumerate(zip(media, media_fds, strict=True)):
        argv += _medium_opts(j, medium, fd, 2 * len(disks) + 1 + j)
    for i, nic in enumerate(vm.get("nics", [])):
        if nic.get("netdev") == "tap":
            if tap_fds is None or i not in tap_fds:
                raise ValueError(f"nics[{i}] is a tap but no fd is given for it")
            netdev = f"tap,id=net{i},fd={tap_fds[i]}"
        else:
            netdev = f"user,id=net{i}"
            if user_net != "nat":
                netdev += ",restrict=on"
        argv += [
            "-netdev", netdev,
            "-device", f"{NIC_DEVICES[nic.get('model', 'virtio')]},netdev=net{i},id=net{i},"
                       f"mac={nic['mac']}",
        ]  # fmt: skip
    extra = vm.get("qemu_extra_opts")
    if extra:
        import shlex  # here, not at the top: the CLI's start-up time

        argv += shlex.split(extra)
    if incoming:
        argv += ["-incoming", "defer", "-S"]
    return argv
