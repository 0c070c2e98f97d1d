"""Queries shared by the write paths and the read calls."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar, cast

from sqlalchemy import bindparam, func
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Mapper, make_transient_to_detached
from sqlmodel import Session, SQLModel, col, select

from ..store.fast import Fast
from ..store.fast import connection as fast_connection
from ..store.models import (
    Agent,
    Conversation,
    CustomerVariable,
    Invite,
    Offer,
    Participant,
    ProfileQueue,
    Queue,
    ReadCursor,
)
from .log import ts
from .views import ConversationView, ParticipantView, RatingView, ReadCursorView, VariableView, WrapUpView

M = TypeVar("M", bound=SQLModel)


def get(s: Session, model: type[M], key: object) -> M | None:
    """`s.get(model, key)` for a one-column key, at a third of the cost: what the session holds, or one
    Fast read whose row becomes a persistent instance as the ORM's own loading makes one (a new
    instance, its attributes as read, marked loaded), without the ORM's query pipeline."""
    mapper: Mapper[M] = sa_inspect(model)
    ident = mapper.identity_key_from_primary_key((key,))
    if ident in s.identity_map:
        return cast(M | None, s.get(model, key))  # the session's own (expired, deleted...): its rules apply
    conn = connection(s)  # pending changes flushed, as Session.get autoflushes before it queries
    if ident in s.identity_map:  # it was one of them (added, not yet flushed)
        return cast(M | None, s.get(model, key))
    read, keys = _GETS.get(model) or _get_statement(model)
    row = read.run(conn, {"key": key}).first()
    if row is None:
        return None
    obj: M = mapper.class_manager.new_instance()
    obj.__dict__.update(zip(keys, row, strict=True))
    make_transient_to_detached(obj)
    s.add(obj)
    return obj


_GETS: dict[type, tuple[Fast, tuple[str, ...]]] = {}


def _get_statement(model: type) -> tuple[Fast, tuple[str, ...]]:
    mapper: Mapper[Any] = sa_inspect(model)
    [pk] = mapper.primary_key
    props = mapper.column_attrs
    made = _GETS[model] = (
        Fast(core_select(*(p.columns[0] for p in props)).where(pk == bindparam("key"))),
        tuple(p.key for p in props),
    )
    return made


def must_get(s: Session, model: type[M], key: object) -> M:
    """A row that must exist (a foreign key or an earlier check guarantees it). Missing, it is a server bug."""
    row = get(s, model, key)
    if row is None:
        raise LookupError(f"no {model.__name__} {key!r}")
    return row


def connection(s: Session) -> Connection:
    """The session's connection for Core reads, with pending ORM changes flushed first."""
    return fast_connection(s)


def agent_view(s: Session, agent_id: str) -> ParticipantView:
    """An agent as a participant (a Core read: no ORM object is needed for a name)."""
    name = _AGENT_NAME.run(connection(s), {"agent": agent_id}).scalar()
    return ParticipantView("agent", agent_id, name if name is not None else agent_id)


_AGENT_NAME = Fast(select(Agent.display_name).where(Agent.id == bindparam("agent")))


def variables(s: Session, conversation_id: str) -> tuple[VariableView, ...]:
    rows = _VARIABLES.run(connection(s), {"conversation_id": conversation_id})
    return tuple(VariableView(name, value, authenticated) for name, value, authenticated in rows)


_VARIABLES = Fast(
    select(CustomerVariable.name, CustomerVariable.value, CustomerVariable.authenticated)
    .where(CustomerVariable.conversation_id == bindparam("conversation_id"))
    .order_by(col(CustomerVariable.name))
)


def variables_json(vs: Iterable[VariableView]) -> list[dict[str, Any]]:
    return [{"name": v.name, "value": v.value, "authenticated": v.authenticated} for v in vs]


def queue_name(s: Session, queue_id: str) -> str | None:
    """A queue's display name (a Core read: an ORM get costs several times the query), None if no such queue."""
    return cast(str | None, QUEUE_NAME.run(connection(s), {"queue": queue_id}).scalar())


QUEUE_NAME = Fast(select(Queue.display_name).where(Queue.id == bindparam("queue")))


def queue_json(s: Session, queue_id: str) -> dict[str, str]:
    return {"queue_id": queue_id, "display_name": queue_name(s, queue_id) or queue_id}


def active_agents(s: Session, conversation_id: str) -> list[Agent]:
    return list(
        s.exec(
            select(Agent)
            .join(Participant, col(Participant.agent_id) == Agent.id)
            .where(Participant.conversation_id == conversation_id, col(Participant.left_at).is_(None))
            .order_by(col(Participant.joined_at))
        ).all()
    )


