"""The whole chat flow through the stubs: offer, accept, messages, menus, end, close."""

import grpc
from harness import expect_error, is_event

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb


async def test_customer_agent_chat_end_to_end(server):
    alice = await server.agent("agent1")
    cust = await server.customer("sales", {"name": "Ada", "email": "ada@example.com"})
    cust.open()

    offer = await alice.wait_offer(cust.id)
    assert offer.kind == agent_pb.OFFER_KIND_CHAT
    assert offer.queue.queue_id == "sales"
    assert {v.name: (v.value, v.authenticated) for v in offer.variables} == {
        "name": ("Ada", False),
        "email": ("ada@example.com", False),
    }
    assert offer.expire_time.ToDatetime() > offer.create_time.ToDatetime()

    conv = await alice.accept(offer.offer_id)
    assert conv.state == rpb.CONVERSATION_STATE_ACTIVE
    assert [a.agent_id for a in conv.agents] == ["agent1"]
    update = await alice.wait_offer_update(offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_ACCEPTED

    # The customer is told which agent joined.
    joined = await cust.stream.wait_for(is_event("participant_joined", lambda e: e.participant_joined.participant.agent_id == "agent1"))
    assert joined.event.participant_joined.participant.display_name == "Agent 1"

    stream = alice.open_conversation(cust.id)
    await cust.send("Hi, I need help")
    got = await stream.wait_for(is_event("message", lambda e: e.message.text == "Hi, I need help"))
    assert got.event.message.sender.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    assert got.event.message.sender.display_name == "Ada"

    await alice.send(cust.id, "Sure, what is it?")
    got = await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "Sure, what is it?"))
    assert got.event.message.sender.agent_id == "agent1"

    # Sequence numbers are gap-free and increasing on the agent's stream.
    seqs = [e.seq for e in stream.events()]
    assert seqs == list(range(1, len(seqs) + 1))

    # Customer ends: the agent is told, and closing then needs no confirmation.
    await cust.end()
    ended = await stream.wait_for(is_event("chat_ended"))
    assert ended.event.chat_ended.ended_by.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    closed = await alice.close(cust.id)
    assert closed.conversation.state == rpb.CONVERSATION_STATE_CLOSED
    await stream.wait_for(is_event("chat_closed"))
    await stream.wait_done()


async def test_queue_position_updates_while_waiting(server):
    first = await server.customer("support")
    second = await server.customer("support")
    third = await server.customer("support")
    third.open()
    pos = await third.stream.wait_for(lambda i: i.HasField("queue_position"))
    assert (pos.queue_position.position, pos.queue_position.waiting_count) == (3, 3)

    await first.end()
    await third.stream.wait_for(lambda i: i.HasField("queue_position") and i.queue_position.position == 2)

    agent = await server.agent("agent1", "support")
    await agent.take(second.id)
    await third.stream.wait_for(lambda i: i.HasField("queue_position") and i.queue_position.position == 1)


