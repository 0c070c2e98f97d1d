"""Authentication and authorisation: every refusal of the chat services, tried the way an attacker would.

1. AgentService without a valid session (no token, garbage, other principals' tokens, logged out)
2. Agent login: bad credentials, profiles, a new login ending the earlier session
3. Agents outside their conversations, offers and invites
4. CustomerService: missing and forged customer tokens, another customer's conversation
5. What a customer can see: never private messages, invite events or pending invites
6. Identity tokens on StartChat
7. AdminService with agent and customer tokens

Every refused attempt is aimed at real objects (a live conversation, a pending offer, an invite), so that
the credentials are the only reason to refuse, and each test checks afterwards that nothing changed.
"""

from __future__ import annotations

import base64
import json
import time
import uuid

import grpc
import jwt
import pytest
from google.protobuf import message_factory
from harness import IDENTITY_SECRET, auth, base_config, error_reason, expect_error, is_event

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_FOUND = grpc.StatusCode.NOT_FOUND

# Reasons an AgentService call may give for a token that is not a live session.
SESSION_REASONS = {"SESSION_INVALID", "SESSION_ENDED"}


# --- helpers -------------------------------------------------------------------------------------


async def consume(call) -> None:
    """Read a server stream that must be refused: any item before the error is a failure."""
    try:
        async for item in call:
            raise AssertionError(f"a refused stream sent {item!r}")
    finally:
        call.cancel()


async def expect_refusals(
    calls, code, reasons: set[str] | str, *, unimplemented_ok: frozenset[str] = frozenset()
) -> None:
    """Run every (name, factory) and collect the calls that were not refused as expected.

    Calls named in unimplemented_ok may also answer UNIMPLEMENTED: a call the server does not
    implement yet does nothing for anyone."""
    reasons = {reasons} if isinstance(reasons, str) else reasons
    failures = []
    for name, make in calls:
        try:
            await make()
        except grpc.aio.AioRpcError as e:
            if name in unimplemented_ok and e.code() == grpc.StatusCode.UNIMPLEMENTED:
                continue
            if e.code() != code:
                failures.append(f"{name}: expected {code}, got {e.code()}: {e.details()}")
            elif not e.details():
                failures.append(f"{name}: a refusal needs a human message")
            else:
                try:
                    reason = error_reason(e)
                except AssertionError as missing:
                    failures.append(f"{name}: {missing}")
                else:
                    if reason not in reasons:
                        failures.append(f"{name}: reason {reason}, expected one of {sorted(reasons)}")
        except AssertionError as e:  # a refused stream sent an item
            failures.append(f"{name}: {e}")
        else:
            failures.append(f"{name}: expected {code}, but the call succeeded")
    assert not failures, "\n".join(failures)


def other_calls(stub, service: str, known: set[str], md, **fields: str):
    """The calls of a service that are not in `known` (e.g. added to the API after these tests were
    written), each with an otherwise empty request: fields of that name are filled in when it has them."""
    module = {"AgentService": agent_pb, "CustomerService": cust_pb, "AdminService": admin_pb}[service]
    descriptor = module.DESCRIPTOR.services_by_name[service]
    calls = []
    for m in descriptor.methods:
        if m.name in known or not hasattr(stub, m.name):
            continue
        req = message_factory.GetMessageClass(m.input_type)()
        for name, value in fields.items():
            if name in m.input_type.fields_by_name:
                setattr(req, name, value)
        method = getattr(stub, m.name)
        arg = iter([req]) if m.client_streaming else req
        if m.server_streaming:
            calls.append((m.name, lambda method=method, arg=arg: consume(method(arg, metadata=md))))
        else:
            calls.append((m.name, lambda method=method, arg=arg: method(arg, metadata=md)))
    return calls


def agent_get(agent, conversation_id: str):
    """GetConversation as this agent sees it."""
    req = agent_pb.GetConversationRequest(conversation_id=conversation_id)
    return agent.stub.GetConversation(req, metadata=agent.md)


def customer_get(cust, conversation_id: str | None = None):
    """GetConversation with this customer's token (on their own conversation by default)."""
    req = cust_pb.CustomerServiceGetConversationRequest(
        conversation_id=cust.id if conversation_id is None else conversation_id
    )
    return cust.stub.GetConversation(req, metadata=cust.md)


def rid() -> str:
    return uuid.uuid4().hex


def menu_request(conversation_id: str, request_id: str = "") -> agent_pb.SendOfferMenuRequest:
    return agent_pb.SendOfferMenuRequest(
        conversation_id=conversation_id,
        request_id=request_id or rid(),
        prompt="Which one?",
        options=[rpb.OfferMenuOption(option_id="a", label="A"), rpb.OfferMenuOption(option_id="b", label="B")],
    )


async def export(server, conversation_id: str) -> admin_pb.ExportConversationResponse:
    """The organisation's full log of a conversation, private events included."""
    token = await server.admin_token()
    return await server.admin_stub.ExportConversation(
        admin_pb.ExportConversationRequest(conversation_id=conversation_id), metadata=auth(token)
    )


def event_keys(events) -> list[tuple]:
    """What identifies the events of a log: comparable between streams, transcripts and exports."""
    out = []
    for e in events:
        kind = e.WhichOneof("kind")
        text = e.message.text if kind == "message" else ""
        out.append((e.seq, kind, e.visibility, text))
    return out


