"""AdminService through the stubs: configuration CRUD, settings, the conversation list."""

import base64
import json
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from harness import auth, expect_error
from sqlmodel import SQLModel, select

from chat.v1 import admin_service_pb2 as pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.store.models import Offer, Setting

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
async def admin(server):
    """The admin stub with its token bound: admin.CreateQueue(request)."""
    md = auth(await server.admin_token())
    stub = server.admin_stub

    class Bound:
        def __getattr__(self, name):
            return lambda request: getattr(stub, name)(request, metadata=md)

    return Bound()


async def db_dump(server):
    """Every row of every table, plus the in-memory settings."""

    def run(s):
        conn = s.connection()
        return {
            t.name: sorted(map(tuple, conn.execute(t.select()).all()), key=repr)
            for t in SQLModel.metadata.sorted_tables
        }

    return await server.core.db.read(run), server.core.settings


async def refuse(server, call, code, reason):
    """call is refused with code/reason, and changes nothing."""
    before = await db_dump(server)
    await expect_error(call, code, reason)
    assert await db_dump(server) == before


async def writer_idle(server):
    """Writes run one at a time in order: once this one ran, those queued before it have too."""
    await server.core.write(lambda tx: None)


async def offers_for(server, conversation_id):
    return await server.core.db.read(
        lambda s: s.exec(select(Offer).where(Offer.conversation_id == conversation_id)).all()
    )


def duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def settings(offer=30.0, cooldown=30.0, grace=0.5, rating=3600.0) -> pb.Settings:
    return pb.Settings(
        offer_timeout=duration(offer),
        reject_cooldown=duration(cooldown),
        stream_grace=duration(grace),
        rating_window=duration(rating),
    )


def account(agent_id="newbie", name="New Bie", profiles=("sales",), password="", max_chats=0) -> pb.AgentAccount:
    return pb.AgentAccount(
        agent_id=agent_id, display_name=name, profile_ids=list(profiles), password=password, max_chats=max_chats
    )


async def agent_login(server, username, password, profile):
    return await server.agent_stub.Login(
        agent_pb.LoginRequest(username=username, password=password, profile_id=profile)
    )


BAD_IDS = ["", "Sales", "-x", "_x", "a b", "x" * 65, "abc\n", "é"]


def bad_id_reason(bad: str) -> str:
    """Control characters are refused before any field's own rules, in every request."""
    return "BAD_CHARACTERS" if "\n" in bad else "BAD_ID"


# --- authentication -----------------------------------------------------------------


async def test_every_call_but_login_needs_an_admin_token(server):
    agent = await server.agent("agent1", offers=False)
    service = pb.DESCRIPTOR.services_by_name["AdminService"]
    methods = [m for m in service.methods if m.name != "Login"]
    assert len(methods) == 25
    for m in methods:
        call = getattr(server.admin_stub, m.name)
        request = getattr(pb, m.input_type.name)()
        for md in ((), auth(agent.token), auth("qadm_garbage"), (("authorization", "Basic abc"),)):
            pending = call(request, metadata=md)
            if m.server_streaming:
                pending = _drain(pending)
            await expect_error(pending, grpc.StatusCode.UNAUTHENTICATED, "ADMIN_SESSION_INVALID")

    # Refused before anything is looked at: a valid write by a non-admin changes nothing.
    await refuse(
        server,
        server.admin_stub.CreateQueue(
            pb.CreateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name="Billing")),
            metadata=auth(agent.token),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
        "ADMIN_SESSION_INVALID",
    )


# --- queues ------------------------------------------------------------------------------


