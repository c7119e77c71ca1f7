"""``vmadmd``: the daemon's entry point and lifecycle.

Runs in the foreground; a service manager daemonises it.  Start-up and
shutdown read as checklists below.  Stopping or killing the daemon never
stops a VM: qemu runs in its own session, and nothing here kills it on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import resource
import signal
import socket
import ssl
import stat
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vmadmd.daemon import autoboot, logs
from vmadmd.daemon.api import MAX_INCOMING_BODY, Api
from vmadmd.daemon.events import EventBus
from vmadmd.daemon.manager import Manager
from vmadmd.daemon.metrics import Metrics
from vmadmd.daemon.migration import MigrationSettings
from vmadmd.daemon.server import HttpServer
from vmadmd.daemon.settings import CrashRestart, DaemonSettings
from vmadmd.daemon.vncconsole import is_loopback
from vmadmd.errors import ConfigError
from vmadmd.vm.cgroup import MANAGERS
from vmadmd.vm.config import (
    DEFAULT_ACCEL,
    DEFAULT_AUTOBOOT_MARKER,
    DEFAULT_QEMU,
    DEFAULT_SOCKET,
    DEFAULT_UID_LEDGER,
    DEFAULT_USER_NET,
    DEFAULT_VNC_BIND,
    DEFAULT_ZONE_UID_BASE,
    DEFAULT_ZONES_ROOT,
    VmSettings,
    env_or,
    parse_accel,
    parse_user_net,
    vnc_password_required,
)
from vmadmd.vm.sockets import bind_unix, connect_unix, peer_uid, trusted_uid

if TYPE_CHECKING:
    from vmadmd.daemon.console import ConsoleServer
    from vmadmd.daemon.watch import ZonesWatcher
    from vmadmd.vm.config import UserNet

log = logging.getLogger("vmadmd")

SHUTDOWN_GRACE = 5.0


def _user_net(value: str) -> UserNet:
    try:
        return parse_user_net(value)
    except ValueError as err:  # argparse's own words would name the function
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmadmd",
        description="VM management daemon: autoboot, VNC consoles, reliable stop/reboot, QMP.",
    )
    p.add_argument("--zones-root", default=env_or("VMADM_ZONES_ROOT", DEFAULT_ZONES_ROOT))
    p.add_argument("--socket", default=env_or("VMADMD_SOCKET", DEFAULT_SOCKET))
    p.add_argument(
        "--autoboot-marker", default=env_or("VMADMD_AUTOBOOT_MARKER", DEFAULT_AUTOBOOT_MARKER)
    )
    p.add_argument("--vnc-bind", default=env_or("VMADMD_VNC_BIND", DEFAULT_VNC_BIND))
    p.add_argument(
        "--vnc-relay",
        default=env_or("VMADMD_VNC_RELAY", "listen"),
        choices=("listen", "handoff", "proxy"),
        help="listen: qemu accepts on the console's TCP socket itself (given it over QMP; "
        "handoff when it cannot take it); handoff: give each VNC client to qemu (relay only "
        "when it cannot take one); proxy: relay every session through the daemon",
    )
    p.add_argument(
        "--vnc-no-password",
        action="store_true",
        default=not vnc_password_required(),
        help="let a VM without a vnc_password have a console without one (by default one is "
        "generated, shown by `vmadm info UUID vnc`); vmadm needs VMADMD_VNC_NO_PASSWORD=1 "
        "as well",
    )
    p.add_argument(
        "--vnc-require-password",
        action="store_true",
        help="every console requires a password: the default now, kept for old scripts "
        "(wins over --vnc-no-password)",
    )
    p.add_argument(
        "--user-net",
        type=_user_net,
        default=env_or("VMADM_USER_NET", DEFAULT_USER_NET),  # argparse applies the type
        metavar="restricted|nat",
        help="user-mode nics: restricted (restrict=on: the guest reaches neither the host nor "
        "the outside) or nat (it reaches both, the host's 127.0.0.1 included)",
    )
    p.add_argument("--qemu", default=env_or("VMADM_QEMU", DEFAULT_QEMU))
    p.add_argument("--nic-tag", action="append", default=[], metavar="TAG=BRIDGE",
                   help="a nic tag's bridge (repeatable; also VMADM_NIC_TAGS)")  # fmt: skip
    p.add_argument("--zone-uid-base", type=int, metavar="UID",
                   default=int(env_or("VMADM_ZONE_UID_BASE", str(DEFAULT_ZONE_UID_BASE))),
                   help="the VMs' own users: uid (= gid) from here up, one per VM")  # fmt: skip
    p.add_argument("--uid-ledger", default=env_or("VMADM_UID_LEDGER", DEFAULT_UID_LEDGER),
                   metavar="FILE",
                   help="every uid ever given to a VM, host-wide (never twice)")  # fmt: skip
    p.add_argument("--images-dir", default=env_or("VMADM_IMAGES_DIR", ""), metavar="DIR",
                   help="disk images by uuid (default: <zones-root>/images)")  # fmt: skip
    p.add_argument("--cgroup-manager", choices=MANAGERS,
                   default=env_or("VMADM_CGROUP_MANAGER", "auto"),
                   help="who makes the VMs' cgroups: systemd scopes, the cgroup filesystem "
                   "directly, or auto (systemd where it is PID 1)")  # fmt: skip
    p.add_argument(
        "--accel", type=parse_accel, default=parse_accel(env_or("VMADM_ACCEL", DEFAULT_ACCEL))
    )
    p.add_argument("--qmp-timeout", type=float, default=5.0, metavar="SECS")
    p.add_argument(
        "--client-timeout",
        type=float,
        default=15.0,
        metavar="SECS",
        help="close an API connection idle or stuck in its request this long",
    )
    p.add_argument(
        "--autoboot-concurrency", type=int, default=2 * (os.cpu_count() or 1), metavar="N"
    )
    p.add_argument("--autoboot-delay", type=float, default=0.0, metavar="SECS",
                   help="pause after each autoboot_order group")  # fmt: skip
    p.add_argument(
        "--crash-restart-delay",
        type=float,
        default=1.0,
        metavar="SECS",
        help="restart_on_crash: first delay, doubled per crash (at most 60 s)",
    )
    p.add_argument(
        "--crash-restart-limit",
        type=int,
        default=5,
        metavar="N",
        help="restart_on_crash: no restart past N crashes within the window",
    )
    p.add_argument("--crash-restart-window", type=float, default=600.0, metavar="SECS")
    p.add_argument(
        "--ssh-config",
        default=env_or("VMADMD_SSH_CONFIG", "") or None,
        metavar="FILE",
        help="vmadm migrate: ssh's configuration file (ssh -F)",
    )
    p.add_argument(
        "--remote-vmadm",
        default=env_or("VMADMD_REMOTE_VMADM", "vmadm"),
        metavar="CMD",
        help="vmadm migrate: the command that is vmadm on targets",
    )
    p.add_argument("--console-listen", metavar="ADDR:PORT", default=None,
                   help="serve browser (noVNC) consoles here; off by default")  # fmt: skip
    p.add_argument("--console-tls-cert", metavar="PEM", help="serve consoles over HTTPS/WSS")
    p.add_argument("--console-tls-key", metavar="PEM")
    p.add_argument("--console-insecure", action="store_true",
                   help="allow plain HTTP consoles on a non-loopback address")  # fmt: skip
    p.add_argument("--console-keepalive", type=float, default=15.0, metavar="SECS",
                   help="close console connections idle between requests this long")  # fmt: skip
    p.add_argument("--console-max-connections", type=int, default=256, metavar="N")
    p.add_argument("--console-max-per-client", type=int, default=16, metavar="N")
    p.add_argument("--console-token-ttl", type=float, default=30.0, metavar="SECS")
    p.add_argument("--console-idle-timeout", type=float, default=600.0, metavar="SECS")
    p.add_argument("--novnc-dir", default=env_or("VMADMD_NOVNC_DIR", default_novnc_dir()),
                   help="the @novnc/novnc package directory")  # fmt: skip
    p.add_argument("--xterm-dir", default=env_or("VMADMD_XTERM_DIR", default_xterm_dir()),
                   help="the @xterm/xterm package directory")  # fmt: skip
    p.add_argument("--log-level", default=env_or("VMADMD_LOG_LEVEL", "info"),
                   choices=("debug", "info", "warning", "error"))  # fmt: skip
    p.add_argument("--log-format", default="json", choices=("json", "text"))
    return p


def _beside_checkout(*parts: str) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.normpath(os.path.join(here, "..", "..", "..", ".cache", *parts))


def default_novnc_dir() -> str:
    """Where tools/setup.sh installs noVNC, beside a source checkout."""
    return _beside_checkout("novnc", "node_modules", "@novnc", "novnc")


def default_xterm_dir() -> str:
    """Where tools/setup.sh installs xterm.js, beside a source checkout."""
    return _beside_checkout("xterm", "node_modules", "@xterm", "xterm")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--console-listen wants ADDR:PORT, not {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def console_tls(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    """The console listener's TLS context, from a PEM certificate and key."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise ConfigError("--console-tls-cert and --console-tls-key go together")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load the console certificate: {err}") from err
    return ctx


