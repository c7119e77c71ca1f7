"""``vmadm validate create|update``: SmartOS's payload check, nothing changed.

The report comes from the very checks create and update run (``check_create``,
``parse_update``), each property alone; so every payload validate calls bad,
create (or update) refuses too, and every one it calls valid, they take.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tests.conftest import Env

VALID_CREATE = {
    "alias": "web",
    "brand": "kvm",
    "ram": 256,
    "vcpus": 1,
    "autoboot": False,
    "boot": "order=cd,once=d",
    "disks": [{"size": 64, "model": "virtio", "boot": True}],
    "nics": [{"model": "e1000"}],
    "customer_metadata": {"user-script": "true"},
    "owner_uuid": "930896af-bf8c-48d4-885c-6573a94b1853",  # SmartOS's, kept as given
}
BAD_CREATE = {
    "alias": "web",
    "ram": "lots",  # a bad value
    "boot": "order=cz",  # a bad value
    "disks": [{"path": "/etc/passwd"}],  # a bad value: no disk outside the zone
    "state": "running",  # read-only: a bad property
    "colour": "blue",  # neither SmartOS's nor ours: a bad property
}


def _validate(env: Env, *args: str, payload: object) -> tuple[int, str, str]:
    res = env.vmadm("validate", *args, input=json.dumps(payload))
    return res.returncode, res.stdout, res.stderr


def test_valid_create_payload_is_valid_and_creates_nothing(env: Env) -> None:
    rc, out, err = _validate(env, "create", payload=VALID_CREATE)
    assert (rc, out, err) == (0, "", "VALID create payload for kvm brand VMs.\n")
    assert os.listdir(env.zones) == []
    # The brand defaults to kvm, as create has it.
    payload = {k: v for k, v in VALID_CREATE.items() if k != "brand"}
    assert _validate(env, "create", payload=payload)[0] == 0
    # And create takes what validate called valid.
    env.create(VALID_CREATE)


def test_invalid_create_payload_names_every_bad_property(env: Env) -> None:
    rc, out, err = _validate(env, "create", payload=BAD_CREATE)
    assert (rc, out) == (1, "")
    assert json.loads(err) == {
        "bad_properties": ["state", "colour"],
        "bad_values": ["ram", "boot", "disks"],
        "missing_properties": [],
    }
    assert err == json.dumps(json.loads(err), indent=2) + "\n"  # SmartOS's layout
    assert os.listdir(env.zones) == []
    # create refuses each of them for the same reason.
    for key in ("ram", "boot", "disks", "state", "colour"):
        res = env.vmadm("create", input=json.dumps({"alias": "x", key: BAD_CREATE[key]}))
        assert (res.returncode, res.stderr[:7]) == (1, "vmadm: "), (key, res.stderr)
    assert os.listdir(env.zones) == []


def test_create_payload_of_another_brand(env: Env) -> None:
    rc, out, err = _validate(env, "create", payload={"brand": "joyent", "ram": 128})
    assert (rc, out) == (1, "")
    assert json.loads(err) == {"bad_brand": "joyent"}


def test_create_payload_with_the_uuid_of_an_existing_vm(env: Env) -> None:
    uuid = env.create({"alias": "there", "autoboot": False})
    rc, _, err = _validate(env, "create", payload={"uuid": uuid, "ram": 128})
    assert rc == 1
    assert json.loads(err) == {"bad_properties": [], "bad_values": ["uuid"],
                               "missing_properties": []}  # fmt: skip


def test_update_payloads(env: Env) -> None:
    good = {
        "ram": 512,
        "alias": "renamed",
        "boot": "order=dc",
        "set_tags": {"role": "db"},
        "remove_customer_metadata": ["user-script"],
    }
    rc, out, err = _validate(env, "update", "kvm", payload=good)
    assert (rc, out, err) == (0, "", "VALID update payload for kvm brand VMs.\n")

    bad = {
        "uuid": "930896af-bf8c-48d4-885c-6573a94b1853",  # cannot be changed
        "brand": "kvm",  # cannot be changed
        "zonepath": "/elsewhere",  # read-only
        "vcpus": 0,
        "set_customer_metadata": {"k": 1},
        "remove_tags": "role",
        "boot": "once=d",
    }
    rc, out, err = _validate(env, "update", "kvm", payload=bad)
    assert (rc, out) == (1, "")
    assert json.loads(err) == {
        "bad_properties": ["uuid", "brand", "zonepath"],
        "bad_values": ["vcpus", "set_customer_metadata", "remove_tags", "boot"],
        "missing_properties": [],
    }
    # update refuses them too, and changes nothing.
    uuid = env.create({"alias": "keep", "autoboot": False, "ram": 128})
    before = (Path(env.zones) / uuid / "vm.json").read_bytes()
    for key, value in bad.items():
        res = env.vmadm("update", uuid, input=json.dumps({key: value}))
        assert (res.returncode, res.stderr[:7]) == (1, "vmadm: "), (key, res.stderr)
    assert (Path(env.zones) / uuid / "vm.json").read_bytes() == before

    rc, _, err = _validate(env, "update", "bhyve", payload=good)
    assert (rc, json.loads(err)) == (1, {"bad_brand": "bhyve"})


def test_bad_invocations_are_one_line(env: Env, tmp_path: Path) -> None:
    for args, payload in (
        (("update",), {}),  # no brand
        (("create", "kvm"), {}),  # create takes none
        (("create",), ["not", "an", "object"]),
    ):
        rc, out, err = _validate(env, *args, payload=payload)
        assert (rc, out, err.count("\n"), err[:7]) == (1, "", 1, "vmadm: "), err
    res = env.vmadm("validate", "create", input="{not json")
    assert (res.returncode, res.stderr[:19]) == (1, "vmadm: invalid JSON")
    res = env.vmadm("validate", "create", "-f", str(tmp_path / "missing.json"))
    assert (res.returncode, res.stderr[:18]) == (1, "vmadm: cannot read")
    # -f FILE
    path = tmp_path / "payload.json"
    path.write_text(json.dumps({"ram": 128}))
    res = env.vmadm("validate", "create", "-f", str(path))
    assert (res.returncode, res.stderr) == (0, "VALID create payload for kvm brand VMs.\n")
