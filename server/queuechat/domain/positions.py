"""Queue positions for waiting customers.

Derived, not stored: when a queue's waiting list changes (a chat arrives, is
taken or ends), the list is read once and each watching stream whose
position or waiting count changed gets a QueuePosition. Changes are
coalesced: a queue is re-read at most every `interval` seconds, however many
chats come and go.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlalchemy import and_, case, func, or_
from sqlmodel import Session, col, select

from ..store.models import Conversation
from .log import conv_topic
from .tx import Reader, Topic
from .views import QueuePositionView

log = logging.getLogger(__name__)
_BURST = 200  # position updates sent before the refresh lets the streams run


def waiting_ids(s: Session, queue_id: str) -> list[str]:
    return list(
        s.exec(
            select(Conversation.id)
            .where(Conversation.status == "queued", Conversation.queue_id == queue_id)
            .order_by(col(Conversation.enqueued_at), col(Conversation.id))
        ).all()
    )


def position_of(s: Session, conv: Conversation) -> QueuePositionView:
    """The chat's place in its queue, counted by the database (one statement: the two numbers agree);
    no list of the waiting chats is read."""
    ahead = and_(
        col(Conversation.enqueued_at) <= conv.enqueued_at,
        or_(col(Conversation.enqueued_at) < conv.enqueued_at, col(Conversation.id) < conv.id),
    )
    count, before = s.exec(
        select(func.count(), func.count(case((ahead, 1)))).where(
            Conversation.status == "queued", Conversation.queue_id == conv.queue_id
        )
    ).one()
    return QueuePositionView(conv.id, before + 1 if conv.status == "queued" else 0, count, conv.queue_id)


class QueuePositions:
    """Pushes positions to the waiting customers who watch them.

    A queue with nobody watching costs nothing; one with watchers is re-read at
    most every `interval` seconds however fast chats join or leave it (positions
    are for people: a fifth of a second is soon enough, and a long queue is one read).

    Watches are counted per stream: a chat may have several streams open (a
    second tab, a reconnect that overlaps the old stream), and it is watched
    until the last of them calls `unwatch`. Every `watch` needs one `unwatch`."""

    def __init__(
        self,
        read: Reader,
        publish: Callable[[Topic, object], None],
        interval: float = 0.2,
        count_interval: float = 2.0,
    ):
        self._read = read
        self._publish = publish
        self._interval = interval
        self._count_interval = count_interval
        self._counts_sent: dict[str, float] = {}  # queue -> when count-only updates last went out
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # queue -> waiting conversation -> [its streams watching, position sent, count sent] (0, 0: none sent).
        # One small list per watched chat, keyed by the stream's own id string: no second table, no tuples.
        self._watchers: dict[str, dict[str, list[int]]] = {}

    def watch(self, queue_id: str, conversation_id: str) -> None:
        """A stream that showed the position it read follows it from here.

        The queue is refreshed once (within `interval`) and this conversation gets what it finds even if it
        was sent before: a change that committed between the stream's read and this call is not lost."""
        streams = self._watchers.setdefault(queue_id, {})
        entry = streams.get(conversation_id)
        if entry is None:
            streams[conversation_id] = [1, 0, 0]
        else:
            entry[0] += 1
            entry[1] = entry[2] = 0
        self.mark(queue_id)

    def unwatch(self, queue_id: str, conversation_id: str) -> None:
        streams = self._watchers.get(queue_id)
        entry = streams.get(conversation_id) if streams is not None else None
        if streams is None or entry is None:
            return
        if entry[0] > 1:
            entry[0] -= 1
            return
        del streams[conversation_id]
        if not streams:
            del self._watchers[queue_id]

    def watched(self) -> list[str]:
        """The queues someone here watches."""
        return list(self._watchers)

    def mark(self, queue_id: str) -> None:
        """The queue's waiting list changed (an arrival or a departure)."""
        if queue_id not in self._watchers:
            return
        self._dirty.add(queue_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._dirty:
            await asyncio.sleep(self._interval)  # let arrivals and departures pile up
            dirty, self._dirty = self._dirty, set()
            for queue_id in dirty:
                if queue_id not in self._watchers:
                    continue
                try:
                    ids = await self._read(waiting_ids, queue_id)
                except Exception:  # pragma: no cover - a failed read must not stop later updates
                    log.exception("queue position refresh failed")
                    continue
                watchers = self._watchers.get(queue_id)  # again: streams came and went during the read
                if not watchers:
                    continue
                count = len(ids)
                # A move in the queue goes out at once; a new count alone (arrivals behind everyone
                # watching) at most every count_interval: under a surge that is one update per
                # watcher every few seconds, not five a second.
                now = asyncio.get_running_loop().time()
                counts_due = now - self._counts_sent.get(queue_id, 0.0) >= self._count_interval
                held = False
                sent = 0
                for i, cid in enumerate(ids, 1):
                    entry = watchers.get(cid)
                    if entry is None or (entry[1] == i and entry[2] == count):
                        continue
                    if entry[1] == i and not counts_due:
                        held = True
                        continue
                    entry[1], entry[2] = i, count
                    self._publish(conv_topic(cid), QueuePositionView(cid, i, count, queue_id))
                    sent += 1
                    if sent % _BURST == 0:
                        # Let the streams woken so far send theirs before waking more: thousands of
                        # updates at once would all be in flight together (memory that stays taken).
                        await asyncio.sleep(0)
                if counts_due:
                    self._counts_sent[queue_id] = now
                if held:
                    self._dirty.add(queue_id)  # the new count follows within count_interval

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
