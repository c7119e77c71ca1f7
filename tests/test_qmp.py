"""The QMP client protocol against a scripted peer on a socketpair: the faults
a real qemu does not produce on demand (out-of-order replies, garbage, a
reply to nothing, an endless line).  The same client against real qemu is
every other test that talks to a VM."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from vmadmd.daemon.qmp import (
    MAX_LINE,
    Batch,
    QmpClient,
    QmpDisconnected,
    QmpExecuteError,
    QmpProtocolError,
)

GREETING = b'{"QMP": {"version": {}, "capabilities": []}}\n'


class Peer:
    """The qemu end of a socketpair, driven by the test."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    async def read_command(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        while b"\n" not in self.buf:
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def reply(self, cmd: dict[str, Any], ret: object) -> None:
        await self.send(json.dumps({"return": ret, "id": cmd["id"]}).encode() + b"\n")


@pytest.fixture
async def pair() -> AsyncIterator[tuple[QmpClient, Peer, list[dict[str, Any]]]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    theirs.setblocking(False)
    events: list[dict[str, Any]] = []
    client = QmpClient(events.append)
    peer = Peer(theirs)

    async def serve_greeting() -> None:
        await peer.send(GREETING)
        await peer.reply(await peer.read_command(), {})

    await asyncio.gather(client.connect(ours), serve_greeting())
    yield client, peer, events
    await asyncio.wait_for(client.disconnect(), 1)
    theirs.close()


async def test_pipelined_replies_are_matched_by_id(pair: Any) -> None:
    client, peer, events = pair
    calls = [asyncio.ensure_future(client.execute(f"cmd{i}")) for i in range(3)]
    got = [await peer.read_command() for _ in range(3)]
    assert [c["execute"] for c in got] == ["cmd0", "cmd1", "cmd2"]
    # Answered backwards, an event in between: each caller gets its own.
    await peer.send(b'{"event": "RESET", "data": {"guest": true}}\n')
    for cmd in reversed(got):
        await peer.reply(cmd, cmd["execute"])
    assert await asyncio.gather(*calls) == ["cmd0", "cmd1", "cmd2"]
    assert events == [{"event": "RESET", "data": {"guest": True}}]


async def test_an_error_reply_is_typed(pair: Any) -> None:
    client, peer, _ = pair
    call = asyncio.ensure_future(client.execute("nope", {"a": 1}))
    cmd = await peer.read_command()
    assert cmd["arguments"] == {"a": 1}
    await peer.send(json.dumps({"error": {"class": "CommandNotFound", "desc": "no"},
                                "id": cmd["id"]}).encode() + b"\n")  # fmt: skip
    with pytest.raises(QmpExecuteError) as err:
        await call
    assert (err.value.error_class, err.value.desc) == ("CommandNotFound", "no")
    # The connection is fine after a refusal.
    call = asyncio.ensure_future(client.execute("query-status"))
    await peer.reply(await peer.read_command(), {"running": True})
    assert await call == {"running": True}


@pytest.mark.parametrize(
    "junk",
    [b"{not json\n", b"[1, 2]\n", b'{"return": {}}\n', b'{"hello": 1}\n'],
    ids=["garbage", "not-an-object", "reply-to-nothing", "unknown-message"],
)
async def test_junk_fails_what_is_in_flight_and_closes(pair: Any, junk: bytes) -> None:
    client, peer, _ = pair
    call = asyncio.ensure_future(client.execute("query-status"))
    await peer.read_command()
    await peer.send(junk)
    with pytest.raises(QmpProtocolError):
        await asyncio.wait_for(call, 1)
    await asyncio.wait_for(client.wait_closed(), 1)
    assert not client.running
    with pytest.raises(QmpDisconnected):
        await client.execute("query-status")


async def test_an_endless_line_is_cut_off(pair: Any) -> None:
    client, peer, _ = pair
    call = asyncio.ensure_future(client.execute("query-status"))
    await peer.read_command()
    chunk = b"x" * (1 << 20)
    for _ in range(MAX_LINE // len(chunk) + 2):
        try:
            await peer.send(chunk)
        except BrokenPipeError:
            break  # the client has hung up on it
    with pytest.raises(QmpProtocolError, match="longer than"):
        await asyncio.wait_for(call, 1)


async def test_a_late_reply_to_a_command_given_up_is_dropped(pair: Any) -> None:
    client, peer, _ = pair
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.execute("slow"), 0.05)
    slow = await peer.read_command()
    call = asyncio.ensure_future(client.execute("fast"))
    fast = await peer.read_command()
    await peer.reply(slow, "late")
    await peer.reply(fast, "mine")
    assert await call == "mine"
    assert client.running


async def test_the_peer_going_away_fails_what_is_in_flight(pair: Any) -> None:
    client, peer, _ = pair
    call = asyncio.ensure_future(client.execute("query-status"))
    await peer.read_command()
    peer.sock.close()
    with pytest.raises(QmpDisconnected):
        await asyncio.wait_for(call, 1)


async def test_no_greeting_is_a_protocol_error() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        theirs.sendall(b'{"return": {}}\n')
        client = QmpClient(lambda _: None)
        with pytest.raises(QmpProtocolError, match="greeting"):
            await asyncio.wait_for(client.connect(ours), 1)
        await asyncio.wait_for(client.disconnect(), 1)
    finally:
        theirs.close()


async def test_a_batch_is_one_write_and_wakes_its_caller_once(pair: Any) -> None:
    """submit_batch: every command in one write; replies in any order, an
    error among them, an event between them; ``done`` only with the last."""
    client, peer, events = pair
    batch = client.submit_batch([("a", None), ("b", {"x": 1}), ("c", None)])
    chunk = await asyncio.get_running_loop().sock_recv(peer.sock, 65536)
    assert chunk.count(b"\n") == 3  # one write, read whole
    peer.buf = chunk
    got = [await peer.read_command() for _ in range(3)]
    assert [c["execute"] for c in got] == ["a", "b", "c"]
    assert got[1]["arguments"] == {"x": 1}
    await peer.reply(got[2], "C")
    await peer.send(b'{"event": "STOP"}\n')
    await peer.send(json.dumps({"error": {"class": "GenericError", "desc": "no"},
                                "id": got[0]["id"]}).encode() + b"\n")  # fmt: skip
    await asyncio.sleep(0.05)
    assert not batch.done.done()
    assert batch.left == 1
    await peer.reply(got[1], "B")
    await asyncio.wait_for(batch.done, 1)
    assert client.value("c", batch.replies[2]) == "C"
    assert client.value("b", batch.replies[1]) == "B"
    with pytest.raises(QmpExecuteError):
        client.value("a", batch.replies[0])
    assert events == [{"event": "STOP"}]
    for ident in batch.idents:
        client.forget(ident)


async def half_answered(client: QmpClient, peer: Peer) -> tuple[Batch, list[dict[str, Any]]]:
    """A batch of two commands, the first answered (and read by the client)."""
    batch = client.submit_batch([("a", None), ("b", None)])
    got = [await peer.read_command() for _ in range(2)]
    await peer.reply(got[0], "A")
    await asyncio.sleep(0.05)
    return batch, got


async def test_a_batch_cut_short_keeps_what_came_in(pair: Any) -> None:
    client, peer, _ = pair
    batch, got = await half_answered(client, peer)
    peer.sock.close()
    with pytest.raises(QmpDisconnected):
        await asyncio.wait_for(batch.done, 1)
    assert batch.replies[0] == {"return": "A", "id": got[0]["id"]}
    assert batch.replies[1] is None
    # A closed connection takes no more.
    with pytest.raises(QmpDisconnected):
        client.submit_batch([("c", None)])


async def test_an_expired_batch_drops_late_replies(pair: Any) -> None:
    client, peer, _ = pair
    batch, got = await half_answered(client, peer)
    batch.expire()
    with pytest.raises(TimeoutError):
        await batch.done
    await peer.reply(got[1], "B")  # late: not filled in, the connection stays up
    call = asyncio.ensure_future(client.execute("d"))
    await peer.reply(await peer.read_command(), "D")
    assert await asyncio.wait_for(call, 1) == "D"
    assert batch.replies[1] is None
    assert batch.replies[0] is not None
