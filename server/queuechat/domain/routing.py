"""Routing: who is offered which chat, and what happens when they answer.

- The oldest waiting chat of a queue goes first; it keeps its place when
  rejected (enqueued_at never changes).
- Among ready agents with an open offer stream, free capacity and a profile
  containing the queue, the one whose last offer is oldest (idle longest) wins.
- An agent who rejected a chat (or let it time out) is not offered it again
  during the cool-down while another eligible agent exists.
- Pending offers count against capacity, so accepting can never exceed it;
  the database allows one pending chat offer per conversation.

Everything here runs inside a write transaction on the single writer, so
two dispatches never interleave. Invite offers share the offer life cycle;
what an answered invite means for the conversation is in invites.py.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, update
from sqlalchemy import select as core_select
from sqlmodel import col, select

from ..errors import not_found, precondition
from ..store.models import Agent, AgentSession, Conversation, Offer, Participant
from . import invites
from .log import agent_participant, append_event, append_feed, ts
from .read import (
    agent_loads,
    conversation_view,
    is_participant,
    must_get,
    profile_queues,
    queue_json,
    variables,
    variables_json,
)
from .tx import Tx
from .views import AgentPrincipal, ConversationView

_OFFER_STATES = {
    "pending": "OFFER_STATE_PENDING",
    "accepted": "OFFER_STATE_ACCEPTED",
    "rejected": "OFFER_STATE_REJECTED",
    "timed_out": "OFFER_STATE_TIMED_OUT",
    "withdrawn": "OFFER_STATE_WITHDRAWN",
}
_WITHDRAW_REASONS = {
    "customer_left": "WITHDRAW_REASON_CUSTOMER_LEFT",
    "taken_elsewhere": "WITHDRAW_REASON_TAKEN_ELSEWHERE",
    "cancelled": "WITHDRAW_REASON_CANCELLED",
    "agent_unavailable": "WITHDRAW_REASON_AGENT_UNAVAILABLE",
}


def dispatch(tx: Tx, now: datetime | None = None) -> int:
    """Offer waiting chats to free agents until either runs out. Returns offers made.

    Runs after every change that may free capacity or add work, so it must stay cheap with
    a long queue: plain rows, waiting chats read a page at a time, and a stop as soon as no
    queue that has waiting chats has a free agent left."""
    c = tx.conn
    now = now or tx.now
    # Plain lists, not dicts: one per live agent per dispatch (see _LIVE_AGENTS for the fields).
    live: list[list[Any]] = [list(r) for r in c.execute(_LIVE_AGENTS)]
    if not live:
        return 0
    loads = agent_loads(tx.session, [a[_AGENT] for a in live])
    pq = profile_queues(tx.session)
    free = [a for a in live if loads.get(a[_AGENT], 0) < a[_MAX]]
    served = set().union(*(pq.get(a[_PROFILE], set()) for a in free))
    if not served:
        return 0
    cooling: set[tuple[str, str]] | None = None  # read once a chat is found to offer
    made = 0
    after: tuple[datetime, str] | tuple[()] = ()
    while served:
        page = c.execute(_waiting_page(served, after)).all()
        shrunk = False
        for conv_id, queue_id, enqueued_at in page:
            candidates = [a for a in free if queue_id in pq.get(a[_PROFILE], ()) and loads[a[_AGENT]] < a[_MAX]]
            if not candidates:
                # Nobody left for this queue in this round: read again without it, from this chat on, so a
                # long queue nobody can take is not paged through to reach the next queue's chats.
                served.discard(queue_id)
                shrunk = True
                break
            after = (enqueued_at, conv_id)
            if cooling is None:
                cooling = _cooling(tx, free, now)
            preferred = [a for a in candidates if (conv_id, a[_AGENT]) not in cooling] or candidates
            pick = min(preferred, key=lambda a: (a[_LAST_OFFER], a[_CREATED]))
            make_offer(tx, must_get(tx.session, Conversation, conv_id), pick[_SESSION], pick[_AGENT], now)
            pick[_LAST_OFFER] = now
            loads[pick[_AGENT]] = loads.get(pick[_AGENT], 0) + 1
            made += 1
        if not shrunk and len(page) < _PAGE:
            break
    return made


def _cooling(tx: Tx, free: list[list[Any]], now: datetime) -> set[tuple[str, str]]:
    """(chat, agent) pairs in their cool-down: the agent rejected the chat (or let it time out) lately."""
    cutoff = now - timedelta(seconds=tx.settings.reject_cooldown)
    return {
        (r[0], r[1])
        for r in tx.conn.execute(
            select(Offer.conversation_id, Offer.agent_id).where(
                Offer.kind == "chat",
                col(Offer.status).in_(("rejected", "timed_out")),
                col(Offer.resolved_at) > cutoff,
                col(Offer.agent_id).in_([a[_AGENT] for a in free]),
            )
        )
    }


_PAGE = 200
# The fields of a _LIVE_AGENTS row, by position.
_SESSION, _AGENT, _PROFILE, _LAST_OFFER, _CREATED, _MAX = range(6)
# Six columns: more than sqlmodel's select is typed for, so SQLAlchemy's (the same statement).
_LIVE_AGENTS = (
    core_select(
        col(AgentSession.id),
        col(AgentSession.agent_id),
        col(AgentSession.profile_id),
        col(AgentSession.last_offer_at),
        col(AgentSession.created_at),
        col(Agent.max_chats),
    )
    .join(Agent, col(Agent.id) == AgentSession.agent_id)
    .where(
        col(AgentSession.ended_at).is_(None),
        col(AgentSession.ready) == True,  # noqa: E712
        col(AgentSession.stream_count) > 0,
    )
)


def _waiting_page(queues: set[str], after: tuple[datetime, str] | tuple[()]) -> Select[str, str, datetime]:
    """The next waiting chats not on offer, oldest first, after the keyset `after`."""
    offered = select(Offer.conversation_id).where(Offer.kind == "chat", Offer.status == "pending")
    q = select(Conversation.id, Conversation.queue_id, Conversation.enqueued_at).where(
        Conversation.status == "queued", col(Conversation.queue_id).in_(queues), col(Conversation.id).not_in(offered)
    )
    if after:
        enqueued_at, conv_id = after
        q = q.where(
            (col(Conversation.enqueued_at) > enqueued_at)
            | ((col(Conversation.enqueued_at) == enqueued_at) & (col(Conversation.id) > conv_id))
        )
    return q.order_by(col(Conversation.enqueued_at), col(Conversation.id)).limit(_PAGE)


def make_offer(
    tx: Tx,
    conv: Conversation,
    session_id: str,
    agent_id: str,
    now: datetime,
    invite_payload: dict[str, Any] | None = None,
) -> Offer:
    s = tx.session
    offer = Offer(
        id=uuid.uuid4().hex,
        session_id=session_id,
        agent_id=agent_id,
        conversation_id=conv.id,
        kind="invite" if invite_payload else "chat",
        invite_id=invite_payload["invite_id"] if invite_payload else None,
        status="pending",
        created_at=now,
        expires_at=now + timedelta(seconds=tx.settings.offer_timeout),
    )
    s.add(offer)
    tx.conn.execute(update(AgentSession).where(col(AgentSession.id) == session_id).values(last_offer_at=now))
    payload = {
        "offer_id": offer.id,
        "kind": "OFFER_KIND_INVITE" if invite_payload else "OFFER_KIND_CHAT",
        "conversation_id": conv.id,
        "queue": queue_json(s, conv.queue_id),
        "variables": variables_json(variables(s, conv.id)),
        "enqueue_time": ts(conv.enqueued_at),
        "waiting_time": f"{(now - conv.enqueued_at).total_seconds():.6f}s",
        "create_time": ts(now),
        "expire_time": ts(offer.expires_at),
    }
    if invite_payload:
        payload["invite"] = invite_payload
    append_feed(tx, session_id, "offer", payload, now)
    tx.schedule(offer.expires_at, expire_offer, offer.id)
    tx.count("offers_made", kind=offer.kind)
    tx.log("offer.made", offer_id=offer.id, kind=offer.kind, conversation_id=conv.id, agent_id=agent_id)
    return offer


def close_offer(tx: Tx, offer: Offer, state: str, now: datetime, reason: str | None = None) -> None:
    """Record the outcome on the offer and on its session's feed."""
    offer.status = state
    offer.resolved_at = now
    offer.withdraw_reason = reason
    tx.session.add(offer)
    update = {"offer_id": offer.id, "state": _OFFER_STATES[state]}
    if reason:
        update["withdraw_reason"] = _WITHDRAW_REASONS[reason]
    append_feed(tx, offer.session_id, "offer_update", update, now)
    tx.count("offers", outcome=state, kind=offer.kind)
    tx.observe("offer_answer_seconds", (now - offer.created_at).total_seconds(), outcome=state)
    ids = {"offer_id": offer.id, "conversation_id": offer.conversation_id, "agent_id": offer.agent_id}
    tx.log(f"offer.{state}", **ids, reason=reason)


