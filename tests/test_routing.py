"""Routing: oldest chat first, idle-longest agent, reject/timeout, cool-down, capacity, presence."""

import grpc
import pytest
from harness import expect_error
from sqlmodel import select

from chat.v1 import agent_service_pb2 as agent_pb
from queuechat.store.models import Offer


def pending_offers(session, conversation_id=None):
    q = select(Offer).where(Offer.status == "pending")
    if conversation_id:
        q = q.where(Offer.conversation_id == conversation_id)
    return list(session.exec(q).all())


async def test_agent_idle_longest_gets_the_next_chat(server):
    a1 = await server.agent("agent1")  # logs in first: idle longest
    a2 = await server.agent("agent2")
    c1 = await server.customer("sales")
    await a1.wait_offer(c1.id)
    c2 = await server.customer("sales")
    await a2.wait_offer(c2.id)
    # c3 goes to a1 again, whose last offer is older than a2's.
    c3 = await server.customer("sales")
    await a1.wait_offer(c3.id)
    assert a2.offer_ids() and len(a2.offer_ids()) == 1


@pytest.mark.configure(max_chats={"agent1": 1})
async def test_oldest_waiting_chat_is_offered_first(server):
    c1 = await server.customer("sales")
    c2 = await server.customer("support")
    c3 = await server.customer("sales")
    a1 = await server.agent("agent1")
    await a1.take(c1.id)
    await a1.close(c1.id, confirm=True)
    await a1.take(c2.id)
    await a1.close(c2.id, confirm=True)
    await a1.take(c3.id)
    assert [o.offer.conversation_id for o in a1.offers.events("offer")] == [c1.id, c2.id, c3.id]


async def test_reject_offers_the_chat_to_another_agent(server):
    a1 = await server.agent("agent1")
    a2 = await server.agent("agent2")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    await a1.reject(offer.offer_id)
    assert (await a1.wait_offer_update(offer.offer_id)).state == agent_pb.OFFER_STATE_REJECTED
    second = await a2.wait_offer(cust.id)
    await a2.accept(second.offer_id)
    # A rejected offer cannot be accepted afterwards.
    await expect_error(a1.accept(offer.offer_id), grpc.StatusCode.FAILED_PRECONDITION, "OFFER_NO_LONGER_VALID")
    # Rejecting again is an idempotent retry; accepting again too.
    await a1.reject(offer.offer_id)
    again = await a2.accept(second.offer_id)
    assert again.conversation_id == cust.id


@pytest.mark.configure(max_chats={"agent1": 1})
async def test_rejected_chat_keeps_its_place_in_the_queue(server):
    first = await server.customer("support")
    second = await server.customer("support")
    first.open()
    a1 = await server.agent("agent1")
    offer = await a1.wait_offer(first.id)
    await a1.reject(offer.offer_id)
    # No other agent: the sole agent is offered the same chat again, not the one behind it.
    offers = [o for o in a1.offers.events("offer")]
    again = await a1.offers.wait_for(
        lambda i: i.HasField("event") and i.event.HasField("offer") and i.event.offer.offer_id != offer.offer_id
    )
    assert again.event.offer.conversation_id == first.id, offers
    pos = await first.stream.wait_for(lambda i: i.HasField("queue_position"))
    assert pos.queue_position.position == 1
    assert second.id not in {o.offer.conversation_id for o in a1.offers.events("offer")}


async def test_cooldown_prefers_another_agent_even_if_idle_longer(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    a2 = await server.agent("agent2")
    await a1.reject(offer.offer_id)
    await a2.wait_offer(cust.id)
    # a1 is free and idle longer, but a2 got it: and a1 was not offered it twice.
    assert [o.offer.conversation_id for o in a1.offers.events("offer")] == [cust.id]


@pytest.mark.configure(settings={"offer_timeout": 0.4})
async def test_unanswered_offer_times_out_and_moves_on(server):
    a1 = await server.agent("agent1")
    a2 = await server.agent("agent2")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    update = await a1.wait_offer_update(offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_TIMED_OUT
    await a2.wait_offer(cust.id)
    await expect_error(a1.accept(offer.offer_id), grpc.StatusCode.FAILED_PRECONDITION, "OFFER_NO_LONGER_VALID")


@pytest.mark.configure(max_chats={"agent1": 2})
async def test_capacity_is_never_exceeded_and_frees_up_on_close(server):
    a1 = await server.agent("agent1")
    custs = [await server.customer("sales") for _ in range(3)]
    convs = [await a1.take(c.id) for c in custs[:2]]
    assert len(convs) == 2
    # The third waits: no offer exists for it (checked in the database, no sleeping).
    assert await server.core.db.read(pending_offers, custs[2].id) == []
    await a1.close(custs[0].id, confirm=True)
    await a1.wait_offer(custs[2].id)


async def test_only_ready_agents_with_the_queue_in_their_profile_get_offers(server):
    support = await server.agent("agent1", "support")
    idle = await server.agent("agent2", "sales", ready=False)
    cust = await server.customer("sales")
    assert await server.core.db.read(pending_offers, cust.id) == []
    await idle.set_ready(True)
    await idle.wait_offer(cust.id)
    assert support.offer_ids() == []


@pytest.mark.configure(settings={"stream_grace": 0.3})
async def test_offers_return_to_the_queue_when_the_offer_stream_is_gone(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    await a1.offers.cancel()
    a2 = await server.agent("agent2")
    await a2.wait_offer(cust.id)
    # The feed records why, for when a1 comes back.
    back = a1.open_offers(after_seq=0)
    item = await back.wait_for(lambda i: i.HasField("event") and i.event.HasField("offer_update"))
    assert item.event.offer_update.offer_id == offer.offer_id
    assert item.event.offer_update.state == agent_pb.OFFER_STATE_WITHDRAWN
    assert item.event.offer_update.withdraw_reason == agent_pb.WITHDRAW_REASON_AGENT_UNAVAILABLE


@pytest.mark.configure(settings={"stream_grace": 30})
async def test_offer_survives_a_reconnect_within_the_grace_period(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    last_seq = max(e.seq for e in a1.offers.events())
    await a1.offers.cancel()
    resumed = a1.open_offers(after_seq=last_seq)
    await resumed.wait_for(lambda i: i.HasField("heartbeat"))
    assert resumed.events() == []  # nothing new, nothing repeated
    conv = await a1.accept(offer.offer_id)
    assert conv.conversation_id == cust.id


async def test_customer_leaving_withdraws_the_offer(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    await cust.end()
    update = await a1.wait_offer_update(offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_WITHDRAWN
    assert update.withdraw_reason == agent_pb.WITHDRAW_REASON_CUSTOMER_LEFT
    await expect_error(a1.accept(offer.offer_id), grpc.StatusCode.FAILED_PRECONDITION, "OFFER_NO_LONGER_VALID")


async def test_logout_withdraws_offers_and_logged_out_agent_gets_nothing(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales")
    await a1.wait_offer(cust.id)
    await a1.stub.Logout(agent_pb.LogoutRequest(), metadata=a1.md)
    await a1.offers.wait_done()
    assert a1.offers.error.code() == grpc.StatusCode.UNAUTHENTICATED
    a2 = await server.agent("agent2")
    await a2.wait_offer(cust.id)
