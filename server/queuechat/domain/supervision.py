"""Supervisors: agents logged in with a profile that has `supervisor` set, for that profile's queues.

They list the live conversations of those queues, monitor any of them (a read-only stream of what its
agents see), and while monitoring whisper to the agents or barge in. A monitor is a MonitorSession row
from the stream's start to its end; both are events of the log with visibility "agents", so they are in
the organisation's export and never reach the customer. No participant changes while monitoring: the
supervisor joins only by barging in, which everyone sees as for an invited agent.
"""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import bindparam, func
from sqlmodel import Session, col, select

from ..errors import denied, not_found, precondition, short
from ..store.fast import Fast
from ..store.models import Agent, Conversation, MonitorSession, Participant, Profile, ProfileQueue
from . import routing
from .log import agent_participant, append_event, find_request
from .read import conversation_view, is_participant, must_get
from .tx import Tx
from .views import AgentPrincipal, ConversationView, EventView, LiveConversationView, ParticipantView


def supervised_queues(s: Session, who: AgentPrincipal) -> set[str]:
    """The queues the caller supervises; PERMISSION_DENIED unless their profile is a supervisor's."""
    profile = s.get(Profile, who.profile_id)
    if profile is None or not profile.supervisor:
        raise denied("NOT_A_SUPERVISOR", "Log in with a supervisor profile to supervise conversations.")
    return set(s.exec(select(ProfileQueue.queue_id).where(ProfileQueue.profile_id == who.profile_id)).all())


def supervised_conversation(s: Session, who: AgentPrincipal, conversation_id: str) -> Conversation:
    queues = supervised_queues(s, who)
    conv = s.get(Conversation, conversation_id) if conversation_id else None
    if conv is None:
        raise not_found(
            "CONVERSATION_NOT_FOUND", f"No conversation {short(conversation_id)!r}.", conversation_id=conversation_id
        )
    if conv.queue_id not in queues:
        raise denied(
            "QUEUE_NOT_SUPERVISED", "This conversation is not in a queue of your profile.", queue_id=conv.queue_id
        )
    return conv


def live_conversations(s: Session, who: AgentPrincipal, queue_id: str, now: datetime) -> list[LiveConversationView]:
    queues = supervised_queues(s, who)
    if queue_id:
        if queue_id not in queues:
            raise denied("QUEUE_NOT_SUPERVISED", f"Queue {short(queue_id)!r} is not one of your profile's.")
        queues = {queue_id}
    convs = s.exec(
        select(Conversation)
        .where(col(Conversation.status).in_(("queued", "active")), col(Conversation.queue_id).in_(sorted(queues)))
        .order_by(col(Conversation.created_at), col(Conversation.id))
    ).all()
    out = []
    for conv in convs:
        first = s.exec(select(func.min(Participant.joined_at)).where(Participant.conversation_id == conv.id)).one()
        waiting = ((first or now) - conv.enqueued_at).total_seconds()
        handling = (now - first).total_seconds() if first is not None else 0.0
        out.append(
            LiveConversationView(
                conversation_view(s, conv),
                max(0.0, waiting),
                max(0.0, handling),
                tuple(agent_participant(a) for a in _monitoring_agents(s, conv.id)),
            )
        )
    return out


def _monitoring_agents(s: Session, conversation_id: str) -> list[Agent]:
    return list(
        s.exec(
            select(Agent)
            .where(
                col(Agent.id).in_(
                    select(MonitorSession.agent_id).where(
                        MonitorSession.conversation_id == conversation_id, col(MonitorSession.ended_at).is_(None)
                    )
                )
            )
            .order_by(col(Agent.id))
        ).all()
    )


def _supervisor(s: Session, who: AgentPrincipal) -> ParticipantView:
    return agent_participant(must_get(s, Agent, who.agent_id))


def start_monitor(tx: Tx, who: AgentPrincipal, conversation_id: str, monitor_id: str = "", node_id: str = "") -> str:
    """Open a monitor on a live conversation: a MonitorStarted event for the record. Returns its id
    (monitor_id, or a new one)."""
    s = tx.session
    conv = supervised_conversation(s, who, conversation_id)
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conv.id)
    monitor = MonitorSession(
        id=monitor_id or uuid.uuid4().hex, conversation_id=conv.id, agent_id=who.agent_id, session_id=who.session_id,
        node_id=node_id, started_at=tx.now,
    )  # fmt: skip
    s.add(monitor)
    supervisor = _supervisor(s, who)
    append_event(
        tx, conv, "monitor_started", {"supervisor": supervisor.to_json()}, actor=f"agent:{who.agent_id}",
        visibility="agents",
    )  # fmt: skip
    tx.log("monitor.started", conversation_id=conv.id, agent_id=who.agent_id, monitor_id=monitor.id)
    return monitor.id


