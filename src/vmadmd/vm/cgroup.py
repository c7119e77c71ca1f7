"""Each running VM in a cgroup of its own, named after its uuid, with SmartOS's limits.

SmartOS's resource controls, in SmartOS's units, map onto the cgroup's files:

- ``max_physical_memory``, MiB (default ``ram`` + 1024): ``memory.max`` (v2),
  ``memory.limit_in_bytes`` (v1);
- ``cpu_cap``, percent of one CPU (0: none): ``cpu.max`` / ``cpu.cfs_quota_us``;
- ``cpu_shares``, a relative weight (default 100): ``cpu.weight`` / ``cpu.shares``
  (scaled so that 100 is the kernel's default 1024);
- ``max_lwps``, processes and threads: ``pids.max``.

Two managers (``VMADM_CGROUP_MANAGER``: ``auto``, ``systemd``, ``cgroupfs``):

- **systemd**, where systemd is PID 1 (``auto`` picks it when
  ``/run/systemd/system`` exists and ``systemd-run`` is there): qemu is
  started inside a transient scope, ``vmadmd-<uuid>.scope`` in
  ``vmadmd.slice``, by ``systemd-run --scope`` with the controls as unit
  properties (``MemoryMax``, ``CPUQuota``, ``CPUWeight``, ``TasksMax``);
  live changes go through ``systemctl set-property --runtime``; systemd
  removes the scope with its last process (``--collect``).  As libvirt's
  machine scopes, this keeps systemd the one writer of its cgroup tree.
- **cgroupfs**, everywhere else: ``<hierarchy>/vmadmd/<uuid>``, written
  directly; on a unified (v2) hierarchy one directory, with the controllers
  enabled on ``vmadmd``; on v1 one directory per controller hierarchy
  (memory, cpu, cpuacct, pids).

v2 or v1 is found from the hierarchy's root (``cgroup.controllers`` says v2
and which controllers it has); the limits are read back from the VM's
directory under either manager.  ``vmadm update`` applies a changed control
to a running VM at once.

Standard library only: the CLI imports this.
"""

from __future__ import annotations

import os
import time
from typing import Any, NamedTuple

from vmadmd.errors import StartFailed

DEFAULT_ROOT = "/sys/fs/cgroup"
PARENT = "vmadmd"
SLICE = "vmadmd.slice"
MANAGERS = ("auto", "systemd", "cgroupfs")
CFS_PERIOD = 100_000  # µs
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids")


class Limits(NamedTuple):
    memory_bytes: int
    cpu_cap: int  # percent of one CPU, 0 = no cap
    cpu_shares: int
    max_lwps: int | None


def limits_of(vm: dict[str, Any]) -> Limits:
    """The resource controls a VM record asks for, defaults filled."""
    memory = int(vm.get("max_physical_memory") or int(vm.get("ram", 256)) + 1024)
    lwps = vm.get("max_lwps")
    return Limits(
        memory_bytes=memory * 1024 * 1024,
        cpu_cap=int(vm.get("cpu_cap") or 0),
        cpu_shares=int(vm.get("cpu_shares") or 100),
        max_lwps=int(lwps) if lwps else None,
    )


RESOURCE_KEYS = ("max_physical_memory", "cpu_cap", "cpu_shares", "max_lwps", "ram")


def resolve_manager(manager: str) -> str:
    """``systemd`` or ``cgroupfs``; ``auto``: systemd where it is PID 1."""
    if manager not in MANAGERS:
        raise ValueError(f"cgroup manager must be one of {', '.join(MANAGERS)}, not {manager!r}")
    if manager != "auto":
        return manager
    if not os.path.isdir("/run/systemd/system"):
        return "cgroupfs"
    import shutil  # here, not at the top: every vmadm call builds a Cgroups

    return "systemd" if shutil.which("systemd-run") else "cgroupfs"


def cpu_weight(limits: Limits) -> int:
    """``cpu_shares`` as a v2 / systemd CPU weight (1-10000, default 100)."""
    return max(1, min(10000, limits.cpu_shares))


def systemd_properties(limits: Limits) -> list[str]:
    """SmartOS's controls as systemd unit properties (``K=V``)."""
    return [
        f"MemoryMax={limits.memory_bytes}",
        f"CPUQuota={limits.cpu_cap}%" if limits.cpu_cap else "CPUQuota=",
        f"CPUWeight={cpu_weight(limits)}",
        f"TasksMax={limits.max_lwps or 'infinity'}",
    ]


class Placement(NamedTuple):
    """How the launcher puts qemu in its cgroup: pid files to join, or a
    command to run it under (``systemd-run --scope ... --``)."""

    procs: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()


