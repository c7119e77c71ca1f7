"""One private world for a test or a bench run: zones root, API socket, autoboot marker.

``vmadm`` and ``vmadmd`` run as real processes pointed at it through their
environment; nothing here touches the default zones root or socket.  The
tests (``tests/conftest.py``) and the benches (``bench/common.py``) both
drive VMs through this one class; ``cleanup`` kills every daemon and every
qemu (or stand-in) the world started.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmadmd.cli.client import ApiError, Client
from vmadmd.vm import proc
from vmadmd.vm.cgroup import DEFAULT_ROOT, Cgroups
from vmadmd.vm.sockets import connect_unix
from vmadmd.vm.store import is_uuid

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


@contextlib.contextmanager
def new_cgroup_parents_removed() -> Iterator[None]:
    """Remove, on the way out, the ``vmadmd`` parent cgroups made meanwhile.

    Only those that did not exist before (a host daemon's parent is left
    alone) and hold no VM (rmdir refuses a cgroup with children).
    """
    from vmadmd.vm.cgroup import PARENT, V1_CONTROLLERS

    root = Path(DEFAULT_ROOT)
    parents = [root / PARENT, *(root / c / PARENT for c in V1_CONTROLLERS)]
    existed = {p for p in parents if p.exists()}
    try:
        yield
    finally:
        for p in parents:
            if p not in existed:
                with contextlib.suppress(OSError):
                    p.rmdir()


def _world_readable_dir(prefix: str) -> str:
    """A fresh temp dir anyone may read (0755), removed when the process exits:
    for what qemu, as a VM's own user, must reach outside this checkout."""
    import atexit
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix=prefix)
    os.chmod(path, 0o755)
    atexit.register(shutil.rmtree, path, True)
    return path


@functools.cache
def readable_guest() -> str:
    """A directory holding the test guest's ``vmlinuz`` and ``initrd.img``
    that a VM's own user can read (qemu opens ``-kernel``/``-initrd`` as that
    user, who may not reach this checkout): copied, once per process."""
    import shutil

    shared = _world_readable_dir("vmadmd-guest-")
    for name in ("vmlinuz", "initrd.img"):
        os.chmod(shutil.copy(REPO / ".cache" / "guest" / name, shared), 0o644)
    return shared


@functools.cache
def standin_binary() -> str:
    """The stand-in as a qemu binary that a VM's own unprivileged user can run.

    The daemon runs "qemu" as the VM's user, which may not reach this checkout
    or the venv's python (often under root's 0700 home).  So the stand-in and
    the vmadmd package it imports are copied, once per process, into a
    world-readable temp dir, with a wrapper that runs the system's python
    (the stand-in needs only the standard library and vmadmd).
    """
    import shutil

    stage = _world_readable_dir("vmadmd-standin-")
    shutil.copy(REPO / "harness" / "standin.py", stage)
    shutil.copytree(REPO / "src" / "vmadmd", os.path.join(stage, "vmadmd"),
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    python = next((p for p in ("/usr/bin/python3", "/bin/python3") if os.access(p, os.X_OK)),
                  sys.executable)  # fmt: skip
    wrapper = os.path.join(stage, "qemu-standin")
    with open(wrapper, "w") as f:
        f.write(f'#!/bin/sh\nexec {python} -B {stage}/standin.py "$@"\n')
    for dirpath, dirnames, filenames in os.walk(stage):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)
    os.chmod(wrapper, 0o755)
    return wrapper


READY = "VMTEST-READY"


def tool(name: str) -> str:
    """A console script of this venv (vmadm, vmadmd), else from PATH."""
    path = VENV_BIN / name
    return str(path) if path.exists() else name


def bios_payload(**props: Any) -> dict[str, Any]:
    """A VM with no disk and no kernel: SeaBIOS only; it ignores ACPI powerdown."""
    payload: dict[str, Any] = {"alias": "bios", "ram": 64, "autoboot": False}
    payload.update(props)
    return payload


