"""Routing rules on a bare transaction (tests/bare.py): no server, no event loop, a clock of our own.

Longest idle first, oldest chat first, capacity, eligibility, cool-down, offer time-outs, invite
targets, and one dispatch at the end of a write.
"""

from __future__ import annotations

from datetime import timedelta
from itertools import count

import pytest
from bare import T0, Bare, schedules
from features_helpers import SUPERVISOR, with_supervisors
from harness import base_config
from sqlmodel import func, select

from queuechat.domain import agents, conversations, invites, routing, supervision
from queuechat.errors import ChatError
from queuechat.store.models import Conversation, Invite, Offer, Participant


def at(seconds: float):
    return T0 + timedelta(seconds=seconds)


@pytest.fixture
def make(tmp_path):
    made: list[Bare] = []
    n = count()

    def make(**kw) -> Bare:
        b = Bare(tmp_path / f"routing{next(n)}.db", **kw)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture
def bare(make) -> Bare:
    return make()


def refused(reason: str, b: Bare, fn, *args, **kw) -> ChatError:
    with pytest.raises(ChatError) as e:
        b.write(fn, *args, **kw)
    assert e.value.reason == reason, f"expected {reason}, got {e.value.reason}: {e.value.message}"
    return e.value


def enqueued_at(b: Bare, conversation_id: str):
    return b.read(lambda s: s.get(Conversation, conversation_id).enqueued_at)


def status(b: Bare, conversation_id: str) -> str:
    return b.read(lambda s: s.get(Conversation, conversation_id).status)


# --- longest idle first --------------------------------------------------------


def test_the_agent_idle_longest_gets_the_next_chat(bare):
    b = bare
    a1 = b.agent("agent1", now=at(0))
    a2 = b.agent("agent2", now=at(1))
    c1 = b.chat(now=at(10))
    assert b.offered_to(c1) == "agent1"  # idle since 0, agent2 since 1
    assert b.session(a1.session_id).last_offer_at == at(10)
    # agent1's last offer (10) is now more recent than agent2's login (1): not the first to log in wins.
    c2 = b.chat(now=at(20))
    assert b.offered_to(c2) == "agent2"
    assert b.session(a2.session_id).last_offer_at == at(20)
    # Answering does not make an agent idle: agent1's last offer (10) is still the oldest.
    b.accept(a1, b.pending(c1)[0].id)
    c3 = b.chat(now=at(30))
    assert b.offered_to(c3) == "agent1"


def test_one_dispatch_spreads_chats_by_idleness(bare):
    """Offers made within one dispatch count at once: three chats go to three agents, not all to one."""
    b = bare
    who = {i: b.login(f"agent{i}", now=at(i - 1)) for i in (1, 2, 3)}
    chats = [b.chat(now=at(10 + i)) for i in range(3)]
    assert [b.offered_to(c) for c in chats] == [None, None, None]

    def open_all(tx):
        for i in (3, 2, 1):
            agents.stream_opened(tx, who[i].session_id)

    b.write(open_all, now=at(20))
    assert [b.offered_to(c) for c in chats] == ["agent1", "agent2", "agent3"]


@pytest.mark.parametrize("first", ["agent1", "agent2"])
def test_ties_on_last_offer_go_to_the_older_session(bare, first):
    """Both got an offer in one dispatch (same last_offer_at): the session created first wins,
    whichever row was written first."""
    b = bare
    created = {"agent1": at(0), "agent2": at(5)}
    second = "agent2" if first == "agent1" else "agent1"
    who = {a: b.agent(a, ready=False, now=created[a]) for a in (first, second)}
    c1, c2 = b.chat(now=at(6)), b.chat(now=at(7))

    def both_ready(tx):
        agents.set_ready(tx, who[first], True)
        agents.set_ready(tx, who[second], True)

    b.write(both_ready, now=at(10))
    assert {b.offered_to(c1), b.offered_to(c2)} == {"agent1", "agent2"}
    assert b.session(who["agent1"].session_id).last_offer_at == b.session(who["agent2"].session_id).last_offer_at
    c3 = b.chat(now=at(20))
    assert b.offered_to(c3) == "agent1"


# --- oldest chat first ---------------------------------------------------------


