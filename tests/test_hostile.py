"""Everything under a VM's root/ is written by a possibly hostile guest user:
planted files make that VM's request fail clearly, never the daemon."""

from __future__ import annotations

import os
import subprocess
import threading
import time

from .conftest import Env, RunVm, bios_payload


def ping_times(env: Env, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        t0 = time.monotonic()
        status, _ = env.api("GET", "/ping")
        worst[0] = max(worst[0], time.monotonic() - t0)
        assert status == 200
        time.sleep(0.02)


def test_a_fifo_or_a_huge_file_at_vm_pid(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    pid_file = env.runtime(uuid) / "vm.pid"
    worst = [0.0]
    stop = threading.Event()
    pinger = threading.Thread(target=ping_times, args=(env, stop, worst))
    pinger.start()
    try:
        os.mkfifo(pid_file)
        env.vmadm("update", uuid, "alias=poked", check=True)  # the daemon looks again
        res = env.vmadm("get", uuid, timeout=10)
        assert res.returncode == 1
        assert "vm.pid is not a regular file" in res.stderr
        assert env.api("GET", f"/vm/{uuid}", type="status")[0] == 409
        os.unlink(pid_file)
        with open(pid_file, "wb") as f:
            f.truncate(1 << 30)  # 1 GiB, sparse
        env.vmadm("update", uuid, "alias=poked-again", check=True)
        res = env.vmadm("get", uuid, timeout=10)
        assert res.returncode == 1
        assert "larger than" in res.stderr
        assert env.api("GET", "/vms")[0] == 200
    finally:
        stop.set()
        pinger.join()
    assert worst[0] < 1.0, worst
    assert "not picked up" in env.daemon_log(tail=None)


def test_screenshots_never_follow_a_planted_link(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm()
    outside = env.tmp / "precious.txt"
    outside.write_text("do not touch\n")
    for name in ("vm.ppm", "vm.png"):
        (env.runtime(uuid) / name).symlink_to(outside)
    status, body = env.api("POST", f"/vm/{uuid}", action="sysrq", request="screenshot")
    assert status == 200, body
    raw = env.client().request("GET", f"/vm/{uuid}/screenshot.png")
    assert raw[0] == 200
    assert outside.read_text() == "do not touch\n"
    assert not (env.runtime(uuid) / "vm.ppm").is_symlink()


def test_a_look_alike_is_not_the_vm(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm()
    env.vmadm("stop", uuid, "-F", check=True)
    # A process carrying `-uuid U`, its pid put where qemu's was.
    look_alike = subprocess.Popen(
        ["busybox", "sh", "-c", "read x", "-uuid", uuid], stdin=subprocess.PIPE
    )
    try:
        cmdline = f"/proc/{look_alike.pid}/cmdline"
        env.wait_for(lambda: f"-uuid\0{uuid}".encode() in open(cmdline, "rb").read(),  # noqa: SIM115
                     what="exec")  # fmt: skip
        (env.runtime(uuid) / "vm.pid").write_text(f"{look_alike.pid}\n")
        assert env.get(uuid)["state"] == "stopped"
        env.vmadm("update", uuid, "alias=poked", check=True)
        status, body = env.api("GET", f"/vm/{uuid}", type="status")
        assert status == 409, body
        env.vmadm("start", uuid, check=True)  # not "already running"
        env.wait_qmp(uuid)
        assert env.pid(uuid) != look_alike.pid
    finally:
        look_alike.kill()
        look_alike.wait()


def test_concurrent_png_screenshots_are_each_whole(env: Env, running_vm: RunVm) -> None:
    """Each screenshot is taken, read back and removed under the VM's lock: two
    at once cannot read each other's half-written file."""
    import concurrent.futures

    uuid = running_vm()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: raw_png(env, uuid), range(8)))
    for data in results:
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
        assert data.endswith(b"IEND\xaeB`\x82"), "a whole PNG, not a truncated one"


def raw_png(env: Env, uuid: str) -> bytes:
    """GET /vm/<uuid>/screenshot.png as bytes (the JSON client would decode it)."""
    data = env.raw_http(f"GET /vm/{uuid}/screenshot.png HTTP/1.1\r\nHost: x\r\n"
                        "Connection: close\r\n\r\n".encode(), timeout=30)  # fmt: skip
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head[:200]
    return body