def stop_monitor(tx: Tx, monitor_id: str) -> None:
    """The monitor's stream ended: a MonitorStopped event, unless the conversation's close recorded it already."""
    s = tx.session
    monitor = s.get(MonitorSession, monitor_id)
    if monitor is None or monitor.ended_at is not None:
        return
    conv = must_get(s, Conversation, monitor.conversation_id)
    _stop(tx, conv, monitor)


def _stop(tx: Tx, conv: Conversation, monitor: MonitorSession) -> None:
    s = tx.session
    monitor.ended_at = tx.now
    s.add(monitor)
    agent = must_get(s, Agent, monitor.agent_id)
    if conv.status != "closed":  # chat_closed stays the log's last event
        append_event(
            tx, conv, "monitor_stopped", {"supervisor": agent_participant(agent).to_json()},
            actor=f"agent:{agent.id}", visibility="agents",
        )  # fmt: skip
    tx.log("monitor.stopped", conversation_id=conv.id, agent_id=agent.id, monitor_id=monitor.id)


def stop_monitors(tx: Tx, conv: Conversation) -> None:
    """The conversation is closing: its monitors stop first, so that their stops are in the log before chat_closed."""
    if _ANY_MONITOR.run(tx.conn, {"c": conv.id}).first() is None:
        return  # the common case: a Core look, no ORM query
    for monitor in tx.session.exec(
        select(MonitorSession)
        .where(MonitorSession.conversation_id == conv.id, col(MonitorSession.ended_at).is_(None))
        .order_by(col(MonitorSession.started_at))
    ).all():
        _stop(tx, conv, monitor)


_ANY_MONITOR = Fast(
    select(MonitorSession.id)
    .where(MonitorSession.conversation_id == bindparam("c"), col(MonitorSession.ended_at).is_(None))
    .limit(1)
)


def recover(tx: Tx, node_id: str = "", exclusive: bool = True) -> None:
    """After a restart this node's monitor streams are gone: each of its open monitors is recorded as
    stopped (`exclusive`, the embedded single process: every open monitor)."""
    q = select(MonitorSession).where(col(MonitorSession.ended_at).is_(None))
    if not exclusive:
        q = q.where(col(MonitorSession.node_id) == node_id)
    for monitor in tx.session.exec(q).all():
        _stop(tx, must_get(tx.session, Conversation, monitor.conversation_id), monitor)


def _require_monitoring(s: Session, who: AgentPrincipal, conversation_id: str) -> None:
    open_monitor = s.exec(
        select(MonitorSession.id).where(
            MonitorSession.conversation_id == conversation_id,
            MonitorSession.agent_id == who.agent_id,
            col(MonitorSession.ended_at).is_(None),
        )
    ).first()
    if open_monitor is None:
        raise precondition(
            "NOT_MONITORING", "Monitor the conversation first (MonitorConversation).", conversation_id=conversation_id
        )


def whisper(tx: Tx, who: AgentPrincipal, conversation_id: str, request_id: str, text: str) -> EventView:
    """A private message from the supervisor to the agents: visibility "agents", never the customer's."""
    from .conversations import check_text  # conversations imports this module

    s = tx.session
    conv = supervised_conversation(s, who, conversation_id)
    actor = f"agent:{who.agent_id}"
    prior = find_request(tx, conversation_id, actor, request_id)
    if prior is not None:
        return prior
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conv.id)
    _require_monitoring(s, who, conversation_id)
    check_text(tx.limits, text)
    message = {
        "message_id": uuid.uuid4().hex,
        "sender": _supervisor(s, who).to_json(),
        "text": text,
        "visibility": "VISIBILITY_AGENTS_ONLY",
        "whisper": True,
    }
    event = append_event(tx, conv, "message", message, actor=actor, visibility="agents", request_id=request_id)
    tx.count("messages", sender="supervisor", visibility="agents")
    return event


def barge_in(tx: Tx, who: AgentPrincipal, conversation_id: str) -> ConversationView:
    """The supervisor joins as a participant; everyone sees a ParticipantJoined with barge_in set."""
    s = tx.session
    conv = supervised_conversation(s, who, conversation_id)
    if is_participant(s, conversation_id, who.agent_id):
        return conversation_view(s, conv)  # a retry, or in it already
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conv.id)
    if conv.status == "queued":
        raise precondition("NOT_ANSWERED_YET", "No agent has taken this chat yet; there is nobody to join.")
    if not conv.customer_connected:
        raise precondition("CHAT_ENDED", "The customer has ended the chat.")
    _require_monitoring(s, who, conversation_id)
    agent = must_get(s, Agent, who.agent_id)
    s.add(Participant(conversation_id=conv.id, agent_id=agent.id, joined_at=tx.now))
    routing.take_seats(tx, agent.id, 1)
    append_event(
        tx, conv, "participant_joined", {"participant": agent_participant(agent).to_json(), "barge_in": True},
        actor=f"agent:{agent.id}",
    )  # fmt: skip
    tx.log("monitor.barged_in", conversation_id=conv.id, agent_id=agent.id)
    s.flush()
    return conversation_view(s, conv)