def test_the_oldest_waiting_chat_goes_first(make):
    b = make(max_chats={"agent1": 1})
    chats = [b.chat(now=at(i)) for i in range(4)]
    a1 = b.agent("agent1", now=at(10))
    served = []
    for t in range(4):
        [offer] = b.pending(agent_id="agent1")
        served.append(offer.conversation_id)
        b.accept(a1, offer.id)
        b.write(conversations.close, a1, offer.conversation_id, True, now=at(20 + t))
    assert served == chats


def test_a_rejected_chat_keeps_its_place(make):
    b = make(max_chats={"agent1": 1})
    a1 = b.agent("agent1", now=at(0))
    c1 = b.chat(now=at(1))
    c2 = b.chat(now=at(2))
    assert (b.offered_to(c1), b.offered_to(c2)) == ("agent1", None)
    b.reject(a1, b.pending(c1)[0].id)
    # The only agent: c1 comes back to it (cool-down or not) ahead of c2, its place unchanged.
    assert enqueued_at(b, c1) == at(1)
    assert (b.offered_to(c1), b.offered_to(c2)) == ("agent1", None)


def test_a_rejected_chat_goes_to_another_agent_ahead_of_later_chats(make):
    b = make(max_chats={"agent1": 1, "agent2": 1})
    a1 = b.agent("agent1", now=at(0))
    a2 = b.agent("agent2", ready=False, now=at(1))
    c1, c2, c3 = (b.chat(now=at(t)) for t in (2, 3, 4))
    assert b.offered_to(c1) == "agent1"
    offer = b.pending(c1)[0]

    def reject_and_ready(tx):
        routing.reject_offer(tx, a1, offer.id)
        agents.set_ready(tx, a2, True)

    b.write(reject_and_ready, now=at(5))
    # c1 is still the oldest: it goes first, to agent2 (agent1 is cooling); agent1 gets c2.
    assert (b.offered_to(c1), b.offered_to(c2), b.offered_to(c3)) == ("agent2", "agent1", None)
    assert enqueued_at(b, c1) == at(2)


# --- capacity ------------------------------------------------------------------


def test_pending_offers_count_against_capacity(make):
    b = make(max_chats={"agent1": 2})
    a1 = b.agent("agent1", now=at(0))
    c1, c2, c3 = (b.chat(now=at(t)) for t in (1, 2, 3))
    assert (b.offered_to(c1), b.offered_to(c2), b.offered_to(c3)) == ("agent1", "agent1", None)
    assert b.loads(["agent1"]) == {"agent1": 2}
    # Accepting turns an offer into a conversation: the load stays at 2, nothing more is offered.
    b.accept(a1, b.pending(c1)[0].id)
    b.accept(a1, b.pending(c2)[0].id)
    assert b.loads(["agent1"]) == {"agent1": 2}
    assert b.offered_to(c3) is None
    # Still nothing when routing runs for another reason.
    b.write(agents.set_ready, a1, True, now=at(4))
    assert b.offered_to(c3) is None and b.loads(["agent1"]) == {"agent1": 2}
    # Closing one frees a slot: c3 follows in the same write.
    b.write(conversations.close, a1, c1, True, now=at(5))
    assert b.offered_to(c3) == "agent1"
    assert b.loads(["agent1"]) == {"agent1": 2}


def test_an_agent_at_capacity_gets_nothing_while_others_do(make):
    b = make(max_chats={"agent1": 1, "agent2": 3})
    a1 = b.agent("agent1", now=at(0))  # idle longest, but full after one
    b.agent("agent2", now=at(50))
    chats = [b.chat(now=at(100 + t)) for t in range(3)]
    assert [b.offered_to(c) for c in chats] == ["agent1", "agent2", "agent2"]
    b.accept(a1, b.pending(chats[0])[0].id)
    c4 = b.chat(now=at(200))
    assert b.offered_to(c4) == "agent2"
    c5 = b.chat(now=at(201))
    assert b.offered_to(c5) is None
    assert b.loads(["agent1", "agent2"]) == {"agent1": 1, "agent2": 3}


def test_a_pending_invite_counts_against_capacity(make):
    b = make(max_chats={"agent2": 1})
    a1 = b.agent("agent1", profile="support", now=at(0))
    c1 = b.chat("support", now=at(1))
    b.accept(a1, b.pending(c1)[0].id)
    a2 = b.agent("agent2", now=at(2))
    b.write(invites.invite_agent, a1, c1, "", "agent2", "", now=at(3))
    [inv] = b.pending(agent_id="agent2")
    assert inv.kind == "invite"
    # agent2 is the only agent for sales, and its one slot holds the invite.
    c2 = b.chat("sales", now=at(4))
    assert b.offered_to(c2) is None
    assert b.loads(["agent2"]) == {"agent2": 1}
    # Declining the invite frees the slot: the chat follows in the same write.
    b.reject(a2, inv.id)
    assert b.offered_to(c2) == "agent2"


