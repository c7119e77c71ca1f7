"""Live migration between two vmadmd hosts, over ssh, disks included.

The model is libvirt's ``qemu+ssh`` with ``--copy-storage-all``::

    source vmadmd                                target host
    ─────────────                                ───────────
    ssh -M target vmadm receive --live  ───────▶ vmadm receive --live
      {"vm": vm.json, "disk_sizes"}                POST /vms/incoming: the VM made in
                                                   its own zone, qemu -incoming defer -S,
      ◀─ {"nbd": path, "migration": path}          disks exported over NBD (writable)
    ssh -O forward -L nbd -L migration
    blockdev-mirror sync=full, each disk ──NBD──▶ the target's disks
    (every mirror ready) migrate ──────stream──▶ migrate-incoming
    block-job-cancel (a ready mirror completes)
      {"commit": true} ─────────────────────────▶ POST /vm/U/incoming?action=commit:
      ◀─ {"ok": true}                             exports gone, cont
    the source VM deleted (its qemu quits)

**Transport.**  qemu's migration stream and NBD are unencrypted, so
neither listens on a network: both travel inside the one ssh connection
that runs ``vmadm receive --live``, as unix-socket forwards added to it
through its control socket (``ssh -O forward -L local.sock:remote.sock``).
On each side the sockets are in a root-only temp directory, never in a
zone's ``root/``: the target daemon binds them and hands qemu the
listening NBD socket and the accepted migration stream as fds; the source
daemon connects to the forwarded sockets and hands qemu the connected
fds (``getfd``; ``fd:`` URIs and ``{"type": "fd"}`` socket addresses), so
a qemu in its own network namespace, as the VM's uid, needs no path and no
network.

**Failure.**  Until the target is told to take over, the source VM runs
(its qemu merely pauses for the last RAM pass) and the target's VM is a
paused qemu nobody else knows of: any failure cancels the RAM migration
and the mirrors, drops the NBD nodes, ``cont``s the source if it was
paused by the migration, and ends the ssh connection, whose end makes the
target's receiver discard the incoming VM (its daemon also watches the
receiver's pid: a receiver killed outright has the same effect).  Each
step is persisted in both ``vm.json`` files first (``vm/migrating.py``),
so a daemon killed on either side settles it at its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vmadmd.daemon.locks import vm_lock
from vmadmd.daemon.logs import vm_log
from vmadmd.errors import (
    InvalidParameter,
    QmpFailed,
    QmpTimeout,
    VmadmError,
    VmNotFound,
    WrongState,
)
from vmadmd.vm import migrating, net, proc, transition
from vmadmd.vm.layer import identity_of
from vmadmd.vm.migrating import Migration
from vmadmd.vm.store import VmRecord

if TYPE_CHECKING:
    from vmadmd.daemon.manager import Manager
    from vmadmd.daemon.monitor import Monitor

log = logging.getLogger("vmadmd.migration")

# An ssh destination: [user@]host, nothing ssh could read as an option.
TARGET_RE = re.compile(r"^(?:[A-Za-z0-9._-]{1,64}@)?[A-Za-z0-9.:_\[\]-]{1,255}$")
REMOTE_PATH_RE = re.compile(r"^/[A-Za-z0-9._/-]{1,100}$")
SSH_CONNECT = 30.0  # ssh up and the target's answer
STEP_TIMEOUT = 30.0  # a block node added, a job gone, the target's commit
POLL = 0.05
ACTIVE = ("setup", "active", "pre-switchover", "device", "wait-unplug", "postcopy-active")
MAX_FINISHED = 256  # outcomes kept for `GET /vm/U/migration`
MIG_PREFIX = "mig-"


class MigrationFailed(VmadmError):
    code = "MigrationFailed"
    status = 409


@dataclass
class MigrationSettings:
    """How the source reaches a target: ``ssh`` (its ``-F`` config file, if
    any) and the command that is ``vmadm`` there."""

    ssh: str = "ssh"
    ssh_config: str | None = None
    remote_vmadm: str = "vmadm"


@dataclass
class Progress:
    """Where one outgoing migration stands (``GET /vm/U/migration``)."""

    uuid: str
    target: str
    state: str = "starting"  # copying_disks, migrating_ram, committing, done, failed
    started: float = field(default_factory=time.time)
    disk_total: int = 0
    disk_copied: int = 0
    ram: dict[str, Any] = field(default_factory=dict)
    downtime_ms: int | None = None
    total_ms: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid, "target": self.target, "state": self.state,
            "started": self.started,
            "disks": {"total": self.disk_total, "copied": self.disk_copied},
            "ram": self.ram, "downtime_ms": self.downtime_ms, "total_ms": self.total_ms,
            "error": self.error,
        }  # fmt: skip


def check_target(target: str) -> str:
    if not TARGET_RE.match(target) or target.startswith("-"):
        raise InvalidParameter("target must be an ssh destination: [user@]host")
    return target


def outgoing_record(record: VmRecord) -> VmRecord:
    """What the target is sent: the record without this host's runtime facts."""
    return {k: v for k, v in record.items() if k not in migrating.FOREIGN_KEYS}


