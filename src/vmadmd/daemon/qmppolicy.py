"""What the monitor pass-through (``POST /vm/<uuid>/qmp``) lets through.

An allowlist, because qemu's monitor is a root shell in all but name: of
qemu 7.2's ~216 QMP commands, a refusal list of the daemon's own nine let
through an empty VNC password (``change-vnc-password``), a file of the
VM's user served over TCP (``drive_add`` + ``nbd-server-start``), writes
to any path that user can write (``screendump``, ``dump-guest-memory``,
``migrate`` to ``exec:``/``file:``), new host listeners (``chardev-add``,
``netdev_add ... hostfwd``), and every one of them again through HMP.
What passes is what only reads qemu's state, or acts on the guest alone:

- ``query-*`` and ``x-query-*``: qemu's read-only introspection;
- ``qom-list``, ``qom-list-types``: the shape of qemu's object tree, no
  values (``qom-get`` is refused: on qemu 7.2 it reads a ``secret``
  object's ``data``, and host paths such as a memory backend's
  ``mem-path``);
- ``send-key``, ``input-send-event``: keystrokes and pointer moves to the
  guest, what a VNC viewer sends;
- ``system_wakeup``, ``inject-nmi``: the guest's own wake-up and NMI.

``screendump`` is refused too: qemu opens the file itself, relative to its
working directory, which is ``/`` (and qemu root) for a qemu an older
vmadmd started; ``vmadm sysrq UUID screenshot`` and ``GET
/vm/UUID/screenshot.png`` write and read the VM's own screenshot safely.

The human monitor passes ``info ...`` only (every ``info`` subcommand
reads).  Its command name is cut where qemu's own parser cuts it
(``monitor/hmp.c``, ``get_command_name``): leading white space skipped,
the name ends at white space, ``/`` (the start of a ``/fmt`` suffix, as
in ``x/10i``) or the end; so ``closefd/x`` is ``closefd`` to qemu, and to
this check.

Pure: no I/O, tested without qemu.
"""

from __future__ import annotations

from collections.abc import Mapping

from vmadmd.errors import Forbidden, InvalidParameter

ALLOWED_QMP = frozenset({
    "qom-list", "qom-list-types",
    "send-key", "input-send-event",
    "system_wakeup", "inject-nmi",
})  # fmt: skip
ALLOWED_PREFIXES = ("query-", "x-query-")
ALLOWED_HMP = frozenset({"info"})

# C's isspace() in the C locale, which qemu's qemu_isspace() is: Python's
# str.isspace() also takes Unicode spaces, which qemu reads as a name's bytes.
_C_SPACE = " \t\n\v\f\r"

_SCREENSHOT_HINT = (
    "; for a screenshot use `vmadm sysrq UUID screenshot` or GET /vm/UUID/screenshot.png"
)


def hmp_command_name(line: str) -> str:
    """The command name qemu's human monitor reads from ``line`` ("" when none).

    qemu reads the line as C bytes: it ends at the first NUL.
    """
    line = line.split("\0", 1)[0].lstrip(_C_SPACE)
    end = len(line)
    for i, ch in enumerate(line):
        if ch == "/" or ch in _C_SPACE:
            end = i
            break
    return line[:end]


def check_qmp(cmd: str, arguments: Mapping[str, object] | None = None) -> None:
    """Raise Forbidden (403) unless ``cmd`` is on the pass-through's allowlist.

    ``human-monitor-command`` is checked by its command line (``check_hmp``).
    """
    if cmd == "human-monitor-command":
        line = (arguments or {}).get("command-line")
        check_hmp(line if isinstance(line, str) else "")
        return
    if cmd in ALLOWED_QMP or cmd.startswith(ALLOWED_PREFIXES):
        return
    hint = _SCREENSHOT_HINT if cmd == "screendump" else ""
    raise Forbidden(
        f"{cmd[:80]!r} is not allowed through the monitor pass-through: only commands that "
        f"read qemu's state or act on the guest alone pass{hint}"
    )


def check_hmp(line: str) -> None:
    """Raise Forbidden (403) unless the human monitor line is an ``info`` command;
    InvalidParameter (400) when it names no command at all."""
    name = hmp_command_name(line)
    if not name:
        raise InvalidParameter("the human monitor command is empty")
    if name not in ALLOWED_HMP:
        hint = _SCREENSHOT_HINT if name == "screendump" else ""
        raise Forbidden(
            f"human monitor command {name[:40]!r} is not allowed through the pass-through: "
            f"only 'info ...' passes{hint}"
        )
