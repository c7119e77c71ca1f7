"""SmartOS automation runs unchanged: lookup/list as SmartOS has them, payloads
written for SmartOS, disks from images, and Ansible's vmadm module."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import Env, bios_payload, guest_payload

IMAGE = "7b5981c4-1889-11e7-b4c5-3f3bdfc9b88b"


def lookup(env: Env, *args: str) -> list[str]:
    return env.vmadm("lookup", *args, check=True).stdout.split()


def test_lookup_and_list_as_smartos_has_them(env: Env) -> None:
    web = env.create(bios_payload(alias="web0", ram=256, nics=[{"nic_tag": "admin"}]))
    db = env.create(bios_payload(alias="db0", ram=1024, nics=[{"nic_tag": "external"}]))
    cache = env.create(bios_payload(alias="cache0", ram=128))
    # Filters: equality, regex, nested with *.
    assert lookup(env, "alias=web0") == [web]
    assert sorted(lookup(env, "alias=~^(web|db)")) == sorted([web, db])
    assert lookup(env, "nics.*.nic_tag=admin") == [web]
    assert lookup(env, "ram=128", "state=stopped") == [cache]
    assert lookup(env, "alias=nothing") == []
    # -j: a JSON array of objects; -o keeps only those fields.
    out = json.loads(env.vmadm("lookup", "-j", "-o", "uuid,state", "alias=db0", check=True).stdout)
    assert out == [{"uuid": db, "state": "stopped"}]
    assert json.loads(env.vmadm("lookup", "-j", "-o", "state", f"uuid={cache}").stdout) == [
        {"state": "stopped"}
    ]
    assert json.loads(env.vmadm("lookup", "-j", "alias=nothing", check=True).stdout) == []
    full = json.loads(env.vmadm("lookup", "-j", f"uuid={web}", check=True).stdout)
    assert full[0]["alias"] == "web0"
    assert full[0]["nics"][0]["nic_tag"] == "admin"
    # -1: exactly one, else one line and exit 1.
    assert lookup(env, "-1", "alias=db0") == [db]
    for args in (("-1", "alias=nothing"), ("-1", "state=stopped")):
        res = env.vmadm("lookup", *args)
        assert res.returncode == 1
        assert len(res.stderr.strip().splitlines()) == 1
    # list: SmartOS's columns, default order by RAM; -s (descending with -), -p, -H.
    rows = env.vmadm("list", check=True).stdout.splitlines()
    assert rows[0].split() == ["UUID", "TYPE", "RAM", "STATE", "ALIAS"]
    assert [r.split()[4] for r in rows[1:]] == ["cache0", "web0", "db0"]
    assert rows[1].split()[1] == "KVM"
    parsable = env.vmadm("list", "-p", "-o", "alias,ram", "-s", "-ram", check=True).stdout
    assert parsable.splitlines() == ["db0:1024", "web0:256", "cache0:128"]
    by_alias = env.vmadm("list", "-H", "-o", "alias", "-s", "alias", "ram=~^(128|256)$").stdout
    assert by_alias.split() == ["cache0", "web0"]
    bad = env.vmadm("list", "alias")
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1


def test_a_payload_written_for_smartos(env: Env, guest: dict[str, str]) -> None:
    payload: dict[str, Any] = {
        "brand": "kvm", "name": "smartos-style", "ram": 128, "vcpus": 1, "autoboot": False,
        "owner_uuid": "930896af-bf8c-48d4-885c-6573a94b1853", "resolvers": ["8.8.8.8"],
        "dns_domain": "example.com", "zfs_io_priority": 30, "firewall_enabled": False,
        "quota": 10, "cpu_cap": 100, "max_physical_memory": 1152, "disk_driver": "virtio",
        "nic_driver": "virtio", "customer_metadata": {"user-script": "#!/bin/sh\ntrue\n"},
        "nics": [{"nic_tag": "admin", "ip": "10.0.0.5", "netmask": "255.255.255.0",
                  "gateway": "10.0.0.1", "primary": True, "vlan_id": 42,
                  "allow_ip_spoofing": False}],
        "qemu_extra_opts": guest_payload(guest)["qemu_extra_opts"],
    }  # fmt: skip
    uuid = env.create(payload)
    vm = env.get(uuid)
    assert vm["alias"] == "smartos-style"
    for key in ("owner_uuid", "resolvers", "dns_domain", "zfs_io_priority", "quota"):
        assert vm[key] == payload[key], key
    nic = vm["nics"][0]
    assert nic["model"] == "virtio"
    assert nic["mac"].startswith("02:08:20:")
    for key in ("nic_tag", "ip", "netmask", "gateway", "primary", "vlan_id", "allow_ip_spoofing"):
        assert nic[key] == payload["nics"][0][key], key
    # Neither SmartOS's nor ours: refused, with its name.
    res = env.vmadm("create", input=json.dumps({**payload, "frobnicate": 1}))
    assert res.returncode == 1
    assert "frobnicate" in res.stderr
    res = env.vmadm("create", input=json.dumps({**payload, "brand": "joyent"}))
    assert res.returncode == 1
    assert res.stderr.strip().startswith("vmadm: brand 'joyent' is not supported")


def make_image(env: Env, size_mib: int = 64) -> Path:
    """A qcow2 image holding the test guest's initramfs bytes (content to read back)."""
    images = Path(env.zones) / "images"
    images.mkdir(exist_ok=True)
    image = images / f"{IMAGE}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), f"{size_mib}M"],
                   check=True)  # fmt: skip
    return image


