"""One VM's qemu, as typed operations and typed events (the QMP wire stays in here).

The rest of the daemon calls one method per operation (``powerdown()``,
``query("block")``, ``add_vnc_client(fd)``...) and is told of what qemu
does through typed callbacks (``MonitorEvents``: how the VM shut down, a
VNC client qemu accepted), as libvirt's ``qemu_monitor.c`` keeps JSON away
from its driver: no QMP command name, event name or reply field is read
outside this module and ``qmpconn.py``/``qmp.py``.  The connection itself
(its one qemu, timeouts, wedges, reconnects) is ``QmpConnection``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.qmpconn import QmpConnection
from vmadmd.daemon.qmppolicy import check_hmp, check_qmp
from vmadmd.errors import (
    Forbidden,
    InvalidParameter,
    QmpCommandFailed,
    QmpConnectionLost,
    QmpFailed,
    QmpRefused,
    QmpTimeout,
)
from vmadmd.vm.sockets import Peer

log = logging.getLogger("vmadmd.qmp")

# Commands the daemon owns: a user passing them through would break the
# daemon's own use of this connection (capabilities, fd passing for console
# hand-offs) or the VNC password the daemon keeps.  Refused (403).
OWNED_COMMANDS = frozenset({
    "qmp_capabilities", "getfd", "closefd", "add-fd", "remove-fd", "add_client",
    "set_password", "expire_password", "display-update",
})  # fmt: skip
# The same in the human monitor (by its first word).
OWNED_HMP = frozenset({"getfd", "closefd", "set_password", "expire_password"})


# What ``query()`` can ask, by the names the API uses.
QUERIES: dict[str, str] = {
    "block": "query-block",
    "blockstats": "query-blockstats",
    "chardev": "query-chardev",
    "cpus": "query-cpus-fast",  # qemu 7.2 has no query-cpus
    "kvm": "query-kvm",
    "pci": "query-pci",
    "version": "query-version",
    "status": "query-status",
}

# qemu's events that the event stream publishes (``qmp_event``), rate-limited.
LIFECYCLE_EVENTS = frozenset({"SHUTDOWN", "POWERDOWN", "RESET", "STOP", "RESUME",
                              "GUEST_PANICKED"})  # fmt: skip


class Shutdown(NamedTuple):
    """How qemu says the VM shut down (its ``SHUTDOWN`` event), in our terms.

    ``cause``: ``guest`` (the guest powered off), ``panic`` (a pvpanic
    report, then the shutdown ``-action panic=shutdown`` asks for),
    ``quit`` (a ``quit`` on a monitor), ``signal`` (qemu was sent SIGTERM or
    the like), or ``host`` for any other reason qemu gives (in ``detail``).
    """

    cause: Literal["guest", "panic", "quit", "signal", "host"]
    detail: str = ""


# qemu 7.2's ShutdownCause: whatever else a SHUTDOWN says is not qemu's word
# (a qemu taken over by its guest writes what it likes), and is not kept.
SHUTDOWN_CAUSES = frozenset({
    "none", "host-error", "host-qmp-quit", "host-qmp-system-reset", "host-signal", "host-ui",
    "guest-shutdown", "guest-reset", "guest-panic", "subsystem-reset", "snapshot-load",
})  # fmt: skip
MAX_EVENT_DATA = 4096  # bytes of JSON an event's data may take to be passed on
MAX_FIELD = 64  # characters of a VNC client's host or service


def shutdown_of(data: Mapping[str, Any]) -> Shutdown:
    reason = data.get("reason")
    reason = reason if isinstance(reason, str) and reason in SHUTDOWN_CAUSES else "unknown"
    if reason == "guest-panic":
        return Shutdown("panic")
    if data.get("guest") is True:
        return Shutdown("guest", reason)
    if reason == "host-qmp-quit":
        return Shutdown("quit")
    if reason == "host-signal":
        return Shutdown("signal")
    return Shutdown("host", reason)


def _field(value: object) -> str:
    """A short printable string of what qemu sent (its guest may have written it)."""
    text = str(value)[:MAX_FIELD]
    return "".join(c if c.isprintable() else "?" for c in text)


def _bounded(data: dict[str, Any]) -> dict[str, Any]:
    """An event's data as passed on (to the event stream and its history):
    dropped past ``MAX_EVENT_DATA`` bytes of JSON, so a qemu sending huge
    events costs the daemon nothing it keeps."""
    import json

    try:
        size = len(json.dumps(data))
    except (TypeError, ValueError):
        return {}
    return data if size <= MAX_EVENT_DATA else {"dropped": f"{size} bytes of event data"}


class VncClient(NamedTuple):
    """A client qemu's own VNC server accepted (``VNC_CONNECTED``)."""

    family: str  # ipv4, ipv6, unix
    host: str
    service: str

    @property
    def tcp(self) -> bool:
        return self.family in ("ipv4", "ipv6")