# --- who is eligible -----------------------------------------------------------


def test_an_agent_not_ready_gets_nothing_until_ready(bare):
    b = bare
    a1 = b.agent("agent1", ready=False, now=at(0))
    c1 = b.chat(now=at(1))
    assert b.offered_to(c1) is None
    b.write(agents.set_ready, a1, True, now=at(2))
    assert b.offered_to(c1) == "agent1"


def test_an_agent_without_an_offer_stream_gets_nothing_until_it_opens_one(bare):
    b = bare
    a1 = b.login("agent1", now=at(0))
    c1 = b.chat(now=at(1))
    assert b.offered_to(c1) is None
    b.write(agents.stream_opened, a1.session_id, now=at(2))
    assert b.offered_to(c1) == "agent1"
    # Its stream closes: it keeps the offer (grace) but gets no new one.
    b.write(agents.stream_closed, a1.session_id, now=at(3))
    c2 = b.chat(now=at(4))
    assert b.offered_to(c2) is None
    assert b.offered_to(c1) == "agent1"


def test_an_agent_whose_profile_lacks_the_queue_gets_nothing(bare):
    b = bare
    b.agent("agent1", profile="support", now=at(0))
    c1 = b.chat("sales", now=at(1))
    assert b.offered_to(c1) is None
    c2 = b.chat("support", now=at(2))
    assert b.offered_to(c2) == "agent1"
    b.agent("agent2", profile="sales", now=at(3))
    assert b.offered_to(c1) == "agent2"


def test_a_logged_out_agent_gets_nothing_and_its_offers_go_back(bare):
    b = bare
    a1 = b.agent("agent1", now=at(0))
    c1 = b.chat(now=at(1))
    assert b.offered_to(c1) == "agent1"
    b.write(agents.logout, a1, now=at(2))
    assert b.offered_to(c1) is None
    assert b.read(lambda s: [o.status for o in s.exec(select(Offer).where(Offer.conversation_id == c1))]) == [
        "withdrawn"
    ]
    b.agent("agent2", now=at(3))
    assert b.offered_to(c1) == "agent2"


# --- cool-down -----------------------------------------------------------------


def _give_back(b: Bare, how: str, who, offer_id: str, now):
    if how == "reject":
        b.write(routing.reject_offer, who, offer_id, now=now)
    else:
        b.write(routing.expire_offer, offer_id, now=now)


@pytest.mark.parametrize("how", ["reject", "expire"])
@pytest.mark.parametrize(("second_at", "expected"), [(20, "agent3"), (42.9, "agent3"), (50, "agent1")])
def test_cool_down(make, how, second_at, expected):
    """agent1 gives c1 back at 13: it is passed over for c1 for reject_cooldown (30 s) while
    agent3 is eligible, then is the one idle longest again."""
    b = make(settings={"reject_cooldown": 30.0, "offer_timeout": 300.0})
    w = {i: b.agent(f"agent{i}", now=at(i - 1)) for i in (1, 2, 3)}
    c1 = b.chat(now=at(10))
    assert b.offered_to(c1) == "agent1"
    for i, t in ((2, 11), (3, 12)):  # agent2 and agent3 get a chat each: agent1 is idle longest
        c = b.chat(now=at(t))
        assert b.offered_to(c) == f"agent{i}"
        b.accept(w[i], b.pending(c)[0].id)
    _give_back(b, how, w[1], b.pending(c1)[0].id, at(13))
    assert b.offered_to(c1) == "agent2"  # not agent1, idle longest but cooling
    # agent2 gives it back too: agent1 (idle since 10) vs agent3 (since 12).
    _give_back(b, how, w[2], b.pending(c1)[0].id, at(second_at))
    assert b.offered_to(c1) == expected