async def wait_past(stream, seq: int) -> None:
    """Until the stream has ended or has moved past seq (an event or heartbeat at or after it)."""
    try:
        await stream.wait_for(
            lambda i: (
                (i.HasField("heartbeat") and i.heartbeat.latest_seq >= seq)
                or (i.HasField("event") and i.event.seq >= seq)
            )
        )
    except AssertionError:
        assert stream.done


def identity_token(claims: dict | None = None, *, secret: str = IDENTITY_SECRET, algorithm: str = "HS256", **kw) -> str:
    now = int(time.time())
    body = {"exp": now + 300, "iat": now, **(claims or {})}
    return jwt.encode(body, secret, algorithm=algorithm, **kw)


def flip_char(s: str, index: int) -> str:
    """s with the character at index replaced by a different (base64url) character."""
    c = s[index]
    return s[:index] + ("B" if c != "B" else "C") + s[index + 1 :]


# --- 1. AgentService without a valid session -------------------------------------------------------


def agent_calls(stub, md, *, conversation_id: str, offer_id: str, invite_id: str):
    """Every AgentService call except Login, each aimed at a real object."""
    cid = conversation_id
    return [
        ("Logout", lambda: stub.Logout(agent_pb.LogoutRequest(), metadata=md)),
        (
            "SetAgentState",
            lambda: stub.SetAgentState(
                agent_pb.SetAgentStateRequest(state=agent_pb.AGENT_STATE_NOT_READY), metadata=md
            ),
        ),
        ("StreamOffers", lambda: consume(stub.StreamOffers(agent_pb.StreamOffersRequest(after_seq=0), metadata=md))),
        ("AcceptOffer", lambda: stub.AcceptOffer(agent_pb.AcceptOfferRequest(offer_id=offer_id), metadata=md)),
        ("RejectOffer", lambda: stub.RejectOffer(agent_pb.RejectOfferRequest(offer_id=offer_id), metadata=md)),
        (
            "ListConversations",
            lambda: stub.ListConversations(agent_pb.ListConversationsRequest(include_closed=True), metadata=md),
        ),
        (
            "GetConversation",
            lambda: stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cid), metadata=md),
        ),
        (
            "StreamConversation",
            lambda: consume(
                stub.StreamConversation(
                    agent_pb.StreamConversationRequest(conversation_id=cid, after_seq=0), metadata=md
                )
            ),
        ),
        (
            "SendMessage",
            lambda: stub.SendMessage(
                agent_pb.SendMessageRequest(conversation_id=cid, request_id=rid(), text="injected"), metadata=md
            ),
        ),
        (
            "ListPredefinedMessages",
            lambda: stub.ListPredefinedMessages(
                agent_pb.ListPredefinedMessagesRequest(conversation_id=cid), metadata=md
            ),
        ),
        ("SendOfferMenu", lambda: stub.SendOfferMenu(menu_request(cid), metadata=md)),
        (
            "InviteAgent",
            lambda: stub.InviteAgent(
                agent_pb.InviteAgentRequest(conversation_id=cid, request_id=rid(), agent_id="agent3"), metadata=md
            ),
        ),
        ("CancelInvite", lambda: stub.CancelInvite(agent_pb.CancelInviteRequest(invite_id=invite_id), metadata=md)),
        (
            "LeaveConversation",
            lambda: stub.LeaveConversation(agent_pb.LeaveConversationRequest(conversation_id=cid), metadata=md),
        ),
        (
            "CloseConversation",
            lambda: stub.CloseConversation(
                agent_pb.CloseConversationRequest(conversation_id=cid, confirm=True), metadata=md
            ),
        ),
    ]


def all_agent_calls(stub, md, *, conversation_id: str, offer_id: str, invite_id: str):
    """agent_calls, plus any other AgentService call but Login (those may be unimplemented yet)."""
    calls = agent_calls(stub, md, conversation_id=conversation_id, offer_id=offer_id, invite_id=invite_id)
    known = {name for name, _ in calls} | {"Login"}
    others = other_calls(stub, "AgentService", known, md, conversation_id=conversation_id)
    return calls + others, frozenset(name for name, _ in others)


BAD_AGENT_CREDENTIALS = [
    "no token",
    "empty bearer",
    "garbage token",
    "customer token",
    "admin token",
    "logged-out session",
]


@pytest.mark.parametrize("credential", BAD_AGENT_CREDENTIALS)
async def test_agent_service_refuses_calls_without_a_live_session(server, credential):
    # A session that was logged out: its token must be dead even though agent1 is back with a new one.
    first = await server.agent("agent1", offers=False)
    await first.stub.Logout(agent_pb.LogoutRequest(), metadata=first.md)

    # The targets: agent1's active conversation, a pending chat offer of agent1, and a pending invite.
    agent1 = await server.agent("agent1")
    cust = await server.customer("sales")
    await agent1.take(cust.id)
    waiting = await server.customer("sales")
    offer = await agent1.wait_offer(waiting.id)
    agent2 = await server.agent("agent2")
    invite = await agent1.invite(cust.id, agent_id="agent2")
    invite_offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    before = await export(server, cust.id)

    md = {
        "no token": (),
        "empty bearer": (("authorization", "Bearer "),),
        "garbage token": auth("qa_" + "x" * 43),
        "customer token": cust.md,
        "admin token": auth(await server.admin_token()),
        "logged-out session": first.md,
    }[credential]
    calls, new = all_agent_calls(
        server.agent_stub, md, conversation_id=cust.id, offer_id=offer.offer_id, invite_id=invite.invite_id
    )
    await expect_refusals(calls, UNAUTHENTICATED, SESSION_REASONS, unimplemented_ok=new)

    # Nothing changed: the log, the pending offer and invite, agent1's session and offer stream.
    assert event_keys((await export(server, cust.id)).events) == event_keys(before.events)
    conv = (await agent_get(agent1, cust.id)).conversation
    assert conv.state == rpb.CONVERSATION_STATE_ACTIVE and conv.customer_connected
    assert [a.agent_id for a in conv.agents] == ["agent1"]
    assert conv.pending_invite.invite_id == invite.invite_id
    assert not agent1.offers.done and not agent2.offers.done
    accepted = await agent1.accept(offer.offer_id)
    assert accepted.conversation_id == waiting.id
    # Its first outcome is this accept: no refused call rejected or withdrew it before.
    assert (await agent1.wait_offer_update(offer.offer_id)).state == agent_pb.OFFER_STATE_ACCEPTED
    joined = await agent2.accept(invite_offer.offer_id)
    assert {a.agent_id for a in joined.agents} == {"agent1", "agent2"}


