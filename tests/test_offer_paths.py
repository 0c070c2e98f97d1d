"""Making an offer, the same on both stores.

On PostgreSQL an offer, its session's feed seq and idle clock, and its feed entry are one statement (made
under the cluster's routing lock); on SQLite they are separate statements. Either way the agent idle
longest gets the next chat, the feed's seqs are consecutive and replay exactly from a cursor, and invites
are offered through the same path.
"""

from __future__ import annotations

import pytest
from harness import is_event

from chat.v1 import agent_service_pb2 as agent_pb


@pytest.fixture
def server(any_db_server):  # conftest: each test on SQLite and on PostgreSQL
    return any_db_server


def feed_seqs(stream) -> list[int]:
    return [i.event.seq for i in stream.items if i.HasField("event")]


async def test_the_agent_idle_longest_is_offered_next_and_the_feed_replays_exactly(server):
    h = server
    a1 = await h.agent("agent1")  # logs in first: idle longest
    a2 = await h.agent("agent2")
    c1 = await h.customer("sales")
    o1 = await a1.wait_offer(c1.id)
    c2 = await h.customer("sales")
    await a2.wait_offer(c2.id)
    c3 = await h.customer("sales")  # a1's last offer is older than a2's
    await a1.wait_offer(c3.id)
    await a1.reject(o1.offer_id)
    await a1.wait_offer_update(o1.offer_id)
    moved = await a2.wait_offer(c1.id)  # the rejected chat goes to the other agent
    assert moved.queue.queue_id == "sales" and moved.expire_time.ToDatetime() > moved.create_time.ToDatetime()

    first = a1.offers
    live = feed_seqs(first)
    assert live == list(range(live[0], live[0] + len(live)))  # offers and updates share one gap-free feed
    replay = a1.open_offers(after_seq=0)
    await replay.wait_for(lambda i: i.HasField("heartbeat"))
    replayed = [i.event for i in replay.items if i.HasField("event")]
    assert [e.seq for e in replayed] == live
    assert replayed == [i.event for i in first.items if i.HasField("event")]


async def test_an_invite_is_offered_and_accepted(server):
    h = server
    a1, cust = await h.chat()
    a2 = await h.agent("agent2")
    invite = await a1.invite(cust.id, agent_id="agent2")
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    assert offer.invite.invite_id == invite.invite_id and offer.invite.inviter.display_name == "Agent 1"
    conv = await a2.accept(offer.offer_id)
    assert {a.agent_id for a in conv.agents} == {"agent1", "agent2"}
    await cust.stream.wait_for(
        is_event("participant_joined", lambda e: e.participant_joined.participant.agent_id == "agent2")
    )


async def test_an_offer_carries_the_chats_variables_as_stored(server):
    h = server
    agent = await h.agent("agent1")
    given = {"name": 'Åsa "Q" 😀', "order": "#42 \\ back", "zip": '"variables":[]'}
    cust = await h.customer("sales", given)
    offer = await agent.wait_offer(cust.id)
    assert [(v.name, v.value) for v in offer.variables] == sorted(given.items())
    replay = agent.open_offers(after_seq=0)
    again = await replay.wait_for(lambda i: i.HasField("event") and i.event.HasField("offer"))
    assert again.event.offer == offer
    bare = await h.customer("sales")  # none at all
    assert list((await agent.wait_offer(bare.id)).variables) == []
