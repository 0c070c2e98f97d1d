"""A whole chat through the gRPC stubs on PostgreSQL, across server restarts.

Same server, same harness as the SQLite tests; only the database URL differs
(a private schema per test, see pgutil). After each restart the clients come
back with their tokens and resume their streams from a cursor: every event
must arrive exactly once, in seq order, with nothing lost.
"""

from __future__ import annotations

import pytest
from harness import AgentClient, CustomerClient, Harness, auth, base_config, is_event
from pgutil import pg_url  # noqa: F401  (fixture)

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb


@pytest.fixture
async def pg_server(tmp_path, pg_url):  # noqa: F811
    h = await Harness(tmp_path / "data", base_config(), database_url=pg_url).start()
    try:
        yield h
    finally:
        await h.stop()


def rejoin_agent(h: Harness, old: AgentClient) -> AgentClient:
    """The same logged-in agent, reconnected to the restarted server with its token."""
    client = AgentClient(h, h.agent_stub, old.token, old.agent_id)
    h._clients.append(client)  # stopped with the harness
    return client


def rejoin_customer(h: Harness, old: CustomerClient) -> CustomerClient:
    client = CustomerClient(h, h.customer_stub, old.token, old.conversation)
    h._clients.append(client)
    return client


def event_seqs(stream) -> list[int]:
    return [e.seq for e in stream.events()]


def texts(events) -> list[str]:
    return [e.message.text for e in events if e.WhichOneof("kind") == "message"]


async def caught_up(stream, start: int = 0):
    """The stream's first heartbeat from index start: the backlog has been sent."""
    return await stream.wait_for(lambda i: i.HasField("heartbeat"), start=start)


