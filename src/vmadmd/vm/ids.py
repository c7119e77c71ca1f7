"""VM uuids: the one check made before any path is built from one.

Without ``re``: the CLI imports this on every call, and ``re`` (with the
``enum`` it pulls in) is ~5 ms of a Python process's start-up.
"""

from __future__ import annotations

from vmadmd.errors import InvalidUuid

_HEX = frozenset("0123456789abcdef")
_DASHES = (8, 13, 18, 23)


def is_uuid(value: object) -> bool:
    """Whether ``value`` is a canonical lower-case UUID (8-4-4-4-12 hex digits)."""
    return (
        isinstance(value, str)
        and len(value) == 36
        and all(value[i] == "-" for i in _DASHES)
        and _HEX.issuperset(value.replace("-", ""))
        and value.count("-") == 4
    )


def validate_uuid(value: str) -> str:
    """Return ``value`` when it is a canonical lower-case UUID, else raise InvalidUuid."""
    if not is_uuid(value):
        shown = repr(value) if isinstance(value, str) and len(value) <= 64 else "value"
        raise InvalidUuid(f"invalid VM uuid {shown}: expected a lower-case canonical UUID")
    return value