async def test_queue_crud(server, admin):
    listed = await admin.ListQueues(pb.AdminServiceListQueuesRequest())
    assert [(q.queue_id, q.display_name) for q in listed.queues] == [("sales", "Sales"), ("support", "Support")]

    created = await admin.CreateQueue(
        pb.CreateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name=" Billing "))
    )
    assert (created.queue.queue_id, created.queue.display_name) == ("billing", "Billing")
    updated = await admin.UpdateQueue(
        pb.UpdateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name="Invoices"))
    )
    assert updated.queue.display_name == "Invoices"
    listed = await admin.ListQueues(pb.AdminServiceListQueuesRequest())
    assert (listed.queues[0].queue_id, listed.queues[0].display_name) == ("billing", "Invoices")
    # Customers see it at once.
    cust_queues = await server.customer_stub.ListQueues(cust_pb.ListQueuesRequest())
    assert "billing" in [q.queue_id for q in cust_queues.queues]

    create = lambda qid, name="X": admin.CreateQueue(
        pb.CreateQueueRequest(queue=rpb.Queue(queue_id=qid, display_name=name))
    )
    update = lambda qid, name="X": admin.UpdateQueue(
        pb.UpdateQueueRequest(queue=rpb.Queue(queue_id=qid, display_name=name))
    )
    await refuse(server, create("billing"), EXISTS, "QUEUE_EXISTS")
    for bad in BAD_IDS:
        await refuse(server, create(bad), INVALID, bad_id_reason(bad))
    await refuse(server, create("ok", "   "), INVALID, "DISPLAY_NAME_REQUIRED")
    await refuse(server, create("ok", "x" * 201), INVALID, "DISPLAY_NAME_TOO_LONG")
    await refuse(server, update("billing", ""), INVALID, "DISPLAY_NAME_REQUIRED")
    await refuse(server, update("nope"), NOT_FOUND, "QUEUE_NOT_FOUND")
    await refuse(server, admin.DeleteQueue(pb.DeleteQueueRequest(queue_id="nope")), NOT_FOUND, "QUEUE_NOT_FOUND")

    await admin.DeleteQueue(pb.DeleteQueueRequest(queue_id="billing"))
    listed = await admin.ListQueues(pb.AdminServiceListQueuesRequest())
    assert [q.queue_id for q in listed.queues] == ["sales", "support"]


async def test_deleting_a_queue_drops_it_from_profiles_and_its_predefined_messages(server, admin):
    await admin.CreateQueue(pb.CreateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name="Billing")))
    await admin.UpdateProfile(
        pb.UpdateProfileRequest(
            profile=rpb.Profile(profile_id="sales", display_name="Sales", queue_ids=["sales", "billing"])
        )
    )
    await admin.CreatePredefinedMessage(
        pb.CreatePredefinedMessageRequest(
            predefined_message=rpb.PredefinedMessage(
                predefined_message_id="inv", title="Inv", body="b", queue_id="billing"
            )
        )
    )
    await admin.DeleteQueue(pb.DeleteQueueRequest(queue_id="billing"))
    profiles = {p.profile_id: list(p.queue_ids) for p in (await admin.ListProfiles(pb.ListProfilesRequest())).profiles}
    assert profiles["sales"] == ["sales"]
    listed = await admin.ListPredefinedMessages(pb.AdminServiceListPredefinedMessagesRequest())
    assert "inv" not in [m.predefined_message_id for m in listed.predefined_messages]


async def test_a_queue_with_conversations_cannot_be_deleted(server, admin):
    await admin.CreateQueue(pb.CreateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name="Billing")))
    waiting = await server.customer("billing")
    await refuse(server, admin.DeleteQueue(pb.DeleteQueueRequest(queue_id="billing")), PRECONDITION, "QUEUE_IN_USE")
    # Closed ones count too: they keep their queue for the record.
    ended = await waiting.end()
    assert ended.conversation.state == rpb.CONVERSATION_STATE_CLOSED
    await refuse(server, admin.DeleteQueue(pb.DeleteQueueRequest(queue_id="billing")), PRECONDITION, "QUEUE_IN_USE")


# --- profiles ---------------------------------------------------------------------------


