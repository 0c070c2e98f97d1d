"""Routing under concurrency: accepts, rejects and time-outs racing.

Invariants, checked from the database afterwards: no chat is ever offered to
two agents at once, no agent ever exceeds max_chats (pending offers and open
chats together), every chat is served exactly once, nothing is lost.
"""

import asyncio
import logging
import random
import uuid
from collections import defaultdict

import grpc
import pytest
from harness import auth
from sqlmodel import select

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.store.models import Agent, Conversation, Offer, Participant

N_CUSTOMERS = 40
N_AGENTS = 6
MAX_CHATS = 2


def overlaps(intervals):
    """Max number of half-open intervals [start, end) open at once."""
    points = []
    for start, end in intervals:
        points.append((start, 1))
        points.append((end, -1))
    points.sort(key=lambda p: (p[0], p[1]))  # ends before starts at equal times
    most = cur = 0
    for _, delta in points:
        cur += delta
        most = max(most, cur)
    return most


def snapshot(s):
    return (
        list(s.exec(select(Offer)).all()),
        list(s.exec(select(Participant)).all()),
        {c.id: c for c in s.exec(select(Conversation)).all()},
        {a.id: a.max_chats for a in s.exec(select(Agent)).all()},
    )


@pytest.mark.configure(
    settings={"offer_timeout": 0.3, "reject_cooldown": 0.2, "stream_grace": 60},
    max_chats={f"agent{i}": MAX_CHATS for i in range(1, N_AGENTS + 1)},
)
async def test_racing_agents_never_double_offer_or_exceed_capacity(server, caplog):
    caplog.set_level(logging.ERROR)
    rng = random.Random(7)
    agents = [await server.agent(f"agent{i}", offers=False) for i in range(1, N_AGENTS + 1)]
    outcomes = defaultdict(int)

    async def work(agent):
        call = agent.stub.StreamOffers(agent_pb.StreamOffersRequest(), metadata=agent.md)
        pending = set()

        async def serve(conversation_id):
            await asyncio.sleep(rng.uniform(0, 0.05))  # the agent chats a moment
            await agent.close(conversation_id, confirm=True)

        async for item in call:
            if not item.HasField("event") or not item.event.HasField("offer"):
                continue
            offer = item.event.offer
            choice = rng.random()
            try:
                if choice < 0.6:
                    await agent.accept(offer.offer_id)
                    outcomes["accepted"] += 1
                    pending.add(asyncio.create_task(serve(offer.conversation_id)))
                elif choice < 0.85:
                    await agent.reject(offer.offer_id)
                    outcomes["rejected"] += 1
                else:
                    outcomes["ignored"] += 1  # let it time out
            except grpc.aio.AioRpcError as e:
                # Racing the offer's own time-out is fine; anything else is not.
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION, e
                outcomes["too_late"] += 1

    workers = [asyncio.create_task(work(a)) for a in agents]

    async def start(i):
        resp = await server.customer_stub.StartChat(
            cust_pb.StartChatRequest(queue_id=rng.choice(["sales", "support"]), request_id=uuid.uuid4().hex)
        )
        # Each customer waits until an agent ends the chat.
        call = server.customer_stub.StreamConversation(
            cust_pb.CustomerServiceStreamConversationRequest(conversation_id=resp.conversation.conversation_id),
            metadata=auth(resp.customer_token),
        )
        async for item in call:
            if item.HasField("event") and item.event.HasField("chat_ended"):
                return resp.conversation.conversation_id

    try:
        served = await asyncio.wait_for(asyncio.gather(*(start(i) for i in range(N_CUSTOMERS))), 90)
    finally:
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)

    assert len(set(served)) == N_CUSTOMERS
    assert outcomes["rejected"] > 0 and outcomes["ignored"] > 0, outcomes  # the race really happened

    offers, parts, convs, max_chats = await server.core.db.read(snapshot)
    assert all(c.status == "closed" for c in convs.values())
    assert all(o.status != "pending" for o in offers)

    by_conv = defaultdict(list)
    by_agent = defaultdict(list)
    for o in offers:
        if o.kind == "chat":
            by_conv[o.conversation_id].append((o.created_at, o.resolved_at))
        by_agent[o.agent_id].append((o.created_at, o.resolved_at))
    for p in parts:
        by_agent[p.agent_id].append((p.joined_at, convs[p.conversation_id].closed_at))

    for conv_id, intervals in by_conv.items():
        assert overlaps(intervals) == 1, f"{conv_id} was offered to two agents at once"
    for agent_id, intervals in by_agent.items():
        assert overlaps(intervals) <= max_chats[agent_id], f"{agent_id} exceeded capacity"
    accepted = defaultdict(int)
    for o in offers:
        if o.status == "accepted":
            accepted[o.conversation_id] += 1
    assert set(accepted.values()) == {1} and len(accepted) == N_CUSTOMERS
    assert sorted(p.conversation_id for p in parts) == sorted(convs)  # one agent each
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a background write failed"