def test_cool_down_is_per_chat(bare):
    b = bare
    a1 = b.agent("agent1", now=at(0))
    a2 = b.agent("agent2", now=at(1))
    c1 = b.chat(now=at(10))
    c = b.chat(now=at(11))
    b.accept(a2, b.pending(c)[0].id)  # agent2 last offered at 11
    b.reject(a1, b.pending(c1)[0].id)
    assert b.offered_to(c1) == "agent2"
    # A different chat: agent1 (idle since 10) is not cooling for it.
    c2 = b.chat(now=at(12))
    assert b.offered_to(c2) == "agent1"


def test_a_cooling_agent_gets_the_chat_again_if_it_is_the_only_one(bare):
    b = bare
    a1 = b.agent("agent1", now=at(0))
    b.agent("agent2", profile="support", now=at(1))  # eligible for support only
    c1 = b.chat(now=at(10))
    first = b.pending(c1)[0]
    b.write(routing.reject_offer, a1, first.id, now=at(11))
    [again] = b.pending(c1)
    assert again.agent_id == "agent1" and again.id != first.id
    assert b.offer(first.id).status == "rejected"


def test_a_withdrawn_offer_does_not_cool(bare):
    """Only a reject or a time-out cools; an offer withdrawn because the agent went away does not."""
    b = bare
    w = {i: b.agent(f"agent{i}", now=at(i - 1)) for i in (1, 2, 3)}
    c1 = b.chat(now=at(10))
    assert b.offered_to(c1) == "agent1"
    for i, t in ((2, 11), (3, 12)):
        c = b.chat(now=at(t))
        b.accept(w[i], b.pending(c)[0].id)
    # agent1's stream drops past the grace period: c1 is withdrawn and goes to agent2.
    b.write(agents.stream_closed, w[1].session_id, now=at(13))
    b.now = at(14)
    assert b.fire_due() == 1
    assert b.offered_to(c1) == "agent2"
    b.write(agents.stream_opened, w[1].session_id, now=at(15))
    # agent2 rejects: agent1 (last offered 10) is not cooling, and idler than agent3 (12).
    b.reject(w[2], b.pending(c1)[0].id, now=at(16))
    assert b.offered_to(c1) == "agent1"


# --- time-outs -----------------------------------------------------------------


def test_an_offer_arms_its_timer(make):
    b = make(settings={"offer_timeout": 12.5})
    b.agent("agent1", now=at(0))
    (view, effects) = b.run(conversations.start_chat, "sales", "", {}, {}, now=at(3))
    [offer] = b.pending(view.id)
    assert offer.expires_at == at(3 + 12.5)
    assert schedules(effects) == [(at(15.5), routing.expire_offer, (offer.id,))]


def test_a_timed_out_offer_goes_to_another_agent_in_the_same_write(make):
    b = make(settings={"offer_timeout": 12.5})
    b.agent("agent1", now=at(0))
    b.agent("agent2", now=at(1))
    c1 = b.chat(now=at(3))
    first = b.pending(c1)[0]
    assert first.agent_id == "agent1"
    _, effects = b.run(routing.expire_offer, first.id, now=at(15.5))
    first = b.offer(first.id)
    assert (first.status, first.resolved_at) == ("timed_out", at(15.5))
    [second] = b.pending(c1)
    assert second.agent_id == "agent2" and second.expires_at == at(28)
    assert schedules(effects) == [(at(28), routing.expire_offer, (second.id,))]
    assert enqueued_at(b, c1) == at(3)


def test_the_timer_fires_through_the_harness(make):
    b = make(settings={"offer_timeout": 10.0})
    b.agent("agent1", now=at(0))
    b.agent("agent2", now=at(1))
    c1 = b.chat(now=at(2))
    b.now = at(11.9)
    assert b.fire_due() == 0 and b.offered_to(c1) == "agent1"
    b.now = at(12)
    assert b.fire_due() == 1 and b.offered_to(c1) == "agent2"


@pytest.mark.parametrize("answer", ["accepted", "rejected"])
def test_expiring_an_answered_offer_changes_nothing(make, answer):
    b = make(max_chats={"agent1": 1})
    a1 = b.agent("agent1", now=at(0))
    c1 = b.chat(now=at(1))
    offer = b.pending(c1)[0]
    if answer == "accepted":
        b.accept(a1, offer.id)
    else:
        b.agent("agent2", now=at(2))
        b.reject(a1, offer.id, now=at(3))
    before = (b.offer(offer.id).model_dump(), [o.model_dump() for o in b.pending()], status(b, c1))
    _, effects = b.run(routing.expire_offer, offer.id, now=at(1000))
    assert effects == ()
    assert (b.offer(offer.id).model_dump(), [o.model_dump() for o in b.pending()], status(b, c1)) == before
    assert b.offer(offer.id).status == answer