def virtual_size(path: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--output=json", "-U", path],
                         check=True, capture_output=True).stdout  # fmt: skip
    return int(json.loads(out)["virtual-size"])


def test_disks_from_images_and_sizes(env: Env, guest: dict[str, str]) -> None:
    image = make_image(env)
    env.start_daemon()
    # (No `boot`: the test guest boots its kernel directly, which takes bootindex 0.)
    disks = [{"image_uuid": IMAGE, "size": 128}, {"size": 16}]
    uuid = env.run_vm(guest_payload(guest, disks=disks), ready=True)
    vm = env.get(uuid)
    boot, empty = vm["disks"]
    assert boot["image_uuid"] == IMAGE
    assert boot["path"].startswith(vm["zonepath"])
    assert virtual_size(boot["path"]) == 128 << 20
    assert virtual_size(empty["path"]) == 16 << 20
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", boot["path"]],
                                     check=True, capture_output=True).stdout)  # fmt: skip
    assert info["backing-filename"] == str(image)
    assert info["backing-filename-format"] == "qcow2", "the backing format is pinned"
    # The guest sees both disks.
    status, body = env.api("GET", f"/vm/{uuid}", type="block")
    assert status == 200
    assert len(body["block"]) == 2
    # A missing image: a clear error, and nothing left behind.
    before = sorted(os.listdir(env.zones))
    res = env.vmadm("create", input=json.dumps(
        bios_payload(disks=[{"image_uuid": "00000000-0000-4000-8000-000000000000"}])))  # fmt: skip
    assert res.returncode == 1
    assert "not found" in res.stderr
    assert sorted(os.listdir(env.zones)) == before
    # Smaller than its image: refused, nothing left.
    res = env.vmadm("create", input=json.dumps(
        bios_payload(disks=[{"image_uuid": IMAGE, "size": 8}])))  # fmt: skip
    assert res.returncode == 1
    assert "smaller than its image" in res.stderr
    assert sorted(os.listdir(env.zones)) == before