# --- 2. Agent login --------------------------------------------------------------------------------


def login(server, username: str, password: str, profile_id: str = "both"):
    return server.agent_stub.Login(agent_pb.LoginRequest(username=username, password=password, profile_id=profile_id))


async def test_login_with_bad_credentials_is_refused_and_leaves_the_live_session_alone(server):
    agent1 = await server.agent("agent1")
    attempts = [
        ("wrong password", lambda: login(server, "agent1", "wrong")),
        ("another agent's password", lambda: login(server, "agent1", "pw2")),
        ("password with trailing space", lambda: login(server, "agent1", "pw1 ")),
        ("unknown user", lambda: login(server, "mallory", "pw1")),
        ("admin credentials", lambda: login(server, "admin", "adminpw")),
        # A wrong password must not reveal whether the profile would have been allowed.
        ("wrong password, unknown profile", lambda: login(server, "agent1", "wrong", "no-such-profile")),
    ]
    await expect_refusals(attempts, UNAUTHENTICATED, "BAD_CREDENTIALS")

    # Failed logins did not end agent1's session (a new login would have).
    resp = await agent1.stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=agent1.md)
    assert list(resp.conversations) == []
    cust = await server.customer()
    await agent1.wait_offer(cust.id)
    assert not agent1.offers.done


LIMITED = base_config()
LIMITED["agents"][0]["profiles"] = ["sales"]  # agent1 may only use the sales profile


@pytest.mark.parametrize("config", [LIMITED], ids=["agent1-sales-only"])
async def test_login_with_a_profile_the_agent_may_not_use_is_refused(server):
    agent1 = await server.agent("agent1", "sales")
    attempts = [
        (f"profile {p}", lambda p=p: login(server, "agent1", "pw1", p)) for p in ("support", "both", "no-such-profile")
    ]
    await expect_refusals(attempts, PERMISSION_DENIED, "PROFILE_NOT_ALLOWED")

    # The refused logins did not replace the session that uses the allowed profile.
    assert not agent1.offers.done
    cust = await server.customer("sales")
    await agent1.wait_offer(cust.id)
    # Other agents keep their profiles.
    ok = await login(server, "agent2", "pw2", "support")
    assert ok.profile.profile_id == "support"


async def test_a_new_login_ends_the_earlier_session(server):
    old = await server.agent("agent1")
    cust = await server.customer()
    await old.take(cust.id)

    new = await login(server, "agent1", "pw1")
    # The open offer stream of the old session ends with SESSION_ENDED.
    await old.offers.wait_done()
    assert old.offers.error is not None, "the old offer stream ended without an error"
    assert old.offers.error.code() == UNAUTHENTICATED
    assert error_reason(old.offers.error) == "SESSION_ENDED"

    # The old token opens nothing any more; the new one works on the same conversation.
    stub = server.agent_stub
    await expect_refusals(
        [
            ("StreamOffers", lambda: consume(stub.StreamOffers(agent_pb.StreamOffersRequest(), metadata=old.md))),
            ("SetAgentState", lambda: old.set_ready(True)),
            ("SendMessage", lambda: old.send(cust.id, "from the old session")),
            ("GetConversation", lambda: agent_get(old, cust.id)),
            ("Logout", lambda: stub.Logout(agent_pb.LogoutRequest(), metadata=old.md)),
        ],
        UNAUTHENTICATED,
        SESSION_REASONS,
    )
    ev = await stub.SendMessage(
        agent_pb.SendMessageRequest(conversation_id=cust.id, request_id=rid(), text="from the new session"),
        metadata=auth(new.session_token),
    )
    assert ev.event.message.sender.agent_id == "agent1"
    texts = [e.message.text for e in (await cust.transcript()).events if e.HasField("message")]
    assert texts == ["from the new session"]


async def test_logout_ends_the_open_offer_stream_and_the_token(server):
    agent1 = await server.agent("agent1")
    await agent1.stub.Logout(agent_pb.LogoutRequest(), metadata=agent1.md)
    await agent1.offers.wait_done()
    assert agent1.offers.error is not None and agent1.offers.error.code() == UNAUTHENTICATED
    assert error_reason(agent1.offers.error) == "SESSION_ENDED"
    await expect_error(
        agent1.stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=agent1.md), UNAUTHENTICATED
    )
    # A logged-out agent is offered nothing: the chat waits for someone else.
    cust = await server.customer()
    agent2 = await server.agent("agent2")
    await agent2.wait_offer(cust.id)


