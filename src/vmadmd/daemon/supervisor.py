"""One running VM, owned: its qemu's pidfd, QMP monitor, VNC console, lock and deadline.

A ``VmSupervisor`` exists from the moment the daemon sees a VM's qemu until
that qemu has exited and its exit is settled in ``vm.json``.  Everything
done to one VM goes through its supervisor, serialised by its operation
lock; nothing here touches another VM.

Stops and reboots: the deadline is written to ``vm.json`` before the guest
hears anything, so a daemon killed at any point still forces the stop in
time when it comes back (``start`` re-arms a transition found on disk).
Until the deadline the power button is pressed again every couple of
seconds (a guest still booting can miss one); at the deadline the stop is
forced: ``quit`` over QMP, then SIGTERM, then SIGKILL through the pidfd,
each step bounded.

How the VM ended is recorded as ``last_exit`` (``vm/ending.py``): the
daemon learns it from how the monitor says qemu shut down (the guest's own
power-off, a panic) and from which forcing step, if any, it took; a qemu
that goes away with no shutdown at all crashed (``daemon/ending.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import Callable
from typing import Any, Literal

from vmadmd.daemon import guestagent
from vmadmd.daemon.ending import (
    Settled,
    ending_of,
    release_unless_restarted,
    settle_record,
    waiter_status,
)
from vmadmd.daemon.hotplug import Hotplug
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.mdagent import MetadataAgent
from vmadmd.daemon.monitor import QUERIES, Monitor, Shutdown, VncClient
from vmadmd.daemon.qmppolicy import check_hmp, check_qmp
from vmadmd.daemon.serial import SerialConsole
from vmadmd.daemon.settings import Shared
from vmadmd.daemon.stats import BLOCKSTATS_PERIOD, VmStats, nic_counters, snapshot
from vmadmd.daemon.stopping import Stopping
from vmadmd.daemon.vncconsole import VncConsole, qemu_vnc_mode
from vmadmd.errors import InvalidParameter, QmpRefused, QmpTimeout, VmadmError, WrongState
from vmadmd.vm import proc, zonefs
from vmadmd.vm.devices import all_nics
from vmadmd.vm.disks import Disks
from vmadmd.vm.ending import Ending
from vmadmd.vm.qemu import AGENT_CHARDEV
from vmadmd.vm.sockets import Peer
from vmadmd.vm.store import VmRecord
from vmadmd.vm.transition import Transition, TransitionTo

log = logging.getLogger("vmadmd.supervisor")

INFO_TYPES = (*QUERIES, "vnc")  # the default set
EXTRA_TYPES = ("stats",)  # only when asked for

DRAIN_WAIT = 0.5  # for qemu's last events once its exit is seen
MAX_SCREENSHOT = 64 << 20


def parse_types(raw: str | None) -> list[str]:
    """The info types asked for (all of them when none)."""
    if raw is None or raw == "" or raw == "all":
        return list(INFO_TYPES)
    types = [t.strip() for t in raw.split(",") if t.strip()]
    known = (*INFO_TYPES, *EXTRA_TYPES)
    for t in types:
        if t not in known:
            raise InvalidParameter(f"unknown info type {t!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(types))


class VmSupervisor:
    def __init__(
        self,
        uuid: str,
        pid: int,
        pidfd: int,
        shared: Shared,
        on_exit: Callable[[VmSupervisor], None],
    ) -> None:
        self.uuid = uuid
        self.pid = pid
        self._log = vm_log(log, uuid)
        self.paths = shared.store.paths(uuid)
        self._pidfd = pidfd
        self._shared = shared
        self._on_exit = on_exit
        settings = shared.settings
        # Every socket of this VM is this qemu's, or refused (the pid is the
        # identity-checked one, its pidfd already open).
        peer = Peer.of(pid)
        self.monitor = Monitor(
            uuid,
            self.paths.runtime_dir,
            self.paths.QMP_NAME,
            timeout=settings.qmp_timeout,
            events=self,
            metrics=shared.metrics,
            connect_slots=shared.connect_slots,
            peer=peer,
        )
        self.exited = asyncio.Event()
        self.console = VncConsole(
            uuid, self.paths, self.monitor,
            bind=settings.vnc_bind, relay=settings.vnc_relay,
            qmp_timeout=settings.qmp_timeout, qemu_auth=qemu_vnc_mode(proc.cmdline(pid)),
            bus=shared.bus, metrics=shared.metrics, gone=self.exited.is_set,
            require_password=settings.vm.vnc_require_password,
        )  # fmt: skip
        self.serial = SerialConsole(uuid, self.paths.runtime_dir, self.paths.CONSOLE_NAME, peer)
        self.metadata = MetadataAgent(uuid, shared.store, peer)  # the guest's ttyS1
        self.lock = asyncio.Lock()  # one QMP operation at a time on this VM
        self.stopping = Stopping(uuid, shared, self.monitor, self.exited, self._signal, self._log)
        self._console_task: asyncio.Task[None] | None = None
        self._shutdown: Shutdown | None = None
        self._stats_task: asyncio.Task[None] | None = None
        self._nic_records: list[Any] = []
        self.stats_state = VmStats(uuid, pid)  # what the statistics need of it
        vm_settings = settings.vm
        self.hotplug = Hotplug(
            uuid, shared.store, Disks(vm_settings.images), self.monitor,
            vm_settings.nic_tags, vm_settings.user_net,
        )  # fmt: skip

    @property
    def transition(self) -> Transition | None:
        """The stop or reboot pending, if any."""
        return self.stopping.transition

    @property
    def state(self) -> str:
        return "stopping" if self.transition is not None else "running"

    async def request_stop(self, timeout: float, to: TransitionTo) -> Transition:
        """A stop or reboot with a deadline (``Stopping.request``)."""
        return await self.stopping.request(timeout, to)

    def _signal(self, sig: signal.Signals) -> bool:
        """Signal this very qemu (through its pidfd); False once it is gone."""
        return self._pidfd >= 0 and proc.pidfd_signal(self._pidfd, sig)

    def learn(self, record: VmRecord) -> None:
        """Take what the statistics name the VM by from its (new) record."""
        self.stats_state.alias = str(record.get("alias") or "")
        self._nic_records = all_nics(record)  # the taps of nics qemu still has too
        self.stats_state.nics = [
            str(nic["ifname"])
            for nic in record.get("nics", [])
            if isinstance(nic, dict) and nic.get("netdev") == "tap" and nic.get("ifname")
        ]

    def start(self, record: VmRecord) -> None:
        """Watch the qemu, connect QMP, open the console, re-arm a pending stop."""
        self.learn(record)
        asyncio.get_running_loop().add_reader(self._pidfd, self._on_pidfd)
        self.monitor.start()
        self.serial.start()
        self.metadata.start()
        self._log.info("running (pid %d)", self.pid)
        self._shared.bus.emit("started", self.uuid, pid=self.pid)
        self._console_task = self._shared.spawn(self.console.open(record), f"vnc-{self.uuid}")
        self._stats_task = self._shared.spawn(self._poll_blockstats(), f"stats-{self.uuid}")
        self.stopping.resume(record)
        self._shared.spawn(self._sync_devices(only_pending=True), f"devices-{self.uuid}")

    # -- what the monitor tells (MonitorEvents) ---------------------------------

    def on_shutdown(self, shutdown: Shutdown) -> None:
        self._shutdown = shutdown

    def on_vnc_client(self, client: VncClient) -> None:
        self.console.client_connected(client)

    def on_device_deleted(self, device: str) -> None:
        """A device the guest let go after its unplug's deadline: its nodes,
        fd sets and tap go, and ``live_devices`` says so."""
        self._shared.spawn(self._sync_devices(only_pending=True), f"devices-{self.uuid}")

    async def _sync_devices(self, *, only_pending: bool = False) -> None:
        try:
            async with self.lock:
                if not self.exited.is_set():
                    await self.hotplug.sync(only_pending=only_pending)
        except (VmadmError, OSError) as err:
            self._log.warning("devices not read back from qemu: %s", err)

    async def apply_devices(self, unplug_timeout: float) -> dict[str, Any]:
        """The VM's disks and nics in ``vm.json`` applied to its qemu where
        it can (``daemon/hotplug.py``)."""
        async with self.lock:
            self._alive()
            return await self.hotplug.apply(unplug_timeout)

    def on_lifecycle(self, event: str, data: dict[str, Any]) -> None:
        self._log.debug("QMP event %s", event)
        # Rate-limited: a guest in a reset loop must not flood the history.
        self._shared.bus.emit_limited(event, "qmp_event", self.uuid, event=event, data=data)

    # -- exit ----------------------------------------------------------------

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            asyncio.get_running_loop().remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _on_pidfd(self) -> None:
        self._close_pidfd()
        self.exited.set()
        self.monitor.qemu_gone()
        self._on_exit(self)

    def ending(self, status: int | None = None) -> Ending:
        """How this qemu ended, from what was seen of it."""
        return ending_of(self._shutdown, self.stopping.forced, self.transition is not None, status)

    async def settle(self) -> Settled:
        """After qemu's exit: record it, close the console and the monitor.

        The caller boots the VM again when the transition it cleared went
        ``to: start`` (or after a crash, when the VM asks for that).
        """
        self.stopping.cancel()
        for task in (self._console_task, self._stats_task):
            if task is not None:
                task.cancel()
        await self.monitor.drain(DRAIN_WAIT)
        # Only an exit nothing explains needs the status (which signal).
        unexplained = self._shutdown is None and self.stopping.forced is None
        status = await waiter_status(self.paths.zonepath) if unexplained else None
        # The record first: that is what `vmadm get/stop` wait for.
        settled = await settle_record(self._shared, self.uuid, self.ending(status))
        self._shared.bus.forget(self.uuid)
        why = {"panic": "the guest kernel panicked", "crash": "qemu crashed"}
        reason = settled.ending.reason if settled.ending is not None else ""
        await self.serial.close(why.get(reason, "the VM stopped"))
        await self.metadata.close()
        await self.console.close()
        await self.monitor.close()
        # Its taps and its cgroup go with it (best effort: the next start
        # redoes both); last, as the cgroup may wait for qemu to be reaped.
        # Under the VM's lock, and not once the VM runs again: a start that
        # came as soon as the record said "stopped" has made both anew, and
        # removing them would cut its network and fail its launch.
        await release_unless_restarted(self._shared, self.uuid, self._nic_records)
        return settled

    async def detach(self) -> None:
        """Let go of the VM (daemon shutdown): it keeps running."""
        self._close_pidfd()
        if self._stats_task is not None:
            self._stats_task.cancel()
        await asyncio.gather(
            self.monitor.close(),
            self.console.detach(),
            self.serial.close("vmadmd is shutting down; the VM keeps running"),
            self.metadata.close(),
            return_exceptions=True,
        )

    def _alive(self) -> None:
        if self.exited.is_set():
            raise WrongState(f"VM {self.uuid} is not running")

    # -- QMP operations --------------------------------------------------------

    async def info(self, types: list[str]) -> dict[str, Any]:
        """Every type asked for; one that failed carries ``{"error": ...}``.

        Only when no query answered at all does the failure become the
        answer (a wedged qemu: 504), as one failing query must not hide the
        others (SmartOS returned what it had).
        """
        queries = [t for t in types if t in QUERIES]
        results = await self.monitor.query_all(queries) if queries else []
        failures = [r for r in results if isinstance(r, BaseException)]
        if queries and len(failures) == len(queries):
            # A timeout outranks other failures: it is what the caller must
            # see (504) when qemu is wedged.
            raise sorted(failures, key=lambda e: not isinstance(e, QmpTimeout))[0]
        out: dict[str, Any] = {}
        for kind, result in zip(queries, results, strict=True):
            if isinstance(result, VmadmError):
                out[kind] = {"error": {"code": result.code, "message": result.message}}
            elif isinstance(result, BaseException):
                raise result
            else:
                out[kind] = result
        if "vnc" in types:
            out["vnc"] = self.console.info()
        if "stats" in types:
            out["stats"] = await self.stats()
        return {t: out[t] for t in types if t in out}

    async def stats(self) -> dict[str, Any]:
        """CPU, memory, disk and nic counters (block counters refreshed now)."""
        with contextlib.suppress(VmadmError):
            self.stats_state.disks = await self.monitor.blockstats()
        names = self.stats_state.nics
        nics = await asyncio.to_thread(nic_counters, names) if names else {}
        return snapshot(self.stats_state, self._shared.cgroups.memory_limit(self.uuid), nics)

    async def _poll_blockstats(self) -> None:
        """Keep the block counters fresh for /metrics, one query per period."""
        await asyncio.sleep(random.uniform(0, BLOCKSTATS_PERIOD))  # spread the VMs out
        while True:
            with contextlib.suppress(VmadmError):
                self.stats_state.disks = await self.monitor.blockstats()
            await asyncio.sleep(BLOCKSTATS_PERIOD)

    async def reset(self) -> None:
        async with self.lock:
            await self.monitor.reset()
        self._shared.bus.emit("reset", self.uuid)

    async def nmi(self) -> None:
        async with self.lock:
            await self.monitor.inject_nmi()

    async def screenshot(self, fmt: Literal["ppm", "png"]) -> str:
        """Write a screenshot into the VM's root/tmp; returns its path."""
        async with self.lock:
            return await self._screendump(fmt)

    async def screenshot_png(self) -> bytes:
        """A PNG screenshot, read back (and removed) under the VM's lock."""
        async with self.lock:
            path = await self._screendump("png")
            return await asyncio.to_thread(
                zonefs.take_runtime_file,
                self.paths.zonepath,
                os.path.basename(path),
                MAX_SCREENSHOT,
            )

    async def _screendump(self, fmt: Literal["ppm", "png"]) -> str:
        path = self.paths.screenshot if fmt == "ppm" else self.paths.screenshot[:-4] + ".png"
        # Whatever lies at that name goes first: qemu opens the path itself.
        await asyncio.to_thread(zonefs.remove_runtime_file, self.paths.zonepath,
                                os.path.basename(path))  # fmt: skip
        # Wake a blanked console first, as a user would with a key press.
        with contextlib.suppress(QmpRefused):
            await self.monitor.wake_display()
        # A name relative to qemu's working directory (root/tmp): qemu, as the
        # VM's user, may not be able to pass the zones root's ancestors.  A
        # qemu started by an older vmadmd (with -daemonize, as root, working
        # in "/") is given the whole path instead, until it is restarted.
        name = os.path.basename(path)
        if not self._works_in_runtime_dir():
            name = path
        await self.monitor.screendump(name, fmt)
        return path

    def _works_in_runtime_dir(self) -> bool:
        try:
            here = os.path.join(os.path.realpath(self.paths.zonepath), "root", "tmp")
            return os.readlink(f"/proc/{self.pid}/cwd") == here
        except OSError:
            return True  # gone: the command fails on its own

    async def passthrough(self, request: dict[str, Any]) -> Any:
        """``{"execute", "arguments"}`` or ``{"hmp"}`` from a user, serialised with
        the daemon's own operations on this VM.  Logged by command name only:
        arguments can hold secrets."""
        try:  # refused at once (400/403), not after the VM's lock
            if "hmp" in request:
                check_hmp(str(request["hmp"]))
            else:
                check_qmp(str(request["execute"]), request.get("arguments"))
        except VmadmError as err:  # 403 off the allowlist, 400 an empty line
            self._log.warning("monitor pass-through refused: %s", err.message)
            raise
        async with self.lock:
            if "hmp" in request:
                line = str(request["hmp"])
                self._log.info("human monitor pass-through: %s", line.split(None, 1)[0][:40])
                return await self.monitor.hmp(line)
            cmd = str(request["execute"])
            self._log.info("QMP pass-through: %s", cmd[:80])
            return await self.monitor.passthrough(cmd, request.get("arguments"))

    async def snapshot_disks(self, nodes: list[str], name: str) -> bool:
        """An internal snapshot of every disk at one instant (one transaction),
        the guest's file systems frozen for it when its agent answers.
        Returns whether they were (else the snapshot is crash-consistent)."""
        async with self.lock:
            self._alive()
            timeout = self._shared.settings.qmp_timeout
            try:
                agent = await self.monitor.chardev_open(AGENT_CHARDEV)
            except VmadmError:
                agent = False
            if not agent:
                await self._snapshot_transaction(nodes, name, timeout)
                return False
            async with guestagent.frozen(
                self.paths.runtime_dir, self.monitor.peer, self._log
            ) as is_frozen:
                await self._snapshot_transaction(nodes, name, timeout)
            return is_frozen

    async def _snapshot_transaction(self, nodes: list[str], name: str, timeout: float) -> None:
        try:
            await self.monitor.snapshot_disks(nodes, name, timeout=timeout)
        except QmpRefused as err:
            if "already exists" not in err.desc:
                raise
            # A snapshot of that name that vm.json does not list (the caller
            # checked): left by a create whose record was never written (a
            # daemon killed in between).  Dropped, then the transaction again.
            self._log.warning("dropping orphan snapshots named %s", name)
            for node in nodes:
                await self.monitor.delete_disk_snapshot(node, name, timeout=timeout)
            await self.monitor.snapshot_disks(nodes, name, timeout=timeout)

    async def delete_disk_snapshot(self, nodes: list[str], name: str) -> None:
        """Delete snapshot ``name`` from every disk (those that have it)."""
        async with self.lock:
            self._alive()
            timeout = self._shared.settings.qmp_timeout
            for node in nodes:
                await self.monitor.delete_disk_snapshot(node, name, timeout=timeout)

    async def console_settled(self) -> None:
        """Wait (bounded) until the VNC console has opened, however it ends."""
        task = self._console_task
        if task is not None and not task.done():
            # asyncio.wait: neither the task's failure nor a timeout raises,
            # and the task is never cancelled by the waiter.
            await asyncio.wait({task}, timeout=self._shared.settings.qmp_timeout)

    async def reload_vnc(self, record: VmRecord) -> dict[str, Any]:
        async with self.lock:
            if self._console_task is not None and not self._console_task.done():
                await self._console_task
            return await self.console.reload(record)
