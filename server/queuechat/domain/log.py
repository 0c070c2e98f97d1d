"""Appending to a conversation's log and to an agent session's offer feed.

seq is assigned inside the committing transaction by an atomic
UPDATE ... RETURNING on the owning row, which also locks that row until
commit, so two writers (even two processes on PostgreSQL) never take the
same seq. The event is published to the bus only after commit.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, update
from sqlalchemy.orm import Mapped
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col

from ..store.fast import Fast
from ..store.models import Agent, AgentSession, Conversation, Event, FeedEvent, table
from .tx import Tx
from .tx import utcnow as utcnow  # re-exported: the clock writes share
from .views import EventView, FeedEventView, ParticipantView


def ts(dt: datetime | None) -> str | None:
    """RFC 3339 for proto JSON Timestamps."""
    if dt is None:
        return None
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def conv_topic(conversation_id: str) -> tuple[str, str]:
    return ("conv", conversation_id)


def feed_topic(session_id: str) -> tuple[str, str]:
    return ("feed", session_id)


def customer_participant(conv: Conversation) -> ParticipantView:
    return customer_named(conv.customer_name)


def customer_named(name: str | None) -> ParticipantView:
    return ParticipantView("customer", display_name=name or "Customer")


def agent_participant(agent: Agent) -> ParticipantView:
    return ParticipantView("agent", agent.id, agent.display_name)


def append_event(
    tx: Tx, conv: Conversation, kind: str, payload: dict[str, Any], *, also: dict[str, Any] | None = None,
    **options: Any,
) -> EventView:  # fmt: skip
    """Take the conversation's next seq and store the event under it (options as for insert_event).
    `also`: columns of the conversation to set in the same statement (a close's status, say)."""
    if also and conv in tx.session.dirty:
        tx.session.flush()  # an earlier ORM change goes first, so these are not overwritten by it
    seq = next_seq(tx, Conversation, conv.id, "last_seq", also)
    set_committed_value(conv, "last_seq", seq)  # the row is already up to date
    for name, value in (also or {}).items():
        set_committed_value(conv, name, value)
    return insert_event(tx, conv.id, seq, kind, payload, **options)


def insert_event(
    tx: Tx,
    conversation_id: str,
    seq: int,
    kind: str,
    payload: dict[str, Any],
    *,
    actor: str,
    visibility: str = "all",
    request_id: str | None = None,
    now: datetime | None = None,
) -> EventView:
    """Store an event under a seq taken with next_seq in this transaction; publish it after commit."""
    view = _store(tx, _INSERT_EVENT, conversation_id, seq, kind, payload, actor, visibility, request_id, now)
    if view is None:  # not reached: a plain insert stores or raises
        raise LookupError(f"event {conversation_id}/{seq} not stored")
    return view


_INSERT_EVENT = Fast(insert(Event))


def insert_event_once(
    tx: Tx,
    conversation_id: str,
    seq: int,
    kind: str,
    payload: dict[str, Any],
    *,
    actor: str,
    visibility: str,
    request_id: str,
) -> EventView | None:
    """insert_event for a request with an id: None (and nothing stored) if this actor's request_id is in
    the conversation's log already, so a retry costs no statement of its own on the common path."""
    dialect = tx.conn.dialect.name
    stmt = _INSERT_ONCE.get(dialect)
    if stmt is None:
        from sqlalchemy.dialects import postgresql, sqlite

        dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = Fast(
            dialect_insert(Event)
            .on_conflict_do_nothing(index_elements=["conversation_id", "actor", "request_id"])
            .returning(col(Event.seq))
        )
        _INSERT_ONCE[dialect] = stmt
    return _store(tx, stmt, conversation_id, seq, kind, payload, actor, visibility, request_id, None)


def _store(
    tx: Tx,
    stmt: Any,
    conversation_id: str,
    seq: int,
    kind: str,
    payload: dict[str, Any],
    actor: str,
    visibility: str,
    request_id: str | None,
    now: datetime | None,
) -> EventView | None:
    """Run an event insert; None if it stored nothing (an insert-once that met its request id)."""
    now = now or tx.now
    if tx.check_event is not None:
        tx.check_event("event", kind, payload)
    result = stmt.run(
        tx.conn,
        {
            "conversation_id": conversation_id,
            "seq": seq,
            "kind": kind,
            "visibility": visibility,
            "created_at": now,
            "actor": actor,
            "request_id": request_id or None,
            "payload": json.dumps(payload, separators=(",", ":")),
        },
    )
    if stmt is not _INSERT_EVENT and result.first() is None:
        return None
    view = EventView(conversation_id, seq, kind, visibility, now, payload)
    tx.publish(conv_topic(conversation_id), view)
    return view


_INSERT_ONCE: dict[str, Any] = {}


def next_seq(
    tx: Tx,
    model: type[Conversation] | type[AgentSession],
    row_id: str,
    column: str,
    also: dict[str, Any] | None = None,
) -> int:
    """Atomically take the next seq of a row, setting the `also` columns with it; the row stays locked
    until commit."""
    names = tuple(sorted(also)) if also else ()
    stmt = _NEXT_SEQ.get((model, column, names))
    if stmt is None:  # built once per shape: building a statement costs more than running it
        counter: Mapped[int] = getattr(model, column)
        values: dict[str, Any] = {column: counter + 1}
        values.update({name: bindparam(f"set_{name}") for name in names})
        stmt = Fast(update(model).where(col(model.id) == bindparam("row_id")).values(values).returning(counter))
        _NEXT_SEQ[(model, column, names)] = stmt
    params = {"row_id": row_id}
    if also:
        params.update({f"set_{name}": value for name, value in also.items()})
    seq: int = stmt.run(tx.conn, params).scalar_one()
    return seq


_NEXT_SEQ: dict[tuple[type, str, tuple[str, ...]], Any] = {}


def event_view(row: Any) -> EventView:
    return EventView(row.conversation_id, row.seq, row.kind, row.visibility, row.created_at, json.loads(row.payload))


def find_request(tx: Tx, conversation_id: str, actor: str, request_id: str | None) -> EventView | None:
    """The event a previous try of this request stored, if any."""
    if not request_id:
        return None
    row = tx.conn.execute(
        table(Event)
        .select()
        .where(
            col(Event.conversation_id) == conversation_id,
            col(Event.actor) == actor,
            col(Event.request_id) == request_id,
        )
    ).first()
    return event_view(row) if row else None


def append_feed(
    tx: Tx,
    session_id: str,
    kind: str,
    payload: dict[str, Any],
    now: datetime | None = None,
    also: dict[str, Any] | None = None,
) -> FeedEventView:
    """Store an entry of the session's feed under its next seq (setting the session's `also` columns in the
    same statement); publish it after commit."""
    now = now or tx.now
    if tx.check_event is not None:
        tx.check_event("offer", kind, payload)
    seq = next_seq(tx, AgentSession, session_id, "feed_seq", also)
    _INSERT_FEED.run(
        tx.conn,
        {"session_id": session_id, "seq": seq, "kind": kind, "created_at": now,
         "payload": json.dumps(payload, separators=(",", ":"))},
    )  # fmt: skip
    return feed_stored(tx, session_id, seq, kind, payload, now)


def json_around(payload: dict[str, Any], key: str, placeholder: Any) -> tuple[str, str]:
    """The payload's JSON text before and after the value of `key` (which holds `placeholder`), for a
    statement that splices in a value the database has. A JSON string holds no bare quote, so `"key":`
    followed by the placeholder matches only the key itself, the first such key in the text: keep `key`
    ahead of any other object that has one."""
    text = json.dumps(payload, separators=(",", ":"))
    mark = f'"{key}":'
    head, found, tail = text.partition(mark + json.dumps(placeholder, separators=(",", ":")))
    if not found:
        raise LookupError(f"{key!r} holding {placeholder!r} is not in the payload")
    return head + mark, tail


def feed_stored(tx: Tx, session_id: str, seq: int, kind: str, payload: dict[str, Any], now: datetime) -> FeedEventView:
    """A feed entry this transaction stored under seq (append_feed, or a statement of its own that did the
    same): published after commit."""
    view = FeedEventView(session_id, seq, kind, now, payload)
    tx.publish(feed_topic(session_id), view)
    return view


_INSERT_FEED = Fast(insert(FeedEvent))


def feed_view(row: FeedEvent) -> FeedEventView:
    return FeedEventView(row.session_id, row.seq, row.kind, row.created_at, json.loads(row.payload))
