"""Supervisor figures per queue, for AdminService.StreamQueueStats.

Derived, not stored: one read of a few aggregate queries computes every
queue's figures at once (`compute`). One refresher per process runs it, at
most once a second and only while some stream watches: the first stream
starts it, the last one to close stops it. A stream sends a snapshot of its
queues when their figures changed, and a heartbeat when it has sent nothing
for `heartbeat_interval`. A slow stream is never queued up for: it gets the
newest snapshot when it next asks, not every one in between.

What the figures count (the proto comments of QueueStats say it for clients):

- waiting: chats in the queue with status `queued` (on offer or not);
  longest wait from the oldest one's `enqueued_at`, which a reject keeps.
- agents: live sessions whose profile holds the queue. A slot is one of the
  agent's `max_chats`; open conversations and pending offers (invites too)
  take one each, as routing counts them (`read.agent_loads`). busy: no free
  slot, ready or not. ready: set ready, offer stream open, a free slot:
  routing could offer a chat now. not ready: the rest (set not ready, or no
  offer stream). So the three add up to the queue's logged-in agents.
- offers: chat offers (not invites) for the queue's chats resolved in the
  window, by outcome; withdrawals are not counted.
- service level: of the chat offers accepted in the window, the share whose
  chat waited at most the target from `enqueued_at` to the accept. None when
  none was accepted: no figure rather than a made-up 100 %.
- ratings: customer ratings (RateConversation) of the queue's chats given in the
  window, and their average; no average when there were none.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from ..errors import invalid, not_found, short
from ..store.models import Agent, AgentSession, Conversation, Offer, Queue
from .read import agent_loads, connection, profile_queues
from .tx import Reader, utcnow
from .views import Heartbeat, QueueStatsSnapshot, QueueStatsView

log = logging.getLogger(__name__)

# Seconds: the default of `[limits] service_level_target`.
SERVICE_LEVEL_TARGET = 60.0
# The span of the offer counts and the service level, in seconds.
WINDOW = 15 * 60.0
# Figures are computed at most this often (seconds), however many streams watch.
REFRESH_INTERVAL = 1.0
# A refresh that takes long (a huge offer table) waits this many times its own duration before the next:
# the refresher never holds a reader thread more than a fifth of the time.
_BACKOFF = 4.0

# queue_ids a stream may name (a database's IN list has its limits).
MAX_QUEUE_IDS = 1000

_OUTCOMES = ("accepted", "rejected", "timed_out")

# Live sessions with what decides their state (also read by observability/metrics.py).
# Five columns: more than sqlmodel's select is typed for, so SQLAlchemy's (the same statement).
LIVE_SESSIONS = (
    core_select(
        col(AgentSession.agent_id),
        col(AgentSession.profile_id),
        col(AgentSession.ready),
        col(AgentSession.stream_count),
        col(Agent.max_chats),
    )
    .join(Agent, col(Agent.id) == AgentSession.agent_id)
    .where(col(AgentSession.ended_at).is_(None))
)


def compute(s: Session, now: datetime, target: float, window: float = WINDOW) -> QueueStatsSnapshot:
    """Every queue's figures from a few aggregate queries, whatever the number of queues: queues, waiting
    chats, live sessions with routing's own load and profile reads, and the window's offers. Each query sees
    the database as it is when it runs; they run milliseconds apart."""
    c = connection(s)
    queues = c.execute(select(Queue.id, Queue.display_name).order_by(col(Queue.id))).all()

    waiting: dict[str, tuple[int, datetime | None]] = {
        queue_id: (n, oldest)
        for queue_id, n, oldest in c.execute(
            select(Conversation.queue_id, func.count(), func.min(Conversation.enqueued_at))
            .where(Conversation.status == "queued")
            .group_by(col(Conversation.queue_id))
        )
    }

    ready: dict[str, int] = {}
    busy: dict[str, int] = {}
    not_ready: dict[str, int] = {}
    sessions = c.execute(LIVE_SESSIONS).all()
    if sessions:
        loads = agent_loads(s, {a for a, *_ in sessions})
        pq = profile_queues(s)
        for agent_id, profile_id, is_ready, streams, max_chats in sessions:
            if loads.get(agent_id, 0) >= max_chats:
                bucket = busy
            elif is_ready and streams > 0:
                bucket = ready
            else:
                bucket = not_ready
            for queue_id in pq.get(profile_id, ()):
                bucket[queue_id] = bucket.get(queue_id, 0) + 1

    outcomes: dict[tuple[str, str], int] = {}
    answered: dict[str, int] = {}
    in_time: dict[str, int] = {}
    for queue_id, status, resolved_at, enqueued_at in c.execute(
        select(Conversation.queue_id, Offer.status, Offer.resolved_at, Conversation.enqueued_at)
        .join(Conversation, col(Conversation.id) == Offer.conversation_id)
        .where(
            Offer.kind == "chat",
            col(Offer.status).in_(_OUTCOMES),
            col(Offer.resolved_at) > now - timedelta(seconds=window),
        )
    ):
        outcomes[(queue_id, status)] = outcomes.get((queue_id, status), 0) + 1
        if status == "accepted" and resolved_at is not None:
            answered[queue_id] = answered.get(queue_id, 0) + 1
            if (resolved_at - enqueued_at).total_seconds() <= target:
                in_time[queue_id] = in_time.get(queue_id, 0) + 1

    ratings: dict[str, tuple[int, float]] = {
        queue_id: (n, float(avg))
        for queue_id, n, avg in c.execute(
            select(Conversation.queue_id, func.count(), func.avg(Conversation.rating_score))
            .where(col(Conversation.rated_at) > now - timedelta(seconds=window))
            .group_by(col(Conversation.queue_id))
        )
    }

    views = []
    for queue_id, name in queues:
        rated, average = ratings.get(queue_id, (0, None))
        count, oldest = waiting.get(queue_id, (0, None))
        n = answered.get(queue_id, 0)
        views.append(
            QueueStatsView(
                queue_id=queue_id,
                queue_name=name,
                waiting_count=count,
                longest_wait=max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0,
                agents_ready=ready.get(queue_id, 0),
                agents_busy=busy.get(queue_id, 0),
                agents_not_ready=not_ready.get(queue_id, 0),
                offers_accepted=outcomes.get((queue_id, "accepted"), 0),
                offers_rejected=outcomes.get((queue_id, "rejected"), 0),
                offers_timed_out=outcomes.get((queue_id, "timed_out"), 0),
                service_level=in_time.get(queue_id, 0) / n if n else None,
                service_level_target=target,
                ratings_count=rated,
                average_rating=average,
            )
        )
    return QueueStatsSnapshot(tuple(views), now, window)


def check_queues(s: Session, queue_ids: list[str]) -> None:
    """A stream asking for a queue that does not exist is refused: a typo would otherwise show nothing, quietly."""
    found = set(connection(s).execute(select(Queue.id).where(col(Queue.id).in_(queue_ids))).scalars())
    for queue_id in queue_ids:
        if queue_id not in found:
            raise not_found("QUEUE_NOT_FOUND", f"There is no queue {short(queue_id)!r}.", queue_id=queue_id)


class _Watcher:
    """One stream's mailbox: only the newest snapshot is kept."""

    __slots__ = ("latest", "fresh")

    def __init__(self) -> None:
        self.latest: QueueStatsSnapshot | None = None
        self.fresh = asyncio.Event()

    def offer(self, snapshot: QueueStatsSnapshot) -> None:
        self.latest = snapshot
        self.fresh.set()

    async def next(self, timeout: float) -> QueueStatsSnapshot | None:  # noqa: ASYNC109 - a heartbeat's cue
        """The newest snapshot not taken yet, or None after timeout seconds without one."""
        if not self.fresh.is_set():
            try:
                async with asyncio.timeout(max(0.0, timeout)):
                    await self.fresh.wait()
            except TimeoutError:
                return None
        self.fresh.clear()
        return self.latest


