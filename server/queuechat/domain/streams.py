"""The two stream loops: an agent session's offer feed and a conversation's events.

Each subscribes to the bus before reading the backlog, then skips what the
backlog already sent, so nothing falls between the two. A stream resumes
from any cursor; a disconnect raises CancelledError at an await and the
`finally` clauses clean up.

Live items arrive in seq order from this node's commits, but in a cluster
another node's events come over NATS, late or (rarely) not at all. So a
stream delivers by seq: an item it has already passed is dropped, and one
past a gap first reads the missing rows from the database (a seq is
assigned under the conversation's row lock, so every lower seq has
committed). A `Behind` item from the reconciler does the same when nothing
follows a lost notification.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from sqlmodel import Session, col, select

from ..bus import Bus
from ..config import Limits
from ..errors import ChatError, Kind, denied, unauthenticated
from ..store.models import Conversation, FeedEvent
from . import agents, receipts, supervision
from .access import readable_conversation, stream_access
from .conversations import events_after
from .log import conv_topic, feed_topic, feed_view
from .positions import QueuePositions, position_of
from .read import read_cursors
from .tx import Reader, Writes
from .views import (
    AgentPrincipal,
    Behind,
    CustomerPrincipal,
    Draining,
    EventView,
    FeedEventView,
    Heartbeat,
    QueuePositionView,
    ReadCursorView,
    ReadSignal,
    SessionEnded,
    TypingView,
)

Who = AgentPrincipal | CustomerPrincipal
_PAGE = 500
_DRAINING = ChatError(
    Kind.UNAVAILABLE, "NODE_DRAINING", "This server is shutting down; reconnect and resume from the last seq you saw."
)


class Streams:
    def __init__(
        self,
        read: Reader,
        write: Writes,
        spawn: Callable[..., None],
        bus: Bus,
        positions: QueuePositions,
        limits: Limits,
        node_id: str = "local",
        lease_seconds: float = 10.0,
    ):
        self._read = read
        self._write = write
        self._spawn = spawn
        self._bus = bus
        self._positions = positions
        self._limits = limits
        self.node_id = node_id
        self.lease_seconds = lease_seconds
        self.leases: dict[str, str] = {}  # lease id -> session id: the offer streams open on this node
        # Told where a stream stands once it has read its backlog (a cluster's reconciler starts from there).
        self.caught_up: Callable[[tuple[str, str], int], None] = lambda topic, seq: None

    async def offer_feed(self, who: AgentPrincipal, after_seq: int) -> AsyncIterator[FeedEventView | Heartbeat]:
        """The session's offer feed: backlog after the cursor, then live. Offers are made while it is open."""
        sub = self._bus.subscribe([feed_topic(who.session_id)])
        lease = uuid.uuid4().hex
        try:
            # Held from before the write: a cancel during it still closes the lease the write may commit.
            self.leases[lease] = who.session_id
            if not await self._write(agents.stream_opened, who.session_id, lease, self.node_id, self.lease_seconds):
                raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
            last = max(0, after_seq)
            while True:
                page = await self._read(_feed_after, who.session_id, last)
                for ev in page:
                    last = ev.seq
                    yield ev
                if len(page) < _PAGE:
                    break
            page = ev = None  # type: ignore[assignment]  # keep no backlog alive
            self.caught_up(feed_topic(who.session_id), last)
            yield Heartbeat(last)  # caught up: live from here
            while True:
                item = await sub.get(self._limits.heartbeat_interval)
                if item is None:
                    yield Heartbeat(last)
                elif isinstance(item, SessionEnded):
                    raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
                elif isinstance(item, Draining):
                    raise _DRAINING
                elif isinstance(item, FeedEventView | Behind) and item.seq > last and not _about_conversation(item):
                    upto = item.seq if isinstance(item, Behind) else item.seq - 1
                    while last < upto:  # a gap: read what was missed, in order
                        missed = await self._read(_feed_after, who.session_id, last, upto)
                        if not missed:
                            break
                        for ev in missed:
                            last = ev.seq
                            yield ev
                    if isinstance(item, FeedEventView) and item.seq > last:
                        last = item.seq
                        yield item
        finally:
            sub.close()
            self.leases.pop(lease, None)
            self._spawn(agents.stream_closed, who.session_id, lease)  # a no-op if no lease was made

    async def conversation(
        self, who: Who, conversation_id: str, after_seq: int
    ) -> AsyncIterator[EventView | Heartbeat | QueuePositionView | TypingView | ReadCursorView]:
        """Backlog after the cursor, then live. Customers never get private events; an agent's
        stream ends with their session, when they leave, or when the invite that let them look ends."""
        customer = isinstance(who, CustomerPrincipal)
        watching: str | None = None  # the queue whose positions this stream shows, while the chat waits
        topic = conv_topic(conversation_id)
        # An agent's stream hears its session's feed too: it carries the end of the session.
        topics = (topic,) if isinstance(who, CustomerPrincipal) else (topic, feed_topic(who.session_id))
        sub = self._bus.subscribe(topics)
        del topics
        try:
            # Checked after subscribing, so no change of access can fall in between.
            watching_invite = await self._read(stream_access, who, conversation_id)
            sent = seen = max(0, after_seq)
            while True:
                page = await self._read(events_after, conversation_id, sent, customer, _PAGE)
                for ev in page:
                    sent = seen = ev.seq
                    yield ev
                    if _final(ev, who):
                        return
                if len(page) < _PAGE:
                    break
            # A stream lives for hours: keep no backlog alive (not even its last event, read for this stream alone).
            page = ev = None  # type: ignore[assignment]
            self.caught_up(topic, seen)
            yield Heartbeat(sent if customer else seen)  # caught up: live from here
            pos = await self._read(_position, conversation_id)
            shown: tuple[int, int] | None = None  # the position and count this stream shows
            if pos is not None:
                watching = pos.queue_id  # while it waits, this stream gets position updates
                self._positions.watch(watching, conversation_id)
                shown = (pos.position, pos.waiting_count)
                yield pos
                pos = None
            # The others' read cursors as they stand: then only those that move forward.
            reads: dict[ParticipantKey, int] = {}
            for cursor in await self._read(_cursors, who, conversation_id):
                reads[_key(cursor)] = cursor.seq
                yield cursor
            cursor = None  # type: ignore[assignment]
            while True:
                item: Any = None  # nothing of the last item stays alive while the stream waits (for hours, maybe)
                item = await sub.get(self._limits.heartbeat_interval)
                if item is None:
                    # Customers' cursors count only what they may see: private activity stays invisible.
                    yield Heartbeat(sent if customer else seen)
                elif isinstance(item, SessionEnded):
                    raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
                elif isinstance(item, Draining):
                    raise _DRAINING
                elif isinstance(item, TypingView):
                    if _shows_typing(item, who):
                        yield item
                elif isinstance(item, ReadSignal):
                    told = receipts.shown_to(item, who)
                    if told is not None and told.seq > reads.get(_key(told), 0):
                        reads[_key(told)] = told.seq
                        yield told
                elif isinstance(item, QueuePositionView):
                    # The topic's updates are for every stream of the chat: show changes, and only while it waits.
                    if watching is not None and (item.position, item.waiting_count) != shown:
                        shown = (item.position, item.waiting_count)
                        yield item
                elif isinstance(item, EventView | Behind) and item.seq > seen and _about_conversation(item):
                    batch: list[EventView] = []
                    upto = item.seq if isinstance(item, Behind) else item.seq - 1
                    if seen < upto:  # a gap: read what was missed (a customer's reads skip private events)
                        batch = await self._read(_events_between, conversation_id, seen, upto, customer)
                        seen = upto
                    if isinstance(item, EventView):
                        batch.append(item)
                    for ev in batch:
                        seen = max(seen, ev.seq)
                        if customer and not ev.public:
                            continue
                        if watching_invite and _invite_over(ev, watching_invite):
                            raise denied(
                                "NOT_A_PARTICIPANT", "The invite that let you see this conversation has ended."
                            )
                        if watching is not None and ev.kind in ("participant_joined", "chat_ended", "chat_closed"):
                            self._positions.unwatch(watching, conversation_id)  # out of the queue now
                            watching = None
                        sent = ev.seq
                        yield ev
                        if _final(ev, who):
                            return
        finally:
            sub.close()
            if watching is not None:
                self._positions.unwatch(watching, conversation_id)

    async def monitor(
        self, who: AgentPrincipal, conversation_id: str, after_seq: int
    ) -> AsyncIterator[EventView | Heartbeat | TypingView | ReadCursorView]:
        """A supervisor watching: every event (private included) after the cursor, then live, until the
        conversation closes or the session ends. Its start and stop are events of the log (supervision.py)."""
        sub = self._bus.subscribe([conv_topic(conversation_id), feed_topic(who.session_id)])
        # Named here, so that a stream cancelled while its start is being written still stops it.
        monitor_id = uuid.uuid4().hex
        started = False
        try:
            # After subscribing: the start's own event, and everything after it, reaches this stream.
            started = True
            await self._write(supervision.start_monitor, who, conversation_id, monitor_id, self.node_id)
            seen = max(0, after_seq)
            while True:
                page = await self._read(events_after, conversation_id, seen, False, _PAGE)
                for ev in page:
                    seen = ev.seq
                    yield ev
                    if ev.kind == "chat_closed":
                        return
                if len(page) < _PAGE:
                    break
            page = ev = None  # type: ignore[assignment]  # keep no backlog alive
            self.caught_up(conv_topic(conversation_id), seen)
            yield Heartbeat(seen)
            reads: dict[ParticipantKey, int] = {}
            for cursor in await self._read(_cursors, None, conversation_id):
                reads[_key(cursor)] = cursor.seq
                yield cursor
            while True:
                item = await sub.get(self._limits.heartbeat_interval)
                if item is None:
                    yield Heartbeat(seen)
                elif isinstance(item, SessionEnded):
                    raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
                elif isinstance(item, Draining):
                    raise _DRAINING
                elif isinstance(item, TypingView):
                    yield item
                elif isinstance(item, ReadSignal):
                    told = receipts.shown_to(item, None)
                    if told is not None and told.seq > reads.get(_key(told), 0):
                        reads[_key(told)] = told.seq
                        yield told
                elif isinstance(item, EventView | Behind) and item.seq > seen and _about_conversation(item):
                    upto = item.seq if isinstance(item, Behind) else item.seq - 1
                    batch = await self._read(_events_between, conversation_id, seen, upto, False) if seen < upto else []
                    if isinstance(item, EventView):
                        batch.append(item)
                    for ev in batch:  # a gap first (another node's events, late): read from the database
                        seen = max(seen, ev.seq)
                        yield ev
                        if ev.kind == "chat_closed":
                            return
                    seen = max(seen, upto)
        finally:
            sub.close()
            if started:  # a start that was refused left nothing to stop: then this changes nothing
                self._spawn(supervision.stop_monitor, monitor_id)


