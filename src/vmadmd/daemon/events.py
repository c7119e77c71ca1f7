"""The daemon's event bus: VM events with monotonic ids, a bounded history,
and subscribers with bounded queues (a slow consumer is dropped, never
allowed to grow the daemon's memory).

A client resuming from an id the history no longer holds is told so (see
``gap``) rather than silently resumed.  Events a guest can cause at will
(qemu's RESET, a reset loop) go through a per-VM rate limit (``emit_limited``)
so that one guest cannot flush everyone else's history; what was held back
is counted in the next event that passes (``suppressed``).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

HISTORY = 1024
SUBSCRIBER_QUEUE = 256
RATE_BURST = 10.0  # events of one kind one VM may emit at once ...
RATE_PER_SECOND = 2.0  # ... and then this many per second


@dataclass(frozen=True)
class Event:
    id: int
    type: str
    vm: str | None
    time: float
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": self.type, "time": self.time}
        if self.vm is not None:
            out["vm"] = self.vm
        out.update(self.data)
        return out


class Subscriber:
    def __init__(self, vm: str | None) -> None:
        self.vm = vm
        self.queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.dropped = False

    def offer(self, event: Event) -> None:
        if self.dropped or (self.vm is not None and event.vm != self.vm):
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            # Too slow: cut it off.  A None wakes the reader to end the stream.
            self.dropped = True
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queue.put_nowait(None)


class EventBus:
    def __init__(self, history: int = HISTORY) -> None:
        self._next_id = 1
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self._subscribers: set[Subscriber] = set()
        # Rate limits: key -> (tokens, last refill, suppressed since last pass).
        self._buckets: dict[tuple[str | None, str], tuple[float, float, int]] = {}

    def emit(self, type_: str, vm: str | None = None, **data: Any) -> Event:
        event = Event(self._next_id, type_, vm, time.time(), data)
        self._next_id += 1
        self._history.append(event)
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

    def emit_limited(self, key: str, type_: str, vm: str | None = None, **data: Any) -> bool:
        """``emit``, unless ``vm`` emitted too many ``key`` events lately.

        Returns whether the event went out; one that does carries how many
        were held back before it (``suppressed``).
        """
        now = time.monotonic()
        tokens, last, held = self._buckets.get((vm, key), (RATE_BURST, now, 0))
        tokens = min(RATE_BURST, tokens + (now - last) * RATE_PER_SECOND)
        if tokens < 1.0:
            self._buckets[(vm, key)] = (tokens, now, held + 1)
            return False
        self._buckets[(vm, key)] = (tokens - 1.0, now, 0)
        if held:
            data = {**data, "suppressed": held}
        self.emit(type_, vm, **data)
        return True

    def forget(self, vm: str) -> None:
        """Drop a VM's rate-limit state (it stopped)."""
        for key in [k for k in self._buckets if k[0] == vm]:
            del self._buckets[key]

    def gap(self, last_id: int) -> tuple[int, int] | None:
        """The ids after ``last_id`` that fell out of the history, if any."""
        oldest = self._history[0].id if self._history else self._next_id
        if last_id + 1 < oldest:
            return last_id + 1, oldest - 1
        return None

    def since(self, last_id: int, vm: str | None = None) -> list[Event]:
        return [e for e in self._history if e.id > last_id and (vm is None or e.vm == vm)]

    def subscribe(self, vm: str | None = None) -> Subscriber:
        sub = Subscriber(vm)
        self._subscribers.add(sub)
        return sub

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    def unsubscribe(self, sub: Subscriber) -> None:
        self._subscribers.discard(sub)

    @property
    def last_id(self) -> int:
        return self._next_id - 1