class QueueStats:
    """The process's refresher and the streams that watch it.

    `service_level_target` may be changed while it runs; the next refresh uses it."""

    def __init__(
        self,
        read: Reader,
        heartbeat_interval: float,
        service_level_target: float = SERVICE_LEVEL_TARGET,
        *,
        interval: float = REFRESH_INTERVAL,
        window: float = WINDOW,
    ):
        self._read = read
        self._heartbeat = heartbeat_interval
        self.service_level_target = service_level_target
        self._interval = interval
        self._window = window
        self._watchers: set[_Watcher] = set()
        self._task: asyncio.Task[None] | None = None
        self._latest: QueueStatsSnapshot | None = None
        self.refreshes = 0  # figures computed since start (tests, metrics)

    @property
    def running(self) -> bool:
        """Whether the refresher runs: exactly while at least one stream watches."""
        return self._task is not None

    @property
    def watchers(self) -> int:
        return len(self._watchers)

    async def stream(self, queue_ids: Sequence[str] = ()) -> AsyncIterator[QueueStatsSnapshot | Heartbeat]:
        """A snapshot of the queues asked for (all when none) at once, then one whenever they change, and
        Heartbeat(0) after heartbeat_interval without either."""
        wanted = list(dict.fromkeys(queue_ids))
        if len(wanted) > MAX_QUEUE_IDS:
            raise invalid("TOO_MANY_QUEUE_IDS", f"Ask for at most {MAX_QUEUE_IDS} queues, or for all (none).")
        if wanted:
            await self._read(check_queues, wanted)
        loop = asyncio.get_running_loop()
        watcher = _Watcher()
        self._watch(watcher)
        try:
            shown: tuple[QueueStatsView, ...] | None = None
            last_sent = loop.time()
            while True:
                snapshot = await watcher.next(last_sent + self._heartbeat - loop.time())
                if snapshot is None:
                    last_sent = loop.time()
                    yield Heartbeat(0)
                    continue
                if wanted:
                    snapshot = _only(snapshot, set(wanted))
                if snapshot.queues != shown:
                    shown = snapshot.queues
                    last_sent = loop.time()
                    yield snapshot
        finally:
            self._unwatch(watcher)

    def _watch(self, watcher: _Watcher) -> None:
        self._watchers.add(watcher)
        if self._latest is not None:
            watcher.offer(self._latest)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def _unwatch(self, watcher: _Watcher) -> None:
        self._watchers.discard(watcher)
        if not self._watchers and self._task is not None:
            self._task.cancel()
            self._task = None
            self._latest = None  # a watcher that comes later gets fresh figures, not these

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._watchers:
            started = loop.time()
            try:
                snapshot = await self._read(compute, utcnow(), self.service_level_target, self._window)
            except Exception:  # a failed read must not stop later refreshes
                log.exception("queue stats refresh failed")
            else:
                self.refreshes += 1
                if self._latest is None or snapshot.queues != self._latest.queues:
                    self._latest = snapshot
                    for watcher in self._watchers:
                        watcher.offer(snapshot)
            await asyncio.sleep(max(self._interval, _BACKOFF * (loop.time() - started)))

    async def stop(self) -> None:
        """Stop the refresher (at shutdown; the streams end on their own)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _only(snapshot: QueueStatsSnapshot, queue_ids: set[str]) -> QueueStatsSnapshot:
    return QueueStatsSnapshot(
        tuple(q for q in snapshot.queues if q.queue_id in queue_ids), snapshot.computed_at, snapshot.window
    )
