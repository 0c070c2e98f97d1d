"""Agent sessions: login, logout, ready state and offer-stream presence.

An agent is offered chats only while logged in, ready and holding an open
offer stream. When the last stream of a session drops, its pending offers
stay for a grace period (a reconnect keeps them); after that they return to
the queue.

Each open offer stream is a lease row naming the node that serves it; the node
renews its leases, so a dead node's streams stop counting once their leases
expire (`sweep`), whichever node notices. `stream_count` counts a session's
leases and is changed only together with them.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import exists, update
from sqlmodel import Session, col, select

from ..errors import denied, unauthenticated
from ..store.models import Agent, AgentProfile, AgentSession, Offer, Profile, ProfileQueue, StreamLease
from . import routing
from .auth import token_hash
from .log import feed_topic
from .read import must_get
from .tx import Tx, routing_free
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


def stream_opened(
    tx: Tx, session_id: str, lease_id: str | None = None, node_id: str = "local", lease_seconds: float = 10.0
) -> bool:
    """An offer stream opened on node_id: a lease, renewed by that node while the stream lives.
    False if the session has ended."""
    sess = tx.session.get(AgentSession, session_id)
    if sess is None or sess.ended_at is not None:
        return False
    tx.session.add(
        StreamLease(
            id=lease_id or uuid.uuid4().hex,
            session_id=session_id,
            node_id=node_id,
            created_at=tx.now,
            expires_at=tx.now + timedelta(seconds=lease_seconds),
        )
    )
    sess.stream_count += 1
    sess.stream_lost_at = None
    tx.session.add(sess)
    tx.needs_dispatch()
    return True


def stream_closed(tx: Tx, session_id: str, lease_id: str | None = None) -> None:
    """The stream holding lease_id ended (without one: any one of the session's streams)."""
    if lease_id is not None:
        lease = tx.session.get(StreamLease, lease_id)
    else:
        lease = tx.session.exec(select(StreamLease).where(StreamLease.session_id == session_id).limit(1)).first()
    if lease is None:
        return  # already gone: its node was taken for dead and the sweep removed it
    tx.session.delete(lease)
    _lease_gone(tx, session_id, tx.now)


def _lease_gone(tx: Tx, session_id: str, lost_at: datetime) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is None:
        return
    sess.stream_count = max(0, sess.stream_count - 1)
    if sess.stream_count == 0 and sess.ended_at is None:
        sess.stream_lost_at = lost_at
        # The fast path; if this node dies first, another node's sweep ends the grace period.
        tx.schedule(lost_at + timedelta(seconds=tx.settings.stream_grace), grace_expired, session_id, lost_at)
    tx.session.add(sess)


@routing_free
def renew_leases(tx: Tx, node_id: str, lease_ids: list[str], lease_seconds: float) -> int:
    """The node is alive: the leases of its open streams run on (only those: a lease no stream holds any more
    expires and is swept). Changes no routing state (presence stays as it is). Returns how many it renewed."""
    renewed = 0
    until = tx.now + timedelta(seconds=lease_seconds)
    for i in range(0, len(lease_ids), 500):
        result = tx.conn.execute(
            update(StreamLease)
            .where(col(StreamLease.node_id) == node_id, col(StreamLease.id).in_(lease_ids[i : i + 500]))
            .values(expires_at=until)
        )
        renewed += int(getattr(result, "rowcount", 0) or 0)
    return renewed


def restore_leases(tx: Tx, node_id: str, held: dict[str, str], lease_seconds: float) -> int:
    """This node stalled past its leases' expiry and another node swept them, yet its streams are open:
    they count again. `held` maps lease id to session id. Returns how many came back."""
    have = set(tx.session.exec(select(StreamLease.id).where(col(StreamLease.id).in_(list(held)))).all())
    back = 0
    for lease_id, session_id in held.items():
        if lease_id not in have and stream_opened(tx, session_id, lease_id, node_id, lease_seconds):
            back += 1
    return back


def grace_expired(tx: Tx, session_id: str, lost_at: datetime) -> None:
    sess = tx.session.get(AgentSession, session_id)
    if sess is not None and sess.stream_count == 0 and sess.stream_lost_at == lost_at:
        routing.withdraw_session_offers(tx, session_id, tx.now)


def sweep(tx: Tx, expire_leases: bool = True) -> int:
    """The database's timers, for every node (the in-memory ones are only the fast path): expired leases
    (their node is dead) are removed, sessions past their grace period lose their pending offers, and
    offers past their time-out go back. Rows are claimed with SKIP LOCKED, so nodes sweeping together
    never wait on each other. Returns how much it did."""
    s = tx.session
    now = tx.now
    done = 0
    # The embedded single process holds every lease itself (recover cleared the others): none is a dead node's.
    dead = (
        s.exec(
            select(StreamLease).where(col(StreamLease.expires_at) < now).with_for_update(skip_locked=True).limit(500)
        ).all()
        if expire_leases
        else []
    )
    for lease in dead:
        s.delete(lease)
        _lease_gone(tx, lease.session_id, lease.expires_at)
        done += 1
    grace_over = now - timedelta(seconds=tx.settings.stream_grace)
    for sess in s.exec(
        select(AgentSession)
        .where(
            col(AgentSession.stream_count) == 0,
            col(AgentSession.stream_lost_at) <= grace_over,
            exists().where(col(Offer.session_id) == AgentSession.id, col(Offer.status) == "pending"),
        )
        .with_for_update(skip_locked=True)
        .limit(500)
    ).all():
        routing.withdraw_session_offers(tx, sess.id, now)
        done += 1
    return done + routing.expire_due(tx)


def sweep_due(s: Session, now: datetime, grace: float, expire_leases: bool = True) -> bool:
    """Whether sweep has anything to do: a cheap read first, so idle nodes take no lock."""
    grace_over = now - timedelta(seconds=grace)
    if expire_leases:
        lease = s.exec(select(StreamLease.id).where(col(StreamLease.expires_at) < now).limit(1)).first()
        if lease is not None:
            return True
    offer = s.exec(
        select(Offer.id).where(col(Offer.status) == "pending", col(Offer.expires_at) <= now).limit(1)
    ).first()
    if offer is not None:
        return True
    late = s.exec(
        select(AgentSession.id)
        .where(
            col(AgentSession.stream_count) == 0,
            col(AgentSession.stream_lost_at) <= grace_over,
            exists().where(col(Offer.session_id) == AgentSession.id, col(Offer.status) == "pending"),
        )
        .limit(1)
    ).first()
    return late is not None


def recover(tx: Tx, node_id: str, exclusive: bool) -> None:
    """A node starts. Its own leases from before (same node id) are gone with its old streams; `exclusive`
    (the embedded single process: no other node can exist) means every lease is. Sessions left without a
    stream start their grace period, and pending offers get their in-memory timers back."""
    q = select(StreamLease)
    if not exclusive:
        q = q.where(col(StreamLease.node_id) == node_id)
    now = tx.now
    for lease in tx.session.exec(q).all():
        tx.session.delete(lease)
        _lease_gone(tx, lease.session_id, now)
    if exclusive:
        # Counts from before leases (or from a crash mid-write) cannot outlive the process either.
        tx.session.flush()
        for sess in tx.session.exec(
            select(AgentSession).where(col(AgentSession.ended_at).is_(None), col(AgentSession.stream_count) != 0)
        ).all():
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
        supervisor=profile.supervisor,
    )


