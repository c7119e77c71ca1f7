"""A stand-in for qemu: serves a VM's QMP and VNC sockets from Python.

Two uses, one protocol implementation:

* **As the qemu binary** (``VMADM_QEMU=bench/standin`` wrapper): ``vmadm start``
  runs it with qemu's own command line; it binds ``-qmp``/``-vnc`` sockets in
  its working directory, honours ``-daemonize`` and ``-pidfile``, and keeps
  ``-uuid`` on its command line, so the daemon's real code paths (inotify,
  pidfd, identity check, QMP, VNC proxy) cannot tell it from qemu.  The QMP
  behaviour can be made faulty with ``VMADMD_STANDIN_QMP``: ``normal``,
  ``garbage`` (unparseable replies), ``half`` (half a greeting, then
  silence), ``error`` (an error reply to every command), ``stall`` (a
  greeting, then no reply ever), ``ignore_acpi`` (powerdown does nothing).

* **As a hub for scale runs** (``python -m bench.standin hub ...``): one
  process serves many VMs' sockets; each VM's liveness is a tiny
  ``busybox sh`` holder process whose command line carries ``-uuid <uuid>``
  and whose pid is in ``vm.pid``, so the daemon's pidfd sees it exit.

This is test and bench tooling: it depends on the standard library only.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

GREETING = {
    "QMP": {
        "version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "standin"},
        "capabilities": ["oob"],
    }
}

CANNED: dict[str, Any] = {
    "qmp_capabilities": {},
    "query-version": GREETING["QMP"]["version"],
    "query-status": {"running": True, "singlestep": False, "status": "running"},
    "query-block": [],
    "query-blockstats": [],
    "query-chardev": [{"label": "serial0", "filename": "unix:vm.console", "frontend-open": True}],
    "query-cpus-fast": [{"cpu-index": 0, "thread-id": 0, "target": "x86_64"}],
    "query-kvm": {"enabled": False, "present": False},
    "query-pci": [{"bus": 0, "devices": []}],
    "inject-nmi": {},
    "set_password": {},
    "send-key": {},
}

# A 2x2 black PPM and a matching PNG are enough for the screenshot paths.
PPM = b"P6\n2 2\n255\n" + b"\0" * 12


def _event(name: str) -> bytes:
    return (
        json.dumps(
            {"event": name, "data": {}, "timestamp": {"seconds": 0, "microseconds": 0}}
        ).encode()
        + b"\n"
    )


class FakeVm:
    """One VM's QMP and VNC behaviour."""

    def __init__(self, mode: str, on_quit: Callable[[], None]) -> None:
        self.mode = mode
        self.on_quit = on_quit
        self.qmp_busy = False

    async def qmp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.qmp_busy:  # qemu serves one QMP client at a time
            writer.close()
            return
        self.qmp_busy = True
        try:
            await self._qmp(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.qmp_busy = False
            writer.close()

    async def _qmp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        greeting = json.dumps(GREETING).encode() + b"\n"
        if self.mode == "half":
            writer.write(greeting[: len(greeting) // 2])
            await writer.drain()
            await reader.read()  # until the client gives up
            return
        writer.write(greeting)
        await writer.drain()
        negotiated = False
        async for msg in _json_stream(reader):
            cmd = msg.get("execute", "") if isinstance(msg, dict) else ""
            reply: dict[str, Any]
            if self.mode == "garbage" and negotiated:
                writer.write(b'}{"return": garbage\n')
                await writer.drain()
                continue
            if self.mode == "stall" and negotiated:
                continue
            if self.mode == "error" and negotiated:
                reply = {"error": {"class": "GenericError", "desc": "stand-in says no"}}
            elif cmd in CANNED:
                reply = {"return": CANNED[cmd]}
            elif cmd == "screendump":
                path = msg.get("arguments", {}).get("filename", "")
                with open(path, "wb") as f:
                    f.write(PPM)
                reply = {"return": {}}
            elif cmd == "system_reset":
                writer.write(_event("RESET"))
                reply = {"return": {}}
            elif cmd == "system_powerdown":
                writer.write(_event("POWERDOWN"))
                reply = {"return": {}}
                if self.mode != "ignore_acpi":
                    writer.write(json.dumps({**reply, **_id(msg)}).encode() + b"\n")
                    writer.write(_event("SHUTDOWN"))
                    await writer.drain()
                    self.on_quit()
                    return
            elif cmd == "quit":
                writer.write(json.dumps({"return": {}, **_id(msg)}).encode() + b"\n")
                writer.write(_event("SHUTDOWN"))
                await writer.drain()
                self.on_quit()
                return
            else:
                reply = {"error": {"class": "CommandNotFound", "desc": f"no {cmd}"}}
            negotiated = True
            writer.write(json.dumps({**reply, **_id(msg)}).encode() + b"\n")
            await writer.drain()

    async def vnc(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """An RFB banner, then echo."""
        try:
            writer.write(b"RFB 003.008\n")
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _json_stream(reader: asyncio.StreamReader) -> Any:
    """JSON values as they arrive: QMP clients need not end them with a newline."""
    decoder = json.JSONDecoder()
    buf = ""
    while chunk := await reader.read(65536):
        buf += chunk.decode(errors="replace")
        while True:
            buf = buf.lstrip()
            if not buf:
                break
            try:
                value, end = decoder.raw_decode(buf)
            except ValueError:
                if len(buf) > 1 << 20:
                    return
                break
            buf = buf[end:]
            yield value


def _id(msg: dict[str, Any]) -> dict[str, Any]:
    return {"id": msg["id"]} if "id" in msg else {}


def _opt(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv[:-1]):
        if arg == flag:
            return argv[i + 1]
    return None


def _unix_name(spec: str | None) -> str | None:
    if spec is None or not spec.startswith("unix:"):
        return None
    return spec[5:].split(",")[0]


async def _serve_one(argv: list[str], ready_fd: int | None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    vm = FakeVm(os.environ.get("VMADMD_STANDIN_QMP", "normal"), done.set)
    servers = []
    for flag, handler in (("-qmp", vm.qmp), ("-vnc", vm.vnc)):
        name = _unix_name(_opt(argv, flag))
        if name is not None:
            if os.path.exists(name):
                os.unlink(name)
            servers.append(await asyncio.start_unix_server(handler, name))
    pidfile = _opt(argv, "-pidfile")
    if pidfile:
        with open(pidfile, "w") as f:
            f.write(f"{os.getpid()}\n")
    if ready_fd is not None:
        os.write(ready_fd, b"1")
        os.close(ready_fd)
    loop.add_signal_handler(signal.SIGTERM, done.set)
    await done.wait()
    for server in servers:
        server.close()


def run_as_qemu(argv: list[str]) -> int:
    """Behave like ``qemu-system-x86_64 ... -daemonize``."""
    if "-daemonize" not in argv:
        asyncio.run(_serve_one(argv, None))
        return 0
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ok = os.read(r, 1) == b"1"
        return 0 if ok else 1
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    asyncio.run(_serve_one(argv, w))
    os._exit(0)


# -- hub mode: many VMs from one process ---------------------------------------


async def hub(zones_root: str, uuids: list[str]) -> None:
    """Serve every listed VM's sockets; each VM's liveness is a holder process."""
    from vmadmd.store import Store

    store = Store(zones_root)
    holders: dict[str, asyncio.subprocess.Process] = {}
    servers: list[asyncio.base_events.Server] = []

    async def start(uuid: str) -> None:
        paths = store.paths(uuid)
        os.makedirs(paths.runtime_dir, exist_ok=True)

        def quit_vm() -> None:
            proc = holders.get(uuid)
            if proc is not None and proc.returncode is None:
                proc.kill()

        vm = FakeVm("normal", quit_vm)
        cwd = os.getcwd()
        os.chdir(paths.runtime_dir)  # short socket names, as qemu does
        try:
            for name, handler in (("vm.qmp", vm.qmp), ("vm.vnc", vm.vnc)):
                if os.path.exists(name):
                    os.unlink(name)
                servers.append(await asyncio.start_unix_server(handler, name))
        finally:
            os.chdir(cwd)
        proc = await asyncio.create_subprocess_exec(
            # qemu's identity and VNC mode are read off the command line.
            "busybox",
            "sh",
            "-c",
            "read x",
            "-uuid",
            uuid,
            "-vnc",
            "unix:vm.vnc",
            stdin=asyncio.subprocess.PIPE,
        )
        holders[uuid] = proc
        with open(paths.pid, "w") as f:
            f.write(f"{proc.pid}\n")

    for uuid in uuids:
        await start(uuid)
    print(f"standin hub: {len(uuids)} VMs up", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for proc in holders.values():
        if proc.returncode is None:
            proc.kill()
    for server in servers:
        server.close()


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["hub"]:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        zones_root = argv[1]
        uuids = argv[2:] or sorted(os.listdir(zones_root))
        asyncio.run(hub(zones_root, uuids))
        return 0
    return run_as_qemu(argv)


if __name__ == "__main__":
    sys.exit(main())
