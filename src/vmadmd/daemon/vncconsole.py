"""One VM's VNC console policy: which listener it gets, with which password.

The mechanism (accepting clients, handing them to qemu or relaying them) is
``vnc.VncListener``; this decides when a listener opens, whether qemu gets
the listening socket itself (``listen`` mode: then a restarted daemon takes
back the one qemu holds, and a console that closes tells qemu to close it),
that it never serves a console weaker than configured, and how a change of
``vnc_port`` or ``vnc_password`` is applied to a running qemu.  Owned by the
VM's supervisor.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import string
from collections.abc import Callable
from typing import Any

from vmadmd.daemon.events import EventBus
from vmadmd.daemon.logs import vm_log
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.monitor import Monitor, VncClient
from vmadmd.daemon.vnc import Handoff, VncListener, file_inode, listens_on
from vmadmd.errors import VmadmError
from vmadmd.vm.store import VmPaths, VmRecord

log = logging.getLogger("vmadmd.vnc")

VncKey = tuple[int, str | None]  # (vnc_port, vnc_password) as last applied

# The host's key for generated VNC passwords, in the zones root (root's, 0600).
HOST_KEY_NAME = ".vnc-key"
_ALPHABET = string.ascii_letters + string.digits


def host_key(zones_root: str) -> bytes | None:
    """The zones root's key for generated passwords, made on first need;
    None when the file there is not root's own 32 private bytes."""
    path = os.path.join(zones_root, HOST_KEY_NAME)
    flags = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | flags)
        except FileNotFoundError:
            import secrets  # here: secrets, hmac and OpenSSL are ~1.4 ms of start-up

            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | flags, 0o600)
            except FileExistsError:
                continue  # another daemon made it meanwhile: read that one
            except OSError:
                return None
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
            continue
        except OSError:
            return None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not (st.st_uid == os.geteuid() and st.st_mode & 0o177077 == 0o100000):
                return None  # not a private regular file of ours
            key = f.read(33)
        return key if len(key) == 32 else None
    return None


def generated_password(key: bytes, uuid: str, identity: object) -> str:
    """8 letters and digits for this VM's current qemu (its recorded identity:
    pid, start time, executable): the same for a restarted daemon, another
    one for the next boot, and nothing to keep on disk but the host's key."""
    import hashlib
    import hmac
    import json

    message = f"{uuid}\0{json.dumps(identity, sort_keys=True, default=str)}".encode()
    digest = hmac.new(key, message, hashlib.sha256).digest()
    return "".join(_ALPHABET[b % len(_ALPHABET)] for b in digest[:8])


def qemu_vnc_mode(argv: list[str]) -> bool | None:
    """From qemu's argv: None without -vnc, else whether password auth is on."""
    for flag, value in itertools.pairwise(argv):
        if flag == "-vnc":
            return "password=on" in value.split(",")
    return None