def _qemus_under(root: str) -> list[int]:
    """qemus (or stand-ins) running in a VM directory under ``root``: qemu's
    options name no host path (relative names, fds), but it runs in its
    ``root/tmp``."""
    pids = []
    prefix = os.path.realpath(root) + os.sep
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"-uuid" in argv and (cwd + os.sep).startswith(prefix):
            pids.append(int(entry))
    return pids


def kill_qemus_under(root: str) -> int:
    """SIGKILL every qemu (or stand-in) whose command line names ``root``."""
    pids = _qemus_under(root)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _qemus_under(root) and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(pids)


class World:
    """A zones root, a socket and a marker under ``root``, and helpers to drive them.

    ``deep`` puts the zones root past the 108-byte unix socket limit, so the
    long-path handling is always in use (the tests want that; the benches
    measure the common case).
    """

    def __init__(self, root: Path, *, deep: bool = True, log_level: str = "debug") -> None:
        self.tmp = root
        zones = root / (("zones-" + "z" * 90) if deep else "zones")
        zones.mkdir(parents=True, exist_ok=True)
        self.zones = str(zones)
        self.socket = str(root / "vmadmd.sock")
        self.marker = str(root / "autoboot.marker")
        # The world's own uid ledger: no test or bench touches the host's
        # (/var/lib/vmadmd/zone-uids); two worlds may share one (extra_env).
        self.ledger = str(root / "zone-uids")
        self.log_level = log_level
        self.daemons: list[subprocess.Popen[bytes]] = []
        self.started_in: float | None = None  # seconds from exec to the first answer
        # VMADMD_TEST_QEMU runs the suite's qemu-less-guest tests on another
        # qemu binary, e.g. the stand-in (standin_binary()), to check the stand-in.
        qemu = os.environ.get("VMADMD_TEST_QEMU")
        self.extra_env: dict[str, str] = {"VMADM_QEMU": qemu} if qemu else {}
        # Put before vmadm and vmadmd (e.g. `ip netns exec NS`: its own network).
        self.prefix: list[str] = []
        # Whether the processes it starts are measured by coverage (when the
        # test run is): a soak, which times them, turns it off.
        self.measured = True

    @property
    def environ(self) -> dict[str, str]:
        env = dict(os.environ)
        if not self.measured:
            for name in ("COVERAGE_PROCESS_CONFIG", "COVERAGE_PROCESS_START"):
                env.pop(name, None)
        env.update(
            VMADM_ZONES_ROOT=self.zones,
            VMADMD_SOCKET=self.socket,
            VMADMD_AUTOBOOT_MARKER=self.marker,
            VMADM_UID_LEDGER=self.ledger,
            VMADM_ACCEL="tcg",
        )
        env.update(self.extra_env)
        return env

    # -- vmadm --------------------------------------------------------------

    def vmadm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = False,
        timeout: float = 120,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            [*self.prefix, tool("vmadm"), *args],
            input=input,
            capture_output=True,
            text=True,
            env={**self.environ, **(extra_env or {})},
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"vmadm {' '.join(args)} failed: {res.stderr}")
        return res

    def create(self, payload: dict[str, Any]) -> str:
        res = self.vmadm("create", input=json.dumps(payload), check=True)
        line = res.stderr.strip()
        assert line.startswith("Successfully created VM "), line
        return line.rsplit(" ", 1)[1]

    def run_vm(self, payload: dict[str, Any] | None = None, *, ready: bool = False) -> str:
        """Create and start a VM, and wait until the daemon answers its QMP.

        ``ready``: also wait for the test guest's ``VMTEST-READY`` (its acpid
        listens).  Without a payload: a BIOS-only VM.
        """
        uuid = self.create(payload if payload is not None else bios_payload())
        self.vmadm("start", uuid, check=True)
        if ready:
            self.wait_console(uuid)
        self.wait_qmp(uuid)
        return uuid

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
        from vmadmd.vm.layer import identity_of

        try:
            record = json.loads((Path(self.zones) / uuid / "vm.json").read_text())
        except (OSError, ValueError):
            record = {}
        return proc.find_vm_pid(str(self.runtime(uuid) / "vm.pid"), uuid, identity_of(record))

    # -- the daemon -------------------------------------------------------

    def client(self, timeout: float = 30) -> Client:
        return Client(self.socket, timeout=timeout)

    def api(self, method: str, path: str, **params: str) -> tuple[int, Any]:
        """(status, body) for any answer, errors included."""
        try:
            return self.client().request(method, path, params or None)
        except ApiError as err:
            return err.status, {"error": {"code": err.code, "message": err.message}}

    def raw_http(self, request: bytes, timeout: float = 10) -> bytes:
        """Send raw request bytes to the API socket; the reply, read until the daemon closes."""
        sock = connect_unix(os.path.dirname(self.socket), os.path.basename(self.socket))
        sock.settimeout(timeout)
        try:
            sock.sendall(request)
            out = b""
            while chunk := sock.recv(65536):
                out += chunk
            return out
        finally:
            sock.close()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples with these labels, scraped from /metrics now."""
        from prometheus_client.parser import text_string_to_metric_families

        data = self.raw_http(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        body = data.partition(b"\r\n\r\n")[2].decode()
        total = 0.0
        for family in text_string_to_metric_families(body):
            for sample in family.samples:
                if sample.name in (name, name + "_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    @property
    def daemon(self) -> subprocess.Popen[bytes] | None:
        """The daemon started last."""
        return self.daemons[-1] if self.daemons else None

    def start_daemon(
        self, *extra: str, wait: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start vmadmd; with ``wait``, until it answers (``started_in`` says how long)."""
        log = open(self.tmp / f"vmadmd.{len(self.daemons)}.log", "wb")  # noqa: SIM115
        t0 = time.monotonic()
        daemon = subprocess.Popen(
            [*self.prefix, tool("vmadmd"), "--log-level", self.log_level, *extra],
            env={**self.environ, **(env or {})},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.daemons.append(daemon)
        if wait:
            self.wait_daemon(daemon)
            self.started_in = time.monotonic() - t0
        return daemon

    def wait_daemon(self, daemon: subprocess.Popen[bytes], timeout: float = 15) -> None:
        client = self.client(timeout=2)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if daemon.poll() is not None:
                raise AssertionError(
                    f"vmadmd exited with {daemon.returncode}:\n{self.daemon_log()}"
                )
            with contextlib.suppress(Exception):
                if client.request("GET", "/ping")[0] == 200:
                    return
            time.sleep(0.002)
        raise AssertionError(f"vmadmd did not answer within {timeout} s:\n{self.daemon_log()}")

    def stop_daemon(
        self, daemon: subprocess.Popen[bytes] | None = None, sig: int = signal.SIGTERM
    ) -> int | None:
        """Signal a daemon (the last started by default) and wait for it."""
        daemon = daemon or self.daemon
        if daemon is None:
            return None
        if daemon.poll() is None:
            daemon.send_signal(sig)
        return daemon.wait(timeout=20)

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

    def cleanup(self) -> None:
        """Stop every daemon (SIGTERM, so coverage keeps its data; SIGKILL if it
        does not go) and kill every qemu this world started."""
        for daemon in self.daemons:
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    daemon.kill()
                    daemon.wait(timeout=10)
        kill_qemus_under(self.zones)
        # The VMs' cgroups, once empty (a clean exit removes its own).
        cgroups = Cgroups(self.extra_env.get("VMADM_CGROUP_ROOT", "") or DEFAULT_ROOT)
        for name in os.listdir(self.zones):
            if is_uuid(name):
                cgroups.remove(name)