class Migrations:
    """The daemon's live migrations, both ways: at most one per VM."""

    def __init__(self, manager: Manager, settings: MigrationSettings) -> None:
        self.manager = manager
        self.settings = settings
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}
        self.finished: dict[str, Progress] = {}
        self._settling: set[str] = set()

    def busy(self, uuid: str) -> bool:
        """Whether this daemon is migrating the VM now (not a leftover to settle)."""
        return uuid in self.outgoing or uuid in self.incoming

    # -- the source's side ---------------------------------------------------

    async def start(self, uuid: str, target: str, bandwidth_mib: int | None = None) -> Progress:
        """Begin migrating a running VM to ``target``; returns at once (202).

        ``bandwidth_mib``: at most this many MiB/s for the disks and for the
        RAM, each (libvirt's ``--bandwidth``); qemu's own defaults otherwise.
        """
        check_target(target)
        if bandwidth_mib is not None and not 0 < bandwidth_mib <= 1 << 20:
            raise InvalidParameter("bandwidth must be a number of MiB/s, 1 to 1048576")
        m = self.manager
        record = m.load(uuid)
        sup = await m.running(uuid)
        if self.busy(uuid) or Migration.of(record) is not None:
            raise WrongState(f"VM {uuid} is already being migrated")
        if sup.transition is not None or record.get(transition.KEY):
            raise WrongState(f"VM {uuid} is stopping: it cannot be migrated")
        out = Outgoing(self, uuid, target, bandwidth_mib)
        self.outgoing[uuid] = out
        self.finished.pop(uuid, None)
        m._spawn(out.run(), f"migrate-{uuid}")
        return out.progress

    def progress(self, uuid: str) -> Progress:
        out = self.outgoing.get(uuid)
        if out is not None:
            return out.progress
        done = self.finished.get(uuid)
        if done is None:
            self.manager.load(uuid)  # 404 for a VM this host does not have
            return Progress(uuid, "", state="none")
        return done

    def _finished(self, out: Outgoing) -> None:
        self.outgoing.pop(out.uuid, None)
        self.finished[out.uuid] = out.progress
        while len(self.finished) > MAX_FINISHED:
            del self.finished[next(iter(self.finished))]

    # -- the target's side -----------------------------------------------------

    async def receive(self, sent: object, sizes: object, receiver: object) -> dict[str, Any]:
        """Make the arriving VM and its incoming qemu; where to send disks and state."""
        record = migrating.arriving_record(sent)
        migrating.refuse_existing(self.manager.store.exists(record["uuid"]), record["uuid"])
        disk_sizes = migrating.check_sizes(record, sizes)
        if not isinstance(receiver, int) or isinstance(receiver, bool) or receiver <= 1:
            raise InvalidParameter("receiver must be the pid of the receiving vmadm")
        uuid = record["uuid"]
        if self.busy(uuid):
            raise WrongState(f"VM {uuid} is already being migrated")
        try:
            pidfd = os.pidfd_open(receiver)
        except (ProcessLookupError, OSError):
            raise InvalidParameter(f"receiver {receiver} is not a running process") from None
        # Watched for as long as the VM arrives: it must be a receiver, not
        # any process that happens to have that pid.
        argv = _cmdline(receiver)
        if b"receive" not in argv or b"--live" not in argv:
            os.close(pidfd)
            raise InvalidParameter(f"process {receiver} is not a `vmadm receive --live`")
        inc = Incoming(self, uuid, pidfd)
        self.incoming[uuid] = inc
        try:
            return await inc.prepare(record, disk_sizes)
        except BaseException:
            await inc.discard("the incoming VM could not be prepared")
            raise

    async def commit(self, uuid: str) -> dict[str, Any]:
        inc = self.incoming.get(uuid)
        if inc is None:
            self.manager.load(uuid)
            raise WrongState(f"VM {uuid} is not arriving by migration here")
        return await inc.commit()

    async def abort(self, uuid: str) -> None:
        inc = self.incoming.get(uuid)
        if inc is None:
            self.manager.load(uuid)
            raise WrongState(f"VM {uuid} is not arriving by migration here")
        await inc.discard("aborted by the source")

    def arrival(self, uuid: str) -> dict[str, Any]:
        """How an arriving (or arrived) VM stands, for a source that lost track."""
        record = self.manager.load(uuid)
        mig = Migration.of(record)
        state = mig.state if mig is not None else self.manager.state(uuid)
        return {"uuid": uuid, "state": state}

    # -- a daemon (re)started with a migration in a vm.json ----------------------

    def settle_soon(self, uuid: str, record: VmRecord, running: bool) -> None:
        """``settle`` in a task of its own, once at a time per VM."""
        if self.busy(uuid) or uuid in self._settling:
            return
        self._settling.add(uuid)

        async def run() -> None:
            try:
                await self.settle(uuid, record, running)
            finally:
                self._settling.discard(uuid)

        self.manager._spawn(run(), f"settle-migration-{uuid}")

    async def settle(self, uuid: str, record: VmRecord, running: bool) -> None:
        """Resolve a migration a previous daemon left in ``record``."""
        mig = Migration.of(record)
        if mig is None or self.busy(uuid):
            return
        vlog = vm_log(log, uuid)
        if mig.workdir and migrating.is_workdir(mig.workdir):
            await asyncio.to_thread(shutil.rmtree, mig.workdir, True)
        resolution = mig.resolution()
        vlog.warning("migration left %s (%s): %s", mig.state, mig.role, resolution)
        if resolution == "discard":
            await Incoming(self, uuid, -1).discard("its daemon restarted before the commit")
            return
        sup = self.manager.vms.get(uuid) if running else None
        if resolution == "take_over":
            if sup is not None:
                await _stop_exports(sup.monitor, [])
                with contextlib.suppress(QmpFailed, QmpTimeout):
                    await sup.monitor.command("cont")
            await self._clear(uuid)
            return
        if resolution == "ask_target":
            answer = await Outgoing(self, uuid, mig.peer).ask_target()
            if answer == "taken":
                vlog.warning("the target runs the VM: removed here")
                await asyncio.to_thread(self.manager.layer.delete, uuid)
                self.manager.bus.emit("migrated", uuid, target=mig.peer)
                return
            if answer == "unknown":
                vlog.error("the target cannot be asked: the VM stays paused here")
                return
        if sup is not None:
            await resume_source(sup.monitor, paused_by_us=True)
        await self._clear(uuid)

    async def _clear(self, uuid: str) -> None:
        async with vm_lock(self.manager.store, uuid):
            await asyncio.to_thread(
                self.manager.store.update_locked, uuid, lambda r: r.pop(migrating.KEY, None)
            )


