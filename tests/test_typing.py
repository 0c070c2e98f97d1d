"""Typing indicators: an ephemeral signal to the other side's stream. Not stored, not in any
transcript, no seq, not replayed on resume; an agent's private composing never reaches the
customer; over the rate, signals are dropped."""

from __future__ import annotations

import grpc
from harness import expect_error

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb


async def agent_types(agent, conversation_id: str, typing: bool = True, private: bool = False) -> None:
    visibility = rpb.VISIBILITY_AGENTS_ONLY if private else rpb.VISIBILITY_ALL
    req = agent_pb.SetTypingRequest(conversation_id=conversation_id, typing=typing, visibility=visibility)
    await agent.stub.SetTyping(req, metadata=agent.md)


async def customer_types(cust, typing: bool = True) -> None:
    req = cust_pb.CustomerServiceSetTypingRequest(conversation_id=cust.id, typing=typing)
    await cust.stub.SetTyping(req, metadata=cust.md)


def is_typing(item) -> bool:
    return item.HasField("typing")


async def test_typing_reaches_the_other_side_and_nothing_is_stored(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    stream = agent.streams[cust.id]
    await customer_types(cust)
    seen = await stream.wait_for(is_typing)
    assert seen.typing.participant.display_name == "Ada" and seen.typing.typing
    assert seen.typing.expire_time.seconds > 0
    await agent_types(agent, cust.id)
    shown = await cust.stream.wait_for(is_typing)
    assert shown.typing.participant.agent_id == "agent1"
    # Nobody sees their own; no seq moved, nothing in the transcript or the export.
    assert not [i for i in stream.items if is_typing(i) and i.typing.participant.agent_id == "agent1"]
    transcript = await cust.transcript()
    assert [e.seq for e in transcript.events] == list(range(1, len(transcript.events) + 1))
    conv = await agent.stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cust.id), metadata=agent.md)
    assert conv.conversation.last_seq == transcript.events[-1].seq


async def test_private_composing_is_never_signalled_to_the_customer(server):
    agent, cust = await server.chat()
    await agent_types(agent, cust.id, private=True)
    await agent.send(cust.id, "marker")  # a later event: the customer's stream got everything before it
    await cust.stream.wait_for(lambda i: i.HasField("event") and i.event.HasField("message"))
    assert not [i for i in cust.stream.items if is_typing(i)]


async def test_typing_is_not_replayed_on_resume(server):
    agent, cust = await server.chat()
    await customer_types(cust)
    await agent.streams[cust.id].wait_for(is_typing)
    again = agent.open_conversation(cust.id, after_seq=0)
    await again.wait_for(lambda i: i.HasField("heartbeat"))
    assert not [i for i in again.items if is_typing(i)]


async def test_signals_over_the_rate_are_dropped(server):
    agent, cust = await server.chat()
    for _ in range(10):
        await customer_types(cust)
    await customer_types(cust, typing=False)  # a stop always goes through
    stream = agent.streams[cust.id]
    await stream.wait_for(lambda i: is_typing(i) and not i.typing.typing)
    assert len([i for i in stream.items if is_typing(i) and i.typing.typing]) == 1


async def test_only_those_in_the_conversation_may_signal(server):
    _, cust = await server.chat()
    outsider = await server.agent("agent3")
    await expect_error(agent_types(outsider, cust.id), grpc.StatusCode.PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    await cust.end()
    await expect_error(customer_types(cust), grpc.StatusCode.FAILED_PRECONDITION)