async def test_chat_on_postgresql_survives_restarts(pg_server):
    h = pg_server
    assert h.core.db.engine.dialect.name == "postgresql"

    # --- offer, accept, messages both ways, a private note ---------------------
    alice = await h.agent("agent1")
    cust = await h.customer("sales", {"name": "Ada", "email": "ada@example.com"})
    cust.open()
    offer = await alice.wait_offer(cust.id)
    assert offer.kind == agent_pb.OFFER_KIND_CHAT and offer.queue.queue_id == "sales"
    assert offer.expire_time.ToDatetime() > offer.create_time.ToDatetime() >= offer.enqueue_time.ToDatetime()
    conv = await alice.accept(offer.offer_id)
    assert conv.state == rpb.CONVERSATION_STATE_ACTIVE and [a.agent_id for a in conv.agents] == ["agent1"]
    assert (await alice.wait_offer_update(offer.offer_id)).state == agent_pb.OFFER_STATE_ACCEPTED

    stream = alice.open_conversation(cust.id)
    first = await cust.send("Hi, my order is late", request_id="cust-1")
    await stream.wait_for(is_event("message", lambda e: e.message.text == "Hi, my order is late"))
    await alice.send(cust.id, "Let me check", request_id="agent-1")
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "Let me check"))
    note = await alice.send(cust.id, "note: VIP customer", private=True, request_id="agent-2")
    assert note.visibility == rpb.VISIBILITY_AGENTS_ONLY
    await stream.wait_for(is_event("message", lambda e: e.message.text == "note: VIP customer"))
    assert "note: VIP customer" not in texts(cust.stream.events())

    agent_seen = event_seqs(stream)
    assert agent_seen == list(range(1, note.seq + 1))
    agent_before = {e.seq: e for e in stream.events()}
    cust_before = {e.seq: e for e in cust.stream.events()}
    feed_seq = max(i.event.seq for i in alice.offers.items if i.HasField("event"))

    # --- restart in the middle of the chat ------------------------------------------
    await h.restart()
    alice = rejoin_agent(h, alice)
    cust = rejoin_customer(h, cust)

    # The offer feed resumes after its cursor: the answered offer is not offered again.
    offers = alice.open_offers(after_seq=feed_seq)
    beat = await caught_up(offers)
    assert beat.heartbeat.latest_seq == feed_seq
    assert [i for i in offers.items if i.HasField("event")] == []

    # Both sides resume from their last seen seq: nothing is replayed, nothing missing.
    stream = alice.open_conversation(cust.id, after_seq=agent_seen[-1])
    cust_stream = cust.open(after_seq=max(cust_before))
    assert (await caught_up(stream)).heartbeat.latest_seq == agent_seen[-1]
    await caught_up(cust_stream)
    assert stream.events() == [] and cust_stream.events() == []

    # Retries of requests stored before the restart are answered, not stored again.
    again = await cust.send("Hi, my order is late", request_id="cust-1")
    assert (again.seq, again.message.message_id) == (first.seq, first.message.message_id)
    again = await alice.send(cust.id, "note: VIP customer", private=True, request_id="agent-2")
    assert again.seq == note.seq

    # The chat goes on with the next seq.
    sent = await cust.send("Order 1234", request_id="cust-2")
    assert sent.seq == note.seq + 1
    await stream.wait_for(is_event("message", lambda e: e.message.text == "Order 1234"))
    await alice.send(cust.id, "It ships today", request_id="agent-3")
    await cust_stream.wait_for(is_event("message", lambda e: e.message.text == "It ships today"))
    await alice.send(cust.id, "note: sent voucher", private=True, request_id="agent-4")
    await stream.wait_for(is_event("message", lambda e: e.message.text == "note: sent voucher"))

    # A new chat after the restart is routed (dispatch and recovery SQL on PostgreSQL).
    other = await h.customer("support", {"name": "Bob"})
    other_offer = await alice.wait_offer(other.id)
    await alice.accept(other_offer.offer_id)

    # --- close with confirmation ---------------------------------------------------
    closed = await alice.close(cust.id, confirm=True)
    assert closed.conversation.state == rpb.CONVERSATION_STATE_CLOSED
    await stream.wait_for(is_event("chat_closed"))
    await stream.wait_done()
    ended = await cust_stream.wait_for(is_event("chat_ended"))
    assert ended.event.chat_ended.ended_by.agent_id == "agent1"
    await cust_stream.wait_done()

    agent_all = list(agent_before.values()) + stream.events()
    cust_all = list(cust_before.values()) + cust_stream.events()
    last = agent_all[-1].seq
    assert [e.seq for e in agent_all] == list(range(1, last + 1))
    assert agent_all[-1].WhichOneof("kind") == "chat_closed"
    # The customer saw every public event once, in order, and no private one.
    assert [e.seq for e in cust_all] == [e.seq for e in agent_all if e.visibility != rpb.VISIBILITY_AGENTS_ONLY][
        : len(cust_all)
    ]
    assert cust_all[-1].WhichOneof("kind") == "chat_ended"
    assert not any(t.startswith("note:") for t in texts(cust_all))

    # --- export: the organisation's full log ---------------------------------------
    token = await h.admin_token()
    export = await h.admin_stub.ExportConversation(
        admin_pb.ExportConversationRequest(conversation_id=cust.id), metadata=auth(token)
    )
    assert export.conversation.state == rpb.CONVERSATION_STATE_CLOSED
    assert list(export.events) == agent_all
    assert texts(export.events) == [
        "Hi, my order is late",
        "Let me check",
        "note: VIP customer",
        "Order 1234",
        "It ships today",
        "note: sent voucher",
    ]
    private = [e.message.text for e in export.events if e.visibility == rpb.VISIBILITY_AGENTS_ONLY]
    assert private == ["note: VIP customer", "note: sent voucher"]
    times = [e.create_time.ToDatetime() for e in export.events]
    assert times == sorted(times)

    # --- restart again: the closed conversation replays exactly ----------------------
    await h.restart()
    alice = rejoin_agent(h, alice)
    cust = rejoin_customer(h, cust)

    mid = note.seq
    tail = alice.open_conversation(cust.id, after_seq=mid)
    await tail.wait_done()
    assert tail.error is None
    assert tail.events() == [e for e in export.events if e.seq > mid]

    full = alice.open_conversation(cust.id, after_seq=0)
    await full.wait_done()
    assert full.error is None and full.events() == list(export.events)

    replay = cust.open(after_seq=0)
    await replay.wait_done()
    assert replay.error is None and replay.events() == cust_all

    export_again = await h.admin_stub.ExportConversation(
        admin_pb.ExportConversationRequest(conversation_id=cust.id), metadata=auth(await h.admin_token())
    )
    assert export_again == export

    # The other chat is still the agent's after both restarts.
    listed = await alice.stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=alice.md)
    assert [c.conversation_id for c in listed.conversations] == [other.id]


