"""How a VM's qemu last ended: the one form of ``last_exit``.

Kept in ``vm.json`` as ``"last_exit": {"reason": ..., "time": ...}`` (the
contract: ``poweroff``, ``stop`` with its ``stage``, ``panic``, ``crash`` with
the ``signal`` or exit ``status``), published on ``/events``, told in words
by ``vmadm stop --all``.  The VM layer (``vmadm stop -F``), the daemon and
the CLI all read and write it through this type, as ``Transition`` is for
a pending stop.  Standard library only: the CLI imports this.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

KEY = "last_exit"

Reason = Literal["poweroff", "stop", "panic", "crash"]
# The step that ended a stop: the guest's own ACPI shutdown, or the forcing
# ladder's (``quit`` over QMP, then SIGTERM, then SIGKILL).
Stage = Literal["acpi", "quit", "sigterm", "sigkill"]

_FIELDS = ("stage", "by", "signal", "status", "detail")


class Ending(NamedTuple):
    reason: Reason
    stage: str | None = None  # a stop: a Stage, or what qemu said when it was not ours
    by: str | None = None  # "host": stopped by someone else than the daemon
    signal: str | int | None = None  # a crash: the signal that killed qemu
    status: int | None = None  # a crash: qemu's exit status
    detail: str | None = None

    @classmethod
    def stopped(cls, stage: str, *, by: str | None = None) -> Ending:
        return cls("stop", stage=stage, by=by)

    @classmethod
    def crashed(cls, status: int | None) -> Ending:
        """A qemu that went away without a shutdown: its wait status as its
        waiter recorded it (128 + n: killed by signal n), if known."""
        if status is None:
            return cls("crash", detail="qemu exited without shutting down (signal or abort)")
        if status > 128:
            import signal

            try:
                return cls("crash", signal=signal.Signals(status - 128).name)
            except ValueError:
                return cls("crash", signal=status - 128)
        return cls("crash", status=status)

    def fields(self) -> dict[str, Any]:
        """``last_exit`` without its time (what events carry)."""
        out: dict[str, Any] = {"reason": self.reason}
        for name in _FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out

    def to_json(self, time: str) -> dict[str, Any]:
        return {**self.fields(), "time": time}

    @classmethod
    def from_json(cls, raw: object) -> Ending | None:
        """The ending stored in ``raw``; None when absent or malformed."""
        if not isinstance(raw, dict):
            return None
        reason = raw.get("reason")
        if reason not in ("poweroff", "stop", "panic", "crash"):
            return None
        return cls(reason, *(raw.get(name) for name in _FIELDS))

    @classmethod
    def of(cls, record: dict[str, Any]) -> Ending | None:
        return cls.from_json(record.get(KEY))

    def words(self) -> str:
        """What ``vmadm stop --all`` prints of it."""
        if self.reason == "stop":
            if self.stage == "acpi":
                return "stopped by the guest (ACPI power button)"
            return f"forced at the deadline ({self.stage})"
        return {"poweroff": "powered off by the guest", "panic": "guest kernel panic",
                "crash": "qemu crashed"}[self.reason]  # fmt: skip
