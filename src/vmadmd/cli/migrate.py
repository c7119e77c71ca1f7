"""``vmadm migrate`` and its far end, ``vmadm receive --live``.

``vmadm migrate UUID [user@]host`` asks the local vmadmd to migrate the VM
(``POST /vm/UUID?action=migrate``) and follows it (``GET
/vm/UUID/migration``), with its progress on a terminal.  The daemon does the
work (``daemon/migration.py``): it runs ``ssh host vmadm receive --live``,
whose stdin and stdout are the control channel, one JSON object a line:

    source: {"vm": {...}, "disk_sizes": [bytes, ...]}
    target: {"uuid", "nbd": PATH, "migration": PATH}   or {"error": "..."}
    source: {"commit": true}
    target: {"ok": true}                               or {"error": "..."}

End of input before the commit (the source gave up, its daemon died, ssh
dropped) discards the incoming VM; so does this process's own death (the
target's daemon watches its pid).  ``--status UUID`` answers a source that
lost the commit's answer: ``{"state": "absent" | "incoming" | "committed" |
"running" | ...}``.

Standard library only.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Any

from vmadmd.errors import InvalidParameter, VmadmError, VmNotFound
from vmadmd.vm.ids import validate_uuid

if TYPE_CHECKING:
    import argparse

    from vmadmd.cli.client import Client

MAX_OFFER = (1 << 20) + (64 << 10)
FOLLOW_PERIOD = 0.1


def _client(timeout: float = 120.0) -> Client:
    from vmadmd.cli.client import Client
    from vmadmd.vm.config import client_socket

    return Client(client_socket(), timeout=timeout)


def _size(n: object) -> str:
    value = float(n) if isinstance(n, (int, float)) else 0.0
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def progress_line(p: dict[str, Any]) -> str:
    """One line of progress from the daemon's figures (qemu's own)."""
    state = p.get("state")
    disks = p.get("disks") or {}
    ram = p.get("ram") or {}
    if state == "copying_disks":
        return f"copying disks: {_size(disks.get('copied'))} of {_size(disks.get('total'))}"
    if state == "migrating_ram":
        total, remaining = ram.get("total") or 0, ram.get("remaining") or 0
        return (
            f"migrating RAM: {_size(ram.get('transferred'))} sent, "
            f"{_size(remaining)} of {_size(total)} left"
        )
    return str(state).replace("_", " ")


def cmd_migrate(args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    client = _client()
    params = {"action": "migrate", "target": args.target}
    if args.bandwidth is not None:
        params["bandwidth"] = str(args.bandwidth)
    client.request("POST", f"/vm/{uuid}", params)
    tty = sys.stderr.isatty()
    shown = ""
    while True:
        time.sleep(FOLLOW_PERIOD)
        _, p = client.request("GET", f"/vm/{uuid}/migration")
        if tty:
            line = progress_line(p)
            if line != shown:
                sys.stderr.write(f"\r\033[K{line}")
                sys.stderr.flush()
                shown = line
        if p.get("state") == "done":
            if tty:
                sys.stderr.write("\r\033[K")
            sys.stderr.write(
                f"Successfully migrated VM {uuid} to {args.target} "
                f"(downtime {p.get('downtime_ms')} ms, total {p.get('total_ms')} ms)\n"
            )
            return
        if p.get("state") == "failed":
            if tty:
                sys.stderr.write("\r\033[K")
            raise VmadmError(f"migration of VM {uuid} failed: {p.get('error')}")


def _say(data: dict[str, Any]) -> None:
    import json

    sys.stdout.write(json.dumps(data) + "\n")
    sys.stdout.flush()


def cmd_receive_live(args: argparse.Namespace) -> int:
    """The target's end of a live migration (run by the source over ssh)."""
    import json

    if args.status is not None:
        uuid = validate_uuid(args.status)
        try:
            _, data = _client().request("GET", f"/vm/{uuid}/incoming")
        except VmNotFound:
            data = {"uuid": uuid, "state": "absent"}
        _say(data)
        return 0
    line = sys.stdin.buffer.readline(MAX_OFFER)
    try:
        offer = json.loads(line)
        if not isinstance(offer, dict):
            raise InvalidParameter("the offer is not a JSON object")
    except ValueError:
        _say({"error": "the offer is not JSON"})
        return 1
    client = _client()
    try:
        _, reply = client.request(
            "POST",
            "/vms/incoming",
            body={"vm": offer.get("vm"), "disk_sizes": offer.get("disk_sizes"),
                  "receiver": os.getpid()},
        )  # fmt: skip
    except VmadmError as err:
        _say({"error": str(err)})
        return 1
    _say(reply)
    uuid = str(reply["uuid"])
    line = sys.stdin.buffer.readline(4096)
    try:
        commit = json.loads(line).get("commit") is True if line else False
    except (ValueError, AttributeError):
        commit = False
    if not commit:
        try:
            client.request("POST", f"/vm/{uuid}/incoming", {"action": "abort"})
        except VmadmError as err:
            sys.stderr.write(f"vmadm: {err}\n")
        return 1
    try:
        client.request("POST", f"/vm/{uuid}/incoming", {"action": "commit"})
    except VmadmError as err:
        _say({"error": str(err)})
        return 1
    _say({"ok": True})
    return 0