async def test_connections_the_database_drops_are_replaced_without_an_error(tmp_path):
    """The server pings no connection before using it (a round trip per write and read): when the database
    drops them all (a restart, a failover, an idle timeout), the next read and write must still work, on new
    connections, with nothing written twice."""
    import psycopg
    from pgutil import create_schema, drop_schema, pg_user, schema_url

    schema = create_schema()
    app = f"qc-drop-{schema}"
    h = await Harness(tmp_path / "data", base_config(), database_url=schema_url(schema, application_name=app)).start()
    try:
        alice = await h.agent("agent1")
        cust = await h.customer("sales", {"name": "Ada"})
        cust.open()
        conv = await alice.accept((await alice.wait_offer(cust.id)).offer_id)
        await cust.send("before", request_id="c-1")

        def drop_all() -> int:
            with psycopg.connect(host="127.0.0.1", dbname="test", user=pg_user(), autocommit=True) as admin:
                rows = admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s", (app,)
                ).fetchall()
            return len(rows)

        assert drop_all() >= 2  # the writer's connection and at least one reader's
        listed = await alice.stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=alice.md)
        assert [c.conversation_id for c in listed.conversations] == [conv.conversation_id]
        sent = await alice.send(cust.id, "after", request_id="a-1")
        await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "after"))

        assert drop_all() >= 1
        again = await cust.send("after the second drop", request_id="c-2")
        assert again.seq == sent.seq + 1
        assert [t for t in texts(cust.stream.events())] == ["before", "after", "after the second drop"]
    finally:
        await h.stop()
        drop_schema(schema)


@pytest.mark.parametrize("path", ["one statement", "general"])
async def test_a_send_waiting_for_the_row_sees_a_leave_committed_meanwhile(tmp_path, path):
    """Another node's leave holds the conversation's row; the agent's send waits for it. Once the leave
    commits, the send must see it: refused, nothing stored. (Its reads other than the row are of its
    statement's snapshot, from before the wait: it must notice and look again.)"""
    import asyncio
    import json

    import grpc
    import psycopg
    from harness import expect_error
    from pgutil import create_schema, drop_schema, pg_user, schema_url

    schema = create_schema()
    h = await Harness(tmp_path / "data", base_config(), database_url=schema_url(schema)).start()
    other = psycopg.connect(host="127.0.0.1", dbname="test", user=pg_user(), options=f"-csearch_path={schema}")
    try:
        alice = await h.agent("agent1")
        cust = await h.customer("sales")
        cust.open()
        await alice.accept((await alice.wait_offer(cust.id)).offer_id)
        before = await cust.send("hello")

        # "Another node" leaves: claims the seq and marks the agent gone, and holds the row until it commits.
        seq = other.execute("UPDATE conversation SET last_seq = last_seq + 1 WHERE id = %s RETURNING last_seq",
                            (cust.id,)).fetchone()[0]  # fmt: skip
        other.execute("UPDATE participant SET left_at = now() WHERE conversation_id = %s AND agent_id = 'agent1'",
                      (cust.id,))  # fmt: skip
        other.execute("UPDATE agent SET load = load - 1 WHERE id = 'agent1'")  # its seat back, as a leave does
        who = {"kind": "PARTICIPANT_KIND_AGENT", "agent_id": "agent1", "display_name": "Agent 1"}
        other.execute(
            "INSERT INTO conversation_event (conversation_id, seq, kind, visibility, created_at, actor, payload)"
            " VALUES (%s, %s, 'participant_left', 'all', now(), 'agent:agent1', %s)",
            (cust.id, seq, json.dumps({"participant": who})),
        )
        kw = {"predefined_message_id": "hello"} if path == "general" else {}
        sending = asyncio.ensure_future(alice.send(cust.id, "" if kw else "sneaky", **kw))

        def waiting() -> int:
            with psycopg.connect(host="127.0.0.1", dbname="test", user=pg_user()) as probe:
                return probe.execute(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE NOT l.granted AND a.query LIKE '%%conversation%%' AND a.pid <> %s",
                    (other.info.backend_pid,),
                ).fetchone()[0]

        deadline = asyncio.get_running_loop().time() + 10
        while not await asyncio.to_thread(waiting):  # the send is blocked on the row
            assert asyncio.get_running_loop().time() < deadline, "the send never waited for the row"
            assert not sending.done(), "the send did not wait for the row"
            await asyncio.sleep(0.02)
        other.commit()
        await expect_error(sending, grpc.StatusCode.PERMISSION_DENIED, "NOT_A_PARTICIPANT")
        replay = cust.open(after_seq=before.seq)
        await replay.wait_for(lambda i: i.HasField("heartbeat"))
        assert [e.seq for e in replay.events()] == [seq]  # the leave, and no message after it
    finally:
        other.close()
        await h.stop()
        drop_schema(schema)
