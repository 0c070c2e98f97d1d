"""Streams resume from their cursor: across reconnects and server restarts, nothing lost or repeated."""

import pytest
from harness import is_event

from chat.v1 import agent_service_pb2 as agent_pb


def texts(stream):
    return [e.message.text for e in stream.events("message")]


async def test_reconnect_with_last_seq_loses_and_repeats_nothing(server):
    a1, cust = await server.chat()
    stream = a1.streams[cust.id]
    for i in range(3):
        await cust.send(f"m{i}")
    await stream.wait_for(is_event("message", lambda e: e.message.text == "m2"))
    last = stream.events()[-1].seq
    await stream.cancel()

    for i in range(3, 6):
        await cust.send(f"m{i}")  # while the agent is away
    await a1.send(cust.id, "private while away", private=True)
    resumed = a1.open_conversation(cust.id, after_seq=last)
    await resumed.wait_for(is_event("message", lambda e: e.message.text == "private while away"))
    await cust.send("m6")  # live again
    await resumed.wait_for(is_event("message", lambda e: e.message.text == "m6"))
    assert texts(resumed) == ["m3", "m4", "m5", "private while away", "m6"]
    seqs = [e.seq for e in resumed.events()]
    assert seqs == list(range(last + 1, last + 1 + len(seqs)))

    # The customer resumes too, without the private message.
    c_last = [e for e in cust.stream.events() if e.HasField("message") and e.message.text == "m2"][0].seq
    await cust.stream.cancel()
    again = cust.open(after_seq=c_last)
    await again.wait_for(is_event("message", lambda e: e.message.text == "m6"))
    assert texts(again) == ["m3", "m4", "m5", "m6"]


async def test_idle_stream_gets_heartbeats_with_latest_seq(server):
    a1 = await server.agent("agent1")
    cust = await server.customer()
    await a1.take(cust.id)
    ev = await cust.send("hello")
    stream = a1.streams[cust.id]
    await stream.wait_for(is_event("message"))
    n = len(stream.items)
    hb = await stream.wait_for(lambda i: i.HasField("heartbeat"), start=n)
    assert hb.heartbeat.latest_seq == ev.seq
    assert hb.heartbeat.server_time.seconds > 0


@pytest.mark.configure(settings={"stream_grace": 30})
async def test_restart_with_the_same_sqlite_file_loses_nothing(server):
    a1 = await server.agent("agent1")
    cust = await server.customer("sales", {"name": "Ada"})
    cust.open()
    await a1.take(cust.id)
    await cust.send("before restart")
    await a1.send(cust.id, "answer before restart")
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "answer before restart"))
    c_last = cust.stream.events()[-1].seq
    waiting = await server.customer("sales")
    offer = await a1.wait_offer(waiting.id)
    feed_last = a1.offers.events()[-1].seq
    token, cust_token = a1.token, cust.token

    await server.restart()

    # Tokens survive; streams resume from their cursors.
    a1.stub, cust.stub = server.agent_stub, server.customer_stub
    assert a1.token == token and cust.token == cust_token
    feed = a1.open_offers(after_seq=feed_last)
    await feed.wait_for(lambda i: i.HasField("heartbeat"))
    assert feed.events() == []
    conv = await a1.accept(offer.offer_id)  # the pending offer survived
    assert conv.conversation_id == waiting.id

    resumed = cust.open(after_seq=c_last)
    s = a1.open_conversation(cust.id, after_seq=0)
    await cust.send("after restart")
    await resumed.wait_for(is_event("message", lambda e: e.message.text == "after restart"))
    await s.wait_for(is_event("message", lambda e: e.message.text == "after restart"))
    assert texts(resumed) == ["after restart"]
    assert texts(s) == ["before restart", "answer before restart", "after restart"]
    assert [e.seq for e in s.events()] == list(range(1, len(s.events()) + 1))
    listed = await a1.stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=a1.md)
    assert {c.conversation_id for c in listed.conversations} == {cust.id, waiting.id}
