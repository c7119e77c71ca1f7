"""Shared fixtures: a deep temp zones root, the real test guest, vmadm and
vmadmd as real processes, and a cleanup that kills every qemu a test left.

Every test gets its own zones root (deeper than the 108-byte unix socket
limit, so the long-path handling is always in use), its own API socket and
its own autoboot marker; nothing touches the default zones root or API socket.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from vmadmd.cli.client import ApiError, Client

REPO = Path(__file__).resolve().parent.parent
GUEST_DIR = REPO / ".cache" / "guest"
VENV_BIN = Path(sys.executable).parent
READY = "VMTEST-READY"
STANDIN = str(REPO / "bench" / "qemu-standin")


def _bin(name: str) -> str:
    path = VENV_BIN / name
    return str(path) if path.exists() else name


@pytest.fixture(scope="session")
def guest() -> dict[str, str]:
    """The Debian-kernel + busybox test guest, built if missing."""
    subprocess.run([str(REPO / "tools" / "build-guest.sh"), str(GUEST_DIR)], check=True)
    return {"kernel": str(GUEST_DIR / "vmlinuz"), "initrd": str(GUEST_DIR / "initrd.img")}


def guest_payload(
    guest: dict[str, str],
    *,
    ignore_acpi: bool = False,
    poweroff_after: float | None = None,
    **props: Any,
) -> dict[str, Any]:
    append = "console=ttyS0 quiet panic=-1"
    if ignore_acpi:
        append += " vmtest.ignore_acpi"
    if poweroff_after is not None:
        append += f" vmtest.poweroff_after={poweroff_after}"
    payload: dict[str, Any] = {
        "alias": "guest",
        "ram": 128,
        "autoboot": False,
        "qemu_extra_opts": (
            f"-kernel {guest['kernel']} -initrd {guest['initrd']} -append '{append}'"
        ),
    }
    payload.update(props)
    return payload


def bios_payload(**props: Any) -> dict[str, Any]:
    """A VM with no disk and no kernel: SeaBIOS only; it ignores ACPI powerdown."""
    payload: dict[str, Any] = {"alias": "bios", "ram": 64, "autoboot": False}
    payload.update(props)
    return payload


def _qemus_under(root: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(root.encode() in a for a in argv) and b"-uuid" in argv:
            pids.append(int(entry))
    return pids


def kill_qemus_under(root: str) -> int:
    pids = _qemus_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _qemus_under(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


def _test_qemu_env() -> dict[str, str]:
    qemu = os.environ.get("VMADMD_TEST_QEMU")
    return {"VMADM_QEMU": qemu} if qemu else {}


@dataclass
class Env:
    """One test's world: zones root, socket, marker, and helpers to drive it."""

    tmp: Path
    zones: str
    socket: str
    marker: str
    daemons: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # VMADMD_TEST_QEMU runs the suite's qemu-less-guest tests on another
    # qemu binary, e.g. bench/qemu-standin, to check the stand-in against them.
    extra_env: dict[str, str] = field(default_factory=lambda: _test_qemu_env())

    @property
    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VMADM_ZONES_ROOT=self.zones,
            VMADMD_SOCKET=self.socket,
            VMADMD_AUTOBOOT_MARKER=self.marker,
            VMADM_ACCEL="tcg",
        )
        env.update(self.extra_env)
        return env

    def vmadm(
        self, *args: str, input: str | None = None, check: bool = False, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [_bin("vmadm"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.environ,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"vmadm {' '.join(args)} failed: {res.stderr}")
        return res

    def create(self, payload: dict[str, Any]) -> str:
        res = self.vmadm("create", input=json.dumps(payload), check=True)
        line = res.stdout.strip()
        assert line.startswith("Successfully created VM "), line
        return line.rsplit(" ", 1)[1]

    def get(self, uuid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.vmadm("get", uuid, check=True).stdout)
        return data

    def runtime(self, uuid: str) -> Path:
        return Path(self.zones) / uuid / "root" / "tmp"

    def console(self, uuid: str) -> str:
        try:
            return (self.runtime(uuid) / "vm.console.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_console(
        self, uuid: str, text: str = READY, count: int = 1, timeout: float = 60
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.console(uuid).count(text) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(
            f"{text!r} x{count} not seen on the console of {uuid}:\n{self.console(uuid)[-2000:]}"
        )

    def pid(self, uuid: str) -> int | None:
        from vmadmd.vm import proc

        return proc.find_vm_pid(str(self.runtime(uuid) / "vm.pid"), uuid)

    # -- the daemon -------------------------------------------------------

    def client(self, timeout: float = 30) -> Client:
        return Client(self.socket, timeout=timeout)

    def api(self, method: str, path: str, **params: str) -> tuple[int, Any]:
        """(status, body) for any answer, errors included."""
        try:
            return self.client().request(method, path, params or None)
        except ApiError as err:
            return err.status, {"error": {"code": err.code, "message": err.message}}

    def start_daemon(
        self, *extra: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"vmadmd.{len(self.daemons)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [_bin("vmadmd"), "--log-level", "debug", *extra],
            env={**self.environ, **(env or {})},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.daemons.append(proc)
        if wait:
            self.wait_daemon(proc)
        return proc

    def wait_daemon(self, proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"vmadmd exited with {proc.returncode}:\n{self.daemon_log()}")
            with contextlib.suppress(Exception):
                if self.client(timeout=2).request("GET", "/ping")[0] == 200:
                    return
            time.sleep(0.02)
        raise AssertionError(f"vmadmd did not answer within {timeout} s:\n{self.daemon_log()}")

    def stop_daemon(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        if proc.poll() is None:
            proc.send_signal(sig)
        return proc.wait(timeout=20)

    def daemon_log(self, tail: int | None = 5000) -> str:
        return "\n".join(
            p.read_text(errors="replace")[-(tail or 0) :]
            for p in sorted(self.tmp.glob("vmadmd.*.log"))
        )

    def wait_qmp(self, uuid: str, timeout: float = 15) -> float:
        """Wait until the daemon answers QMP queries for ``uuid``."""
        return self.wait_for(
            lambda: self.api("GET", f"/vm/{uuid}", type="version")[0] == 200,
            timeout=timeout,
            what=f"QMP of {uuid}",
        )

    def wait_for(
        self, cond: Callable[[], bool], timeout: float = 10, what: str = "condition"
    ) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if cond():
                return time.monotonic() - t0
            time.sleep(0.01)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    zones = tmp_path / ("zones-" + "z" * 90)
    zones.mkdir()
    e = Env(tmp=tmp_path, zones=str(zones), socket=str(tmp_path / "vmadmd.sock"),
            marker=str(tmp_path / "autoboot.marker"))  # fmt: skip
    try:
        yield e
    finally:
        for proc in e.daemons:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        kill_qemus_under(e.zones)
