"""SmartOS's guest metadata protocol, as functions over bytes and a VM record.

The guest asks on its second serial port (``ttyS1``, qemu's ``vm.ttyb``)
and the daemon answers as SmartOS's metadata agent does, because the
clients in guests (cloud-init's SmartOS datasource, ``mdata-get``) are
written against that agent and check its answers to the letter.

No I/O here: ``parse_line`` turns one line into a ``Request`` (or the answer
a malformed line gets at once, or nothing for a V2 frame to drop), ``answer``
reads the request against a record and gives the reply bytes, or a
``Change`` when the guest writes; ``apply_change`` makes that change to a
record (the agent calls it under the VM's lock).  The agent around it is in
``daemon/mdagent.py``.

The wire, as the agent speaks it:

* a line is a request; trailing white space is not part of it;
* a line that is empty, or starts with white space, or is ``GET`` or
  ``NEGOTIATE`` with nothing after it, is answered ``invalid command`` (the
  client's "is the service there?" probe is a bare newline);
* ``NEGOTIATE V2`` -> ``V2_OK`` (anything else after NEGOTIATE: ``FAILURE``);
* V1: ``GET <key>`` -> ``SUCCESS`` + the value (lines starting with ``.``
  doubled) + a line ``.``; ``NOTFOUND``; ``FAILURE``.  ``KEYS`` too;
* V2: ``V2 <len> <crc32> <reqid> <CMD> [base64 arg]``, where ``<len>`` is the
  length of ``<reqid> <CMD> [arg]`` and ``<crc32>`` its CRC-32 as 8
  lower-case hex digits; a frame whose length or CRC is wrong is dropped
  without a word (the client times out and asks again).  The answer is
  framed the same way around ``<reqid> SUCCESS|NOTFOUND|FAILURE [base64]``.

Which keys come from where (SmartOS's routing): ``sdc:`` keys describe the VM
itself (read-only); a key ending in ``_pw``, or whose ``ns:`` prefix is listed
in the VM's ``internal_metadata_namespaces``, is ``internal_metadata`` (the
namespaced ones read-only to the guest); any other key is
``customer_metadata``.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from vmadmd.errors import InvalidParameter
from vmadmd.vm import props

# The longest request line kept: a PUT of a value as large as
# customer_metadata may be (256 KiB), base64 inside base64, fits.
MAX_LINE = 1 << 20

INVALID = b"invalid command\n"
CUSTOMER = "customer_metadata"
INTERNAL = "internal_metadata"
NAMESPACES = "internal_metadata_namespaces"

# What ``sdc:<name>`` may read of the VM (SmartOS's list, less what would
# tell the guest about the host's layout: zonepath, zonename).
SDC_FIELDS = (
    "alias", "billing_id", "brand", "cpu_cap", "cpu_shares", "create_timestamp",
    "server_uuid", "image_uuid", "datacenter_name", "do_not_inventory", "dns_domain",
    "fs_allowed", "hostname", "limit_priv", "maintain_resolvers", "max_physical_memory",
    "max_locked_memory", "max_lwps", "max_swap", "owner_uuid", "package_name",
    "package_version", "quota", "ram", "resolvers", "tmpfs", "uuid", "vcpus",
    "zfs_io_priority",
)  # fmt: skip
DEFAULT_MTU = 1500

_V2_RE = re.compile(r"\s*([0-9]+)\s+([0-9a-f]+)\s+([0-9a-f]+)\s+(.*)", re.DOTALL)
_BODY_RE = re.compile(r"\s*(\S+)\s*(.*)", re.DOTALL)
_CMD_RE = re.compile(r"(\S+)\s?(.*)", re.DOTALL)


class Request(NamedTuple):
    """One request: ``reqid`` is None for V1; ``arg`` as decoded (V2: from base64)."""

    cmd: str
    arg: str
    reqid: str | None = None

    @property
    def v2(self) -> bool:
        return self.reqid is not None


class Change(NamedTuple):
    """A write the guest asked for: ``value`` None removes ``key`` from ``which``."""

    request: Request
    which: str
    key: str
    value: str | None


def crc32_hex(body: str) -> str:
    """The CRC every V2 frame carries: CRC-32 of the body's UTF-8, 8 lower-case hex digits."""
    return f"{binascii.crc32(body.encode()) & 0xFFFFFFFF:08x}"


def b64decode(text: str) -> str | None:
    """Lenient, as the agent's decoder is: padding may be missing and stray
    characters are skipped; None only when nothing sensible comes out."""
    cleaned = re.sub(r"[^A-Za-z0-9+/]", "", text.replace("-", "+").replace("_", "/"))
    cleaned = cleaned[: len(cleaned) - len(cleaned) % 4 if len(cleaned) % 4 == 1 else None]
    try:
        raw = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4))
    except (binascii.Error, ValueError):
        return None
    return raw.decode("utf-8", errors="replace")