def _own_pending_offer(tx: Tx, who: AgentPrincipal, offer_id: str, answer: str) -> Offer | None:
    """The caller's offer if still pending; None if already answered the same way (a retry)."""
    offer = tx.session.get(Offer, offer_id) if offer_id else None
    if offer is None or offer.agent_id != who.agent_id:
        raise not_found("OFFER_NOT_FOUND", f"No offer {offer_id!r} was made to you.", offer_id=offer_id)
    if offer.status == answer and offer.session_id == who.session_id:
        return None
    if offer.status != "pending" or offer.session_id != who.session_id:
        raise precondition(
            "OFFER_NO_LONGER_VALID",
            f"The offer is no longer valid (it is {offer.status.replace('_', ' ')}).",
            offer_id=offer_id,
            state=offer.status,
        )
    if tx.now >= offer.expires_at:
        raise precondition("OFFER_NO_LONGER_VALID", "The offer has timed out.", offer_id=offer_id, state="timed_out")
    return offer


def accept_offer(tx: Tx, who: AgentPrincipal, offer_id: str) -> ConversationView:
    s = tx.session
    now = tx.now
    offer = _own_pending_offer(tx, who, offer_id, "accepted")
    if offer is None:  # accepted already: answer the retry the same way, if still in it
        conv = must_get(s, Conversation, must_get(s, Offer, offer_id).conversation_id)
        if not is_participant(s, conv.id, who.agent_id):
            raise precondition("OFFER_NO_LONGER_VALID", "You accepted this offer and have left the conversation since.")
        return conversation_view(s, conv)
    conv = must_get(s, Conversation, offer.conversation_id)
    agent = must_get(s, Agent, who.agent_id)
    close_offer(tx, offer, "accepted", now)
    if offer.kind == "invite":
        invites.on_accepted(tx, offer, conv, agent, now)
    else:
        conv.status = "active"
        s.add(conv)
        s.add(Participant(conversation_id=conv.id, agent_id=agent.id, joined_at=now))
        append_event(
            tx,
            conv,
            "participant_joined",
            {"participant": agent_participant(agent).to_json()},
            actor=f"agent:{agent.id}",
            now=now,
        )
        tx.queue_changed(conv.queue_id)
        tx.observe("chat_wait_seconds", (now - conv.enqueued_at).total_seconds(), queue=conv.queue_id)
    s.flush()
    return conversation_view(s, conv)


