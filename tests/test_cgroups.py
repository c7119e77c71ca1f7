"""Each VM in its own cgroup with SmartOS's resource controls: real cgroup v1
here (this machine kind mounts v1 controllers), v2 against a fake tree."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from vmadmd.vm.cgroup import DEFAULT_ROOT, Cgroups, Limits, limits_of

from .conftest import Env, RunVm, bios_payload, guest_payload
from .test_operator import SerialClient


def cgroup_of(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.strip().split(":", 2)
            if controller in names.split(","):
                return path
    return ""


def test_each_vm_in_its_own_limited_cgroup(env: Env, running_vm: RunVm) -> None:
    a = running_vm(bios_payload(ram=64))
    b = running_vm(bios_payload(ram=64, max_physical_memory=512, max_lwps=400, cpu_shares=50))
    cgroups = Cgroups(DEFAULT_ROOT)
    assert not cgroups.v2
    for uuid in (a, b):
        pid = env.pid(uuid)
        assert pid is not None
        for controller in ("memory", "cpu", "pids"):
            assert cgroup_of(pid, controller) == f"/vmadmd/{uuid}", controller
    assert cgroups.memory_limit(a) == (64 + 1024) << 20  # ram + 1024 MiB by default
    assert cgroups.memory_limit(b) == 512 << 20
    root = Path(DEFAULT_ROOT)
    assert (root / "pids/vmadmd" / b / "pids.max").read_text().strip() == "400"
    assert (root / "cpu/vmadmd" / b / "cpu.shares").read_text().strip() == "512"
    stats = env.api("GET", f"/vm/{b}", type="stats")[1]["stats"]
    assert stats["memory_limit_bytes"] == 512 << 20
    # Changed live, as SmartOS does.
    env.vmadm("update", b, "max_physical_memory=768", check=True)
    assert cgroups.memory_limit(b) == 768 << 20
    # Gone with the VM.
    env.vmadm("stop", a, "-F", check=True)
    assert not (root / "memory/vmadmd" / a).exists()


def cpu_used(cgroups: Cgroups, uuid: str, seconds: float) -> float:
    """CPUs' worth used by the VM's cgroup over ``seconds``."""
    before = cgroups.cpu_usage_ns(uuid)
    t0 = time.monotonic()
    time.sleep(seconds)
    after = cgroups.cpu_usage_ns(uuid)
    assert before is not None
    assert after is not None
    return (after - before) / 1e9 / (time.monotonic() - t0)


def test_cpu_cap_holds_a_busy_guest_and_lifts_live(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    uuid = running_vm(guest_payload(guest), ready=True)

    async def spin() -> None:
        async with SerialClient(env, uuid) as console:
            await console.type(b"while :; do :; done &\necho spin-$((1+1))\n")
            await console.until(b"spin-2")

    asyncio.run(spin())
    cgroups = Cgroups(DEFAULT_ROOT)
    assert cpu_used(cgroups, uuid, 2) > 0.5, "the guest spins: qemu takes a CPU"
    env.vmadm("update", uuid, "cpu_cap=20", check=True)
    capped = cpu_used(cgroups, uuid, 3)
    assert capped < 0.3, capped
    env.vmadm("update", uuid, "cpu_cap=0", check=True)
    assert cpu_used(cgroups, uuid, 3) > 0.5


def test_cgroup_v2_files_on_a_fake_tree(tmp_path: Path) -> None:
    """The v2 layout (production hosts), written to a fake tree: this machine
    has no v2 memory/cpu/pids controllers to test against."""
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma\n")
    cgroups = Cgroups(str(tmp_path))
    assert cgroups.v2
    uuid = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"
    cgroups.create(uuid)
    assert (tmp_path / "vmadmd" / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    cgroups.apply(uuid, Limits(memory_bytes=1 << 30, cpu_cap=150, cpu_shares=200, max_lwps=None))
    vm = tmp_path / "vmadmd" / uuid
    assert (vm / "memory.max").read_text() == str(1 << 30)
    assert (vm / "cpu.max").read_text() == "150000 100000"  # 1.5 CPUs
    assert (vm / "cpu.weight").read_text() == "200"
    assert (vm / "pids.max").read_text() == "max"
    cgroups.apply(uuid, limits_of({"ram": 256}))
    assert (vm / "cpu.max").read_text() == "max 100000"
    assert (vm / "memory.max").read_text() == str((256 + 1024) << 20)
    cgroups.add(uuid, 4242)
    assert (vm / "cgroup.procs").read_text() == "4242"
    assert cgroups.memory_limit(uuid) == (256 + 1024) << 20