def b64encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def parse_line(line: bytes) -> Request | bytes | None:
    """One line (without its newline): a request, the bytes to answer at
    once, or None for a V2 frame to drop."""
    text = line.decode("utf-8", errors="replace").rstrip()
    m = _CMD_RE.fullmatch(text)
    if m is None:
        return INVALID
    cmd, rest = m.group(1), m.group(2)
    if cmd in ("NEGOTIATE", "GET") and not rest:
        return INVALID
    if cmd != "V2":
        return Request(cmd, rest)
    frame = _V2_RE.fullmatch(rest)
    if frame is None:
        return None
    length, crc, reqid, tail = frame.groups()
    body = f"{reqid} {tail}"
    if int(length) <= 0 or int(length) != len(body) or crc != crc32_hex(body):
        return None
    inner = _BODY_RE.fullmatch(tail)
    if inner is None:
        return None
    arg = b64decode(inner.group(2)) if inner.group(2) else ""
    # An argument that does not decode reads as none (SmartOS: null).
    return Request(inner.group(1), arg or "", reqid)


# -- replies ------------------------------------------------------------------


def _v2(request: Request, code: str, payload: str | None = None) -> bytes:
    body = f"{request.reqid} {code}"
    if payload:
        body += f" {b64encode(payload)}"
    return f"V2 {len(body)} {crc32_hex(body)} {body}\n".encode()


def success(request: Request, value: str) -> bytes:
    if request.v2:
        return _v2(request, "SUCCESS", value)
    dotted = re.sub(r"^\.", "..", value, flags=re.MULTILINE)
    return f"SUCCESS\n{dotted}\n.\n".encode()


def notfound(request: Request) -> bytes:
    return _v2(request, "NOTFOUND") if request.v2 else b"NOTFOUND\n"


def failure(request: Request, why: str | None = None) -> bytes:
    return _v2(request, "FAILURE", why) if request.v2 else b"FAILURE\n"


def _value(request: Request, value: object) -> bytes:
    """A looked-up value as the agent gives it: strings and numbers as text,
    absent as NOTFOUND, anything else (an object, a list) as a bare FAILURE."""
    if value is None:
        return notfound(request)
    if isinstance(value, str):
        return success(request, value)
    if isinstance(value, bool):
        return success(request, "true" if value else "false")
    if isinstance(value, float) and value.is_integer():
        return success(request, str(int(value)))  # as JavaScript writes it
    if isinstance(value, int | float):
        return success(request, str(value))
    return failure(request)


# -- routing --------------------------------------------------------------------


def internal_namespace(record: Mapping[str, Any], key: str) -> str | None:
    """The internal namespace ``key`` is in (its ``ns:`` prefix, when listed), if any."""
    if ":" not in key:
        return None
    listed = record.get(NAMESPACES)
    prefix = key.split(":", 1)[0]
    return prefix if isinstance(listed, list) and prefix in listed else None


def _is_internal(record: Mapping[str, Any], key: str) -> bool:
    return key.endswith("_pw") or internal_namespace(record, key) is not None


def _mapping(record: Mapping[str, Any], which: str) -> Mapping[str, Any]:
    value = record.get(which)
    return value if isinstance(value, dict) else {}


def keys(record: Mapping[str, Any]) -> list[str]:
    """``KEYS``: the customer keys that are not internal, then the internal keys that are."""
    customer = [k for k in _mapping(record, CUSTOMER) if not _is_internal(record, k)]
    internal = [k for k in _mapping(record, INTERNAL) if _is_internal(record, k)]
    return customer + internal


def _prefix_of(netmask: object) -> int | None:
    try:
        return ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
    except ValueError:
        return None


