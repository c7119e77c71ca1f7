"""Shared bench tooling: a private world (zones root, socket, marker), VMs, a daemon."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmadmd.cli.client import Client
from vmadmd.vm.proc import find_vm_pid

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def pct(values: list[float], p: float) -> float:
    """The p-th percentile (nearest rank)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summary_ms(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"p50 {statistics.median(ms):.3f} ms  p99 {pct(ms, 99):.3f} ms  "
        f"min {min(ms):.3f} ms  n={len(ms)}"
    )


class World:
    def __init__(self, root: str) -> None:
        self.root = root
        self.zones = os.path.join(root, "zones")
        self.socket = os.path.join(root, "vmadmd.sock")
        self.marker = os.path.join(root, "autoboot.marker")
        os.makedirs(self.zones, exist_ok=True)
        self.daemon: subprocess.Popen[bytes] | None = None

    @property
    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            VMADM_ZONES_ROOT=self.zones,
            VMADMD_SOCKET=self.socket,
            VMADMD_AUTOBOOT_MARKER=self.marker,
            VMADM_ACCEL="tcg",
        )
        return env

    def vmadm(self, *args: str, input: str | None = None) -> str:
        res = subprocess.run(
            [str(BIN / "vmadm"), *args],
            input=input,
            capture_output=True,
            text=True,
            env=self.environ,
            check=False,
        )
        if res.returncode != 0:
            raise RuntimeError(f"vmadm {args}: {res.stderr}")
        return res.stdout

    def create(self, **props: Any) -> str:
        payload = {"alias": "bench", "ram": 64, "autoboot": False, **props}
        out = self.vmadm("create", input=json.dumps(payload))
        return out.strip().rsplit(" ", 1)[1]

    def pid(self, uuid: str) -> int | None:
        return find_vm_pid(os.path.join(self.zones, uuid, "root/tmp/vm.pid"), uuid)

    def start_daemon(self, *extra: str) -> float:
        """Start vmadmd; returns seconds from exec to the API answering."""
        t0 = time.monotonic()
        self.daemon = subprocess.Popen(
            [str(BIN / "vmadmd"), "--log-level", "warning", *extra],
            env=self.environ,
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.root, "vmadmd.log"), "ab"),  # noqa: SIM115
            start_new_session=True,
        )
        client = Client(self.socket, timeout=5)
        while True:
            with contextlib.suppress(Exception):
                if client.request("GET", "/ping")[0] == 200:
                    return time.monotonic() - t0
            if self.daemon.poll() is not None:
                raise RuntimeError("vmadmd exited")
            time.sleep(0.001)

    def stop_daemon(self, sig: int = signal.SIGTERM) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(sig)
            self.daemon.wait(timeout=20)
        self.daemon = None

    def wait_qmp(self, uuid: str, timeout: float = 20) -> None:
        client = Client(self.socket, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if client.request("GET", f"/vm/{uuid}", {"type": "version"})[0] == 200:
                    return
            time.sleep(0.01)
        raise RuntimeError(f"no QMP for {uuid}")

    def kill_all(self) -> None:
        self.stop_daemon(signal.SIGKILL)
        for uuid in os.listdir(self.zones):
            pid = self.pid(uuid)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def world() -> Iterator[World]:
    root = tempfile.mkdtemp(prefix="vmadmd-bench-")
    w = World(root)
    try:
        yield w
    finally:
        w.kill_all()
        time.sleep(0.2)
        shutil.rmtree(root, ignore_errors=True)


class RawQmp:
    """A minimal raw QMP client (the floor: qemu's own answer time)."""

    def __init__(self, path: str) -> None:
        from vmadmd.vm.sockets import connect_unix

        self.sock = connect_unix(os.path.dirname(path), os.path.basename(path))
        self.buf = b""
        self._line()  # greeting
        self.cmd("qmp_capabilities")

    def _line(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        data: dict[str, Any] = json.loads(line)
        return data

    def cmd(self, name: str) -> Any:
        self.sock.sendall(json.dumps({"execute": name}).encode() + b"\n")
        while True:
            msg = self._line()
            if "return" in msg or "error" in msg:
                return msg

    def close(self) -> None:
        self.sock.close()


class KeepAliveHttp:
    """One persistent HTTP/1.1 connection over the API socket."""

    def __init__(self, path: str) -> None:
        from vmadmd.vm.sockets import connect_unix

        self.sock: socket.socket = connect_unix(os.path.dirname(path), os.path.basename(path))
        self.buf = b""

    def get(self, target: str) -> tuple[int, bytes]:
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(self.buf) < length:
            self.buf += self.sock.recv(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        return status, body
