"""Browser consoles: tokens (unit), and noVNC in real headless Chromium against a real guest."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import socket
import ssl
import struct
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmadmd.daemon.console import TokenStore

from . import rfb
from .conftest import Env, bios_payload, guest_payload
from .wsclient import Refused, WsClient

U1 = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_token_store_once_and_expiry() -> None:
    clock = FakeClock()
    store = TokenStore(ttl=30, clock=clock)
    token, _ = store.issue(U1)
    assert store.peek(token) == U1
    assert store.peek(token) == U1
    assert store.spend(token) == U1  # the screen
    assert store.spend(token) is None
    assert store.peek(token) == U1, "its serial channel is still unspent"
    assert store.spend(token, "serial") == U1
    assert store.spend(token, "serial") is None
    assert store.peek(token) is None
    assert store.owner(token) == U1  # may still ask for its VM's state
    late, _ = store.issue(U1)
    clock.now += 30.5
    assert store.spend(late) is None  # expired
    assert store.spend("no-such-token") is None
    other, _ = store.issue(U1)
    assert other != token
    assert len(other) >= 32


def console_url(env: Env, uuid: str) -> str:
    status, body = env.api("POST", f"/vm/{uuid}", action="console")
    assert status == 200, body
    url: str = body["url"]
    return url


def split_url(url: str) -> tuple[int, str]:
    """(port, path) of a console URL on 127.0.0.1."""
    parts = urllib.parse.urlsplit(url)
    assert parts.port is not None
    return parts.port, parts.path + (f"?{parts.query}" if parts.query else "")


async def open_ws(url: str, channel: str = "/ws", **kw: Any) -> WsClient:
    port, path = split_url(url)
    return await WsClient.connect(path + channel, port=port, subprotocols=("binary",), **kw)


async def ws_server_name(url: str, password: str, query: str = "") -> str:
    """Open the console WebSocket, pass qemu's VNC auth with ``password`` and
    read the RFB ServerInit name."""
    ws = await open_ws(url, "/ws" + query)
    assert ws.subprotocol == "binary"
    buf = b""

    async def need(n: int) -> bytes:
        nonlocal buf
        while len(buf) < n:
            data = await ws.receive(10)
            assert data is not None, (ws.close_code, ws.close_reason)
            buf += data
        out, buf = buf[:n], buf[n:]
        return out

    try:
        assert await need(12) == b"RFB 003.008\n"
        await ws.send(b"RFB 003.008\n")
        count = (await need(1))[0]
        assert 2 in await need(count)  # VNC auth: a password is required by default
        await ws.send(b"\x02")
        await ws.send(rfb.vnc_auth_response(password, await need(16)))
        assert await need(4) == b"\0\0\0\0"
        await ws.send(b"\x01")
        await need(4 + 16)
        (length,) = struct.unpack(">I", await need(4))
        return (await need(length)).decode()
    finally:
        await ws.close()


async def ws_status(url: str, channel: str = "/ws", **kw: Any) -> int:
    try:
        ws = await open_ws(url, channel, **kw)
    except Refused as err:
        return err.status if err.error["code"] else 0  # always a JSON error
    await ws.close()
    return 101


def fetch(url: str, tls: ssl.SSLContext | None = None) -> tuple[int, dict[str, str], bytes]:
    port, path = split_url(url)
    conn: http.client.HTTPConnection
    if tls is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_tokens_refused_and_bound_to_their_vm(env: Env) -> None:
    env.start_daemon("--console-listen", "127.0.0.1:0", "--console-token-ttl", "2")
    a = env.create(bios_payload(alias="vm-a"))
    b = env.create(bios_payload(alias="vm-b"))
    for u in (a, b):
        env.vmadm("start", u, check=True)
        env.wait_qmp(u)
    url_a = console_url(env, a)
    # The token opens A's console, whatever the request says about B.
    password = env.api("GET", f"/vm/{a}", type="vnc")[1]["vnc"]["password"]
    assert asyncio.run(ws_server_name(url_a, password, "?vm=" + b)) == "QEMU (vm-a)"
    # Used once: refused the second time.
    assert asyncio.run(ws_status(url_a)) == 403
    # Expired: refused.
    url = console_url(env, b)
    time.sleep(2.5)
    assert asyncio.run(ws_status(url)) == 403
    # Unknown and missing tokens.
    base = url_a.rsplit("/", 1)[0]
    assert asyncio.run(ws_status(base + "/not-a-token")) == 403
    # A stopped VM gets no token.
    env.vmadm("stop", b, "-F", check=True)
    assert env.api("POST", f"/vm/{b}", action="console")[0] == 409
    # The CLI prints the URL.
    res = env.vmadm("console", "--web", a)
    assert res.returncode == 0
    assert res.stdout.startswith("http://127.0.0.1:")
    token = res.stdout.strip().rsplit("/", 1)[1]
    log = env.daemon_log(tail=None)
    assert token[:6] in log
    assert token not in log, "tokens are never logged whole"
    assert url_a.rsplit("/", 1)[1] not in log


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--disable-quic", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1024,768",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_state(driver: Any, want: str, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = driver.execute_script("return document.body.dataset.state || ''")
        if state.startswith(want):
            return str(state)
        time.sleep(0.1)
    raise AssertionError(f"console state {state!r}, wanted {want!r}")


TERMINAL_TEXT = """
const b = window.term.buffer.active;
const out = [];
for (let i = 0; i < b.length; i++) {
  const l = b.getLine(i);
  if (l) out.push(l.translateToString(true));
}
return out.join("\\n");
"""


def wait_serial(driver: Any, text: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        seen = str(driver.execute_script(TERMINAL_TEXT))
        if text in seen:
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} not on the serial pane: {seen[-500:]!r}")


CANVAS_STATS = """
const c = document.querySelector('#screen canvas');
if (!c) return null;
const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
let lit = 0;
for (let i = 0; i < d.length; i += 4) { if (d[i] + d[i+1] + d[i+2] > 96) lit++; }
return [c.width, c.height, lit];
"""


def test_novnc_console_in_chromium(env: Env, guest: dict[str, str], browser: Any) -> None:
    env.start_daemon("--console-listen", "127.0.0.1:0")
    payload = guest_payload(guest, alias="web-guest")
    payload["qemu_extra_opts"] = payload["qemu_extra_opts"].replace(
        "console=ttyS0", "console=tty0 console=ttyS0"
    )
    uuid = env.run_vm(payload, ready=True)

    browser.get(console_url(env, uuid))
    assert browser.title == "Console: web-guest"
    wait_state(browser, "connected")
    assert browser.find_element("id", "uuid").text == uuid
    # The guest's console text is on the canvas: a fair share of lit pixels.
    deadline = time.monotonic() + 20
    stats = None
    while time.monotonic() < deadline:
        stats = browser.execute_script(CANVAS_STATS)
        if stats and stats[2] > 2000:
            break
        time.sleep(0.2)
    assert stats is not None
    assert stats[0] >= 640, stats
    assert stats[2] > 2000, stats
    shot = env.tmp / "console.png"
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 5000
    assert browser.find_element("id", "cad").is_enabled()
    # The serial console beside it (xterm.js): the history first, then a shell.
    wait_serial(browser, "VMTEST-READY")
    browser.find_element("css selector", ".xterm-helper-textarea").send_keys("echo $((3*4))-web\n")
    wait_serial(browser, "12-web")
    metrics = env.client().request("GET", "/metrics")[1]["raw"]
    assert "vmadmd_console_sessions 1.0" in metrics
    browser.find_element("id", "cad").click()  # noVNC's sendCtrlAltDel, through the relay

    # The same link a second time is refused.
    browser.get(browser.current_url)
    assert "invalid, used or expired" in browser.page_source

    # qemu exits: the session closes with a clear message.
    browser.get(console_url(env, uuid))
    wait_state(browser, "connected")
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert wait_state(browser, "disconnected", timeout=10) == "disconnected: the VM has stopped"
    serial = browser.execute_script("return document.body.dataset.serial || ''")
    deadline = time.monotonic() + 10
    while serial != "closed: qemu crashed" and time.monotonic() < deadline:
        time.sleep(0.1)
        serial = browser.execute_script("return document.body.dataset.serial || ''")
    assert serial == "closed: qemu crashed"


# -- the listener under attack -----------------------------------------------------


def test_page_headers_origin_and_a_hostile_alias(env: Env) -> None:
    env.start_daemon("--console-listen", "127.0.0.1:0")
    hostile = "</script><!--<script>alert(1)</script>&\u2028"
    # U+2028 is refused in an alias now; a vm.json from before may hold it.
    uuid = env.create(bios_payload(alias="placeholder"))
    vm_json = Path(env.zones) / uuid / "vm.json"
    vm_json.write_text(vm_json.read_text().replace("placeholder", hostile))
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    url = console_url(env, uuid)

    status, headers, raw_body = fetch(url)
    assert status == 200
    body = raw_body.decode()
    assert headers["X-Frame-Options"] == "DENY"
    csp = headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce is not None
    assert f'nonce="{nonce.group(1)}"' in body
    # The alias is data: it cannot close the element or open another.
    blob = re.search(r'<script type="application/json" id="cfg">(.*?)</script>', body, re.S)
    assert blob is not None
    assert json.loads(blob.group(1))["name"] == hostile
    assert body.count("<script") == 3  # the page's own, and no more

    # A WebSocket from another page's origin is refused; the token stays unspent.
    assert asyncio.run(ws_status(url, origin="http://evil.example")) == 403
    own = url.split("/console/")[0]
    assert asyncio.run(ws_status(url, origin=own)) == 101


def test_bad_tokens_are_warned_about_sparingly(env: Env) -> None:
    env.start_daemon("--console-listen", "127.0.0.1:0")
    uuid = env.run_vm()
    base = console_url(env, uuid).rsplit("/", 1)[0]
    for i in range(50):
        assert asyncio.run(ws_status(f"{base}/bad-token-{i}")) == 403
    warnings = [
        line for line in env.daemon_log(tail=None).splitlines()
        if "refused" in line and '"level": 40' in line
    ]  # fmt: skip
    assert 1 <= len(warnings) <= 2, warnings


def test_connections_are_capped_per_client_and_idle_ones_let_go(env: Env) -> None:
    env.start_daemon("--console-listen", "127.0.0.1:0", "--console-max-per-client", "4",
                     "--console-keepalive", "1")  # fmt: skip
    uuid = env.run_vm()
    url = console_url(env, uuid)
    port = int(url.split(":")[2].split("/")[0])
    held = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(4)]
    try:
        extra = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert extra.recv(1) == b"", "the fifth connection from one address is closed"
        extra.close()
        # An idle keep-alive connection is let go after --console-keepalive.
        keep = held[0]
        keep.sendall(b"GET /console/x/state HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        data = b""
        while chunk := keep.recv(65536):
            data += chunk
        assert data.startswith(b"HTTP/1.1 403")
        assert time.monotonic() - t0 < 4
    finally:
        for s in held:
            s.close()
    # Once they are gone, the same address is served again.
    assert asyncio.run(ws_status(console_url(env, uuid))) == 101


def test_tls_consoles_and_no_clear_text_on_the_network(env: Env) -> None:
    cert, key = env.tmp / "cert.pem", env.tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    env.start_daemon("--console-listen", "127.0.0.1:0", "--console-tls-cert", str(cert),
                     "--console-tls-key", str(key))  # fmt: skip
    uuid = env.run_vm()
    url = console_url(env, uuid)
    assert url.startswith("https://127.0.0.1:")

    ctx = ssl.create_default_context(cafile=str(cert))
    ctx.check_hostname = False
    status, headers, body = fetch(url, ctx)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert b"/novnc/core/rfb.js" in body
    # The WebSocket over TLS: qemu's RFB greeting through it.
    port, path = split_url(url)

    async def greeting() -> bytes | None:
        ws = await WsClient.connect(path + "/ws", port=port, tls=ctx, subprotocols=("binary",))
        try:
            return await ws.receive(10)
        finally:
            await ws.close()

    assert asyncio.run(greeting()) == b"RFB 003.008\n"
    # Plain HTTP on a non-loopback address: refused at start, unless insisted on.
    env.stop_daemon()
    refused = env.start_daemon("--console-listen", "0.0.0.0:0", wait=False)
    assert refused.wait(timeout=20) == 1
    assert "in clear" in env.daemon_log(tail=None)
    env.start_daemon("--console-listen", "0.0.0.0:0", "--console-insecure")


def test_both_channels_end_after_the_idle_timeout(env: Env) -> None:
    """The screen and the serial console of a token close alike, with the
    reason, once the viewer typed nothing for --console-idle-timeout; typing
    keeps a channel open."""
    env.start_daemon("--console-listen", "127.0.0.1:0", "--console-idle-timeout", "1.5")
    uuid = env.run_vm()
    url = console_url(env, uuid)

    async def until_closed(ws: WsClient, typing: bool) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 15:
            if typing and time.monotonic() - t0 < 2.5:
                await ws.send(b" ")
            try:
                if await ws.receive(0.5) is None:
                    break
            except TimeoutError:
                continue
        assert ws.close_reason == "idle timeout", (ws.close_code, ws.close_reason)
        return time.monotonic() - t0

    async def scenario() -> tuple[float, float]:
        serial = await open_ws(url, "/serial")
        screen = await open_ws(url, "/ws")
        try:
            took = await asyncio.gather(until_closed(serial, True), until_closed(screen, False))
        finally:
            await serial.close()
            await screen.close()
        return took[0], took[1]

    serial_took, screen_took = asyncio.run(scenario())
    assert 1.2 < screen_took < 4, screen_took
    assert 3.5 < serial_took < 7, serial_took  # typed for 2.5 s, then idle


def test_static_files_never_leave_their_directory(env: Env) -> None:
    """noVNC's and xterm.js's files: served with their type; no link followed,
    no ``..``, no encoded slash, nothing but regular files; JSON 404 otherwise."""
    novnc = env.tmp / "novnc"
    (novnc / "core").mkdir(parents=True)
    (novnc / "core" / "rfb.js").write_text("export default 1;\n")
    (novnc / "secret-link").symlink_to("/etc/passwd")
    (novnc / "dir-link").symlink_to(novnc / "core")
    os.mkfifo(novnc / "fifo")
    (env.tmp / "outside.js").write_text("no")
    env.start_daemon("--console-listen", "127.0.0.1:0", "--novnc-dir", str(novnc))
    uuid = env.run_vm()
    base = console_url(env, uuid).split("/console/")[0]
    status, headers, body = fetch(base + "/novnc/core/rfb.js")
    assert (status, body) == (200, b"export default 1;\n")
    assert headers["Content-Type"] == "text/javascript"
    for path in (
        "/novnc/secret-link",
        "/novnc/dir-link/rfb.js",
        "/novnc/fifo",
        "/novnc/core",
        "/novnc/core/",
        "/novnc/../outside.js",
        "/novnc/%2E%2E/outside.js",
        "/novnc/core%2F..%2F..%2Foutside.js",
        "/novnc/nothing.js",
    ):
        status, headers, body = fetch(base + path)
        assert status == 404, (path, status, body)
        assert json.loads(body)["error"]["code"] == "NotFound", (path, body)
