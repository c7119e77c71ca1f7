"""Autoboot: once per host boot, in order, failures isolated, restart-safe."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from vmadmd.daemon.autoboot import plan
from vmadmd.vm.store import Store

from .conftest import Env, bios_payload, lock_held


def test_plan_orders_groups_and_skips() -> None:
    vms: list[dict[str, Any]] = [
        {"uuid": "a", "autoboot": True, "autoboot_order": 2},
        {"uuid": "b", "autoboot": True},
        {"uuid": "c", "autoboot": True, "autoboot_order": 1},
        {"uuid": "d", "autoboot": True, "autoboot_order": 2},
        {"uuid": "e", "autoboot": False, "autoboot_order": 0},
        {"uuid": "f", "autoboot": True, "autoboot_order": 0},
    ]
    assert plan(vms, running={"f"}) == [["c"], ["a", "d"], ["b"]]
    assert plan([], set()) == []


def ping(env: Env) -> dict[str, Any]:
    status, body = env.api("GET", "/ping")
    assert status == 200
    result: dict[str, Any] = body["autoboot"]
    return result


def test_first_start_boots_flagged_vms_and_writes_marker(env: Env, tmp_path: Any) -> None:
    flagged = [env.create(bios_payload(alias=f"f{i}", autoboot=False)) for i in range(3)]
    for uuid in flagged:
        env.vmadm("update", uuid, "autoboot=true", check=True)
    unflagged = env.create(bios_payload(alias="off"))
    broken = env.create(bios_payload(alias="broken", disks=[{"size": 1}]))
    env.vmadm("update", broken, "autoboot=true", check=True)
    Path(env.get(broken)["disks"][0]["path"]).unlink()
    # A record with a disk entry that names no image at all (as an update
    # could once store): one VM's bad data, never the whole autoboot's.
    pathless = env.create(bios_payload(alias="pathless", autoboot=False))
    Store(env.zones).update(
        pathless, lambda vm: vm.update(autoboot=True, disks=[{"size": 8, "model": "virtio"}])
    )
    assert not os.path.exists(env.marker)

    env.start_daemon()
    env.wait_for(lambda: ping(env)["state"] == "done", timeout=30, what="autoboot done")
    progress = ping(env)
    assert (progress["done"], progress["failed"], progress["pending"]) == (3, 2, 0)
    assert "missing" in progress["failures"][broken]
    assert "has no image path" in progress["failures"][pathless]
    for uuid in flagged:
        assert env.get(uuid)["state"] == "running"
    assert env.get(unflagged)["state"] == "stopped"
    assert env.get(broken)["state"] == "stopped"
    assert os.path.exists(env.marker)
    log = env.daemon_log(tail=None)
    assert sum(f"VM {u} booted in" in log for u in flagged) == 3


def test_marker_present_boots_nothing(env: Env) -> None:
    uuid = env.create(bios_payload())
    env.vmadm("update", uuid, "autoboot=true", check=True)
    open(env.marker, "w").close()
    env.start_daemon()
    env.wait_for(lambda: ping(env)["state"] == "skipped", timeout=10, what="skipped")
    assert env.get(uuid)["state"] == "stopped"


def test_order_is_respected(env: Env) -> None:
    order = {}
    for alias, rank in (("late", 3), ("early", 1), ("mid", 2)):
        uuid = env.create(bios_payload(alias=alias, autoboot=False))
        env.vmadm("update", uuid, "autoboot=true", f"autoboot_order={rank}", check=True)
        order[uuid] = rank
    env.start_daemon("--autoboot-concurrency", "4")
    env.wait_for(lambda: ping(env)["state"] == "done", timeout=30, what="autoboot done")
    boots = sorted(order, key=lambda u: env.get(u)["boot_timestamp"])
    assert [order[u] for u in boots] == [1, 2, 3]


def test_killed_mid_autoboot_finishes_and_boots_nobody_twice(env: Env) -> None:
    uuids = [env.create(bios_payload(alias=f"v{i}", autoboot=False)) for i in range(4)]
    for i, uuid in enumerate(uuids):
        env.vmadm("update", uuid, "autoboot=true", f"autoboot_order={i}", check=True)
    daemon = env.start_daemon("--autoboot-concurrency", "1", "--autoboot-delay", "2")
    # Interrupt once the first VM is up but before the rest.
    env.wait_for(lambda: sum(env.pid(u) is not None for u in uuids) >= 1, timeout=20, what="one")
    env.stop_daemon(daemon, signal.SIGKILL)
    first_pids = {u: env.pid(u) for u in uuids if env.pid(u) is not None}
    assert 1 <= len(first_pids) < 4
    assert not os.path.exists(env.marker)
    env.start_daemon()
    env.wait_for(lambda: ping(env)["state"] == "done", timeout=30, what="autoboot done")
    assert all(env.pid(u) is not None for u in uuids)
    for uuid, pid in first_pids.items():
        assert env.pid(uuid) == pid, "a VM booted before the kill was not booted again"
    assert os.path.exists(env.marker)


def test_start_and_stop_flip_the_flag(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    assert env.get(uuid)["autoboot"] is False
    env.vmadm("start", uuid, check=True)
    assert env.get(uuid)["autoboot"] is True
    env.wait_qmp(uuid)
    res = env.vmadm("stop", uuid, "-t", "1")  # BIOS ignores ACPI: forced after 1 s
    assert res.returncode == 0, res.stderr
    assert env.get(uuid)["autoboot"] is False
    env.vmadm("update", uuid, "autoboot=true", check=True)
    assert env.get(uuid)["autoboot"] is True


def test_a_vm_whose_lock_stays_taken_fails_its_autoboot(env: Env) -> None:
    """Not "already running": its boot failed (busy), and the others went on."""
    held = env.create(bios_payload(alias="held"))
    free = env.create(bios_payload(alias="free"))
    for uuid in (held, free):
        env.vmadm("update", uuid, "autoboot=true", check=True)
    with lock_held(env, held):
        env.start_daemon()
        env.wait_for(lambda: ping(env)["state"] == "done", timeout=30, what="autoboot done")
        progress = ping(env)
        assert (progress["done"], progress["failed"]) == (1, 1)
        assert "busy" in progress["failures"][held]
        assert env.get(free)["state"] == "running"