@pytest.mark.parametrize("ended_by", ["logout", "new login"])
async def test_open_conversation_stream_ends_with_its_session(server, ended_by):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    stream = agent1.streams[cust.id]
    await stream.wait_for(lambda i: i.HasField("heartbeat"))

    if ended_by == "logout":  # e.g. on a shared computer
        await agent1.stub.Logout(agent_pb.LogoutRequest(), metadata=agent1.md)
    new = await login(server, "agent1", "pw1")  # e.g. the agent moved to another desk
    await agent1.offers.wait_done()
    secret = await server.agent_stub.SendMessage(
        agent_pb.SendMessageRequest(
            conversation_id=cust.id,
            request_id=rid(),
            text="secret for live sessions",
            visibility=rpb.VISIBILITY_AGENTS_ONLY,
        ),
        metadata=auth(new.session_token),
    )
    await wait_past(stream, secret.event.seq)
    assert "secret for live sessions" not in [e.message.text for e in stream.events("message")]
    assert stream.done and stream.error is not None and stream.error.code() == UNAUTHENTICATED


# --- 3. Agents outside their conversations, offers and invites ---------------------------------


def conversation_calls(agent, conversation_id: str):
    """The calls on one conversation that need its participant."""
    stub, md, cid = agent.stub, agent.md, conversation_id
    return [
        (
            "GetConversation",
            lambda: stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cid), metadata=md),
        ),
        (
            "StreamConversation",
            lambda: consume(
                stub.StreamConversation(agent_pb.StreamConversationRequest(conversation_id=cid), metadata=md)
            ),
        ),
        ("SendMessage", lambda: agent.send(cid, "injected")),
        ("SendMessage (private)", lambda: agent.send(cid, "injected note", private=True)),
        ("SendOfferMenu", lambda: stub.SendOfferMenu(menu_request(cid), metadata=md)),
        ("InviteAgent", lambda: agent.invite(cid, agent_id="agent3", request_id=rid())),
        ("LeaveConversation", lambda: agent.leave(cid)),
        ("CloseConversation", lambda: agent.close(cid, confirm=True)),
    ]