async def test_profile_crud(server, admin):
    listed = await admin.ListProfiles(pb.ListProfilesRequest())
    assert {p.profile_id: list(p.queue_ids) for p in listed.profiles} == {
        "both": ["sales", "support"],
        "sales": ["sales"],
        "support": ["support"],
    }
    profile = lambda pid="night", name="Night", queues=("support", "sales", "support"): rpb.Profile(
        profile_id=pid, display_name=name, queue_ids=list(queues)
    )
    created = await admin.CreateProfile(pb.CreateProfileRequest(profile=profile()))
    assert (created.profile.profile_id, created.profile.display_name, list(created.profile.queue_ids)) == (
        "night",
        "Night",
        ["sales", "support"],
    )
    updated = await admin.UpdateProfile(pb.UpdateProfileRequest(profile=profile(name="Nights", queues=["sales"])))
    assert (updated.profile.display_name, list(updated.profile.queue_ids)) == ("Nights", ["sales"])
    emptied = await admin.UpdateProfile(pb.UpdateProfileRequest(profile=profile(queues=[])))
    assert list(emptied.profile.queue_ids) == []

    create = lambda p: admin.CreateProfile(pb.CreateProfileRequest(profile=p))
    update = lambda p: admin.UpdateProfile(pb.UpdateProfileRequest(profile=p))
    await refuse(server, create(profile()), EXISTS, "PROFILE_EXISTS")
    for bad in BAD_IDS:
        await refuse(server, create(profile(pid=bad)), INVALID, bad_id_reason(bad))
    await refuse(server, create(profile(pid="x", name="")), INVALID, "DISPLAY_NAME_REQUIRED")
    await refuse(server, create(profile(pid="x", queues=["sales", "nope"])), INVALID, "UNKNOWN_QUEUE")
    await refuse(server, create(profile(pid="x", queues=["Sales"])), INVALID, "BAD_ID")
    await refuse(server, update(profile(queues=["sales", "nope"])), INVALID, "UNKNOWN_QUEUE")
    await refuse(server, update(profile(pid="nope")), NOT_FOUND, "PROFILE_NOT_FOUND")
    await refuse(
        server, admin.DeleteProfile(pb.DeleteProfileRequest(profile_id="nope")), NOT_FOUND, "PROFILE_NOT_FOUND"
    )

    await admin.DeleteProfile(pb.DeleteProfileRequest(profile_id="night"))
    listed = await admin.ListProfiles(pb.ListProfilesRequest())
    assert "night" not in [p.profile_id for p in listed.profiles]


async def test_profile_in_use_and_deleted_after_logout(server, admin):
    agent = await server.agent("agent1", "support", offers=False)
    await refuse(
        server, admin.DeleteProfile(pb.DeleteProfileRequest(profile_id="support")), PRECONDITION, "PROFILE_IN_USE"
    )
    await agent.stub.Logout(agent_pb.LogoutRequest(), metadata=agent.md)
    await admin.DeleteProfile(pb.DeleteProfileRequest(profile_id="support"))
    agents = {a.agent_id: list(a.profile_ids) for a in (await admin.ListAgents(pb.ListAgentsRequest())).agents}
    assert agents["agent1"] == ["both", "sales"]
    listed = await admin.ListPredefinedMessages(pb.AdminServiceListPredefinedMessagesRequest())
    assert "support-hours" not in [m.predefined_message_id for m in listed.predefined_messages]
    await expect_error(agent_login(server, "agent1", "pw1", "support"), grpc.StatusCode.PERMISSION_DENIED)