def test_an_offer_past_its_time_cannot_be_accepted_before_the_timer_runs(make):
    b = make(settings={"offer_timeout": 10.0})
    a1 = b.agent("agent1", now=at(0))
    c1 = b.chat(now=at(1))
    offer = b.pending(c1)[0]
    refused("OFFER_NO_LONGER_VALID", b, routing.accept_offer, a1, offer.id, now=at(11))
    assert b.offer(offer.id).status == "pending"
    b.write(routing.accept_offer, a1, offer.id, now=at(10.99))
    assert status(b, c1) == "active"


# --- invite targets --------------------------------------------------------------


@pytest.fixture
def in_chat(make):
    """agent1 (support profile) in an active support chat; everyone else logged out."""
    b = make(max_chats={"agent3": 1})
    a1 = b.agent("agent1", profile="support", now=at(0))
    c1 = b.chat("support", now=at(1))
    b.accept(a1, b.pending(c1)[0].id)
    return b, a1, c1


def invite(b: Bare, who, conversation_id: str, agent_id: str = "", queue_id: str = "", now=None):
    return b.write(invites.invite_agent, who, conversation_id, "", agent_id, queue_id, now=now)


def test_named_invite_targets(in_chat):
    b, a1, c1 = in_chat
    refused("ALREADY_IN_CONVERSATION", b, invites.invite_agent, a1, c1, "", "agent1", "")
    refused("AGENT_NOT_FOUND", b, invites.invite_agent, a1, c1, "", "nobody", "")
    refused("AGENT_UNAVAILABLE", b, invites.invite_agent, a1, c1, "", "agent2", "")  # not logged in
    a2 = b.login("agent2", now=at(2))
    refused("AGENT_UNAVAILABLE", b, invites.invite_agent, a1, c1, "", "agent2", "")  # no offer stream
    b.write(agents.stream_opened, a2.session_id)
    b.write(agents.set_ready, a2, False)
    refused("AGENT_UNAVAILABLE", b, invites.invite_agent, a1, c1, "", "agent2", "")  # not ready
    # agent3 (max 1) holds a pending chat offer: full.
    b.agent("agent3", now=at(3))
    c2 = b.chat("sales", now=at(4))
    assert b.offered_to(c2) == "agent3"
    refused("AGENT_AT_CAPACITY", b, invites.invite_agent, a1, c1, "", "agent3", "")
    assert b.pending(c1) == []  # every refusal was rolled back
    # agent2, ready again, can be invited; once in, it is a member.
    b.write(agents.set_ready, a2, True)
    inv = invite(b, a1, c1, agent_id="agent2")
    [offer] = b.pending(c1)
    assert (offer.kind, offer.agent_id, offer.invite_id) == ("invite", "agent2", inv["invite_id"])
    b.accept(a2, offer.id)
    refused("ALREADY_IN_CONVERSATION", b, invites.invite_agent, a1, c1, "", "agent2", "")
    refused("ALREADY_IN_CONVERSATION", b, invites.invite_agent, a2, c1, "", "agent1", "")


def test_queue_invite_picks_a_free_ready_agent_of_the_queue_not_in_the_conversation(in_chat):
    b, a1, c1 = in_chat
    # agent1 itself is of the queue and has room, but is in the conversation.
    refused("NO_AGENT_AVAILABLE", b, invites.invite_agent, a1, c1, "", "", "support")
    # agent2: in the conversation; agent3: full; agent4: not ready; agent5: sales only; agent6: the one.
    a2 = b.agent("agent2", profile="support", now=at(2))
    b.write(invites.invite_agent, a1, c1, "", "agent2", "")
    b.accept(a2, b.pending(c1)[0].id)
    b.agent("agent3", now=at(3))
    c2 = b.chat("sales", now=at(4))
    assert b.offered_to(c2) == "agent3"
    b.write(agents.set_ready, b.agent("agent4", now=at(5)), False)
    b.agent("agent5", profile="sales", now=at(6))
    refused("NO_AGENT_AVAILABLE", b, invites.invite_agent, a1, c1, "", "", "support")
    b.agent("agent6", profile="support", now=at(7))
    for _ in range(8):  # the pick is random among those that fit: only agent6 fits
        inv = invite(b, a1, c1, queue_id="support")
        assert inv["invitee"]["agent_id"] == "agent6"
        assert [(o.kind, o.agent_id) for o in b.pending(c1)] == [("invite", "agent6")]
        b.write(invites.cancel_invite, a1, inv["invite_id"])
        assert b.pending(c1) == []


