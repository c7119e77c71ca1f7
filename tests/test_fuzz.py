"""Fuzz the API with schemathesis against our own OpenAPI document.

The daemon only listens on a unix socket; socat bridges a loopback TCP port
to it for the fuzzer.  The VM uuid parameter is narrowed to real uuids (a
running VM, a stopped one, an unknown one) and one malformed value, so the
generated cases reach the handlers rather than the uuid check; hostile
uuids have their own test in test_reliability.
"""

from __future__ import annotations

import copy
import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, Env, _bin, bios_payload

U_UNKNOWN = "0b3f1c2e-9a4d-4f5e-8b6a-1c2d3e4f5a6b"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@pytest.mark.timeout(600)
def test_schemathesis_finds_no_server_error(env: Env) -> None:
    daemon = env.start_daemon("--qmp-timeout", "2", "--log-level", "info")
    running = env.create(bios_payload())
    stopped = env.create(bios_payload())
    env.vmadm("start", running, check=True)
    env.wait_qmp(running)

    doc = json.loads((REPO / "src" / "vmadmd" / "daemon" / "openapi.json").read_text())
    fuzz_doc = copy.deepcopy(doc)
    for ops in fuzz_doc["paths"].values():
        for op in ops.values():
            for param in op.get("parameters", []):
                if param["name"] == "uuid" and param["in"] == "path":
                    param["schema"] = {
                        "type": "string",
                        "enum": [running, stopped, U_UNKNOWN, "not-a-uuid"],
                    }
    schema_path = env.tmp / "openapi-fuzz.json"
    schema_path.write_text(json.dumps(fuzz_doc))

    port = free_port()
    bridge = subprocess.Popen(
        ["socat", f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork", f"UNIX-CONNECT:{env.socket}"]
    )
    try:
        env.wait_for(lambda: accepts(port), what="socat listening")
        res = subprocess.run(
            [
                _bin("schemathesis"), "run", str(schema_path),
                "--url", f"http://127.0.0.1:{port}",
                "--checks", "not_a_server_error",
                "--max-examples", "150",
                "--seed", "7",
                "--request-timeout", "30",
                "--exclude-path", "/events",
                "--no-color",
            ],
            capture_output=True, text=True, timeout=600, cwd=env.tmp,
        )  # fmt: skip
    finally:
        bridge.terminate()
        bridge.wait(timeout=10)
    out = res.stdout + res.stderr
    Path(env.tmp / "schemathesis.out").write_text(out)
    assert res.returncode == 0, out[-4000:]
    generated = re.search(r"(\d+) generated", out)
    assert generated is not None, out[-2000:]
    assert int(generated.group(1)) >= 1000, out[-2000:]
    # The daemon is the one we started, still answering.
    assert daemon.poll() is None
    assert env.api("GET", "/ping")[0] == 200
    assert "Traceback" not in env.daemon_log(tail=None)
