"""The launcher finds its programs by absolute path, whatever PATH says (real qemu).

It runs as root with the VM's ``root/tmp`` as its working directory, which
the VM's user writes: a PATH with ``.`` (or an empty entry) in it must not
make it run a ``setpriv`` or a ``qemu-system-x86_64`` planted there.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from vmadmd.errors import StartFailed
from vmadmd.vm import launch

from .conftest import Env, bios_payload

PLANT = "#!/bin/sh\ntouch {marker}\nexec /bin/false\n"


def test_programs_planted_in_root_tmp_are_never_run(env: Env, tmp_path: Path) -> None:
    uuid = env.create(bios_payload())
    runtime = env.runtime(uuid)
    uid = env.get(uuid)["zone_uid"]
    marker = tmp_path / "ran-as-root"
    for name in ("setpriv", "qemu-system-x86_64"):
        planted = runtime / name
        planted.write_text(PLANT.format(marker=marker))
        os.chmod(planted, 0o755)
        os.chown(planted, uid, uid)  # the VM's user could have put it there
    res = env.vmadm("start", uuid, extra_env={"PATH": f".::{os.environ['PATH']}"})
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "a program planted in the VM's root/tmp was run"
    pid = env.pid(uuid)
    assert pid is not None
    assert os.readlink(f"/proc/{pid}/exe").startswith("/usr/")


def test_resolve_program_takes_absolute_paths_and_absolute_path_entries_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert launch.resolve_program("sh").startswith("/")
    here = tmp_path / "prog"
    here.write_text("#!/bin/sh\n")
    os.chmod(here, 0o755)
    assert launch.resolve_program(str(here)) == str(here)
    monkeypatch.setenv("PATH", f".::{os.environ['PATH']}")
    assert "." not in launch.search_path().split(":")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        # A bare name is never looked up in the working directory.
        with pytest.raises(StartFailed, match="not found"):
            launch.resolve_program("prog")
    finally:
        os.chdir(cwd)
    env = launch.launcher_env()
    assert env["PATH"] == launch.SAFE_PATH
    assert all(k in ("PATH", "LC_ALL") or k.startswith(launch.PASSED_ENV_PREFIXES) for k in env)


def test_a_deleted_vm_pid_hides_no_qemu(env: Env) -> None:
    """The review: the VM's user deletes (or rewrites) vm.pid in its root/tmp;
    `vmadm stop -F` and `vmadm delete` must still find and end its qemu (the
    pid comes from the identity in root's vm.json, not from the zone)."""
    env.start_daemon()
    first = env.run_vm(bios_payload())
    second = env.run_vm(bios_payload())
    pids = {}
    for uuid in (first, second):
        pid = env.pid(uuid)
        assert pid is not None
        pids[uuid] = pid
        (env.runtime(uuid) / "vm.pid").unlink()
    (env.runtime(second) / "vm.pid").write_text("1\n")
    assert env.get(first)["state"] == "running"
    res = env.vmadm("stop", first, "-F")
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(f"/proc/{pids[first]}")
    res = env.vmadm("delete", second)
    assert res.returncode == 0, res.stderr
    assert not os.path.exists(f"/proc/{pids[second]}")


def test_identity_not_argv_makes_the_vm_process(tmp_path: Path) -> None:
    """A qemu that rewrote its own command line (no `-uuid` left) is still its
    VM's process when its recorded identity matches; a look-alike with the
    right `-uuid` but another identity is not."""
    import subprocess

    from vmadmd.vm import proc

    uuid = "5d2c6a48-33a4-4d5e-9d70-0c0f3c7b1a01"
    plain = subprocess.Popen(["sleep", "30"])
    lookalike = subprocess.Popen(["sh", "-c", "sleep 30", "-uuid", uuid])
    try:
        for p in (plain, lookalike):
            for _ in range(200):  # until exec'd (the child's cmdline is its own)
                if proc.cmdline(p.pid)[:1] != proc.cmdline(os.getpid())[:1]:
                    break
                time.sleep(0.005)
        recorded = proc.identity(plain.pid)
        assert recorded is not None
        assert proc.is_vm_process(plain.pid, uuid, recorded)
        assert not proc.is_vm_process(lookalike.pid, uuid, recorded)
        assert proc.find_vm_pid(str(tmp_path / "no-such-vm.pid"), uuid, recorded) == plain.pid
    finally:
        for p in (plain, lookalike):
            p.kill()
            p.wait()
