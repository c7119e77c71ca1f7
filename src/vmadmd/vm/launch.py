"""Starting a VM's qemu confined: its own user, no privileges, its own cgroup.

Each step an ``exec`` or a ``fork`` of the step before::

    sh -c LAUNCHER       root, in the VM's runtime dir (``root/tmp``), a new
      │                  session; writes its pid to the VM's cgroup.procs
      │                  files, forks the waiter and exits
      └─ ( waiter )      root, qemu's parent: forks qemu, prints its pid,
         │               waits for it and writes its wait status to
         │               ``<zonepath>/qemu.exit`` (``$?``: 128 + the signal
         │               that killed it), then exits
         └─ setpriv ...  drops to the VM's uid and gid, clears the groups,
            └─ qemu ...  every capability set and the bounding set, sets
                         NoNewPrivs, then exec's qemu (same pid)

The waiter is the Linux stand-in for a zone's ``zsched``: a few hundred KiB
of ``sh`` that lets the daemon, which is not qemu's parent (qemu outlives
it), say which signal killed a crashed qemu (a seccomp kill is ``SIGSYS``).

So qemu never runs as root, not even before it would drop privileges itself
(``-runas`` needs the setuid that the sandbox's ``elevateprivileges=deny``
forbids); it is inside its cgroup's limits from birth; and it is re-parented
away from its starter, in a session of its own with no terminal, as
``-daemonize`` would have made it (which the sandbox's ``spawn=deny``
kills).  Its stdout and stderr go to ``<zonepath>/qemu.log`` (root's,
outside the hostile ``root/``), opened here and inherited.

qemu in the foreground has no parent to tell that it is up: it is up when
its QMP socket greets, from that very process (``SO_PEERCRED``: a socket
planted in ``root/tmp`` by someone else is not taken for it).  If it exits
first, the last line it wrote to ``qemu.log`` is the reason given.

Standard library only: ``vmadm start`` runs this.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import time
from collections.abc import Sequence
from typing import NamedTuple

from vmadmd.errors import StartFailed
from vmadmd.vm import proc, zonefs

LOG_NAME = "qemu.log"
EXIT_NAME = "qemu.exit"
LOG_TAIL = 4096

# $@: the exit file, the cgroup.procs files, "--", the command.  qemu's
# stdin is /dev/null and its stdout joins stderr (the log); the waiter lets
# go of the pipe the pid is printed on at once, so reading it ends when the
# launcher exits.
LAUNCHER = (
    "exitfile=$1; shift; "
    'while [ "$#" -gt 0 ] && [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; '
    "shift; "
    '( "$@" </dev/null >&2 & echo $!; exec >/dev/null; wait $!; echo $? > "$exitfile" ) &'
)


class Confinement(NamedTuple):
    """Who qemu runs as, and the cgroup it is born in: ``cgroup_procs`` to
    join before the fork, or ``prefix`` to run it under (``systemd-run
    --scope ... --``, which registers its own pid and exec's the rest)."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    cgroup_procs: tuple[str, ...] = ()
    prefix: tuple[str, ...] = ()


# The launcher runs as root with the VM's root/tmp as its working directory:
# nothing it runs may be found through a PATH entry that is relative (".",
# or empty, which means the same), or it would run what the VM's user put
# there.  Every program is resolved to an absolute path beforehand, in our
# own working directory, from the absolute entries of our PATH (root's own
# choice: a test's fake systemd-run, say), else from SAFE_PATH; the
# launcher gets a fixed environment.
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Passed through to qemu: its own variables, and the test stand-in's.
PASSED_ENV_PREFIXES = ("QEMU_", "VMADMD_STANDIN_")


def search_path() -> str:
    """Our PATH without its relative entries (SAFE_PATH when none is left)."""
    entries = [p for p in os.environ.get("PATH", "").split(os.pathsep) if os.path.isabs(p)]
    return os.pathsep.join(entries) or SAFE_PATH


def resolve_program(name: str) -> str:
    """``name`` as an absolute path: looked up in ``search_path()`` when it is
    a bare name, made absolute (against our working directory, never the
    VM's) when it is a path.  StartFailed when there is no such program."""
    import shutil

    if os.sep in name:
        path = os.path.abspath(name)
        if not os.access(path, os.X_OK):
            raise StartFailed(f"{name} is not an executable program")
        return path
    found = shutil.which(name, path=search_path())
    if found is None:
        raise StartFailed(f"{name} not found in {search_path()}")
    return found


def launcher_env() -> dict[str, str]:
    """The launcher's whole environment: fixed, whatever ours is."""
    env = {"PATH": SAFE_PATH, "LC_ALL": "C"}
    env.update((k, v) for k, v in os.environ.items() if k.startswith(PASSED_ENV_PREFIXES))
    return env


def setpriv_argv(confine: Confinement) -> list[str]:
    groups = (
        f"--groups={','.join(str(g) for g in confine.groups)}"
        if confine.groups
        else "--clear-groups"
    )
    return [
        resolve_program("setpriv"), f"--reuid={confine.uid}", f"--regid={confine.gid}", groups,
        "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
    ]  # fmt: skip


def launch(
    argv: Sequence[str],
    *,
    zonepath: str,
    confine: Confinement,
    pass_fds: Sequence[int] = (),
    qmp_name: str = "vm.qmp",
    pid_name: str = "vm.pid",
    timeout: float = 60.0,
) -> int:
    """Start ``argv`` confined, in ``<zonepath>/root/tmp``; returns its pid once
    its QMP socket greets.  Raises StartFailed with qemu's own reason."""
    import subprocess

    if confine.uid == 0 or confine.gid == 0:
        raise StartFailed("refusing to run a VM's qemu as root")
    # Resolved here, in our own working directory, never in the VM's.
    argv = [resolve_program(argv[0]), *argv[1:]]
    prefix = [resolve_program(confine.prefix[0]), *confine.prefix[1:]] if confine.prefix else []
    setpriv = setpriv_argv(confine)
    dfd = zonefs.open_dir(zonepath, "root", "tmp")
    try:
        log_path = os.path.join(zonepath, LOG_NAME)
        exit_path = os.path.join(zonepath, EXIT_NAME)
        # Empty until the waiter writes the status into it: that it exists
        # tells the daemon a status is coming (a qemu with no waiter, one the
        # previous version started, leaves none, and is not waited for).
        os.close(
            os.open(
                exit_path,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        )
        log_fd = os.open(
            log_path,
            os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
        try:
            res = subprocess.run(
                ["/bin/sh", "-c", LAUNCHER, "sh", exit_path, *confine.cgroup_procs, "--",
                 *prefix, *setpriv, *argv],
                # The runtime dir as opened without following links, not by
                # its path (root/ is the VM's user's to rename and re-link).
                cwd=f"/proc/self/fd/{dfd}",
                env=launcher_env(),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log_fd,
                pass_fds=tuple(pass_fds), start_new_session=True, timeout=10, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise StartFailed("the launcher did not return within 10 s") from None
        finally:
            os.close(log_fd)
        if res.returncode != 0 or not res.stdout.strip().isdigit():
            raise StartFailed(f"qemu failed to start: {_reason(log_path, res.returncode)}")
        pid = int(res.stdout)
        _write_pid(dfd, pid_name, pid)
        _wait_ready(dfd, qmp_name, pid, log_path, timeout)
        return pid
    finally:
        os.close(dfd)


def _write_pid(dfd: int, name: str, pid: int) -> None:
    """``vm.pid`` written by root into the VM's directory: a fresh file renamed
    over whatever is at that name (a link, a FIFO), never opened through it."""
    tmp = f".{name}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp, dir_fd=dfd)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=dfd)  # fmt: skip
    try:
        os.write(fd, f"{pid}\n".encode())
    finally:
        os.close(fd)
    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)


def _wait_ready(dfd: int, qmp_name: str, pid: int, log_path: str, timeout: float) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        raise StartFailed(f"qemu failed to start: {_reason(log_path, None)}") from None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.pidfd_exited(pidfd):
                raise StartFailed(f"qemu failed to start: {_reason(log_path, None)}")
            left = deadline - time.monotonic()
            if left <= 0:
                proc.pidfd_signal(pidfd, signal.SIGKILL)
                raise StartFailed(f"qemu did not answer on QMP within {timeout:.0f} s")
            if _greets(dfd, qmp_name, pid, pidfd, left):
                return
            proc.pidfd_wait(pidfd, 0.005)
    except BaseException:
        proc.pidfd_signal(pidfd, signal.SIGKILL)
        raise
    finally:
        os.close(pidfd)


def _greets(dfd: int, name: str, pid: int, pidfd: int, timeout: float) -> bool:
    """Whether ``pid``'s QMP socket sends its greeting (False: not yet there)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(f"/proc/self/fd/{dfd}/{name}")
        except (FileNotFoundError, ConnectionRefusedError):
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        peer_pid = struct.unpack("3i", creds)[0]
        if peer_pid != pid:
            raise StartFailed(f"{name} in the VM's root/tmp is not its qemu's (served by pid "
                              f"{peer_pid}, not {pid})")  # fmt: skip
        # qemu writes its greeting once its main loop runs, after every
        # device is set up: the first byte of it means "up" (what follows is
        # the monitor's business, whatever it is).
        ready, _, _ = select.select([sock.fileno(), pidfd], [], [], timeout)
        if sock.fileno() not in ready:
            return False  # exited (the caller says why), or not up in time
        return bool(sock.recv(1))
    finally:
        sock.close()


def _reason(log_path: str, status: int | None) -> str:
    """The last line qemu (or the launcher) wrote to its log."""
    try:
        with open(log_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(max(0, size - LOG_TAIL))
            tail = f.read(LOG_TAIL).decode(errors="replace")
    except OSError:
        tail = ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    if lines:
        return lines[-1]
    return f"exit status {status}" if status is not None else "it exited at once"


def exit_status(zonepath: str) -> int | None:
    """qemu's wait status as its waiter wrote it (128 + n: killed by signal n),
    or None when there is none (yet)."""
    try:
        with open(os.path.join(zonepath, EXIT_NAME), "rb") as f:
            text = f.read(16).strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def has_waiter(zonepath: str) -> bool:
    """Whether this qemu has a waiter to write its status (the launcher leaves
    the file empty for it; a qemu started otherwise has none)."""
    return os.path.lexists(os.path.join(zonepath, EXIT_NAME))
