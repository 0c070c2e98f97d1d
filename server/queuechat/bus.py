"""Post-commit fan-out to the streams of this process.

Each subscriber has a bounded queue. A subscriber that falls behind is cut
off (its next get raises Lagging) rather than allowed to stall publishers or
other subscribers; it reconnects and resumes from its cursor.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Hashable, Iterable


class Lagging(Exception):
    """The subscriber's queue overflowed; resume from the last cursor."""


class Subscription:
    __slots__ = ("_bus", "_topics", "_queue", "lagging")

    def __init__(self, bus: "Bus", topics: tuple[Hashable, ...], maxsize: int):
        self._bus = bus
        self._topics = topics
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.lagging = False

    def _offer(self, item: Any) -> None:
        if self.lagging:
            return
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.lagging = True
            self.close()
            # Wake a waiting get() so it notices at once.
            self._queue.get_nowait()
            self._queue.put_nowait(_LAGGING)

    async def get(self, timeout: float) -> Any | None:
        """The next item, or None after timeout seconds of silence."""
        if self.lagging:
            raise Lagging()
        if self._queue.empty():
            try:
                item = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
        else:  # busy streams skip wait_for's timer and task
            item = self._queue.get_nowait()
        if item is _LAGGING or self.lagging:
            raise Lagging()
        return item

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_LAGGING = object()


class Bus:
    def __init__(self, queue_size: int = 1000):
        self.queue_size = queue_size
        self._subs: defaultdict[Hashable, set[Subscription]] = defaultdict(set)

    def subscribe(self, topics: Iterable[Hashable], maxsize: int | None = None) -> Subscription:
        sub = Subscription(self, tuple(topics), maxsize or self.queue_size)
        for t in sub._topics:
            self._subs[t].add(sub)
        return sub

    def publish(self, topic: Hashable, item: Any) -> None:
        subs = self._subs.get(topic)
        if subs:
            for sub in tuple(subs):
                sub._offer(item)

    def subscriber_count(self, topic: Hashable) -> int:
        return len(self._subs.get(topic, ()))

    def _remove(self, sub: Subscription) -> None:
        for t in sub._topics:
            subs = self._subs.get(t)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[t]
