"""``vmadm events [-f] [-j] [-r] [uuid]`` against a real daemon and real qemu.

SmartOS's flags: ``-f`` full (whole dates and uuids, nothing cut short),
``-j`` one JSON object a line, ``-r`` a ``ready`` line first, printed once
the stream is subscribed (every event after it is shown).
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

from harness.world import tool
from tests.conftest import Env, bios_payload

LONG_ALIAS = "an-alias-longer-than-thirty-characters"  # 38


class Follower:
    """A running ``vmadm events``, its lines read without Python's buffering
    (select on a buffered pipe misses lines already read into the buffer)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.pending = b""

    def next_line(self, timeout: float = 20) -> str:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self.pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"vmadm events printed no line within {timeout:.0f} s")
            chunk = os.read(fd, 65536)
            assert chunk, (
                f"vmadm events ended: {self.proc.stderr.read() if self.proc.stderr else ''!r}"
            )
            self.pending += chunk
        line, _, self.pending = self.pending.partition(b"\n")
        return line.decode()

    def silent_for(self, seconds: float) -> bool:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout.fileno()], [], [], seconds)
        return not ready and not self.pending

    def lines_until(self, pattern: str, timeout: float = 30) -> list[str]:
        """Lines read until one matches ``pattern`` (regex), that one included."""
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out.append(self.next_line(max(0.1, deadline - time.monotonic())))
            if re.search(pattern, out[-1]):
                return out
        raise AssertionError(f"no line matching {pattern!r} in {out}")


@contextmanager
def follower(env: Env, *args: str) -> Iterator[Follower]:
    proc = subprocess.Popen(
        [tool("vmadm"), "events", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env.environ,
    )  # fmt: skip
    try:
        yield Follower(proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_ready_json_and_the_uuid_filter(env: Env) -> None:
    env.start_daemon()
    one = env.run_vm(bios_payload(alias="one"))
    two = env.run_vm(bios_payload(alias=LONG_ALIAS))

    # -r -j: the ready marker as JSON first, then the events as JSON lines.
    with follower(env, "-r", "-j") as proc:
        ready = json.loads(proc.next_line())
        assert set(ready) == {"type", "time", "uuid", "date"}
        assert ready["type"] == "ready"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", ready["date"])
        assert env.api("POST", f"/vm/{one}", action="reset")[0] == 200
        events = [json.loads(x) for x in proc.lines_until(r'"type":"reset"')]
        reset = events[-1]
        assert (reset["vm"], reset["zonename"]) == (one, one)
        assert isinstance(reset["id"], int)

    # A uuid: that VM's events only.  Text, as SmartOS prints it:
    # [HH:MM:SS.mmmZ] <uuid's first part> <alias, 30 at most> <type>[: details]
    with follower(env, "-r", two) as proc:
        assert re.fullmatch(r"\[\d\d:\d\d:\d\d\.\d{3}Z\] ready", proc.next_line())
        assert env.api("POST", f"/vm/{one}", action="reset")[0] == 200
        assert env.api("POST", f"/vm/{two}", action="reset")[0] == 200
        got = proc.lines_until(r" reset$")
        short = LONG_ALIAS[:27] + "..."
        for line in got:
            assert re.match(rf"\[\d\d:\d\d:\d\d\.\d{{3}}Z\] {two.split('-')[0]} {short} ", line), (
                line
            )
        assert not any(one.split("-")[0] in line for line in got)

        # A stop shows up with its details (key=JSON value).
        res = env.vmadm("stop", two, "-F", check=True)
        assert res.returncode == 0
        exited = proc.lines_until(r" exited")[-1]
        assert 'reason="stop"' in exited, exited


def test_full_output(env: Env) -> None:
    env.start_daemon()
    uuid = env.run_vm(bios_payload(alias=LONG_ALIAS))
    with follower(env, "-f", "-r", uuid) as proc:
        ready = proc.next_line()
        assert re.fullmatch(
            r"\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] ready \(uuid [0-9a-f-]{36}\)", ready
        ), ready
        assert env.api("POST", f"/vm/{uuid}", action="reset")[0] == 200
        line = proc.lines_until(r" reset$")[-1]
        assert re.fullmatch(
            rf"\[\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z\] {uuid} {LONG_ALIAS} reset", line
        ), line


def test_without_ready_nothing_is_printed_first_and_bad_input(env: Env) -> None:
    env.start_daemon()
    uuid = env.run_vm(bios_payload())
    with follower(env, "-j", uuid) as proc:
        assert proc.silent_for(1.5), "printed something with nothing happening and no -r"
    for args in (["not-a-uuid"], ["-x"]):
        res = env.vmadm("events", *args, timeout=10)
        assert res.returncode == 1
        assert res.stderr.count("\n") == 1
        assert res.stderr.startswith("vmadm: ")
    # The daemon refuses a bad ready value, with the API's error shape.
    status, body = env.api("GET", "/events", ready="yes")
    assert status == 400
    assert body["error"]["code"] == "InvalidParameter"


def test_no_daemon_is_one_line(env: Env) -> None:
    res = env.vmadm("events", "-r", timeout=10)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1
    assert res.stderr.startswith("vmadm: ")
