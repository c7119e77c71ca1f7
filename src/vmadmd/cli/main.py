"""``vmadm``: create, inspect and drive VMs; the daemon's operations go through its API.

Standard library only, so that it starts fast.  Every failure prints one
line on stderr and exits 1.
"""

from __future__ import annotations

import os
import sys
import time

from vmadmd.errors import InvalidParameter, VmadmError, WrongState
from vmadmd.vm.config import VmSettings, client_socket
from vmadmd.vm.ids import validate_uuid

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing (vmadm start-up)
if TYPE_CHECKING:  # (collections.abc too: ~1.3 ms of start-up for annotations)
    import argparse
    from collections.abc import Callable, Sequence
    from typing import Any, NoReturn

    from vmadmd.cli.client import Client
    from vmadmd.vm.layer import VmLayer

# The VM layer, the HTTP client and their imports load only when a command
# needs them: every vmadm call pays for what it imports (goal: < 50 ms).

DEFAULT_TIMEOUT = 180
SECRETS = ("vnc_password",)  # `key=-` reads these from stdin
LIST_FIELDS = ("uuid", "type", "ram", "state", "alias")
DEFAULT_SORT = ("ram", "uuid")  # as SmartOS lists


def _client() -> Client:
    from vmadmd.cli.client import Client

    return Client(client_socket())


class Context:
    """What a command may need, created on first use."""

    def __init__(self) -> None:
        self._layer: VmLayer | None = None

    @property
    def layer(self) -> VmLayer:
        if self._layer is None:
            from vmadmd.vm.layer import VmLayer

            self._layer = VmLayer(VmSettings.from_env())
        return self._layer


def _read_json(path: str | None) -> Any:
    import json

    try:
        if path is None or path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as err:
        raise InvalidParameter(f"cannot read {path}: {err.strerror}") from err
    try:
        return json.loads(text)
    except ValueError as err:
        raise InvalidParameter(f"invalid JSON: {err}") from err


def _done(message: str) -> None:
    """SmartOS's success line: on stderr, first and alone (automation matches it there)."""
    sys.stderr.write(message + "\n")


