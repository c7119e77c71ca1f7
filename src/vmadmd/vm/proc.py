"""Is this VM's qemu running?  Identity-checked liveness and safe signalling.

A pid file alone proves nothing: pids are reused.  A VM is running only when
its qemu is alive and not a zombie, and is the very process that was booted:
the same pid, executable and start time (in clock ticks since the host
booted), all recorded in root's ``vm.json`` at boot (``qemu_identity``).  A
look-alike carrying ``-uuid U`` is not the VM; nor is a pid written into the
zone.  (A qemu booted by a version that recorded no identity is found by
``vm.pid`` and ``-uuid <uuid>`` on its command line, until its next boot.)
Signals go through a pidfd opened and then re-checked, so a pid recycled
between the check and the kill can never be hit.

``vm.pid`` lies under the VM's ``root/``, writable by its guest's qemu: the
pid is taken from the identity recorded in root's ``vm.json`` instead; the
file is read (through ``zonefs``: no link followed, no FIFO opened, size
bounded) only for a qemu booted before identities were recorded.

Standard library only.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import select
import signal
from typing import Any

Identity = dict[str, Any]  # {"pid", "start", "exe"}, as kept in vm.json


def read_pid(pid_path: str) -> int | None:
    """The pid in ``<zonepath>/root/tmp/vm.pid``; ZoneFileError for a planted file."""
    from vmadmd.vm import zonefs

    runtime_dir = os.path.dirname(pid_path)
    zonepath = os.path.dirname(os.path.dirname(runtime_dir))
    try:
        text = zonefs.read_runtime_file(zonepath, os.path.basename(pid_path), 64).strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        pid = int(text)
    except ValueError:
        return None
    return pid if pid > 1 else None


def _proc_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The comm field may contain spaces and parentheses: the state is the
    # first field after the *last* ')'.
    rest = stat[stat.rfind(")") + 2 :]
    return rest[:1] or None


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def identity(pid: int) -> Identity | None:
    """What makes this process itself: its start time and its executable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()
    try:
        start = int(fields[19])  # starttime, the 22nd field of /proc/<pid>/stat
    except (IndexError, ValueError):
        return None
    return {"pid": pid, "start": start, "exe": exe}


def is_vm_process(pid: int, uuid: str, expect: Identity | None = None) -> bool:
    """True when ``pid`` is a live, non-zombie process that is the VM's qemu.

    With an identity recorded at boot (``expect``, in root's ``vm.json``):
    that very process (pid, start time, executable), whatever its command
    line says (a qemu taken over by its guest can rewrite its own argv).
    Without one (a qemu booted by an older version): started with ``-uuid
    <uuid>``.
    """
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    if isinstance(expect, dict):
        return identity(pid) == expect
    argv = cmdline(pid)
    return any(a == "-uuid" and b == uuid for a, b in itertools.pairwise(argv))


def _pid_of(pid_path: str, expect: Identity | None) -> int | None:
    """Where the VM's pid comes from: the identity recorded in root's
    ``vm.json`` at boot when there is one; ``vm.pid`` (in the zone, which its
    user may delete or rewrite) only for a qemu booted before identities
    were recorded.  A deleted ``vm.pid`` must not hide a running qemu from
    ``vmadm stop -F`` or ``vmadm delete``."""
    if isinstance(expect, dict):
        pid = expect.get("pid")
        return pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 else None
    return read_pid(pid_path)


def find_vm_pid(pid_path: str, uuid: str, expect: Identity | None = None) -> int | None:
    """The pid of the VM's qemu when it is running, else None."""
    pid = _pid_of(pid_path, expect)
    if pid is None or not is_vm_process(pid, uuid, expect):
        return None
    return pid


def open_vm_pidfd(
    pid_path: str, uuid: str, expect: Identity | None = None
) -> tuple[int, int] | None:
    """A pidfd for the VM's running qemu as ``(pid, fd)``, or None.

    The identity check runs *after* the pidfd is opened: if it passes, the fd
    refers to the process that passed it (a process that died in between
    leaves a pidfd that reads as exited, which the caller sees at once).
    """
    pid = _pid_of(pid_path, expect)
    if pid is None:
        return None
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return None
    if not is_vm_process(pid, uuid, expect) or pidfd_exited(fd):
        os.close(fd)
        return None
    return pid, fd


def pidfd_exited(fd: int) -> bool:
    """A pidfd polls readable once its process has exited."""
    return pidfd_wait(fd, 0.0)


def pidfd_wait(fd: int, timeout: float) -> bool:
    """Wait up to ``timeout`` s for the process to exit; True if it did.

    poll, not select: a daemon with hundreds of VMs has fds past select's 1024.
    """
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(timeout, 0.0) * 1000))


def pidfds_exited(fds: dict[str, int], timeout: float) -> list[str]:
    """Wait up to ``timeout`` s for any of ``fds`` (name -> pidfd) to exit;
    returns the names of those that have."""
    poller = select.poll()
    names = {}
    for name, fd in fds.items():
        poller.register(fd, select.POLLIN)
        names[fd] = name
    return [names[fd] for fd, _ in poller.poll(max(timeout, 0.0) * 1000)]


def pidfd_signal(fd: int, sig: signal.Signals) -> bool:
    """Send ``sig``; False when the process is already gone."""
    try:
        signal.pidfd_send_signal(fd, sig)
    except ProcessLookupError:
        return False
    return True


# The forced end of a qemu, whoever forces it (``vmadm stop -F`` here, the
# daemon at a stop's deadline after its ``quit``): each signal, then how long
# to wait for the exit.  SIGKILL cannot be ignored, but a process in
# uninterruptible sleep can take a moment.
SIGNAL_LADDER: tuple[tuple[str, signal.Signals, float], ...] = (
    ("sigterm", signal.SIGTERM, 3.0),
    ("sigkill", signal.SIGKILL, 10.0),
)


def kill_vm(pid_path: str, uuid: str, expect: Identity | None = None) -> str | None:
    """Force the VM's qemu to exit through ``SIGNAL_LADDER``; wait until gone.

    Returns the stage that ended it (``"sigterm"``/``"sigkill"``), or None when
    it was not running.  "Already gone" is success.
    """
    found = open_vm_pidfd(pid_path, uuid, expect)
    if found is None:
        return None
    _, fd = found
    try:
        for stage, sig, wait in SIGNAL_LADDER:
            if not pidfd_signal(fd, sig) or pidfd_wait(fd, wait):
                return stage
        raise TimeoutError(f"qemu of VM {uuid} survived SIGKILL")
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
