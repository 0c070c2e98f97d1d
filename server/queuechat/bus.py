"""Post-commit fan-out to the streams of this process.

Each subscriber has a bounded buffer. A subscriber that falls behind is cut
off (its next get raises Lagging) rather than allowed to stall publishers or
other subscribers; it reconnects and resumes from its cursor.

Thousands of open chats are mostly idle streams, so an idle one costs little:
a Subscription (no buffer until items wait in it; an item for a waiting
stream goes straight to its future), while it waits one future, and a place
in a shared timer wheel for its heartbeat instead of a timer of its own.
A topic with one subscriber (a conversation's only stream) keeps no set.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Hashable, Iterable
from typing import Any


class Lagging(Exception):
    """The subscriber's buffer overflowed; resume from the last cursor."""


class Subscription:
    __slots__ = ("_bus", "_topics", "_items", "_maxsize", "_waiter", "_handed", "_deadline", "_slot", "lagging")

    def __init__(self, bus: Bus, topics: tuple[Hashable, ...], maxsize: int):
        self._bus = bus
        self._topics = topics
        self._items: list[Any] | None = None  # items nobody waited for, oldest first; None while there are none
        self._maxsize = maxsize
        self._waiter: asyncio.Future[Any] | None = None  # a get() waiting for the next item
        self._handed = False  # an item went to the waiting get() and is not taken yet: it counts as buffered
        self._deadline = 0.0  # when that get() returns None (loop time)
        self._slot = 0.0  # the timer wheel slot this subscription sits in (0: none)
        self.lagging = False

    def _offer(self, item: Any) -> None:
        if self.lagging:
            return
        items = self._items
        if not items:
            waiter = self._waiter
            if waiter is not None:
                self._waiter = None
                if not waiter.done():  # done: cancelled with its stream; keep the item for a next get
                    waiter.set_result(item)
                    self._handed = True
                    return
            if items is None:
                items = self._items = []
        if len(items) + self._handed >= self._maxsize:
            self.lagging = True
            self._items = None
            self.close()
            waiter, self._waiter = self._waiter, None
            if waiter is not None and not waiter.done():
                waiter.set_exception(Lagging())
        else:
            items.append(item)

    # Not a deadline on the call (ASYNC109): silence for `timeout` seconds gives None, a heartbeat's cue.
    def get(self, timeout: float) -> asyncio.Future[Any]:  # noqa: ASYNC109
        """Await it: the next item, or None after timeout seconds of silence; raises Lagging once cut off.

        A plain function returning a future (no coroutine frame per call). The None may come up to
        timeout/16 (at most 0.5 s) late: waiters share timer wheel slots."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._handed = False
        items = self._items
        if self.lagging:
            fut.set_exception(Lagging())
        elif items:
            fut.set_result(items.pop(0))
            if not items:
                self._items = None  # an idle stream keeps no buffer
        else:
            self._waiter = fut
            self._deadline = loop.time() + timeout
            self._bus._wheel.add(self, loop, min(0.5, timeout / 16) or 1e-3)
        return fut

    def close(self) -> None:
        self._bus._remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Wheel:
    """One timer per slot of time for all the subscriptions waiting, instead of one timer each.

    A waiting subscription sits in the slot of its deadline (or an earlier one). When a slot's time
    comes, each of its subscriptions whose deadline has passed gets None; one that got an item and
    waits again since moves on to the slot of its new deadline; one not waiting leaves the wheel (its
    next get puts it back). So a busy stream is in one slot at a time, however many items it gets."""

    def __init__(self) -> None:
        self._slots: dict[float, list[Subscription]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, sub: Subscription, loop: asyncio.AbstractEventLoop, step: float) -> None:
        if loop is not self._loop:  # slots belong to the loop that runs their timers
            self._slots, self._loop = {}, loop
        at = math.ceil(sub._deadline / step) * step
        if sub._slot and sub._slot <= at:
            return  # an earlier slot moves it on when its time comes
        slot = self._slots.get(at)
        if slot is None:
            slot = self._slots[at] = []
            loop.call_at(at, self._ring, at, step)
        slot.append(sub)
        sub._slot = at

    def _ring(self, at: float, step: float) -> None:
        subs = self._slots.pop(at, ())
        loop = self._loop
        for sub in subs:
            if sub._slot != at:
                continue  # moved to an earlier slot since
            sub._slot = 0.0
            waiter = sub._waiter
            if waiter is None or waiter.done():
                continue  # not waiting now (or gone)
            if sub._deadline <= at:
                sub._waiter = None
                waiter.set_result(None)
            elif loop is not None:
                self.add(sub, loop, step)


class Bus:
    def __init__(self, queue_size: int = 1000):
        self.queue_size = queue_size
        # topic -> its subscription, or a tuple of them when there are several (most topics have one)
        self._subs: dict[Hashable, Subscription | tuple[Subscription, ...]] = {}
        self._wheel = _Wheel()

    def subscribe(self, topics: Iterable[Hashable], maxsize: int | None = None) -> Subscription:
        sub = Subscription(self, tuple(topics), maxsize or self.queue_size)
        for t in sub._topics:
            subs = self._subs.get(t)
            if subs is None:
                self._subs[t] = sub
            elif isinstance(subs, Subscription):
                if subs is not sub:
                    self._subs[t] = (subs, sub)
            elif sub not in subs:
                self._subs[t] = (*subs, sub)
        return sub

    def publish(self, topic: Hashable, item: Any) -> None:
        subs = self._subs.get(topic)
        if subs is None:
            return
        if isinstance(subs, Subscription):
            subs._offer(item)
        else:
            for sub in subs:  # a tuple: a subscriber cut off meanwhile replaces it, not changes it
                sub._offer(item)

    def topics(self) -> list[Hashable]:
        """The topics someone here listens to."""
        return list(self._subs)

    def subscriber_count(self, topic: Hashable) -> int:
        subs = self._subs.get(topic)
        if subs is None:
            return 0
        return 1 if isinstance(subs, Subscription) else len(subs)

    def _remove(self, sub: Subscription) -> None:
        for t in sub._topics:
            subs = self._subs.get(t)
            if subs is sub:
                del self._subs[t]
            elif isinstance(subs, tuple) and sub in subs:
                rest = tuple(s for s in subs if s is not sub)
                self._subs[t] = rest[0] if len(rest) == 1 else rest
