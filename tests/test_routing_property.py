"""Routing invariants over random sequences of writes (hypothesis, stateful), on the bare harness.

After every step:
1. no conversation has more than one pending chat offer (nor more than one pending invite offer);
   chat offers are pending only for queued conversations, invite offers only for active ones;
2. no agent's open conversations plus pending offers exceed its max_chats;
3. work conservation: no queued chat without a pending offer while an eligible agent has room
   (logged in, ready, offer stream open, profile with the chat's queue, load below max_chats;
   the cool-down only orders agents, it never leaves a chat unoffered);
4. (checked after every write that made offers, timers included) each new offer went to an agent
   eligible for it: live session, ready, stream open, a profile with the queue for a chat offer or
   a queue invite, and never to someone already in the conversation;
5. every pending offer is on a live session, with its expiry timer armed and not yet due;
6. an answered offer stays as it was answered (a late timer, a retry, changes nothing);
7. each agent's kept load (agent.load) is its open conversations plus pending offers, as counted.

Every write runs a millisecond after the one before, so ties (same enqueue time, same last offer)
never leave the outcome to random ids, and hypothesis can replay and shrink a failing run.
The routing order (which agent, which chat first) is test_routing_rules.py's business.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bare import Bare, schedules
from sqlalchemy import text

from queuechat.domain import agents, conversations, invites, routing
from queuechat.domain.views import AgentPrincipal, CustomerPrincipal
from queuechat.errors import ChatError

# hypothesis comes with the test extra; a machine set up before it was added skips rather than fails.
pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule  # noqa: E402

AGENTS = ("agent1", "agent2", "agent3", "agent4")
MAX_CHATS = {"agent1": 1, "agent2": 2, "agent3": 2, "agent4": 4}
PROFILES = ("both", "sales", "support")
QUEUES = ("sales", "support")
SETTINGS = {"offer_timeout": 10.0, "reject_cooldown": 20.0, "stream_grace": 3.0}
TICK = timedelta(milliseconds=1)

agent_ids = st.sampled_from(AGENTS)
indexes = st.integers(min_value=0, max_value=50)


class RoutingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="queuechat-prop-"))
        # Payloads are checked against chat.v1 by the other tests; here that would be 10% of the time.
        self.b = Bare(self.dir / "routing.db", max_chats=MAX_CHATS, settings=SETTINGS, check_events=False)
        self.who: dict[str, AgentPrincipal] = {}  # each agent's live session
        self.streams: dict[str, int] = {}  # open offer streams per live session
        self.convs: list[str] = []  # in creation order
        # What the last check saw, for the rules' preconditions and choices (all in a replayable order).
        self.offers: list[tuple[str, str, str, str, str]] = []  # (offer, session, agent, conversation, kind)
        self.open_convs: list[str] = []  # customer still there
        self.queued = 0
        self.staffed: list[tuple[str, list[str]]] = []  # active conversations and their logged-in members
        self.invites: list[tuple[str, str]] = []  # pending (invite, inviter)
        # Every write (timers included) is checked for the offers it made, before anything else runs.
        self.known: set[str] = set()
        self.answered: dict[str, str] = {}  # offer -> how it was answered (or withdrawn)
        self._run = self.b.run
        self.b.run = self.run_and_check  # type: ignore[method-assign]

    def teardown(self) -> None:
        self.b.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # --- running writes ------------------------------------------------------

    def tick(self) -> None:
        """A millisecond passes; timers that came due run first."""
        self.b.now += TICK
        self.b.fire_due()

    def write(self, fn: Any, *args: Any) -> Any:
        self.tick()
        try:
            return self.b.write(fn, *args)
        except ChatError:
            return None  # a refusal: rolled back, nothing changed

    def run_and_check(self, fn: Any, *args: Any, now: Any = None) -> Any:
        result, effects = self._run(fn, *args, now=now)
        if schedules(effects, routing.expire_offer):  # it made offers
            self.check_new_offers()
        return result, effects

    def check_new_offers(self) -> None:
        """4. The offers a write made went to agents eligible for them when it committed."""
        rows = self.rows(
            "SELECT o.id, o.agent_id, o.kind, coalesce(i.queue_id, c.queue_id), s.agent_id, s.ready, s.stream_count,"
            " s.ended_at, (SELECT count(*) FROM profile_queue pq WHERE pq.profile_id = s.profile_id"
            "  AND pq.queue_id = coalesce(i.queue_id, c.queue_id)),"
            " (SELECT count(*) FROM participant p WHERE p.conversation_id = c.id AND p.agent_id = o.agent_id"
            "  AND p.left_at IS NULL),"
            " i.queue_id IS NOT NULL"
            " FROM offer o JOIN agent_session s ON s.id = o.session_id JOIN conversation c ON c.id = o.conversation_id"
            " LEFT JOIN invite i ON i.id = o.invite_id WHERE o.status = 'pending'"
        )
        for (
            offer_id,
            agent_id,
            kind,
            queue_id,
            session_agent,
            ready,
            streams,
            ended,
            in_profile,
            member,
            by_queue,
        ) in rows:
            if offer_id in self.known:
                continue
            self.known.add(offer_id)
            assert session_agent == agent_id and ended is None, f"{kind} offer to {agent_id} on another session"
            assert ready and streams > 0, f"{kind} offer to {agent_id}, not ready or without an offer stream"
            assert not member, f"{kind} offer to {agent_id}, already in the conversation"
            if kind == "chat" or by_queue:  # a chat, or an invite to a queue: the profile must have it
                assert in_profile, f"{kind} offer in {queue_id} to {agent_id}, whose profile lacks it"

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.b.engine.connect() as c:
            return list(c.execute(text(sql), params))

    # --- set-up ----------------------------------------------------------------

    @initialize(
        staff=st.lists(
            st.tuples(agent_ids, st.sampled_from(PROFILES)), min_size=1, max_size=4, unique_by=lambda t: t[0]
        ),
        queues=st.lists(st.sampled_from(QUEUES), max_size=4),
        accept=st.lists(st.booleans(), max_size=4),
    )
    def open_for_business(self, staff, queues, accept):
        """Agents log in ready with a stream, customers arrive, some offers are accepted: most runs
        start with conversations in progress."""
        for agent, profile in staff:
            self.login(agent, profile, True, True)
        for queue in queues:
            self.start_chat(queue)
        order = {c: i for i, c in enumerate(self.convs)}
        offers = sorted(self.b.pending(kind="chat"), key=lambda o: order[o.conversation_id])
        for offer, yes in zip(offers, accept, strict=False):
            if yes:
                self.write(routing.accept_offer, self.who[offer.agent_id], offer.id)

    # --- customers -----------------------------------------------------------

    @precondition(lambda self: self.queued < 4)  # short queues leave room for invites
    @rule(queue=st.sampled_from(QUEUES))
    def start_chat(self, queue):
        view = self.write(conversations.start_chat, queue, "", {}, {})
        self.convs.append(view.id)

    @precondition(lambda self: self.open_convs)
    @rule(i=indexes)
    def customer_ends_chat(self, i):
        c = self.open_convs[i % len(self.open_convs)]
        self.write(conversations.end_chat, CustomerPrincipal(c), c)

    # --- agents --------------------------------------------------------------

    @rule(agent=agent_ids, profile=st.sampled_from(PROFILES), ready=st.booleans(), stream=st.booleans())
    def login(self, agent, profile, ready, stream):
        self.tick()
        who = self.b.login(agent, profile, ready=ready)
        if agent in self.who:
            self.streams.pop(self.who[agent].session_id, None)
        self.who[agent] = who
        self.streams[who.session_id] = 0
        if stream:
            self.presence(agent, "open_stream")

    @precondition(lambda self: self.who)
    @rule(agent=agent_ids, action=st.sampled_from(("open_stream", "close_stream", "ready", "not_ready", "logout")))
    def presence(self, agent, action):
        who = self.who.get(agent)
        if who is None:
            return
        sid = who.session_id
        if action == "open_stream":
            self.streams[sid] += 1
            self.write(agents.stream_opened, sid)
        elif action == "close_stream" and self.streams[sid] > 0:
            self.streams[sid] -= 1
            self.write(agents.stream_closed, sid)
        elif action in ("ready", "not_ready"):
            self.write(agents.set_ready, who, action == "ready")
        elif action == "logout":
            del self.who[agent], self.streams[sid]
            self.write(agents.logout, who)

    @precondition(lambda self: any(self.streams.get(o[1]) for o in self.offers))
    @rule(i=indexes)
    def connection_drops(self, i):
        """An agent holding offers loses its offer streams: the offers stay for the grace period only."""
        holders = sorted({o[2] for o in self.offers if self.streams.get(o[1])})
        sid = self.who[holders[i % len(holders)]].session_id
        while self.streams[sid] > 0:
            self.streams[sid] -= 1
            self.write(agents.stream_closed, sid)

    # --- offers --------------------------------------------------------------

    @precondition(lambda self: self.offers)
    @rule(answers=st.lists(st.sampled_from(("accept", "reject", "wait")), min_size=1, max_size=6))
    def agents_answer(self, answers):
        """The pending offers (as last seen, in order) are answered: accepted, rejected or left."""
        for (offer_id, session_id, agent_id, _, _), answer in zip(self.offers, answers, strict=False):
            if answer == "wait" or agent_id not in self.who:
                continue
            who = self.who[agent_id]
            assert who.session_id == session_id, "a pending offer on a session that is not the agent's live one"
            still_pending = self.b.offer(offer_id).status == "pending"
            self.write(routing.accept_offer if answer == "accept" else routing.reject_offer, who, offer_id)
            if still_pending:
                assert self.b.offer(offer_id).status != "pending", f"{answer} left the offer pending"

    @precondition(lambda self: self.offers)
    @rule(i=indexes)
    def an_offer_times_out(self, i):
        offer_id = self.offers[i % len(self.offers)][0]
        self.b.now = max(self.b.now, self.b.offer(offer_id).expires_at)
        self.b.fire_due()
        assert self.b.offer(offer_id).status != "pending"

    @rule(seconds=st.sampled_from((0.5, 2.0, 4.0, 11.0, 25.0)))
    def time_passes(self, seconds):
        self.b.now += timedelta(seconds=seconds)
        self.b.fire_due()

    # --- conversations -------------------------------------------------------

    @precondition(lambda self: self.staffed)
    @rule(i=indexes, j=indexes, action=st.sampled_from(("close", "leave", "cancel_invite")))
    def agent_acts(self, i, j, action):
        """A member of an active conversation closes or leaves it, or cancels the invite it sent."""
        c, members = self.staffed[i % len(self.staffed)]
        who = self.who[members[j % len(members)]]
        if action == "close":
            self.write(conversations.close, who, c, True)
        elif action == "leave":
            self.write(conversations.leave, who, c)
        else:
            pending = [invite_id for invite_id, inviter in self.invites if inviter == who.agent_id]
            if pending:
                self.write(invites.cancel_invite, who, pending[0])

    @precondition(lambda self: self.staffed)
    @rule(
        i=indexes,
        j=indexes,
        to=st.one_of(agent_ids.map(lambda a: (a, "")), st.sampled_from(QUEUES).map(lambda q: ("", q))),
    )
    def agent_invites(self, i, j, to):
        """A member invites an agent by name, or anyone free in a queue."""
        c, members = self.staffed[i % len(self.staffed)]
        self.write(invites.invite_agent, self.who[members[j % len(members)]], c, "", *to)

    # --- invariants ----------------------------------------------------------

    @invariant()
    def routing_invariants(self):
        b = self.b
        order = {c: i for i, c in enumerate(self.convs)}
        sessions = {
            r[0]: r
            for r in self.rows(
                "SELECT id, agent_id, profile_id, ready, stream_count, ended_at, stream_lost_at FROM agent_session"
            )
        }
        offers = sorted(
            (
                tuple(r)
                for r in self.rows(
                    "SELECT id, session_id, agent_id, conversation_id, kind FROM offer WHERE status = 'pending'"
                )
            ),
            key=lambda o: (order[o[3]], o[4], o[2]),
        )
        convs = {r[0]: r for r in self.rows("SELECT id, queue_id, status, customer_connected FROM conversation")}
        members = self.rows(
            "SELECT p.conversation_id, p.agent_id FROM participant p JOIN conversation c ON c.id = p.conversation_id"
            " WHERE p.left_at IS NULL AND c.status != 'closed' ORDER BY p.id"
        )
        queues_of: dict[str, set[str]] = {}
        for profile_id, queue_id in self.rows("SELECT profile_id, queue_id FROM profile_queue"):
            queues_of.setdefault(profile_id, set()).add(queue_id)
        members_of: dict[str, list[str]] = {}
        for c, agent in members:
            members_of.setdefault(c, []).append(agent)

        def max_chats(agent: str) -> int:
            return MAX_CHATS.get(agent, 3)

        # 1. one pending chat offer per conversation, for queued ones only; one pending invite offer.
        chat_offers = Counter(o[3] for o in offers if o[4] == "chat")
        invite_offers = Counter(o[3] for o in offers if o[4] == "invite")
        assert max(chat_offers.values(), default=0) <= 1, f"several pending chat offers: {chat_offers}"
        assert max(invite_offers.values(), default=0) <= 1, f"several pending invite offers: {invite_offers}"
        for c in chat_offers:
            assert convs[c][2] == "queued", f"a chat offer pending for a {convs[c][2]} conversation"
        for c in invite_offers:
            assert convs[c][2] == "active", f"an invite offer pending for a {convs[c][2]} conversation"

        # 2. capacity.
        load = Counter(m[1] for m in members) + Counter(o[2] for o in offers)
        for agent, n in load.items():
            assert n <= max_chats(agent), f"{agent} holds {n} > max_chats {max_chats(agent)}"

        # 7. agent.load, kept by the writes that change it, is what the rows count.
        for agent, kept in self.rows("SELECT id, load FROM agent"):
            assert kept == load[agent], f"{agent}: load {kept} kept, {load[agent]} counted"

        # 3. work conservation.
        eligible = [s for s in sessions.values() if s[5] is None and s[3] and s[4] > 0]
        for c, (_, queue_id, status, _) in convs.items():
            if status == "queued" and c not in chat_offers:
                idle = [s[1] for s in eligible if queue_id in queues_of.get(s[2], ()) and load[s[1]] < max_chats(s[1])]
                assert not idle, f"chat {c} in {queue_id} waits with no offer while {idle} have room"

        # 5. (4 is checked after every write) pending offers: on live sessions, timers armed and not yet due.
        armed = {args[0]: when for when, fn, args in b.timers if fn is routing.expire_offer}
        for offer_id, session_id, agent_id, _, _ in offers:
            assert sessions[session_id][5] is None, f"pending offer {offer_id} on an ended session of {agent_id}"
            assert offer_id in armed, f"pending offer {offer_id} has no expiry timer"
            assert armed[offer_id] > b.now, f"pending offer {offer_id} is past its expiry timer"
        for s in sessions.values():
            if s[5] is None and s[4] == 0 and s[6] is not None and any(o[1] == s[0] for o in offers):
                grace = any(fn is agents.grace_expired and args[0] == s[0] for _, fn, args in b.timers)
                assert grace, f"{s[1]} lost its stream with offers pending and no grace timer"

        # 6. an answered offer stays answered: a late timer or a second answer changes nothing.
        for offer_id, state in self.rows("SELECT id, status FROM offer WHERE status != 'pending'"):
            assert self.answered.setdefault(offer_id, state) == state, (
                f"offer {offer_id} was {self.answered[offer_id]}, is now {state}"
            )

        # What the rules choose from next.
        self.offers = offers
        self.open_convs = [c for c in self.convs if convs[c][2] != "closed" and convs[c][3]]
        self.queued = sum(1 for c in convs.values() if c[2] == "queued")
        self.staffed = [
            (c, live)
            for c in self.convs
            if convs[c][2] == "active" and (live := [m for m in members_of.get(c, ()) if m in self.who])
        ]
        self.invites = sorted(
            (
                tuple(r)
                for r in self.rows("SELECT id, inviter_id, conversation_id FROM invite WHERE status = 'pending'")
            ),
            key=lambda r: order[r[2]],
        )
        self.invites = [(r[0], r[1]) for r in self.invites]


# About 12 s of CPU: most of it is the writes themselves (~5 ms each, dispatch included).
RoutingMachine.TestCase.settings = settings(
    max_examples=80,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_routing_invariants = RoutingMachine.TestCase
