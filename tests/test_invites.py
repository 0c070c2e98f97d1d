"""Invites: named or random from a queue, one pending at a time, outcomes, stay or leave."""

import grpc
import pytest
from harness import expect_error, is_event

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb


def invite_state(state):
    return is_event("invite_updated", lambda e: e.invite_updated.invite.state == state)


async def test_named_invite_accepted_invitee_sees_history_and_inviter_leaves(server):
    a1, cust = await server.chat()
    a2 = await server.agent("agent2", ready=True)
    await cust.send("my order is late")
    await a1.send(cust.id, "note: order #42 stuck in customs", private=True)

    invite = await a1.invite(cust.id, agent_id="agent2")
    assert invite.state == rpb.INVITE_STATE_PENDING
    assert invite.invitee.agent_id == "agent2" and invite.inviter.agent_id == "agent1"
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    assert offer.invite.invite_id == invite.invite_id
    assert offer.invite.inviter.display_name == "Agent 1"
    assert {v.name for v in offer.variables} == set()

    conv = await a2.accept(offer.offer_id)
    assert {a.agent_id for a in conv.agents} == {"agent1", "agent2"}
    await a1.streams[cust.id].wait_for(invite_state(rpb.INVITE_STATE_ACCEPTED))
    joined = await cust.stream.wait_for(is_event("participant_joined", lambda e: e.participant_joined.participant.agent_id == "agent2"))
    assert joined.event.participant_joined.invite_id == invite.invite_id

    # The invitee sees the whole history, private note included.
    s2 = a2.open_conversation(cust.id)
    await s2.wait_for(is_event("message", lambda e: e.message.text == "my order is late"))
    await s2.wait_for(is_event("message", lambda e: e.message.text.startswith("note: order #42")))

    # Agents talk privately; the customer never sees it.
    await a2.send(cust.id, "thanks, I'll take it from here", private=True)
    await a1.streams[cust.id].wait_for(is_event("message", lambda e: e.message.text.startswith("thanks, I'll")))

    # The inviter leaves; the invitee stays with the customer.
    await a1.leave(cust.id)
    left = await cust.stream.wait_for(is_event("participant_left"))
    assert left.event.participant_left.participant.agent_id == "agent1"
    await a1.streams[cust.id].wait_done()
    await expect_error(a1.send(cust.id, "hello?"), grpc.StatusCode.PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    await a2.send(cust.id, "Hi, I'm Agent 2")
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "Hi, I'm Agent 2"))
    assert all(not e.message.text.startswith(("note:", "thanks")) for e in cust.stream.events("message"))
    assert cust.stream.events("invite_updated") == []


async def test_one_pending_invite_at_a_time_then_more(server):
    a1, cust = await server.chat()
    a2 = await server.agent("agent2")
    a3 = await server.agent("agent3")
    first = await a1.invite(cust.id, agent_id="agent2", request_id="inv-1")
    # A retry of the same request is the same invite, not a second one.
    assert (await a1.invite(cust.id, agent_id="agent2", request_id="inv-1")).invite_id == first.invite_id
    await expect_error(a1.invite(cust.id, agent_id="agent3"), grpc.StatusCode.FAILED_PRECONDITION, "INVITE_ALREADY_PENDING")

    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a2.reject(offer.offer_id)
    rejected = await a1.streams[cust.id].wait_for(invite_state(rpb.INVITE_STATE_REJECTED))
    assert rejected.event.visibility == rpb.VISIBILITY_AGENTS_ONLY

    # Answered: another invite is allowed.
    await a1.invite(cust.id, agent_id="agent3")
    offer3 = await a3.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a3.accept(offer3.offer_id)
    await a1.streams[cust.id].wait_for(invite_state(rpb.INVITE_STATE_ACCEPTED))


