"""Shared fixtures: a private world per test (``harness.World``), the real
test guest, and a cleanup that kills every daemon and qemu a test left.

Every test gets its own zones root (deeper than the 108-byte unix socket
limit, so the long-path handling is always in use), its own API socket and
its own autoboot marker; nothing touches the default zones root or API socket.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.world import (
    READY,
    REPO,
    World,
    bios_payload,
    kill_qemus_under,
    new_cgroup_parents_removed,
    readable_guest,
    tool,
)

GUEST_DIR = REPO / ".cache" / "guest"

# The names the test modules use.
Env = World
_bin = tool
__all__ = [
    "READY",
    "REPO",
    "Env",
    "bios_payload",
    "guest_payload",
    "kill_qemus_under",
]


@pytest.fixture(scope="session", autouse=True)
def _cgroup_parents() -> Iterator[None]:
    """Each test removes its VMs' own cgroups; the shared parents they were
    made under go at the end of the run (see ``new_cgroup_parents_removed``)."""
    with new_cgroup_parents_removed():
        yield


@pytest.fixture(scope="session")
def guest() -> dict[str, str]:
    """The Debian-kernel + busybox test guest, built if missing.

    qemu reads ``-kernel``/``-initrd`` as the VM's own user, which may not
    reach this checkout (under a 0700 home, say): the files are copied to a
    world-readable temp dir (``readable_guest``, removed at exit).
    """
    subprocess.run([str(REPO / "tools" / "build-guest.sh"), str(GUEST_DIR)], check=True)
    shared = readable_guest()
    return {"kernel": f"{shared}/vmlinuz", "initrd": f"{shared}/initrd.img"}


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


@pytest.fixture
def env(tmp_path: Path) -> Iterator[World]:
    world = World(tmp_path)
    try:
        yield world
    finally:
        world.cleanup()


RunVm = Callable[..., str]


@contextlib.contextmanager
def lock_held(env: World, uuid: str) -> Iterator[None]:
    """A VM's lock held by another process (as by a `vmadm stop -F` suspended
    with Ctrl-Z) for the block's duration."""
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "time.sleep(600)\n",
         os.path.join(env.zones, uuid, ".vm.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def frozen_and_other(env: World) -> tuple[str, str, int]:
    """A daemon with a 1 s QMP timeout, two VMs, the first's qemu stopped
    (SIGSTOP: it answers nothing); returns both and the stopped pid
    (the caller sends SIGCONT)."""
    env.start_daemon("--qmp-timeout", "1")
    frozen, other = env.run_vm(), env.run_vm()
    pid = env.pid(frozen)
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return frozen, other, pid


@pytest.fixture
def running_vm(env: World) -> RunVm:
    """``running_vm(payload=None, ready=False)``: a VM created, started, its QMP answering.

    Starts the daemon first when the test has none running.
    """

    def run(payload: dict[str, Any] | None = None, *, ready: bool = False) -> str:
        if env.daemon is None or env.daemon.poll() is not None:
            env.start_daemon()
        return env.run_vm(payload, ready=ready)

    return run
