"""SendMessage's every outcome, the same on both stores.

On PostgreSQL a plain message is claimed, checked and stored in one statement; anything else (a refusal,
a retry, no such conversation) falls back to the general path. Whichever path answers, the answer, the
stored event and the next seq must be the same as SQLite's: a refusal burns no seq, a retry is answered
with the first try's event, and the sender's name is the database's, whatever characters it holds.
"""

from __future__ import annotations

import grpc
import pytest
from harness import Harness, expect_error, is_event

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb

NAME = 'Åsa "Q" \\ O\'Neil 😀 "display_name":""'


@pytest.fixture
def server(any_db_server):  # conftest: each test on SQLite and on PostgreSQL
    return any_db_server


async def connected(h: Harness, agent_id: str = "agent1"):
    agent = await h.agent(agent_id)
    cust = await h.customer("sales", {"name": NAME})
    cust.open()
    await agent.accept((await agent.wait_offer(cust.id)).offer_id)
    return agent, cust


async def last_seq(h: Harness, agent, conversation_id: str) -> int:
    conv = await agent.stub.GetConversation(
        agent_pb.GetConversationRequest(conversation_id=conversation_id), metadata=agent.md
    )
    return conv.conversation.last_seq


async def test_plain_messages_carry_the_stored_names_and_consecutive_seqs(server):
    h = server
    agent, cust = await connected(h)
    before = await last_seq(h, agent, cust.id)
    mine = await cust.send('she said "hi" \\ and left', request_id="c-1")
    theirs = await agent.send(cust.id, "Hello", request_id="a-1")
    note = await agent.send(cust.id, "a note", private=True)
    assert [mine.seq, theirs.seq, note.seq] == [before + 1, before + 2, before + 3]
    assert mine.message.sender.display_name == NAME and mine.message.text == 'she said "hi" \\ and left'
    assert theirs.message.sender.display_name == "Agent 1" and theirs.message.sender.agent_id == "agent1"
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "Hello"))
    # What was stored is what the sender was told, on a replay from the log.
    replay = agent.open_conversation(cust.id, after_seq=before)
    got = await replay.wait_for(is_event("message", lambda e: e.seq == note.seq))
    stored = [e for e in replay.events() if e.seq > before]
    assert [e.message for e in stored] == [mine.message, theirs.message, note.message]
    assert got.event.message.sender.display_name == "Agent 1"


async def test_a_retry_is_answered_with_the_first_event_and_burns_no_seq(server):
    h = server
    agent, cust = await connected(h)
    first = await cust.send("once", request_id="same")
    again = await cust.send("once", request_id="same")
    assert again == first
    a1 = await agent.send(cust.id, "mine once", request_id="same")  # another actor: its own request
    a2 = await agent.send(cust.id, "mine once", request_id="same")
    assert a2 == a1 and a1.seq == first.seq + 1
    nxt = await cust.send("next")
    assert nxt.seq == a1.seq + 1


async def test_refusals_change_nothing_and_a_retry_after_close_is_still_answered(server):
    h = server
    agent, cust = await connected(h)
    sent = await agent.send(cust.id, "before the end", request_id="a-1")
    outsider = await h.agent("agent2")
    await expect_error(outsider.send(cust.id, "not mine"), grpc.StatusCode.PERMISSION_DENIED)
    await expect_error(agent.send("nope", "x", request_id="a-2"), grpc.StatusCode.NOT_FOUND)
    assert await last_seq(h, agent, cust.id) == sent.seq

    await cust.end()
    ended = await last_seq(h, agent, cust.id)
    err = await expect_error(cust.send("after ending"), grpc.StatusCode.FAILED_PRECONDITION)
    assert "ended" in err.details()
    await agent.close(cust.id)
    closed = await last_seq(h, agent, cust.id)
    assert closed > ended
    await expect_error(agent.send(cust.id, "too late"), grpc.StatusCode.FAILED_PRECONDITION, "CONVERSATION_CLOSED")
    assert await agent.send(cust.id, "before the end", request_id="a-1") == sent  # answered as it was
    assert await last_seq(h, agent, cust.id) == closed


async def test_a_customer_token_for_another_conversation_is_refused(server):
    h = server
    _, cust = await connected(h)
    other = await h.customer("sales", {"name": "Bo"})
    req = cust_pb.CustomerServiceSendMessageRequest(conversation_id=cust.id, text="x", request_id="r")
    await expect_error(other.stub.SendMessage(req, metadata=other.md), grpc.StatusCode.PERMISSION_DENIED)


def test_json_around_finds_the_key_and_never_a_lookalike_inside_a_string():
    import json

    from queuechat.domain.log import json_around

    payload = {"id": 'x "display_name":"" y', "sender": {"kind": "k", "display_name": ""}, "text": '"display_name":""'}
    head, tail = json_around(payload, "display_name", "")
    spliced = json.loads(head + json.dumps('Åsa "Q" \\') + tail)
    assert spliced == {**payload, "sender": {"kind": "k", "display_name": 'Åsa "Q" \\'}}
    with pytest.raises(LookupError):
        json_around({"variables": [1]}, "variables", [])
