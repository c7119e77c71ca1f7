"""Logging: one JSON object per line on stderr, with bunyan's fields.

``time``, ``level`` (bunyan's numbers), ``msg``, ``name``, ``pid``,
``hostname`` and ``v``, plus ``vm`` and ``req_id`` where a record carries
them, so tools written for SmartOS logs read ours.  ``--log-format text``
gives a terminal-friendly line instead.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from typing import Literal

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


def setup(level: str = "info", fmt: LogFormat = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(BunyanFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # qemu.qmp logs a reconnect attempt to a dead VM at ERROR; ours says it better.
    logging.getLogger("qemu.qmp").setLevel(
        logging.DEBUG if level.lower() == "debug" else logging.CRITICAL
    )
