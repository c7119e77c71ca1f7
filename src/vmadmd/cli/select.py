"""Choosing and ordering VMs, as SmartOS's ``vmadm list`` and ``vmadm lookup`` do.

Filters are ``field=value`` (equal as text) or ``field=~regex`` (the regex
found anywhere in the text); a field may be nested with dots, and ``*``
matches every element of a list or value of an object, so
``nics.*.nic_tag=admin`` finds the VMs with any nic on the admin tag.
Booleans read as ``true``/``false``.  Sort keys are fields, ``-`` before
one for descending order; numbers sort as numbers, a VM without the field
sorts last.

Standard library only: the CLI imports this.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

from vmadmd.errors import InvalidParameter


class Filter(NamedTuple):
    path: tuple[str, ...]
    value: str
    regex: re.Pattern[str] | None


def parse_filters(pairs: Iterable[str]) -> list[Filter]:
    out = []
    for pair in pairs:
        field, sep, value = pair.partition("=")
        if not sep or not field:
            raise InvalidParameter(f"a filter is field=value or field=~regex, not {pair!r}")
        regex = None
        if value.startswith("~"):
            try:
                regex = re.compile(value[1:])
            except re.error as err:
                raise InvalidParameter(f"bad regex in {pair!r}: {err}") from None
        out.append(Filter(tuple(field.split(".")), value, regex))
    return out


def values_at(vm: Any, path: tuple[str, ...]) -> list[Any]:
    """Every value at ``path`` (``*`` fans out over lists and objects)."""
    if not path:
        return [vm]
    head, rest = path[0], path[1:]
    if head == "*":
        items = vm.values() if isinstance(vm, dict) else vm if isinstance(vm, list) else []
        return [v for item in items for v in values_at(item, rest)]
    if isinstance(vm, dict) and head in vm:
        return values_at(vm[head], rest)
    if isinstance(vm, list) and head.isdigit() and int(head) < len(vm):
        return values_at(vm[int(head)], rest)
    return []


def text(value: Any) -> str:
    """A value as the CLI shows it, and as filters compare it."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def printable(value: str, keep: str = "") -> str:
    """``value`` safe for a terminal: every character that is not printable
    (controls such as ESC, which start terminal sequences, line and
    paragraph separators, bidi overrides) written as its escape, ``\x1b``.

    Text output only: JSON output is escaped by json itself, and filters
    compare the raw text.  ``keep``: characters let through as they are
    (a monitor's multi-line answer keeps its newlines).
    """
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() or c in keep else repr(c)[1:-1] for c in value)


def matches(vm: dict[str, Any], filters: list[Filter]) -> bool:
    for f in filters:
        found = [text(v) for v in values_at(vm, f.path)]
        if f.regex is not None:
            if not any(f.regex.search(v) for v in found):
                return False
        elif f.value not in found:
            return False
    return True


def sort(vms: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """Sorted by ``keys`` (``-field`` descending), missing values last."""
    out = list(vms)
    for key in reversed(keys):
        descending = key.startswith("-")
        path = tuple(key.lstrip("-+").split("."))

        def sort_key(vm: dict[str, Any], path: tuple[str, ...] = path) -> tuple[int, Any]:
            found = values_at(vm, path)
            if not found or found[0] is None:
                return (1, 0)  # missing: last, in either direction (see below)
            value = found[0]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return (0, (0, value, ""))
            return (0, (1, 0, text(value)))

        present = [vm for vm in out if sort_key(vm)[0] == 0]
        missing = [vm for vm in out if sort_key(vm)[0] == 1]
        present.sort(key=lambda vm: sort_key(vm)[1], reverse=descending)
        out = present + missing
    return out


def field_list(raw: str | None, default: Iterable[str]) -> list[str]:
    if raw is None:
        return list(default)
    fields = [f.strip() for f in raw.split(",")]
    if not all(fields):
        raise InvalidParameter("fields are a comma-separated list, e.g. uuid,alias")
    return fields
