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

import json
import uuid
from collections.abc import Callable, Collection, Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import Any, NamedTuple, Protocol

from sqlalchemy import bindparam, exists, func, insert, or_, text, tuple_, update
from sqlalchemy import select as core_select
from sqlalchemy.engine import Connection
from sqlalchemy.orm.attributes import set_committed_value
from sqlmodel import col, select
from sqlmodel.sql.sqltypes import UTCDateTime

from ..errors import not_found, precondition
from ..store.fast import Fast
from ..store.models import Agent, AgentSession, Conversation, Offer, Participant, ProfileQueue
from . import invites
from .log import append_event, append_feed, feed_stored, json_around, ts
from .read import (
    agent_view,
    conversation_view,
    get,
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


def dispatch(tx: Tx, now: datetime | None = None, queues: Collection[str] | None = None) -> int:
    """Offer waiting chats to free agents until either runs out. Returns offers made.

    Runs after every change that may free capacity or add work, so it must stay cheap with
    a long queue and many agents: plain rows, only free agents read (agent.load), each queue read
    only as far as its free seats, and a stop as soon as no queue that has waiting chats has a free
    agent left. One queue (an arrival, a close by an agent of a one-queue profile) reads its agents
    a few at a time (_dispatch_queue): the cost of an arrival does not grow with the agents.

    `queues`: only these changed. Every dispatch runs until no queue has both a chat not on
    offer and a free agent, so a change to some queues can only make work in those: when none
    of them has a chat to offer (a close in a queue with nobody waiting), nothing is read."""
    c = tx.conn
    now = now or tx.now
    if queues is not None and not _any_waiting(c, queues):
        return 0
    if queues is not None and len(queues) == 1:
        return _dispatch_queue(tx, next(iter(queues)), now)
    # Plain lists, not dicts: one per free agent per dispatch (see _FREE_AGENTS for the fields). They come
    # idle-longest first, so an agent's rank is its place in that order: no timestamps are read.
    free: list[list[Any]] = [[*r, i] for i, r in enumerate(_FREE_AGENTS.run(c, {}))]
    if not free:
        return 0
    next_rank = len(free)
    loads = {a[_AGENT]: a[_LOAD] for a in free}
    pq = profile_queues(tx.session)
    served = set().union(*(pq.get(a[_PROFILE], set()) for a in free))
    if queues is not None:
        served &= set(queues)
    if not served:
        return 0
    # Seats each served queue could fill: no queue is read further than that (plus one, to find it full).
    seats = dict.fromkeys(served, 0)
    for a in free:
        for q in pq.get(a[_PROFILE], ()):
            if q in seats:
                seats[q] += a[_MAX] - a[_LOAD]
    made = 0
    after: dict[str, tuple[datetime, str]] = {}
    while served:
        # Each queue's oldest chats by its own index order, merged oldest first: no sort of a whole queue.
        heads: list[Any] = []
        full: set[str] = set()  # queues with a whole page read: maybe more behind it
        cutoff: tuple[datetime, str] | None = None  # nothing after the earliest full page's last row, yet
        for q in served:
            limit = min(seats[q] + 1, _PAGE)
            rows = _waiting_page(c, q, after.get(q), limit)
            heads.extend(rows)
            if len(rows) == _PAGE:
                full.add(q)
                last = (rows[-1][2], rows[-1][0])
                cutoff = last if cutoff is None else min(cutoff, last)
        heads.sort(key=lambda r: (r[2], r[0]))
        more: set[str] = set()
        for conv_id, queue_id, enqueued_at in heads:
            if cutoff is not None and (enqueued_at, conv_id) > cutoff:
                more.add(queue_id)
                continue
            if queue_id not in served:
                continue
            candidates = [a for a in free if queue_id in pq.get(a[_PROFILE], ()) and loads[a[_AGENT]] < a[_MAX]]
            if not candidates:
                served.discard(queue_id)  # nobody left for this queue: its other chats keep waiting
                continue
            after[queue_id] = (enqueued_at, conv_id)
            cooling = _cooling(tx, conv_id, now) if len(candidates) > 1 else ()
            preferred = [a for a in candidates if a[_AGENT] not in cooling] or candidates
            pick = min(preferred, key=lambda a: a[_RANK])
            make_offer(tx, _WaitingRow(conv_id, queue_id, enqueued_at), pick[_SESSION], pick[_AGENT], now)
            pick[_RANK] = next_rank  # offered last: idle the shortest
            next_rank += 1
            loads[pick[_AGENT]] += 1
            made += 1
        # Another round only for queues with chats left unread or held back by the cutoff.
        served &= full | more
    return made


def _dispatch_queue(tx: Tx, queue_id: str, now: datetime) -> int:
    """dispatch for one queue, choosing as dispatch does: the queue's chats oldest first, each to the free
    agent serving it who is idle longest and not in their cool-down for it (if there is one; anyone free
    otherwise). Agents are read idle-longest first a few at a time, so an arrival reads the one or two it
    offers to, whatever the number logged in; when none is free the database skips the busy by index."""
    c = tx.conn
    agents = _QueueAgents(c, queue_id)
    made = 0
    after: tuple[datetime, str] | None = None
    limit = 8
    while True:
        rows = _waiting_page(c, queue_id, after, limit)
        for conv_id, _, enqueued_at in rows:
            pick = agents.pick(partial(_cooling, tx, conv_id, now))
            if pick is None:
                return made  # nobody left: the other chats keep waiting
            make_offer(tx, _WaitingRow(conv_id, queue_id, enqueued_at), pick[_SESSION], pick[_AGENT], now)
            made += 1
        if len(rows) < limit:
            return made
        after = (rows[-1][2], rows[-1][0])
        limit = min(limit * 4, _PAGE)


class _QueueAgents:
    """The free agents serving one queue, in routing's order, read from the database as they are needed.

    Order: those not offered anything in this dispatch, idle longest first (the database's order), then
    those offered one now and with seats left, in the order they were offered (as dispatch's ranks)."""

    def __init__(self, c: Connection, queue_id: str):
        self.c = c
        self.queue_id = queue_id
        self.fresh: list[list[Any]] = []  # read, not offered anything yet, in order
        self.offered: list[list[Any]] = []  # offered one in this dispatch, seats left, in the order offered
        self.seen: set[str] = set()  # sessions read (an offer moves a session to the end of the index)
        self.last: tuple[datetime, datetime, str] | None = None  # the keyset of the last row read
        self.done = False  # all read
        self.batch = 4

    def _read(self) -> bool:
        """Read the next few; False when there are no more."""
        while not self.done:
            params = {"queue": self.queue_id, "limit": self.batch}
            if self.last is None:
                rows = _FREE_FOR_QUEUE.run(self.c, params).all()
            else:
                at, created, sid = self.last
                rows = _FREE_FOR_QUEUE_AFTER.run(self.c, {**params, "at": at, "created": created, "id": sid}).all()
            if len(rows) < self.batch:
                self.done = True
            self.batch = min(self.batch * 4, _PAGE)
            if rows:
                self.last = (rows[-1][-3], rows[-1][-2], rows[-1][-1])
            new = [list(r[:5]) for r in rows if r[_SESSION] not in self.seen]
            self.seen.update(r[_SESSION] for r in new)
            if new:
                self.fresh.extend(new)
                return True
        return False

    def pick(self, cooling: Callable[[], set[str]]) -> list[Any] | None:
        """Who gets the next chat (its seat taken), or None if nobody is free."""
        if not self.fresh:
            self._read()  # anyone not offered one yet comes before those who were
        while len(self.fresh) + len(self.offered) < 2 and self._read():
            pass
        if not self.fresh and not self.offered:
            return None
        chosen: list[Any] | None = None
        # The cool-down only matters with a choice: dispatch reads it only then.
        if len(self.fresh) + len(self.offered) > 1 and (cold := cooling()):
            i = 0
            while chosen is None and (i < len(self.fresh) or self._read()):
                if self.fresh[i][_AGENT] not in cold:
                    chosen = self.fresh[i]
                i += 1
            if chosen is None:
                chosen = next((a for a in self.offered if a[_AGENT] not in cold), None)
        if chosen is None:
            chosen = self.fresh[0] if self.fresh else self.offered[0]
        (self.fresh if chosen in self.fresh else self.offered).remove(chosen)  # rows differ by session id
        chosen[_LOAD] += 1
        if chosen[_LOAD] < chosen[_MAX]:
            self.offered.append(chosen)
        return chosen


def freed_queues(tx: Tx, conversation_id: str) -> set[str]:
    """The queues whose chats the conversation's agents may take once it frees their seats (the queues of
    their sessions' profiles): what a close asks routing to look at."""
    return set(_FREED_QUEUES.run(tx.conn, {"conv": conversation_id}).scalars())


_FREED_QUEUES = Fast(
    select(ProfileQueue.queue_id)
    .join(AgentSession, col(AgentSession.profile_id) == ProfileQueue.profile_id)
    .join(Participant, col(Participant.agent_id) == AgentSession.agent_id)
    .where(
        Participant.conversation_id == bindparam("conv"),
        col(Participant.left_at).is_(None),
        col(AgentSession.ended_at).is_(None),
    )
    .distinct()
)


def _cooling(tx: Tx, conversation_id: str, now: datetime) -> set[str]:
    """Agents in their cool-down for this chat: they rejected it (or let it time out) lately."""
    cutoff = now - timedelta(seconds=tx.settings.reject_cooldown)
    return set(_COOLING.run(tx.conn, {"conv": conversation_id, "cutoff": cutoff}).scalars())


# Statements built once: building one costs more than SQLite takes to run it.
_COOLING = Fast(
    select(Offer.agent_id).where(
        Offer.conversation_id == bindparam("conv"),
        # `kind || ''`: not a column SQLite can look up by, so that it reads this chat's few offers by
        # conversation rather than every chat offer resolved within the cool-down by (kind, resolved_at),
        # which it would otherwise pick without statistics (thousands of rows at 200 arrivals/s).
        (col(Offer.kind) + "") == "chat",
        # Not IN (...): a list carried by the statement is an expanding parameter, which Fast leaves to SQLAlchemy.
        or_(col(Offer.status) == "rejected", col(Offer.status) == "timed_out"),
        col(Offer.resolved_at) > bindparam("cutoff"),
    )
)


_PAGE = 200
# The fields of a free agent's row, by position, and the rank dispatch adds.
_SESSION, _AGENT, _PROFILE, _MAX, _LOAD, _RANK = range(6)
_LIVE = (
    col(AgentSession.ended_at).is_(None),
    col(AgentSession.ready) == True,  # noqa: E712
    col(AgentSession.stream_count) > 0,
    col(Agent.load) < col(Agent.max_chats),
)
# Idle longest first: the oldest last offer (a login counts as one), then the oldest session.
_IDLE_ORDER = (col(AgentSession.last_offer_at), col(AgentSession.created_at), col(AgentSession.id))
_FREE_AGENTS = Fast(
    core_select(
        col(AgentSession.id), col(AgentSession.agent_id), col(AgentSession.profile_id), col(Agent.max_chats),
        col(Agent.load),
    )
    .join(Agent, col(Agent.id) == AgentSession.agent_id)
    .where(*_LIVE)
    .order_by(*_IDLE_ORDER)
)  # fmt: skip
_FREE_FOR_QUEUE = Fast(
    core_select(
        col(AgentSession.id), col(AgentSession.agent_id), col(AgentSession.profile_id), col(Agent.max_chats),
        col(Agent.load), *_IDLE_ORDER,
    )
    .join(Agent, col(Agent.id) == AgentSession.agent_id)
    .where(
        *_LIVE,
        exists().where(
            col(ProfileQueue.profile_id) == col(AgentSession.profile_id),
            col(ProfileQueue.queue_id) == bindparam("queue"),
        ),
    )
    .order_by(*_IDLE_ORDER)
    .limit(bindparam("limit"))
)  # fmt: skip
_FREE_FOR_QUEUE_AFTER = Fast(
    _FREE_FOR_QUEUE.stmt.where(
        tuple_(*_IDLE_ORDER)
        > tuple_(
            bindparam("at", type_=UTCDateTime()),  # as the columns store them
            bindparam("created", type_=UTCDateTime()),
            bindparam("id"),
        )
    )
)


def _waiting_page(c: Connection, queue_id: str, after: tuple[datetime, str] | None, limit: int) -> Sequence[Any]:
    """A queue's next waiting chats not on offer, oldest first, after the keyset `after`."""
    rows: Sequence[Any]
    if after is None:
        rows = _WAITING_FIRST.run(c, {"queue": queue_id, "limit": limit}).all()
    else:
        rows = _WAITING_AFTER.run(c, {"queue": queue_id, "at": after[0], "id": after[1], "limit": limit}).all()
    return rows


# Not on offer: the partial unique index on pending chat offers answers it per chat, if its condition is
# written as literally as the index's (a bound parameter would not prove it).
_NOT_OFFERED = ~exists().where(
    col(Offer.conversation_id) == col(Conversation.id), text("offer.kind = 'chat' AND offer.status = 'pending'")
)


def _any_waiting(c: Connection, queues: Collection[str]) -> bool:
    """Whether any of these queues has a chat not on offer. On SQLite one queue at a time through Fast
    (an IN list would take SQLAlchemy's slow path); on PostgreSQL one statement, each being a round trip."""
    if c.dialect.name == "sqlite":
        return any(_ANY_WAITING.run(c, {"queue": q}).first() is not None for q in queues)
    return bool(queues) and c.execute(_ANY_WAITING_IN, {"queues": list(queues)}).first() is not None


_A_WAITING = select(Conversation.id).where(Conversation.status == "queued", _NOT_OFFERED).limit(1)
_ANY_WAITING = Fast(_A_WAITING.where(Conversation.queue_id == bindparam("queue")))
_ANY_WAITING_IN = _A_WAITING.where(col(Conversation.queue_id).in_(bindparam("queues", expanding=True)))
_WAITING_FIRST = Fast(
    select(Conversation.id, Conversation.queue_id, Conversation.enqueued_at)
    .where(Conversation.status == "queued", Conversation.queue_id == bindparam("queue"), _NOT_OFFERED)
    .order_by(col(Conversation.enqueued_at), col(Conversation.id))
    .limit(bindparam("limit"))
)
_WAITING_AFTER = Fast(
    _WAITING_FIRST.stmt.where(
        (col(Conversation.enqueued_at) > bindparam("at"))
        | ((col(Conversation.enqueued_at) == bindparam("at")) & (col(Conversation.id) > bindparam("id")))
    )
)


class Waiting(Protocol):
    """What an offer needs of its conversation (a Conversation, or a waiting-page row)."""

    @property
    def id(self) -> str: ...
    @property
    def queue_id(self) -> str: ...
    @property
    def enqueued_at(self) -> datetime: ...


class _WaitingRow(NamedTuple):
    id: str
    queue_id: str
    enqueued_at: datetime


def make_offer(
    tx: Tx,
    conv: Waiting,
    session_id: str,
    agent_id: str,
    now: datetime,
    invite_payload: dict[str, Any] | None = None,
) -> str:
    """Offer conv to the agent's session (Core statements: this runs for every chat routed). Returns its id."""
    c = tx.conn
    offer_id = uuid.uuid4().hex
    kind = "invite" if invite_payload else "chat"
    expires_at = now + timedelta(seconds=tx.settings.offer_timeout)
    row = {
        "id": offer_id,
        "session_id": session_id,
        "agent_id": agent_id,
        "conversation_id": conv.id,
        "kind": kind,
        "invite_id": invite_payload["invite_id"] if invite_payload else None,
        "status": "pending",
        "created_at": now,
        "expires_at": expires_at,
    }
    pg = c.dialect.name == "postgresql"
    payload = {
        "offer_id": offer_id,
        "kind": "OFFER_KIND_INVITE" if invite_payload else "OFFER_KIND_CHAT",
        "conversation_id": conv.id,
        "queue": queue_json(tx.session, conv.queue_id),
        "variables": [] if pg else variables_json(variables(tx.session, conv.id)),  # PostgreSQL: read below
        "enqueue_time": ts(conv.enqueued_at),
        "waiting_time": f"{(now - conv.enqueued_at).total_seconds():.6f}s",
        "create_time": ts(now),
        "expire_time": ts(expires_at),
    }
    if invite_payload:
        payload["invite"] = invite_payload
    if pg:
        # The chat's variables, the offer, its session's feed seq (and idle clock) and the feed entry in one
        # statement: offers are made under the cluster's routing lock, where every round trip holds up every
        # node's routing. The variables are spliced into the entry where the empty list stands.
        head, tail = json_around(payload, "variables", [])
        seq, found_variables = c.execute(_PG_OFFER_WITH_FEED, {**row, "head": head, "tail": tail}).one()
        payload["variables"] = json.loads(found_variables)
        if tx.check_event is not None:
            tx.check_event("offer", "offer", payload)
        feed_stored(tx, session_id, seq, "offer", payload, now)
    else:
        _INSERT_OFFER.run(c, row)
        take_seats(tx, agent_id, 1)
        append_feed(tx, session_id, "offer", payload, now, also={"last_offer_at": now})
    tx.schedule(expires_at, expire_offer, offer_id)
    tx.count("offers_made", kind=kind)
    tx.log("offer.made", offer_id=offer_id, kind=kind, conversation_id=conv.id, agent_id=agent_id)
    return offer_id


_INSERT_OFFER = Fast(insert(Offer))
_PG_OFFER_WITH_FEED = text(
    "WITH found AS ("
    " SELECT coalesce(json_agg(json_build_object('name', name, 'value', value, 'authenticated', authenticated)"
    "  ORDER BY name), '[]')::text AS variables"
    " FROM customer_variable WHERE conversation_id = :conversation_id"
    "), made AS ("
    " INSERT INTO offer (id, session_id, agent_id, conversation_id, kind, invite_id, status, created_at, expires_at)"
    " VALUES (:id, :session_id, :agent_id, :conversation_id, :kind, :invite_id, :status, :created_at, :expires_at)"
    "), claim AS ("
    " UPDATE agent_session SET feed_seq = feed_seq + 1, last_offer_at = :created_at WHERE id = :session_id"
    " RETURNING feed_seq"
    "), seat AS ("
    " UPDATE agent SET load = load + 1 WHERE id = :agent_id"
    "), entry AS ("
    " INSERT INTO agent_feed_event (session_id, seq, kind, created_at, payload)"
    " SELECT :session_id, claim.feed_seq, 'offer', :created_at, :head || found.variables || :tail FROM claim, found"
    " RETURNING seq"
    ") SELECT entry.seq, found.variables FROM entry, found"
).bindparams(  # aware UTC, as the ORM binds them
    bindparam("created_at", type_=UTCDateTime()),
    bindparam("expires_at", type_=UTCDateTime()),
)


def close_offer(tx: Tx, offer: Offer, state: str, now: datetime, reason: str | None = None) -> None:
    """Record the outcome on the offer and on its session's feed. An accepted offer's seat stays taken: the
    agent joins the conversation in the same write (accept_offer, invites.on_accepted). Any other outcome
    gives the seat back, and routing looks where that can make work: the queues of the agent's live
    sessions' profiles, and the chat's own queue if it is waiting again (usually one queue in all)."""
    # A Core UPDATE (every chat's offer ends here), and the loaded object told, so no flush repeats it.
    _CLOSE_OFFER.run(tx.conn, {"offer": offer.id, "state": state, "at": now, "reason": reason})
    if state != "accepted":
        take_seats(tx, offer.agent_id, -1)
        tx.needs_dispatch(_GIVEN_BACK.run(tx.conn, {"agent": offer.agent_id, "conv": offer.conversation_id}).scalars())
    set_committed_value(offer, "status", state)
    set_committed_value(offer, "resolved_at", now)
    set_committed_value(offer, "withdraw_reason", reason)
    update = {"offer_id": offer.id, "state": _OFFER_STATES[state]}
    if reason:
        update["withdraw_reason"] = _WITHDRAW_REASONS[reason]
    append_feed(tx, offer.session_id, "offer_update", update, now)
    tx.count("offers", outcome=state, kind=offer.kind)
    tx.observe("offer_answer_seconds", (now - offer.created_at).total_seconds(), outcome=state)
    ids = {"offer_id": offer.id, "conversation_id": offer.conversation_id, "agent_id": offer.agent_id}
    tx.log(f"offer.{state}", **ids, reason=reason)


def take_seats(tx: Tx, agent_id: str, n: int) -> None:
    """Keep agent.load: n seats taken (an offer made, a conversation joined) or, negative, given back."""
    _TAKE_SEATS.run(tx.conn, {"agent": agent_id, "n": n})


def release_seats(tx: Tx, conversation_id: str) -> None:
    """An active conversation closes: each agent still in it has a seat back."""
    _RELEASE_SEATS.run(tx.conn, {"conv": conversation_id})


_TAKE_SEATS = Fast(
    update(Agent).where(col(Agent.id) == bindparam("agent")).values(load=col(Agent.load) + bindparam("n"))
)
_IN_IT = (col(Participant.conversation_id) == bindparam("conv"), col(Participant.left_at).is_(None))
# A seat per row, as agent_loads counts them (one row per agent is the rule; a count keeps the two agreeing).
_RELEASE_SEATS = Fast(
    update(Agent)
    .where(col(Agent.id).in_(select(Participant.agent_id).where(*_IN_IT)))
    .values(
        load=col(Agent.load)
        - select(func.count()).where(*_IN_IT, col(Participant.agent_id) == col(Agent.id)).scalar_subquery()
    )
)


_CLOSE_OFFER = Fast(
    update(Offer)
    .where(col(Offer.id) == bindparam("offer"))
    .values(status=bindparam("state"), resolved_at=bindparam("at"), withdraw_reason=bindparam("reason"))
)


def _own_pending_offer(tx: Tx, who: AgentPrincipal, offer_id: str, answer: str) -> Offer | None:
    """The caller's offer if still pending; None if already answered the same way (a retry)."""
    offer = get(tx.session, Offer, offer_id) if offer_id else None
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
    close_offer(tx, offer, "accepted", now)
    if offer.kind == "invite":
        invites.on_accepted(tx, offer, conv, must_get(s, Agent, who.agent_id), now)
    else:
        _JOIN.run(tx.conn, {"conversation_id": conv.id, "agent_id": who.agent_id, "joined_at": now})  # the offer's seat
        append_event(
            tx,
            conv,
            "participant_joined",
            {"participant": agent_view(s, who.agent_id).to_json()},
            actor=f"agent:{who.agent_id}",
            now=now,
            also={"status": "active"},
        )
        tx.queue_changed(conv.queue_id)
        tx.observe("chat_wait_seconds", (now - conv.enqueued_at).total_seconds(), queue=conv.queue_id)
    return conversation_view(s, conv)


_JOIN = Fast(insert(Participant))


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
    if _ANY_PENDING.run(tx.conn, {"c": conversation_id}).first() is None:
        return  # the common case at a close: a Core look, no ORM query
    for offer in tx.session.exec(
        select(Offer).where(Offer.conversation_id == conversation_id, Offer.status == "pending")
    ).all():
        close_offer(tx, offer, "withdrawn", now, reason)
        if offer.kind == "invite":
            invites.on_offer_closed(tx, offer, "withdrawn", now)


_ANY_PENDING = Fast(select(Offer.id).where(Offer.conversation_id == bindparam("c"), Offer.status == "pending").limit(1))


def _give_back(tx: Tx, offer: Offer, state: str, now: datetime, reason: str | None = None) -> None:
    """Reject, time-out or withdrawal: a chat keeps its place in the queue and goes to the next agent."""
    close_offer(tx, offer, state, now, reason)
    if offer.kind == "invite":
        invites.on_offer_closed(tx, offer, state, now)


_GIVEN_BACK = Fast(
    core_select(col(ProfileQueue.queue_id))
    .join(AgentSession, col(AgentSession.profile_id) == ProfileQueue.profile_id)
    .where(col(AgentSession.agent_id) == bindparam("agent"), col(AgentSession.ended_at).is_(None))
    .union(
        core_select(col(Conversation.queue_id)).where(
            col(Conversation.id) == bindparam("conv"), col(Conversation.status) == "queued"
        )
    )
)
