"""End to end: a Debian 12 cloud guest configures itself from vmadmd's metadata.

The guest is built from Debian packages by ``tools/build-debian-guest.sh``
(cached under ``.cache/debian``, keyed on the script), installed as an image
(``imgadm install``) and booted under vmadmd (TCG) with a tagged nic on a bridge in a network
namespace of the test's own.  Nothing inside the guest is configured for
it: cloud-init's SmartOS datasource finds the SMBIOS identity, asks the
daemon's agent on ``ttyS1``, and applies what it is told.  Every check is
made from outside: the serial console, a ping from the bridge, ssh with the
key given as metadata.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.imgapi import manifest_for
from harness.world import REPO

from .conftest import Env

IMAGE = "d3b1a2c4-5e6f-4a7b-8c9d-0e1f2a3b4c5d"
DEBIAN_DIR = REPO / ".cache" / "debian"
GUEST_IP = "192.0.2.10"
BRIDGE_IP = "192.0.2.1"
DONE = "finished at"  # cloud-init's last word on the console: "Cloud-init v. X finished at ..."
BOOT_TIMEOUT = 400.0  # TCG on a shared machine: ~60-100 s here


@pytest.fixture(scope="session")
def debian() -> dict[str, str]:
    """The Debian guest's kernel and initrd (readable by a VM's user) and its root image."""
    subprocess.run([str(REPO / "tools" / "build-debian-guest.sh"), str(DEBIAN_DIR)], check=True)
    from harness.world import _world_readable_dir

    shared = _world_readable_dir("vmadmd-debian-")
    for name in ("vmlinuz", "initrd.img"):
        os.chmod(shutil.copy(DEBIAN_DIR / name, shared), 0o644)
    return {"kernel": f"{shared}/vmlinuz", "initrd": f"{shared}/initrd.img",
            "image": str(DEBIAN_DIR / "root.qcow2")}  # fmt: skip


def install_image(env: Env, debian: dict[str, str]) -> None:
    """The guest's root disk, installed as an image (``imgadm install``)."""
    image = Path(debian["image"])
    sha1 = hashlib.sha1()
    with image.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha1.update(chunk)
    manifest = env.tmp / "debian.json"
    manifest.write_text(json.dumps(manifest_for(
        IMAGE, "debian-12-cloud", sha1.hexdigest(), image.stat().st_size, "none", "qcow2"
    )))  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "vmadmd.cli.imgadm", "install", "-m", str(manifest),
         "-f", str(image)],
        capture_output=True, text=True, timeout=300, env=env.environ, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr


@contextlib.contextmanager
def bridge_netns(env: Env) -> Iterator[str]:
    """A network namespace with bridge ``br-admin`` (192.0.2.1/24), where
    vmadm, vmadmd and qemu run (``admin`` nics get taps on it)."""
    ns = f"vmd-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        for cmd in (
            ["ip", "link", "add", "br-admin", "type", "bridge"],
            ["ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", "br-admin"],
            ["ip", "link", "set", "br-admin", "up"],
            ["ip", "link", "set", "lo", "up"],
        ):
            subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True)
        env.prefix = ["nsenter", f"--net=/run/netns/{ns}"]
        env.extra_env["VMADM_NIC_TAGS"] = "admin=br-admin"
        yield ns
    finally:
        env.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)


def payload(debian: dict[str, str], append: str = "", **props: Any) -> dict[str, Any]:
    cmdline = f"root=/dev/vda rw console=ttyS0 panic=-1 {append}".strip()
    out: dict[str, Any] = {
        "alias": "debian",
        "ram": 1024,
        "vcpus": 2,
        "autoboot": False,
        "disks": [{"image_uuid": IMAGE}],
        "qemu_extra_opts": (
            f"-kernel {debian['kernel']} -initrd {debian['initrd']} -append '{cmdline}'"
        ),
    }
    out.update(props)
    return out


def boot_until_done(env: Env, uuid: str) -> float:
    """Start the VM; seconds until cloud-init said it finished, on the console."""
    t0 = time.monotonic()
    env.vmadm("start", uuid, check=True)
    env.wait_console(uuid, DONE, timeout=BOOT_TIMEOUT)
    return time.monotonic() - t0


USER_SCRIPT = """#!/bin/sh
echo "VMTEST-USER-SCRIPT ran as $(id -un) on $(hostname)" >/dev/ttyS0
touch /run/vmtest-user-script
"""
USER_DATA = """#cloud-config
disable_root: false
write_files:
  - path: /etc/vmtest-cloud-config
    content: "applied from cloud-init:user-data\\n"
"""


@pytest.mark.timeout(600)  # a build (once, ~1-2 min) and a TCG boot of systemd + cloud-init
def test_a_debian_guest_configures_itself_from_metadata(
    env: Env, debian: dict[str, str], tmp_path: Path
) -> None:
    key = tmp_path / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    install_image(env, debian)
    with bridge_netns(env) as ns:
        env.start_daemon()
        nic = {"nic_tag": "admin", "ip": GUEST_IP, "netmask": "255.255.255.0",
               "gateway": BRIDGE_IP, "primary": True}  # fmt: skip
        uuid = env.create(payload(
            debian,
            hostname="meta-e2e",
            nics=[nic],
            customer_metadata={
                "root_authorized_keys": (tmp_path / "id_ed25519.pub").read_text(),
                "user-script": USER_SCRIPT,
                "cloud-init:user-data": USER_DATA,
            },
        ))  # fmt: skip
        took = boot_until_done(env, uuid)
        console = env.console(uuid)
        assert "Datasource DataSourceSmartOS" in console, console[-3000:]
        # The user-script ran (as root), on a guest already named by sdc:hostname.
        assert "VMTEST-USER-SCRIPT ran as root on meta-e2e" in console, console[-3000:]
        # The static address from sdc:nics, on the tagged nic: it answers the bridge.
        # (busybox's ping: busybox-static is a dependency already, iputils is not.)
        ping = subprocess.run(
            ["ip", "netns", "exec", ns, "busybox", "ping", "-c", "3", "-w", "60", GUEST_IP],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert ping.returncode == 0, ping.stdout + ping.stderr
        assert "3 packets received" in ping.stdout, ping.stdout
        # Root's key from root_authorized_keys; the cloud-config applied.
        ssh = subprocess.run(
            ["ip", "netns", "exec", ns, "ssh", "-i", str(key), "-o", "BatchMode=yes",
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
             "-o", "ConnectTimeout=20", f"root@{GUEST_IP}",
             "hostname; cat /etc/vmtest-cloud-config; ls /run/vmtest-user-script"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ssh.returncode == 0, ssh.stderr
        assert ssh.stdout.splitlines() == [
            "meta-e2e",
            "applied from cloud-init:user-data",
            "/run/vmtest-user-script",
        ], ssh.stdout
        print(f"start -> cloud-init done (metadata): {took:.1f} s")
        env.vmadm("stop", uuid, "-F", check=True)