def test_one_pending_invite_at_a_time(in_chat):
    b, a1, c1 = in_chat
    b.agent("agent2", now=at(2))
    b.agent("agent4", now=at(3))
    inv = invite(b, a1, c1, agent_id="agent2")
    refused("INVITE_ALREADY_PENDING", b, invites.invite_agent, a1, c1, "", "agent4", "")
    refused("INVITE_ALREADY_PENDING", b, invites.invite_agent, a1, c1, "", "", "support")
    assert [o.agent_id for o in b.pending(c1)] == ["agent2"]
    b.write(invites.cancel_invite, a1, inv["invite_id"])
    invite(b, a1, c1, agent_id="agent4")
    assert [o.agent_id for o in b.pending(c1)] == ["agent4"]


# --- one dispatch per write ------------------------------------------------------


def test_dispatch_runs_once_at_the_end_of_the_write(make, monkeypatch):
    b = make(max_chats={"agent1": 2})
    a1 = b.agent("agent1", now=at(0))
    c1, c2 = b.chat(now=at(1)), b.chat(now=at(2))
    for c in (c1, c2):
        b.accept(a1, b.pending(c)[0].id)
    c3, c4 = b.chat(now=at(3)), b.chat(now=at(4))
    assert (b.offered_to(c3), b.offered_to(c4)) == (None, None)

    calls = []
    real = routing.dispatch
    monkeypatch.setattr(routing, "dispatch", lambda tx, *a, **kw: calls.append(tx) or real(tx, *a, **kw))
    seen = []

    def close_both(tx):
        conversations.close(tx, a1, c1, True)
        # Capacity is free, but routing waits for the end of the write.
        seen.append((tx.dispatch_needed, pending_in(tx)))
        conversations.close(tx, a1, c2, True)
        seen.append((tx.dispatch_needed, pending_in(tx)))

    _, effects = b.run(close_both, now=at(5))
    assert seen == [(True, 0), (True, 0)]
    assert len(calls) == 1
    # Both freed slots were filled by that one dispatch, oldest chat first.
    assert (b.offered_to(c3), b.offered_to(c4)) == ("agent1", "agent1")
    assert len(schedules(effects, routing.expire_offer)) == 2
    # A write that asks for nothing does not dispatch.
    b.run(lambda tx: None)
    assert len(calls) == 1


def pending_in(tx) -> int:
    return tx.session.exec(select(func.count()).select_from(Offer).where(Offer.status == "pending")).one()


def test_take_dispatch_forgets_the_request():
    from queuechat.domain.tx import Context, Tx

    tx = Tx(None, Context(None, None))  # type: ignore[arg-type]
    assert not tx.dispatch_needed and not tx.take_dispatch()
    tx.needs_dispatch()
    tx.needs_dispatch()
    assert tx.dispatch_needed
    assert tx.take_dispatch() is True
    assert not tx.dispatch_needed and tx.take_dispatch() is False


def test_a_logout_with_several_offers_hands_them_all_on_in_one_write(bare):
    b = bare
    a1 = b.agent("agent1", now=at(0))
    chats = [b.chat(now=at(1 + i)) for i in range(3)]
    assert [b.offered_to(c) for c in chats] == ["agent1"] * 3
    b.agent("agent2", now=at(5))
    _, effects = b.run(agents.logout, a1, now=at(6))
    assert [b.offered_to(c) for c in chats] == ["agent2"] * 3
    assert len(schedules(effects, routing.expire_offer)) == 3


# --- every write that frees a slot fills it in that same write ----------------------


def test_leaving_fills_the_slot(make):
    b = make(max_chats={"agent1": 1})
    a1 = b.agent("agent1", now=at(0))
    c1 = b.chat("support", now=at(1))
    b.accept(a1, b.pending(c1)[0].id)
    a2 = b.agent("agent2", profile="support", now=at(2))
    invite(b, a1, c1, agent_id="agent2", now=at(3))
    b.accept(a2, b.pending(c1)[0].id, now=at(4))
    c2 = b.chat("sales", now=at(5))
    assert b.offered_to(c2) is None  # agent1 is full, agent2 does not do sales
    b.write(conversations.leave, a1, c1, now=at(6))
    assert b.offered_to(c2) == "agent1"


