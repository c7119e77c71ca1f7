"""One VM's QMP connection: connecting to its very qemu, timeouts, wedge recovery.

qemu serves one QMP client per socket at a time, so this connection is the
only way in while the daemon runs; it is kept open for the qemu's lifetime
and belongs to that qemu alone: a server at ``vm.qmp`` that is not it (a
socket planted by the VM's user, or the next qemu of the same VM) is never
spoken to (``Peer``), and once its qemu is gone it never connects again.
Every command is bounded by a timeout.  A command that times out marks the
connection wedged: it is dropped and re-established in the background (a
qemu stopped with SIGSTOP answers again after SIGCONT), and until then
commands wait for the connection up to their own timeout.  Nothing here
touches another VM.

Failures come back typed: ``QmpRefused`` (qemu answered with an error, so it
surely did not act), ``QmpConnectionLost`` (whether it acted is unknown) and
``QmpTimeout``.  What the commands mean is ``Monitor``'s (``monitor.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.qmp import Batch, Message, QmpClient, QmpDisconnected, QmpError, QmpExecuteError
from vmadmd.errors import QmpConnectionLost, QmpFailed, QmpRefused, QmpTimeout, VmadmError
from vmadmd.vm.sockets import Peer, WrongPeer, connect_unix_retrying

log = logging.getLogger("vmadmd.qmp")

EventCallback = Callable[[str, dict[str, Any]], None]


class QmpConnection:
    """The daemon's QMP connection to one qemu."""

    def __init__(
        self,
        uuid: str,
        directory: str,
        name: str,
        *,
        timeout: float,
        on_event: EventCallback,
        metrics: Metrics,
        connect_timeout: float = 5.0,
        connect_slots: asyncio.Semaphore | None = None,
        peer: Peer | None = None,
    ) -> None:
        self._metrics = metrics
        # The one qemu this connection belongs to: it connects to no other
        # server (a socket planted in root/tmp, or the next qemu of the same
        # VM at the same path), and stops reconnecting once that qemu is
        # gone (``qemu_gone``).  None only in tests of the wire alone.
        self._peer = peer
        self._gone = False
        self._told_peer: set[int] = set()  # impostor pids already logged
        # Shared by all connections: a daemon (re)starting with many VMs
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
        # Set when a command waits for this connection: it then connects
        # without waiting for a shared slot (a request for one VM does not
        # queue behind a thousand others' start-up connects).
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.last_error: str | None = None
        # Names of fds a cut-short handoff may have left registered in qemu:
        # closed on the next connection.
        self.orphans: set[str] = set()
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

    def qemu_gone(self) -> None:
        """This monitor's qemu has exited: never connect again (a new qemu of
        the same VM gets a monitor of its own), and fail at once the commands
        that wait for a connection (409: the VM is not running)."""
        self._gone = True
        if self._client is None:
            self._ready.set()  # waiters wake, find no client, and fail

    async def _connect_loop(self) -> None:
        """Connect, retrying with back-off until connected, closed, or gone."""
        delay = 0.05
        while not self._closed and not self._gone:
            client = QmpClient(self._dispatch)
            try:
                async with connect_slot(self._connect_slots, self._wanted):
                    if self._gone:
                        return
                    sock = await connect_unix_retrying(self._directory, self._name, self._peer)
                    await asyncio.wait_for(client.connect(sock), self._connect_timeout)
            except (OSError, QmpError, TimeoutError, EOFError) as err:
                told = self._told_peer
                if isinstance(err, WrongPeer) and err.pid not in told and len(told) < 16:
                    told.add(err.pid)  # a planted server: said once per pid
                    self._log.warning("QMP socket refused: %s", err)
                # OSError: socket missing or refused (qemu still starting or
                # gone); QmpError: no or bad greeting; TimeoutError: qemu
                # accepted but does not speak (stopped with SIGSTOP).
                self.last_error = f"QMP connect failed: {err or type(err).__name__}"
                self._log.debug("%s", self.last_error)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 1.0)
                if self._wanted.is_set():
                    await asyncio.sleep(min(delay, 0.1))  # a command waits: retry soon
                else:
                    with contextlib.suppress(TimeoutError):
                        # A command that starts waiting cuts the back-off short.
                        await asyncio.wait_for(self._wanted.wait(), delay)
                delay = min(delay * 2, 0.1 if self._wanted.is_set() else 2.0)
                continue
            if self._closed or self._gone:
                # Closed while the greeting was read: let go of qemu's only
                # QMP slot at once.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.disconnect(), 1.0)
                self._ready.set()
                return
            self._client = client
            self.last_error = None
            self._wanted.clear()
            self._ready.set()
            self._log.debug("QMP connected")
            if self.orphans:
                self._cleanup = asyncio.create_task(_close_orphans(self))
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
        if self._gone:
            # Its qemu has exited: nothing to reconnect to (and the path may
            # already be its successor's).
            self._client = None
            self._ready.set()
            return
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
    def peer(self) -> Peer | None:
        """The qemu process this monitor belongs to (its other sockets too)."""
        return self._peer

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

    async def execute(
        self,
        cmd: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one command; raises QmpTimeout, QmpRefused or QmpConnectionLost."""
        (result,) = await self.execute_all([(cmd, arguments)], timeout=timeout)
        if isinstance(result, VmadmError):
            raise result
        return result

    async def execute_all(
        self,
        commands: Sequence[tuple[str, Mapping[str, object] | None]],
        *,
        timeout: float | None = None,
        fd: int | None = None,
    ) -> list[Any]:
        """Run commands pipelined under one deadline: each one's result, or
        its QmpTimeout / QmpRefused / QmpConnectionLost as a value.

        Raises (for all) only when there is no connection to send them on.
        All are sent before any reply is awaited, from the caller's own task:
        no task per command.  ``fd`` rides on the commands' bytes, for the
        first of them (``getfd``) to take; when it cannot be sent now, every
        command fails with QmpRefused (nothing was sent: qemu did not act).
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
                self._wanted.set()
                await asyncio.wait_for(self._ready.wait(), limit)
        except TimeoutError:
            raise QmpTimeout(
                f"VM {self.uuid}: no QMP connection within {limit:g} s"
                + (f" ({self.last_error})" if self.last_error else "")
            ) from None
        if self._closed:
            raise self._closed_error()
        client = self._client
        if client is None:
            if self._gone:
                raise QmpConnectionLost(f"VM {self.uuid}: its qemu has exited")
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

        return await _exchange(self, client, commands, fd, deadline, limit, lost)


async def _exchange(
    conn: QmpConnection,
    client: QmpClient,
    commands: Sequence[tuple[str, Mapping[str, object] | None]],
    fd: int | None,
    deadline: float,
    limit: float,
    lost: Callable[[str, BaseException], QmpConnectionLost | QmpTimeout],
) -> list[Any]:
    """Send one batch on ``client`` and collect its results by ``deadline``."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    n = len(commands)
    results: list[Any] = [None] * n  # each one filled in below
    outcomes = ["error"] * n
    took = [0.0] * n
    batch: Batch | None = None
    try:
        if conn._log.isEnabledFor(logging.DEBUG):
            for cmd, _ in commands:
                conn._log.debug("qmp --> %s", cmd)
        try:
            batch = client.submit_batch(commands, fd)
        except QmpDisconnected as err:
            for i, (cmd, _) in enumerate(commands):
                results[i] = lost(cmd, err)
            return results
        except QmpError as err:  # the fd could not go now: nothing was sent
            for i, (cmd, _) in enumerate(commands):
                results[i] = QmpRefused(f"VM {conn.uuid}: {cmd}: {err}")
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
            took[i] = (batch.arrived[i] if reply is not None else loop.time()) - t0
            outcomes[i], results[i] = _result(
                conn.uuid, commands[i][0], reply, failure, limit, lost
            )
        late = [i for i, outcome in enumerate(outcomes) if outcome == "timeout"]
        if late:
            conn._wedged(f"{commands[late[0]][0]} timed out after {limit:g} s", stalled=True)
    finally:
        if batch is not None:
            for ident in batch.idents:
                client.forget(ident)
        for (cmd, _), outcome, spent in zip(commands, outcomes, took, strict=True):
            conn._log.debug("qmp <-- %s %s in %.3f ms", cmd, outcome, spent * 1000)
            conn._metrics.qmp_command(cmd, outcome, spent)
    return results


@contextlib.asynccontextmanager
async def connect_slot(slots: asyncio.Semaphore, wanted: asyncio.Event) -> AsyncIterator[None]:
    """One of the connect slots all connections share, or none once
    ``wanted`` is set (a command waits for this connection)."""
    if wanted.is_set():
        yield
        return
    acquire = asyncio.ensure_future(slots.acquire())
    waiting = asyncio.ensure_future(wanted.wait())
    try:
        await asyncio.wait((acquire, waiting), return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        waiting.cancel()
        if acquire.done() and not acquire.cancelled():
            slots.release()
        else:
            acquire.cancel()  # (Semaphore.acquire gives back a slot it got meanwhile)
        raise
    waiting.cancel()
    held = acquire.done()
    if not held:
        acquire.cancel()
    try:
        yield
    finally:
        if held:
            slots.release()


def _result(
    uuid: str,
    cmd: str,
    reply: Message | None,
    failure: BaseException | None,
    limit: float,
    lost: Callable[[str, BaseException], VmadmError],
) -> tuple[str, Any]:
    """One command's outcome (``ok``, ``timeout``, ``error``) and result: its
    value, or its failure as a value."""
    if reply is None:
        if isinstance(failure, TimeoutError):
            return "timeout", QmpTimeout(f"VM {uuid}: qemu did not answer {cmd} within {limit:g} s")
        return "error", lost(cmd, failure or QmpDisconnected("no reply"))
    try:
        return "ok", QmpClient.value(cmd, reply)
    except QmpExecuteError as err:
        return "error", QmpRefused(
            f"VM {uuid}: {cmd}: {err.desc}", error_class=err.error_class, desc=err.desc
        )
    except QmpError as err:
        return "error", lost(cmd, err)


async def _close_orphans(conn: QmpConnection) -> None:
    """Close the fds that handoffs cut short may have left in qemu.

    qemu keeps an fd taken by ``getfd`` under its name across QMP
    connections; if the command meant to use it never ran, qemu would
    hold it (a console client's connection, say) open with nobody
    serving it.  Run on a new connection; ``closefd`` of a name qemu does
    not have fails harmlessly.
    """
    for name in sorted(conn.orphans):
        try:
            await conn.execute("closefd", {"fdname": name})
        except QmpRefused:
            pass  # qemu has no such name: nothing to close
        except (QmpFailed, QmpTimeout):
            return  # connection trouble: the next connection tries again
        conn.orphans.discard(name)
