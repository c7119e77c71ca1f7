"""Stop and reboot that always finish, against real qemu and a real daemon."""

from __future__ import annotations

import json
import os
import select
import signal
import time
from typing import Any

import pytest

from vmadmd.errors import DaemonUnavailable
from vmadmd.vm.transition import Transition, request

from .conftest import Env, RunVm, bios_payload, guest_payload

LATE_MAX = 0.25  # forced within 250 ms after the deadline


def test_merge_transition_never_extends_a_deadline() -> None:
    first = request(None, "stopped", 10_000)
    assert first.to_json() == {"state": "stopping", "to": "stopped", "expire": 10_000}
    assert request(first, "stopped", 20_000).expire_ms == 10_000
    assert request(first, "stopped", 5_000).expire_ms == 5_000
    assert request(first, "start", 20_000).to_json() == {
        "state": "stopping",
        "to": "start",
        "expire": 10_000,
    }


def test_transition_reads_back_what_it_writes_and_nothing_malformed() -> None:
    t = Transition("start", 1234)
    assert Transition.from_json(t.to_json()) == t
    assert Transition.of({"transition": t.to_json()}) == t
    assert Transition.of({}) is None
    bad: object
    for bad in (None, [], {"to": "stopped"}, {"to": "x", "expire": 1},
                {"to": "stopped", "expire": "1"}, {"to": "stopped", "expire": True}):  # fmt: skip
        assert Transition.from_json(bad) is None, bad


class ExitWatch:
    """Timestamps the exit of a VM's current qemu, via a pidfd."""

    def __init__(self, env: Env, uuid: str) -> None:
        pid = env.pid(uuid)
        assert pid is not None
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def wait(self, timeout: float) -> float:
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
            assert ready, f"qemu {self.pid} still running after {timeout} s"
            return time.time()
        finally:
            os.close(self.fd)


def past_deadline(transition: dict[str, Any], margin: float = 0.5) -> None:
    """Wait until the transition's deadline is ``margin`` seconds in the past."""
    left = transition["expire"] / 1000 + margin - time.time()
    if left > 0:
        time.sleep(left)


def stop(env: Env, uuid: str, timeout: float, action: str = "stop") -> dict[str, Any]:
    status, body = env.api("POST", f"/vm/{uuid}", action=action, timeout=str(timeout))
    assert status == 202, body
    transition: dict[str, Any] = body["transition"]
    return transition


def test_cooperating_guest_stops_at_once(
    env: Env, running_vm: RunVm, guest: dict[str, str]
) -> None:
    uuid = running_vm(guest_payload(guest), ready=True)
    watch = ExitWatch(env, uuid)
    t0 = time.time()
    transition = stop(env, uuid, 30)
    assert transition["to"] == "stopped"
    assert transition["state"] == "stopping"
    assert abs(transition["expire"] / 1000 - (t0 + 30)) < 1
    gone = watch.wait(10)
    assert gone - t0 < 3, "the guest powered off well before the deadline"
    # Reported stopped, transition cleared, stage recorded: promptly.
    vm_json = env.runtime(uuid).parent.parent / "vm.json"
    env.wait_for(
        lambda: "transition" not in json.loads(vm_json.read_text()), timeout=2, what="cleared"
    )
    settled = time.time() - gone
    assert settled < 0.5, settled  # the precise figure is measured in bench/
    vm = env.get(uuid)
    assert vm["state"] == "stopped"
    assert "transition_to" not in vm
    assert vm["last_exit"]["reason"] == "stop"
    assert vm["last_exit"]["stage"] == "acpi"
    assert "vmtest: powering off" in env.console(uuid)


@pytest.mark.parametrize("kind", ["ignore_acpi", "bios"])
def test_non_cooperating_guest_forced_at_deadline(
    env: Env, guest: dict[str, str], kind: str
) -> None:
    env.start_daemon()
    payload = guest_payload(guest, ignore_acpi=True) if kind == "ignore_acpi" else bios_payload()
    uuid = env.run_vm(payload, ready=kind == "ignore_acpi")
    watch = ExitWatch(env, uuid)
    transition = stop(env, uuid, 3)
    vm = env.get(uuid)
    assert vm["state"] == "stopping"
    assert vm["transition_to"] == "stopped"
    assert vm["transition_expire"] == transition["expire"]
    gone = watch.wait(15)
    late = gone - transition["expire"] / 1000
    assert 0 <= late < LATE_MAX, late
    if kind == "ignore_acpi":
        assert "vmtest: ignoring the power button" in env.console(uuid)
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=2, what="stopped")
    vm = env.get(uuid)
    assert vm["last_exit"]["reason"] == "stop"
    assert vm["last_exit"]["stage"] == "quit"
    assert "transition_to" not in vm


