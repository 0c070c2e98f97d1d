"""Invites: bring another agent into a conversation.

One pending invite per conversation (the database enforces it). The invitee
gets it as an offer on their offer stream and answers like a chat offer; the
inviter sees every change as an agents-only invite_updated event, and may
cancel while it is pending. After the invitee joins, the inviter may stay or
leave (LeaveConversation).
"""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import col, select

from ..errors import denied, invalid, not_found, precondition
from ..store.models import Agent, AgentSession, Conversation, Invite, Offer, Participant, ProfileQueue, Queue
from . import routing
from .access import require_member
from .log import agent_participant, append_event
from .read import active_agents, agent_loads, invite_json, is_participant, must_get, pending_invite
from .tx import Tx
from .views import AgentPrincipal


def _live_sessions(tx: Tx, agent_ids: list[str] | None = None) -> list[tuple[AgentSession, Agent]]:
    q = (
        select(AgentSession, Agent)
        .join(Agent, col(Agent.id) == AgentSession.agent_id)
        .where(col(AgentSession.ended_at).is_(None), AgentSession.ready == True, AgentSession.stream_count > 0)  # noqa: E712
    )
    if agent_ids is not None:
        q = q.where(col(AgentSession.agent_id).in_(agent_ids))
    return list(tx.session.exec(q).all())


def invite_agent(
    tx: Tx,
    who: AgentPrincipal,
    conversation_id: str,
    request_id: str,
    agent_id: str,
    queue_id: str,
) -> dict[str, Any]:
    s = tx.session
    now = tx.now
    conv = require_member(tx, who, conversation_id)
    if request_id:
        prior = s.exec(
            select(Invite).where(
                Invite.conversation_id == conversation_id,
                Invite.inviter_id == who.agent_id,
                Invite.request_id == request_id,
            )
        ).first()
        if prior:
            return invite_json(s, prior)
    if conv.status != "active":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conversation_id)
    if bool(agent_id) == bool(queue_id):
        raise invalid("INVITE_TARGET_REQUIRED", "Invite either an agent (agent_id) or a queue (queue_id).")
    if pending_invite(s, conversation_id):
        raise precondition(
            "INVITE_ALREADY_PENDING",
            "An invite is already waiting for an answer; cancel it or wait for the outcome.",
            conversation_id=conversation_id,
        )
    members = {a.id for a in active_agents(s, conversation_id)}

    if agent_id:
        if s.get(Agent, agent_id) is None:
            raise not_found("AGENT_NOT_FOUND", f"There is no agent {agent_id!r}.", agent_id=agent_id)
        if agent_id == who.agent_id or agent_id in members:
            raise precondition(
                "ALREADY_IN_CONVERSATION", f"{agent_id} is already in the conversation.", agent_id=agent_id
            )
        live = _live_sessions(tx, [agent_id])
        if not live:
            raise precondition(
                "AGENT_UNAVAILABLE", f"{agent_id} is not logged in and ready with an offer stream.", agent_id=agent_id
            )
        loads = agent_loads(s, [agent_id])
        sess, agent = live[0]
        if loads.get(agent_id, 0) >= agent.max_chats:
            raise precondition("AGENT_AT_CAPACITY", f"{agent_id} has no free chat slot.", agent_id=agent_id)
    else:
        if s.get(Queue, queue_id) is None:
            raise not_found("QUEUE_NOT_FOUND", f"There is no queue {queue_id!r}.", queue_id=queue_id)
        profiles = set(s.exec(select(ProfileQueue.profile_id).where(ProfileQueue.queue_id == queue_id)).all())
        live = [
            (sess, agent)
            for sess, agent in _live_sessions(tx)
            if sess.profile_id in profiles and agent.id not in members and agent.id != who.agent_id
        ]
        loads = agent_loads(s, [a.id for _, a in live])
        live = [(sess, agent) for sess, agent in live if loads.get(agent.id, 0) < agent.max_chats]
        if not live:
            raise precondition(
                "NO_AGENT_AVAILABLE", f"No agent of queue {queue_id!r} is available right now.", queue_id=queue_id
            )
        sess, agent = random.choice(live)

    inv = Invite(
        id=uuid.uuid4().hex,
        conversation_id=conversation_id,
        inviter_id=who.agent_id,
        invitee_id=agent.id,
        queue_id=queue_id or None,
        status="pending",
        request_id=request_id or None,
        created_at=now,
        expires_at=now + timedelta(seconds=tx.settings.offer_timeout),
    )
    s.add(inv)
    s.flush()
    payload = invite_json(s, inv)
    routing.make_offer(tx, conv, sess.id, sess.agent_id, now, invite_payload=payload)
    _invite_event(tx, conv, payload, who.agent_id, now)
    return payload