ParticipantKey = tuple[str, str]


def _key(cursor: ReadCursorView) -> ParticipantKey:
    return (cursor.participant.kind, cursor.participant.agent_id)


def _cursors(s: Session, who: Who | None, conversation_id: str) -> list[ReadCursorView]:
    """The read cursors a stream's viewer gets once caught up: everyone else's (a monitor: everyone's)."""
    conv = s.get(Conversation, conversation_id)
    if conv is None:
        return []
    if who is not None:
        readable_conversation(s, who, conversation_id)
    out = []
    for cursor in read_cursors(s, conv, for_agent=not isinstance(who, CustomerPrincipal)):
        p = cursor.participant
        if isinstance(who, CustomerPrincipal) and p.kind == "customer":
            continue
        if isinstance(who, AgentPrincipal) and p.kind == "agent" and p.agent_id == who.agent_id:
            continue
        out.append(cursor)
    return out


def _feed_after(s: Session, session_id: str, after_seq: int, upto: int | None = None) -> list[FeedEventView]:
    q = select(FeedEvent).where(FeedEvent.session_id == session_id, FeedEvent.seq > after_seq)
    if upto is not None:
        q = q.where(FeedEvent.seq <= upto)
    return [feed_view(r) for r in s.exec(q.order_by(col(FeedEvent.seq)).limit(_PAGE)).all()]