def test_disk_paths_are_confined(env: Env) -> None:
    secret = env.tmp / "outside.img"
    secret.write_bytes(b"\0" * 4096)
    victim = env.create(bios_payload(disks=[{"size": 8}]))
    victim_disk = env.get(victim)["disks"][0]["path"]
    for path in ("/dev/sda", "/etc/shadow", str(secret), victim_disk):
        res = env.vmadm("create", input=json.dumps(bios_payload(disks=[{"path": path}])))
        assert res.returncode == 1, path
        assert "outside the VM's zonepath" in res.stderr, res.stderr
    mine = env.create(bios_payload())
    res = env.vmadm("update", mine, "-f", "-", input=json.dumps({"disks": [{"path": victim_disk}]}))
    assert res.returncode == 1
    assert "outside" in res.stderr
    res = env.vmadm("update", mine, "-f", "-", input=json.dumps({"disks": [{"size": 8}]}))
    assert res.returncode == 1
    assert "by its path" in res.stderr
    assert env.get(mine)["disks"] == []


# -- Ansible's vmadm module, unchanged ------------------------------------------------

PLAYBOOK = """
- hosts: localhost
  gather_facts: false
  vars:
    guest: &guest
      alias: ansible-vm
      brand: kvm
      ram: 128
      autoboot: false
      qemu_extra_opts: "{extra}"
  tasks:
    - name: create
      community.general.vmadm: {{<<: *guest, state: running}}
      register: create
    - name: again
      community.general.vmadm: {{<<: *guest, state: running}}
      register: again
    - name: stop
      community.general.vmadm: {{name: ansible-vm, state: stopped}}
      register: stop
    - name: start
      community.general.vmadm: {{name: ansible-vm, state: running}}
      register: start
    - name: reboot
      community.general.vmadm: {{name: ansible-vm, state: rebooted}}
      register: reboot
    - name: stop all
      community.general.vmadm: {{uuid: "*", state: stopped}}
      register: stop_all
    - name: stop all again
      community.general.vmadm: {{uuid: "*", state: stopped}}
      register: stop_all_again
    - name: delete
      community.general.vmadm: {{name: ansible-vm, state: deleted}}
      register: delete
    - name: delete again
      community.general.vmadm: {{name: ansible-vm, state: deleted}}
      register: delete_again
    - name: record
      ansible.builtin.copy:
        dest: "{out}"
        content: "{{{{ dict(create=create.changed, again=again.changed, stop=stop.changed,
                  start=start.changed, reboot=reboot.changed, stop_all=stop_all.changed,
                  stop_all_again=stop_all_again.changed, delete=delete.changed,
                  delete_again=delete_again.changed, uuid=create.uuid) | to_json }}}}"
"""


