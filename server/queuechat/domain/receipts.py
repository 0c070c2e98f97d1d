"""Read receipts: each participant's read cursor, stored and monotonic, announced to the others.

A cursor is a row per (conversation, reader), reader "customer" or "agent:<id>". It is not an event
of the log: marking read takes no seq, so a cursor never makes anything unread for the other side
(reads of reads would never settle). The others learn of it by an ephemeral ReadSignal on the
conversation's topic, published after commit, and from the cursors in every conversation view and
at the start of every stream.

The customer must learn nothing of private events through it. So each row also keeps `public_seq`,
the cursor clamped to the highest public event at or below it, with the time that last moved; the
customer is shown only that, and is signalled only when it moves. The customer's own cursor is
clamped the same way, and it may not name a seq above the last public one (it cannot know of any).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func
from sqlmodel import Session, col, select

from ..errors import denied, invalid, not_found
from ..store.models import Conversation, Event, ReadCursor
from .access import require_member
from .log import conv_topic
from .read import last_public_seq, reader_participant
from .tx import Tx
from .views import AgentPrincipal, CustomerPrincipal, ReadCursorView, ReadSignal

Reader = AgentPrincipal | CustomerPrincipal


def public_at_or_below(s: Session, conversation_id: str, seq: int) -> int:
    """The highest public seq <= seq (0 if none)."""
    found = s.exec(
        select(func.max(Event.seq)).where(
            Event.conversation_id == conversation_id, Event.visibility == "all", col(Event.seq) <= seq
        )
    ).one()
    return found or 0


def mark_read(tx: Tx, who: Reader, conversation_id: str, up_to_seq: int) -> ReadCursorView:
    """Move the caller's cursor to up_to_seq (a lower value changes nothing) and tell the others."""
    s = tx.session
    if up_to_seq < 0:
        raise invalid("BAD_SEQ", "up_to_seq must not be negative.")
    if isinstance(who, CustomerPrincipal):
        conv = s.get(Conversation, conversation_id) if conversation_id else None
        if conv is None or who.conversation_id != conversation_id:
            raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
        reader, latest = "customer", last_public_seq(s, conversation_id)
    else:
        conv = require_member(tx, who, conversation_id)
        reader, latest = f"agent:{who.agent_id}", conv.last_seq
    if conv is None:  # not reached: both branches raise first
        raise not_found("CONVERSATION_NOT_FOUND", "No such conversation.")
    if up_to_seq > latest:
        raise invalid(
            "SEQ_OUT_OF_RANGE",
            f"up_to_seq {up_to_seq} is past the conversation's last seq ({latest}).",
            last_seq=latest,
        )
    participant = reader_participant(s, conv, reader)
    public = public_at_or_below(s, conversation_id, up_to_seq)
    seq = public if reader == "customer" else up_to_seq
    row = s.get(ReadCursor, (conversation_id, reader))
    if row is not None and seq <= row.seq:
        return ReadCursorView(participant, row.seq, row.read_at)  # no-op: cursors only move forward
    now = tx.now
    if row is None:
        if seq == 0:
            return ReadCursorView(participant, 0, now)
        row = ReadCursor(
            conversation_id=conversation_id, reader=reader, seq=0, read_at=now, public_seq=0, public_read_at=now
        )
    moved = public > row.public_seq
    row.seq, row.read_at = seq, now
    if moved:
        row.public_seq, row.public_read_at = public, now
    s.add(row)
    tx.publish(
        conv_topic(conversation_id),
        ReadSignal(conversation_id, participant, seq, now, row.public_seq, row.public_read_at, moved),
    )
    return ReadCursorView(participant, seq, now)


def shown_to(item: ReadSignal, who: Reader | None) -> ReadCursorView | None:
    """What a stream's viewer is told of a signal: never their own; the customer only agents' public
    progress; a supervisor's monitor (who None) everything."""
    if isinstance(who, CustomerPrincipal):
        if item.participant.kind != "agent" or not item.public_moved:
            return None
        return ReadCursorView(item.participant, item.public_seq, item.public_read_at)
    if who is not None and item.participant.kind == "agent" and item.participant.agent_id == who.agent_id:
        return None
    return ReadCursorView(item.participant, item.seq, item.read_at)


def standing(s: Session, conversation_ids: list[str], since: datetime) -> list[ReadSignal]:
    """The cursors of these conversations that moved since `since`, as signals: a cluster's reconciler sends
    them again, so a signal NATS lost is made good (streams pass on only cursors that moved forward)."""
    out: list[ReadSignal] = []
    rows: list[ReadCursor] = []
    for i in range(0, len(conversation_ids), 500):
        rows += s.exec(
            select(ReadCursor).where(
                col(ReadCursor.conversation_id).in_(conversation_ids[i : i + 500]), col(ReadCursor.read_at) >= since
            )
        ).all()
    if not rows:
        return out
    ids = list({r.conversation_id for r in rows})
    convs = {c.id: c for c in s.exec(select(Conversation).where(col(Conversation.id).in_(ids))).all()}
    for r in rows:
        who = reader_participant(s, convs[r.conversation_id], r.reader)
        out.append(ReadSignal(r.conversation_id, who, r.seq, r.read_at, r.public_seq, r.public_read_at, True))
    return out
