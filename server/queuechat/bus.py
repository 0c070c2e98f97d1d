"""Post-commit fan-out to the streams of this process.

Each subscriber has a bounded buffer. A subscriber that falls behind is cut
off (its next get raises Lagging) rather than allowed to stall publishers or
other subscribers; it reconnects and resumes from its cursor.

An idle stream costs a deque and, while waiting, one future and one timer:
thousands of open chats are mostly idle streams.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import Hashable, Iterable
from typing import Any


class Lagging(Exception):
    """The subscriber's buffer overflowed; resume from the last cursor."""


class Subscription:
    __slots__ = ("_bus", "_topics", "_items", "_maxsize", "_waiter", "lagging")

    def __init__(self, bus: Bus, topics: tuple[Hashable, ...], maxsize: int):
        self._bus = bus
        self._topics = topics
        self._items: deque[Any] = deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future | None = None
        self.lagging = False

    def _offer(self, item: Any) -> None:
        if self.lagging:
            return
        if len(self._items) >= self._maxsize:
            self.lagging = True
            self._items.clear()
            self.close()
        else:
            self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # Not a deadline on the call (ASYNC109): silence for `timeout` seconds returns None, a heartbeat's cue.
    async def get(self, timeout: float) -> Any | None:  # noqa: ASYNC109
        """The next item, or None after timeout seconds of silence."""
        if not self._items and not self.lagging:
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if self.lagging:
            raise Lagging()
        return self._items.popleft() if self._items else None

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


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

    def topics(self) -> list[Hashable]:
        """The topics someone here listens to."""
        return list(self._subs)

    def subscriber_count(self, topic: Hashable) -> int:
        return len(self._subs.get(topic, ()))

    def _remove(self, sub: Subscription) -> None:
        for t in sub._topics:
            subs = self._subs.get(t)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[t]
