"""Agent sessions: login, logout, ready state and offer-stream presence.

An agent is offered chats only while logged in, ready and holding an open
offer stream. When the last stream of a session drops, its pending offers
stay for a grace period (a reconnect keeps them); after that they return to
the queue.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlmodel import select

from ..errors import denied, unauthenticated
from ..store import Tx
from ..store.models import Agent, AgentProfile, AgentSession, Profile, ProfileQueue
from . import routing
from .auth import token_hash
from .log import utcnow
from .views import AgentPrincipal, SessionView

if TYPE_CHECKING:
    from .core import Core


def check_profile(tx: Tx, agent_id: str, profile_id: str) -> None:
    if not tx.session.get(AgentProfile, (agent_id, profile_id)):
        raise denied("PROFILE_NOT_ALLOWED", f"You may not log in with profile {profile_id!r}.", profile_id=profile_id)


def login(tx: Tx, core: "Core", agent_id: str, profile_id: str, ready: bool, token: str) -> SessionView:
    """Credentials were checked by the caller (off the writer thread: argon2 is slow)."""
    s = tx.session
    now = utcnow()
    check_profile(tx, agent_id, profile_id)
    end_sessions(tx, core, agent_id, now)
    sess = AgentSession(
        id=uuid.uuid4().hex,
        token_hash=token_hash(token),
        agent_id=agent_id,
        profile_id=profile_id,
        ready=ready,
        created_at=now,
        last_offer_at=now,
    )
    s.add(sess)
    s.flush()
    return session_view(s, sess, token)


def end_sessions(tx: Tx, core: "Core", agent_id: str, now: datetime | None = None) -> None:
    now = now or utcnow()
    for sess in tx.session.exec(
        select(AgentSession).where(AgentSession.agent_id == agent_id, AgentSession.ended_at.is_(None))
    ).all():
        _end(tx, core, sess, now)


def logout(tx: Tx, core: "Core", who: AgentPrincipal) -> None:
    sess = tx.session.get(AgentSession, who.session_id)
    if sess is not None and sess.ended_at is None:
        _end(tx, core, sess, utcnow())


def _end(tx: Tx, core: "Core", sess: AgentSession, now: datetime) -> None:
    sess.ended_at = now
    sess.ready = False
    tx.session.add(sess)
    core.session_ended(tx, sess.id)
    routing.withdraw_session_offers(tx, core, sess.id, now)


def set_ready(tx: Tx, core: "Core", who: AgentPrincipal, ready: bool) -> bool:
    """Pending offers stay when going not ready: the agent may still answer them."""
    sess = _live(tx, who)
    sess.ready = ready
    tx.session.add(sess)
    if ready:
        tx.session.flush()
        routing.dispatch(tx, core)
    return ready


def stream_opened(tx: Tx, core: "Core", session_id: str) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is None or sess.ended_at is not None:
        return
    sess.stream_count += 1
    sess.stream_lost_at = None
    tx.session.add(sess)
    tx.session.flush()
    routing.dispatch(tx, core)


def stream_closed(tx: Tx, core: "Core", session_id: str) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is None:
        return
    sess.stream_count = max(0, sess.stream_count - 1)
    if sess.stream_count == 0 and sess.ended_at is None:
        lost_at = utcnow()
        sess.stream_lost_at = lost_at
        core.schedule(tx, lost_at + timedelta(seconds=core.settings.stream_grace), grace_expired, session_id, lost_at)
    tx.session.add(sess)


def grace_expired(tx: Tx, core: "Core", session_id: str, lost_at: datetime) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is not None and sess.stream_count == 0 and sess.stream_lost_at == lost_at:
        routing.withdraw_session_offers(tx, core, session_id, utcnow())


def recover(tx: Tx, core: "Core") -> None:
    """After a restart no stream is open: every live session starts its grace period,
    and pending offers and invites get their timers back."""
    from ..store.models import Offer

    now = utcnow()
    for sess in tx.session.exec(select(AgentSession).where(AgentSession.ended_at.is_(None))).all():
        sess.stream_count = 0
        sess.stream_lost_at = now
        tx.session.add(sess)
        core.schedule(tx, now + timedelta(seconds=core.settings.stream_grace), grace_expired, sess.id, now)
    for offer in tx.session.exec(select(Offer).where(Offer.status == "pending")).all():
        core.schedule(tx, offer.expires_at, routing.expire_offer, offer.id)


def _live(tx: Tx, who: AgentPrincipal) -> AgentSession:
    sess = tx.session.get(AgentSession, who.session_id)
    if sess is None or sess.ended_at is not None:
        raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
    return sess


def session_view(s, sess: AgentSession, token: str = "") -> SessionView:
    agent = s.get(Agent, sess.agent_id)
    profile = s.get(Profile, sess.profile_id)
    queues = tuple(sorted(s.exec(select(ProfileQueue.queue_id).where(ProfileQueue.profile_id == sess.profile_id)).all()))
    return SessionView(
        session_id=sess.id,
        agent_id=agent.id,
        display_name=agent.display_name,
        max_chats=agent.max_chats,
        profile_id=profile.id,
        profile_name=profile.display_name,
        queue_ids=queues,
        ready=sess.ready,
        token=token,
    )


def find_session(s, token: str) -> AgentPrincipal:
    sess = s.exec(select(AgentSession).where(AgentSession.token_hash == token_hash(token))).first() if token else None
    if sess is None or sess.ended_at is not None:
        raise unauthenticated("SESSION_INVALID", "Log in first: the session token is missing, unknown or ended.")
    return AgentPrincipal(sess.id, sess.agent_id, sess.profile_id)