async def test_profile_and_agent_updates_route_waiting_chats(server, admin):
    await admin.CreateProfile(pb.CreateProfileRequest(profile=rpb.Profile(profile_id="late", display_name="Late")))
    await admin.UpdateAgent(pb.UpdateAgentRequest(agent=account("agent1", "Agent 1", ["both", "late"], max_chats=1)))
    alice = await server.agent("agent1", "late")
    cust = await server.customer("sales")
    # The profile serves no queue yet (StartChat routes in its own write, so this is final).
    assert not await offers_for(server, cust.id)
    # Adding one routes the waiting chat at once.
    await admin.UpdateProfile(
        pb.UpdateProfileRequest(profile=rpb.Profile(profile_id="late", display_name="Late", queue_ids=["sales"]))
    )
    await alice.take(cust.id)
    # At capacity (max_chats 1); raising it routes the next chat.
    second = await server.customer("sales")
    assert not await offers_for(server, second.id)
    await admin.UpdateAgent(pb.UpdateAgentRequest(agent=account("agent1", "Agent 1", ["both", "late"], max_chats=2)))
    await alice.wait_offer(second.id)


# --- agents ---------------------------------------------------------------------------------


async def test_agent_crud_and_login(server, admin):
    created = await admin.CreateAgent(
        pb.CreateAgentRequest(agent=account(password="correct horse", profiles=["support", "sales"]))
    )
    assert created.agent == pb.AgentAccount(
        agent_id="newbie", display_name="New Bie", max_chats=3, profile_ids=["sales", "support"]
    )  # no password, default max_chats
    listed = {a.agent_id: a for a in (await admin.ListAgents(pb.ListAgentsRequest())).agents}
    assert listed["newbie"] == created.agent
    assert listed["agent1"].profile_ids == ["both", "sales", "support"] and not listed["agent1"].password

    # The new agent logs in with a granted profile, not with another.
    resp = await agent_login(server, "newbie", "correct horse", "sales")
    assert (resp.agent.agent_id, resp.agent.display_name, resp.agent.max_chats) == ("newbie", "New Bie", 3)
    assert (resp.profile.profile_id, list(resp.profile.queue_ids)) == ("sales", ["sales"])
    await expect_error(
        agent_login(server, "newbie", "correct horse", "both"), grpc.StatusCode.PERMISSION_DENIED, "PROFILE_NOT_ALLOWED"
    )

    # An empty password keeps the current one.
    updated = await admin.UpdateAgent(pb.UpdateAgentRequest(agent=account(name="Newt", profiles=["both"], max_chats=7)))
    assert updated.agent == pb.AgentAccount(agent_id="newbie", display_name="Newt", max_chats=7, profile_ids=["both"])
    resp = await agent_login(server, "newbie", "correct horse", "both")
    assert (resp.agent.display_name, resp.agent.max_chats) == ("Newt", 7)
    await admin.UpdateAgent(
        pb.UpdateAgentRequest(agent=account(name="Newt", profiles=["both"], password="battery staple"))
    )
    # A new password ends the sessions opened with the old one.
    await expect_error(
        server.agent_stub.Logout(agent_pb.LogoutRequest(), metadata=auth(resp.session_token)),
        grpc.StatusCode.UNAUTHENTICATED,
        "SESSION_INVALID",
    )
    await expect_error(
        agent_login(server, "newbie", "correct horse", "both"), grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS"
    )
    await agent_login(server, "newbie", "battery staple", "both")


