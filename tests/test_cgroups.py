"""Each VM in its own cgroup with SmartOS's resource controls: real cgroup v1
here (this machine kind mounts v1 controllers), v2 against a fake tree."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from vmadmd.vm.cgroup import (
    DEFAULT_ROOT,
    Cgroups,
    Limits,
    limits_of,
    resolve_manager,
    systemd_properties,
)

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


# systemd-run and systemctl as far as vmadmd uses them, over a fake v2 tree
# ($FAKE_CGROUP_ROOT): the scope is a directory under its slice, the unit
# properties land in the files systemd would write, and `systemd-run --scope`
# joins the scope and exec's the rest, as the real one does.
FAKE_SYSTEMD = r"""#!/bin/sh
set -eu
echo "$(basename "$0") $*" >> "$FAKE_CGROUP_ROOT/calls.log"
props() {  # dir K=V...
    dir=$1; shift
    for kv; do
        v=${kv#*=}
        case $kv in
        MemoryMax=*) echo "$v" > "$dir/memory.max" ;;
        CPUQuota=) echo "max 100000" > "$dir/cpu.max" ;;
        CPUQuota=*) echo "$(( ${v%\%} * 1000 )) 100000" > "$dir/cpu.max" ;;
        CPUWeight=*) echo "$v" > "$dir/cpu.weight" ;;
        TasksMax=infinity) echo max > "$dir/pids.max" ;;
        TasksMax=*) echo "$v" > "$dir/pids.max" ;;
        esac
    done
}
case $(basename "$0") in
systemd-run)
    unit= slice= ps=
    while [ "$1" != -- ]; do
        case $1 in
        --unit=*) unit=${1#--unit=} ;;
        --slice=*) slice=${1#--slice=} ;;
        -p) shift; ps="$ps $1" ;;
        esac
        shift
    done
    shift
    dir=$FAKE_CGROUP_ROOT/$slice/$unit
    mkdir -p "$dir"
    props "$dir" $ps
    echo $$ > "$dir/cgroup.procs"
    exec "$@"
    ;;
systemctl)
    [ "$1" = set-property ] && [ "$2" = --runtime ] || exit 1
    dir=$(echo "$FAKE_CGROUP_ROOT"/*/"$3")
    [ -d "$dir" ] || { echo "Unit $3 not loaded." >&2; exit 1; }
    shift 3
    props "$dir" "$@"
    ;;
esac
"""


def fake_systemd(bindir: Path, tree: Path) -> None:
    """The fakes, their tree written in (the launcher gives the programs it
    runs a fixed environment: no FAKE_CGROUP_ROOT reaches them)."""
    run = bindir / "systemd-run"
    run.write_text(FAKE_SYSTEMD.replace("#!/bin/sh\n", f"#!/bin/sh\nFAKE_CGROUP_ROOT={tree}\n", 1))
    run.chmod(0o755)
    (bindir / "systemctl").symlink_to(run)


def test_systemd_scope_against_a_fake_systemd(env: Env, tmp_path: Path) -> None:
    """Where systemd is PID 1, qemu starts inside vmadmd-<uuid>.scope made by
    `systemd-run --scope` with SmartOS's controls as properties, and
    `vmadm update` changes them with `systemctl set-property --runtime`.
    PID 1 here is not systemd: both commands are fakes over a fake v2 tree
    (the cgroupfs manager is tested for real above)."""
    tree = tmp_path / "cgroup"
    tree.mkdir()
    (tree / "cgroup.controllers").write_text("cpu memory pids\n")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    fake_systemd(bindir, tree)
    env.extra_env.update(
        VMADM_CGROUP_MANAGER="systemd",
        VMADM_CGROUP_ROOT=str(tree),
        PATH=f"{bindir}:{os.environ['PATH']}",
    )
    env.start_daemon()
    uuid = env.create(bios_payload(max_physical_memory=512, cpu_cap=50, max_lwps=300))
    env.vmadm("start", uuid, check=True)
    scope = tree / "vmadmd.slice" / f"vmadmd-{uuid}.scope"
    calls = (tree / "calls.log").read_text()
    assert f"--scope --quiet --collect --unit=vmadmd-{uuid}.scope --slice=vmadmd.slice" in calls
    assert (scope / "memory.max").read_text().strip() == str(512 << 20)
    assert (scope / "cpu.max").read_text().strip() == "50000 100000"
    assert (scope / "pids.max").read_text().strip() == "300"
    assert (scope / "cgroup.procs").read_text().strip() == str(env.pid(uuid))
    # Not the cgroupfs layout: nothing written beside the scope.
    assert not (tree / "vmadmd").exists()
    # Live changes through systemctl; read back from the scope.
    env.vmadm("update", uuid, "max_physical_memory=768", "cpu_cap=0", check=True)
    assert (
        f"set-property --runtime vmadmd-{uuid}.scope MemoryMax={768 << 20}"
        in (tree / "calls.log").read_text()
    )
    assert (scope / "cpu.max").read_text().strip() == "max 100000"
    cgroups = Cgroups(str(tree), "systemd")
    assert cgroups.memory_limit(uuid) == 768 << 20
    # The daemon reads the scope too.
    stats = env.api("GET", f"/vm/{uuid}", type="stats")[1]["stats"]
    assert stats["memory_limit_bytes"] == 768 << 20
    env.vmadm("stop", uuid, "-F", check=True)


def test_cgroup_manager_choice_and_properties() -> None:
    assert resolve_manager("cgroupfs") == "cgroupfs"
    assert resolve_manager("systemd") == "systemd"
    with pytest.raises(ValueError, match="cgroup manager"):
        resolve_manager("lxc")
    if not os.path.isdir("/run/systemd/system"):  # this machine kind: PID 1 is not systemd
        assert resolve_manager("auto") == "cgroupfs"
    assert systemd_properties(Limits(1 << 30, 0, 100, None)) == [
        "MemoryMax=1073741824", "CPUQuota=", "CPUWeight=100", "TasksMax=infinity",
    ]  # fmt: skip
    assert systemd_properties(Limits(1 << 30, 250, 20000, 64))[1:] == [
        "CPUQuota=250%", "CPUWeight=10000", "TasksMax=64",
    ]  # fmt: skip