def test_ansible_vmadm_module_runs_unchanged(env: Env, guest: dict[str, str]) -> None:
    playbook_bin = Path(sys.executable).parent / "ansible-playbook"
    assert playbook_bin.exists(), "ansible is a dev dependency: ./tools/setup.sh installs it"
    env.start_daemon()
    other = env.run_vm(guest_payload(guest, alias="bystander"), ready=True)
    extra = guest_payload(guest)["qemu_extra_opts"].replace('"', '\\\\"')
    out = env.tmp / "changed.json"
    book = env.tmp / "play.yml"
    book.write_text(PLAYBOOK.format(extra=extra, out=out))
    t0 = time.monotonic()
    res = subprocess.run(
        [str(playbook_bin), "-i", "localhost,", "-c", "local", str(book)],
        env={**env.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
             "ANSIBLE_PYTHON_INTERPRETER": sys.executable, "ANSIBLE_NOCOLOR": "1",
             "ANSIBLE_LOCAL_TEMP": str(env.tmp / "ansible-tmp"),
             "ANSIBLE_HOME": str(env.tmp / "ansible-home")},
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    changed = json.loads(out.read_text())
    assert changed == {
        "create": True, "again": False, "stop": True, "start": True, "reboot": True,
        "stop_all": True, "stop_all_again": False, "delete": True, "delete_again": False,
        "uuid": changed["uuid"],
    }, changed  # fmt: skip
    # vmadm lookup agrees with the playbook: the VM is gone, the bystander was
    # stopped by `uuid: '*'`.
    assert lookup(env, "alias=ansible-vm") == []
    assert env.get(other)["state"] == "stopped"
    print(f"ansible playbook: {took:.1f} s")


# -- nics on bridges -----------------------------------------------------------------


def netns_run(ns: str, *cmd: str) -> str:
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def link(ns: str, name: str) -> dict[str, Any] | None:
    links = json.loads(netns_run(ns, "ip", "-j", "-d", "link", "show"))
    return next((x for x in links if x["ifname"] == name), None)


def vm_pid(env: Env, uuid: str) -> int:
    pid = env.pid(uuid)
    assert pid is not None
    return pid


def tap_fds_of(pid: int) -> set[str]:
    """The taps a process holds an fd on (``iff:`` in a tun fd's fdinfo)."""
    names = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("iff:"):
                    names.add(line.split()[1])
    return names


def test_nics_on_bridges_get_taps_that_go_with_qemu(env: Env, guest: dict[str, str]) -> None:
    ns = f"vmt-{os.getpid()}-{int(time.monotonic() * 1000) % 100000}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        netns_run(ns, "ip", "link", "add", "br-admin", "type", "bridge")
        netns_run(ns, "ip", "link", "set", "br-admin", "up")
        # vmadm, vmadmd and qemu live in that network namespace (nsenter, not
        # `ip netns exec`, which would mount a /sys without the cgroups).
        env.prefix = ["nsenter", f"--net=/run/netns/{ns}"]
        env.extra_env["VMADM_NIC_TAGS"] = "admin=br-admin"
        env.start_daemon()
        payload = guest_payload(guest, nics=[{"nic_tag": "admin", "primary": True}, {}])
        uuid = env.create(payload)
        vm = env.get(uuid)
        tap = vm["nics"][0]["ifname"]
        assert vm["nics"][0]["netdev"] == "tap"
        assert vm["nics"][1]["netdev"] == "user"
        assert link(ns, tap) is None, "no tap before the VM runs"
        env.vmadm("start", uuid, check=True)
        env.wait_console(uuid)
        env.wait_qmp(uuid)
        made = link(ns, tap)
        assert made is not None
        assert made["master"] == "br-admin"
        assert made["linkinfo"]["info_kind"] == "tun"
        assert made["linkinfo"]["info_data"]["user"] == vm["zone_uid"], "the VM's user's tap"
        # qemu's nic is on that tap, through the fd it was given (the VM's
        # user cannot open /dev/net/tun); the statistics read its counters.
        assert (
            "net0: index=0,type=tap,fd="
            in env.vmadm("qmp", uuid, "--hmp", "info network", check=True).stdout
        )
        assert tap in tap_fds_of(vm_pid(env, uuid))
        stats = env.api("GET", f"/vm/{uuid}", type="stats")[1]["stats"]
        assert set(stats["nics"]) == {tap}
        # Stopped by the daemon (the guest powers off): the daemon removes the tap.
        assert env.api("POST", f"/vm/{uuid}", action="stop", timeout="30")[0] == 202
        env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=20, what="stopped")
        env.wait_for(lambda: link(ns, tap) is None, what="tap gone")
        # Forced by vmadm: vmadm removes it.
        env.vmadm("start", uuid, check=True)
        assert link(ns, tap) is not None
        env.vmadm("stop", uuid, "-F", check=True)
        assert link(ns, tap) is None
        # A tag that maps to no bridge: a clear error, and no tap left.
        other = env.create(bios_payload(nics=[{"nic_tag": "external"}]))
        res = env.vmadm("start", other)
        assert res.returncode == 1
        assert "maps to no bridge" in res.stderr
    finally:
        env.cleanup()
        subprocess.run(["ip", "netns", "del", ns], check=False)