async def test_agent_refusals(server, admin):
    create = lambda **kw: admin.CreateAgent(pb.CreateAgentRequest(agent=account(**{"password": "long enough", **kw})))
    update = lambda **kw: admin.UpdateAgent(pb.UpdateAgentRequest(agent=account(**kw)))
    await refuse(server, create(password=""), INVALID, "PASSWORD_REQUIRED")
    await refuse(server, create(password="short"), INVALID, "PASSWORD_TOO_SHORT")
    await refuse(server, create(agent_id="agent1"), EXISTS, "AGENT_EXISTS")
    for bad in BAD_IDS:
        await refuse(server, create(agent_id=bad), INVALID, bad_id_reason(bad))
    await refuse(server, create(name=" "), INVALID, "DISPLAY_NAME_REQUIRED")
    await refuse(server, create(profiles=["sales", "nope"]), INVALID, "UNKNOWN_PROFILE")
    await refuse(server, create(max_chats=-1), INVALID, "BAD_MAX_CHATS")
    await refuse(server, create(max_chats=51), INVALID, "BAD_MAX_CHATS")
    await create(agent_id="fifty", max_chats=50)

    # A refused update changes nothing, password included.
    await refuse(
        server, update(agent_id="agent1", profiles=["nope"], password="a new password"), INVALID, "UNKNOWN_PROFILE"
    )
    await refuse(server, update(agent_id="agent1", max_chats=51, password="a new password"), INVALID, "BAD_MAX_CHATS")
    await refuse(server, update(agent_id="agent1", name=""), INVALID, "DISPLAY_NAME_REQUIRED")
    await refuse(server, update(agent_id="agent1", password="short"), INVALID, "PASSWORD_TOO_SHORT")
    await refuse(server, update(agent_id="nope"), NOT_FOUND, "AGENT_NOT_FOUND")
    await refuse(server, update(agent_id="No!"), INVALID, "BAD_ID")
    await refuse(server, admin.DeleteAgent(pb.DeleteAgentRequest(agent_id="nope")), NOT_FOUND, "AGENT_NOT_FOUND")
    await agent_login(server, "agent1", "pw1", "both")


async def test_agent_in_use_cannot_be_deleted(server, admin):
    # Logged in: in use.
    bob = await server.agent("agent2", "sales")
    await refuse(server, admin.DeleteAgent(pb.DeleteAgentRequest(agent_id="agent2")), PRECONDITION, "AGENT_IN_USE")

    # Offered a chat and rejected it, then logged out: never took part, so deletable.
    cust = await server.customer("sales")
    offer = await bob.wait_offer(cust.id)
    await bob.reject(offer.offer_id)
    await bob.stub.Logout(agent_pb.LogoutRequest(), metadata=bob.md)
    await admin.DeleteAgent(pb.DeleteAgentRequest(agent_id="agent2"))
    agents = [a.agent_id for a in (await admin.ListAgents(pb.ListAgentsRequest())).agents]
    assert "agent2" not in agents
    await expect_error(
        agent_login(server, "agent2", "pw2", "sales"), grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS"
    )

    # Took part in a conversation: in use for good, even logged out and the chat closed.
    alice = await server.agent("agent1", "sales")
    await alice.take(cust.id)
    await alice.close(cust.id, confirm=True)
    await alice.stub.Logout(agent_pb.LogoutRequest(), metadata=alice.md)
    await alice.offers.wait_done()
    await writer_idle(server)  # the closed stream's bookkeeping write must not land inside refuse()
    await refuse(server, admin.DeleteAgent(pb.DeleteAgentRequest(agent_id="agent1")), PRECONDITION, "AGENT_IN_USE")


# --- predefined messages ----------------------------------------------------------------