def _print_json(data: Any) -> None:
    import json

    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _selected(layer: VmLayer, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The VMs the filters pick (``args.filters``), in ``-s`` order."""
    from vmadmd.cli import select

    filters = select.parse_filters(args.filters)
    vms = [_with_type(vm) for vm in layer.list()]
    chosen = [vm for vm in vms if select.matches(vm, filters)]
    return select.sort(chosen, select.field_list(getattr(args, "s", None), DEFAULT_SORT))


def _with_type(vm: dict[str, Any]) -> dict[str, Any]:
    """SmartOS's ``type`` column: KVM for our (kvm) VMs."""
    vm["type"] = "KVM" if vm.get("brand", "kvm") == "kvm" else "OS"
    return vm


def cmd_create(ctx: Context, args: argparse.Namespace) -> None:
    layer = ctx.layer
    payload = _read_json(args.file)
    uuid = layer.create(payload)
    if layer.store.load(uuid).get("autoboot"):
        try:
            layer.start(uuid)
        except VmadmError as err:
            raise VmadmError(f"created VM {uuid} but it failed to boot: {err}") from err
    _done(f"Successfully created VM {uuid}")


def cmd_list(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.cli import select

    fields = select.field_list(args.o, LIST_FIELDS)
    rows = [
        [select.printable(select.text(next(iter(select.values_at(vm, tuple(f.split(".")))), None)))
         for f in fields]
        for vm in _selected(ctx.layer, args)
    ]  # fmt: skip
    if args.p:
        for row in rows:
            print(":".join(row))
        return
    header = [f.upper() for f in fields]
    table = rows if args.H else [header, *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(fields))] if table else []
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_lookup(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.cli import select

    vms = _selected(ctx.layer, args)
    if args.one and len(vms) != 1:
        raise VmadmError(f"lookup -1 wants exactly one VM, and {len(vms)} match")
    if args.j:
        if args.o is not None:
            fields = select.field_list(args.o, ())
            vms = [{f: vm[f] for f in fields if f in vm} for vm in vms]
        _print_json(vms)
        return
    for vm in vms:
        print(vm["uuid"])


def cmd_get(ctx: Context, args: argparse.Namespace) -> None:
    layer = ctx.layer
    _print_json(layer.get(validate_uuid(args.uuid)))


def cmd_start(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    boot = None
    if args.options:
        from vmadmd.vm.bootopts import BootOptions

        boot = BootOptions.from_args(args.options)
    layer = ctx.layer
    layer.start(uuid, boot=boot)
    _done(f"Successfully started VM {uuid}")


def _wait_exits(
    layer: VmLayer, uuids: list[str], limit: float, status: Callable[[int], str] | None = None
) -> list[str]:
    """Wait until the current qemu of each VM has exited, ``limit`` s at most;
    the uuids still running then.  On a tty, ``status(still running)`` is
    shown as it goes."""
    from vmadmd.vm import proc
    from vmadmd.vm.layer import running_pidfd

    fds: dict[str, int] = {}
    for uuid in uuids:
        found = running_pidfd(layer.store, uuid, layer.store.load(uuid))
        if found is not None:
            fds[uuid] = found[1]
    tty = status is not None and sys.stderr.isatty()
    deadline = time.monotonic() + limit
    try:
        while fds and time.monotonic() < deadline:
            for uuid in proc.pidfds_exited(fds, 0.25):
                os.close(fds.pop(uuid))
            if tty and status is not None:
                sys.stderr.write(f"\r{status(len(fds))}")
                sys.stderr.flush()
    finally:
        for fd in fds.values():
            os.close(fd)
        if tty:
            sys.stderr.write("\r\033[K")
    return sorted(fds)


def _graceful(layer: VmLayer, uuid: str, args: argparse.Namespace, action: str) -> None:
    """Ask vmadmd for a stop or reboot, then wait until the current qemu is gone."""
    if args.t <= 0:
        raise InvalidParameter("-t must be a positive number of seconds")
    _, body = _client().request("POST", f"/vm/{uuid}", {"action": action, "timeout": str(args.t)})
    transition = body.get("transition", {}) if isinstance(body, dict) else {}
    expire = transition.get("expire")
    expire_ms = expire if isinstance(expire, int) else None

    def countdown(_: int) -> str:
        left = max(0.0, (expire_ms or 0) / 1000 - time.time())
        return f"waiting for VM {uuid} to stop: forced stop in {left:4.0f} s"

    try:
        if _wait_exits(layer, [uuid], args.t + 60, countdown if expire_ms else None):
            raise VmadmError(f"VM {uuid} is still running {args.t + 60} s after the stop request")
    except KeyboardInterrupt:
        raise VmadmError(
            f"stopped waiting; vmadmd goes on with the {action} of VM {uuid}"
        ) from None


def _ended(vm: dict[str, Any]) -> str:
    """How a VM stopped, in words, from its last_exit."""
    from vmadmd.vm.ending import Ending

    last = Ending.of(vm)
    return last.words() if last is not None else "stopped"


def _stop_all(layer: VmLayer, args: argparse.Namespace) -> None:
    """Host shutdown: every running VM gets its power button and one deadline."""
    from vmadmd.vm import transition

    if args.t <= 0:
        raise InvalidParameter("-t must be a positive number of seconds")
    _, body = _client().request("POST", "/vms", {"action": "stop", "timeout": str(args.t)})
    uuids = [validate_uuid(u) for u in body.get("stopping", []) if isinstance(u, str)]
    start = time.monotonic()

    def progress(running: int) -> str:
        left = max(0.0, args.t - (time.monotonic() - start))
        return f"stopping: {running} of {len(uuids)} still running, forced in {left:4.0f} s"

    # The deadline, then the forcing steps.
    still = _wait_exits(layer, uuids, args.t + 60, progress)
    for uuid in uuids:
        if uuid in still:
            print(f"{uuid}  still running")
            continue
        # The daemon settles vm.json (clears the transition, records how
        # the VM ended) a moment after qemu is gone.
        settle_by = time.monotonic() + 5
        vm = layer.store.load(uuid)
        while transition.KEY in vm and time.monotonic() < settle_by:
            time.sleep(0.02)
            vm = layer.store.load(uuid)
        print(f"{uuid}  {_ended(vm)}")
    if still:
        raise VmadmError(f"{len(still)} of {len(uuids)} VMs still running after the deadline")


def cmd_stop(ctx: Context, args: argparse.Namespace) -> None:
    layer = ctx.layer
    if args.all:
        if args.uuid is not None or args.F:
            raise InvalidParameter("--all takes no uuid and no -F")
        _stop_all(layer, args)
        return
    if args.uuid is None:
        raise InvalidParameter("stop needs a uuid, or --all")
    uuid = validate_uuid(args.uuid)
    layer.store.load(uuid)  # an unknown VM: one clear line before anything else
    if not layer.is_running(uuid):
        raise WrongState(f"VM {uuid} is not running")
    # SmartOS's order: the flag is off before the stop is asked for, so an
    # interrupted `vmadm stop` never leaves a VM that boots with the host.
    layer.store.update(uuid, lambda vm: vm.update(autoboot=False))
    if args.F:
        layer.halt(uuid, set_autoboot=False)
    else:
        _graceful(layer, uuid, args, "stop")
    _done(f"Successfully completed stop for VM {uuid}")


def cmd_reboot(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    if args.F:
        _client().request("POST", f"/vm/{uuid}", {"action": "reset"})
    else:
        layer = ctx.layer
        layer.store.load(uuid)  # an unknown VM: one clear line before talking to vmadmd
        _graceful(layer, uuid, args, "reboot")
        # The daemon boots it again once the old qemu is gone; "running"
        # also means the transition is cleared.
        deadline = time.monotonic() + 120
        while layer.get(uuid)["state"] != "running":
            if time.monotonic() > deadline:
                raise VmadmError(f"VM {uuid} did not come back after the reboot")
            time.sleep(0.1)
    _done(f"Successfully completed reboot for VM {uuid}")


def cmd_info(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    # The daemon writes it as _print_json would: printed as it comes.
    params = {"type": args.types, "pretty": "true"} if args.types else {"pretty": "true"}
    _, body = _client().request("GET", f"/vm/{uuid}", params, raw=True)
    if body.endswith(b"\n"):
        sys.stdout.write(body.decode())
    else:  # a daemon from before ?pretty
        import json

        _print_json(json.loads(body))


def cmd_sysrq(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    _, body = _client().request("POST", f"/vm/{uuid}", {"action": "sysrq", "request": args.request})
    if args.request == "screenshot" and isinstance(body, dict) and body.get("path"):
        print(body["path"])
    else:
        print(f"Sent {args.request} to VM {uuid}")


def cmd_update(ctx: Context, args: argparse.Namespace) -> None:
    layer = ctx.layer
    uuid = validate_uuid(args.uuid)
    changes: dict[str, Any] = {}
    if args.file is not None or not args.pairs:
        if args.pairs:
            raise InvalidParameter("give either -f FILE or key=value pairs, not both")
        payload = _read_json(args.file)
        if not isinstance(payload, dict):
            raise InvalidParameter("an update payload must be a JSON object")
        changes = payload
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidParameter(f"expected key=value, not {pair!r}")
        from vmadmd.vm.props import parse_cli_value

        if key in SECRETS and value == "-":
            # A secret stays out of argv (shell history, /proc/*/cmdline).
            value = sys.stdin.readline().rstrip("\r\n")
        changes[key] = parse_cli_value(key, value)
    _, changed = layer.update(uuid, changes)
    warning = ""
    if changed & {"vnc_port", "vnc_password"} and layer.is_running(uuid):
        try:
            _client().request("POST", f"/vm/{uuid}", {"action": "reload_vnc"})
        except VmadmError as err:
            warning = f"vmadm: warning: VNC settings saved but not applied: {err}\n"
    if changed & {"disks", "nics"} and layer.is_running(uuid):
        warning += _apply_devices(uuid)
    _done(f"Successfully updated VM {uuid}")  # first: automation matches it there
    sys.stderr.write(warning)


def _apply_devices(uuid: str) -> str:
    """A running VM's new disks and nics applied by vmadmd (vm.json has them
    already); one line per change that waits for the next boot, and why."""
    try:
        _, body = _client().request("POST", f"/vm/{uuid}", {"action": "apply_devices"})
    except VmadmError as err:
        return f"vmadm: warning: saved, not applied to the running VM ({err}): at the next boot\n"
    failed = body.get("failed", [])
    why = {str(f.get("path") or f.get("mac")): f.get("error") for f in failed}
    general = [f.get("error") for f in failed if not (f.get("path") or f.get("mac"))]
    lines = []
    for change in body.get("pending", []):
        what = change.get("path") or change.get("mac")
        reason = why.get(str(what)) or (general or ["not a change qemu makes live"])[0]
        lines.append(f"vmadm: warning: {change['change']} {what}: {reason}: at the next boot\n")
    return "".join(lines)


def cmd_delete(ctx: Context, args: argparse.Namespace) -> None:
    layer = ctx.layer
    uuid = validate_uuid(args.uuid)
    layer.delete(uuid)
    _done(f"Successfully deleted VM {uuid}")


def cmd_validate(ctx: Context, args: argparse.Namespace) -> None:
    """SmartOS's ``vmadm validate``: the payload put through the very checks
    create or update run before they change anything, each property alone."""
    import json

    from vmadmd.vm import props

    if args.action == "update" and args.brand is None:
        raise InvalidParameter(
            "validate update needs the brand: vmadm validate update kvm [-f FILE]"
        )
    if args.action == "create" and args.brand is not None:
        raise InvalidParameter("validate create takes no brand: it is the payload's")
    if args.file in (None, "-") and sys.stdin.isatty():
        raise InvalidParameter("will not validate from stdin when stdin is a tty (give -f FILE)")
    payload = _read_json(args.file)
    if not isinstance(payload, dict):
        raise InvalidParameter("a payload must be a JSON object")
    check: Callable[[dict[str, object]], object]
    if args.action == "create":
        brand = payload.get("brand", "kvm")
        check = ctx.layer.check_create
    else:
        from vmadmd.vm.layer import parse_update

        brand, check = args.brand, parse_update
    report: dict[str, Any] = (
        props.payload_problems(payload, check) if brand == "kvm" else {"bad_brand": brand}
    )
    if any(report.values()):
        # SmartOS's answer: the object alone, on stderr, and exit 1.
        sys.stderr.write(json.dumps(report, indent=2) + "\n")
        raise SystemExit(1)
    sys.stderr.write(f"VALID {args.action} payload for {brand} brand VMs.\n")


def cmd_events(ctx: Context, args: argparse.Namespace) -> None:
    """SmartOS's ``vmadm events [-f] [-j] [-r] [uuid]``: the daemon's events
    as they happen, one line each, until interrupted."""
    params = {"vm": validate_uuid(args.uuid)} if args.uuid else {}
    if args.ready:
        params["ready"] = "true"
    data: list[str] = []
    try:
        for line in _client().stream("/events", params):
            # Server-sent events: "data:" lines, a blank line ends an event;
            # ":" lines keep the stream alive.
            if line.startswith("data:"):
                data.append(line[5:].strip())
            elif not line and data:
                import json

                event = json.loads("\n".join(data))
                data.clear()
                if isinstance(event, dict):
                    print(_event_line(ctx, event, args), flush=True)
    except KeyboardInterrupt:
        return


def _event_line(ctx: Context, event: dict[str, Any], args: argparse.Namespace) -> str:
    """One event as SmartOS prints it: ``[time] zone alias type`` (``-f``: the
    full date and uuid, nothing cut short), or a JSON line (``-j``)."""
    import json

    from vmadmd.cli.select import printable

    when = event.get("time")
    ms = int(when * 1000) if isinstance(when, (int, float)) else 0
    date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
    uuid = event.get("vm") if event.get("type") != "ready" else None
    if args.json:
        # The daemon's event, with SmartOS's names for its time and VM.
        extra = {"date": date, "zonename": uuid} if uuid else {"date": date}
        return json.dumps({**event, **extra}, separators=(",", ":"))
    shown = date if args.full else date.split("T")[1]
    kind = printable(str(event.get("type")))
    if event.get("type") == "ready":
        return f"[{shown}] ready (uuid {event.get('uuid')})" if args.full else f"[{shown}] ready"
    alias = "-"
    zone = "-"
    if isinstance(uuid, str):
        zone = uuid if args.full else uuid.split("-")[0]
        import contextlib

        with contextlib.suppress(VmadmError):  # deleted since, or unreadable: "-"
            alias = printable(str(ctx.layer.store.load(validate_uuid(uuid)).get("alias") or "-"))
        if len(alias) > 30 and not args.full:
            alias = alias[:27] + "..."
    line = f"[{shown}] {zone} {alias} {kind}"
    details = {k: v for k, v in event.items() if k not in ("id", "type", "time", "vm")}
    if details:
        line += ": " + " ".join(
            f"{printable(k)}={json.dumps(v, separators=(',', ':'))}" for k, v in details.items()
        )
    return line


def cmd_qmp(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    if (args.hmp is None) == (args.json is None):
        raise InvalidParameter("give a QMP command as JSON, or --hmp TEXT")
    if args.hmp is not None:
        request: Any = {"hmp": args.hmp}
    else:
        import json

        try:
            request = json.loads(args.json)
        except ValueError as err:
            raise InvalidParameter(f"invalid JSON: {err}") from err
        if not isinstance(request, dict):
            raise InvalidParameter('the QMP command must be an object: {"execute": ...}')
    _, body = _client().request("POST", f"/vm/{uuid}/qmp", body=request)
    result = body.get("return") if isinstance(body, dict) else body
    if isinstance(result, str):
        from vmadmd.cli.select import printable

        # The human monitor's text can carry what a user or guest chose (an
        # old alias as qemu's -name): escaped, but for its lines (qemu ends
        # them with CRLF) and tabs.
        result = printable(result.replace("\r\n", "\n"), keep="\n\t")
        sys.stdout.write(result if result.endswith("\n") or not result else result + "\n")
    else:
        _print_json(result)


def cmd_console(ctx: Context, args: argparse.Namespace) -> None:
    uuid = validate_uuid(args.uuid)
    if args.web:
        _, body = _client().request("POST", f"/vm/{uuid}", {"action": "console"})
        if isinstance(body, dict) and "url" in body:
            print(body["url"])
        else:
            _print_json(body)
        return
    from vmadmd.cli import serial

    sock = _client().connect()
    try:
        reason = serial.run(sock, uuid)
    finally:
        sock.close()
    sys.stderr.write(f"\r\n[{reason}]\n")


SNAPSHOT_TIMEOUT = 600.0  # a rollback stops, restores and boots the VM


def _snapshot_path(args: argparse.Namespace) -> tuple[str, str]:
    from vmadmd.cli.client import quote
    from vmadmd.vm.snapshots import validate_name

    uuid = validate_uuid(args.uuid)
    return uuid, f"/vm/{uuid}/snapshots/{quote(validate_name(args.name))}"


def cmd_create_snapshot(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm.snapshots import validate_name

    uuid = validate_uuid(args.uuid)
    _client().request("POST", f"/vm/{uuid}/snapshots", timeout=SNAPSHOT_TIMEOUT,
                      body={"name": validate_name(args.name)})  # fmt: skip
    _done(f"Created snapshot {args.name} for VM {uuid}")


def cmd_rollback_snapshot(ctx: Context, args: argparse.Namespace) -> None:
    uuid, path = _snapshot_path(args)
    _client().request("POST", path, {"action": "rollback"}, timeout=SNAPSHOT_TIMEOUT)
    _done(f"Rolled back snapshot {args.name} for VM {uuid}")


def cmd_delete_snapshot(ctx: Context, args: argparse.Namespace) -> None:
    uuid, path = _snapshot_path(args)
    _client().request("DELETE", path, timeout=SNAPSHOT_TIMEOUT)
    _done(f"Deleted snapshot {args.name} for VM {uuid}")


def _snapshot_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("name", help="at most 64 of A-Z a-z 0-9 - _ . : %%")


def cmd_send(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.vm import sendrecv

    uuid = validate_uuid(args.uuid)
    out = sys.stdout.fileno()
    if os.isatty(out):
        raise InvalidParameter("vmadm send writes a binary stream: redirect stdout (> FILE, | ...)")
    sys.stdout.flush()
    sendrecv.big_pipe(out)
    sendrecv.send(VmSettings.from_env(), uuid, out)


def cmd_receive(ctx: Context, args: argparse.Namespace) -> None:
    if args.live:
        from vmadmd.cli import migrate  # the far end of `vmadm migrate`

        code = migrate.cmd_receive_live(args)
        if code:
            raise SystemExit(code)
        return
    if args.status:
        raise InvalidParameter("receive: --status goes with --live")
    from vmadmd.vm import sendrecv

    src = sys.stdin.fileno()
    sendrecv.big_pipe(src)
    uuid = sendrecv.receive(VmSettings.from_env(), src)
    _done(f"Successfully received VM {uuid}")


def _no_args(c: argparse.ArgumentParser) -> None:
    pass


def cmd_migrate(ctx: Context, args: argparse.Namespace) -> None:
    from vmadmd.cli import migrate  # cli/migrate.py: live migration's both ends

    migrate.cmd_migrate(args)


def _migrate_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("target", metavar="[user@]host", help="the target vmadmd host, over ssh")
    c.add_argument("--bandwidth", type=int, metavar="MIBS",
                   help="at most this many MiB/s for the disks, and for the RAM")  # fmt: skip


def _receive_args(c: argparse.ArgumentParser) -> None:
    c.add_argument(
        "--live",
        action="store_true",
        help="the far end of `vmadm migrate` (run by the source over ssh)",
    )
    c.add_argument("--status", metavar="UUID",
                   help="with --live: how a VM arriving here stands, as JSON")  # fmt: skip


def _stop_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid", nargs="?")
    c.add_argument("-F", action="store_true", help="force")
    c.add_argument("-t", type=float, default=DEFAULT_TIMEOUT, metavar="SECS")
    c.add_argument("--all", action="store_true",
                   help="host shutdown: stop every running VM, autoboot left as it is")  # fmt: skip


def _console_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("--web", action="store_true",
                   help="print a one-time browser URL instead (screen and serial)")  # fmt: skip


def _qmp_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("json", nargs="?", metavar="JSON", help='e.g. \'{"execute": "query-status"}\'')
    c.add_argument("--hmp", metavar="TEXT", help="a human monitor command, e.g. 'info status'")


def _start_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("options", nargs="*", metavar="option=value",
                   help="for this boot only: order=X[,once=Y] (X, Y of c disk, d CD-ROM, "
                   "n network), cdrom=PATH,MODEL, disk=PATH,MODEL (PATH within the VM's "
                   "zone root; MODEL ide, scsi or virtio)")  # fmt: skip


def _with_uuid(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")


def _force_timeout(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("-F", action="store_true", help="force")
    c.add_argument("-t", type=float, default=DEFAULT_TIMEOUT, metavar="SECS")


def _selection_args(c: argparse.ArgumentParser, fields_help: str) -> None:
    c.add_argument("-o", metavar="FIELDS", help=fields_help)
    c.add_argument("-s", metavar="FIELDS", help="sort by these fields (-field: descending)")
    c.add_argument("filters", nargs="*", metavar="field=value|field=~regex")


def _list_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-H", action="store_true", help="no header")
    c.add_argument("-p", action="store_true", help="parsable: colon-separated, no header")
    _selection_args(c, "comma-separated fields")


def _lookup_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-j", action="store_true", help="a JSON array of the VMs")
    c.add_argument("-1", dest="one", action="store_true", help="exactly one VM, or an error")
    _selection_args(c, "with -j: only these fields")


def _info_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("types", nargs="?", help="comma-separated: block,blockstats,chardev,...")


def _sysrq_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("request", choices=("nmi", "screenshot"))


def _update_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("uuid")
    c.add_argument("-f", dest="file", metavar="FILE",
                   help="a JSON object of changes (- or none: stdin)")  # fmt: skip
    c.add_argument("pairs", nargs="*", metavar="key=value",
                   help="vnc_password=- reads the password from stdin: a secret given "
                   "as an argument lands in shell history and /proc/*/cmdline")  # fmt: skip


def _create_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-f", dest="file", metavar="FILE")


def _validate_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("action", choices=("create", "update"))
    c.add_argument("brand", nargs="?", help="update: the brand of the VMs it is for (kvm)")
    c.add_argument("-f", dest="file", metavar="FILE", help="the payload (- or none: stdin)")


def _events_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("-f", "--full", dest="full", action="store_true",
                   help="full dates and uuids, nothing cut short")  # fmt: skip
    c.add_argument("-j", "--json", dest="json", action="store_true", help="one JSON object a line")
    c.add_argument("-r", "--ready", dest="ready", action="store_true",
                   help="first a 'ready' line, once every later event will be shown")  # fmt: skip
    c.add_argument("uuid", nargs="?", help="only this VM's events")


if TYPE_CHECKING:
    Command = tuple[str, str, Callable[[Context, argparse.Namespace], None],
                    Callable[[argparse.ArgumentParser], None]]  # fmt: skip
COMMANDS: tuple[Command, ...] = (
    ("create", "create a VM from JSON (stdin or -f FILE)", cmd_create, _create_args),
    ("list", "list VMs (filters, sorting, -p)", cmd_list, _list_args),
    ("lookup", "the uuids (or -j JSON) of the VMs matching filters", cmd_lookup, _lookup_args),
    ("get", "print a VM's JSON", cmd_get, _with_uuid),
    ("start", "boot a VM (order=, cdrom=, disk=: for this boot only)", cmd_start, _start_args),
    ("stop", "stop a VM: ACPI powerdown, forced at the deadline (-F: at once; --all: every VM)",
     cmd_stop, _stop_args),
    ("reboot", "reboot a VM: stop then start (-F: reset)", cmd_reboot, _force_timeout),
    ("info", "QMP information through vmadmd", cmd_info, _info_args),
    ("sysrq", "send nmi or take a screenshot through vmadmd", cmd_sysrq, _sysrq_args),
    ("update", "change properties (-f FILE or key=value ...)", cmd_update, _update_args),
    ("delete", "halt and remove a VM", cmd_delete, _with_uuid),
    ("validate", "check a create or update payload, change nothing", cmd_validate,
     _validate_args),
    ("events", "follow vmadmd's events (-f full, -j JSON, -r ready marker)", cmd_events,
     _events_args),
    ("console", "the serial console in this terminal (Ctrl-] detaches); --web: a browser URL",
     cmd_console, _console_args),
    ("qmp", "send one QMP (or --hmp human monitor) command through vmadmd", cmd_qmp,
     _qmp_args),
    ("create-snapshot", "snapshot every disk of a VM at one instant (live or stopped)",
     cmd_create_snapshot, _snapshot_args),
    ("rollback-snapshot", "restore a VM's disks to a snapshot (a running VM is stopped and "
     "booted again; newer snapshots are deleted)", cmd_rollback_snapshot, _snapshot_args),
    ("delete-snapshot", "delete a VM's snapshot", cmd_delete_snapshot, _snapshot_args),
    ("send", "write a stopped VM (vm.json and disks) as one checksummed stream on stdout",
     cmd_send, _with_uuid),
    ("receive", "create the VM a `vmadm send` stream on stdin carries (same uuid); "
     "--live: the far end of a live migration", cmd_receive, _receive_args),
    ("migrate", "live-migrate a running VM, disks included, to another vmadmd host over ssh",
     cmd_migrate, _migrate_args),
)  # fmt: skip


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only`` (a known command) just that subcommand.

    Building all twelve subparsers costs ~7 ms of a call's start-up; the full
    set is built for --help and for unknown commands.
    """
    import argparse

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            # argparse's default prints usage and exits 2; the contract is one
            # line and exit 1.
            sys.stderr.write(f"vmadm: {message}\n")
            raise SystemExit(1)

    p = _Parser(prog="vmadm", description="Manage KVM/QEMU virtual machines (with vmadmd).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, helptext, func, setup in COMMANDS:
        if only is not None and name != only:
            continue
        c = sub.add_parser(name, help=helptext, description=helptext)
        setup(c)
        c.set_defaults(func=func)
    return p


class _Args:
    """What argparse would have made of a plain command line."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def _plain(argv: list[str]) -> argparse.Namespace | None:
    """``vmadm info UUID [TYPES]`` parsed without argparse, else None.

    Its import, with the ``re`` and ``enum`` it pulls in, is ~6 ms of a
    call's start-up, and ``info`` is what monitoring runs in a loop.  Only
    that exact shape: anything with an option, or another count of
    arguments, goes to argparse (its errors and ``--help`` stay its own).
    """
    plain = not any(arg.startswith("-") for arg in argv[1:])
    if argv[:1] == ["info"] and len(argv) in (2, 3) and plain:
        types = argv[2] if len(argv) == 3 else None
        return _Args(command="info", func=cmd_info, uuid=argv[1], types=types)  # type: ignore[return-value]
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # SmartOS writes `-s -ram,alias` (descending): keep the value with its flag.
    for i, arg in enumerate(argv[:-1]):
        if arg == "-s" and argv[i + 1].startswith("-"):
            argv[i : i + 2] = [f"-s{argv[i + 1]}"]
            break
    args = _plain(argv)
    if args is None:
        known = {c[0] for c in COMMANDS}
        first = argv[0] if argv else None
        args = build_parser(first if first in known else None).parse_args(argv)
    try:
        args.func(Context(), args)
    except VmadmError as err:
        sys.stderr.write(f"vmadm: {err}\n")
        return 1
    except ValueError as err:  # bad VMADM_ACCEL and the like
        sys.stderr.write(f"vmadm: {err}\n")
        return 1
    except BrokenPipeError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
