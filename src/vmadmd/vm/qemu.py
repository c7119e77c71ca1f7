"""qemu's command line, built from a VM's properties.

A pure function: no I/O, so it is tested without qemu.  Sockets are given as
names relative to the runtime directory (qemu is started there), so a deep
zones root never hits the unix socket path limit; files (pid, console log)
are absolute, since ``-daemonize`` makes qemu ``chdir("/")`` once it is up.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from vmadmd.vm.store import VmPaths

NIC_DEVICES = {"virtio": "virtio-net-pci", "e1000": "e1000", "rtl8139": "rtl8139"}


def esc(value: str) -> str:
    """A value inside a qemu option string: a comma is written twice.

    Unescaped, ``alias: "x,process=sshd"`` would add an option (renaming the
    process), and a comma in a path would cut it short.
    """
    return value.replace(",", ",,")


def _drive_opts(index: int, disk: Mapping[str, Any]) -> list[str]:
    drive_id = f"disk{index}"
    fmt = disk.get("image_format", "qcow2")
    args = ["-drive", f"file={esc(disk['path'])},if=none,id={drive_id},format={fmt}"]
    boot = ",bootindex=0" if disk.get("boot") else ""
    model = disk.get("model", "virtio")
    if model == "virtio":
        args += ["-device", f"virtio-blk-pci,drive={drive_id}{boot}"]
    elif model == "ide":
        args += ["-device", f"ide-hd,drive={drive_id}{boot}"]
    else:  # scsi
        args += ["-device", f"scsi-hd,drive={drive_id},bus=scsi0.0{boot}"]
    return args


def build_argv(
    vm: Mapping[str, Any],
    paths: VmPaths,
    qemu: str,
    accel: Literal["kvm", "tcg"],
    *,
    require_vnc_password: bool = False,
) -> list[str]:
    """The full argv for ``vm``; run it with ``cwd=paths.runtime_dir``."""
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
        f"logfile={esc(paths.console_log)},logappend=off",
        "-serial", "chardev:serial0",
        # A guest kernel that panics says so (GUEST_PANICKED), and the VM
        # stops (SHUTDOWN with reason guest-panic): recorded as a panic, and
        # restarted if the VM asks for it (restart_on_crash).
        "-device", "pvpanic",
        "-action", "panic=shutdown",
        "-pidfile", paths.pid,
        "-daemonize",
    ]  # fmt: skip
    if vm.get("vnc_port", 0) != -1:
        vnc = f"unix:{paths.VNC_NAME}"
        if vm.get("vnc_password") or require_vnc_password:
            # qemu refuses every VNC client until the daemon sets the
            # password over QMP (set_password).
            vnc += ",password=on"
        argv += ["-vnc", vnc]
    disks = vm.get("disks", [])
    if any(d.get("model") == "scsi" for d in disks):
        argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    for i, disk in enumerate(disks):
        argv += _drive_opts(i, disk)
    for i, nic in enumerate(vm.get("nics", [])):
        if nic.get("netdev") == "tap":
            netdev = f"tap,id=net{i},ifname={nic['ifname']},script=no,downscript=no"
        else:
            netdev = f"user,id=net{i}"
        argv += [
            "-netdev", netdev,
            "-device", f"{NIC_DEVICES[nic.get('model', 'virtio')]},netdev=net{i},mac={nic['mac']}",
        ]  # fmt: skip
    extra = vm.get("qemu_extra_opts")
    if extra:
        import shlex  # here, not at the top: the CLI's start-up time

        argv += shlex.split(extra)
    return argv
