"""The VMs' own uids: one host-wide ledger, so no uid is ever handed out twice.

A VM's ``zone_uid`` owns its ``root/``, its disks and its taps.  Two VMs
with one uid could read and write each other's files, and a new VM given a
deleted VM's uid would own whatever that VM left behind (a file in a shared
directory, a tap, a process).  So uids are not "the lowest free one in this
zones root": every uid ever given is written to one ledger shared by every
zones root of the host (``--uid-ledger`` / ``VMADM_UID_LEDGER``, default
``/var/lib/vmadmd/zone-uids``), and the next one is always above them all.

The ledger is append-only text, one line per uid handed out::

    <uid> <vm uuid> <time, ISO 8601> <zones root, as JSON>

(``#`` lines are comments).  It is ``flock``-ed for the whole allocation, so
two ``vmadm create`` and the daemon, on any zones roots, take turns; the
line is written and fsync-ed before the uid is used.  A uid is never
removed, not even when its VM is deleted: uids are plentiful (from
2,000,000,000 up to 2^32-2 is over two thousand million VMs).

VMs created before the ledger existed are taken into it the first time a
uid is allocated in their zones root (their uids count as handed out), and
a uid that names an account of the host (``/etc/passwd``, NSS) is skipped.

Standard library only: the CLI imports this (lazily, at create).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterable, Iterator, Mapping

from vmadmd.errors import VmadmError

# The largest uid: (uid_t)-1 means "no change" to chown and setresuid.
MAX_UID = 2**32 - 2
HEADER = "# vmadmd: every zone uid ever handed out, never to be handed out again\n"


def read_ledger(fd: int) -> set[int]:
    """The uids in the ledger open at ``fd`` (read from its start)."""
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    uids = set()
    for line in b"".join(chunks).splitlines():
        first = line.split(b" ", 1)[0]
        # A comment, or a line torn by a crash mid-write: it never lowers the
        # next uid (that is above every whole line), so it can be skipped.
        if first.isdigit():
            uids.add(int(first))
    return uids


def _is_account(uid: int) -> bool:
    import pwd

    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _record(fd: int, lines: Iterable[str]) -> None:
    data = "".join(lines).encode()
    if not data:
        return
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _open(path: str) -> int:
    """The ledger, made if missing (its directory 0700, the file 0600, root's)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, 0o700, exist_ok=True)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError as err:
        raise VmadmError(f"uid ledger {path}: {err.strerror}") from None


@contextlib.contextmanager
def locked(path: str) -> Iterator[int]:
    """The ledger at ``path`` open (made if missing) and ``flock``-ed: one
    allocation at a time on the whole host."""
    fd = _open(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def allocate(
    fd: int, base: int, uuid: str, zones_root: str, when: str, known: Mapping[int, str]
) -> int:
    """A uid never handed out before on this host, recorded for ``uuid``.

    ``fd``: the ledger, held by ``locked``.  ``known``: uid -> uuid of the
    VMs of ``zones_root`` (read under the lock); those the ledger lacks (VMs
    from before it) are recorded first.  The uid is above every uid in the
    ledger and ``known`` and at least ``base``, and names no host account.
    """
    import json

    taken = read_ledger(fd)
    root = json.dumps(os.path.abspath(zones_root))
    size = os.fstat(fd).st_size
    lines = [] if size else [HEADER]
    if size and os.pread(fd, 1, size - 1) != b"\n":
        lines.append("\n")  # a line torn by a crash: ours must start a line of its own
    lines += [f"{u} {known[u]} {when} {root}\n" for u in sorted(set(known) - taken)]
    uid = max(taken | set(known) | {base - 1, 0}) + 1  # never 0 (root)
    while uid <= MAX_UID and _is_account(uid):
        uid += 1
    if uid > MAX_UID:
        raise VmadmError(f"no zone uid is left above {base} (uid ledger: every one was used)")
    lines.append(f"{uid} {uuid} {when} {root}\n")
    try:
        _record(fd, lines)
    except OSError as err:
        raise VmadmError(f"cannot write the uid ledger: {err.strerror}") from None
    return uid
