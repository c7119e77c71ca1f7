"""Faults, bad input and load: the daemon stays up and loses nothing."""

from __future__ import annotations

import concurrent.futures
import json
import os
import random
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from harness.world import standin_binary
from vmadmd.errors import DaemonUnavailable
from vmadmd.vm.sockets import connect_unix

from . import rfb
from .conftest import Env, RunVm, bios_payload, lock_held


def raw(env: Env, data: bytes, timeout: float = 10) -> bytes:
    return env.raw_http(data, timeout)


def status_and_json(reply: bytes) -> tuple[int, Any]:
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def get(env: Env, target: str) -> tuple[int, Any]:
    return status_and_json(
        raw(env, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    )


def test_hostile_uuids_and_paths(env: Env) -> None:
    env.start_daemon()
    hostile = [
        "..",
        "%2e%2e",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "..%2F..%2Fetc%2Fpasswd",
        "%2Fetc%2Fpasswd",
        "x%00y",
        "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b%00",
        "0B3F1C2E-9A4D-4F5E-8B6A-1C2D3E4F5A6B",
        "a" * 4000,
        "%ff%fe",
        "%27%20OR%201%3D1%20--",
    ]
    for bad in hostile:
        for method, suffix in (("GET", ""), ("GET", "/info"), ("POST", "?action=reset")):
            request = f"{method} /vm/{bad}{suffix} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            reply = raw(env, request.encode() + b"\r\n")
            status, body = status_and_json(reply)
            assert 400 <= status < 500, (bad, status)
            assert body["error"]["code"], body
            assert body["error"]["message"], body
    # The events filter validates too.
    assert get(env, "/events?vm=..")[0] == 404
    assert get(env, "/ping")[0] == 200


def test_huge_bodies_and_query_strings(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    body = b"action=reset&" + b"x" * (1 << 20)
    reply = raw(env, (
        f"POST /vm/{uuid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body)  # fmt: skip
    status, err = status_and_json(reply)
    assert status == 413
    assert err["error"]["code"] == "PayloadTooLarge"
    status, err = get(env, f"/vm/{uuid}?type={'version,' * 1500}")
    assert status == 414
    assert err["error"]["code"] == "UriTooLong"
    # Past the head bound (32 KiB) the server refuses, still with a JSON 4xx.
    reply = raw(env, f"GET /vm/{uuid}?x={'y' * 40000} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    status, err = status_and_json(reply)
    assert (status, err["error"]["code"]) == (431, "HeadTooLarge"), reply[:300]
    assert get(env, "/ping")[0] == 200


def test_slow_client_is_cut_off_and_others_unaffected(env: Env) -> None:
    env.start_daemon("--client-timeout", "2")
    slow = connect_unix(os.path.dirname(env.socket), os.path.basename(env.socket))
    slow.settimeout(10)
    t0 = time.monotonic()
    closed_after = None
    for byte in b"GET /ping HTTP/1.1\r\nHost: x\r\n":
        try:
            slow.sendall(bytes([byte]))
        except OSError:
            closed_after = time.monotonic() - t0
            break
        t1 = time.monotonic()
        assert env.api("GET", "/ping")[0] == 200
        assert time.monotonic() - t1 < 0.5
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t1)))
        slow.setblocking(False)
        try:
            if slow.recv(1) == b"":
                closed_after = time.monotonic() - t0
                break
        except BlockingIOError:
            pass
        except ConnectionError:  # closed with a reset: cut off all the same
            closed_after = time.monotonic() - t0
            break
        finally:
            slow.setblocking(True)
        if time.monotonic() - t0 > 8:
            break
    slow.close()
    assert closed_after is not None
    assert closed_after < 5, closed_after


def test_thousands_of_idle_connections(env: Env) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    daemon = env.start_daemon("--client-timeout", "2")
    socks: list[socket.socket] = []
    try:
        directory, name = os.path.dirname(env.socket), os.path.basename(env.socket)
        socks.extend(connect_unix(directory, name) for _ in range(2000))
        t0 = time.monotonic()
        assert env.api("GET", "/ping")[0] == 200
        assert time.monotonic() - t0 < 2
        fds = len(os.listdir(f"/proc/{daemon.pid}/fd"))
        assert fds >= 2000
        # All of them are closed once idle past the bound.
        env.wait_for(
            lambda: len(os.listdir(f"/proc/{daemon.pid}/fd")) < 100, timeout=15, what="idle closed"
        )
    finally:
        for s in socks:
            s.close()


def test_corrupt_truncated_and_future_vm_json(env: Env, running_vm: RunVm) -> None:
    good = running_vm(bios_payload())
    broken = {}
    for kind in ("corrupt", "truncated", "future"):
        uuid = env.create(bios_payload(alias=kind))
        path = os.path.join(env.zones, uuid, "vm.json")
        text = Path(path).read_text()
        if kind == "corrupt":
            text = "{{{ not json"
        elif kind == "truncated":
            text = text[: len(text) // 2]
        else:
            data = json.loads(text)
            data["format_version"] = 99
            text = json.dumps(data)
        with open(path, "w") as f:
            f.write(text)
        broken[uuid] = text
    status, vms = env.api("GET", "/vms")
    assert status == 200
    states = {v["uuid"]: v for v in vms}
    for uuid in broken:
        assert states[uuid]["state"] == "broken"
        assert states[uuid]["error"]
        status, body = env.api("GET", f"/vm/{uuid}")
        assert status == 409
        assert body["error"]["code"] == "VmBroken"
        res = env.vmadm("get", uuid)
        assert res.returncode == 1
        assert "vm.json" in res.stderr
        res = env.vmadm("update", uuid, "ram=128")
        assert res.returncode == 1
    listing = env.vmadm("list", "-p", "-o", "uuid,state", check=True).stdout
    assert f"{good}:running" in listing
    assert env.api("GET", f"/vm/{good}", type="version")[0] == 200
    for uuid, text in broken.items():
        assert Path(env.zones, uuid, "vm.json").read_text() == text, "nothing overwritten"


def test_security_defaults(env: Env) -> None:
    env.start_daemon()
    st = os.stat(env.socket)
    assert st.st_mode & 0o777 == 0o600
    assert st.st_uid == os.getuid()
    uuid = env.create(bios_payload())
    env.vmadm("start", uuid, check=True)
    env.wait_for(lambda: env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"] != {}, what="vnc")
    assert env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]["host"] == "127.0.0.1"


def test_non_loopback_vnc_without_password_is_refused(env: Env) -> None:
    # Even with the password requirement opted out of, a console beyond
    # loopback needs one.
    env.extra_env["VMADMD_VNC_NO_PASSWORD"] = "1"
    env.start_daemon("--vnc-bind", "0.0.0.0")
    uuid = env.run_vm(bios_payload())
    env.wait_for(lambda: env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"] != {}, what="vnc")
    vnc = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]
    assert "not loopback" in vnc["error"], vnc
    # With a password it opens there.
    env.vmadm("update", uuid, "vnc_password=-", input="pw12345\n", check=True)
    env.vmadm("stop", uuid, "-F", check=True)
    env.vmadm("start", uuid, check=True)
    env.wait_for(lambda: "port" in env.api("GET", f"/vm/{uuid}", type="vnc")[1].get("vnc", {}),
                 what="listener")  # fmt: skip


def test_required_passwords_are_generated_and_enforced(env: Env) -> None:
    env.extra_env["VMADM_VNC_REQUIRE_PASSWORD"] = "1"
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    env.wait_for(lambda: "port" in env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"], what="vnc")
    vnc = env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]
    password = vnc["password"]
    assert len(password) == 8
    assert "vnc_password" not in env.get(uuid), "generated, never stored"
    sock = rfb.connect(vnc["host"], vnc["port"])
    try:
        with pytest.raises(rfb.RfbError, match="requires authentication"):
            rfb.handshake(sock)
    finally:
        sock.close()
    sock = rfb.connect(vnc["host"], vnc["port"])
    try:
        assert rfb.handshake(sock, password).width > 0
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("mode", "want"),
    [("garbage", {409, 504}), ("half", {504}), ("error", {409}), ("stall", {504})],
)
def test_faulty_qmp_peer(env: Env, mode: str, want: set[int]) -> None:
    env.start_daemon("--qmp-timeout", "1")
    healthy = env.create(bios_payload())
    env.vmadm("start", healthy, check=True)
    env.extra_env.update(VMADM_QEMU=standin_binary(), VMADMD_STANDIN_QMP=mode)
    faulty = env.create(bios_payload())
    env.vmadm("start", faulty, check=True)
    del env.extra_env["VMADMD_STANDIN_QMP"], env.extra_env["VMADM_QEMU"]
    env.wait_for(lambda: any(v["uuid"] == faulty and v["state"] == "running"
                             for v in env.api("GET", "/vms")[1]), what="picked up")  # fmt: skip
    for _ in range(3):
        t0 = time.monotonic()
        status, body = env.api("GET", f"/vm/{faulty}", type="version")
        assert status in want, (status, body)
        assert body["error"]["message"]
        assert time.monotonic() - t0 < 3
        env.wait_qmp(healthy)
    if mode == "error":
        assert "stand-in says no" in body["error"]["message"]
    assert env.api("GET", "/ping")[0] == 200


def test_daemon_killed_during_concurrent_requests(env: Env) -> None:
    daemon = env.start_daemon()
    uuids = [env.run_vm() for _ in range(3)]
    pids = {u: env.pid(u) for u in uuids}
    target = uuids[0]

    def hit(i: int) -> int:
        u = uuids[i % 3]
        action = random.choice(["info", "nmi", "reset", "screenshot"])
        try:
            if action == "info":
                return env.api("GET", f"/vm/{u}")[0]
            if action == "nmi":
                return env.api("POST", f"/vm/{u}", action="sysrq", request="nmi")[0]
            if action == "reset":
                return env.api("POST", f"/vm/{u}", action="reset")[0]
            return env.api("POST", f"/vm/{u}", action="sysrq", request="screenshot")[0]
        except DaemonUnavailable:
            return 0  # killed under it: the point of the test

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(hit, i) for i in range(20)]
        stop_status = env.api("POST", f"/vm/{target}", action="stop", timeout="3")[0]
        time.sleep(random.uniform(0.0, 0.2))
        daemon.send_signal(signal.SIGKILL)
        for f in futures:
            f.result()
    assert stop_status == 202
    daemon.wait()
    env.start_daemon()
    # The pending stop still happens; the others are untouched and served.
    env.wait_for(lambda: env.pid(target) is None, timeout=10, what="stop honoured")
    for u in uuids[1:]:
        assert env.pid(u) == pids[u]
        env.wait_qmp(u)
    vm = env.get(target)
    assert vm["state"] == "stopped"
    assert "transition_to" not in vm
    # No stale listener: every running VM has exactly one, on a port that answers.
    for u in uuids[1:]:
        port = env.api("GET", f"/vm/{u}", type="vnc")[1]["vnc"]["port"]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            assert s.recv(12) == b"RFB 003.008\n"


def test_a_held_vm_lock_never_slows_the_other_vms(env: Env) -> None:
    """One VM's lock held from outside (a `vmadm stop -F` suspended with Ctrl-Z,
    say) and hammered: that VM's requests fail with a 409 after their wait,
    every other VM's stops and exits settle on time."""
    env.start_daemon()
    stuck, other = env.run_vm(), env.run_vm()
    with lock_held(env, stuck):
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            hammer = [
                pool.submit(env.api, "POST", f"/vm/{stuck}", action="stop", timeout="5")
                for _ in range(12)
            ]
            env.wait_for(lambda: env.metric("vmadmd_api_requests_in_flight") >= 12, what="stuck")
            # The other VM: stopped, forced at its deadline (SeaBIOS ignores
            # ACPI) and settled on time, while the twelve wait.
            t0 = time.monotonic()
            status, body = env.api("POST", f"/vm/{other}", action="stop", timeout="1")
            assert status == 202, body
            assert time.monotonic() - t0 < 1.0
            env.wait_for(lambda: env.get(other)["state"] == "stopped", timeout=6, what="other")
            assert env.get(other)["last_exit"]["stage"] == "quit"
            answers = [f.result(timeout=30) for f in hammer]
        assert {status for status, _ in answers} == {409}
        assert answers[0][1]["error"]["code"] == "VmBusy"
    # Once the lock is free, the stuck VM is served again.
    assert env.api("POST", f"/vm/{stuck}", action="reset")[0] == 200