@dataclass(frozen=True, slots=True)
class Found:
    """A live session's principal, whether its idle clock needs a touch, and seconds left of its lifetime."""

    principal: AgentPrincipal
    stale: bool
    remaining: float


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
    remaining = lifetime - (now - sess.created_at).total_seconds()
    return Found(AgentPrincipal(sess.id, sess.agent_id, sess.profile_id), now - seen >= TOUCH_EVERY, remaining)


def _expired(sess: AgentSession, now: datetime, idle: float, lifetime: float) -> bool:
    if now - sess.created_at > timedelta(seconds=lifetime):
        return True
    # Time with the offer stream open is presence: idleness counts from the later of the last call
    # and the moment the stream went (a blip or a restart sets stream_lost_at: the clock starts again).
    seen = max(sess.last_seen_at or sess.created_at, sess.stream_lost_at or sess.created_at)
    return sess.stream_count == 0 and now - seen > timedelta(seconds=idle)


def ended_among(s: Session, session_ids: list[str]) -> list[str]:
    """Which of these sessions have ended (or are gone)."""
    live = set(
        s.exec(
            select(AgentSession.id).where(col(AgentSession.id).in_(session_ids), col(AgentSession.ended_at).is_(None))
        ).all()
    )
    return [sid for sid in session_ids if sid not in live]


@routing_free
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