def is_loopback(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    import ipaddress  # here: not on the start-up path for the usual binds

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def vnc_mismatch(qemu_auth: bool | None, want_password: bool) -> str | None:
    """Why this qemu cannot serve the console as configured, or None."""
    if qemu_auth is None:
        return "this qemu was started without a VNC server; the console comes with the next boot"
    if want_password and not qemu_auth:
        return (
            "this qemu was started without VNC password auth (vnc_password set since, or "
            "started with VMADMD_VNC_NO_PASSWORD=1 while vmadmd requires one); "
            "the console stays closed until the next boot"
        )
    if not want_password and qemu_auth:
        return (
            "vnc_password was removed, but this qemu requires one until the next boot; "
            "the console stays closed until then"
        )
    return None


class VncConsole:
    def __init__(
        self,
        uuid: str,
        paths: VmPaths,
        monitor: Monitor,
        *,
        bind: str,
        relay: str,
        qmp_timeout: float,
        qemu_auth: bool | None,
        bus: EventBus,
        metrics: Metrics,
        gone: Callable[[], bool],
        require_password: bool = False,
    ) -> None:
        self.uuid = uuid
        self._paths = paths
        self._log = vm_log(log, uuid)
        self._monitor = monitor
        self._bind = bind
        self._relay = relay
        self._qmp_timeout = qmp_timeout
        # How this qemu's VNC server was started: None (no -vnc), or whether
        # it requires password auth.  Only a new qemu can change either.
        self._qemu_auth = qemu_auth
        self._bus = bus
        self._metrics = metrics
        self._gone = gone
        self.listener: VncListener | None = None
        self.key: VncKey | None = None
        self._require_password = require_password
        self._generated: str | None = None  # this qemu's generated password
        # The inode of the vm.vnc socket file qemu bound (see qemu_inode).
        self._inode: int | None = None

    def qemu_inode(self) -> int | None:
        """The inode of the vm.vnc socket file this qemu bound, once known.

        Taken the first time it is asked for with QMP connected: qemu
        answers QMP only from its main loop, after its VNC socket is bound
        (its pidfile, which the daemon may see first, comes earlier).  While
        the file there is still that one, qemu's VNC server is what listens
        at vm.vnc.
        """
        if self._inode is None and self._monitor.ready:
            self._inode = file_inode(self._paths.runtime_dir, self._paths.VNC_NAME)
        return self._inode

    def password(self) -> str | None:
        """The password qemu's VNC server was given (for the browser console)."""
        return self.key[1] if self.key else None

    def info(self) -> dict[str, Any]:
        """The listener as it is, with the password qemu was given (if any)."""
        if self.listener is None:
            return {}
        return self.listener.info(self.key[1] if self.key else None)

    def key_of(self, record: VmRecord) -> VncKey:
        """(port, password) the console should have: the VM's own password, or
        one generated for this qemu when passwords are required (the default;
        ``--vnc-no-password`` opts out) or this qemu demands one anyway (it
        was started so: without a password it would admit nobody).

        The generated one is derived from the host's key and this qemu's
        identity (``generated_password``): never written to disk, the same
        after the daemon restarts, new at each boot; random (and new with
        each daemon) when there is no key or no recorded identity.  Shown by
        ``vmadm info UUID vnc`` and given to the browser console."""
        password = record.get("vnc_password") or None
        if password is None and (self._require_password or self._qemu_auth):
            if self._generated is None:
                self._generated = self._generate(record.get("qemu_identity"))
            password = self._generated
        return record.get("vnc_port", 0), password

    def _generate(self, identity: object) -> str:
        key = host_key(os.path.dirname(self._paths.zonepath)) if identity else None
        if key is not None:
            return generated_password(key, self.uuid, identity)
        import secrets  # here: secrets, hmac and OpenSSL are ~1.4 ms of start-up

        return "".join(secrets.choice(_ALPHABET) for _ in range(8))

    async def open(self, record: VmRecord) -> None:
        """Open the listener the record asks for (or record why it cannot)."""
        port, password = self.key = self.key_of(record)
        # A listener an earlier daemon gave this qemu, if any (asked only in
        # the listen mode: in the others no daemon gives one).
        held = await self._qemu_listeners() if self._relay == "listen" else []
        if port == -1:
            await self._unlisten(held)
            return
        handoff: Handoff | None = None
        if self._relay in ("handoff", "listen"):
            handoff = functools.partial(self._monitor.add_vnc_client, timeout=self._qmp_timeout)
        listener = VncListener(
            self.uuid, self._paths.runtime_dir, self._paths.VNC_NAME, self._bind, port,
            self._metrics, handoff, self.qemu_inode, peer=self._monitor.peer,
        )  # fmt: skip
        refusal, level = vnc_mismatch(self._qemu_auth, bool(password)), logging.WARNING
        if refusal is None and not password and not is_loopback(self._bind):
            # Whoever reaches that address would have the console.
            refusal = f"refused: a console on {self._bind} (not loopback) needs a vnc_password"
            level = logging.ERROR
        if refusal is not None:
            # Never serve a console with weaker protection than asked for.
            await self._unlisten(held)
            listener.error = refusal
            self._metrics.vnc_listener_errors.inc()
            self.listener = listener
            self._log.log(level, "%s", refusal)
            return
        if password:
            try:
                await self._monitor.set_vnc_password(password)
            except VmadmError as err:
                await self._unlisten(held)
                listener.error = f"cannot set the VNC password: {err}"
                self.listener = listener
                self._log.error("%s", listener.error)
                return
        kept = [p for host, p in held if host == self._bind and port in (0, p)]
        if kept and not await asyncio.to_thread(self._holds_port, kept[0]):
            # qemu's word alone: the port is not one of its own sockets.
            self._log.warning(
                "qemu says it listens on port %d, but holds no such socket: not adopted",
                kept[0],
            )
            kept = []
        if len(held) == 1 and kept:
            # qemu still accepts on the port it was given: the console never
            # went away, and keeps its port across the daemon's restart.
            listener.adopt(kept[0])
            self.listener = listener
            self._bus.emit("vnc_up", self.uuid, port=listener.port)
            self._log.info("VNC on %s:%s (qemu's own listener)", listener.host, listener.port)
            return
        if await listener.open():
            if self._relay == "listen":
                # display-update replaces every listener qemu had.
                if await listener.give_to_qemu(self._give):
                    self._inode = None  # qemu bound vm.vnc anew
                elif held and listener.in_qemu is False:
                    await self._unlisten(held)
            self._bus.emit("vnc_up", self.uuid, port=listener.port)
            self._log.info("VNC on %s:%s", listener.host, listener.port)
        if self._gone():
            await listener.close()
            return
        self.listener = listener
        if self._relay != "listen":
            # A daemon run in the listen mode before may have given qemu a
            # listener: the console is this one now.
            await self._unlisten(await self._qemu_listeners())

    async def _give(self, fd: int) -> bool:
        return await self._monitor.listen_vnc(fd, self._paths.VNC_NAME, timeout=self._qmp_timeout)

    def _holds_port(self, port: int) -> bool:
        peer = self._monitor.peer
        return peer is None or listens_on(peer.pid, port)

    async def _qemu_listeners(self) -> list[tuple[str, int]]:
        """qemu's VNC TCP listeners (none when it cannot be asked)."""
        try:
            return await self._monitor.vnc_tcp_listeners(timeout=self._qmp_timeout)
        except VmadmError as err:
            self._log.info("cannot list qemu's VNC listeners: %s", err)
            return []

    async def _unlisten(self, held: list[tuple[str, int]] | None = None) -> None:
        """Close the TCP listener qemu was given, if it has one (best effort)."""
        if held is not None and not held:
            return
        try:
            await self._monitor.unlisten_vnc(self._paths.VNC_NAME, timeout=self._qmp_timeout)
        except VmadmError as err:
            self._log.warning("cannot close qemu's VNC listener: %s", err)
        self._inode = None

    def client_connected(self, client: VncClient) -> None:
        """A client qemu's VNC server accepted: counted when it came to the
        console's TCP port (a unix client is the daemon's own web relay)."""
        listener = self.listener
        if listener is None or not listener.in_qemu or not client.tcp:
            return
        self._metrics.vnc_clients.labels("accepted_by_qemu").inc()
        # Debug, not info: qemu says it, and qemu may say it without end.
        self._log.debug("VNC client %s:%s accepted by qemu", client.host, client.service)

    async def reload(self, record: VmRecord) -> dict[str, Any]:
        """Apply the record's VNC settings; a no-op when unchanged."""
        key = self.key_of(record)
        if key == self.key:
            return self.info()
        port, password = key
        listener = self.listener
        if (
            self.key is not None
            and port == self.key[0]
            and password
            and self._qemu_auth
            and listener is not None
            and listener.error is None
        ):
            # Only the password changed: qemu takes a new one in place; the
            # listener (and its port) stay.
            await self._monitor.set_vnc_password(password)
            self.key = key
            return self.info()
        await self.close()
        await self.open(record)
        return self.info()

    async def close(self) -> None:
        """Close the console (its VM exited, or its settings changed)."""
        await self._close(tell_qemu=True)

    async def detach(self) -> None:
        """The daemon shuts down: a listener qemu holds stays with the VM."""
        await self._close(tell_qemu=False)

    async def _close(self, *, tell_qemu: bool) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            await listener.close()
            if tell_qemu and listener.in_qemu is not False and not self._gone():
                await self._unlisten()
            self._bus.emit("vnc_down", self.uuid)
