"""The API socket's HTTP front (``vmadmd.daemon.http``) and its hand-over to aiohttp."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from vmadmd.daemon.http import Front, Reply, Request
from vmadmd.vm.sockets import connect_unix

from .conftest import Env, bios_payload


def connect(env: Env) -> socket.socket:
    sock = connect_unix(os.path.dirname(env.socket), os.path.basename(env.socket))
    sock.settimeout(10)
    return sock


class Responses:
    """Reads HTTP/1.1 responses off one kept-alive connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        assert chunk, f"connection closed; unread: {self.buf!r}"
        self.buf += chunk

    def next(self, head_only: bool = False) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only:
            return status, headers, b""
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buf:
                    self._more()
                size_line, self.buf = self.buf.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buf) < size + 2:
                    self._more()
                body, self.buf = body + self.buf[:size], self.buf[size + 2 :]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < length:
            self._more()
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, headers, body


def code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def test_pipelined_requests_answered_in_order_on_one_connection(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    sock = connect(env)
    replies = Responses(sock)
    # Four requests in one write: the front serves them one after another.
    sock.sendall(
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Request-Id: first\r\n\r\n"
        + f"GET /vm/{uuid}?type=version HTTP/1.1\r\nHost: x\r\n".encode()
        + b"X-Request-Id: second\r\n\r\n"
        + b"GET /no/such/route HTTP/1.1\r\nHost: x\r\n\r\n"
        + b"POST /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    )
    status, headers, body = replies.next()
    assert (status, headers["x-request-id"]) == (200, "first")
    assert json.loads(body)["ok"] is True
    status, headers, body = replies.next()
    assert (status, headers["x-request-id"], code(body)) == (409, "second", "WrongState")
    status, headers, body = replies.next()
    assert (status, code(body)) == (404, "NotFound")
    assert headers["x-request-id"]  # one is made up when the client gave none
    status, headers, body = replies.next()
    assert (status, code(body), headers["allow"]) == (405, "MethodNotAllowed", "GET")
    # Still open, still served.
    sock.sendall(b"GET /vms HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = replies.next()
    assert status == 200
    assert [vm["uuid"] for vm in json.loads(body)] == [uuid]
    # Connection: close is honoured after the answer.
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert replies.next()[0] == 200
    assert sock.recv(1) == b""
    sock.close()


def test_a_request_trickled_in_pieces_is_served(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    body = b"action=reset"
    request = (
        f"POST /vm/{uuid} HTTP/1.1\r\nHost: x\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    sock = connect(env)
    for piece in (request[:7], request[7:40], request[40:-5], request[-5:]):
        sock.sendall(piece)
        time.sleep(0.05)
    status, _, reply = Responses(sock).next()
    assert (status, code(reply)) == (409, "WrongState")  # a reset of a stopped VM
    sock.close()


def test_unusual_requests_go_to_aiohttp_with_the_same_answers(env: Env) -> None:
    """Chunked bodies, percent-encoded paths, HTTP/1.0, HEAD and other methods
    are handed over whole; the answers are the ones the front gives, and the
    connection goes on being served after the hand-over."""
    env.start_daemon()
    uuid = env.create(bios_payload())
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    variants = {
        "plain": f"POST /vm/{uuid} HTTP/1.1\r\nHost: x\r\n{form}Content-Length: 12\r\n\r\n"
        "action=reset",
        "chunked": f"POST /vm/{uuid} HTTP/1.1\r\nHost: x\r\n{form}"
        "Transfer-Encoding: chunked\r\n\r\n6\r\naction\r\n6\r\n=reset\r\n0\r\n\r\n",
        "percent-encoded": f"POST /%76m/{uuid} HTTP/1.1\r\nHost: x\r\n{form}"
        "Content-Length: 12\r\n\r\naction=reset",
        "http/1.0": f"POST /vm/{uuid} HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n{form}"
        "Content-Length: 12\r\n\r\naction=reset",
    }
    answers: dict[str, tuple[int, str]] = {}
    for name, request in variants.items():
        sock = connect(env)
        replies = Responses(sock)
        sock.sendall(request.encode())
        status, headers, body = replies.next()
        answers[name] = (status, code(body))
        assert headers["x-request-id"], name
        # The same connection serves the next request (aiohttp's, after a hand-over).
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert replies.next()[0] == 200, name
        sock.close()
    assert set(answers.values()) == {(409, "WrongState")}, answers
    # HEAD is a GET without a body; an unknown method on a known path is a 405.
    sock = connect(env)
    replies = Responses(sock)
    sock.sendall(b"HEAD /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = replies.next(head_only=True)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    sock.sendall(b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = replies.next(head_only=True)
    assert (status, headers["allow"]) == (405, "GET")
    sock.sendall(b"PUT /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = replies.next()
    assert (status, code(body), headers["allow"]) == (405, "MethodNotAllowed", "GET,POST")
    sock.close()
    # A bad JSON body is the same 400 on both sides.
    for extra in (
        "Content-Length: 5\r\n\r\n{nope",
        "Transfer-Encoding: chunked\r\n\r\n5\r\n{nope\r\n0\r\n\r\n",
    ):
        sock = connect(env)
        sock.sendall(
            f"POST /vm/{uuid}/qmp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"{extra}".encode()
        )
        status, _, body = Responses(sock).next()
        assert (status, code(body)) == (400, "InvalidParameter"), extra
        sock.close()


def test_no_header_injection_through_the_request_id(env: Env) -> None:
    env.start_daemon()
    sock = connect(env)
    sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Request-Id: a\rInjected: yes\r\n\r\n")
    reply = b""
    with contextlib.suppress(TimeoutError):
        sock.settimeout(2)
        while b"\r\n\r\n" not in reply and (chunk := sock.recv(65536)):
            reply += chunk
    head = reply.partition(b"\r\n\r\n")[0]
    assert head.split(b" ", 2)[1][:1] in (b"2", b"4"), reply[:200]
    assert b"\nInjected" not in head, head
    assert b"\rInjected" not in head, head
    sock.close()


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_a_client_that_never_reads_its_answers_costs_bounded_memory(env: Env) -> None:
    """Thousands of pipelined requests for a 17 KB document, never read: the
    front stops serving (and reading) that connection once its answers back
    up, and everybody else is served meanwhile."""
    daemon = env.start_daemon()
    assert env.api("GET", "/openapi.json")[0] == 200
    before = _rss_kib(daemon.pid)
    greedy = connect(env)
    greedy.setblocking(False)
    request = b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n"
    sent, deadline = 0, time.monotonic() + 3
    while sent < 5000 and time.monotonic() < deadline:
        try:
            greedy.send(request)
            sent += 1
        except BlockingIOError:
            time.sleep(0.01)
    # Answering them all would be 5,000 x 17 KB = 85 MB.
    assert sent < 5000, "the daemon kept reading a client that reads nothing"
    t0 = time.monotonic()
    assert env.api("GET", "/ping")[0] == 200
    assert time.monotonic() - t0 < 1
    assert _rss_kib(daemon.pid) - before < 16 * 1024
    greedy.close()


# -- the front alone, in process ------------------------------------------------


class _Recorder(asyncio.Protocol):
    """Stands in for aiohttp's protocol: records what it is given."""

    def __init__(self) -> None:
        self.data = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.data.endswith(b"done"):
            assert self.transport is not None
            self.transport.write(b"recorder got it all")
            self.transport.close()


async def _front(
    tmp_path: Path, web: Callable[[], Awaitable[Any]], *, client_timeout: float
) -> tuple[Front, str, list[str]]:
    """A front on its own socket, answering every GET with ``{}``; the paths it served."""
    served: list[str] = []

    async def dispatch(request: Request, route: str | None, allowed: frozenset[str]) -> Reply:
        served.append(request.path)
        return Reply(200, b"{}")

    def resolve(method: str, path: str) -> tuple[str | None, dict[str, str], frozenset[str]]:
        return path, {}, frozenset({"GET"})

    front = Front(
        dispatch, resolve, web, web_only=frozenset(), client_timeout=client_timeout, max_body=1024
    )
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    await front.start(listener)
    return front, path, served


async def test_hand_over_gives_aiohttp_every_byte_from_the_request_on(tmp_path: Path) -> None:
    """The front answers what it parses; at the first request it does not,
    the other server gets that request and everything after it, in order,
    including bytes that arrive later; the front never parses them again."""
    recorders: list[_Recorder] = []

    async def web() -> Any:
        def factory() -> asyncio.Protocol:
            recorders.append(_Recorder())
            return recorders[-1]

        return factory

    front, path, served = await _front(tmp_path, web, client_timeout=5)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        handed = b"GET /two HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /three"
        writer.write(b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n" + handed)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"{}"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        writer.write(b" HTTP/1.1\r\n\r\ndone")
        await writer.drain()
        rest = await asyncio.wait_for(reader.read(), 5)
        assert rest == b"recorder got it all"
        writer.close()
        assert served == ["/one"]
        assert len(recorders) == 1
        assert recorders[0].data == handed + b" HTTP/1.1\r\n\r\ndone"
    finally:
        await front.close(1.0)


async def test_front_closes_idle_and_trickling_clients(tmp_path: Path) -> None:
    async def web() -> Any:
        raise AssertionError("nothing here is handed over")

    front, path, _ = await _front(tmp_path, web, client_timeout=0.3)
    try:
        # Served, then idle past the bound: closed.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /a HTTP/1.1\r\n\r\n")
        assert (await reader.readuntil(b"{}")).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.2 < time.monotonic() - t0 < 2
        # A byte every 0.1 s never completes a head: closed at the bound all the same.
        reader, writer = await asyncio.open_unix_connection(path)
        t0 = time.monotonic()
        for byte in b"GET /slow HTTP/1.1\r\nX: y\r\n":
            if reader.at_eof() or writer.is_closing():
                break
            try:
                writer.write(bytes([byte]))
            except ConnectionError:  # closed under the trickle: what is wanted
                break
            await asyncio.sleep(0.1)
            if time.monotonic() - t0 > 3:
                break
        with contextlib.suppress(ConnectionError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - t0 < 1.5
        assert not front.connections
    finally:
        await front.close(1.0)


def test_vmadm_info_prints_a_daemon_without_pretty_the_same_way(env: Env, tmp_path: Path) -> None:
    """A daemon from before ``?pretty`` (compact JSON, no final newline):
    vmadm indents it itself.  Stood in for by a one-answer server: this
    checkout's daemon cannot be that older one."""
    answer = {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}}
    path = str(tmp_path / "old.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    requests: list[bytes] = []

    def serve_one() -> None:
        conn, _ = listener.accept()
        with conn:
            requests.append(conn.recv(65536))
            body = json.dumps(answer).encode()
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )

    server = threading.Thread(target=serve_one)
    server.start()
    try:
        uuid = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"
        res = env.vmadm("info", uuid, "version", extra_env={"VMADMD_SOCKET": path}, timeout=20)
    finally:
        server.join(10)
        listener.close()
    assert res.returncode == 0, res.stderr
    assert res.stdout == json.dumps(answer, indent=2, sort_keys=True) + "\n"
    assert b"pretty=true" in requests[0]
