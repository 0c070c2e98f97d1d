"""Read receipts: MarkRead on both services, a stored and monotonic cursor per participant, announced to the
others as a ReadCursor on their streams and carried by every conversation view. The customer never learns of
private events through them: agents' cursors reach it clamped to public seqs, and only when that moves."""

from __future__ import annotations

import grpc
import pytest
from features_helpers import (
    agent_reads,
    agent_view,
    cursors,
    customer_reads,
    customer_view,
    is_cursor,
    is_message,
)
from harness import expect_error

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

AGENT = rpb.PARTICIPANT_KIND_AGENT
CUSTOMER = rpb.PARTICIPANT_KIND_CUSTOMER


async def test_an_agents_read_reaches_the_customer_and_is_kept(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    sent = await cust.send("Hello?")
    cursor = await agent_reads(agent, cust.id, sent.seq)
    assert (cursor.participant.agent_id, cursor.read_seq) == ("agent1", sent.seq)
    told = await cust.stream.wait_for(is_cursor())
    assert told.read_cursor.participant.kind == AGENT and told.read_cursor.read_seq == sent.seq
    assert told.read_cursor.read_time.seconds > 0
    # Stored: both views carry it; the agent does not get its own cursor on its stream.
    view = await customer_view(cust)
    assert [(c.participant.agent_id, c.read_seq) for c in view.read_cursors] == [("agent1", sent.seq)]
    assert [(c.participant.agent_id, c.read_seq) for c in (await agent_view(agent, cust.id)).read_cursors] == [
        ("agent1", sent.seq)
    ]
    assert cursors(agent.streams[cust.id].items) == []


async def test_the_customers_read_reaches_the_agents(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    sent = await agent.send(cust.id, "Hi Ada")
    cursor = await customer_reads(cust, sent.seq)
    assert (cursor.participant.kind, cursor.participant.display_name, cursor.read_seq) == (CUSTOMER, "Ada", sent.seq)
    told = await agent.streams[cust.id].wait_for(is_cursor())
    assert told.read_cursor.participant.kind == CUSTOMER and told.read_cursor.read_seq == sent.seq
    view = await agent_view(agent, cust.id)
    assert [(c.participant.kind, c.read_seq) for c in view.read_cursors] == [(CUSTOMER, sent.seq)]


async def test_a_lower_cursor_changes_nothing(server):
    agent, cust = await server.chat()
    first = await cust.send("one")
    second = await cust.send("two")
    assert (await agent_reads(agent, cust.id, second.seq)).read_seq == second.seq
    again = await agent_reads(agent, cust.id, first.seq)
    assert again.read_seq == second.seq  # the cursor as it stands
    marker = await agent.send(cust.id, "marker")
    await cust.stream.wait_for(is_message("marker"))
    assert [c.read_seq for c in cursors(cust.stream.items)] == [second.seq]
    assert (await customer_view(cust)).read_cursors[0].read_seq == second.seq
    assert marker.seq > second.seq


async def test_private_reading_never_reaches_the_customer(server):
    agent, cust = await server.chat()
    public = await agent.send(cust.id, "public")
    private = await agent.send(cust.id, "private note", private=True)
    # The agent has read up to the private note: the customer is told of the public one only.
    await agent_reads(agent, cust.id, private.seq)
    told = await cust.stream.wait_for(is_cursor())
    assert told.read_cursor.read_seq == public.seq
    second_private = await agent.send(cust.id, "another note", private=True)
    await agent_reads(agent, cust.id, second_private.seq)  # the clamped value does not move: no signal
    marker = await agent.send(cust.id, "marker")
    await cust.stream.wait_for(is_message("marker"))
    assert [c.read_seq for c in cursors(cust.stream.items)] == [public.seq]
    view = await customer_view(cust)
    assert [c.read_seq for c in view.read_cursors] == [public.seq]
    transcript = await cust.transcript()
    public_seqs = {e.seq for e in transcript.events}
    assert private.seq not in public_seqs and all(c.read_seq in public_seqs for c in transcript.conversation.read_cursors)
    # Agents see the cursor as it is.
    assert [c.read_seq for c in (await agent_view(agent, cust.id)).read_cursors] == [second_private.seq]
    # Once a public event is read past, the customer hears of it.
    await agent_reads(agent, cust.id, marker.seq)
    await cust.stream.wait_for(is_cursor(lambda c: c.read_seq == marker.seq))


async def test_the_customer_cannot_probe_for_private_events(server):
    agent, cust = await server.chat()
    before = await agent.send(cust.id, "public")
    await agent.send(cust.id, "private", private=True)
    after = await agent.send(cust.id, "public again")
    # A seq past the last public one is out of range for the customer, private events or not.
    await expect_error(customer_reads(cust, after.seq + 1), grpc.StatusCode.INVALID_ARGUMENT, "SEQ_OUT_OF_RANGE")
    # The seq of the private event is clamped to the public one below it.
    assert (await customer_reads(cust, before.seq + 1)).read_seq == before.seq
    told = await agent.streams[cust.id].wait_for(is_cursor())
    assert told.read_cursor.read_seq == before.seq


async def test_refusals_change_nothing(server):
    agent, cust = await server.chat()
    sent = await cust.send("hi")
    await expect_error(agent_reads(agent, cust.id, -1), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SEQ")
    await expect_error(agent_reads(agent, cust.id, sent.seq + 5), grpc.StatusCode.INVALID_ARGUMENT, "SEQ_OUT_OF_RANGE")
    outsider = await server.agent("agent3")
    await expect_error(agent_reads(outsider, cust.id, 1), grpc.StatusCode.PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    await expect_error(agent_reads(agent, "nope", 1), grpc.StatusCode.NOT_FOUND, "CONVERSATION_NOT_FOUND")
    other = await server.customer()
    req = cust_pb.CustomerServiceMarkReadRequest(conversation_id=cust.id, up_to_seq=1)
    await expect_error(other.stub.MarkRead(req, metadata=other.md), grpc.StatusCode.PERMISSION_DENIED)
    assert list((await agent_view(agent, cust.id)).read_cursors) == []


async def test_streams_get_the_cursors_as_they_stand_when_they_resume(server):
    agent, cust = await server.chat()
    sent = await cust.send("hi")
    reply = await agent.send(cust.id, "hello")
    await agent_reads(agent, cust.id, sent.seq)
    await customer_reads(cust, reply.seq)
    again = agent.open_conversation(cust.id, after_seq=reply.seq)
    got = await again.wait_for(is_cursor())
    assert (got.read_cursor.participant.kind, got.read_cursor.read_seq) == (CUSTOMER, reply.seq)
    assert all(c.participant.kind != AGENT for c in cursors(again.items))  # never its own
    resumed = cust.open(after_seq=reply.seq)
    got = await resumed.wait_for(is_cursor())
    assert (got.read_cursor.participant.agent_id, got.read_cursor.read_seq) == ("agent1", sent.seq)


async def test_reads_after_the_chat_closed_are_kept(server):
    agent, cust = await server.chat()
    sent = await cust.send("bye")
    await agent.close(cust.id, confirm=True)
    assert (await agent_reads(agent, cust.id, sent.seq)).read_seq == sent.seq
    req = agent_pb.ListConversationsRequest(include_closed=True)
    convs = (await agent.stub.ListConversations(req, metadata=agent.md)).conversations
    assert [c.read_seq for c in convs[0].read_cursors] == [sent.seq]


@pytest.mark.configure(rate_limits={"enabled": True, "read_marks_per_conversation": 2})
async def test_marking_read_is_rate_limited(server):
    _, cust = await server.chat()
    await customer_reads(cust, 1)
    await customer_reads(cust, 2)
    err = await expect_error(customer_reads(cust, 2), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_READ_MARKS")
    assert "too often" in err.details()