async def test_inviter_cancels_and_invitee_can_no_longer_accept(server):
    a1, cust = await server.chat()
    a2 = await server.agent("agent2")
    invite = await a1.invite(cust.id, agent_id="agent2")
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    # The invitee may look at the conversation before answering.
    peek = await a2.stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cust.id), metadata=a2.md)
    assert peek.conversation.pending_invite.invite_id == invite.invite_id
    await expect_error(a2.send(cust.id, "hi"), grpc.StatusCode.PERMISSION_DENIED, "NOT_A_PARTICIPANT")

    cancelled = await a1.stub.CancelInvite(agent_pb.CancelInviteRequest(invite_id=invite.invite_id), metadata=a1.md)
    assert cancelled.invite.state == rpb.INVITE_STATE_CANCELLED
    update = await a2.wait_offer_update(offer.offer_id)
    assert (update.state, update.withdraw_reason) == (agent_pb.OFFER_STATE_WITHDRAWN, agent_pb.WITHDRAW_REASON_CANCELLED)
    await expect_error(a2.accept(offer.offer_id), grpc.StatusCode.FAILED_PRECONDITION, "OFFER_NO_LONGER_VALID")
    await a1.streams[cust.id].wait_for(invite_state(rpb.INVITE_STATE_CANCELLED))
    await expect_error(
        a1.stub.CancelInvite(agent_pb.CancelInviteRequest(invite_id="nope"), metadata=a1.md),
        grpc.StatusCode.NOT_FOUND,
        "INVITE_NOT_FOUND",
    )


@pytest.mark.configure(settings={"offer_timeout": 1.0})  # the chat offer before it must survive a loaded machine
async def test_unanswered_invite_times_out(server):
    a1, cust = await server.chat()
    a2 = await server.agent("agent2")
    await a1.invite(cust.id, agent_id="agent2")
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a1.streams[cust.id].wait_for(invite_state(rpb.INVITE_STATE_TIMED_OUT))
    assert (await a2.wait_offer_update(offer.offer_id)).state == agent_pb.OFFER_STATE_TIMED_OUT


async def test_random_agent_from_a_queue(server):
    a1, cust = await server.chat()
    await expect_error(a1.invite(cust.id, queue_id="support"), grpc.StatusCode.FAILED_PRECONDITION, "NO_AGENT_AVAILABLE")
    await server.agent("agent2", "sales")  # not in the support queue
    await server.agent("agent3", "support", ready=False)  # not ready
    a4 = await server.agent("agent4", "support")
    invite = await a1.invite(cust.id, queue_id="support")
    assert invite.invitee.agent_id == "agent4" and invite.queue_id == "support"
    offer = await a4.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a4.accept(offer.offer_id)
    await expect_error(a1.invite(cust.id, queue_id="nope"), grpc.StatusCode.NOT_FOUND, "QUEUE_NOT_FOUND")


async def test_invite_refusals(server):
    a1, cust = await server.chat()
    await expect_error(a1.invite(cust.id), grpc.StatusCode.INVALID_ARGUMENT, "INVITE_TARGET_REQUIRED")
    await expect_error(a1.invite(cust.id, agent_id="ghost"), grpc.StatusCode.NOT_FOUND, "AGENT_NOT_FOUND")
    await expect_error(a1.invite(cust.id, agent_id="agent1"), grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_IN_CONVERSATION")
    await expect_error(a1.invite(cust.id, agent_id="agent2"), grpc.StatusCode.FAILED_PRECONDITION, "AGENT_UNAVAILABLE")
    # Nothing was created by the refusals.
    assert a1.streams[cust.id].events("invite_updated") == []


@pytest.mark.configure(max_chats={"agent2": 1})
async def test_invitee_at_capacity_is_refused(server):
    a2 = await server.agent("agent2")
    other = await server.customer("sales")
    await a2.take(other.id)
    a1, cust = await server.chat()
    await expect_error(a1.invite(cust.id, agent_id="agent2"), grpc.StatusCode.FAILED_PRECONDITION, "AGENT_AT_CAPACITY")


async def test_closing_withdraws_a_pending_invite(server):
    a1, cust = await server.chat()
    a2 = await server.agent("agent2")
    await a1.invite(cust.id, agent_id="agent2")
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a1.close(cust.id, confirm=True)
    update = await a2.wait_offer_update(offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_WITHDRAWN
    log = await a1.stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cust.id), metadata=a1.md)
    assert not log.conversation.HasField("pending_invite")