@pytest.mark.parametrize("kind", ["guest", "ignore_acpi"])
def test_reboot_ends_running_again(
    env: Env, running_vm: RunVm, guest: dict[str, str], kind: str
) -> None:
    uuid = running_vm(guest_payload(guest, ignore_acpi=kind == "ignore_acpi"), ready=True)
    old_pid = env.pid(uuid)
    res = env.vmadm("reboot", uuid, "-t", "3")
    assert res.returncode == 0, res.stderr
    # Not a terminal: no progress output, SmartOS's line alone.
    assert res.stderr == f"Successfully completed reboot for VM {uuid}\n"
    vm = env.get(uuid)
    assert vm["state"] == "running"
    assert vm["pid"] != old_pid
    assert "transition_to" not in vm
    assert vm["autoboot"] is True  # as `vmadm start` left it: a reboot does not flip it
    # The console log restarts with each qemu: the new boot reaches ready too.
    env.wait_console(uuid, count=1)
    assert env.api("GET", f"/vm/{uuid}", type="status")[1]["status"]["status"] == "running"


def test_daemon_killed_after_202_forces_at_original_deadline(env: Env) -> None:
    daemon = env.start_daemon()
    uuid = env.run_vm(bios_payload())
    watch = ExitWatch(env, uuid)
    transition = stop(env, uuid, 4)
    env.stop_daemon(daemon, signal.SIGKILL)
    time.sleep(1)  # no daemon for a second of the four: downtime, not a wait
    env.start_daemon()
    gone = watch.wait(15)
    late = gone - transition["expire"] / 1000
    assert 0 <= late < LATE_MAX, late
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=2, what="stopped")


def test_daemon_back_after_deadline_forces_at_once(env: Env) -> None:
    daemon = env.start_daemon()
    uuid = env.run_vm(bios_payload())
    watch = ExitWatch(env, uuid)
    transition = stop(env, uuid, 1)
    env.stop_daemon(daemon, signal.SIGKILL)
    past_deadline(transition)
    assert env.get(uuid)["state"] == "stopping", "nobody forced it while the daemon was dead"
    t0 = time.time()
    env.start_daemon()
    gone = watch.wait(15)
    assert gone > transition["expire"] / 1000
    assert gone - t0 < 2.0


def test_reboot_survives_daemon_kill(env: Env) -> None:
    daemon = env.start_daemon()
    uuid = env.run_vm(bios_payload())
    old = env.pid(uuid)
    transition = stop(env, uuid, 1, action="reboot")
    env.stop_daemon(daemon, signal.SIGKILL)
    past_deadline(transition)
    env.start_daemon()
    env.wait_for(
        lambda: env.get(uuid)["state"] == "running" and env.pid(uuid) != old,
        timeout=10,
        what="rebooted",
    )


def test_guest_poweroff_clears_transition_and_reboot_boots_again(
    env: Env, guest: dict[str, str]
) -> None:
    env.start_daemon()
    # Ignores the power button, but powers itself off 2 s after ready.
    uuid = env.run_vm(guest_payload(guest, ignore_acpi=True, poweroff_after=2), ready=True)
    watch = ExitWatch(env, uuid)
    transition = stop(env, uuid, 60, action="reboot")
    gone = watch.wait(20)
    assert gone < transition["expire"] / 1000 - 30
    env.wait_for(lambda: env.get(uuid)["state"] == "running", timeout=10, what="booted again")
    env.wait_console(uuid)
    assert "transition_to" not in env.get(uuid)
    # And with no request at all, a self power-off is the guest's own.
    watch = ExitWatch(env, uuid)
    watch.wait(20)
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", timeout=2, what="stopped")
    assert env.get(uuid)["last_exit"]["reason"] == "poweroff"