def cancel_invite(tx: Tx, who: AgentPrincipal, invite_id: str) -> dict[str, Any]:
    s = tx.session
    now = tx.now
    inv = s.get(Invite, invite_id) if invite_id else None
    if inv is None or not is_participant(s, inv.conversation_id, who.agent_id):
        raise not_found("INVITE_NOT_FOUND", f"No invite {invite_id!r} in your conversations.", invite_id=invite_id)
    if inv.inviter_id != who.agent_id:
        raise denied("NOT_INVITER", "Only the agent who sent the invite can cancel it.", invite_id=invite_id)
    if inv.status == "cancelled":
        return invite_json(s, inv)
    if inv.status != "pending":
        raise precondition(
            "INVITE_NOT_PENDING",
            f"The invite was already answered ({inv.status}).",
            invite_id=invite_id,
            state=inv.status,
        )
    for offer in s.exec(select(Offer).where(Offer.invite_id == inv.id, Offer.status == "pending")).all():
        routing.close_offer(tx, offer, "withdrawn", now, "cancelled")  # the invitee's seat back: routing looks
    _settle(tx, inv, "cancelled", now)
    return invite_json(s, inv)


def on_accepted(tx: Tx, offer: Offer, conv: Conversation, agent: Agent, now: datetime) -> None:
    inv = must_get(tx.session, Invite, offer.invite_id)
    if is_participant(tx.session, conv.id, agent.id):
        # In it already (a supervisor who barged in meanwhile): the invite is answered, nobody joins twice,
        # and the offer's seat is given back.
        routing.take_seats(tx, agent.id, -1)
        _settle(tx, inv, "accepted", now)
        return
    tx.session.add(Participant(conversation_id=conv.id, agent_id=agent.id, joined_at=now))  # the offer's seat
    append_event(
        tx,
        conv,
        "participant_joined",
        {"participant": agent_participant(agent).to_json(), "invite_id": inv.id},
        actor=f"agent:{agent.id}",
        now=now,
    )
    _settle(tx, inv, "accepted", now)


def on_offer_closed(tx: Tx, offer: Offer, state: str, now: datetime) -> None:
    """The invitee rejected, timed out or became unavailable."""
    inv = tx.session.get(Invite, offer.invite_id)
    if inv is not None and inv.status == "pending":
        _settle(tx, inv, state, now)


def _settle(tx: Tx, inv: Invite, state: str, now: datetime) -> None:
    inv.status = state
    inv.resolved_at = now
    tx.session.add(inv)
    conv = must_get(tx.session, Conversation, inv.conversation_id)
    actor_id = inv.invitee_id if state != "cancelled" else inv.inviter_id
    _invite_event(tx, conv, invite_json(tx.session, inv), actor_id, now)


def _invite_event(tx: Tx, conv: Conversation, payload: dict[str, Any], actor_id: str, now: datetime) -> None:
    append_event(
        tx, conv, "invite_updated", {"invite": payload}, actor=f"agent:{actor_id}", visibility="agents", now=now
    )