def _events_between(s: Session, conversation_id: str, after: int, upto: int, public_only: bool) -> list[EventView]:
    """The events after `after` up to `upto`: what a stream missed (all of it: a gap is short)."""
    out: list[EventView] = []
    while True:
        page = [e for e in events_after(s, conversation_id, after, public_only, _PAGE) if e.seq <= upto]
        out += page
        if len(page) < _PAGE:
            return out
        after = page[-1].seq


def _position(s: Session, conversation_id: str) -> QueuePositionView | None:
    conv = s.get(Conversation, conversation_id)
    return position_of(s, conv) if conv is not None and conv.status == "queued" else None


def _about_conversation(item: EventView | FeedEventView | Behind) -> bool:
    """A conversation's item (an agent's conversation stream hears its session's feed topic too)."""
    return isinstance(item, EventView) or (isinstance(item, Behind) and item.topic[0] == "conv")


def _invite_over(ev: EventView, invite_id: str) -> bool:
    """The invite an invitee is looking through ended without them joining."""
    invite: dict[str, Any] = ev.payload.get("invite", {}) if ev.kind == "invite_updated" else {}
    if invite.get("invite_id") != invite_id:
        return False
    return invite.get("state") not in ("INVITE_STATE_PENDING", "INVITE_STATE_ACCEPTED")


def _shows_typing(item: TypingView, who: Who) -> bool:
    """Others' typing only; a customer never learns of an agent composing a private message."""
    if isinstance(who, CustomerPrincipal):
        return item.participant.kind == "agent" and not item.private
    return item.participant.agent_id != who.agent_id


def _final(ev: EventView, who: Who) -> bool:
    """The last event this viewer gets on this stream."""
    if ev.kind == "chat_closed":
        return True
    if isinstance(who, CustomerPrincipal):
        return ev.kind == "chat_ended"
    if ev.kind == "participant_left":
        return bool(ev.payload["participant"].get("agent_id") == who.agent_id)
    return False