class Cgroups:
    """The VMs' cgroups under one cgroup filesystem root."""

    def __init__(self, root: str = DEFAULT_ROOT, manager: str = "cgroupfs") -> None:
        self.root = root
        self.systemd = resolve_manager(manager) == "systemd"
        controllers = os.path.join(root, "cgroup.controllers")
        try:
            with open(controllers) as f:
                have = set(f.read().split())
        except OSError:
            have = set()
        self.v2 = {"memory", "cpu", "pids"} <= have

    # -- paths -----------------------------------------------------------------

    @staticmethod
    def unit(uuid: str) -> str:
        return f"vmadmd-{uuid}.scope"

    def dirs(self, uuid: str) -> dict[str, str]:
        """Controller -> the VM's directory ("" for the one v2 directory)."""
        rel = os.path.join(SLICE, self.unit(uuid)) if self.systemd else os.path.join(PARENT, uuid)
        if self.v2:
            return {"": os.path.join(self.root, rel)}
        return {c: os.path.join(self.root, c, rel) for c in V1_CONTROLLERS}

    def _file(self, controller: str, uuid: str, name: str) -> str:
        key = "" if self.v2 else controller
        return os.path.join(self.dirs(uuid)[key], name)

    # -- lifecycle ---------------------------------------------------------------

    def create(self, uuid: str) -> None:
        if self.systemd:
            return  # systemd-run makes the scope
        if self.v2:
            parent = os.path.join(self.root, PARENT)
            os.makedirs(parent, exist_ok=True)
            _write(os.path.join(parent, "cgroup.subtree_control"), "+memory +cpu +pids")
        for path in self.dirs(uuid).values():
            os.makedirs(path, exist_ok=True)

    def apply(self, uuid: str, limits: Limits) -> None:
        """Write the limits (also to a running VM's cgroup: they take effect at once)."""
        if self.systemd:
            _run(["systemctl", "set-property", "--runtime", self.unit(uuid),
                  *systemd_properties(limits)])  # fmt: skip
            return
        cap = limits.cpu_cap * CFS_PERIOD // 100
        lwps = str(limits.max_lwps) if limits.max_lwps else "max"
        if self.v2:
            _write(self._file("memory", uuid, "memory.max"), str(limits.memory_bytes))
            _write(self._file("cpu", uuid, "cpu.max"), f"{cap or 'max'} {CFS_PERIOD}")
            _write(self._file("cpu", uuid, "cpu.weight"), str(cpu_weight(limits)))
        else:
            _write(self._file("memory", uuid, "memory.limit_in_bytes"), str(limits.memory_bytes))
            _write(self._file("cpu", uuid, "cpu.cfs_period_us"), str(CFS_PERIOD))
            _write(self._file("cpu", uuid, "cpu.cfs_quota_us"), str(cap or -1))
            shares = max(2, limits.cpu_shares * 1024 // 100)
            _write(self._file("cpu", uuid, "cpu.shares"), str(shares))
        _write(self._file("pids", uuid, "pids.max"), lwps)

    def add(self, uuid: str, pid: int) -> None:
        """Move a process (all its threads) into the VM's cgroup."""
        for path in self.dirs(uuid).values():
            _write(os.path.join(path, "cgroup.procs"), str(pid))

    def remove(self, uuid: str, wait: float = 2.0) -> None:
        """Remove the VM's cgroup once empty.

        A qemu that has just exited stays in its cgroup until it is reaped
        (EBUSY): retried for up to ``wait`` seconds, then left (the next
        start of the VM reuses it).
        """
        if self.systemd:
            return  # systemd collects the scope with its last process
        deadline = time.monotonic() + wait
        for path in self.dirs(uuid).values():
            while True:
                try:
                    os.rmdir(path)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)

    def prepare(self, uuid: str, limits: Limits) -> Placement:
        """The VM's cgroup, made and limited before its qemu starts.

        cgroupfs: the ``cgroup.procs`` files the launcher writes its own pid
        to before it forks qemu.  systemd: the ``systemd-run --scope``
        command qemu is exec'd through.  Either way qemu runs inside its
        limits from its first instruction, never briefly outside them.
        """
        if self.systemd:
            prefix = ["systemd-run", "--scope", "--quiet", "--collect",
                      f"--unit={self.unit(uuid)}", f"--slice={SLICE}"]  # fmt: skip
            for prop in systemd_properties(limits):
                if not prop.endswith("="):
                    prefix += ["-p", prop]
            return Placement(prefix=(*prefix, "--"))
        try:
            self.create(uuid)
            self.apply(uuid, limits)
        except OSError as err:
            raise StartFailed(f"VM {uuid}: cannot set up its cgroup: {err}") from err
        procs = [os.path.join(path, "cgroup.procs") for path in self.dirs(uuid).values()]
        return Placement(procs=tuple(procs))

    # -- reading -------------------------------------------------------------------

    def memory_limit(self, uuid: str) -> int | None:
        name = "memory.max" if self.v2 else "memory.limit_in_bytes"
        text = _read(self._file("memory", uuid, name))
        return int(text) if text and text.isdigit() else None

    def cpu_usage_ns(self, uuid: str) -> int | None:
        """CPU time used by the cgroup's processes, in ns."""
        if self.v2:
            for line in (_read(self._file("cpu", uuid, "cpu.stat")) or "").splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) * 1000
            return None
        text = _read(self._file("cpuacct", uuid, "cpuacct.usage"))
        return int(text) if text and text.isdigit() else None


def _run(argv: list[str]) -> None:
    import subprocess

    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                             check=False)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as err:
        raise OSError(f"{argv[0]}: {err}") from None
    if res.returncode != 0:
        raise OSError(f"{' '.join(argv[:2])}: {res.stderr.decode(errors='replace').strip()}")


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None
