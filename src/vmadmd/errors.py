"""The one exception root of vmadmd and its domain errors.

Every error carries a stable machine-readable ``code`` and the HTTP ``status``
the API answers it with, side by side on the class, so the mapping cannot
depend on the order of a table or on inheritance (``InvalidUuid`` is an
``InvalidParameter`` to the code that catches it, but names no VM: 404).
The CLI prints ``str(err)`` as its one line and exits 1.

Standard library only: the CLI imports this.
"""

from __future__ import annotations


def error_document(code: str, message: str, **details: object) -> dict[str, object]:
    """The body of every error answer of every HTTP listener of the daemon."""
    return {"error": {"code": code, "message": message, **details}}


class VmadmError(Exception):
    """Root of every error this project raises on purpose."""

    code = "InternalError"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> dict[str, object]:
        """Facts beyond the message, added to the API's error object."""
        return {}


class InvalidParameter(VmadmError):
    """A request, property or argument is malformed."""

    code = "InvalidParameter"
    status = 400


class BadProperty(InvalidParameter):
    """A property the action does not take at all (unknown, read-only, or not
    changeable), as opposed to a known one with a bad value: ``vmadm
    validate`` lists it under SmartOS's ``bad_properties``.  The API sees an
    InvalidParameter."""


class InvalidUuid(InvalidParameter):
    """A string that is not a canonical lower-case UUID: it names no VM."""

    code = "InvalidUuid"
    status = 404


class PayloadTooLarge(InvalidParameter):
    code = "PayloadTooLarge"
    status = 413


class Forbidden(VmadmError):
    """Valid, but not allowed (a console token spent or expired)."""

    code = "Forbidden"
    status = 403


class VmNotFound(VmadmError):
    code = "VmNotFound"
    status = 404


class VmExists(VmadmError):
    """A VM (or its zonepath) with that uuid is already there."""

    code = "VmExists"
    status = 409


class VmBroken(VmadmError):
    """The VM's ``vm.json`` cannot be read (corrupt, truncated, unknown version)."""

    code = "VmBroken"
    status = 409


class WrongState(VmadmError):
    """The VM is not in a state that allows the operation."""

    code = "WrongState"
    status = 409


class VmBusy(WrongState):
    """The VM's lock stayed held (another vmadm, a stuck process) past the wait."""

    code = "VmBusy"


class StartFailed(VmadmError):
    """qemu refused to start; the message carries qemu's own reason."""

    code = "StartFailed"
    status = 409


class Unreachable(VmadmError):
    """Something the VM serves (its VNC socket) cannot be reached right now."""

    code = "Unreachable"
    status = 502


class QmpTimeout(VmadmError):
    """qemu did not answer a QMP command in time."""

    code = "QmpTimeout"
    status = 504


class QmpFailed(VmadmError):
    """A QMP command did not succeed: one of the two kinds below."""

    code = "QmpFailed"
    status = 409


class QmpRefused(QmpFailed):
    """qemu answered the command with an error: it surely did not do it."""

    code = "QmpRefused"

    def __init__(self, message: str, error_class: str = "", desc: str = "") -> None:
        super().__init__(message)
        self.error_class = error_class
        self.desc = desc

    def details(self) -> dict[str, object]:
        return {"class": self.error_class, "desc": self.desc}


class QmpCommandFailed(QmpRefused):
    """A command passed through for a user was refused by qemu: the user's
    request was well-formed for us, not for qemu."""

    code = "QmpCommandFailed"
    status = 422


class QmpConnectionLost(QmpFailed):
    """The connection was closed or broke: whether qemu did it is unknown."""

    code = "QmpConnectionLost"


class DaemonUnavailable(VmadmError):
    """The CLI cannot reach vmadmd."""

    code = "DaemonUnavailable"
    status = 503


class ConfigError(VmadmError):
    """A daemon setting is unusable; vmadmd exits with this one line."""

    code = "ConfigError"