class MonitorEvents(Protocol):
    """What a monitor's owner is told of its qemu."""

    def on_shutdown(self, shutdown: Shutdown) -> None: ...

    def on_vnc_client(self, client: VncClient) -> None: ...

    def on_lifecycle(self, event: str, data: dict[str, Any]) -> None:
        """One of ``LIFECYCLE_EVENTS`` as qemu sent it (for the event stream)."""

    def on_device_deleted(self, device: str) -> None:
        """qemu let a device go (``DEVICE_DELETED``) that no ``unplug`` waits
        for: after its deadline, or one another monitor unplugged."""


class DiskStats(NamedTuple):
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int


def blockstats_of(reply: object) -> dict[str, DiskStats]:
    """``query-blockstats`` -> per device counters (nothing from a malformed reply)."""
    out: dict[str, DiskStats] = {}
    if not isinstance(reply, list):
        return out
    for entry in reply:
        if not isinstance(entry, dict) or not isinstance(entry.get("stats"), dict):
            continue
        name = entry.get("device") or entry.get("node-name") or entry.get("qdev")
        if not isinstance(name, str) or not name:
            continue
        s = entry["stats"]
        try:
            out[name] = DiskStats(
                int(s.get("rd_bytes", 0)),
                int(s.get("wr_bytes", 0)),
                int(s.get("rd_operations", 0)),
                int(s.get("wr_operations", 0)),
            )
        except (TypeError, ValueError):
            continue
    return out


def _nodes(
    node: str, fdset: int, fmt: str, backing: str | None, *, read_only: bool
) -> list[dict[str, Any]]:
    """``blockdev-add`` arguments: a file node over fd set ``fdset``, and a
    ``fmt`` node named ``node`` on it; a qcow2 gets exactly ``backing``
    (None: none, whatever its header names), as at start (vm/qemu.py)."""
    ro: dict[str, Any] = {"read-only": True} if read_only else {}
    top: dict[str, Any] = {"driver": fmt, "node-name": node, "file": f"{node}-file", **ro}
    if fmt == "qcow2":
        top["backing"] = backing
    file = {"driver": "file", "node-name": f"{node}-file", "filename": f"/dev/fdset/{fdset}"}
    return [{**file, **ro}, top]


def _command_names(reply: object) -> set[str]:
    """The names in a ``query-commands`` reply (nothing from a malformed one)."""
    if not isinstance(reply, list):
        return set()
    return {str(c["name"]) for c in reply if isinstance(c, dict) and "name" in c}


