"""The daemon's HTTP server (``vmadmd.daemon.server``, h11) on the API socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import threading
import time
from pathlib import Path

import pytest

from vmadmd.daemon.http import Reply, Request, Router, Service, Stream
from vmadmd.daemon.server import MAX_HEAD, HttpServer
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
    # Four requests in one write: served one after another.
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
    assert (status, code(body), headers["allow"]) == (405, "MethodNotAllowed", "GET,HEAD")
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


def test_unusual_requests_get_the_same_answers(env: Env) -> None:
    """Chunked bodies, percent-encoded paths, HTTP/1.0 and HEAD are served by the
    one parser and the one envelope: the same answers as the plain request."""
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
        "expect": f"POST /vm/{uuid} HTTP/1.1\r\nHost: x\r\n{form}Expect: 100-continue\r\n"
        "Content-Length: 12\r\n\r\naction=reset",
    }
    answers: dict[str, tuple[int, str]] = {}
    for name, request in variants.items():
        sock = connect(env)
        replies = Responses(sock)
        sock.sendall(request.encode())
        status, headers, body = replies.next()
        if status == 100:
            status, headers, body = replies.next()
        answers[name] = (status, code(body))
        assert headers["x-request-id"], name
        # The same connection serves the next request.
        sock.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert replies.next()[0] == 200, name
        sock.close()
    assert set(answers.values()) == {(409, "WrongState")}, answers
    # HTTP/1.0: answered (JSON), then closed: 1.0 has no keep-alive here.
    reply = env.raw_http(
        f"POST /vm/{uuid} HTTP/1.0\r\nConnection: keep-alive\r\n{form}"
        "Content-Length: 12\r\n\r\naction=reset".encode()
    )
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 409 "), head
    assert code(body) == "WrongState"
    reply = env.raw_http(b"GET /nope HTTP/1.0\r\n\r\n")
    assert code(reply.partition(b"\r\n\r\n")[2]) == "NotFound"
    # HEAD is a GET without a body, errors included; an unknown method on a
    # known path is a 405.
    sock = connect(env)
    replies = Responses(sock)
    sock.sendall(b"HEAD /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = replies.next(head_only=True)
    assert status == 200
    assert headers["content-type"].startswith("application/json")
    assert int(headers["content-length"]) > 0
    sock.sendall(f"HEAD /vm/{uuid}%0A HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, headers, _ = replies.next(head_only=True)
    assert status == 404
    assert headers["content-type"].startswith("application/json")
    sock.sendall(b"HEAD /events HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = replies.next(head_only=True)
    assert (status, headers["allow"]) == (405, "GET")
    sock.sendall(b"PUT /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, headers, body = replies.next()
    assert (status, code(body), headers["allow"]) == (405, "MethodNotAllowed", "GET,HEAD,POST")
    sock.close()
    # A bad JSON body is the same 400 however it is framed.
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


def test_odd_paths_and_malformed_heads_get_json_errors(env: Env) -> None:
    """What aiohttp used to answer in plain text (``404: Not Found``) or
    with its own 400: every one a JSON error, with a request id."""
    env.start_daemon()
    uuid = env.create(bios_payload())
    close = "Connection: close\r\n"
    cases = {
        f"GET /vm/{uuid}%0A HTTP/1.1\r\nHost: x\r\n{close}\r\n": (404, "InvalidUuid"),
        f"GET /vm/{uuid}%2Finfo HTTP/1.1\r\nHost: x\r\n{close}\r\n": (404, "InvalidUuid"),
        f"GET /ping%0A HTTP/1.1\r\nHost: x\r\n{close}\r\n": (404, "NotFound"),
        "GET /p ing HTTP/1.1\r\nHost: x\r\n\r\n": (400, "BadRequest"),
        "GET /ping HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n": (400, "BadRequest"),
        "GET /ping HTTP/1.1\r\nHost: x\r\nX: a\rInjected: b\r\n\r\n": (400, "BadRequest"),
        "GET /ping HTTP/1.1\r\n\r\n": (400, "BadRequest"),  # no Host
        "GET /ping HTTP/9.9\r\nHost: x\r\n\r\n": (505, "HttpVersionNotSupported"),
        "\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n": (400, "BadRequest"),
        "POST /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n": (400, "BadRequest"),
        "POST /vms HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\nab": (400, "BadRequest"),
        "POST /vms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n": (
            400,
            "BadRequest",
        ),
        f"GET /ping HTTP/1.1\r\nHost: x\r\nX: {'y' * 40000}\r\n\r\n": (431, "HeadTooLarge"),
    }
    # A request id that cannot go back out in a header is replaced, not echoed.
    reply = env.raw_http(
        b"GET /ping HTTP/1.1\r\nHost: x\r\nX-Request-Id: caf\xe9\r\n" + close.encode() + b"\r\n"
    )
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    assert b"caf" not in reply.partition(b"\r\n\r\n")[0]
    for request, (want_status, want_code) in cases.items():
        reply = env.raw_http(request.encode("latin-1"))
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {want_status} ".encode()), (request[:60], reply[:300])
        assert b"application/json" in head, (request[:60], head)
        assert b"X-Request-Id: " in head, head
        assert code(body) == want_code, (request[:60], body)
    assert env.api("GET", "/ping")[0] == 200


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


# -- the server alone, in process ------------------------------------------------


async def _server(tmp_path: Path, *, client_timeout: float) -> tuple[HttpServer, str, list[str]]:
    """A server on its own socket, answering every request with ``{}``; the paths it served."""
    served: list[str] = []

    async def answer(request: Request) -> Reply:
        served.append(request.path)
        return Reply(200, b"{}")

    router = Router()
    router.add("/{path*}", "GET", answer)
    router.add("/{path*}", "POST", answer)
    server = HttpServer(Service(router), client_timeout=client_timeout, max_body=1024)
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    await server.start(listener)
    return server, path, served


async def _trickle(path: str, data: bytes, every: float, limit: float) -> float:
    """Send ``data`` a byte every ``every`` s; how long until the server closed."""
    reader, writer = await asyncio.open_unix_connection(path)
    t0 = time.monotonic()
    for byte in data:
        if reader.at_eof() or writer.is_closing():
            break
        try:
            writer.write(bytes([byte]))
        except ConnectionError:  # closed under the trickle: what is wanted
            break
        await asyncio.sleep(every)
        if time.monotonic() - t0 > limit:
            break
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    return time.monotonic() - t0


async def test_server_closes_idle_and_trickling_clients(tmp_path: Path) -> None:
    """One deadline per request, from when it may begin to its last body byte:
    idle, a trickled head and a trickled chunked body are all closed at it."""
    server, path, served = await _server(tmp_path, client_timeout=0.5)
    try:
        # Served, then idle past the bound: closed.
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await reader.readuntil(b"{}")).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert 0.4 < time.monotonic() - t0 < 2
        writer.close()
        # A byte every 0.1 s never completes a head: closed at the bound all the same.
        head = b"GET /slow HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 100
        assert await _trickle(path, head, 0.1, 5) < 1.5
        # A chunked body trickled a chunk at a time: closed at the bound too.
        body = b"POST /body HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(body)
        t0 = time.monotonic()
        closed = None
        while time.monotonic() - t0 < 5:
            try:
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
            except ConnectionError:
                closed = time.monotonic() - t0
                break
            if reader.at_eof():
                closed = time.monotonic() - t0
                break
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1), 0.1) == b"":
                    closed = time.monotonic() - t0
                    break
        writer.close()
        assert closed is not None
        assert closed < 1.5
        assert served == ["/a"]
        await asyncio.sleep(0.1)
        assert not server.connections
    finally:
        await server.close(1.0)


async def test_pipelined_requests_past_an_upgrade_refusal_are_not_smuggled(tmp_path: Path) -> None:
    """A request the server refuses ends the connection: bytes after it are
    never read as a request of their own."""
    server, path, served = await _server(tmp_path, client_timeout=5)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(
            b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        reply = await asyncio.wait_for(reader.read(), 5)
        assert reply.startswith(b"HTTP/1.1 400 "), reply
        assert reply.count(b"HTTP/1.1") == 1
        writer.close()
        assert served == []
    finally:
        await server.close(1.0)


def test_a_trickled_chunked_body_is_cut_off_at_the_client_timeout(env: Env) -> None:
    """A chunk every 0.2 s never ends the body: the daemon closes the
    connection at --client-timeout (it used to stay open past 45 s)."""
    env.start_daemon("--client-timeout", "1")
    sock = connect(env)
    sock.sendall(b"POST /vms HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    t0 = time.monotonic()
    closed = None
    while time.monotonic() - t0 < 10:
        try:
            sock.sendall(b"1\r\nx\r\n")
            sock.settimeout(0.2)
            if sock.recv(65536) == b"":
                closed = time.monotonic() - t0
                break
        except TimeoutError:
            continue
        except OSError:  # reset under the trickle: closed all the same
            closed = time.monotonic() - t0
            break
    sock.close()
    assert closed is not None, "still open after 10 s"
    assert 0.8 < closed < 2.5, closed
    assert env.api("GET", "/ping")[0] == 200


async def test_a_client_far_ahead_of_its_answers_is_not_read_further(tmp_path: Path) -> None:
    """Pipelined requests sent faster than they are served, answers read: the
    server's buffer of requests not yet served stays bounded (it used to be
    bounded only while the client also left its answers unread)."""
    most = 0
    server: HttpServer | None = None

    async def slow(request: Request) -> Reply:
        nonlocal most
        assert server is not None
        for conn in server.connections:
            most = max(most, len(conn.conn.trailing_data[0]))
        await asyncio.sleep(0.001)
        return Reply(200, b"{}")

    router = Router()
    router.add("/slow", "GET", slow)
    server = HttpServer(Service(router), client_timeout=10, max_body=1024)
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    await server.start(listener)
    count = 4000
    request = b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"

    def client() -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        sock.settimeout(30)

        def send() -> None:
            sock.sendall(request * count)

        sender = threading.Thread(target=send)
        sender.start()
        got = b""
        while got.count(b"HTTP/1.1 200") < count:
            chunk = sock.recv(65536)
            assert chunk
            got += chunk
        sender.join()
        sock.close()
        return got.count(b"HTTP/1.1 200")

    try:
        assert await asyncio.to_thread(client) == count
    finally:
        await server.close(1.0)
    assert most <= MAX_HEAD + 1024 + 64 * 1024, most  # the bound, plus one read


async def test_a_stream_ends_as_soon_as_its_client_hangs_up(tmp_path: Path) -> None:
    """A quiet event stream notices its client's close at once, not at its
    next write (a subscriber would be counted meanwhile)."""
    ended = asyncio.Event()

    async def quiet(request: Request) -> Reply:
        async def stream(out: Stream) -> None:
            try:
                await out.send(b": hello\n\n")
                await asyncio.sleep(60)
            finally:
                ended.set()

        return Reply(200, b"", "text/event-stream", stream=stream)

    router = Router()
    router.add("/events", "GET", quiet, stream=True)
    server = HttpServer(Service(router), client_timeout=30, max_body=1024)
    path = str(tmp_path / "api.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    await server.start(listener)
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b": hello" in await asyncio.wait_for(reader.readuntil(b": hello\n\n"), 5)
        writer.close()
        await asyncio.wait_for(ended.wait(), 2)
    finally:
        await server.close(1.0)


def test_a_full_backlog_of_idle_clients_does_not_stop_a_new_one(env: Env) -> None:
    """300 clients connect and say nothing: a new client's non-blocking
    connect still succeeds (the backlog is SOMAXCONN, and the daemon accepts
    them all) and its /ping is answered."""
    env.start_daemon()
    idle = []
    try:
        for _ in range(300):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect(env.socket)  # EAGAIN here would mean a full backlog
            idle.append(s)
        late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        late.setblocking(False)
        late.connect(env.socket)
        late.settimeout(10)
        late.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        reply = b""
        while chunk := late.recv(65536):
            reply += chunk
        late.close()
        assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    finally:
        for s in idle:
            s.close()
    assert socket.SOMAXCONN > 300


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


@pytest.mark.parametrize(
    "kind", ["link-to-dir", "link-to-file", "dangling-link", "file", "empty-dir"]
)
def test_a_non_socket_at_the_api_path_is_replaced_never_followed(env: Env, kind: str) -> None:
    """Whatever sits at the socket's path (a link, a file, an empty directory:
    in /tmp anyone may put one there) does not stop the daemon from starting;
    a link is replaced itself, and what it points to is untouched."""
    target = env.tmp / "elsewhere"
    target.mkdir()
    keep = target / "precious"
    keep.write_text("keep me")
    path = Path(env.socket)
    if kind == "link-to-dir":
        path.symlink_to(target)
    elif kind == "link-to-file":
        path.symlink_to(keep)
    elif kind == "dangling-link":
        path.symlink_to(env.tmp / "nowhere")
    elif kind == "file":
        path.write_text("not a socket")
    else:
        path.mkdir()
    env.start_daemon()
    assert env.api("GET", "/ping")[0] == 200
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert keep.read_text() == "keep me"
    assert sorted(os.listdir(target)) == ["precious"]
    assert not (env.tmp / "nowhere").exists()
    assert "replaced" in env.daemon_log(tail=None)


def test_a_directory_with_content_at_the_api_path_is_moved_aside(env: Env) -> None:
    """Anyone may make a directory at /tmp/vmadmd.http (a VM's user too): it
    must not keep the daemon from starting, and what is in it is kept."""
    path = Path(env.socket)
    path.mkdir()
    (path / "something").write_text("not ours")
    env.start_daemon()
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    moved = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".moved-")]
    assert len(moved) == 1
    assert (moved[0] / "something").read_text() == "not ours"
    assert "moved to" in env.daemon_log(tail=None)


def test_an_unbindable_api_path_is_one_clear_line(env: Env) -> None:
    missing = env.tmp / "no-such-dir" / "vmadmd.sock"
    daemon = env.start_daemon("--socket", str(missing), wait=False)
    assert daemon.wait(timeout=20) == 1
    log = env.daemon_log(tail=None)
    assert f"vmadmd: cannot bind the API socket {missing}: No such file or directory" in log, log
    assert "Traceback" not in log, log
