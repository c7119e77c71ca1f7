"""Running as a service: sd_notify, JSON logs, metrics, the event stream."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from vmadmd.vm.sockets import connect_unix

from .conftest import Env, RunVm, bios_payload
from .conftest import _bin as env_bin
from .test_daemon import read_events


def raw_request(env: Env, target: str, headers: str = "") -> tuple[str, bytes]:
    data = env.raw_http(
        f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}\r\n".encode()
    )
    head, _, body = data.partition(b"\r\n\r\n")
    return head.decode(), body


def test_sd_notify_ready_watchdog_stopping(env: Env) -> None:
    path = str(env.tmp / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.settimeout(10)
    try:
        uuid = env.create(bios_payload())
        env.vmadm("start", uuid, check=True)
        daemon = env.start_daemon(
            wait=False, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        )
        ready = notify.recv(4096).decode()
        assert "READY=1" in ready
        # READY comes once the API answers and the start-up sweep is done.
        status, vms = env.api("GET", "/vms")
        assert status == 200
        assert vms[0]["state"] == "running"
        pings = [notify.recv(4096).decode() for _ in range(3)]
        assert all(p == "WATCHDOG=1" for p in pings)
        daemon.send_signal(signal.SIGTERM)
        seen = []
        while "STOPPING=1" not in seen:
            seen.append(notify.recv(4096).decode())
        assert daemon.wait(timeout=15) == 0
        assert env.get(uuid)["state"] == "running"
    finally:
        notify.close()


def test_json_logs_carry_fields_and_request_ids(env: Env) -> None:
    env.start_daemon()  # --log-level debug, default JSON format
    uuid = env.run_vm(bios_payload())
    head, _ = raw_request(env, f"/vm/{uuid}?type=version", "X-Request-Id: trace-me-42\r\n")
    assert head.startswith("HTTP/1.1 200")
    assert "X-Request-Id: trace-me-42" in head
    head, _ = raw_request(env, "/ping")
    assert "X-Request-Id: " in head
    env.wait_for(lambda: "trace-me-42" in env.daemon_log(tail=None), what="the request logged")
    lines = env.daemon_log(tail=None).splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    assert records
    for rec in records:
        assert {"time", "level", "msg", "name", "pid", "hostname"} <= set(rec), rec
        assert isinstance(rec["level"], int)
    traced = [r for r in records if r.get("req_id") == "trace-me-42"]
    assert any("qmp --> query-version" in r["msg"] for r in traced), traced
    assert any(r.get("vm") == uuid for r in traced)


def test_password_never_logged(env: Env, running_vm: RunVm) -> None:
    secret = "Zq9pw7x"
    uuid = running_vm(bios_payload(vnc_password=secret))
    env.wait_for(lambda: env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"] != {}, what="vnc")
    assert env.api("GET", f"/vm/{uuid}", type="vnc")[1]["vnc"]["password"] == secret
    env.vmadm("update", uuid, "vnc_password=Other12", check=True)
    env.wait_for(
        lambda: env.daemon_log(tail=None).count("set_password ok") >= 2, what="the change applied"
    )
    log = env.daemon_log(tail=None)
    assert "set_password" in log, "the QMP wire is logged at debug"
    assert secret not in log
    assert "Other12" not in log


def metric(families: dict[str, Any], name: str, **labels: str) -> float:
    total = 0.0
    for sample in families[name].samples:
        if sample.name in (name, name + "_total") and all(
            sample.labels.get(k) == v for k, v in labels.items()
        ):
            total += sample.value
    return total


def test_metrics_count_real_requests_and_qmp(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm()
    env.create(bios_payload())
    for _ in range(3):
        assert env.api("GET", f"/vm/{uuid}", type="version")[0] == 200
    assert env.api("GET", f"/vm/{uuid}", type="frobs")[0] == 400
    head, body = raw_request(env, "/metrics")
    assert head.startswith("HTTP/1.1 200")
    assert "text/plain" in head
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert metric(families, "vmadmd_api_requests", route="/vm/{uuid}", status="200") >= 3
    assert metric(families, "vmadmd_api_requests", route="/vm/{uuid}", status="400") == 1
    assert metric(families, "vmadmd_qmp_commands", command="query-version", outcome="ok") >= 3
    assert metric(families, "vmadmd_vms", state="running") == 1
    assert metric(families, "vmadmd_vms", state="stopped") == 1
    assert metric(families, "vmadmd_vnc_listeners") == 1
    assert "vmadmd_api_request_seconds" in families
    assert "vmadmd_qmp_command_seconds" in families
    pid = env.pid(uuid)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)

    def stops() -> float:
        _, body = raw_request(env, "/metrics")
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        return metric(families, "vmadmd_vm_exits", reason="crash", stage="")

    env.wait_for(lambda: stops() == 1, timeout=5, what="the exit counted")


def test_event_stream_resumes_with_last_event_id(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm(bios_payload())
    assert env.api("POST", f"/vm/{uuid}", action="reset")[0] == 200
    events = read_events(env, lambda evs: any(e["type"] == "reset" for e in evs), vm=uuid)
    ids = [e["id"] for e in events]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert events[0]["type"] == "started"
    later = read_events(
        env,
        lambda evs: any(e["type"] == "reset" for e in evs),
        last_event_id=events[0]["id"],
    )
    assert later[0]["id"] > events[0]["id"]
    assert all(e["id"] > events[0]["id"] for e in later)

    # `vmadm events` follows from now on.  The streams read above count as
    # subscribers until the daemon sees them gone: wait for that first, so
    # that the one counted next is the follower.
    env.wait_for(lambda: env.metric("vmadmd_event_subscribers") == 0, what="streams gone")
    follower = subprocess.Popen(
        [env_bin("vmadm"), "events", "-j", uuid], stdout=subprocess.PIPE, text=True, env=env.environ
    )
    try:
        env.wait_for(lambda: env.metric("vmadmd_event_subscribers") == 1, what="following")
        assert env.api("POST", f"/vm/{uuid}", action="reset")[0] == 200
        assert follower.stdout is not None
        ready, _, _ = select.select([follower.stdout], [], [], 10)
        assert ready, "vmadm events printed nothing within 10 s"
        first = json.loads(follower.stdout.readline())
        assert first["vm"] == uuid
        assert first["id"] > later[-1]["id"]
        assert first["type"] in ("reset", "qmp_event")
    finally:
        follower.terminate()
        follower.wait(timeout=10)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_consumer_that_never_reads_is_dropped(env: Env) -> None:
    daemon = env.start_daemon("--log-level", "info")
    uuid = env.run_vm(bios_payload())
    lazy = connect_unix(os.path.dirname(env.socket), os.path.basename(env.socket))
    lazy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lazy.sendall(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    env.wait_for(lambda: env.metric("vmadmd_event_subscribers") == 1, what="subscribed")
    before = rss_kib(daemon.pid)
    for _ in range(1500):
        assert env.api("POST", f"/vm/{uuid}", action="reset")[0] == 200
    grown = rss_kib(daemon.pid) - before
    assert grown < 8 * 1024, f"daemon grew by {grown} KiB"
    # The lazy consumer was cut off: draining it reaches the end of the stream.
    lazy.settimeout(10)
    data = b""
    while chunk := lazy.recv(65536):
        data += chunk
        if len(data) > 50_000_000:
            break
    lazy.close()
    assert data.count(b"\nevent: ") < 1500 * 2


def test_event_stream_tells_a_gap(env: Env) -> None:
    """A client resuming from an id the history no longer holds is told so."""
    from vmadmd.daemon.events import HISTORY

    env.start_daemon()
    running = env.run_vm()
    first = read_events(env, lambda evs: bool(evs))[0]["id"]
    # Each reset is two events (ours, and qemu's RESET while it is not held back).
    for _ in range(HISTORY + 10):
        assert env.api("POST", f"/vm/{running}", action="reset")[0] == 200
    events = read_events(env, lambda evs: len(evs) >= 2, last_event_id=first)
    assert events[0]["type"] == "gap", events[:2]
    assert events[0]["from"] == first + 1
    assert events[1]["id"] == events[0]["to"] + 1
