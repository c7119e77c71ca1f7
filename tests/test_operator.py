"""The operator's daily tools against real qemu: monitor pass-through, per-VM
statistics, the serial console (WebSocket and ``vmadm console``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import termios
import time
from collections.abc import Callable
from typing import Any

import pytest

from harness.world import tool

from .conftest import Env, RunVm, bios_payload, frozen_and_other, guest_payload
from .wsclient import Refused, WsClient


def qmp(env: Env, uuid: str, body: object) -> tuple[int, object]:
    from vmadmd.cli.client import ApiError

    try:
        return env.client().request("POST", f"/vm/{uuid}/qmp", body=body)
    except ApiError as err:
        return err.status, {"code": err.code, "message": err.message}


def test_qmp_passthrough(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm()
    status, body = qmp(env, uuid, {"execute": "query-status"})
    assert status == 200
    assert isinstance(body, dict)
    assert body["return"]["status"] == "running"
    # qemu's refusal (of a command the allowlist lets through): 422 with
    # qemu's class and description.
    from vmadmd.cli.client import ApiError

    with pytest.raises(ApiError) as caught:
        env.client().request("POST", f"/vm/{uuid}/qmp", body={"execute": "query-no-such-thing"})
    assert caught.value.status == 422
    assert caught.value.code == "QmpCommandFailed"
    for owned in ("getfd", "add_client", "set_password", "qmp_capabilities", "closefd"):
        assert qmp(env, uuid, {"execute": owned, "arguments": {"fdname": "x"}})[0] == 403, owned
    for line in ("getfd x", "set_password vnc secret"):
        assert qmp(env, uuid, {"hmp": line})[0] == 403, line
        hmp_via_qmp = {"execute": "human-monitor-command", "arguments": {"command-line": line}}
        assert qmp(env, uuid, hmp_via_qmp)[0] == 403, line
    status, body = qmp(env, uuid, {"hmp": "info status"})
    assert status == 200
    assert isinstance(body, dict)
    assert "running" in body["return"]
    bad: object
    for bad in ({}, {"execute": 5}, {"execute": "x", "arguments": []}, {"hmp": 1},
                {"hmp": "info", "execute": "x"}, [], "text"):  # fmt: skip
        assert qmp(env, uuid, bad)[0] == 400, bad
    # Logged by command name at INFO, never with its arguments.
    qmp(env, uuid, {"execute": "qom-list", "arguments": {"path": "/machine/secret-xyz-42"}})
    env.wait_for(lambda: "QMP pass-through: qom-list" in env.daemon_log(tail=None), what="log")
    assert "secret-xyz-42" not in env.daemon_log(tail=None)
    # The CLI prints the return.
    res = env.vmadm("qmp", uuid, '{"execute": "query-status"}', check=True)
    assert json.loads(res.stdout)["status"] == "running"
    res = env.vmadm("qmp", uuid, "--hmp", "info status", check=True)
    assert "VM status: running" in res.stdout
    res = env.vmadm("qmp", uuid, '{"execute": "query-no-such-thing"}')
    assert res.returncode == 1
    assert len(res.stderr.strip().splitlines()) == 1


def test_qmp_passthrough_error_carries_qemus_class(env: Env, running_vm: RunVm) -> None:

    uuid = running_vm()
    body = json.dumps({"execute": "query-no-such-thing"}).encode()
    data = env.raw_http(
        f"POST /vm/{uuid}/qmp HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 422")
    error = json.loads(payload)["error"]
    assert error["class"] == "CommandNotFound"
    assert "query-no-such-thing" in error["desc"]


def test_qmp_passthrough_to_a_stopped_qemu_times_out_alone(env: Env) -> None:
    frozen, other, pid = frozen_and_other(env)
    try:
        t0 = time.monotonic()
        assert qmp(env, frozen, {"execute": "query-status"})[0] == 504
        assert time.monotonic() - t0 < 3
        assert qmp(env, other, {"execute": "query-status"})[0] == 200
    finally:
        os.kill(pid, signal.SIGCONT)


def test_passthrough_to_a_stopped_vm_is_409(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    assert qmp(env, uuid, {"execute": "query-status"})[0] == 409
    assert qmp(env, "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b", {"execute": "x"})[0] == 404


# -- the serial console ----------------------------------------------------------


class SerialClient:
    """A WebSocket viewer of GET /vm/<uuid>/serial, reading into a buffer."""

    def __init__(self, env: Env, uuid: str) -> None:
        self.env, self.uuid = env, uuid
        self.seen = b""
        self.closed: tuple[int | None, str] | None = None

    async def __aenter__(self) -> SerialClient:
        self.ws = await WsClient.connect(f"/vm/{self.uuid}/serial", unix=self.env.socket)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def until(self, text: bytes, timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.seen:
                data = await self.ws.receive(timeout)
                if data is None:
                    self.closed = (self.ws.close_code, self.ws.close_reason)
                    raise AssertionError(f"closed ({self.closed}) before {text!r}")
                self.seen += data

    async def until_closed(self, timeout: float = 10) -> tuple[int | None, str]:
        async with asyncio.timeout(timeout):
            while (data := await self.ws.receive(timeout)) is not None:
                self.seen += data
            return self.ws.close_code, self.ws.close_reason

    async def type(self, text: bytes) -> None:
        await self.ws.send(text)


def test_serial_console_shared_by_viewers(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    uuid = running_vm(guest_payload(guest), ready=True)

    async def scenario() -> None:
        async with SerialClient(env, uuid) as a, SerialClient(env, uuid) as b:
            # Attaching to a quiet console still shows what came before.
            await a.until(b"VMTEST-READY")
            await b.until(b"VMTEST-READY")
            await a.type(b"echo $((6*7))-marker\n")
            await a.until(b"42-marker")
            await b.until(b"42-marker")
            async with SerialClient(env, uuid) as late:
                await late.until(b"42-marker")  # the earlier output, first
            pid = env.pid(uuid)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            for viewer in (a, b):
                code, reason = await viewer.until_closed()
                assert reason == "qemu crashed", (code, reason)

    asyncio.run(scenario())
    # The log in root/tmp keeps working beside the daemon's connection.
    assert "42-marker" in env.console(uuid)
    # The console of a stopped VM, of an unknown one.
    for target, want in ((uuid, 409), ("0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b", 404)):

        async def refused(target: str = target) -> int:
            try:
                ws = await WsClient.connect(f"/vm/{target}/serial", unix=env.socket)
            except Refused as err:
                return err.status if err.error["code"] else 0
            await ws.close()
            return 101

        assert asyncio.run(refused()) == want


class PtyConsole:
    """``vmadm console`` running in a pseudo-terminal, as a user would run it."""

    def __init__(self, env: Env, uuid: str) -> None:
        self.master, self.slave = pty.openpty()
        # A cooked terminal, as a login shell leaves it.
        attrs = termios.tcgetattr(self.slave)
        attrs[3] |= termios.ECHO | termios.ICANON | termios.ISIG
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        self.before = termios.tcgetattr(self.slave)
        self.proc = subprocess.Popen(
            [tool("vmadm"), "console", uuid], stdin=self.slave, stdout=self.slave,
            stderr=self.slave, env=env.environ, start_new_session=True,
        )  # fmt: skip
        self.seen = b""

    def until(self, text: bytes, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} not seen: {self.seen[-500:]!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                self.seen += os.read(self.master, 65536)

    def type(self, data: bytes) -> None:
        os.write(self.master, data)

    def finish(self, timeout: float = 10) -> int:
        rc = self.proc.wait(timeout=timeout)
        with contextlib.suppress(OSError):  # what it printed on the way out
            while select.select([self.master], [], [], 0.2)[0]:
                self.seen += os.read(self.master, 65536)
        return rc

    def restored(self) -> bool:
        return termios.tcgetattr(self.slave) == self.before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)
        os.close(self.slave)


def test_vmadm_console_in_a_terminal(env: Env, running_vm: RunVm, guest: dict[str, str]) -> None:
    uuid = running_vm(guest_payload(guest), ready=True)

    def session(end: Callable[[PtyConsole], None], said: bytes) -> None:
        """Attach, end the session as ``end`` does; the terminal comes back as it was."""
        console = PtyConsole(env, uuid)
        try:
            console.until(b"Ctrl-] detaches")
            end(console)
            assert console.finish() == 0
            assert said in console.seen
            assert console.restored()
        finally:
            console.close()

    def type_then_detach(console: PtyConsole) -> None:
        console.until(b"VMTEST-READY")  # the history first
        assert not console.restored(), "raw mode while attached"
        console.type(b"echo $((5*5))-pty\r")
        console.until(b"25-pty")
        console.type(b"\x1d")  # Ctrl-]

    def kill_qemu(console: PtyConsole) -> None:
        pid = env.pid(uuid)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)

    session(type_then_detach, b"[detached]")
    session(lambda console: console.proc.send_signal(signal.SIGTERM), b"terminated by SIGTERM")
    # The VM stops under it: it says why, and lets go of the terminal.
    session(kill_qemu, b"[qemu crashed]")
    # Not running: one line, exit 1.
    res = env.vmadm("console", uuid)
    assert res.returncode == 1
    assert res.stderr.strip() == f"vmadm: VM {uuid} is not running"


# -- per-VM statistics -------------------------------------------------------------


def test_stats_grow_and_leave_with_the_vm(env: Env, guest: dict[str, str]) -> None:
    env.start_daemon()
    uuid = env.run_vm(guest_payload(guest, alias="stats", disks=[{"size": 8}]))

    def stats() -> dict[str, Any]:
        status, body = env.api("GET", f"/vm/{uuid}", type="stats")
        assert status == 200, body
        value: dict[str, Any] = body["stats"]
        return value

    booting = stats()
    assert booting["cpu_seconds"] > 0
    assert booting["memory_bytes"] > 16 << 20
    env.wait_console(uuid)
    ready = stats()
    assert ready["cpu_seconds"] > booting["cpu_seconds"], "the guest booted meanwhile"
    assert set(ready["disks"]) == {"disk0"}
    assert "stats" not in env.api("GET", f"/vm/{uuid}")[1], "not part of the default set"

    async def read_disk() -> None:
        async with SerialClient(env, uuid) as console:
            # The marker is computed, so the echo of the typed line cannot match.
            cmd = b"dd if=/dev/vda of=/dev/null bs=64k count=64 && echo dd-$((40+2))\n"
            await console.type(cmd)
            await console.until(b"dd-42")

    asyncio.run(read_disk())
    after = stats()
    grown = after["disks"]["disk0"]["read_bytes"] - ready["disks"]["disk0"]["read_bytes"]
    assert grown >= 4 << 20, (ready["disks"], after["disks"])
    assert after["disks"]["disk0"]["read_ops"] > ready["disks"]["disk0"]["read_ops"]
    # The same in /metrics (the API refreshed the cached block counters).
    assert env.metric("vmadmd_vm_cpu_seconds", uuid=uuid, alias="stats") > 0
    assert env.metric("vmadmd_vm_memory_bytes", uuid=uuid) > 0
    disk_read = env.metric("vmadmd_vm_disk_read_bytes", uuid=uuid, device="disk0")
    assert disk_read >= after["disks"]["disk0"]["read_bytes"]
    # And from the CLI.
    res = env.vmadm("info", uuid, "stats", check=True)
    assert json.loads(res.stdout)["stats"]["disks"]["disk0"]["read_bytes"] >= 4 << 20
    env.vmadm("delete", uuid, check=True)
    env.wait_for(lambda: env.metric("vmadmd_vm_cpu_seconds", uuid=uuid) == 0, what="gone")
    body = env.client().request("GET", "/metrics")[1]["raw"]
    assert uuid not in body
