"""A VM's second QMP monitor (``-qmp unix:raw.qmp`` in its ``qemu_extra_opts``),
driven raw: the baseline of bench_daytwo, and the stand-in for a daemon
killed half-way through a hot-plug in tests/test_daytwo.py."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from vmadmd.vm.sockets import connect_unix


class RawQmp:
    """The VM's second monitor, with fd passing."""

    def __init__(self, directory: str, name: str) -> None:
        self.sock = connect_unix(directory, name)
        self.file = self.sock.makefile("rb")
        self.events: list[dict[str, Any]] = []
        self.fdset = -1  # the last one raw_add made
        self.reply()
        self.run("qmp_capabilities")

    def reply(self) -> Any:
        while True:
            msg = json.loads(self.file.readline())
            if "event" in msg:
                self.events.append(msg)
                continue
            if "error" in msg:
                raise RuntimeError(msg["error"])
            return msg.get("return")

    def run(self, cmd: str, args: dict[str, Any] | None = None, fd: int | None = None) -> Any:
        data = json.dumps({"execute": cmd, "arguments": args or {}}).encode() + b"\n"
        if fd is None:
            self.sock.sendall(data)
        else:
            socket.send_fds(self.sock, [data], [fd])
        return self.reply()

    def wait_deleted(self, dev: str) -> None:
        while not any(
            e["event"] == "DEVICE_DELETED" and e["data"].get("device") == dev for e in self.events
        ):
            msg = json.loads(self.file.readline())
            if "event" in msg:
                self.events.append(msg)
        self.events.clear()


def raw_add(qmp: RawQmp, path: str, node: str) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        fdset = qmp.run("add-fd", {"opaque": node}, fd=fd)["fdset-id"]
    finally:
        os.close(fd)
    qmp.run("blockdev-add", {"driver": "file", "filename": f"/dev/fdset/{fdset}",
                             "node-name": f"{node}-file"})  # fmt: skip
    qmp.run("blockdev-add", {"driver": "qcow2", "file": f"{node}-file", "backing": None,
                             "node-name": node})  # fmt: skip
    qmp.run("device_add", {"driver": "virtio-blk-pci", "drive": node, "id": node})
    qmp.fdset = int(fdset)


def raw_remove(qmp: RawQmp, node: str) -> None:
    qmp.run("device_del", {"id": node})
    qmp.wait_deleted(node)
    qmp.run("blockdev-del", {"node-name": node})
    qmp.run("blockdev-del", {"node-name": f"{node}-file"})
    qmp.run("remove-fd", {"fdset-id": qmp.fdset})