def test_cancelling_an_invite_fills_the_invitees_slot(make):
    b = make(max_chats={"agent2": 1})
    a1 = b.agent("agent1", profile="support", now=at(0))
    c1 = b.chat("support", now=at(1))
    b.accept(a1, b.pending(c1)[0].id)
    b.agent("agent2", now=at(2))
    inv = invite(b, a1, c1, agent_id="agent2", now=at(3))
    c2 = b.chat("sales", now=at(4))
    assert b.offered_to(c2) is None
    b.write(invites.cancel_invite, a1, inv["invite_id"], now=at(5))
    assert b.offered_to(c2) == "agent2"


def test_a_customer_leaving_the_queue_frees_the_offered_slot(make):
    b = make(max_chats={"agent1": 1})
    b.agent("agent1", now=at(0))
    c1, c2 = b.chat(now=at(1)), b.chat(now=at(2))
    assert (b.offered_to(c1), b.offered_to(c2)) == ("agent1", None)
    b.write(conversations.end_chat, b.customer(c1), c1, now=at(3))
    assert status(b, c1) == "closed" and b.offered_to(c1) is None
    assert b.offered_to(c2) == "agent1"


# --- where routing looks ---------------------------------------------------------------


class _Spy:
    """A routing statement that records each run."""

    def __init__(self, real, name: str, looked: list[str]):
        self.real, self.name, self.looked = real, name, looked
        self.stmt = real.stmt

    def run(self, c, params):
        result = self.real.run(c, params)
        self.looked.append((self.name, len(result.all())))  # on SQLite a list: it can be read again
        return result


def spy_on_agent_reads(monkeypatch) -> list[tuple[str, int]]:
    """The statements routing runs to read agents, in order, as it runs them, and the rows each read."""
    looked: list[tuple[str, int]] = []
    for name in ("_FREE_AGENTS", "_FREE_FOR_QUEUE", "_FREE_FOR_QUEUE_AFTER"):
        monkeypatch.setattr(routing, name, _Spy(getattr(routing, name), name, looked))
    return looked


def test_a_close_looks_only_at_its_agents_queues(make, monkeypatch):
    """A close asks routing about the queues of its agents' profiles: with nobody waiting there, routing
    reads no agents at all (however long another queue is); with a chat waiting there, it is offered."""
    bare = make(max_chats={"agent1": 1})
    sales = bare.agent("agent1", "sales")
    cid = bare.chat("sales")
    bare.accept(sales, bare.pending(cid)[0].id)
    for _ in range(3):
        bare.chat("support")  # nobody serves support: these wait
    looked = spy_on_agent_reads(monkeypatch)
    bare.write(conversations.close, sales, cid, True)
    assert looked == []

    cid = bare.chat("sales")
    bare.accept(sales, bare.pending(cid)[0].id)
    waiting = bare.chat("sales", now=bare.advance(1))
    assert bare.offered_to(waiting) is None  # agent1 is full
    bare.write(conversations.close, sales, cid, True)
    assert looked and bare.offered_to(waiting) == "agent1"


def test_an_arrival_reads_the_few_agents_it_needs_however_many_are_logged_in(make, monkeypatch):
    """An arrival reads free agents idle longest first, four at a time, and offers to the first: the number
    logged in does not matter. Busy agents are not read at all (agent.load, by the index's order)."""
    many = [
        {"id": f"a{i:02}", "display_name": f"A {i}", "password": "pw", "profiles": ["sales"], "max_chats": 1}
        for i in range(30)
    ]
    bare = make(agents=many)
    for i in range(30):
        bare.agent(f"a{i:02}", "sales", now=at(i))
    bare.compare_paths = False  # its reads would count too
    looked = spy_on_agent_reads(monkeypatch)
    first = bare.chat("sales", now=at(100))
    assert bare.offered_to(first) == "a00" and looked == [("_FREE_FOR_QUEUE", 4)]

    for i in range(1, 29):
        bare.chat("sales", now=at(100 + i))  # a01..a28 each get one: all busy but a29
    looked.clear()
    last = bare.chat("sales", now=at(200))
    assert bare.offered_to(last) == "a29" and looked == [("_FREE_FOR_QUEUE", 1)]
    looked.clear()
    waiting = bare.chat("sales", now=at(201))
    assert bare.offered_to(waiting) is None and looked == [("_FREE_FOR_QUEUE", 0)]