async def _record(migs: Migrations, uuid: str, mig: Migration | None) -> None:
    """Persist where the migration stands (None: no migration) in vm.json."""

    def change(r: VmRecord) -> None:
        if mig is None:
            r.pop(migrating.KEY, None)
        else:
            r[migrating.KEY] = mig.to_json()

    async with vm_lock(migs.manager.store, uuid):
        await asyncio.to_thread(migs.manager.store.update_locked, uuid, change)


async def resume_source(mon: Monitor, *, paused_by_us: bool) -> None:
    """Undo a migration on the source's qemu: cancel the RAM migration and
    every mirror, drop the NBD nodes, and run the guest again if the
    migration paused it.  Best effort, step by step (each may fail alone)."""
    with contextlib.suppress(QmpFailed, QmpTimeout):
        status = await mon.command("query-migrate")
        if isinstance(status, dict) and status.get("status") in ACTIVE:
            await mon.command("migrate_cancel")
            await _until(lambda s: s.get("status") not in ACTIVE, mon, "query-migrate")
    with contextlib.suppress(QmpFailed, QmpTimeout):
        jobs = await mon.command("query-block-jobs")
        for job in jobs if isinstance(jobs, list) else []:
            if str(job.get("device", "")).startswith(MIG_PREFIX):
                with contextlib.suppress(QmpFailed):
                    await mon.command("block-job-cancel", {"device": job["device"], "force": True})
        await _until(lambda jobs: not _our_jobs(jobs), mon, "query-block-jobs")
    with contextlib.suppress(QmpFailed, QmpTimeout):
        nodes = await mon.command("query-named-block-nodes", {"flat": True})
        for node in nodes if isinstance(nodes, list) else []:
            name = str(node.get("node-name", ""))
            if name.startswith(MIG_PREFIX):
                with contextlib.suppress(QmpFailed):
                    await mon.command("blockdev-del", {"node-name": name})
    with contextlib.suppress(QmpFailed, QmpTimeout):
        state = await mon.command("query-status")
        if paused_by_us and isinstance(state, dict) and state.get("status") in (
            "postmigrate", "finish-migrate", "paused"
        ):  # fmt: skip
            await mon.command("cont")


