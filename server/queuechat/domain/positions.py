"""Queue positions for waiting customers.

Derived, not stored: after a chat leaves a queue (taken or ended), the
queue's waiting list is read once and each waiting chat whose position
changed gets a QueuePosition on its stream. Arrivals join at the back and
move nobody, so they cost nothing here; a new customer's stream reads its
own position when it opens. Changes within one loop turn are coalesced.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from sqlmodel import Session, col, select

from ..store.models import Conversation
from .log import conv_topic
from .tx import Reader, Topic
from .views import QueuePositionView

log = logging.getLogger(__name__)


def waiting_ids(s: Session, queue_id: str) -> list[str]:
    return list(
        s.exec(
            select(Conversation.id)
            .where(Conversation.status == "queued", Conversation.queue_id == queue_id)
            .order_by(col(Conversation.enqueued_at), col(Conversation.id))
        ).all()
    )


def position_of(s: Session, conv: Conversation) -> QueuePositionView:
    ids = waiting_ids(s, conv.queue_id)
    pos = ids.index(conv.id) + 1 if conv.id in ids else 0
    return QueuePositionView(conv.id, pos, len(ids), conv.queue_id)


class QueuePositions:
    """Pushes positions to the waiting customers who watch them.

    A queue with nobody watching costs nothing; one with watchers is re-read at
    most every `interval` seconds however fast chats leave it (positions are for
    people: a fifth of a second is soon enough, and a long queue is one read)."""

    def __init__(self, read: Reader, publish: Callable[[Topic, object], None], interval: float = 0.2):
        self._read = read
        self._publish = publish
        self._interval = interval
        self._dirty: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self._watchers: dict[str, set[str]] = {}  # queue -> waiting conversations with an open stream
        self._last: dict[str, dict[str, int]] = {}  # queue -> conversation -> position last sent

    def watch(self, queue_id: str, conversation_id: str) -> None:
        self._watchers.setdefault(queue_id, set()).add(conversation_id)

    def unwatch(self, queue_id: str, conversation_id: str) -> None:
        watchers = self._watchers.get(queue_id)
        if watchers is not None:
            watchers.discard(conversation_id)
            if not watchers:
                del self._watchers[queue_id]
                self._last.pop(queue_id, None)

    def mark(self, queue_id: str) -> None:
        if queue_id not in self._watchers:
            return
        self._dirty.add(queue_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self._dirty:
            await asyncio.sleep(self._interval)  # let departures pile up
            dirty, self._dirty = self._dirty, set()
            for queue_id in dirty:
                watchers = self._watchers.get(queue_id)
                if not watchers:
                    continue
                try:
                    ids = await self._read(waiting_ids, queue_id)
                except Exception:  # pragma: no cover - a failed read must not stop later updates
                    log.exception("queue position refresh failed")
                    continue
                last = self._last.setdefault(queue_id, {})
                for i, cid in enumerate(ids):
                    if cid in watchers and last.get(cid) != i + 1:
                        last[cid] = i + 1
                        self._publish(conv_topic(cid), QueuePositionView(cid, i + 1, len(ids)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
