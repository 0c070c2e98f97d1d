"""Agent sessions: login, logout, ready state and offer-stream presence.

An agent is offered chats only while logged in, ready and holding an open
offer stream. When the last stream of a session drops, its pending offers
stay for a grace period (a reconnect keeps them); after that they return to
the queue.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import update
from sqlmodel import Session, col, select

from ..errors import denied, unauthenticated
from ..store.models import Agent, AgentProfile, AgentSession, Profile, ProfileQueue
from . import routing
from .auth import token_hash
from .log import feed_topic
from .read import must_get
from .tx import Tx
from .views import AgentPrincipal, SessionEnded, SessionView


def check_profile(tx: Tx, agent_id: str, profile_id: str) -> None:
    if not tx.session.get(AgentProfile, (agent_id, profile_id)):
        raise denied("PROFILE_NOT_ALLOWED", f"You may not log in with profile {profile_id!r}.", profile_id=profile_id)


def login(tx: Tx, agent_id: str, profile_id: str, ready: bool, token: str) -> SessionView:
    """Credentials were checked by the caller (off the writer thread: argon2 is slow)."""
    s = tx.session
    now = tx.now
    if must_get(s, Agent, agent_id).disabled:
        raise denied("ACCOUNT_DISABLED", "This account is disabled.")
    check_profile(tx, agent_id, profile_id)
    end_sessions(tx, agent_id, now)
    sess = AgentSession(
        id=uuid.uuid4().hex,
        token_hash=token_hash(token),
        agent_id=agent_id,
        profile_id=profile_id,
        ready=ready,
        created_at=now,
        last_seen_at=now,
        last_offer_at=now,
    )
    s.add(sess)
    s.flush()
    tx.log("agent.login", agent_id=agent_id, session_id=sess.id, profile_id=profile_id, ready=ready)
    return session_view(s, sess, token)


def end_sessions(tx: Tx, agent_id: str, now: datetime | None = None) -> None:
    now = now or tx.now
    for sess in tx.session.exec(
        select(AgentSession).where(AgentSession.agent_id == agent_id, col(AgentSession.ended_at).is_(None))
    ).all():
        _end(tx, sess, now)


def logout(tx: Tx, who: AgentPrincipal) -> None:
    sess = tx.session.get(AgentSession, who.session_id)
    if sess is not None and sess.ended_at is None:
        _end(tx, sess, tx.now)


def _end(tx: Tx, sess: AgentSession, now: datetime) -> None:
    sess.ended_at = now
    sess.ready = False
    tx.session.add(sess)
    tx.session_ended(sess.id)
    tx.log("agent.session_ended", agent_id=sess.agent_id, session_id=sess.id)
    tx.publish(feed_topic(sess.id), SessionEnded(sess.id))  # its streams end
    routing.withdraw_session_offers(tx, sess.id, now)


def set_ready(tx: Tx, who: AgentPrincipal, ready: bool) -> bool:
    """Pending offers stay when going not ready: the agent may still answer them."""
    sess = _live(tx, who)
    sess.ready = ready
    tx.session.add(sess)
    if ready:
        tx.needs_dispatch()
    return ready


def stream_opened(tx: Tx, session_id: str) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is None or sess.ended_at is not None:
        return
    sess.stream_count += 1
    sess.stream_lost_at = None
    tx.session.add(sess)
    tx.needs_dispatch()


def stream_closed(tx: Tx, session_id: str) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is None:
        return
    sess.stream_count = max(0, sess.stream_count - 1)
    if sess.stream_count == 0 and sess.ended_at is None:
        lost_at = tx.now
        sess.stream_lost_at = lost_at
        tx.schedule(lost_at + timedelta(seconds=tx.settings.stream_grace), grace_expired, session_id, lost_at)
    tx.session.add(sess)


def grace_expired(tx: Tx, session_id: str, lost_at: datetime) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is not None and sess.stream_count == 0 and sess.stream_lost_at == lost_at:
        routing.withdraw_session_offers(tx, session_id, tx.now)


def recover(tx: Tx) -> None:
    """After a restart no stream is open: every live session starts its grace period,
    and pending offers and invites get their timers back."""
    from ..store.models import Offer

    now = tx.now
    for sess in tx.session.exec(select(AgentSession).where(col(AgentSession.ended_at).is_(None))).all():
        sess.stream_count = 0
        sess.stream_lost_at = now
        tx.session.add(sess)
        tx.schedule(now + timedelta(seconds=tx.settings.stream_grace), grace_expired, sess.id, now)
    for offer in tx.session.exec(select(Offer).where(Offer.status == "pending")).all():
        tx.schedule(offer.expires_at, routing.expire_offer, offer.id)


def _live(tx: Tx, who: AgentPrincipal) -> AgentSession:
    sess = tx.session.get(AgentSession, who.session_id)
    if sess is None or sess.ended_at is not None:
        raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
    return sess


def session_view(s: Session, sess: AgentSession, token: str = "") -> SessionView:
    agent = must_get(s, Agent, sess.agent_id)
    profile = must_get(s, Profile, sess.profile_id)
    queues = tuple(
        sorted(s.exec(select(ProfileQueue.queue_id).where(ProfileQueue.profile_id == sess.profile_id)).all())
    )
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


@dataclass(frozen=True, slots=True)
class Found:
    """A live session's principal, and whether its idle clock needs a touch."""

    principal: AgentPrincipal
    stale: bool


TOUCH_EVERY = timedelta(seconds=60)  # last_seen_at is written at most this often


def find_session(s: Session, token: str, now: datetime, idle: float, lifetime: float) -> Found:
    """The live session of a token. One past its lifetime, or idle too long without an offer stream,
    is refused (SESSION_EXPIRED); the caller ends it with end_expired."""
    sess = s.exec(select(AgentSession).where(AgentSession.token_hash == token_hash(token))).first() if token else None
    if sess is None or sess.ended_at is not None:
        raise unauthenticated("SESSION_INVALID", "Log in first: the session token is missing, unknown or ended.")
    if _expired(sess, now, idle, lifetime):
        raise unauthenticated("SESSION_EXPIRED", "This session has expired; log in again.", session_id=sess.id)
    seen = sess.last_seen_at or sess.created_at
    return Found(AgentPrincipal(sess.id, sess.agent_id, sess.profile_id), now - seen >= TOUCH_EVERY)


def _expired(sess: AgentSession, now: datetime, idle: float, lifetime: float) -> bool:
    if now - sess.created_at > timedelta(seconds=lifetime):
        return True
    # Time with the offer stream open is presence: idleness counts from the later of the last call
    # and the moment the stream went (a blip or a restart sets stream_lost_at: the clock starts again).
    seen = max(sess.last_seen_at or sess.created_at, sess.stream_lost_at or sess.created_at)
    return sess.stream_count == 0 and now - seen > timedelta(seconds=idle)


def touch(tx: Tx, session_id: str) -> None:
    tx.conn.execute(update(AgentSession).where(col(AgentSession.id) == session_id).values(last_seen_at=tx.now))


def end_expired(tx: Tx, idle: float, lifetime: float, session_id: str | None = None) -> int:
    """End sessions past their lifetime or idle time (one, or all: the sweeper). Returns how many."""
    q = select(AgentSession).where(col(AgentSession.ended_at).is_(None))
    if session_id is not None:
        q = q.where(col(AgentSession.id) == session_id)
    ended = 0
    for sess in tx.session.exec(q).all():
        if _expired(sess, tx.now, idle, lifetime):
            _end(tx, sess, tx.now)
            ended += 1
    return ended