def _cmdline(pid: int) -> list[bytes]:
    """A process's argv (empty when it cannot be read); /proc, never blocks."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read(4096).split(b"\0")
    except OSError:
        return []


def _our_jobs(jobs: Any) -> list[dict[str, Any]]:
    if not isinstance(jobs, list):
        return []
    return [j for j in jobs if str(j.get("device", "")).startswith(MIG_PREFIX)]


async def _until(cond: Any, mon: Monitor, query: str, timeout: float = STEP_TIMEOUT) -> Any:
    """Poll ``query`` until ``cond(reply)``; QmpTimeout past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        reply = await mon.command(query)
        if cond(reply):
            return reply
        if time.monotonic() > deadline:
            raise QmpTimeout(f"{query}: not done within {timeout:g} s")
        await asyncio.sleep(POLL)


async def _stop_exports(mon: Monitor, exports: list[str]) -> None:
    """The target's NBD exports and server gone (they hold the disks' write
    permission, which the guest's devices take at ``cont``)."""
    for name in exports:
        with contextlib.suppress(QmpFailed, QmpTimeout):
            await mon.command("block-export-del", {"id": name})
    with contextlib.suppress(QmpFailed, QmpTimeout):
        await mon.command("nbd-server-stop")


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(SSH_CONNECT)
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