def test_a_dispatch_past_a_page_offers_the_oldest_chats_of_all_its_queues_in_order(make):
    """More free seats than a page (200) in two queues: chats are offered oldest first across both, the
    pages of one queue never running ahead of the other's older chats, and no chat past the seats."""
    bare = make(max_chats={"agent1": 450})
    for i in range(500):  # interleaved, the two queues unevenly
        bare.chat("sales" if i % 3 else "support", now=at(i))
    bare.agent("agent1", "both", now=at(600))
    offered = bare.pending(agent_id="agent1")
    assert len(offered) == 450
    waited = sorted(bare.read(lambda s: [(c.enqueued_at, c.id) for c in s.exec(select(Conversation)).all()]))
    assert {o.conversation_id for o in offered} == {cid for _, cid in waited[:450]}


def test_a_close_frees_an_invitees_seat_for_their_own_queues(make):
    """A close withdraws a pending invite: the invitee has a seat back, and a chat waiting in one of their
    own queues (not the closed chat's) is offered to them then."""
    bare = make(max_chats={"agent2": 1})
    sales = bare.agent("agent1", "sales")
    cid = bare.chat("sales")
    bare.accept(sales, bare.pending(cid)[0].id)
    bare.agent("agent2", "support")
    bare.write(invites.invite_agent, sales, cid, "r1", "agent2", "", now=bare.advance(1))
    waiting = bare.chat("support", now=bare.advance(1))
    assert bare.offered_to(waiting) is None  # agent2's one seat holds the invite
    bare.write(conversations.close, sales, cid, True, now=bare.advance(1))
    assert bare.offered_to(waiting) == "agent2"


def test_an_invite_accepted_by_a_supervisor_who_barged_in_joins_nobody_twice(make):
    """Invited, then barged in before answering, then accepting: one participant row, the invite answered,
    the offer's seat given back (agent.load is checked against the rows when the harness closes)."""
    doc = with_supervisors(base_config())
    bare = make(profiles=doc["profiles"], agents=doc["agents"])
    agent = bare.agent("agent1", "both")
    cid = bare.chat("sales")
    bare.accept(agent, bare.pending(cid)[0].id)
    sup = bare.agent(SUPERVISOR, "supervisors", now=bare.advance(1))
    bare.write(supervision.start_monitor, sup, cid, now=bare.advance(1))
    bare.write(invites.invite_agent, agent, cid, "r1", SUPERVISOR, "", now=bare.advance(1))
    bare.write(supervision.barge_in, sup, cid, now=bare.advance(1))
    invite_offer = bare.pending(cid, kind="invite")[0]
    bare.accept(sup, invite_offer.id, now=bare.advance(1))
    rows = bare.read(lambda s: s.exec(select(Participant).where(Participant.agent_id == SUPERVISOR)).all())
    assert len(rows) == 1 and bare.loads([SUPERVISOR]) == {SUPERVISOR: 1}
    assert bare.read(lambda s: s.exec(select(Invite)).one()).status == "accepted"
    bare.write(conversations.leave, sup, cid, now=bare.advance(1))
    assert bare.loads([SUPERVISOR]) == {SUPERVISOR: 0}


def test_a_seat_given_back_asks_routing_about_its_queues_only(make, monkeypatch):
    """A reject gives a chat back to its queue and the agent a seat in the queues of their profile: routing
    is asked about those, not every queue (and the chat goes on to the next agent)."""
    bare = make()
    bare.compare_paths = False  # its own run of the whole-queue path would be asked too
    sales = bare.agent("agent1", "sales")
    bare.agent("agent2", "sales", now=bare.advance(1))
    cid = bare.chat("sales", now=bare.advance(1))
    asked: list[object] = []
    real = routing.dispatch
    monkeypatch.setattr(
        routing, "dispatch", lambda tx, now=None, queues=None: asked.append(queues) or real(tx, now, queues)
    )
    bare.reject(sales, bare.pending(cid)[0].id, now=bare.advance(1))
    assert asked == [frozenset({"sales"})] and bare.offered_to(cid) == "agent2"