def reject_offer(tx: Tx, who: AgentPrincipal, offer_id: str) -> None:
    offer = _own_pending_offer(tx, who, offer_id, "rejected")
    if offer is not None:
        _give_back(tx, offer, "rejected", tx.now)


def expire_offer(tx: Tx, offer_id: str) -> None:
    """Timer: an unanswered offer counts as a reject."""
    offer = tx.session.get(Offer, offer_id)
    if offer is not None and offer.status == "pending":
        _give_back(tx, offer, "timed_out", tx.now)


def expire_due(tx: Tx, limit: int = 500) -> int:
    """The sweep's part (agents.sweep): offers past their time-out, whichever node armed the timer."""
    due = tx.session.exec(
        select(Offer)
        .where(col(Offer.status) == "pending", col(Offer.expires_at) <= tx.now)
        .with_for_update(skip_locked=True)
        .limit(limit)
    ).all()
    for offer in due:
        _give_back(tx, offer, "timed_out", tx.now)
    return len(due)


def withdraw_session_offers(tx: Tx, session_id: str, now: datetime) -> None:
    """The session went away: its pending offers go back (chats to the queue, invites to the inviter)."""
    for offer in tx.session.exec(select(Offer).where(Offer.session_id == session_id, Offer.status == "pending")).all():
        _give_back(tx, offer, "withdrawn", now, reason="agent_unavailable")


def withdraw_conversation_offers(tx: Tx, conversation_id: str, reason: str, now: datetime) -> None:
    """The conversation ended or was taken: nobody may still accept an offer for it."""
    for offer in tx.session.exec(
        select(Offer).where(Offer.conversation_id == conversation_id, Offer.status == "pending")
    ).all():
        close_offer(tx, offer, "withdrawn", now, reason)
        if offer.kind == "invite":
            invites.on_offer_closed(tx, offer, "withdrawn", now)


def _give_back(tx: Tx, offer: Offer, state: str, now: datetime, reason: str | None = None) -> None:
    """Reject, time-out or withdrawal: a chat keeps its place in the queue and goes to the next agent."""
    close_offer(tx, offer, state, now, reason)
    if offer.kind == "invite":
        invites.on_offer_closed(tx, offer, state, now)
    tx.needs_dispatch()