async def test_predefined_message_crud_and_agents_see_it(server, admin):
    pm = lambda pid="", title="Bye", body="Goodbye!", queue="", profile="": rpb.PredefinedMessage(
        predefined_message_id=pid, title=title, body=body, queue_id=queue, profile_id=profile
    )
    create = lambda m: admin.CreatePredefinedMessage(pb.CreatePredefinedMessageRequest(predefined_message=m))
    update = lambda m: admin.UpdatePredefinedMessage(pb.UpdatePredefinedMessageRequest(predefined_message=m))

    generated = (await create(pm())).predefined_message
    assert len(generated.predefined_message_id) == 32 and int(generated.predefined_message_id, 16) >= 0
    assert (generated.title, generated.body, generated.queue_id, generated.profile_id) == ("Bye", "Goodbye!", "", "")
    named = (await create(pm("support-faq", "FAQ", "See the FAQ.", queue="support"))).predefined_message
    assert named.queue_id == "support"
    listed = await admin.ListPredefinedMessages(pb.AdminServiceListPredefinedMessagesRequest())
    assert {m.predefined_message_id for m in listed.predefined_messages} == {
        "hello",
        "sales-deal",
        "support-hours",
        "support-faq",
        generated.predefined_message_id,
    }

    # Agents see the global one at once, and the queue-scoped one only with a profile serving the queue.
    alice = await server.agent("agent1", "sales", offers=False)
    seen = await alice.stub.ListPredefinedMessages(agent_pb.ListPredefinedMessagesRequest(), metadata=alice.md)
    by_id = {m.predefined_message_id: m for m in seen.predefined_messages}
    assert by_id[generated.predefined_message_id].body == "Goodbye!"
    assert "support-faq" not in by_id

    moved = (await update(pm("support-faq", "FAQ", "Read the FAQ.", profile="sales"))).predefined_message
    assert (moved.body, moved.queue_id, moved.profile_id) == ("Read the FAQ.", "", "sales")
    seen = await alice.stub.ListPredefinedMessages(agent_pb.ListPredefinedMessagesRequest(), metadata=alice.md)
    assert {m.predefined_message_id: m.body for m in seen.predefined_messages}["support-faq"] == "Read the FAQ."

    await refuse(server, create(pm("hello")), EXISTS, "PREDEFINED_MESSAGE_EXISTS")
    for bad in BAD_IDS[1:]:  # empty generates one
        await refuse(server, create(pm(bad)), INVALID, bad_id_reason(bad))
    await refuse(server, create(pm(title=" ")), INVALID, "TITLE_REQUIRED")
    await refuse(server, create(pm(body="")), INVALID, "BODY_REQUIRED")
    await refuse(server, create(pm(body="x" * 4001)), INVALID, "BODY_TOO_LONG")
    await refuse(server, create(pm(queue="sales", profile="sales")), INVALID, "QUEUE_AND_PROFILE")
    await refuse(server, create(pm(queue="nope")), INVALID, "UNKNOWN_QUEUE")
    await refuse(server, create(pm(profile="nope")), INVALID, "UNKNOWN_PROFILE")
    await refuse(server, update(pm("hello", queue="nope")), INVALID, "UNKNOWN_QUEUE")
    await refuse(server, update(pm("hello", title="")), INVALID, "TITLE_REQUIRED")
    await refuse(server, update(pm("nope")), NOT_FOUND, "PREDEFINED_MESSAGE_NOT_FOUND")
    await refuse(server, update(pm("")), INVALID, "BAD_ID")
    await refuse(
        server,
        admin.DeletePredefinedMessage(pb.DeletePredefinedMessageRequest(predefined_message_id="nope")),
        NOT_FOUND,
        "PREDEFINED_MESSAGE_NOT_FOUND",
    )

    await admin.DeletePredefinedMessage(pb.DeletePredefinedMessageRequest(predefined_message_id="support-faq"))
    seen = await alice.stub.ListPredefinedMessages(agent_pb.ListPredefinedMessagesRequest(), metadata=alice.md)
    assert "support-faq" not in {m.predefined_message_id for m in seen.predefined_messages}


# --- settings ---------------------------------------------------------------------------------


async def test_update_settings_validates_stores_and_takes_effect(server, admin):
    for bad in (
        settings(offer=0),
        settings(offer=-1),
        settings(cooldown=86400.001),
        settings(grace=0),
        settings(rating=-1),
        pb.Settings(offer_timeout=duration(5), reject_cooldown=duration(5)),  # replaces the whole resource
    ):
        await refuse(server, admin.UpdateSettings(pb.UpdateSettingsRequest(settings=bad)), INVALID, "BAD_SETTING")

    new = settings(offer=2.5, cooldown=86400, grace=0.25)
    resp = await admin.UpdateSettings(pb.UpdateSettingsRequest(settings=new))
    assert resp.settings == new
    assert (await admin.GetSettings(pb.GetSettingsRequest())).settings == new
    stored = await server.core.db.read(lambda s: {r.key: r.value for r in s.exec(select(Setting))})
    assert (stored["offer_timeout"], stored["reject_cooldown"], stored["stream_grace"]) == ("2.5", "86400.0", "0.25")

    # The next offer uses the new timeout.
    alice = await server.agent("agent1")
    cust = await server.customer()
    offer = await alice.wait_offer(cust.id)
    assert offer.expire_time.ToDatetime() - offer.create_time.ToDatetime() == timedelta(seconds=2.5)