_ACTIVE_AGENT_NAMES = Fast(
    select(Agent.id, Agent.display_name)
    .join(Participant, col(Participant.agent_id) == Agent.id)
    .where(Participant.conversation_id == bindparam("c"), col(Participant.left_at).is_(None))
    .order_by(col(Participant.joined_at))
)


def is_participant(s: Session, conversation_id: str, agent_id: str) -> bool:
    return _IS_PARTICIPANT.run(connection(s), {"c": conversation_id, "a": agent_id}).first() is not None


_IS_PARTICIPANT = Fast(
    select(Participant.agent_id).where(
        Participant.conversation_id == bindparam("c"),
        Participant.agent_id == bindparam("a"),
        col(Participant.left_at).is_(None),
    )
)


def pending_invite(s: Session, conversation_id: str) -> Invite | None:
    # Most conversations have none: a Core look first, the ORM object only when there is one.
    invite_id = _PENDING_INVITE.run(connection(s), {"c": conversation_id}).scalar()
    return s.get(Invite, invite_id) if invite_id else None


_PENDING_INVITE = Fast(
    select(Invite.id).where(Invite.conversation_id == bindparam("c"), Invite.status == "pending").limit(1)
)


def has_pending_invite_for(s: Session, conversation_id: str, agent_id: str) -> bool:
    return (
        s.exec(
            select(Invite.id).where(
                Invite.conversation_id == conversation_id, Invite.invitee_id == agent_id, Invite.status == "pending"
            )
        ).first()
        is not None
    )


_INVITE_STATES = {
    "pending": "INVITE_STATE_PENDING",
    "accepted": "INVITE_STATE_ACCEPTED",
    "rejected": "INVITE_STATE_REJECTED",
    "timed_out": "INVITE_STATE_TIMED_OUT",
    "cancelled": "INVITE_STATE_CANCELLED",
    "withdrawn": "INVITE_STATE_WITHDRAWN",
}


def invite_json(s: Session, inv: Invite) -> dict[str, Any]:
    inviter = s.get(Agent, inv.inviter_id)
    invitee = s.get(Agent, inv.invitee_id)
    out: dict[str, Any] = {
        "invite_id": inv.id,
        "conversation_id": inv.conversation_id,
        "inviter": ParticipantView("agent", inv.inviter_id, inviter.display_name if inviter else "").to_json(),
        "invitee": ParticipantView("agent", inv.invitee_id, invitee.display_name if invitee else "").to_json(),
        "state": _INVITE_STATES[inv.status],
        "create_time": ts(inv.created_at),
        "expire_time": ts(inv.expires_at),
    }
    if inv.queue_id:
        out["queue_id"] = inv.queue_id
    return out


def reader_participant(s: Session, conv: Conversation, reader: str) -> ParticipantView:
    """A read cursor's owner ("customer" or "agent:<id>") as a participant."""
    if reader == "customer":
        return ParticipantView("customer", display_name=conv.customer_name or "Customer")
    agent_id = reader.removeprefix("agent:")
    agent = s.get(Agent, agent_id)
    return ParticipantView("agent", agent_id, agent.display_name if agent else agent_id)


def read_cursors(s: Session, conv: Conversation, *, for_agent: bool) -> tuple[ReadCursorView, ...]:
    """Everyone's cursor for agents; for the customer, the agents' clamped to public seqs (none while that is 0)."""
    out = []
    for reader, seq, at, public_seq, public_at in _READ_CURSORS.run(connection(s), {"c": conv.id}):
        if not for_agent:
            seq, at = public_seq, public_at
        if seq > 0:
            out.append(ReadCursorView(reader_participant(s, conv, reader), seq, at))
    return tuple(out)


_READ_CURSORS = Fast(
    core_select(
        col(ReadCursor.reader),
        col(ReadCursor.seq),
        col(ReadCursor.read_at),
        col(ReadCursor.public_seq),
        col(ReadCursor.public_read_at),
    )
    .where(col(ReadCursor.conversation_id) == bindparam("c"))
    .order_by(col(ReadCursor.reader))
)


def wrap_up_view(s: Session, conv: Conversation) -> WrapUpView | None:
    if conv.wrap_up_at is None:
        return None
    agent_id = conv.wrap_up_agent_id or ""
    agent = s.get(Agent, agent_id) if agent_id else None
    return WrapUpView(
        conv.wrap_up_code_id or "",
        conv.wrap_up_code_name or "",
        conv.wrap_up_note or "",
        ParticipantView("agent", agent_id, agent.display_name if agent else agent_id),
        conv.wrap_up_at,
    )


