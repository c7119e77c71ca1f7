"""The one exception root of vmadmd and its domain errors.

Every error carries a stable machine-readable ``code``.  The HTTP API maps
error classes to statuses in one table (``vmadmd.api.STATUS``); the CLI prints
``str(err)`` as its one line and exits 1.
"""

from __future__ import annotations


class VmadmError(Exception):
    """Root of every error this project raises on purpose."""

    code = "InternalError"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidParameter(VmadmError):
    """A request, property or argument is malformed."""

    code = "InvalidParameter"


class InvalidUuid(InvalidParameter):
    """A string that is not a canonical lower-case UUID."""

    code = "InvalidUuid"


class PayloadTooLarge(InvalidParameter):
    code = "PayloadTooLarge"


class VmNotFound(VmadmError):
    code = "VmNotFound"


class VmBroken(VmadmError):
    """The VM's ``vm.json`` cannot be read (corrupt, truncated, unknown version)."""

    code = "VmBroken"


class WrongState(VmadmError):
    """The VM is not in a state that allows the operation."""

    code = "WrongState"


class StartFailed(VmadmError):
    """qemu refused to start; the message carries qemu's own reason."""

    code = "StartFailed"


class QmpTimeout(VmadmError):
    """qemu did not answer a QMP command in time."""

    code = "QmpTimeout"


class QmpFailed(VmadmError):
    """qemu answered a QMP command with an error, or the connection broke."""

    code = "QmpFailed"


class DaemonUnavailable(VmadmError):
    """The CLI cannot reach vmadmd."""

    code = "DaemonUnavailable"