async def test_settings_changed_by_an_admin_survive_a_restart_unless_the_file_names_them(server, admin):
    new = settings(offer=7, cooldown=8, grace=9)
    await admin.UpdateSettings(pb.UpdateSettingsRequest(settings=new))
    # This configuration names no settings: the admin's values persist.
    del server.config_doc["settings"]
    await server.restart()
    token = auth(await server.admin_token())
    got = await server.admin_stub.GetSettings(pb.GetSettingsRequest(), metadata=token)
    assert got.settings == new
    # A file that names a setting wins for that one only.
    server.config_doc["settings"] = {"offer_timeout": 3.0}
    await server.restart()
    token = auth(await server.admin_token())
    got = await server.admin_stub.GetSettings(pb.GetSettingsRequest(), metadata=token)
    assert got.settings == settings(offer=3, cooldown=8, grace=9)


# --- conversations ----------------------------------------------------------------------------


async def test_list_conversations_pages_newest_first(server, admin):
    ids = [(await server.customer("sales" if i % 2 else "support", {"name": f"c{i}"})).id for i in range(5)]
    newest_first = ids[::-1]

    everything = await admin.ListConversations(pb.AdminServiceListConversationsRequest())
    assert [c.conversation_id for c in everything.conversations] == newest_first and not everything.next_page_token
    first = everything.conversations[-1]
    assert (first.queue.queue_id, first.queue.display_name, first.state) == (
        "support",
        "Support",
        rpb.CONVERSATION_STATE_QUEUED,
    )
    assert [(v.name, v.value) for v in first.variables] == [("name", "c0")]

    got, token, pages = [], "", 0
    while True:
        page = await admin.ListConversations(pb.AdminServiceListConversationsRequest(page_size=2, page_token=token))
        assert len(page.conversations) <= 2
        got += [c.conversation_id for c in page.conversations]
        pages += 1
        if pages == 1:
            await server.customer("sales")  # a chat started meanwhile does not shift later pages
        token = page.next_page_token
        if not token:
            break
    assert got == newest_first and pages == 3

    big = await admin.ListConversations(pb.AdminServiceListConversationsRequest(page_size=100000))
    assert len(big.conversations) == 6 and not big.next_page_token

    await expect_error(
        admin.ListConversations(pb.AdminServiceListConversationsRequest(page_size=-1)), INVALID, "BAD_PAGE_SIZE"
    )
    naive = base64.urlsafe_b64encode(json.dumps(["2024-01-01T00:00:00", "x"]).encode()).decode()
    for bad in ("garbage", "!!", "W10", naive):
        await expect_error(
            admin.ListConversations(pb.AdminServiceListConversationsRequest(page_token=bad)), INVALID, "BAD_PAGE_TOKEN"
        )


async def test_list_conversations_default_page_size(server, admin):
    for _ in range(51):
        await server.customer("sales")
    page = await admin.ListConversations(pb.AdminServiceListConversationsRequest())
    assert len(page.conversations) == 50 and page.next_page_token
    rest = await admin.ListConversations(pb.AdminServiceListConversationsRequest(page_token=page.next_page_token))
    assert len(rest.conversations) == 1 and not rest.next_page_token


async def _drain(call) -> None:
    async for _ in call:
        pass
