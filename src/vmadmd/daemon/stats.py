"""Per-VM statistics: CPU, memory, disks, nics; for the API and for /metrics.

Collected cheaply, so that a Prometheus scrape of a host with a thousand VMs
costs file reads, never a QMP command per VM: CPU time and resident memory
come from ``/proc/<pid>`` at the moment they are asked for, nic counters
from one netlink dump of the taps (per scrape, not per VM), and block counters from
``query-blockstats``, which each VM's supervisor refreshes in the background
(``BLOCKSTATS_PERIOD``) and the API refreshes when it is asked for one VM.

Nic counters are the guest's view, as ``virsh domifstat`` gives them: what
the host sends into a tap is what the guest receives.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from vmadmd.daemon.monitor import DiskStats

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


BLOCKSTATS_PERIOD = 15.0  # seconds between background query-blockstats, per VM

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_stat(pid: int) -> tuple[float, int] | None:
    """(CPU seconds, user + system, all threads; resident bytes) of a process,
    from one read of ``/proc/<pid>/stat`` (three syscalls: a scrape of 1,000
    VMs makes one of these per VM)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        try:
            raw = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError:
        return None
    stat = raw.decode(errors="replace")
    # Fields after the comm (which may hold spaces and parentheses): the
    # 3rd field of stat(5) is fields[0].
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        seconds = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime
        return seconds, int(fields[21]) * _PAGE  # rss, in pages
    except (IndexError, ValueError):
        return None


def nic_counters(names: Iterable[str]) -> dict[str, tuple[int, int]]:
    """(received, transmitted) bytes of these taps, as their guests see them.

    One netlink dump for all of them (pyroute2: sysfs would show another
    network namespace's interfaces when /sys was mounted for it).
    """
    wanted = set(names)
    if not wanted:
        return {}
    from pyroute2 import IPRoute

    out: dict[str, tuple[int, int]] = {}
    try:
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get_attr("IFLA_IFNAME")
                stats = link.get_attr("IFLA_STATS64")
                if name in wanted and stats is not None:
                    # What the host sends into a tap is what its guest receives.
                    out[name] = (int(stats["tx_bytes"]), int(stats["rx_bytes"]))
    except OSError:
        return {}
    return out


class VmStats:
    """What the statistics need of one running VM, kept by its supervisor:
    what to call it, its taps, its last block counters."""

    __slots__ = ("alias", "disks", "nics", "pid", "uuid")

    def __init__(self, uuid: str, pid: int) -> None:
        self.uuid = uuid
        self.pid = pid
        self.alias = ""
        self.nics: list[str] = []
        self.disks: dict[str, DiskStats] = {}


def snapshot(
    vm: VmStats, memory_limit: int | None, nics_now: dict[str, tuple[int, int]]
) -> dict[str, Any]:
    """The ``stats`` info of one VM (the API's shape); ``nics_now`` from ``nic_counters``."""
    nics = {
        name: {"rx_bytes": rx, "tx_bytes": tx}
        for name, (rx, tx) in nics_now.items()
        if name in vm.nics
    }
    got = proc_stat(vm.pid)
    return {
        "cpu_seconds": got[0] if got is not None else None,
        "memory_bytes": got[1] if got is not None else None,
        "memory_limit_bytes": memory_limit,
        "disks": {dev: d._asdict() for dev, d in vm.disks.items()},
        "nics": nics,
    }


class _Seen(NamedTuple):
    """What a scrape needs of one running VM, copied on the event loop."""

    uuid: str
    alias: str
    pid: int
    nics: list[str]
    disk_stats: dict[str, DiskStats]


class VmStatsCollector:
    """The per-VM series in /metrics, read at scrape time from what is cached.

    ``prepare`` (on the event loop) copies what the scrape needs of each
    running VM; ``collect`` may then run in a thread: its ``/proc`` reads
    and the page's formatting are ~30 ms with 1,000 VMs, which the loop
    does not wait for.
    """

    def __init__(self, running: Callable[[], Iterable[VmStats]]) -> None:
        self._running = running
        # The taps' counters, read just before a scrape renders (see refresh).
        self.nic_counters: dict[str, tuple[int, int]] = {}
        self._seen: list[_Seen] = []

    def prepare(self) -> None:
        """Copy what the next ``collect`` reads of the running VMs (on the loop)."""
        self._seen = [_Seen(vm.uuid, vm.alias, vm.pid, vm.nics, vm.disks) for vm in self._running()]

    async def refresh(self) -> None:
        """Read the taps' counters off the event loop (pyroute2 runs a loop of
        its own, and cannot inside the daemon's)."""
        names = [name for vm in self._running() for name in vm.nics]
        self.nic_counters = await asyncio.to_thread(nic_counters, names) if names else {}

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        # Imported at the first scrape (see vmadmd.daemon.metrics: start-up).
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        vm_labels = ["uuid", "alias"]
        cpu = CounterMetricFamily(
            "vmadmd_vm_cpu_seconds", "CPU time of the VM's qemu (user + system)", labels=vm_labels
        )
        mem = GaugeMetricFamily(
            "vmadmd_vm_memory_bytes", "Resident memory of the VM's qemu", labels=vm_labels
        )
        disk_labels = [*vm_labels, "device"]
        rd = CounterMetricFamily(
            "vmadmd_vm_disk_read_bytes", "Bytes the guest read from a disk", labels=disk_labels
        )
        wr = CounterMetricFamily(
            "vmadmd_vm_disk_write_bytes", "Bytes the guest wrote to a disk", labels=disk_labels
        )
        nic_labels = [*vm_labels, "nic"]
        rx = CounterMetricFamily(
            "vmadmd_vm_nic_receive_bytes", "Bytes the guest received on a nic", labels=nic_labels
        )
        tx = CounterMetricFamily(
            "vmadmd_vm_nic_transmit_bytes", "Bytes the guest sent on a nic", labels=nic_labels
        )
        counters = self.nic_counters
        for vm in self._seen:
            labels = [vm.uuid, vm.alias]
            got = proc_stat(vm.pid)
            if got is not None:
                cpu.add_metric(labels, got[0])
                mem.add_metric(labels, got[1])
            for dev, d in vm.disk_stats.items():
                rd.add_metric([*labels, dev], d.read_bytes)
                wr.add_metric([*labels, dev], d.write_bytes)
            for name in vm.nics:
                if name in counters:
                    rx.add_metric([*labels, name], counters[name][0])
                    tx.add_metric([*labels, name], counters[name][1])
        yield from (cpu, mem, rd, wr, rx, tx)
