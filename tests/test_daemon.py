"""vmadmd core against real qemu: routes, errors, VM events, restarts, wedged qemu."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from typing import Any

import pytest

from vmadmd.cli.client import ApiError, Client
from vmadmd.daemon.supervisor import INFO_TYPES
from vmadmd.errors import DaemonUnavailable, VmadmError
from vmadmd.vm.sockets import connect_unix

from .conftest import Env, RunVm, bios_payload, frozen_and_other, guest_payload

U = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"


def read_events(
    env: Env,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 20,
    last_event_id: int = 0,
    **params: str,
) -> list[dict[str, Any]]:
    """Follow GET /events until ``until(events)`` holds (raw socket, bounded)."""
    sock = connect_unix(os.path.dirname(env.socket), os.path.basename(env.socket))
    sock.settimeout(0.5)
    query = "&".join(f"{k}={v}" for k, v in params.items())
    headers = f"Last-Event-ID: {last_event_id}\r\n"  # 0: replay the history too
    path = "/events" + (f"?{query}" if query else "")
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode())
    buf = b""
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            buf += chunk
            for line in buf.split(b"\n"):
                if line.startswith(b"data: "):
                    event = json.loads(line[6:])
                    if event not in events:
                        events.append(event)
            if until(events):
                return events
    finally:
        sock.close()
    raise AssertionError(f"events not as expected: {events}")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    assert length == 13
    crc = struct.unpack(">I", data[29:33])[0]
    assert zlib.crc32(data[12:29]) == crc
    w, h = struct.unpack(">II", data[16:24])
    return w, h


def ppm_size(data: bytes) -> tuple[int, int]:
    parts = data.split(maxsplit=4)
    assert parts[0] == b"P6"
    assert parts[3] == b"255"
    w, h = int(parts[1]), int(parts[2])
    assert len(parts[4]) == w * h * 3
    return w, h


def test_info_screenshot_reset_nmi_on_real_guest(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    uuid = running_vm(guest_payload(guest, disks=[{"size": 8}], nics=[{}]), ready=True)

    status, info = env.api("GET", f"/vm/{uuid}")
    assert status == 200
    assert sorted(info) == sorted(INFO_TYPES)
    assert info["version"]["qemu"]["major"] >= 7
    assert info["status"]["status"] == "running"
    assert [c["cpu-index"] for c in info["cpus"]] == [0]
    # TCG here; KVM is built into Debian's qemu (present), not in use (enabled).
    assert info["kvm"] == {"enabled": False, "present": True}
    assert any(b["device"] == "" or "disk0" in json.dumps(b) for b in info["block"])
    assert any(c["label"] == "serial0" for c in info["chardev"])
    assert info["pci"][0]["devices"]
    assert isinstance(info["blockstats"], list)
    assert info["vnc"]["host"] == "127.0.0.1"
    assert info["vnc"]["port"] > 0
    for t in INFO_TYPES:
        status, one = env.api("GET", f"/vm/{uuid}", type=t)
        assert status == 200
        assert list(one) == [t]
    # SmartOS spellings.
    status, two = env.api("GET", f"/vm/{uuid}/info", types="version,status")
    assert status == 200
    assert sorted(two) == ["status", "version"]
    res = env.vmadm("info", uuid, "version,vnc")
    assert res.returncode == 0
    assert sorted(json.loads(res.stdout)) == ["version", "vnc"]
    # vmadm prints the daemon's ?pretty=true body as it comes: the same text
    # as its own json.dumps(indent=2, sort_keys=True) of the answer, on the
    # argparse path (an option) as on the plain one.
    status, answer = env.api("GET", f"/vm/{uuid}", type="version,kvm")
    assert status == 200
    printed = json.dumps(answer, indent=2, sort_keys=True) + "\n"
    assert env.vmadm("info", uuid, "version,kvm").stdout == printed
    assert env.vmadm("info", "--", uuid, "version,kvm").stdout == printed
    status, raw = env.client().request(
        "GET", f"/vm/{uuid}", {"type": "kvm", "pretty": "true"}, raw=True
    )
    assert raw == (json.dumps({"kvm": answer["kvm"]}, indent=2, sort_keys=True) + "\n").encode()
    # Errors and bad input: still one line, exit 1, on the plain path.
    res = env.vmadm("info", uuid.upper())
    assert (res.returncode, res.stdout) == (1, "")
    assert res.stderr.startswith("vmadm: invalid VM uuid")
    assert res.stderr.count("\n") == 1

    # Screenshot: a valid PPM of the guest's real (VGA text mode) screen.
    res = env.vmadm("sysrq", uuid, "screenshot")
    assert res.returncode == 0, res.stderr
    ppm = (env.runtime(uuid) / "vm.ppm").read_bytes()
    assert res.stdout.strip() == str(env.runtime(uuid) / "vm.ppm")
    assert ppm_size(ppm) == (720, 400)
    png = _get_png(env, uuid)
    assert png_size(png) == (720, 400)

    assert env.vmadm("sysrq", uuid, "nmi").returncode == 0

    # Reset: qemu reports it, and the guest really boots again.
    res = env.vmadm("reboot", uuid, "-F")
    assert res.returncode == 0, res.stderr
    env.wait_console(uuid, count=2)
    events = read_events(
        env,
        lambda evs: (
            any(e.get("event") == "RESET" for e in evs) and any(e["type"] == "reset" for e in evs)
        ),
        vm=uuid,
    )
    assert all(e["vm"] == uuid for e in events)
    assert env.get(uuid)["state"] == "running"


def _get_png(env: Env, uuid: str) -> bytes:
    data = env.raw_http(
        f"GET /vm/{uuid}/screenshot.png HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    )
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"image/png" in head
    return body


def test_error_statuses(env: Env) -> None:
    env.start_daemon("--qmp-timeout", "2")
    stopped = env.create(bios_payload())
    running = env.run_vm(bios_payload())

    cases = [
        ("GET", f"/vm/{running}", {"type": "frobs"}, 400),
        ("GET", f"/vm/{running}", {"type": "version,frobs"}, 400),
        ("POST", f"/vm/{running}", {"action": "frobnicate"}, 400),
        ("POST", f"/vm/{running}", {}, 400),
        ("POST", f"/vm/{running}", {"action": "sysrq", "request": "crash"}, 400),
        ("POST", f"/vm/{running}", {"action": "sysrq"}, 400),
        ("GET", f"/vm/{U}", {}, 404),
        ("POST", f"/vm/{U}", {"action": "reset"}, 404),
        ("GET", "/vm/not-a-uuid", {}, 404),
        ("GET", "/vm/..%2F..%2Fetc", {}, 404),
        ("GET", "/vm/" + U.upper(), {}, 404),
        ("GET", "/nowhere", {}, 404),
        ("DELETE", f"/vm/{running}", {}, 405),
        ("GET", f"/vm/{stopped}", {}, 409),
        ("POST", f"/vm/{stopped}", {"action": "reset"}, 409),
        ("POST", f"/vm/{stopped}", {"action": "sysrq", "request": "nmi"}, 409),
        ("GET", f"/vm/{stopped}/screenshot.png", {}, 409),
    ]
    for method, path, params, want in cases:
        status, body = env.api(method, path, **params)
        assert status == want, (method, path, params, status, body)
        assert set(body["error"]) == {"code", "message"}
        assert body["error"]["message"]

    # A form-encoded body, as SmartOS clients send it.
    sock = connect_unix(os.path.dirname(env.socket), os.path.basename(env.socket))
    body = b"action=sysrq&request=nmi"
    sock.sendall(
        f"POST /vm/{running} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Type: application/x-www-form-urlencoded\r\n"
        f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    reply = sock.recv(65536)
    sock.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply

    # The CLI: one line, exit 1.
    res = env.vmadm("info", U)
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1
    res = env.vmadm("info", stopped)
    assert res.returncode == 1
    assert "not running" in res.stderr


def test_cli_without_daemon(env: Env) -> None:
    uuid = env.create(bios_payload())
    for args in (["info", uuid], ["sysrq", uuid, "nmi"], ["reboot", "-F", uuid]):
        res = env.vmadm(*args)
        assert res.returncode == 1
        assert res.stderr.strip() == (
            f"vmadm: vmadmd is not running (socket {env.socket}: No such file or directory)"
        )


def test_vm_events_seen_within_a_second(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())

    def daemon_state() -> str:
        vms = env.api("GET", "/vms")[1]
        return str(next(v["state"] for v in vms if v["uuid"] == uuid))

    assert daemon_state() == "stopped"
    env.vmadm("start", uuid, check=True)
    took = env.wait_for(lambda: daemon_state() == "running", timeout=5, what="start seen")
    assert took < 1.0
    pid = env.pid(uuid)
    assert pid is not None
    env.wait_for(lambda: env.api("GET", f"/vm/{uuid}", type="vnc")[0] == 200, what="vnc info")
    os.kill(pid, signal.SIGKILL)
    took = env.wait_for(lambda: daemon_state() == "stopped", timeout=5, what="exit seen")
    assert took < 1.0
    status, _ = env.api("GET", f"/vm/{uuid}", type="version")
    assert status == 409
    events = read_events(env, lambda evs: any(e["type"] == "exited" for e in evs), vm=uuid)
    types = [e["type"] for e in events]
    assert types.index("started") < types.index("exited")
    exited = next(e for e in events if e["type"] == "exited")
    # SIGKILL: qemu went away without a shutdown.
    assert exited["reason"] == "crash"
    assert env.get(uuid)["last_exit"]["reason"] == "crash"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_daemon_restart_never_stops_vms(env: Env, sig: int) -> None:
    a = env.create(bios_payload())
    b = env.create(bios_payload(vnc_port=-1))
    for u in (a, b):
        env.vmadm("start", u, check=True)
    pids = {u: env.pid(u) for u in (a, b)}
    daemon = env.start_daemon()
    env.wait_qmp(a)
    rc = env.stop_daemon(daemon, sig)
    assert rc == (0 if sig == signal.SIGTERM else -signal.SIGKILL)
    assert {u: env.pid(u) for u in (a, b)} == pids
    env.start_daemon()
    for u in (a, b):
        env.wait_qmp(u)
    assert {u: env.pid(u) for u in (a, b)} == pids
    assert env.api("GET", f"/vm/{b}", type="vnc")[1] == {"vnc": {}}


def test_a_restarted_daemons_first_listing_has_its_running_vms(env: Env) -> None:
    """The first ``GET /vms`` a restarted daemon answers already has every
    running VM as running (it waits for the start-up sweep), and a VM's own
    route answers for it too."""
    uuids = [env.create(bios_payload()) for _ in range(3)]
    for u in uuids:
        env.vmadm("start", u, check=True)
    client = env.client(timeout=5)
    for _ in range(3):
        env.start_daemon(wait=False)
        deadline = time.monotonic() + 15
        while True:
            try:
                status, vms = client.request("GET", "/vms")
                break
            except DaemonUnavailable:
                assert time.monotonic() < deadline, env.daemon_log()
                time.sleep(0.001)
        assert status == 200
        assert {vm["uuid"]: vm["state"] for vm in vms} == dict.fromkeys(uuids, "running")
        assert env.api("GET", f"/vm/{uuids[-1]}", type="vnc")[0] == 200
        env.stop_daemon()


def test_socket_is_private_stale_replaced_and_second_daemon_refused(env: Env) -> None:
    # A stale socket (nobody listening) is replaced.
    import socket as socketlib

    stale = socketlib.socket(socketlib.AF_UNIX)
    if len(env.socket) < 108:
        stale.bind(env.socket)
    stale.close()
    env.start_daemon()
    assert os.stat(env.socket).st_mode & 0o777 == 0o600
    second = env.start_daemon(wait=False)
    assert second.wait(timeout=20) == 1
    assert env.api("GET", "/ping")[0] == 200


def test_wedged_qemu_gives_504_and_others_keep_answering(env: Env) -> None:
    frozen, other, pid = frozen_and_other(env)
    try:
        results: dict[str, Any] = {}

        def hit_frozen() -> None:
            t0 = time.monotonic()
            results["frozen"] = (
                env.api("GET", f"/vm/{frozen}", type="version")[0],
                time.monotonic() - t0,
            )

        t = threading.Thread(target=hit_frozen)
        t.start()
        latencies = []
        while t.is_alive():
            t0 = time.monotonic()
            assert env.api("GET", f"/vm/{other}", type="version")[0] == 200
            latencies.append(time.monotonic() - t0)
        t.join()
        status, took = results["frozen"]
        assert status == 504
        assert took < 2.5
        assert max(latencies) < 0.5, latencies
        # Still wedged: a reset answers 504 too, the daemon stays up.
        assert env.api("POST", f"/vm/{frozen}", action="reset")[0] == 504
    finally:
        os.kill(pid, signal.SIGCONT)
    env.wait_for(
        lambda: env.api("GET", f"/vm/{frozen}", type="version")[0] == 200,
        timeout=10,
        what="recovery",
    )


def test_openapi_documents_every_route(env: Env) -> None:
    env.start_daemon()
    status, doc = env.api("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.")
    from vmadmd.daemon.api import Api
    from vmadmd.daemon.metrics import Metrics

    class _Stub:
        vms: dict[str, Any]

    api = Api(_Stub(), None, dict, Metrics())  # type: ignore[arg-type]
    routes = {(m.lower(), path) for path, methods in api.routes.items() for m in methods}
    documented = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    # Every documented route answers (not the router's 404/405); a disk,
    # for the snapshot routes.
    uuid = env.create(bios_payload(disks=[{"size": 1}]))
    for method, path in documented:
        if path == "/events":
            continue
        concrete = path.replace("{uuid}", uuid)
        if "{name}" in path:  # a snapshot of its own for each method
            env.api("POST", f"/vm/{uuid}/snapshots", name=method)
            concrete = concrete.replace("{name}", method)
        if path.endswith("/snapshots") and method == "post":
            status, body = env.api("POST", concrete, name="new")
        elif path.endswith("/snapshots/{name}") and method == "post":
            status, body = env.api("POST", concrete, action="rollback")
        elif path.endswith("/qmp"):
            try:
                status, body = env.client().request(
                    "POST", concrete, body={"execute": "query-status"}
                )
            except ApiError as err:
                status, body = err.status, err.message
        elif path == "/vms/incoming":  # a VM arriving by migration: this one exists
            arriving = {"uuid": uuid, "ram": 64, "vcpus": 1, "disks": []}
            try:
                status, body = env.client().request(
                    "POST", concrete, body={"vm": arriving, "disk_sizes": [], "receiver": 0}
                )
            except ApiError as err:
                status, body = err.status, err.message
        elif path == "/vm/{uuid}/incoming" and method == "post":
            status, body = env.api("POST", concrete, action="abort")  # 409: not arriving
        elif path == "/vms" and method == "post":
            status, body = env.api("POST", concrete, action="stop", timeout="5")
        elif method == "post":
            status, body = env.api("POST", concrete, action="reset")
        else:
            status, body = env.api(method.upper(), concrete)
        assert status in (200, 201, 202, 409), (method, path, status, body)
    # /events replays the history: the autoboot run of this daemon is in it.
    events = read_events(env, lambda evs: any(e["type"] == "autoboot_done" for e in evs))
    assert next(e for e in events if e["type"] == "autoboot_done")["state"] in ("done", "skipped")


def test_vm_restarted_while_its_exit_is_settled_is_picked_up(env: Env, running_vm: RunVm) -> None:
    """A qemu booted while the daemon settles the previous exit is not lost.

    (Found by the soak: a start racing the daemon's handling of the previous
    exit left the new qemu unwatched.)  Made deterministic by holding the
    VM's lock, so the daemon's settling waits while the new qemu starts.
    """
    from vmadmd.vm.config import VmSettings
    from vmadmd.vm.layer import VmLayer

    uuid = running_vm(bios_payload())
    layer = VmLayer(VmSettings(zones_root=env.zones, accel="tcg"))
    with layer.store.lock(uuid):
        pid = env.pid(uuid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        env.wait_for(lambda: env.pid(uuid) is None, timeout=5, what="gone")
        # The daemon has seen the exit (and now waits for the lock to settle it).
        env.wait_for(lambda: env.metric("vmadmd_vms", state="stopped") == 1, what="exit seen")
        # `vmadm start` while the daemon waits: the vm.json event arrives mid-settle.
        new_pid = layer.start_locked(uuid)
    env.wait_qmp(uuid)
    assert env.pid(uuid) == new_pid
    vms = env.api("GET", "/vms")[1]
    assert [v["state"] for v in vms if v["uuid"] == uuid] == ["running"]


def test_requests_waiting_on_a_wedged_qemu_fail_fast_when_it_dies(env: Env) -> None:
    """A command waiting for a reconnect gets a 409 as soon as the VM is gone,
    not a 504 at its timeout (found by the soak)."""
    env.start_daemon("--qmp-timeout", "4")
    uuid = env.run_vm(bios_payload())
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    assert env.api("GET", f"/vm/{uuid}", type="version")[0] == 504  # now wedged
    results: list[tuple[int, float]] = []

    def waiting() -> None:
        t0 = time.monotonic()
        results.append((env.api("GET", f"/vm/{uuid}", type="version")[0], time.monotonic() - t0))

    t = threading.Thread(target=waiting)
    t.start()
    # That request is in the daemon, waiting (the scrape itself is the other one).
    env.wait_for(lambda: env.metric("vmadmd_api_requests_in_flight") >= 2, what="waiting")
    os.kill(pid, signal.SIGKILL)
    t.join(timeout=10)
    status, took = results[0]
    assert status == 409, status
    assert took < 2.5, took


def test_a_vm_started_unseen_is_looked_for_on_a_miss(env: Env) -> None:
    """The API looks again before saying "not running" (a qemu started a moment
    ago, or during the start-up sweep, may not have reached the daemon yet).
    Made deterministic by starting qemu without the vm.json write the
    daemon's inotify would see."""
    from vmadmd.vm.cgroup import Placement
    from vmadmd.vm.config import VmSettings
    from vmadmd.vm.layer import VmLayer

    env.start_daemon()
    uuid = env.create(bios_payload())
    layer = VmLayer(VmSettings(zones_root=env.zones, accel="tcg"))
    vm = layer.store.load(uuid)
    layer._spawn(vm, layer.store.paths(uuid), vm["zone_uid"], Placement())
    status, body = env.api("GET", f"/vm/{uuid}", type="status")
    assert status == 200, body
    assert body["status"]["status"] == "running"