class Monitor:
    """One VM's qemu, through its QMP connection."""

    def __init__(
        self,
        uuid: str,
        directory: str,
        name: str,
        *,
        timeout: float,
        events: MonitorEvents,
        metrics: Metrics,
        connect_timeout: float = 5.0,
        connect_slots: asyncio.Semaphore | None = None,
        peer: Peer | None = None,
    ) -> None:
        self.uuid = uuid
        self._log = vm_log(log, uuid)
        self._events = events
        self._conn = QmpConnection(
            uuid, directory, name, timeout=timeout, on_event=self._dispatch, metrics=metrics,
            connect_timeout=connect_timeout, connect_slots=connect_slots, peer=peer,
        )  # fmt: skip
        self._fd_lock = asyncio.Lock()
        self._fd_names = itertools.count(1)
        self._commands: set[str] | None = None  # from query-commands, once
        self._told_missing: set[str] = set()  # commands already logged as missing
        self._unplugs: dict[str, asyncio.Future[None]] = {}  # device id -> DEVICE_DELETED

    # -- the connection --------------------------------------------------------

    def start(self) -> None:
        self._conn.start()

    async def close(self) -> None:
        await self._conn.close()

    def qemu_gone(self) -> None:
        """Its qemu has exited (see ``QmpConnection.qemu_gone``)."""
        self._conn.qemu_gone()

    async def drain(self, timeout: float) -> None:
        """Once qemu has exited: until every event it sent is dispatched."""
        await self._conn.drain(timeout)

    @property
    def peer(self) -> Peer | None:
        """The qemu process this monitor belongs to (its other sockets too)."""
        return self._conn.peer

    @property
    def ready(self) -> bool:
        return self._conn.ready

    @property
    def last_error(self) -> str | None:
        return self._conn.last_error

    @property
    def timeout(self) -> float:
        return self._conn.timeout

    def _dispatch(self, name: str, data: dict[str, Any]) -> None:
        if name == "DEVICE_DELETED":
            device = data.get("device")
            if isinstance(device, str):
                waiter = self._unplugs.pop(device, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)
                else:
                    self._events.on_device_deleted(device)
            return
        if name == "SHUTDOWN":
            self._events.on_shutdown(shutdown_of(data))
        elif name == "VNC_CONNECTED":
            client = data.get("client")
            if isinstance(client, dict):
                fields = (_field(client.get(k, "")) for k in ("family", "host", "service"))
                self._events.on_vnc_client(VncClient(*fields))
            return
        if name in LIFECYCLE_EVENTS:
            self._events.on_lifecycle(name, _bounded(data))

    # -- operations ----------------------------------------------------------

    async def query(self, what: str) -> Any:
        """One of ``QUERIES`` (the API's info types), as qemu returns it."""
        return await self._conn.execute(QUERIES[what])

    async def query_all(self, whats: Sequence[str]) -> list[Any]:
        """Several of ``QUERIES``, pipelined: each result, or its error as a value."""
        return await self._conn.execute_all([(QUERIES[what], None) for what in whats])

    async def query_commands(self, *, timeout: float | None = None) -> set[str]:
        """The names of the commands this qemu has (empty from a malformed reply)."""
        return _command_names(await self._conn.execute("query-commands", timeout=timeout))

    async def powerdown(self) -> None:
        """Press the ACPI power button."""
        await self._conn.execute("system_powerdown")

    async def quit(self, *, timeout: float) -> None:
        """Ask qemu to exit at once (the guest is not asked)."""
        await self._conn.execute("quit", timeout=timeout)

    async def reset(self) -> None:
        await self._conn.execute("system_reset")

    async def inject_nmi(self) -> None:
        await self._conn.execute("inject-nmi")

    async def wake_display(self) -> None:
        """Press shift, as a user would to wake a blanked console."""
        await self._conn.execute("send-key", {"keys": [{"type": "qcode", "data": "shift"}]})

    async def screendump(self, filename: str, fmt: Literal["ppm", "png"]) -> None:
        """Write the display to ``filename`` (a path qemu opens)."""
        args: dict[str, Any] = {"filename": filename}
        if fmt == "png":
            args["format"] = "png"  # qemu >= 7.1
        await self._conn.execute("screendump", args)

    async def passthrough(self, cmd: str, arguments: Mapping[str, object] | None) -> Any:
        """A user's own command (``vmadm qmp``), on this connection, same timeout.

        Raises Forbidden for the commands the daemon owns, QmpCommandFailed
        (422, with qemu's class and description) when qemu refuses it.
        """
        if cmd == "human-monitor-command":
            line = (arguments or {}).get("command-line")
            return await self.hmp(line if isinstance(line, str) else "")
        check_qmp(cmd, arguments)  # the allowlist (403); qmppolicy.py says why
        if cmd in OWNED_COMMANDS:
            raise Forbidden(f"{cmd} belongs to vmadmd and cannot be passed through")
        try:
            return await self._conn.execute(cmd, arguments)
        except QmpRefused as err:
            raise QmpCommandFailed(err.message, err.error_class, err.desc) from err

    async def hmp(self, line: str) -> str:
        """A human monitor command line (``human-monitor-command``); its text output."""
        words = line.split(None, 1)
        if not words:
            raise InvalidParameter("the human monitor command is empty")
        check_hmp(line)  # `info ...` only, its name read as qemu reads it (403)
        if words[0] in OWNED_HMP:
            raise Forbidden(f"{words[0]} belongs to vmadmd and cannot be passed through")
        try:
            out = await self._conn.execute("human-monitor-command", {"command-line": line})
        except QmpRefused as err:
            raise QmpCommandFailed(err.message, err.error_class, err.desc) from err
        return out if isinstance(out, str) else str(out)

    async def command(
        self,
        cmd: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """One of the daemon's own commands (the migration's), unfiltered.

        Never reached from a user's request: ``passthrough`` is that path.
        """
        return await self._conn.execute(cmd, arguments, timeout=timeout)

    async def pass_fd(self, fd: int, name: str, *, timeout: float | None = None) -> None:
        """``getfd``: qemu keeps a copy of ``fd`` under ``name`` (a command
        that names it takes it).  Raises QmpRefused when qemu did not take it."""
        async with self._fd_lock:
            (got,) = await self._conn.execute_all(
                [("getfd", {"fdname": name})], timeout=timeout, fd=fd
            )
        if isinstance(got, BaseException):
            if isinstance(got, (QmpConnectionLost, QmpTimeout)):
                self._conn.orphans.add(name)
            raise got

    async def blockstats(self) -> dict[str, DiskStats]:
        """Each disk's counters, by device."""
        return blockstats_of(await self._conn.execute("query-blockstats"))

    # -- devices changed while the VM runs (daemon/hotplug.py) ---------------------

    async def _run(self, cmd: str, arguments: Mapping[str, object] | None = None) -> Any:
        """A command of the daemon's own; qemu's refusal as QmpCommandFailed."""
        try:
            return await self._conn.execute(cmd, arguments)
        except QmpRefused as err:
            raise QmpCommandFailed(err.message, err.error_class, err.desc) from err

    async def add_fdset(self, fd: int, opaque: str) -> int:
        """``fd`` passed to qemu as a new fd set (``add-fd``); the set's id.

        A block node opens ``/dev/fdset/N`` as qemu opens any file: qemu, as
        the VM's user and in its sandbox, opens no disk path itself.
        """
        async with self._fd_lock:  # qemu keeps the fds of the last read only
            (result,) = await self._conn.execute_all([("add-fd", {"opaque": opaque})], fd=fd)
        if isinstance(result, QmpRefused):
            raise QmpCommandFailed(result.message, result.error_class, result.desc)
        if isinstance(result, BaseException):
            raise result
        return int(result["fdset-id"])

    async def remove_fdset(self, fdset: int) -> None:
        """Let qemu close an fd set (once no node uses it)."""
        with contextlib.suppress(QmpRefused):  # gone already
            await self._conn.execute("remove-fd", {"fdset-id": fdset})

    async def fdsets(self) -> dict[str, list[int]]:
        """The fd sets qemu holds, by the opaque name each fd was given."""
        out: dict[str, list[int]] = {}
        reply = await self._conn.execute("query-fdsets")
        for fdset in reply if isinstance(reply, list) else []:
            for fd in fdset.get("fds", []) if isinstance(fdset, dict) else []:
                if isinstance(fd, dict) and isinstance(fd.get("opaque"), str):
                    out.setdefault(fd["opaque"], []).append(int(fdset["fdset-id"]))
        return out

    async def plug_disk(
        self, node: str, fdset: int, fmt: str, *, image: tuple[int, str] | None = None
    ) -> None:
        """A virtio disk over fd set ``fdset`` (its image over ``image``: (fd
        set, format), read-only), device id ``node``: ``blockdev-add`` of each
        node, then ``device_add``.  What was added is deleted again if a
        later step is refused (QmpCommandFailed)."""
        added: list[str] = []
        backing: str | None = None
        try:
            if image is not None:
                backing = f"{node}-image"
                for args in _nodes(backing, image[0], image[1], None, read_only=True):
                    await self._run("blockdev-add", args)
                    added.append(str(args["node-name"]))
            for args in _nodes(node, fdset, fmt, backing, read_only=False):
                await self._run("blockdev-add", args)
                added.append(str(args["node-name"]))
            await self._run("device_add", {"driver": "virtio-blk-pci", "drive": node, "id": node})
        except QmpCommandFailed:
            await self.delete_nodes(reversed(added))
            raise

    async def delete_nodes(self, nodes: Iterable[str]) -> None:
        """``blockdev-del`` each node, top first; one qemu has not is skipped."""
        for name in nodes:
            with contextlib.suppress(QmpRefused):
                await self._conn.execute("blockdev-del", {"node-name": name})

    async def resize_disk(self, node: str, size_bytes: int) -> None:
        """``block_resize``: the file grows, and the guest is told at once."""
        await self._run("block_resize", {"node-name": node, "size": size_bytes})

    async def plug_nic(
        self, dev_id: str, model: str, mac: str, *, tap_fd: int | None, restrict: bool = True
    ) -> None:
        """A nic with device and netdev id ``dev_id``: on the tap ``tap_fd``
        (``getfd`` with the fd on its bytes, then ``netdev_add``), else a
        user-mode one; then ``device_add``.  The netdev is deleted again if
        the device is refused."""
        from vmadmd.vm.qemu import NIC_DEVICES

        if tap_fd is not None:
            async with self._fd_lock:
                got, added = await self._conn.execute_all(
                    [("getfd", {"fdname": dev_id}),
                     ("netdev_add", {"type": "tap", "id": dev_id, "fd": dev_id})],
                    fd=tap_fd,
                )  # fmt: skip
            for result in (got, added):
                if isinstance(result, QmpRefused):
                    with contextlib.suppress(QmpFailed, QmpTimeout):
                        await self._conn.execute("closefd", {"fdname": dev_id})
                    raise QmpCommandFailed(result.message, result.error_class, result.desc)
                if isinstance(result, BaseException):
                    raise result
        else:
            await self._run("netdev_add", {"type": "user", "id": dev_id, "restrict": restrict})
        try:
            await self._run(
                "device_add",
                {"driver": NIC_DEVICES.get(model, "virtio-net-pci"), "netdev": dev_id,
                 "id": dev_id, "mac": mac},
            )  # fmt: skip
        except QmpCommandFailed:
            with contextlib.suppress(QmpRefused):
                await self._conn.execute("netdev_del", {"id": dev_id})
            raise

    async def delete_netdev(self, dev_id: str) -> None:
        with contextlib.suppress(QmpRefused):
            await self._conn.execute("netdev_del", {"id": dev_id})

    async def unplug(self, dev_id: str, timeout: float) -> bool:
        """``device_del``, then wait for qemu's ``DEVICE_DELETED`` (the guest
        let the device go) up to ``timeout`` s; False when it has not (qemu
        keeps the request: the guest may still let go later)."""
        loop = asyncio.get_running_loop()
        waiter = self._unplugs[dev_id] = loop.create_future()
        try:
            try:
                await self._run("device_del", {"id": dev_id})
            except QmpCommandFailed as err:
                if err.error_class == "DeviceNotFound":
                    return True  # gone already
                raise
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                return False
            return True
        finally:
            if self._unplugs.get(dev_id) is waiter:
                del self._unplugs[dev_id]

    async def device_ids(self) -> set[str]:
        """The ids of the devices qemu has that were given one."""
        reply = await self._conn.execute("qom-list", {"path": "/machine/peripheral"})
        return {
            str(p["name"])
            for p in (reply if isinstance(reply, list) else [])
            if isinstance(p, dict) and str(p.get("type", "")).startswith("child<")
        }

    async def snapshot_disks(self, nodes: Sequence[str], name: str, *, timeout: float) -> None:
        """An internal snapshot ``name`` of every node in one ``transaction``:
        qemu drains and pauses guest I/O once, so all the disks are taken at
        the same instant, and either all get it or none does."""
        actions = [
            {"type": "blockdev-snapshot-internal-sync", "data": {"device": node, "name": name}}
            for node in nodes
        ]
        await self._conn.execute("transaction", {"actions": actions}, timeout=timeout)

    async def delete_disk_snapshot(self, node: str, name: str, *, timeout: float) -> bool:
        """Delete internal snapshot ``name`` of ``node``; False when it has none
        by that name (a delete cut short before)."""
        try:
            await self._conn.execute(
                "blockdev-snapshot-delete-internal-sync",
                {"device": node, "name": name},
                timeout=timeout,
            )
        except QmpRefused as err:
            if "not found" in err.desc.lower() or "can't find" in err.desc.lower():
                return False
            raise
        return True

    async def chardev_open(self, chardev: str) -> bool:
        """Whether the guest holds the front end of ``chardev`` open (a
        virtio-serial port the guest opened: an agent listens on it)."""
        for entry in await self._conn.execute("query-chardev") or []:
            if isinstance(entry, dict) and entry.get("label") == chardev:
                return entry.get("frontend-open") is True
        return False

    async def set_vnc_password(self, password: str) -> None:
        await self._conn.execute("set_password", {"protocol": "vnc", "password": password})

    # -- handing a console client to qemu ------------------------------------

    async def add_vnc_client(self, fd: int, *, timeout: float) -> bool:
        """Give a connected client socket to qemu's own VNC server.

        qemu then serves it directly: no byte of the session passes through
        the daemon, and the session outlives a daemon restart.  The fd is
        passed with SCM_RIGHTS (``getfd``) and attached with ``add_client``;
        qemu's VNC authentication applies as for any client.  The caller
        keeps (and should close) its own copy of ``fd``.

        Returns True when qemu took the client, False when it certainly did
        not (no connection right now, or qemu refused): the caller may serve
        the client some other way.  Raises QmpTimeout / QmpFailed when the
        outcome is unknown (the connection broke or qemu did not answer):
        then nobody else may touch the client.
        """
        return await self._give_fd(
            fd,
            "add_client",
            lambda name: {"protocol": "vnc", "fdname": name, "skipauth": False, "tls": False},
            timeout=timeout,
        )

    async def listen_vnc(self, fd: int, unix_path: str, *, timeout: float) -> bool:
        """Make qemu's VNC server accept on the listening socket ``fd`` itself.

        ``display-update`` (qemu >= 7.1) replaces the VNC server's listeners
        with ``unix_path`` (the one qemu was started with; qemu binds it
        anew) and ``fd``.  Clients then reach qemu with no daemon in the
        way.  qemu sets the socket's backlog to 1: the caller, which keeps
        its copy, sets it back.  True/False/raises as ``add_vnc_client``.
        """
        return await self._give_fd(
            fd,
            "display-update",
            lambda name: {
                "type": "vnc",
                "addresses": [{"type": "unix", "path": unix_path}, {"type": "fd", "str": name}],
            },
            timeout=timeout,
        )

    async def unlisten_vnc(self, unix_path: str, *, timeout: float) -> None:
        """Have qemu's VNC server listen on ``unix_path`` only (it closes the
        TCP listener it was given)."""
        await self._conn.execute(
            "display-update",
            {"type": "vnc", "addresses": [{"type": "unix", "path": unix_path}]},
            timeout=timeout,
        )

    async def vnc_tcp_listeners(self, *, timeout: float) -> list[tuple[str, int]]:
        """(host, port) of each TCP listener qemu's VNC server has."""
        servers = await self._conn.execute("query-vnc-servers", timeout=timeout)
        out: list[tuple[str, int]] = []
        for server in servers if isinstance(servers, list) else []:
            for entry in server.get("server", []) if isinstance(server, dict) else []:
                if not isinstance(entry, dict) or entry.get("family") not in ("ipv4", "ipv6"):
                    continue
                if entry.get("websocket"):
                    continue
                service = str(entry.get("service", ""))
                if service.isdigit():
                    out.append((str(entry.get("host", "")), int(service)))
        return out

    async def _has(self, commands: set[str], timeout: float) -> bool | None:
        """Whether this qemu has every one of ``commands`` (None: cannot tell now).

        As libvirt does, qemu is asked what it can do rather than trusted by
        its version; a peer that cannot say has nothing.
        """
        if self._commands is None:
            try:
                self._commands = await self.query_commands(timeout=timeout)
            except QmpRefused:
                self._commands = set()
            except (QmpTimeout, QmpConnectionLost):
                return None  # nothing was passed yet: ask again next time
        return commands <= self._commands

    async def _give_fd(
        self,
        fd: int,
        cmd: str,
        arguments: Callable[[str], dict[str, Any]],
        *,
        timeout: float,
    ) -> bool:
        """Pass ``fd`` to qemu for ``cmd`` to use: ``getfd`` and ``cmd``
        pipelined, the fd on their bytes (one ``sendmsg``).

        False when qemu surely did not take the fd; raises when that is
        unknown (the name is then remembered, to be closed on reconnection).
        """
        if not self._conn.ready:
            return False  # not waiting: the caller has a way that works now
        has = await self._has({"getfd", cmd}, timeout)
        if not has:
            if has is False and cmd not in self._told_missing:
                self._told_missing.add(cmd)  # once, not once per console client
                self._log.info("qemu has no %s: the daemon does without it", cmd)
            return False
        # qemu keeps only the fds of the last read that carried any, until a
        # getfd takes them: one at a time.
        async with self._fd_lock:
            name = f"vnc-{next(self._fd_names)}"
            try:
                got, added = await self._conn.execute_all(
                    [("getfd", {"fdname": name}), (cmd, arguments(name))],
                    timeout=timeout,
                    fd=fd,
                )
            except (QmpConnectionLost, QmpTimeout):
                return False  # raised, not returned: no connection, nothing was sent
            for result in (got, added):
                if isinstance(result, (QmpConnectionLost, QmpTimeout)):
                    self._conn.orphans.add(name)
                    raise result
            if isinstance(got, QmpRefused):
                return False  # qemu got no fd (and so could not add it)
            if isinstance(added, QmpRefused):
                # qemu said no (it closes what it was given); do not leave the
                # name behind.
                with contextlib.suppress(QmpFailed, QmpTimeout):
                    await self._conn.execute("closefd", {"fdname": name}, timeout=timeout)
                return False
            return True
