"""Logging: one JSON object per line on stderr, with bunyan's fields.

``time``, ``level`` (bunyan's numbers), ``msg``, ``name``, ``pid``,
``hostname`` and ``v``, plus ``vm`` and ``req_id`` where a record carries
them, so tools written for SmartOS logs read ours.  ``--log-format text``
gives a terminal-friendly line instead.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import socket
import sys
import time
from typing import Any, Literal

# The API request being served, carried into every log line it causes
# (QMP commands included) through the task's context.
req_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("req_id", default=None)

# Any JSON-ish `"password": "..."` (QMP's set_password on the wire, at debug).
_PASSWORD_RE = re.compile(r"""(['"]password['"]\s*:\s*)(['"])(?:\\.|(?!\2).)*\2""")

BUNYAN_LEVELS = {
    logging.DEBUG: 20,
    logging.INFO: 30,
    logging.WARNING: 40,
    logging.ERROR: 50,
    logging.CRITICAL: 60,
}

LogFormat = Literal["json", "text"]


class BunyanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._hostname = socket.gethostname()
        self._pid = os.getpid()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "name": record.name,
            "hostname": self._hostname,
            "pid": self._pid,
            "level": BUNYAN_LEVELS.get(record.levelno, 30),
            "msg": record.getMessage(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "v": 0,
        }
        for key in ("vm", "req_id"):
            value = getattr(record, key, None)
            if value is not None:
                out[key] = value
        if record.exc_info:
            out["err"] = {"stack": self.formatException(record.exc_info)}
        return json.dumps(out, default=str)


class ContextFilter(logging.Filter):
    """Adds the request id from the context, and redacts passwords."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "req_id", None) is None:
            req_id = req_id_var.get()
            if req_id is not None:
                record.req_id = req_id
        message = record.getMessage()
        if "password" in message:
            record.msg = _PASSWORD_RE.sub(r"\1\2<redacted>\2", message)
            record.args = None
        return True


def escape_controls(text: str) -> str:
    """Every non-printable character of ``text`` as its escape (``\x1b``).

    A message carries what users and guests chose (an alias, a QMP command
    name): on a terminal a raw ESC would start a sequence, a newline would
    forge a log line.  (JSON lines are escaped by json.)
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class TextFormatter(logging.Formatter):
    """``--log-format text``: one line per record, its message escaped
    (tracebacks, our own text, keep their lines)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        return self._style._fmt % {**record.__dict__, "message": escape_controls(record.message)}


def setup(level: str = "info", fmt: LogFormat = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(BunyanFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # (The QMP client logs nothing of the wire: a user's pass-through
    # command can carry secrets.  The monitor logs each command's name and
    # outcome itself.)


class VmLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Log lines about one VM: ``vm <uuid>: ...``, with the uuid as the ``vm`` field.

    Every per-VM line goes through one of these, so none can carry the uuid
    in its text and miss it as a field (or the other way round).
    """

    def process(self, msg: object, kwargs: Any) -> tuple[str, Any]:
        uuid = self.extra["vm"] if self.extra else "?"
        extra = dict(kwargs.get("extra") or {})
        extra.setdefault("vm", uuid)
        kwargs["extra"] = extra
        return f"vm {uuid}: {msg}", kwargs


def vm_log(logger: logging.Logger, uuid: str) -> VmLog:
    return VmLog(logger, {"vm": uuid})