@pytest.fixture
def impostor(tmp_path: Any) -> Any:
    """A socket served by an unprivileged user (nobody), in a world-writable
    directory like /tmp; what it receives lands in a file beside it."""
    import tempfile

    shared = tempfile.mkdtemp(prefix="vmadmd-impostor-")
    os.chmod(shared, 0o1777)
    path = os.path.join(shared, "api.sock")
    got = os.path.join(shared, "got")
    server = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "socat", "-u", f"UNIX-LISTEN:{path},fork,mode=777", f"OPEN:{got},creat,append"],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "the impostor did not bind"
        time.sleep(0.02)
    try:
        yield path, got
    finally:
        server.terminate()
        server.wait(timeout=10)
        import shutil

        shutil.rmtree(shared, ignore_errors=True)


def test_an_impostor_socket_is_never_believed_and_is_replaced(env: Env, impostor: Any) -> None:
    path, got = impostor
    uuid = env.create(bios_payload())
    res = env.vmadm("info", uuid, extra_env={"VMADMD_SOCKET": path})
    assert res.returncode == 1
    assert res.stderr.strip() == f"vmadm: refusing {path}: it is served by uid 65534, not by root"
    # The daemon replaces it (it is not another vmadmd), and serves there.
    env.start_daemon("--socket", path, wait=False)

    def answers() -> bool:
        try:
            return Client(path).request("GET", "/ping")[0] == 200
        except VmadmError:
            return False

    env.wait_for(answers, what="the daemon on the impostor's path")
    assert os.stat(path).st_uid == 0
    assert "replacing it" in env.daemon_log(tail=None)
    # Not a byte reached the impostor (vmadm checked its peer first).
    assert not os.path.exists(got) or os.path.getsize(got) == 0