def sd_notify(message: str) -> None:
    """Tell systemd about our state (Type=notify); a no-op without NOTIFY_SOCKET.

    Written out because the protocol is one datagram and the PyPI wrappers add
    nothing but a dependency.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s,
        contextlib.suppress(OSError),
    ):
        s.connect(addr)
        s.sendall(message.encode())


def raise_fd_limit() -> None:
    """Each running VM holds a pidfd, a QMP socket, a listener and its
    sessions: take the hard limit on open files, not the (often 1024) soft one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def claim_socket(path: str) -> socket.socket:
    """Bind the API socket with mode 0600, replacing whatever stands in its way safely.

    The path is looked at with ``lstat``, never followed.  A socket is
    probed: refused (ConfigError) when another vmadmd answers on it (a
    server run by root or by the daemon's own user); one run by any other
    user is an impostor (``/tmp`` is everyone's): it is replaced, and
    logged; a socket nobody answers on is stale.  Anything else there (a
    link, wherever it points; a file; an empty directory) would stop the
    daemon from starting: it is removed (a link itself, never its target),
    and logged.  A directory with something in it is not ours to empty:
    refused, with the reason.
    """
    directory, name = os.path.dirname(path) or ".", os.path.basename(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and stat.S_ISSOCK(info.st_mode):
        try:
            probe = connect_unix(directory, name)
        except (ConnectionRefusedError, FileNotFoundError):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # nobody listens: stale
        except OSError as err:
            raise ConfigError(f"cannot check the existing socket {path}: {err}") from err
        else:
            uid = peer_uid(probe)
            probe.close()
            if trusted_uid(uid):
                raise ConfigError(f"another vmadmd is already answering on {path}")
            log.warning("%s was bound by uid %d, not by root: replacing it", path, uid)
            os.unlink(path)
    elif info is not None and stat.S_ISDIR(info.st_mode):
        # Not ours to empty, and not to stop the daemon either (anyone may
        # make one in /tmp): an empty one goes, any other is moved aside.
        aside = f"{path}.moved-{os.getpid()}-{int(time.time())}"
        try:
            os.rmdir(path)
            log.warning("%s was an empty directory, not a socket: replaced", path)
        except OSError:
            try:
                os.rename(path, aside)
            except OSError as err:
                raise ConfigError(
                    f"{path} (the API socket's path) is a directory that cannot be moved "
                    f"aside ({err.strerror}); remove it or choose another --socket"
                ) from err
            log.warning("%s was a directory (uid %d): moved to %s", path, info.st_uid, aside)
    elif info is not None:
        kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a socket"
        try:
            os.unlink(path)  # a link itself: never what it points to
        except FileNotFoundError:
            pass
        except OSError as err:
            raise ConfigError(f"cannot remove {path} ({kind}): {err.strerror}") from err
        log.warning("%s was %s (uid %d): replaced", path, kind, info.st_uid)
    old_umask = os.umask(0o177)
    try:
        return bind_unix(path, socket.SOMAXCONN)
    except OSError as err:  # something put back there meanwhile, a missing directory
        raise ConfigError(f"cannot bind the API socket {path}: {err.strerror}") from err
    finally:
        os.umask(old_umask)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bus = EventBus()
        settings = DaemonSettings(
            vm=VmSettings(
                zones_root=args.zones_root,
                qemu=args.qemu,
                accel=args.accel,
                vnc_require_password=args.vnc_require_password or not args.vnc_no_password,
                user_net=args.user_net,
                images_dir=args.images_dir,
                cgroup_root=os.environ.get("VMADM_CGROUP_ROOT", ""),
                cgroup_manager=args.cgroup_manager,
                zone_uid_base=args.zone_uid_base,
                uid_ledger=args.uid_ledger,
                nic_tags=",".join([os.environ.get("VMADM_NIC_TAGS", ""), *args.nic_tag]),
            ),
            vnc_bind=args.vnc_bind,
            qmp_timeout=args.qmp_timeout,
            vnc_relay=args.vnc_relay,
            crash_restart=CrashRestart(
                delay=args.crash_restart_delay,
                limit=args.crash_restart_limit,
                window=args.crash_restart_window,
            ),
            migration=MigrationSettings(ssh_config=args.ssh_config, remote_vmadm=args.remote_vmadm),
        )
        self.metrics = Metrics()
        self.manager = Manager(settings, self.bus, self.metrics)
        self.watcher: ZonesWatcher | None = None  # made in run()
        self.autoboot = autoboot.Progress()
        self.console: ConsoleServer | None = None
        if args.console_listen:
            host, port = parse_listen(args.console_listen)
            tls = console_tls(args.console_tls_cert, args.console_tls_key)
            if tls is None and not is_loopback(host) and not args.console_insecure:
                raise ConfigError(
                    f"--console-listen {args.console_listen}: consoles (keystrokes, screens, "
                    "VNC challenges) would cross the network in clear; give "
                    "--console-tls-cert/--console-tls-key, or --console-insecure"
                )
            from vmadmd.daemon.console import ConsoleServer  # wsproto: only when asked for

            self.console = ConsoleServer(
                self.manager, host, port, args.novnc_dir, xterm_dir=args.xterm_dir,
                ttl=args.console_token_ttl, idle_timeout=args.console_idle_timeout, tls=tls,
                keepalive=args.console_keepalive, max_connections=args.console_max_connections,
                max_per_client=args.console_max_per_client,
            )  # fmt: skip
        self._stop = asyncio.Event()
        self.api = Api(self.manager, self.bus, self.status, self.metrics, self.console)
        self.server = HttpServer(
            self.api.service, client_timeout=args.client_timeout, max_body=MAX_INCOMING_BODY
        )

    def status(self) -> dict[str, Any]:
        return {"autoboot": self.autoboot.as_dict()}

    async def _rescan(self) -> None:
        await self.manager.scan_all()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

        # asyncinotify's import is ~9 ms (ctypes, and ldconfig run to find
        # libc): in a thread, while the API starts to answer.
        watch = asyncio.ensure_future(
            asyncio.to_thread(importlib.import_module, "vmadmd.daemon.watch")
        )
        # Claim the API socket first: a second daemon must not touch any VM.
        sock = claim_socket(self.args.socket)
        # Serve the API at once: /ping answers, what depends on the VMs'
        # states waits for the sweep (BEFORE_SWEEP); a query to a VM not yet
        # back on QMP waits for it (504 past the QMP timeout).
        await self.server.start(sock)
        log.info("listening on %s", self.args.socket)
        if self.console is not None:
            await self.console.start()
        # Watch before sweeping, so no VM that starts meanwhile is missed.
        await watch
        from vmadmd.daemon.watch import ZonesWatcher  # loaded by now

        self.watcher = ZonesWatcher(self.args.zones_root, self.manager.refresh, self._rescan)
        self.watcher.start()
        # Sweep every VM: attach running ones, settle or re-arm transitions.
        uuids = await self.manager.startup.run()
        running = self.manager.running_uuids()
        log.info("start-up sweep done: %d VMs, %d running", len(uuids), len(running))
        sd_notify("READY=1\nSTATUS=serving")
        autoboot_task = asyncio.create_task(self._autoboot(uuids), name="autoboot")
        watchdog = self._start_watchdog()

        await self._stop.wait()

        log.info("shutting down; VMs keep running")
        sd_notify("STOPPING=1")
        # Stop accepting, and finish in-flight requests (bounded).
        for task in (autoboot_task, watchdog):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.watcher is not None:
            await self.watcher.close()
        if self.console is not None:
            await self.console.close()
        await self.server.close(SHUTDOWN_GRACE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.args.socket)
        # Let go of QMP connections and listeners; never of the VMs.
        await self.manager.close()
        return 0

    def _start_watchdog(self) -> asyncio.Task[None] | None:
        """Ping systemd's watchdog at half its interval, when it asks for one."""
        try:
            usec = int(os.environ.get("WATCHDOG_USEC", "0"))
            pid = int(os.environ.get("WATCHDOG_PID", str(os.getpid())))
        except ValueError:
            return None
        if usec <= 0 or pid != os.getpid():
            return None

        async def ping() -> None:
            while True:
                sd_notify("WATCHDOG=1")
                await asyncio.sleep(usec / 2e6)

        return asyncio.create_task(ping(), name="watchdog")

    async def _autoboot(self, uuids: list[str]) -> None:
        records = []
        for uuid in uuids:
            with contextlib.suppress(Exception):
                records.append(self.manager.load(uuid))
        await autoboot.run(
            self.args.autoboot_marker,
            records,
            self.manager.running_uuids(),
            lambda u: self.manager.boot(u, reason="autoboot"),
            concurrency=self.args.autoboot_concurrency,
            group_delay=self.args.autoboot_delay,
            progress=self.autoboot,
        )
        if self.autoboot.seconds is not None:
            self.metrics.autoboot_seconds.set(self.autoboot.seconds)
        self.bus.emit("autoboot_done", None, **self.autoboot.as_dict())


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    raise_fd_limit()
    try:
        return asyncio.run(Daemon(args).run())
    except ConfigError as err:
        sys.stderr.write(f"vmadmd: {err}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
