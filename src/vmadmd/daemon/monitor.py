"""One VM's QMP connection (``daemon/qmp.py``): timeouts, wedge recovery, events.

qemu serves one QMP client per socket at a time, so this connection is the
only way in while the daemon runs; it is kept open for the VM's lifetime.
Every command is bounded by a timeout.  A command that times out marks the
connection wedged: it is dropped and re-established in the background (a
qemu stopped with SIGSTOP answers again after SIGCONT), and until then
commands wait for the connection up to their own timeout.  Nothing here
touches another VM.

This module is the only one that speaks QMP: the rest of the daemon calls
one typed method per operation (``powerdown()``, ``query("block")``,
``add_vnc_client(fd)``...), as libvirt's ``qemu_monitor.c`` keeps JSON away
from its driver.  Failures come back typed: ``QmpRefused`` (qemu answered
with an error, so it surely did not act), ``QmpConnectionLost`` (whether it
acted is unknown) and ``QmpTimeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.qmp import Batch, Message, QmpClient, QmpDisconnected, QmpError, QmpExecuteError
from vmadmd.daemon.qmppolicy import check_hmp, check_qmp
from vmadmd.errors import (
    Forbidden,
    InvalidParameter,
    QmpCommandFailed,
    QmpConnectionLost,
    QmpFailed,
    QmpRefused,
    QmpTimeout,
    VmadmError,
)
from vmadmd.vm.sockets import connect_unix_retrying

log = logging.getLogger("vmadmd.qmp")

EventCallback = Callable[[str, dict[str, Any]], None]

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


def _command_names(reply: object) -> set[str]:
    """The names in a ``query-commands`` reply (nothing from a malformed one)."""
    if not isinstance(reply, list):
        return set()
    return {str(c["name"]) for c in reply if isinstance(c, dict) and "name" in c}


class Monitor:
    """The daemon's QMP connection to one VM's qemu."""

    def __init__(
        self,
        uuid: str,
        directory: str,
        name: str,
        *,
        timeout: float,
        on_event: EventCallback,
        connect_timeout: float = 5.0,
        metrics: Metrics,
        connect_slots: asyncio.Semaphore | None = None,
    ) -> None:
        self._metrics = metrics
        # Shared by all monitors: a daemon (re)starting with many VMs
        # connects a bounded number at a time.
        self._connect_slots = connect_slots or asyncio.Semaphore(1)
        self.uuid = uuid
        self._log = vm_log(log, uuid)
        self._directory = directory
        self._name = name
        self.timeout = timeout
        self._connect_timeout = connect_timeout
        self._on_event = on_event
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QmpClient | None = None
        self._dropped: QmpClient | None = None  # the last one dropped as wedged
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_error: str | None = None
        # qemu keeps only the file descriptors of the last message that
        # carried any, until a getfd takes them: one handoff at a time.
        self._fd_lock = asyncio.Lock()
        # Commands sent and not yet answered.  An fd rides on one byte
        # written straight to the socket, so it may only be sent while no
        # command's bytes can still sit in the transport's buffer: when
        # every command sent has been answered (qemu read it whole).  The
        # gate holds new commands back for that moment.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._gate = asyncio.Event()
        self._gate.set()
        self.ever_connected = False
        self._fd_names = itertools.count(1)
        self._commands: set[str] | None = None  # from query-commands, once
        self._told_missing: set[str] = set()  # commands already logged as missing
        # Names of fds a cut-short handoff may have left registered in qemu.
        self._orphans: set[str] = set()
        self._cleanup: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._connect_loop(), name=f"qmp-{self.uuid}")

    async def close(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._drop()
        # Wake commands waiting for a (re)connection: they fail now, as for a
        # VM that stopped, rather than wait out their timeout.
        self._ready.set()

    async def _connect_loop(self) -> None:
        """Connect, retrying with back-off until connected or closed."""
        delay = 0.05
        while not self._closed:
            client = QmpClient(self._dispatch)
            try:
                async with self._connect_slots:
                    sock = await connect_unix_retrying(self._directory, self._name)
                    await asyncio.wait_for(client.connect(sock), self._connect_timeout)
            except (OSError, QmpError, TimeoutError, EOFError) as err:
                # OSError: socket missing or refused (qemu still starting or
                # gone); QmpError: no or bad greeting; TimeoutError: qemu
                # accepted but does not speak (stopped with SIGSTOP).
                self.last_error = f"QMP connect failed: {err or type(err).__name__}"
                self._log.debug("%s", self.last_error)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 1.0)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._client = client
            self.last_error = None
            self.ever_connected = True
            self._ready.set()
            self._log.debug("QMP connected")
            if self._orphans:
                self._cleanup = asyncio.create_task(self._close_orphans())
            return

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._ready.clear()
        if client is not None:
            with contextlib.suppress(Exception):
                # After `quit` qemu resets the socket rather than closing it
                # cleanly (qemu 7.2), so disconnect may raise; it may also
                # hang on a stopped peer.  Bounded either way.
                await asyncio.wait_for(client.disconnect(), 1.0)

    def _wedged(self, why: str, *, stalled: bool = False) -> None:
        """Drop the connection and reconnect in the background (``stalled``:
        because qemu stopped answering on it)."""
        if self._closed:
            return
        self.last_error = why
        self._log.warning("QMP connection wedged (%s); reconnecting", why)
        old = self._client
        if stalled:
            self._dropped = old
        self._client = None
        self._ready.clear()

        async def reconnect() -> None:
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(old.disconnect(), 1.0)
            await self._connect_loop()

        if self._task is None or self._task.done():
            self._task = asyncio.create_task(reconnect(), name=f"qmp-{self.uuid}")

    def _closed_error(self) -> QmpConnectionLost:
        return QmpConnectionLost(f"VM {self.uuid}: QMP connection is closed (the VM stopped)")

    @property
    def ready(self) -> bool:
        return self._client is not None

    async def drain(self, timeout: float) -> None:
        """Once qemu has exited: wait until every event it sent is dispatched.

        The pidfd can report the exit before the loop has read the last
        events (``SHUTDOWN`` says how the VM ended); qemu closed the socket
        after them, so the connection leaves RUNNING only once they are
        handed on.  Bounded: a connection that never was up has nothing.
        """
        client = self._client
        if client is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await client.wait_closed()

    def _dispatch(self, msg: Message) -> None:
        name = str(msg.get("event", ""))
        data = msg.get("data", {})
        try:
            self._on_event(name, data if isinstance(data, dict) else {})
        except Exception:
            self._log.exception("QMP event handler failed")

    # -- commands ----------------------------------------------------------

    async def _execute(
        self,
        cmd: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
        through_gate: bool = False,
    ) -> Any:
        """Run one command; raises QmpTimeout, QmpRefused or QmpConnectionLost."""
        (result,) = await self._execute_all(
            [(cmd, arguments)], timeout=timeout, through_gate=through_gate
        )
        if isinstance(result, VmadmError):
            raise result
        return result

    async def _execute_all(
        self,
        commands: Sequence[tuple[str, Mapping[str, object] | None]],
        *,
        timeout: float | None = None,
        through_gate: bool = False,
    ) -> list[Any]:
        """Run commands pipelined under one deadline: each one's result, or
        its QmpTimeout / QmpRefused / QmpConnectionLost as a value.

        Raises (for all) only when there is no connection to send them on.
        All are sent before any reply is awaited, from the caller's own task:
        no task per command.
        """
        limit = self.timeout if timeout is None else timeout
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        if self._closed:
            raise self._closed_error()
        try:
            # (Awaited only when needed: the common case costs no task.)
            if not self._ready.is_set():
                await asyncio.wait_for(self._ready.wait(), limit)
            if not through_gate and not self._gate.is_set():
                await asyncio.wait_for(self._gate.wait(), max(deadline - loop.time(), 0.001))
        except TimeoutError:
            raise QmpTimeout(
                f"VM {self.uuid}: no QMP connection within {limit:g} s"
                + (f" ({self.last_error})" if self.last_error else "")
            ) from None
        if self._closed:
            raise self._closed_error()
        client = self._client
        if client is None:
            raise QmpConnectionLost(f"VM {self.uuid}: QMP connection lost")

        def lost(cmd: str, err: BaseException) -> QmpConnectionLost | QmpTimeout:
            # The connection broke under the command (qemu exited, or the
            # peer sent something that is not QMP) or was dropped because
            # qemu stopped answering another command on it: then this one
            # was not answered either (504, not 409).
            exc: QmpConnectionLost | QmpTimeout
            if client is self._dropped:
                exc = QmpTimeout(f"VM {self.uuid}: qemu did not answer {cmd} ({self.last_error})")
            else:
                if client is self._client:
                    self._wedged(f"{cmd}: {type(err).__name__}")
                exc = QmpConnectionLost(f"VM {self.uuid}: {cmd} failed: connection lost")
            exc.__cause__ = err
            return exc

        t0 = loop.time()
        n = len(commands)
        results: list[Any] = [None] * n  # each one filled in below
        outcomes = ["error"] * n
        took = [0.0] * n
        batch: Batch | None = None
        self._in_flight += 1
        self._idle.clear()
        try:
            if self._log.isEnabledFor(logging.DEBUG):
                for cmd, _ in commands:
                    self._log.debug("qmp --> %s", cmd)
            try:
                batch = client.submit_batch(commands)
            except QmpError as err:
                for i, (cmd, _) in enumerate(commands):
                    results[i] = lost(cmd, err)
                return results
            # At the deadline, the replies not in yet fail with TimeoutError
            # (a timer, rather than cancelling the caller's task).
            timer = loop.call_at(max(deadline, loop.time() + 0.001), batch.expire)
            failure: BaseException | None = None
            try:
                await batch.done
            except (TimeoutError, QmpError, OSError, EOFError) as err:
                failure = err
            finally:
                timer.cancel()
            for i, reply in enumerate(batch.replies):
                cmd = commands[i][0]
                if reply is None:
                    took[i] = loop.time() - t0
                    if isinstance(failure, TimeoutError):
                        outcomes[i] = "timeout"
                        results[i] = QmpTimeout(
                            f"VM {self.uuid}: qemu did not answer {cmd} within {limit:g} s"
                        )
                    else:
                        results[i] = lost(cmd, failure or QmpDisconnected("no reply"))
                    continue
                took[i] = batch.arrived[i] - t0
                try:
                    results[i] = client.value(cmd, reply)
                    outcomes[i] = "ok"
                except QmpExecuteError as err:
                    results[i] = QmpRefused(
                        f"VM {self.uuid}: {cmd}: {err.desc}",
                        error_class=err.error_class,
                        desc=err.desc,
                    )
                except QmpError as err:
                    results[i] = lost(cmd, err)
            late = [i for i, outcome in enumerate(outcomes) if outcome == "timeout"]
            if late:
                self._wedged(f"{commands[late[0]][0]} timed out after {limit:g} s", stalled=True)
        finally:
            if batch is not None:
                for ident in batch.idents:
                    client.forget(ident)
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
            for (cmd, _), outcome, spent in zip(commands, outcomes, took, strict=True):
                self._log.debug("qmp <-- %s %s in %.3f ms", cmd, outcome, spent * 1000)
                self._metrics.qmp_command(cmd, outcome, spent)
        return results

    # -- operations ----------------------------------------------------------

    async def query(self, what: str) -> Any:
        """One of ``QUERIES`` (the API's info types), as qemu returns it."""
        return await self._execute(QUERIES[what])

    async def query_all(self, whats: Sequence[str]) -> list[Any]:
        """Several of ``QUERIES``, pipelined: each result, or its error as a value."""
        return await self._execute_all([(QUERIES[what], None) for what in whats])

    async def query_commands(self, *, timeout: float | None = None) -> set[str]:
        """The names of the commands this qemu has (empty from a malformed reply)."""
        return _command_names(await self._execute("query-commands", timeout=timeout))

    async def powerdown(self) -> None:
        """Press the ACPI power button."""
        await self._execute("system_powerdown")

    async def quit(self, *, timeout: float) -> None:
        """Ask qemu to exit at once (the guest is not asked)."""
        await self._execute("quit", timeout=timeout)

    async def reset(self) -> None:
        await self._execute("system_reset")

    async def inject_nmi(self) -> None:
        await self._execute("inject-nmi")

    async def wake_display(self) -> None:
        """Press shift, as a user would to wake a blanked console."""
        await self._execute("send-key", {"keys": [{"type": "qcode", "data": "shift"}]})

    async def screendump(self, filename: str, fmt: Literal["ppm", "png"]) -> None:
        """Write the display to ``filename`` (a path qemu opens)."""
        args: dict[str, Any] = {"filename": filename}
        if fmt == "png":
            args["format"] = "png"  # qemu >= 7.1
        await self._execute("screendump", args)

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
            return await self._execute(cmd, arguments)
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
            out = await self._execute("human-monitor-command", {"command-line": line})
        except QmpRefused as err:
            raise QmpCommandFailed(err.message, err.error_class, err.desc) from err
        return out if isinstance(out, str) else str(out)

    async def set_vnc_password(self, password: str) -> None:
        await self._execute("set_password", {"protocol": "vnc", "password": password})

    # -- handing a console client to qemu ------------------------------------

    async def _close_orphans(self) -> None:
        """Close the fds that handoffs cut short may have left in qemu.

        qemu keeps an fd taken by ``getfd`` under its name across QMP
        connections; if ``add_client`` never ran, qemu would hold the
        client's connection open with nobody serving it.  Run on a new
        connection, when the old one's commands are all done or dropped;
        ``closefd`` of a name qemu does not have fails harmlessly.
        """
        for name in sorted(self._orphans):
            try:
                await self._execute("closefd", {"fdname": name})
            except QmpRefused:
                pass  # qemu has no such name: nothing to close
            except (QmpFailed, QmpTimeout):
                return  # connection trouble: the next connection tries again
            self._orphans.discard(name)

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
        await self._execute(
            "display-update",
            {"type": "vnc", "addresses": [{"type": "unix", "path": unix_path}]},
            timeout=timeout,
        )

    async def vnc_tcp_listeners(self, *, timeout: float) -> list[tuple[str, int]]:
        """(host, port) of each TCP listener qemu's VNC server has."""
        servers = await self._execute("query-vnc-servers", timeout=timeout)
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
        """Pass ``fd`` to qemu (``getfd``) for ``cmd`` to use under its name."""
        client = self._client
        if client is None or self._closed:
            return False  # not waiting: the caller has a way that works now
        has = await self._has({"getfd", cmd}, timeout)
        if not has:
            if has is False and cmd not in self._told_missing:
                self._told_missing.add(cmd)  # once, not once per console client
                self._log.info("qemu has no %s: the daemon does without it", cmd)
            return False
        async with self._fd_lock:
            self._gate.clear()
            try:
                return await self._hand_fd(client, fd, cmd, arguments, timeout)
            finally:
                self._gate.set()

    async def _hand_fd(
        self,
        client: QmpClient,
        fd: int,
        cmd: str,
        arguments: Callable[[str], dict[str, Any]],
        timeout: float,
    ) -> bool:
        """Send ``fd``, then ``getfd`` and ``cmd`` pipelined (gate closed).

        False when qemu surely did not take the fd; raises when that is
        unknown (the name is then remembered, to be closed on reconnection).
        """
        if not self._idle.is_set():
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                return False  # commands still unanswered: the byte could land inside one
        if client is not self._client:
            return False
        name = f"vnc-{next(self._fd_names)}"
        try:
            client.send_fd_scm(fd)
        except (OSError, QmpError) as err:
            self._log.debug("cannot pass an fd for %s: %s", cmd, err)
            return False
        try:
            got, added = await self._execute_all(
                [("getfd", {"fdname": name}), (cmd, arguments(name))],
                timeout=timeout,
                through_gate=True,
            )
        except (QmpConnectionLost, QmpTimeout):
            self._orphans.add(name)
            raise
        for result in (got, added):
            if isinstance(result, (QmpConnectionLost, QmpTimeout)):
                self._orphans.add(name)
                raise result
        if isinstance(got, QmpRefused):
            return False  # qemu got no fd (and so could not add it)
        if isinstance(added, QmpRefused):
            # qemu said no (it closes what it was given); do not leave the
            # name behind.
            with contextlib.suppress(QmpFailed, QmpTimeout):
                await self._execute("closefd", {"fdname": name}, timeout=timeout, through_gate=True)
            return False
        return True
