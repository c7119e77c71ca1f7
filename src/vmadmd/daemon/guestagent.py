"""Freezing a guest's file systems around a snapshot, through qemu-guest-agent.

Every VM's qemu has a virtio-serial port named ``org.qemu.guest_agent.0``
on the chardev ``qga0`` (socket ``vm.qga`` in its ``root/tmp``; ``vm/qemu.py``).  A guest
that runs qemu-guest-agent opens the port; qemu then reports the chardev's
front end open (``query-chardev``), which is how the daemon knows, for one
cheap QMP query, whether to try at all: a guest with no agent costs a
snapshot nothing more.

With an agent: connect (the socket must be the VM's qemu's, ``Peer``),
``guest-sync-delimited`` (the reply follows a 0xFF byte: whatever an
earlier client left in the channel is skipped), ``guest-fsfreeze-freeze``,
the snapshot, ``guest-fsfreeze-thaw``, each bounded.  Whatever the agent
does (no answer, garbage, a freeze that times out), the snapshot is still
taken, crash-consistent, and a thaw is sent whenever a freeze was: a freeze
that completes after we gave up on it must not leave the guest frozen.

Everything read from the agent is the guest's and is treated so: lines are
bounded, replies are only checked for the one field we need.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from vmadmd.vm.qemu import AGENT_SOCKET as SOCKET_NAME
from vmadmd.vm.sockets import Peer, connect_unix_retrying

SYNC_TIMEOUT = 1.0  # an agent that does not answer this fast is taken as absent
FREEZE_TIMEOUT = 10.0  # fsfreeze flushes dirty data first
THAW_TIMEOUT = 5.0
MAX_LINE = 64 * 1024

_ids = itertools.count(1)


class AgentError(Exception):
    """The agent did not answer as it should."""


class _Channel:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def call(self, cmd: str, arguments: dict[str, Any] | None = None) -> Any:
        msg: dict[str, Any] = {"execute": cmd}
        if arguments is not None:
            msg["arguments"] = arguments
        self.writer.write(json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        return self._reply(await self.reader.readuntil(b"\n"))

    async def sync(self) -> None:
        """``guest-sync-delimited``: skip to the 0xFF that starts its reply."""
        ident = next(_ids) & 0x7FFFFFFF
        msg = {"execute": "guest-sync-delimited", "arguments": {"id": ident}}
        self.writer.write(b"\xff" + json.dumps(msg).encode() + b"\n")
        await self.writer.drain()
        await self.reader.readuntil(b"\xff")
        if self._reply(await self.reader.readuntil(b"\n")) != ident:
            raise AgentError("guest-sync-delimited answered another id")

    @staticmethod
    def _reply(line: bytes) -> Any:
        try:
            data = json.loads(line)
        except ValueError:
            raise AgentError("the agent's answer is not JSON") from None
        if not isinstance(data, dict) or "return" not in data:
            raise AgentError("the agent refused or answered something else")
        return data["return"]


@contextlib.asynccontextmanager
async def frozen(
    directory: str, peer: Peer | None, log: logging.LoggerAdapter[logging.Logger]
) -> AsyncIterator[bool]:
    """Freeze the guest's file systems for the block; yields whether they are."""
    try:
        sock = await connect_unix_retrying(directory, SOCKET_NAME, peer)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=MAX_LINE)
    except (OSError, ValueError) as err:
        log.info("guest agent: cannot connect (%s): crash-consistent snapshot", err)
        yield False
        return
    chan = _Channel(reader, writer)
    froze_sent = False
    is_frozen = False
    try:
        try:
            await asyncio.wait_for(chan.sync(), SYNC_TIMEOUT)
            froze_sent = True
            count = await asyncio.wait_for(chan.call("guest-fsfreeze-freeze"), FREEZE_TIMEOUT)
            is_frozen = isinstance(count, int) and not isinstance(count, bool)
        except (TimeoutError, OSError, AgentError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as err:  # fmt: skip
            log.warning("guest agent: no freeze (%s): crash-consistent snapshot",
                        type(err).__name__)  # fmt: skip
        yield is_frozen
    finally:
        if froze_sent:
            try:
                if not is_frozen:  # a half-answered exchange: start clean
                    await asyncio.wait_for(chan.sync(), SYNC_TIMEOUT)
                await asyncio.wait_for(chan.call("guest-fsfreeze-thaw"), THAW_TIMEOUT)
            except (TimeoutError, OSError, AgentError, asyncio.IncompleteReadError,
                    asyncio.LimitOverrunError) as err:  # fmt: skip
                log.warning("guest agent: the thaw was not confirmed (%s)", type(err).__name__)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