def rating_view(conv: Conversation) -> RatingView | None:
    if conv.rating_score is None or conv.rated_at is None:
        return None
    return RatingView(conv.rating_score, conv.rating_comment or "", conv.rated_at)


def conversation_view(s: Session, conv: Conversation, *, for_agent: bool = True) -> ConversationView:
    # Invites are made in active conversations only, and a close settles them: no read for the others.
    inv = pending_invite(s, conv.id) if for_agent and conv.status == "active" else None
    return ConversationView(
        id=conv.id,
        queue_id=conv.queue_id,
        queue_name=queue_name(s, conv.queue_id) or conv.queue_id,
        status=conv.status,
        customer_connected=conv.customer_connected,
        variables=variables(s, conv.id),
        agents=tuple(
            ParticipantView("agent", agent_id, name)
            for agent_id, name in _ACTIVE_AGENT_NAMES.run(connection(s), {"c": conv.id})
        ),
        last_seq=conv.last_seq if for_agent else last_public_seq(s, conv.id),
        created_at=conv.created_at,
        closed_at=conv.closed_at,
        pending_invite=invite_json(s, inv) if inv else None,
        read_cursors=read_cursors(s, conv, for_agent=for_agent),
        wrap_up=wrap_up_view(s, conv) if for_agent else None,
        rating=rating_view(conv),
        ended_at=conv.ended_at,
    )


def last_public_seq(s: Session, conversation_id: str) -> int:
    """What a customer may know of the log's length: private events do not count."""
    from ..store.models import Event

    seq = s.exec(
        select(func.max(Event.seq)).where(Event.conversation_id == conversation_id, Event.visibility == "all")
    ).one()
    return seq or 0


# Up to this many agents, their open conversations are found from their own participant rows (every chat
# they ever had, closed ones too: a close leaves left_at empty); past it, from the open conversations.
_FEW_AGENTS = 8


def agent_loads(s: Session, agent_ids: Iterable[str] | None = None) -> dict[str, int]:
    """Open conversations plus pending offers, per agent: what counts against max_chats.

    An agent is a participant only of active or closed conversations (accept, invite and barge-in all need
    the chat answered), so "open" is status active. For many agents (routing asks for every live one) the
    query starts from the active conversations, so it reads the seats in use, not the agents' history, and
    neither query carries the agents' ids (pending offers are read by status and filtered here)."""
    ids = list(agent_ids) if agent_ids is not None else None
    few = ids is not None and len(ids) <= _FEW_AGENTS
    c = connection(s)
    if few:
        params = {"ids": ids}
        rows = list(c.execute(_OWN_LOADS_OF, params)) + list(c.execute(_PENDING_LOADS_OF, params))
    else:
        rows = list(_ACTIVE_LOADS.run(c, {})) + list(_PENDING_LOADS.run(c, {}))
    loads: dict[str, int] = {agent_id: 0 for agent_id in ids or ()}
    for agent_id, n in rows:
        if ids is None or agent_id in loads:
            loads[agent_id] = loads.get(agent_id, 0) + n
    return loads


_OWN_LOADS = (
    select(Participant.agent_id, func.count())
    .join(Conversation, col(Conversation.id) == Participant.conversation_id)
    .where(col(Participant.left_at).is_(None), Conversation.status != "closed")
    .group_by(Participant.agent_id)
)
_PENDING_LOADS = Fast(select(Offer.agent_id, func.count()).where(Offer.status == "pending").group_by(Offer.agent_id))
_OWN_LOADS_OF = _OWN_LOADS.where(col(Participant.agent_id).in_(bindparam("ids", expanding=True)))
_PENDING_LOADS_OF = _PENDING_LOADS.stmt.where(col(Offer.agent_id).in_(bindparam("ids", expanding=True)))
_ACTIVE_LOADS = Fast(
    select(Participant.agent_id, func.count())
    .select_from(Conversation)
    .join(Participant, col(Participant.conversation_id) == Conversation.id)
    .where(Conversation.status == "active", col(Participant.left_at).is_(None))
    .group_by(Participant.agent_id)
)


_PROFILE_QUEUES = Fast(select(ProfileQueue.profile_id, ProfileQueue.queue_id))


def profile_queues(s: Session) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for profile_id, queue_id in _PROFILE_QUEUES.run(connection(s), {}):
        out.setdefault(profile_id, set()).add(queue_id)
    return out
