"""The daemon's event bus: VM events with monotonic ids, a bounded history,
and subscribers with bounded queues (a slow consumer is dropped, never
allowed to grow the daemon's memory)."""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any

HISTORY = 1024
SUBSCRIBER_QUEUE = 256


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

    def emit(self, type_: str, vm: str | None = None, **data: Any) -> Event:
        event = Event(self._next_id, type_, vm, time.time(), data)
        self._next_id += 1
        self._history.append(event)
        for sub in list(self._subscribers):
            sub.offer(event)
        return event

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