class Outgoing:
    """One VM leaving: the source's whole side, as one task."""

    def __init__(
        self, migs: Migrations, uuid: str, target: str, bandwidth_mib: int | None = None
    ) -> None:
        self.bandwidth = bandwidth_mib << 20 if bandwidth_mib is not None else None
        self._old_bandwidth: int | None = None
        self.migs = migs
        self.uuid = uuid
        self.target = target
        self.progress = Progress(uuid, target)
        self._log = vm_log(log, uuid)
        self._dir: str | None = None
        self._ssh: asyncio.subprocess.Process | None = None

    def _ssh_argv(self, *args: str) -> list[str]:
        s = self.migs.settings
        argv = [s.ssh, "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5",
                "-o", "ServerAliveCountMax=3", "-o", "ExitOnForwardFailure=yes"]  # fmt: skip
        if s.ssh_config:
            argv += ["-F", s.ssh_config]
        return [*argv, *args]

    def _remote(self, *args: str) -> str:
        return " ".join([self.migs.settings.remote_vmadm, *map(shlex.quote, args)])

    async def run(self) -> None:
        m = self.migs.manager
        p = self.progress
        t0 = time.monotonic()
        paused_by_us = False
        committed = False
        try:
            sup = await m.running(self.uuid)
            mon = sup.monitor
            record = m.load(self.uuid)
            self._dir = tempfile.mkdtemp(prefix="vmadmd-mig-")
            mig = Migration("source", "copying", self.target, int(time.time() * 1000), self._dir)
            await _record(self.migs, self.uuid, mig)
            n = len(record.get("disks", []))
            sizes = await self._disk_sizes(mon, n)
            reply = await self._offer(outgoing_record(record), sizes)
            await self._forward(str(reply["nbd"]), str(reply["migration"]))
            p.state = "copying_disks"
            p.disk_total = sum(sizes)
            for i in range(n):
                await self._mirror(mon, i)
            await self._mirrors_ready(mon, n)
            p.state = "migrating_ram"
            paused_by_us = True  # from here the source may be paused by qemu
            await self._migrate_ram(mon)
            for i in range(n):
                await mon.command("block-job-cancel", {"device": f"{MIG_PREFIX}disk{i}"})
            await _until(lambda jobs: not _our_jobs(jobs), mon, "query-block-jobs")
            for i in range(n):
                with contextlib.suppress(QmpFailed):
                    await mon.command("blockdev-del", {"node-name": f"{MIG_PREFIX}tgt{i}"})
            p.state = "committing"
            await _record(self.migs, self.uuid, mig.with_state("committing"))
            answer = await self._commit()
            if answer == "unknown":
                # Neither here nor there for sure: the VM stays paused here,
                # its record says committing, and the next daemon start asks
                # the target again.
                committed = True
                raise MigrationFailed(
                    "the target cannot say whether it took the VM over: the VM stays paused "
                    "here until the target answers (the daemon asks again at its next start)"
                )
            if answer != "taken":
                raise MigrationFailed("the target did not take the VM over")
            committed = True
            p.total_ms = int((time.monotonic() - t0) * 1000)
            await self._close()
            # The target runs the VM: this host lets go of it.
            await self._let_go()
            p.state = "done"
            self._log.info("migrated to %s in %d ms (downtime %s ms)", self.target,
                           p.total_ms, p.downtime_ms)  # fmt: skip
            m.bus.emit("migrated", self.uuid, target=self.target, total_ms=p.total_ms,
                       downtime_ms=p.downtime_ms)  # fmt: skip
        except BaseException as err:
            p.state = "failed"
            p.error = err.message if isinstance(err, VmadmError) else str(err) or repr(err)
            self._log.error("migration to %s failed: %s", self.target, p.error)
            if not committed:
                await self._roll_back(paused_by_us)
            if isinstance(err, asyncio.CancelledError):
                raise
            m.bus.emit("migration_failed", self.uuid, target=self.target, error=p.error)
        finally:
            await self._close()
            self.migs._finished(self)

    async def _roll_back(self, paused_by_us: bool) -> None:
        """The VM stays here, running, as it was; the target lets go when
        the connection ends (``_close``)."""
        m = self.migs.manager
        sup = m.vms.get(self.uuid)
        if sup is not None:
            await resume_source(sup.monitor, paused_by_us=paused_by_us)
            if self._old_bandwidth is not None:
                with contextlib.suppress(QmpFailed, QmpTimeout):
                    await sup.monitor.command(
                        "migrate-set-parameters", {"max-bandwidth": self._old_bandwidth}
                    )
        with contextlib.suppress(VmadmError):
            await _record(self.migs, self.uuid, None)

    async def _let_go(self) -> None:
        """The VM runs on the target: its qemu quits here (it is paused, its
        state sent) and its zone goes; its taps and cgroup go after."""
        m = self.migs.manager
        record = m.load(self.uuid)
        sup = m.vms.get(self.uuid)
        if sup is not None:
            with contextlib.suppress(QmpFailed, QmpTimeout):
                await sup.monitor.command("quit", timeout=5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(sup.exited.wait(), 10)
        # A qemu that did not quit is stopped by force; then the zone goes,
        # under the VM's lock (the exit's settling waits for it, then finds
        # no VM), vm.json first.
        pid_path = m.store.paths(self.uuid).pid
        await asyncio.to_thread(proc.kill_vm, pid_path, self.uuid, identity_of(record))
        last: OSError | None = None
        for _ in range(10):
            try:
                async with vm_lock(m.store, self.uuid):
                    await asyncio.to_thread(m.store.remove, self.uuid)
                last = None
                break
            except VmNotFound:
                last = None
                break
            except OSError as err:  # qemu's waiter writing qemu.exit as rmtree runs
                last = err
                await asyncio.sleep(0.1)
        if last is not None:
            self._log.error("migrated, but its zone here could not be removed: %s", last)
        uid = record.get("zone_uid")
        nics = record.get("nics", [])

        def release() -> None:
            net.remove_taps(nics, uid if isinstance(uid, int) and uid > 0 else None)
            m.layer.cgroups.remove(self.uuid)

        m._spawn(asyncio.to_thread(release), f"migrated-release-{self.uuid}")

    async def _close(self) -> None:
        ssh, self._ssh = self._ssh, None
        if ssh is not None:
            if ssh.stdin is not None:
                ssh.stdin.close()
            with contextlib.suppress(ProcessLookupError):
                ssh.terminate()
            try:
                await asyncio.wait_for(ssh.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    ssh.kill()
                await ssh.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    async def _disk_sizes(self, mon: Monitor, n: int) -> list[int]:
        nodes = await mon.command("query-named-block-nodes", {"flat": True})
        sizes: dict[str, int] = {}
        for node in nodes if isinstance(nodes, list) else []:
            image = node.get("image") or {}
            sizes[str(node.get("node-name"))] = int(image.get("virtual-size", 0))
        out = [sizes.get(f"disk{i}", 0) for i in range(n)]
        if any(s <= 0 for s in out):
            raise MigrationFailed("cannot read the sizes of the VM's disks")
        return out

    async def _offer(self, record: VmRecord, sizes: list[int]) -> dict[str, Any]:
        """ssh to the target (the control master), send the VM, read where to send."""
        assert self._dir is not None
        argv = self._ssh_argv("-M", "-S", os.path.join(self._dir, "ctl"),
                              "-o", "ControlPersist=no", "--", self.target,
                              self._remote("receive", "--live"))  # fmt: skip
        self._ssh = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, start_new_session=True, limit=1 << 20,
        )  # fmt: skip
        assert self._ssh.stdin is not None
        line = json.dumps({"vm": record, "disk_sizes": sizes}) + "\n"
        self._ssh.stdin.write(line.encode())
        await self._ssh.stdin.drain()
        reply = await self._answer(SSH_CONNECT + STEP_TIMEOUT)
        for key in ("nbd", "migration"):
            if not isinstance(reply.get(key), str) or not REMOTE_PATH_RE.match(reply[key]):
                raise MigrationFailed(f"the target's answer has no usable {key} socket")
        return reply

    async def _answer(self, timeout: float) -> dict[str, Any]:
        """The target receiver's next line: its answer, or why there is none."""
        ssh = self._ssh
        assert ssh is not None
        assert ssh.stdout is not None
        try:
            raw = await asyncio.wait_for(ssh.stdout.readline(), timeout)
        except TimeoutError:
            raise MigrationFailed(f"the target did not answer within {timeout:g} s") from None
        if not raw:
            why = b""
            if ssh.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    why = await asyncio.wait_for(ssh.stderr.read(4096), 2)
            text = why.decode(errors="replace").strip().splitlines()
            raise MigrationFailed(
                "the connection to the target ended" + (f": {text[-1]}" if text else "")
            )
        try:
            reply = json.loads(raw)
        except ValueError:
            raise MigrationFailed("the target's answer is not JSON") from None
        if not isinstance(reply, dict):
            raise MigrationFailed("the target's answer is not a JSON object")
        if "error" in reply:
            raise MigrationFailed(f"the target refused: {str(reply['error'])[:300]}")
        return reply

    async def _forward(self, remote_nbd: str, remote_mig: str) -> None:
        """The target's two sockets, forwarded into our temp dir over the
        control master's connection."""
        assert self._dir is not None
        d = self._dir
        argv = self._ssh_argv("-S", os.path.join(d, "ctl"), "-O", "forward",
                              "-L", f"{d}/nbd.sock:{remote_nbd}",
                              "-L", f"{d}/mig.sock:{remote_mig}", "--", self.target)  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            _, err = await asyncio.wait_for(proc.communicate(), SSH_CONNECT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise MigrationFailed("ssh could not forward the migration's sockets") from None
        if proc.returncode != 0:
            text = err.decode(errors="replace").strip()
            raise MigrationFailed(f"ssh could not forward the migration's sockets: {text}")

    async def _give(self, mon: Monitor, path: str, name: str) -> None:
        """Connect to a forwarded socket and hand the connection to qemu."""
        sock = await asyncio.to_thread(_connect, path)
        try:
            await mon.pass_fd(sock.fileno(), name)
        finally:
            sock.close()

    async def _mirror(self, mon: Monitor, i: int) -> None:
        assert self._dir is not None
        fdname = f"{MIG_PREFIX}nbd{i}"
        await self._give(mon, os.path.join(self._dir, "nbd.sock"), fdname)
        await mon.command(
            "blockdev-add",
            {"driver": "nbd", "node-name": f"{MIG_PREFIX}tgt{i}", "export": f"disk{i}",
             "server": {"type": "fd", "str": fdname}},
            timeout=STEP_TIMEOUT,
        )  # fmt: skip
        await mon.command(
            "blockdev-mirror",
            {"job-id": f"{MIG_PREFIX}disk{i}", "device": f"disk{i}",
             "target": f"{MIG_PREFIX}tgt{i}", "sync": "full",
             **({"speed": self.bandwidth} if self.bandwidth else {})},
        )  # fmt: skip

    async def _mirrors_ready(self, mon: Monitor, n: int) -> None:
        """Until every mirror has copied its disk (and keeps it in step)."""
        p = self.progress
        while True:
            jobs = {j["device"]: j for j in _our_jobs(await mon.command("query-block-jobs"))}
            if len(jobs) < n:
                raise MigrationFailed("a disk's copy to the target failed")
            p.disk_copied = sum(int(j.get("offset", 0)) for j in jobs.values())
            if all(j.get("ready") for j in jobs.values()):
                return
            for j in jobs.values():
                if j.get("status") in ("aborting", "concluded", "null") or j.get("error"):
                    raise MigrationFailed(f"a disk's copy to the target failed: {j.get('error')}")
            await asyncio.sleep(POLL)

    async def _migrate_ram(self, mon: Monitor) -> None:
        assert self._dir is not None
        p = self.progress
        await self._give(mon, os.path.join(self._dir, "mig.sock"), f"{MIG_PREFIX}stream")
        if self.bandwidth:
            params = await mon.command("query-migrate-parameters")
            self._old_bandwidth = params.get("max-bandwidth") if isinstance(params, dict) else None
            await mon.command("migrate-set-parameters", {"max-bandwidth": self.bandwidth})
        await mon.command("migrate", {"uri": f"fd:{MIG_PREFIX}stream"})
        while True:
            info = await mon.command("query-migrate")
            if not isinstance(info, dict):
                info = {}
            ram = info.get("ram")
            if isinstance(ram, dict):
                p.ram = {k: ram.get(k) for k in ("total", "remaining", "transferred", "mbps")}
            status = info.get("status")
            if status == "completed":
                p.downtime_ms = info.get("downtime")
                return
            if status not in ACTIVE:
                raise MigrationFailed(
                    f"the RAM migration {status}: {info.get('error-desc', 'no reason given')}"
                )
            jobs = _our_jobs(await mon.command("query-block-jobs"))
            if any(j.get("status") not in ("ready", "running") for j in jobs):
                raise MigrationFailed("a disk's mirror to the target failed")
            await asyncio.sleep(POLL / 4)

    async def _commit(self) -> str:
        """Tell the target to take over: ``taken``, ``not_taken`` or
        ``unknown`` (its answer was lost, and asking again found no answer)."""
        ssh = self._ssh
        assert ssh is not None
        assert ssh.stdin is not None
        try:
            ssh.stdin.write(b'{"commit": true}\n')
            await ssh.stdin.drain()
            await self._answer(STEP_TIMEOUT)
            return "taken"
        except MigrationFailed as err:
            if "refused" in err.message:
                return "not_taken"
            self._log.warning("the target's commit answer was lost (%s): asking it", err)
        except ConnectionError as err:
            self._log.warning("the target's commit answer was lost (%s): asking it", err)
        await self._close()  # the receiver goes: an incoming VM not taken over is discarded
        return await self.ask_target()

    async def ask_target(self, tries: int = 3) -> str:
        """``taken``: the target runs the VM; ``not_taken``; ``unknown``."""
        for attempt in range(tries):
            if attempt:
                await asyncio.sleep(2)
            proc = await asyncio.create_subprocess_exec(
                *self._ssh_argv("--", self.target,
                                self._remote("receive", "--live", "--status", self.uuid)),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), SSH_CONNECT)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                continue
            try:
                state = json.loads(out).get("state")
            except (ValueError, AttributeError):
                continue
            if state in ("committed", "running", "stopping", "stopped"):
                return "taken"
            if state in ("absent", "incoming"):
                return "not_taken"
        return "unknown"


class Incoming:
    """One VM arriving: the target's side, from ``prepare`` to ``commit``."""

    def __init__(self, migs: Migrations, uuid: str, receiver_fd: int) -> None:
        self.migs = migs
        self.uuid = uuid
        self._receiver = receiver_fd
        self._dir: str | None = None
        self._listeners: list[socket.socket] = []
        self._accept: asyncio.Task[None] | None = None
        self._exports: list[str] = []
        self._log = vm_log(log, uuid)
        self._done = False

    async def prepare(self, record: VmRecord, sizes: list[int]) -> dict[str, Any]:
        m = self.migs.manager
        layer = m.layer
        self._dir = tempfile.mkdtemp(prefix="vmadmd-mig-in-")
        await asyncio.to_thread(
            layer.create_incoming, record, sizes, int(time.time() * 1000), self._dir
        )
        async with vm_lock(m.store, self.uuid):
            await asyncio.to_thread(
                layer.start_locked, self.uuid, set_autoboot=False, incoming=True
            )
        await m.refresh(self.uuid)
        mon = (await m.running(self.uuid)).monitor
        nbd = self._listen("nbd.sock")
        mig = self._listen("mig.sock")
        await mon.pass_fd(nbd.fileno(), f"{MIG_PREFIX}nbd")
        addr = {"type": "fd", "data": {"str": f"{MIG_PREFIX}nbd"}}  # qemu 7.2: the legacy form
        await mon.command("nbd-server-start", {"addr": addr})
        for i in range(len(record["disks"])):
            name = f"{MIG_PREFIX}disk{i}"
            await mon.command("block-export-add", {"type": "nbd", "id": name, "node-name":
                              f"disk{i}", "name": f"disk{i}", "writable": True})  # fmt: skip
            self._exports.append(name)
        self._accept = m._spawn(self._take_stream(mig, mon), f"migrate-in-{self.uuid}")
        loop = asyncio.get_running_loop()
        loop.add_reader(self._receiver, self._receiver_gone)
        self._log.info("arriving by migration: disks %s", sizes)
        return {"uuid": self.uuid, "nbd": os.path.join(self._dir, "nbd.sock"),
                "migration": os.path.join(self._dir, "mig.sock")}  # fmt: skip

    def _listen(self, name: str) -> socket.socket:
        assert self._dir is not None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._listeners.append(sock)
        sock.bind(os.path.join(self._dir, name))
        sock.listen(8)
        sock.setblocking(False)
        return sock

    async def _take_stream(self, listener: socket.socket, mon: Monitor) -> None:
        """The source's migration stream, accepted here and given to qemu."""
        conn, _ = await asyncio.get_running_loop().sock_accept(listener)
        try:
            conn.setblocking(True)
            await mon.pass_fd(conn.fileno(), f"{MIG_PREFIX}stream")
        finally:
            conn.close()
        await mon.command("migrate-incoming", {"uri": f"fd:{MIG_PREFIX}stream"})

    def _receiver_gone(self) -> None:
        if self._receiver >= 0:
            asyncio.get_running_loop().remove_reader(self._receiver)
        if not self._done:
            self.migs.manager._spawn(
                self.discard("the receiving vmadm exited before the commit"),
                f"migrate-in-gone-{self.uuid}",
            )

    async def commit(self) -> dict[str, Any]:
        """The source has sent everything: run the VM here."""
        if self._done:
            raise WrongState(f"VM {self.uuid} is no longer arriving")
        m = self.migs.manager
        try:
            mon = (await m.running(self.uuid)).monitor
            info = await _until(
                lambda s: isinstance(s, dict) and s.get("status") not in ACTIVE,
                mon, "query-migrate",
            )  # fmt: skip
            if info.get("status") != "completed":
                raise MigrationFailed(f"the incoming migration {info.get('status')}")
        except BaseException:
            await self.discard("the incoming state is incomplete")
            raise
        self._done = True
        now = int(time.time() * 1000)
        committed = Migration("target", "committed", "", now, self._dir or "")
        await _record(self.migs, self.uuid, committed)
        await _stop_exports(mon, self._exports)
        await mon.command("cont")
        await _record(self.migs, self.uuid, None)
        self._release()
        self._log.info("arrived by migration: running here")
        m.bus.emit("migrated", self.uuid, direction="in")
        return {"uuid": self.uuid, "state": "running"}

    async def discard(self, why: str) -> None:
        """The incoming VM goes: its qemu, its zone, its uid's things."""
        if self._done:
            return
        self._done = True
        self._release()
        self._log.warning("incoming VM discarded: %s", why)
        with contextlib.suppress(VmNotFound):
            await asyncio.to_thread(self.migs.manager.layer.delete, self.uuid)

    def _release(self) -> None:
        if self.migs.incoming.get(self.uuid) is self:
            del self.migs.incoming[self.uuid]
        if self._receiver >= 0:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_reader(self._receiver)
            os.close(self._receiver)
            self._receiver = -1
        if self._accept is not None:
            self._accept.cancel()
        for sock in self._listeners:
            sock.close()
        self._listeners.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
