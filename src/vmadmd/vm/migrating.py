"""A live migration as ``vm.json`` records it, and a VM arriving by one.

Both daemons persist where a migration stands before acting on it, so a
daemon killed at any step resolves it at its next start
(``daemon/migration.py``)::

    "migration": {"role": "source" | "target", "state": STATE,
                  "peer": "root@host" (source) | "" (target), "since": <ms>}

On the source, ``copying`` (disks and RAM on their way; the VM runs here)
and ``committing`` (the RAM state is complete, the source qemu paused, the
target asked to take over).  On the target, ``incoming`` (a paused qemu
receiving) and ``committed`` (told to take over: it runs the VM from now
on).  What a restarted daemon does with each: ``resolution``.

The arriving VM is this host's own VM from the start: a zone of its own
(a uid from this host's ledger, never the source's), its disks made empty
at the sizes the source gave and filled over NBD, a tap name derived anew.

Standard library only: ``vmadm`` imports this.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

from vmadmd.errors import InvalidParameter, VmExists
from vmadmd.vm import transition
from vmadmd.vm.store import VmRecord, validate_uuid

KEY = "migration"

Role = Literal["source", "target"]
State = Literal["copying", "committing", "incoming", "committed"]
Resolution = Literal["resume", "ask_target", "discard", "take_over"]

# What a record from another host must not bring: that host's runtime facts.
FOREIGN_KEYS = (
    "qemu_identity", transition.KEY, "zone_uid", "boot_timestamp", "last_exit", KEY, "pending",
    "zonepath", "state", "zone_state", "pid", "transition_to", "transition_expire",
)  # fmt: skip
MAX_DISK_BYTES = 1 << 50  # 1 PiB: a size past this is not a disk, it is a mistake


class Migration(NamedTuple):
    role: Role
    state: State
    peer: str
    since_ms: int
    workdir: str = ""  # the daemon's temp dir of its sockets: removed when settled

    def to_json(self) -> dict[str, Any]:
        out = {"role": self.role, "state": self.state, "peer": self.peer, "since": self.since_ms}
        return {**out, "dir": self.workdir} if self.workdir else out

    def with_state(self, state: State) -> Migration:
        return self._replace(state=state)

    @classmethod
    def of(cls, record: VmRecord) -> Migration | None:
        """The migration a VM record shows in progress; None when none (or malformed)."""
        raw = record.get(KEY)
        if not isinstance(raw, dict):
            return None
        role, state, peer, since = (raw.get(k) for k in ("role", "state", "peer", "since"))
        if role not in ("source", "target") or state not in (
            "copying", "committing", "incoming", "committed"
        ):  # fmt: skip
            return None
        if not isinstance(peer, str) or not isinstance(since, int) or isinstance(since, bool):
            return None
        workdir = raw.get("dir", "")
        return cls(role, state, peer, since, workdir if isinstance(workdir, str) else "")

    def resolution(self) -> Resolution:
        """What a daemon that (re)starts does with a migration it finds.

        ``resume``: the source runs the VM on (whatever the target got, it
        was never told to take over: its receiver aborts when the source's
        side goes).  ``ask_target``: the source had asked the target to take
        over; only the target knows whether it did.  ``discard``: an incoming
        VM never told to take over goes.  ``take_over``: the target was told
        to take over: it runs the VM.
        """
        if self.role == "source":
            return "resume" if self.state == "copying" else "ask_target"
        return "discard" if self.state == "incoming" else "take_over"


def arriving_record(sent: object) -> VmRecord:
    """The record another host sent, without that host's runtime facts.

    The VM keeps its properties and uuid; its disks keep their model and
    boot flag and lose their paths (made here) and image (flattened: the
    mirror copies every block, the image's included).
    """
    if not isinstance(sent, dict):
        raise InvalidParameter("vm must be the VM's vm.json object")
    uuid = validate_uuid(str(sent.get("uuid", "")))
    record = {k: v for k, v in sent.items() if k not in FOREIGN_KEYS}
    record["uuid"] = uuid
    disks = record.get("disks", [])
    nics = record.get("nics", [])
    if not isinstance(disks, list) or not all(isinstance(d, dict) for d in disks):
        raise InvalidParameter("vm.disks must be a list of objects")
    if not isinstance(nics, list) or not all(isinstance(n, dict) for n in nics):
        raise InvalidParameter("vm.nics must be a list of objects")
    for name in ("ram", "vcpus"):
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InvalidParameter(f"vm.{name} must be a positive integer")
    record["disks"] = [
        {k: v for k, v in d.items() if k not in ("path", "image_uuid", "image_format")}
        for d in disks
    ]
    return record


def check_sizes(record: VmRecord, sizes: object) -> list[int]:
    """The disks' sizes in bytes, one per disk of ``record``."""
    if not isinstance(sizes, list) or len(sizes) != len(record["disks"]):
        raise InvalidParameter("disk_sizes must give one size in bytes per disk")
    out = []
    for i, size in enumerate(sizes):
        if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= MAX_DISK_BYTES:
            raise InvalidParameter(f"disk_sizes[{i}] must be a size in bytes")
        out.append(size)
    return out


def make_disks(record: VmRecord, sizes: Sequence[int], zonepath: str) -> None:
    """Empty qcow2 disks ``<zonepath>/disk<N>.qcow2`` of these sizes, in ``record``."""
    for i, (disk, size) in enumerate(zip(record["disks"], sizes, strict=True)):
        path = os.path.join(zonepath, f"disk{i}.qcow2")
        res = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", path, str(size)],
            stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise InvalidParameter(
                f"qemu-img create failed: {res.stderr.decode(errors='replace').strip()}"
            )
        disk.update(path=path, image_format="qcow2", size=-(-size // (1 << 20)))


def is_workdir(path: str) -> bool:
    """Whether ``path`` is a migration's temp dir (what a settle may remove)."""
    import tempfile

    parent, name = os.path.split(os.path.normpath(path))
    return parent == tempfile.gettempdir() and name.startswith("vmadmd-mig-")


def refuse_existing(exists: bool, uuid: str) -> None:
    if exists:
        raise VmExists(f"a VM with uuid {uuid} already exists on this host")
