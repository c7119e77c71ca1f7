"""A pending stop or reboot: where the VM goes, and the deadline for it.

Kept in ``vm.json`` as ``"transition": {"state": "stopping", "to": ...,
"expire": <ms since epoch>}`` (the contract), and nowhere else in any other
form: the daemon, the API and ``vmadm`` all read and write it through this
type.  Standard library only: the CLI imports this.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

TransitionTo = Literal["stopped", "start"]

KEY = "transition"


class Transition(NamedTuple):
    to: TransitionTo
    expire_ms: int

    def merge(self, to: TransitionTo, expire_ms: int) -> Transition:
        """This pending transition after a new stop/reboot request.

        A pending deadline is never extended (a second, later stop does not
        buy the guest more time); an earlier one pre-empts it.  The latest
        request decides where the VM goes afterwards.
        """
        return Transition(to, min(self.expire_ms, expire_ms))

    def seconds_left(self, now: float) -> float:
        """Seconds from ``now`` (epoch seconds) to the deadline; negative when past."""
        return self.expire_ms / 1000 - now

    def to_json(self) -> dict[str, Any]:
        return {"state": "stopping", "to": self.to, "expire": self.expire_ms}

    @classmethod
    def from_json(cls, raw: object) -> Transition | None:
        """The transition stored in ``raw``; None when absent or malformed."""
        if not isinstance(raw, dict):
            return None
        to, expire = raw.get("to"), raw.get("expire")
        if (
            to not in ("stopped", "start")
            or isinstance(expire, bool)
            or not isinstance(expire, int)
        ):
            return None
        return cls(to, expire)

    @classmethod
    def of(cls, record: dict[str, Any]) -> Transition | None:
        """The transition pending in a VM record, if any."""
        return cls.from_json(record.get(KEY))


def request(current: Transition | None, to: TransitionTo, expire_ms: int) -> Transition:
    """The transition after a stop/reboot request, given the pending one."""
    return Transition(to, expire_ms) if current is None else current.merge(to, expire_ms)