def sdc_nics(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``sdc:nics``: each nic in the shape cloud-init reads (``interface``,
    ``mac``, ``ips`` as ``a.b.c.d/NN``, ``gateways``, ``primary``, ``mtu``),
    with the SmartOS fields kept as given.  When no nic says it is primary,
    the first one is (SmartOS makes the first nic primary)."""
    nics = [n for n in record.get("nics", []) if isinstance(n, dict)]
    any_primary = any(n.get("primary") for n in nics)
    out: list[dict[str, Any]] = []
    for i, nic in enumerate(nics):
        view: dict[str, Any] = {"interface": nic.get("interface", f"net{i}")}
        for name in ("mac", "ip", "netmask", "gateway", "nic_tag", "vlan_id", "model",
                     "network_uuid"):  # fmt: skip
            if name in nic:
                view[name] = nic[name]
        if "ips" in nic:
            view["ips"] = nic["ips"]
        elif isinstance(nic.get("ip"), str):
            ip = nic["ip"]
            prefix = _prefix_of(nic.get("netmask", "255.255.255.255"))
            if ip == "dhcp" or "/" in ip or prefix is None:
                view["ips"] = [ip]
            else:
                view["ips"] = [f"{ip}/{prefix}"]
        if "gateways" in nic:
            view["gateways"] = nic["gateways"]
        elif isinstance(nic.get("gateway"), str):
            view["gateways"] = [nic["gateway"]]
        view["mtu"] = nic.get("mtu", DEFAULT_MTU)
        view["primary"] = bool(nic.get("primary")) or (not any_primary and i == 0)
        out.append(view)
    return out


def sdc_routes(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``sdc:routes``: SmartOS's ``routes`` object (destination -> gateway, or
    ``nics[N]`` for a link-local route through that nic's address) as a list."""
    routes = record.get("routes")
    nics = record.get("nics", [])
    out: list[dict[str, Any]] = []
    if not isinstance(routes, dict):
        return out
    for dst, gateway in routes.items():
        m = re.fullmatch(r"nics\[(\d+)\]", str(gateway))
        if m is None:
            out.append({"linklocal": False, "dst": dst, "gateway": gateway})
            continue
        index = int(m.group(1))
        nic = nics[index] if index < len(nics) and isinstance(nics[index], dict) else {}
        ip = nic.get("ip")
        if isinstance(ip, str) and ip != "dhcp":
            out.append({"linklocal": True, "dst": dst, "gateway": ip})
    return out


def _flatten(view: Mapping[str, Any], name: str) -> object:
    """``a.b.c`` looked up through nested objects (SmartOS's ``VM.flatten``)."""
    value: object = view
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _sdc(request: Request, record: Mapping[str, Any], name: str) -> bytes:
    if name == "nics":
        return success(request, json.dumps(sdc_nics(record)))
    if name == "routes" and "routes" in record:
        return success(request, json.dumps(sdc_routes(record)))
    if name in ("resolvers", "tmpfs") and name in record:
        return success(request, json.dumps(record[name]))
    if name == "operator-script":
        return _value(request, _mapping(record, INTERNAL).get("operator-script"))
    view = {k: record[k] for k in SDC_FIELDS if k in record}
    view["tags"] = _mapping(record, "tags")
    return _value(request, _flatten(view, name))


def _get(request: Request, record: Mapping[str, Any]) -> bytes:
    key = request.arg.strip()
    if not key:
        return failure(request, "Invalid GET Request")
    if key.startswith("sdc:"):
        return _sdc(request, record, key[4:])
    which = INTERNAL if _is_internal(record, key) else CUSTOMER
    return _value(request, _mapping(record, which).get(key))


def _refused(record: Mapping[str, Any], key: str) -> str | None:
    """Why the guest may not change ``key``, if it may not."""
    if key.startswith("sdc:"):
        return 'Cannot update the "sdc" Namespace.'
    ns = internal_namespace(record, key)
    if ns is not None:
        return f'Cannot update the "{ns}" Namespace.'
    return None


def _where(key: str) -> str:
    """Where a guest's write lands: passwords and the operator's script are
    internal, as SmartOS's agent has it."""
    return INTERNAL if key.endswith("_pw") or key == "operator-script" else CUSTOMER


def answer(request: Request, record: Mapping[str, Any]) -> bytes | Change:
    """The reply to ``request`` from ``record``, or the ``Change`` it asks for."""
    cmd = request.cmd
    if cmd == "GET":
        return _get(request, record)
    if cmd == "KEYS":
        return success(request, "\n".join(keys(record)))
    if cmd == "NEGOTIATE" and not request.v2:
        return b"V2_OK\n" if request.arg == "V2" else b"FAILURE\n"
    if cmd == "DELETE" and request.v2:
        key = request.arg.strip()
        if not key:
            return failure(request, "Invalid DELETE Request")
        why = _refused(record, key)
        return failure(request, why) if why else Change(request, _where(key), key, None)
    if cmd == "PUT" and request.v2:
        terms = request.arg.strip().split(" ")
        key = (b64decode(terms[0]) or "").strip() if len(terms) == 2 else ""
        value = b64decode(terms[1]) if len(terms) == 2 else None
        if not key or value is None:
            return failure(request, "Invalid PUT Request")
        why = _refused(record, key)
        if why:
            return failure(request, why)
        # An empty value removes the key (the agent's update does).
        return Change(request, _where(key), key, value or None)
    return failure(request, f"Unknown command {cmd[:64]}")


def apply_change(record: dict[str, Any], change: Change) -> None:
    """Make ``change`` to ``record`` (under the VM's lock), within the
    metadata bounds: InvalidParameter, and the record unchanged, beyond them."""
    why = _refused(record, change.key)
    if why:  # the namespaces may have changed since the request was read
        raise InvalidParameter(why)
    current = dict(_mapping(record, change.which))
    if change.value is None:
        current.pop(change.key, None)
    else:
        current[change.key] = change.value
    if change.which == CUSTOMER:
        checked = props.validate({CUSTOMER: current})[CUSTOMER]
    else:
        checked = props.validate({INTERNAL: current})[INTERNAL]
    record[change.which] = checked


def printable(text: str, limit: int = 80) -> str:
    """Guest-chosen text for a log line: escaped, bounded."""
    shown = ascii(text[:limit])[1:-1]
    return shown + ("..." if len(text) > limit else "")