async def test_agent_cannot_act_on_a_conversation_they_are_not_in(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    cust.open()
    await agent1.take(cust.id)
    await agent1.send(cust.id, "internal: VIP", private=True)
    await server.agent("agent3")  # a valid invite target, so only membership can refuse InviteAgent
    intruder = await server.agent("agent2", ready=False, offers=False)
    before = await export(server, cust.id)

    await expect_refusals(conversation_calls(intruder, cust.id), PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    # Neither may the intruder learn which predefined messages fit it.
    await expect_error(
        intruder.stub.ListPredefinedMessages(
            agent_pb.ListPredefinedMessagesRequest(conversation_id=cust.id), metadata=intruder.md
        ),
        NOT_FOUND,
        "CONVERSATION_NOT_FOUND",
    )
    listed = await intruder.stub.ListConversations(
        agent_pb.ListConversationsRequest(include_closed=True), metadata=intruder.md
    )
    assert list(listed.conversations) == []

    # An id that does not exist is not found, for every call.
    await expect_refusals(conversation_calls(intruder, uuid.uuid4().hex), NOT_FOUND, "CONVERSATION_NOT_FOUND")

    # Nothing changed, and the customer still has agent1 only.
    after = await export(server, cust.id)
    assert event_keys(after.events) == event_keys(before.events)
    assert after.conversation.state == rpb.CONVERSATION_STATE_ACTIVE and after.conversation.customer_connected
    assert [a.agent_id for a in after.conversation.agents] == ["agent1"]
    assert not after.conversation.HasField("pending_invite")


async def test_agent_cannot_answer_another_agents_offer(server):
    agent1 = await server.agent("agent1")
    agent2 = await server.agent("agent2", ready=False)  # logged in with an offer stream, never offered a chat
    cust = await server.customer()
    offer = await agent1.wait_offer(cust.id)

    attempts = [
        ("accept another's chat offer", lambda: agent2.accept(offer.offer_id)),
        ("reject another's chat offer", lambda: agent2.reject(offer.offer_id)),
        ("accept an unknown offer", lambda: agent2.accept(uuid.uuid4().hex)),
        ("reject an empty offer id", lambda: agent2.reject("")),
    ]
    await expect_refusals(attempts, NOT_FOUND, "OFFER_NOT_FOUND")

    # The offer is still agent1's, untouched.
    conv = await agent1.accept(offer.offer_id)
    assert [a.agent_id for a in conv.agents] == ["agent1"]
    update = await agent1.wait_offer_update(offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_ACCEPTED

    # Invite offers too: neither the inviter nor a bystander can answer the invitee's offer.
    await agent2.set_ready(True)
    bystander = await server.agent("agent3", ready=False, offers=False)
    invite = await agent1.invite(cust.id, agent_id="agent2")
    invite_offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await expect_refusals(
        [
            ("inviter accepts", lambda: agent1.accept(invite_offer.offer_id)),
            ("inviter rejects", lambda: agent1.reject(invite_offer.offer_id)),
            ("bystander accepts", lambda: bystander.accept(invite_offer.offer_id)),
        ],
        NOT_FOUND,
        "OFFER_NOT_FOUND",
    )
    conv = (await agent_get(agent1, cust.id)).conversation
    assert conv.pending_invite.invite_id == invite.invite_id
    assert conv.pending_invite.state == rpb.INVITE_STATE_PENDING
    joined = await agent2.accept(invite_offer.offer_id)
    assert {a.agent_id for a in joined.agents} == {"agent1", "agent2"}


async def test_only_the_inviter_can_cancel_an_invite(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    agent2 = await server.agent("agent2")
    agent3 = await server.agent("agent3", ready=False, offers=False)
    invite = await agent1.invite(cust.id, agent_id="agent2")

    def cancel(agent):
        return agent.stub.CancelInvite(agent_pb.CancelInviteRequest(invite_id=invite.invite_id), metadata=agent.md)

    await expect_refusals(
        [("bystander", lambda: cancel(agent3)), ("the invitee", lambda: cancel(agent2))], NOT_FOUND, "INVITE_NOT_FOUND"
    )
    conv = (await agent_get(agent1, cust.id)).conversation
    assert conv.pending_invite.state == rpb.INVITE_STATE_PENDING

    # Once in the conversation, the invitee is a participant but still not the inviter.
    offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await agent2.accept(offer.offer_id)
    await expect_error(cancel(agent2), PERMISSION_DENIED, "NOT_INVITER")


async def test_agent_who_left_can_no_longer_send_or_read(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    agent2 = await server.agent("agent2")
    await agent1.invite(cust.id, agent_id="agent2")
    offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await agent2.accept(offer.offer_id)
    s2 = agent2.open_conversation(cust.id)

    stream = agent1.streams[cust.id]
    await agent1.leave(cust.id)
    # agent1's open stream ends with agent1's own departure.
    await stream.wait_done()
    last = stream.events()[-1]
    assert last.HasField("participant_left") and last.participant_left.participant.agent_id == "agent1"

    secret = await agent2.send(cust.id, "after agent1 left", private=True)
    await s2.wait_for(is_event("message", lambda e: e.seq == secret.seq))
    assert all(e.seq < secret.seq for e in stream.events())

    # The conversation is open and agent2 is in it; agent1 may do nothing with it.
    calls = [c for c in conversation_calls(agent1, cust.id)]
    await expect_refusals(calls, PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    listed = await agent1.stub.ListConversations(
        agent_pb.ListConversationsRequest(include_closed=True), metadata=agent1.md
    )
    assert cust.id not in [c.conversation_id for c in listed.conversations]
    conv = (await agent_get(agent2, cust.id)).conversation
    assert [a.agent_id for a in conv.agents] == ["agent2"] and conv.state == rpb.CONVERSATION_STATE_ACTIVE


async def test_invitee_may_read_while_invited_but_not_write_and_not_after_rejecting(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    await agent1.send(cust.id, "internal: context for the invitee", private=True)
    agent2 = await server.agent("agent2")
    await agent1.invite(cust.id, agent_id="agent2")
    offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)

    # While invited, agent2 may read the conversation (to decide), but not act in it.
    assert (await customer_get(cust)).conversation.conversation_id == cust.id
    writes = [c for c in conversation_calls(agent2, cust.id) if c[0] not in ("GetConversation", "StreamConversation")]
    await expect_refusals(writes, PERMISSION_DENIED, "NOT_A_PARTICIPANT")

    # Having rejected, agent2 may not even read it.
    await agent2.reject(offer.offer_id)
    await expect_refusals(conversation_calls(agent2, cust.id), PERMISSION_DENIED, "NOT_A_PARTICIPANT")
    log = await export(server, cust.id)
    assert [a.agent_id for a in log.conversation.agents] == ["agent1"]
    assert [e.message.text for e in log.events if e.HasField("message")] == ["internal: context for the invitee"]


async def test_invitee_stream_stops_when_the_invite_is_rejected(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    agent2 = await server.agent("agent2")
    await agent1.invite(cust.id, agent_id="agent2")
    offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    peek = agent2.open_conversation(cust.id)  # allowed while invited
    await peek.wait_for(lambda i: i.HasField("heartbeat"))

    await agent2.reject(offer.offer_id)
    secret = await agent1.send(cust.id, "secret after the reject", private=True)
    await wait_past(peek, secret.seq)
    assert "secret after the reject" not in [e.message.text for e in peek.events("message")]


async def test_agent_who_left_cannot_read_the_conversation_through_an_accept_retry(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    offer = await agent1.wait_offer(cust.id)
    await agent1.accept(offer.offer_id)
    agent2 = await server.agent("agent2")
    await agent1.invite(cust.id, agent_id="agent2")
    invite_offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await agent2.accept(invite_offer.offer_id)
    await agent1.leave(cust.id)
    await server.agent("agent3")
    await agent2.invite(cust.id, agent_id="agent3")  # something only participants may see

    try:
        leaked = await agent1.accept(offer.offer_id)
    except grpc.aio.AioRpcError as e:
        assert e.code() in (PERMISSION_DENIED, NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION), e
    else:
        raise AssertionError(f"an agent who left got the conversation back: {leaked}")


# --- 4. CustomerService: tokens ----------------------------------------------------------------------


def customer_calls(stub, md, *, conversation_id: str, menu_id: str):
    cid = conversation_id
    return [
        (
            "GetConversation",
            lambda: stub.GetConversation(
                cust_pb.CustomerServiceGetConversationRequest(conversation_id=cid), metadata=md
            ),
        ),
        (
            "StreamConversation",
            lambda: consume(
                stub.StreamConversation(
                    cust_pb.CustomerServiceStreamConversationRequest(conversation_id=cid), metadata=md
                )
            ),
        ),
        (
            "SendMessage",
            lambda: stub.SendMessage(
                cust_pb.CustomerServiceSendMessageRequest(conversation_id=cid, request_id=rid(), text="injected"),
                metadata=md,
            ),
        ),
        (
            "ChooseOption",
            lambda: stub.ChooseOption(
                cust_pb.ChooseOptionRequest(conversation_id=cid, menu_id=menu_id, option_id="a"), metadata=md
            ),
        ),
        ("EndChat", lambda: stub.EndChat(cust_pb.EndChatRequest(conversation_id=cid), metadata=md)),
        ("GetTranscript", lambda: stub.GetTranscript(cust_pb.GetTranscriptRequest(conversation_id=cid), metadata=md)),
    ]


def all_customer_calls(stub, md, *, conversation_id: str, menu_id: str):
    """customer_calls, plus any other CustomerService call that needs a token (those may be unimplemented yet)."""
    calls = customer_calls(stub, md, conversation_id=conversation_id, menu_id=menu_id)
    known = {name for name, _ in calls} | {"ListQueues", "StartChat"}
    others = other_calls(stub, "CustomerService", known, md, conversation_id=conversation_id)
    return calls + others, frozenset(name for name, _ in others)


async def victim_chat(server):
    """A customer in an active chat with agent1, with an unanswered offer menu: the target of the attacks."""
    agent1 = await server.agent("agent1")
    victim = await server.customer("sales", {"name": "Victim"})
    await agent1.take(victim.id)
    await victim.send("my card number is ...")
    menu = (await agent1.stub.SendOfferMenu(menu_request(victim.id), metadata=agent1.md)).event.offer_menu
    return agent1, victim, menu


async def assert_victim_untouched(victim, before: cust_pb.GetTranscriptResponse, menu) -> None:
    after = await victim.transcript()
    assert after == before, "a refused call changed the victim's conversation"
    assert after.conversation.customer_connected and after.conversation.state == rpb.CONVERSATION_STATE_ACTIVE
    # The menu is still unanswered: the victim can answer it now.
    chosen = await victim.choose(menu.menu_id, "b")
    assert chosen.option_chosen.option_id == "b"


FORGERIES = [
    "no token",
    "empty bearer",
    "not a bearer scheme",
    "garbage",
    "qc_<id>.AAAA",
    "one MAC character changed",
    "one id character changed",
    "MAC truncated",
    "own MAC on the victim's id",
    "agent session token",
    "admin token",
]


@pytest.mark.parametrize("forgery", FORGERIES)
async def test_customer_calls_with_a_missing_or_forged_token_are_refused(server, forgery):
    agent1, victim, menu = await victim_chat(server)
    attacker = await server.customer("support")
    before = await victim.transcript()

    real = victim.token
    prefix, mac = real.split(".", 1)
    forged_prefix = flip_char(prefix, 5)  # "qc_" + the victim's id with one character changed
    own_mac = attacker.token.split(".", 1)[1]
    md = {
        "no token": (),
        "empty bearer": auth(""),
        "not a bearer scheme": (("authorization", f"Basic {real}"),),
        "garbage": auth("garbage"),
        "qc_<id>.AAAA": auth(f"qc_{victim.id}.AAAA"),
        "one MAC character changed": auth(f"{prefix}.{flip_char(mac, len(mac) // 2)}"),
        "one id character changed": auth(f"{forged_prefix}.{mac}"),
        "MAC truncated": auth(f"{prefix}.{mac[:-1]}"),
        "own MAC on the victim's id": auth(f"qc_{victim.id}.{own_mac}"),
        "agent session token": agent1.md,
        "admin token": auth(await server.admin_token()),
    }[forgery]

    # Aimed at the victim's conversation, and for the id-changed token also at the id that token names.
    target = forged_prefix.removeprefix("qc_") if forgery == "one id character changed" else victim.id
    calls, new = all_customer_calls(server.customer_stub, md, conversation_id=target, menu_id=menu.menu_id)
    if target != victim.id:
        calls += all_customer_calls(server.customer_stub, md, conversation_id=victim.id, menu_id=menu.menu_id)[0]
    await expect_refusals(calls, UNAUTHENTICATED, "CUSTOMER_TOKEN_INVALID", unimplemented_ok=new)
    await assert_victim_untouched(victim, before, menu)


async def test_customer_token_does_not_open_another_customers_conversation(server):
    agent1, victim, menu = await victim_chat(server)
    stream = agent1.streams[victim.id]
    attacker = await server.customer("sales", {"name": "Mallory"})
    before = await victim.transcript()

    calls, new = all_customer_calls(server.customer_stub, attacker.md, conversation_id=victim.id, menu_id=menu.menu_id)
    await expect_refusals(calls, PERMISSION_DENIED, "NOT_YOUR_CONVERSATION", unimplemented_ok=new)
    # An empty conversation id is not "the token's own conversation" either.
    await expect_refusals(
        customer_calls(server.customer_stub, attacker.md, conversation_id="", menu_id=menu.menu_id),
        PERMISSION_DENIED,
        "NOT_YOUR_CONVERSATION",
    )

    await assert_victim_untouched(victim, before, menu)
    # The agent saw nothing from the attacker in the victim's conversation.
    await stream.wait_for(is_event("option_chosen"))
    assert [e.message.text for e in stream.events("message")] == ["my card number is ..."]
    # The attacker's own conversation still works with the same token.
    own = await customer_get(attacker)
    assert own.conversation.conversation_id == attacker.id


# --- 5. What a customer can see ---------------------------------------------------------------------


def assert_customer_safe(events, where: str) -> None:
    for e in events:
        kind = e.WhichOneof("kind")
        assert e.visibility == rpb.VISIBILITY_ALL, f"{where}: private event {kind} seq {e.seq}"
        assert kind != "invite_updated", f"{where}: invite event seq {e.seq}"
        if kind == "message":
            assert "secret" not in e.message.text, f"{where}: private text {e.message.text!r}"


async def test_customer_never_sees_private_messages_or_invites(server):
    agent1 = await server.agent("agent1")
    cust = await server.customer("sales", {"name": "Ada"})
    live = cust.open()
    await agent1.take(cust.id)
    a1 = agent1.streams[cust.id]
    agent2 = await server.agent("agent2")
    agent3 = await server.agent("agent3")

    async def agent_view():
        return (await agent_get(agent1, cust.id)).conversation

    await agent1.send(cust.id, "secret: note by agent1", private=True, request_id="shared-req")
    await agent1.send(cust.id, "public: hello")

    # An invite is pending: agents see it on the conversation, the customer does not.
    invite = await agent1.invite(cust.id, agent_id="agent2")
    assert (await agent_view()).pending_invite.invite_id == invite.invite_id
    assert not (await customer_get(cust)).conversation.HasField("pending_invite")
    pending_transcript = await cust.transcript()
    assert not pending_transcript.conversation.HasField("pending_invite")
    assert_customer_safe(pending_transcript.events, "transcript while invite pending")

    offer = await agent2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await agent2.accept(offer.offer_id)
    await agent2.send(cust.id, "secret: note by agent2", private=True)
    await agent2.send(cust.id, "public: agent2 here")

    # The customer's own calls answer with their own, public event, even when the request_id
    # equals the one of an agent's private message.
    sent = await cust.send("customer: hi", request_id="shared-req")
    assert sent.WhichOneof("kind") == "message" and sent.message.text == "customer: hi"
    assert sent.visibility == rpb.VISIBILITY_ALL and sent.message.sender.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    again = await cust.send("customer: hi", request_id="shared-req")
    assert (again.seq, again.message.message_id) == (sent.seq, sent.message.message_id)

    menu = (await agent1.stub.SendOfferMenu(menu_request(cust.id), metadata=agent1.md)).event.offer_menu
    await agent1.send(cust.id, "secret: right before the choice", private=True)
    chosen = await cust.choose(menu.menu_id, "a")
    assert chosen.WhichOneof("kind") == "option_chosen" and chosen.visibility == rpb.VISIBILITY_ALL
    await agent2.send(cust.id, "secret: right after the choice", private=True)

    # A second invite, left pending while the customer looks.
    await agent1.invite(cust.id, agent_id="agent3")
    await agent3.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    marker = await agent1.send(cust.id, "public: last")
    await a1.wait_for(is_event("message", lambda e: e.seq == marker.seq))

    # The full log really has private messages and invite events (so this test can fail) ...
    log = (await export(server, cust.id)).events
    private = [e for e in log if e.visibility == rpb.VISIBILITY_AGENTS_ONLY]
    assert len([e for e in private if e.HasField("message")]) == 4
    assert len([e for e in private if e.HasField("invite_updated")]) == 3  # pending, accepted, pending
    public = [e for e in log if e.visibility == rpb.VISIBILITY_ALL]

    # ... the live stream has exactly the public ones ...
    await live.wait_for(is_event("message", lambda e: e.seq == marker.seq))
    assert_customer_safe(live.events(), "live stream")
    assert event_keys(live.events()) == event_keys(public)

    # ... and so has a replay from every cursor, private seqs included.
    for after in range(marker.seq + 1):
        replay = cust.open(after_seq=after)
        caught_up = await replay.wait_for(lambda i: i.HasField("heartbeat"))
        backlog = replay.items[: replay.items.index(caught_up)]
        events = [i.event for i in backlog if i.HasField("event")]
        assert_customer_safe(events, f"replay after {after}")
        assert event_keys(events) == event_keys([e for e in public if e.seq > after]), f"replay after {after}"
        await replay.cancel()

    # GetConversation and GetTranscript, with the second invite still pending.
    conv = (await customer_get(cust)).conversation
    assert not conv.HasField("pending_invite")
    assert (await agent_view()).HasField("pending_invite")
    transcript = await cust.transcript()
    assert not transcript.conversation.HasField("pending_invite")
    assert_customer_safe(transcript.events, "transcript")
    assert event_keys(transcript.events) == event_keys(public)

    # Ending the chat answers with a conversation without the pending invite, too.
    ended = await cust.end()
    assert not ended.conversation.HasField("pending_invite")
    await live.wait_done()
    await agent1.send(cust.id, "secret: after the customer left", private=True)
    final = await cust.transcript()
    assert_customer_safe(final.events, "transcript after end")
    assert not final.conversation.HasField("pending_invite")
    assert_customer_safe(live.events(), "live stream after end")


# --- 6. Identity tokens on StartChat --------------------------------------------------------------


def bad_identity_tokens() -> dict[str, tuple[str, str]]:
    """name -> (token, expected reason)."""
    now = int(time.time())
    unsigned = jwt.encode({"name": "Admin", "exp": now + 300}, None, algorithm="none")
    return {
        "wrong signature": (
            identity_token({"name": "Eve"}, secret="not-the-site-secret-0123456789abcdef"),
            "IDENTITY_TOKEN_INVALID",
        ),
        "tampered payload": (_tamper(identity_token({"name": "Eve"})), "IDENTITY_TOKEN_INVALID"),
        "expired": (identity_token({"name": "Eve", "exp": now - 120}), "IDENTITY_TOKEN_EXPIRED"),
        "garbage": ("not.a.jwt", "IDENTITY_TOKEN_INVALID"),
        "alg none": (unsigned, "IDENTITY_TOKEN_INVALID"),
        "alg none, signature kept": (
            unsigned + _signature(identity_token({"name": "Admin"})),
            "IDENTITY_TOKEN_INVALID",
        ),
        "HS512 with the site secret": (identity_token({"name": "Eve"}, algorithm="HS512"), "IDENTITY_TOKEN_INVALID"),
        "without exp": (jwt.encode({"name": "Eve"}, IDENTITY_SECRET, algorithm="HS256"), "IDENTITY_TOKEN_INVALID"),
        "not yet valid": (identity_token({"name": "Eve", "nbf": now + 3600}), "IDENTITY_TOKEN_INVALID"),
    }


def _signature(token: str) -> str:
    return token.rsplit(".", 1)[1]


def _tamper(token: str) -> str:
    """The same signature over a payload that says something else."""
    header, payload, sig = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["name"] = "Admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{sig}"


async def test_start_chat_with_a_bad_identity_token_is_refused_and_creates_nothing(server):
    agent1 = await server.agent("agent1")  # ready: any chat that got created would be offered to agent1
    failures = []
    for name, (token, reason) in bad_identity_tokens().items():
        req = cust_pb.StartChatRequest(
            queue_id="sales", request_id=rid(), variables={"name": "Eve"}, identity_token=token
        )
        try:
            await expect_error(server.customer_stub.StartChat(req), UNAUTHENTICATED, reason)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)

    good = await server.customer("sales", identity_token=identity_token({"name": "Ada"}))
    offer = await agent1.wait_offer()
    assert offer.conversation_id == good.id, "a refused StartChat created a chat that was offered first"
    assert agent1.offer_ids() == [offer.offer_id]
    # Nobody else is waiting in the queue either.
    stream = good.open()
    pos = await stream.wait_for(lambda i: i.HasField("queue_position"))
    assert (pos.queue_position.position, pos.queue_position.waiting_count) == (1, 1)


async def test_valid_identity_token_claims_become_authenticated_variables(server):
    agent1 = await server.agent("agent1")
    token = identity_token(
        {"name": "Ada Lovelace", "email": "ada@example.com", "customer_id": 42, "iss": "shop", "jti": "j1"}
    )
    cust = await server.customer(
        "sales", {"name": "Mallory", "email": "mallory@example.com", "tier": "gold"}, identity_token=token
    )

    expected = {
        "name": ("Ada Lovelace", True),
        "email": ("ada@example.com", True),
        "customer_id": ("42", True),
        "tier": ("gold", False),
    }

    def as_dict(variables):
        out = {v.name: (v.value, v.authenticated) for v in variables}
        assert len(out) == len(variables), f"a variable appears twice: {variables}"
        return out

    assert as_dict(cust.conversation.variables) == expected
    offer = await agent1.wait_offer(cust.id)
    assert as_dict(offer.variables) == expected
    conv = await agent1.accept(offer.offer_id)
    assert as_dict(conv.variables) == expected
    mine = await customer_get(cust)
    assert as_dict(mine.conversation.variables) == expected

    # The chat log records the same, and the customer is named by the verified name.
    t = await cust.transcript()
    started = [e.chat_started for e in t.events if e.HasField("chat_started")]
    assert len(started) == 1 and as_dict(started[0].variables) == expected
    msg = await cust.send("hello")
    assert msg.message.sender.display_name == "Ada Lovelace"


# --- 7. AdminService with other principals' tokens ----------------------------------------------------


@pytest.mark.parametrize("credential", ["agent session token", "customer token", "no token", "garbage"])
async def test_admin_service_refuses_agent_and_customer_tokens(server, credential):
    agent1 = await server.agent("agent1")
    cust = await server.customer()
    await agent1.take(cust.id)
    await agent1.send(cust.id, "secret: internal", private=True)
    md = {
        "agent session token": agent1.md,
        "customer token": cust.md,
        "no token": (),
        "garbage": auth("qadm_" + "x" * 43),
    }[credential]
    stub = server.admin_stub
    calls = [
        ("GetSettings", lambda: stub.GetSettings(admin_pb.GetSettingsRequest(), metadata=md)),
        (
            "ExportConversation",
            lambda: stub.ExportConversation(admin_pb.ExportConversationRequest(conversation_id=cust.id), metadata=md),
        ),
    ]
    # Every other call but Login too, with an otherwise empty request (some may not be implemented yet).
    others = other_calls(stub, "AdminService", {"Login", "GetSettings", "ExportConversation"}, md)
    await expect_refusals(
        calls + others, UNAUTHENTICATED, "ADMIN_SESSION_INVALID", unimplemented_ok=frozenset(n for n, _ in others)
    )
    # The same calls with an admin token work.
    log = await export(server, cust.id)
    assert any(e.message.text == "secret: internal" for e in log.events if e.HasField("message"))


async def test_identity_claims_that_are_not_variables_are_ignored(server):
    """Real tokens carry namespaced and bulky claims: they are not stored as customer variables."""
    token = identity_token(
        {
            "name": "Ada",
            "https://example.com/roles": "admin",
            "blob": "x" * 5000,
            "email": "ada@example.com",
        }
    )
    cust = await server.customer("sales", identity_token=token)
    got = {v.name: (v.value, v.authenticated) for v in cust.conversation.variables}
    assert got == {"name": ("Ada", True), "email": ("ada@example.com", True)}