async def test_send_message_request_id_is_idempotent_and_text_is_checked(server):
    alice = await server.agent("agent1")
    cust = await server.customer()
    await alice.take(cust.id)

    a = await cust.send("once", request_id="req-1")
    b = await cust.send("once", request_id="req-1")
    assert a.seq == b.seq and a.message.message_id == b.message.message_id
    # The same request_id from another sender is another message.
    c = await alice.send(cust.id, "mine", request_id="req-1")
    assert c.seq == a.seq + 1

    await expect_error(cust.send("   "), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGE")
    await expect_error(cust.send("x" * 4001), grpc.StatusCode.INVALID_ARGUMENT, "MESSAGE_TOO_LONG")
    ok = await cust.send("x" * 4000)
    assert len(ok.message.text) == 4000
    await expect_error(cust.send("hi", request_id="bad id!"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_REQUEST_ID")

    transcript = await cust.transcript()
    texts = [e.message.text for e in transcript.events if e.HasField("message")]
    assert texts.count("once") == 1 and "x" * 4000 in texts

    # A retry is answered as its first try was, whatever happened since: the customer ended the chat,
    # the agent closed it. A new request is refused, and no seq is used up by any of these.
    last = await alice.send(cust.id, "bye", request_id="req-2")
    await cust.end()
    assert (await cust.send("once", request_id="req-1")).seq == a.seq
    await expect_error(cust.send("again", request_id="req-3"), grpc.StatusCode.FAILED_PRECONDITION, "CHAT_ENDED")
    await alice.close(cust.id, confirm=True)
    assert (await alice.send(cust.id, "bye", request_id="req-2")).seq == last.seq
    await expect_error(alice.send(cust.id, "more"), grpc.StatusCode.FAILED_PRECONDITION, "CONVERSATION_CLOSED")
    seqs = [e.seq for e in (await cust.transcript()).events]
    assert seqs == list(range(1, len(seqs) + 1))  # gap-free: no retry kept a seq


async def test_predefined_messages(server):
    alice = await server.agent("agent1", "sales")
    listed = await alice.stub.ListPredefinedMessages(agent_pb.ListPredefinedMessagesRequest(), metadata=alice.md)
    # Global and the sales queue's; not the support profile's.
    assert {m.predefined_message_id for m in listed.predefined_messages} == {"hello", "sales-deal"}
    assert {m.title: m.body for m in listed.predefined_messages}["Hello"] == "Hello, how can I help?"

    cust = await server.customer("sales")
    cust.open()
    await alice.take(cust.id)
    ev = await alice.send(cust.id, predefined_message_id="sales-deal")
    assert ev.message.text == "Two months free."
    assert ev.message.predefined_message_id == "sales-deal"
    got = await cust.stream.wait_for(is_event("message", lambda e: e.message.predefined_message_id == "sales-deal"))
    assert got.event.message.text == "Two months free."

    await expect_error(
        alice.send(cust.id, predefined_message_id="support-hours"),
        grpc.StatusCode.NOT_FOUND,
        "PREDEFINED_MESSAGE_NOT_FOUND",
    )


async def test_offer_menu_answered_once(server):
    alice, cust = await server.chat()
    stream = alice.streams[cust.id]

    req = agent_pb.SendOfferMenuRequest(
        conversation_id=cust.id,
        request_id="menu-1",
        prompt="What do you need?",
        options=[rpb.OfferMenuOption(option_id="bill", label="Billing"), rpb.OfferMenuOption(option_id="tech", label="Tech")],
    )
    sent = (await alice.stub.SendOfferMenu(req, metadata=alice.md)).event
    again = (await alice.stub.SendOfferMenu(req, metadata=alice.md)).event
    assert sent.seq == again.seq
    menu = (await cust.stream.wait_for(is_event("offer_menu"))).event.offer_menu
    assert [o.label for o in menu.options] == ["Billing", "Tech"]

    await expect_error(cust.choose(menu.menu_id, "nope"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_OPTION")
    await expect_error(cust.choose("no-such-menu", "bill"), grpc.StatusCode.NOT_FOUND, "MENU_NOT_FOUND")
    chosen = await cust.choose(menu.menu_id, "tech")
    assert chosen.option_chosen.label == "Tech"
    got = await stream.wait_for(is_event("option_chosen"))
    assert (got.event.option_chosen.menu_id, got.event.option_chosen.option_id) == (menu.menu_id, "tech")
    # A retry of the same answer (its response was lost) gets the same event back; another answer is refused.
    again = await cust.choose(menu.menu_id, "tech")
    assert again.seq == chosen.seq
    await expect_error(cust.choose(menu.menu_id, "bill"), grpc.StatusCode.FAILED_PRECONDITION, "OPTION_ALREADY_CHOSEN")
    assert len(stream.events("option_chosen")) == 1


async def test_offer_menu_validation(server):
    alice = await server.agent("agent1")
    cust = await server.customer()
    await alice.take(cust.id)

    def menu(n, ids=None):
        ids = ids or [f"o{i}" for i in range(n)]
        return agent_pb.SendOfferMenuRequest(
            conversation_id=cust.id, prompt="Pick", options=[rpb.OfferMenuOption(option_id=i, label=i.upper()) for i in ids]
        )

    await expect_error(alice.stub.SendOfferMenu(menu(1), metadata=alice.md), grpc.StatusCode.INVALID_ARGUMENT, "OPTION_COUNT")
    await expect_error(alice.stub.SendOfferMenu(menu(11), metadata=alice.md), grpc.StatusCode.INVALID_ARGUMENT, "OPTION_COUNT")
    await expect_error(
        alice.stub.SendOfferMenu(menu(2, ["a", "a"]), metadata=alice.md), grpc.StatusCode.INVALID_ARGUMENT, "OPTION_IDS"
    )
    for n in (2, 10):
        await alice.stub.SendOfferMenu(menu(n), metadata=alice.md)
    # Refused menus changed nothing: exactly the two good ones are in the log.
    t = await cust.transcript()
    assert [len(e.offer_menu.options) for e in t.events if e.HasField("offer_menu")] == [2, 10]


async def test_private_messages_reach_agents_only(server):
    alice, cust = await server.chat()
    stream = alice.streams[cust.id]

    note = await alice.send(cust.id, "internal note: VIP", private=True)
    assert note.visibility == rpb.VISIBILITY_AGENTS_ONLY
    await alice.send(cust.id, "public hello")
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "public hello"))
    await stream.wait_for(is_event("message", lambda e: e.message.text == "internal note: VIP"))
    assert all("VIP" not in e.message.text for e in cust.stream.events("message"))

    # The customer's cursors do not even count private events.
    await alice.send(cust.id, "second note", private=True)
    n = len(cust.stream.items)
    hb = await cust.stream.wait_for(lambda i: i.HasField("heartbeat"), start=n)
    public_last = cust.stream.events()[-1].seq
    assert hb.heartbeat.latest_seq == public_last
    got = await cust.stub.GetConversation(
        cust_pb.CustomerServiceGetConversationRequest(conversation_id=cust.id), metadata=cust.md
    )
    assert got.conversation.last_seq == public_last

    # Not in the customer's transcript, nor on a replay from seq 0.
    t = await cust.transcript()
    assert all("VIP" not in e.message.text for e in t.events)
    replay = cust.open(after_seq=0)
    await replay.wait_for(is_event("message", lambda e: e.message.text == "public hello"))
    assert all("VIP" not in e.message.text for e in replay.events("message"))
    # But in the organisation's chat log, marked private.
    from harness import auth

    from chat.v1 import admin_service_pb2 as admin_pb

    token = await server.admin_token()
    log = await server.admin_stub.ExportConversation(
        admin_pb.ExportConversationRequest(conversation_id=cust.id), metadata=auth(token)
    )
    private = [e for e in log.events if e.HasField("message") and e.message.text == "internal note: VIP"]
    assert len(private) == 1 and private[0].visibility == rpb.VISIBILITY_AGENTS_ONLY


async def test_close_needs_confirmation_while_customer_connected(server):
    alice, cust = await server.chat()

    await expect_error(alice.close(cust.id), grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_STILL_CONNECTED")
    await expect_error(alice.leave(cust.id), grpc.StatusCode.FAILED_PRECONDITION, "LAST_AGENT_MUST_CLOSE")
    await alice.send(cust.id, "still open")  # the refusals changed nothing
    resp = await alice.close(cust.id, confirm=True)
    assert resp.conversation.state == rpb.CONVERSATION_STATE_CLOSED
    ended = await cust.stream.wait_for(is_event("chat_ended"))
    assert ended.event.chat_ended.ended_by.agent_id == "agent1"
    await cust.stream.wait_done()
    await expect_error(cust.send("hello?"), grpc.StatusCode.FAILED_PRECONDITION, "CONVERSATION_CLOSED")
    await expect_error(alice.send(cust.id, "late"), grpc.StatusCode.FAILED_PRECONDITION, "CONVERSATION_CLOSED")
