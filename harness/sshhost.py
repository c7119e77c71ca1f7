"""Two vmadmd "hosts" on one machine, for live migration: the target in a
network namespace of its own, reached over ssh.

``TwoHosts`` makes the source (a ``World`` in the root namespace) and the
target (a ``World`` whose daemon runs in a new network namespace, joined to
ours by a veth pair), starts Debian's sshd in that namespace on a port of
its own with a host key and an authorized key made here, and writes the
ssh client configuration the source daemon uses (``VMADMD_SSH_CONFIG``) and
a wrapper that is ``vmadm`` on the target (``VMADMD_REMOTE_VMADM``: the
target world's environment, then vmadm).  ``close`` stops sshd and removes
the namespace and its veth; each world's ``cleanup`` its daemons and qemus.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shlex
import socket
import subprocess
import time
from pathlib import Path

from harness.world import World, tool

SSHD = "/usr/sbin/sshd"
PORT = 2222


class TwoHosts:
    def __init__(self, root: Path, *, deep: bool = True, log_level: str = "debug") -> None:
        self.root = root
        tag = secrets.token_hex(3)
        self.ns = f"vmmig{tag}"
        self.veth = f"vmm{tag}a"  # ours; its peer ("...b") lives in the namespace
        octet = 16 + secrets.randbelow(200)
        third = secrets.randbelow(250)
        self.host_ip = f"10.{octet}.{third}.1"
        self.target_ip = f"10.{octet}.{third}.2"
        self.ssh_dir = root / "ssh"
        self.source = World(root / "source", deep=deep, log_level=log_level)
        self.target = World(root / "target", deep=deep, log_level=log_level)
        # One uid ledger: on one machine, two "hosts" must not hand out one uid twice.
        self.target.ledger = self.source.ledger
        self.target.prefix = ["nsenter", f"--net=/run/netns/{self.ns}"]
        self.sshd: subprocess.Popen[bytes] | None = None
        self.destination = f"root@{self.target_ip}"

    # -- set up ------------------------------------------------------------------

    def start(self) -> None:
        self._netns()
        self._keys()
        self._sshd()
        wrapper = self.ssh_dir / "remote-vmadm"
        env = {k: v for k, v in self.target.environ.items() if k.startswith(("VMADM", "PYTHON"))}
        exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
        wrapper.write_text(f'#!/bin/sh\nexport {exports}\nexec {tool("vmadm")} "$@"\n')
        wrapper.chmod(0o755)
        self.source.extra_env.update(
            VMADMD_SSH_CONFIG=str(self.ssh_dir / "config"), VMADMD_REMOTE_VMADM=str(wrapper)
        )

    def _netns(self) -> None:
        run = _run
        run("ip", "netns", "add", self.ns)
        peer = self.veth[:-1] + "b"
        run("ip", "link", "add", self.veth, "type", "veth", "peer", "name", peer)
        run("ip", "link", "set", peer, "netns", self.ns)
        run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.veth)
        run("ip", "link", "set", self.veth, "up")
        ns = ["ip", "netns", "exec", self.ns]
        run(*ns, "ip", "addr", "add", f"{self.target_ip}/30", "dev", peer)
        run(*ns, "ip", "link", "set", peer, "up")
        run(*ns, "ip", "link", "set", "lo", "up")

    def _keys(self) -> None:
        d = self.ssh_dir
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("host_key", "client_key"):
            _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(d / name))
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[{self.target_ip}]:{PORT} {host_pub[0]} {host_pub[1]}\n")
        (d / "sshd_config").write_text(
            f"Port {PORT}\nListenAddress {self.target_ip}\nHostKey {d}/host_key\n"
            f"PidFile {d}/sshd.pid\nAuthorizedKeysFile {d}/authorized_keys\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            "AllowStreamLocalForwarding yes\nPrintMotd no\nLogLevel VERBOSE\n"
        )
        (d / "config").write_text(
            f"Host *\n  Port {PORT}\n  User root\n  IdentityFile {d}/client_key\n"
            f"  IdentitiesOnly yes\n  UserKnownHostsFile {d}/known_hosts\n"
            "  GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n"
            "  ConnectTimeout 10\n  LogLevel ERROR\n"
        )

    def _sshd(self) -> None:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation dir
        log = open(self.ssh_dir / "sshd.log", "wb")  # noqa: SIM115
        self.sshd = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.ns}", SSHD, "-D", "-e",
             "-f", str(self.ssh_dir / "sshd_config")],
            stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.sshd.poll() is not None:
                raise AssertionError(f"sshd exited: {self.sshd_log()}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.target_ip, PORT), timeout=1),
            ):
                return
            time.sleep(0.05)
        raise AssertionError(f"sshd did not listen: {self.sshd_log()}")

    def sshd_log(self) -> str:
        try:
            return (self.ssh_dir / "sshd.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def ssh(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a command on the target as the source daemon would."""
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_dir / "config"), "-o", "BatchMode=yes",
             self.destination, *command],
            capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip

    def sshd_sessions(self) -> list[int]:
        """The pids of sshd's per-connection processes (children of the listener)."""
        if self.sshd is None:
            return []
        out = subprocess.run(["pgrep", "-P", str(self.sshd.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    # -- tear down ---------------------------------------------------------------

    def close(self) -> None:
        for world in (self.source, self.target):
            world.cleanup()
        if self.sshd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.sshd.pid, 15)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.sshd.wait(timeout=5)
            if self.sshd.poll() is None:
                self.sshd.kill()
                self.sshd.wait()
            # Its sessions (started in the sshd's session too) went with the group.
        subprocess.run(["ip", "link", "del", self.veth], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], check=False, capture_output=True)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
