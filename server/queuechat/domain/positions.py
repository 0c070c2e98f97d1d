"""Queue positions for waiting customers.

Derived, not stored: after a chat leaves a queue (taken or ended), the
queue's waiting list is read once and each waiting chat whose position
changed gets a QueuePosition on its stream. Arrivals join at the back and
move nobody, so they cost nothing here; a new customer's stream reads its
own position when it opens. Changes within one loop turn are coalesced.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from sqlmodel import select

from ..store.models import Conversation
from .log import conv_topic
from .views import QueuePositionView

if TYPE_CHECKING:
    from .core import Core

log = logging.getLogger(__name__)


def waiting_ids(s, queue_id: str) -> list[str]:
    return list(
        s.exec(
            select(Conversation.id)
            .where(Conversation.status == "queued", Conversation.queue_id == queue_id)
            .order_by(Conversation.enqueued_at, Conversation.id)
        ).all()
    )


def position_of(s, conv: Conversation) -> QueuePositionView:
    ids = waiting_ids(s, conv.queue_id)
    pos = ids.index(conv.id) + 1 if conv.id in ids else 0
    return QueuePositionView(conv.id, pos, len(ids))


class QueuePositions:
    def __init__(self, core: "Core"):
        self._core = core
        self._dirty: set[str] = set()
        self._task: asyncio.Task | None = None
        self._last: dict[str, dict[str, int]] = {}  # queue -> conversation -> position

    def mark(self, queue_id: str) -> None:
        self._dirty.add(queue_id)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        await asyncio.sleep(0)  # let commits of this loop turn pile up
        while self._dirty:
            queue_id = self._dirty.pop()
            try:
                ids = await self._core.db.read(waiting_ids, queue_id)
            except Exception:  # pragma: no cover - a failed read must not kill future updates
                log.exception("queue position refresh failed")
                continue
            last = self._last.get(queue_id, {})
            now = {cid: i + 1 for i, cid in enumerate(ids)}
            bus = self._core.bus
            for cid, pos in now.items():
                if last.get(cid) != pos and bus.subscriber_count(conv_topic(cid)):
                    bus.publish(conv_topic(cid), QueuePositionView(cid, pos, len(ids)))
            self._last[queue_id] = now

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