def test_forced_stop_preempts_graceful(env: Env, running_vm: RunVm) -> None:
    uuid = running_vm(bios_payload())
    stop(env, uuid, 60, action="reboot")
    t0 = time.monotonic()
    res = env.vmadm("stop", uuid, "-F")
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 10
    env.wait_for(lambda: env.get(uuid)["state"] == "stopped", what="stopped")
    vm = env.get(uuid)
    assert vm["state"] == "stopped"
    assert "transition_to" not in vm
    assert vm["autoboot"] is False
    # A second, later graceful stop does not extend the first; a shorter one pre-empts.
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    first = stop(env, uuid, 30)
    assert stop(env, uuid, 300)["expire"] == first["expire"]
    watch = ExitWatch(env, uuid)
    shorter = stop(env, uuid, 1)
    assert shorter["expire"] < first["expire"]
    gone = watch.wait(10)
    assert 0 <= gone - shorter["expire"] / 1000 < LATE_MAX


def test_bad_timeouts_and_wrong_state(env: Env) -> None:
    env.start_daemon()
    uuid = env.create(bios_payload())
    vm_json = env.runtime(uuid).parent.parent / "vm.json"
    before = vm_json.read_bytes()
    assert env.api("POST", f"/vm/{uuid}", action="stop", timeout="10")[0] == 409
    assert vm_json.read_bytes() == before
    env.vmadm("start", uuid, check=True)
    env.wait_qmp(uuid)
    before = vm_json.read_bytes()
    for bad in ("", "0", "-5", "abc", "nan", "inf", "86401", "1e309"):
        status, body = env.api("POST", f"/vm/{uuid}", action="stop", timeout=bad)
        assert status == 400, (bad, body)
    status, _ = env.api("POST", f"/vm/{uuid}", action="reboot")
    assert status == 400
    assert vm_json.read_bytes() == before
    res = env.vmadm("stop", uuid, "-t", "0")
    assert res.returncode == 1
    assert "positive" in res.stderr


def test_vmadm_stop_waits_and_clears_autoboot(env: Env, guest: dict[str, str]) -> None:
    env.start_daemon()
    uuid = env.create(guest_payload(guest))
    env.vmadm("start", uuid, check=True)
    assert env.get(uuid)["autoboot"] is True
    env.wait_console(uuid)
    env.wait_qmp(uuid)
    res = env.vmadm("stop", uuid, "-t", "20")
    assert res.returncode == 0, res.stderr
    vm = env.get(uuid)
    assert vm["state"] == "stopped"
    assert vm["autoboot"] is False
    res = env.vmadm("stop", uuid)
    assert res.returncode == 1
    assert "not running" in res.stderr


def test_daemon_killed_around_the_202_loses_nothing(env: Env) -> None:
    """SIGKILL at random moments around a stop request: afterwards the VM is
    either stopped (the deadline was on disk, and honoured) or still running
    with no transition (the request was never accepted) - never half-way."""
    import random
    import threading

    uuid = env.create(bios_payload())
    for attempt in range(4):
        daemon = env.start_daemon()
        if env.pid(uuid) is None:
            env.vmadm("start", uuid, check=True)
        env.wait_qmp(uuid)
        answer: list[int] = []

        def send(out: list[int] = answer) -> None:
            try:
                out.append(env.api("POST", f"/vm/{uuid}", action="stop", timeout="1")[0])
            except DaemonUnavailable:
                out.append(0)  # killed under the request: no answer

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(random.uniform(0.0, 0.03) if attempt else 0.0)
        env.stop_daemon(daemon, signal.SIGKILL)
        sender.join(timeout=10)
        on_disk = "transition" in json.loads(
            (env.runtime(uuid).parent.parent / "vm.json").read_text()
        )
        env.start_daemon()
        if on_disk or answer == [202]:
            env.wait_for(lambda: env.pid(uuid) is None, timeout=10, what="the stop honoured")
        else:
            # Picked up by the new daemon, with no stop to force: it keeps running.
            env.wait_qmp(uuid)
            assert env.pid(uuid) is not None, "no transition was written: the VM keeps running"
        vm = env.get(uuid)
        assert "transition_to" not in vm
        env.stop_daemon(env.daemons[-1])
