"""Defences against floods: each limit refuses with RESOURCE_EXHAUSTED, a reason and RetryInfo;
the client address is the peer's, or X-Forwarded-For from a trusted proxy; [rate_limits] turns
them off together or one by one; and a real customer and agent keep working through a flood."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import IDENTITY_SECRET, expect_error

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.domain.ratelimit import Backoff, Bucket

EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
ON = {"enabled": True}


def rid() -> str:
    return uuid.uuid4().hex


def from_address(ip: str) -> tuple[tuple[str, str], ...]:
    """The tests connect over loopback, a trusted proxy by default: X-Forwarded-For names the client."""
    return (("x-forwarded-for", ip),)


async def start(server, ip: str = "203.0.113.7", queue: str = "sales", **kw):
    req = cust_pb.StartChatRequest(queue_id=queue, request_id=rid(), **kw)
    return await server.customer_stub.StartChat(req, metadata=from_address(ip))


def retry_delay(err: grpc.aio.AioRpcError) -> float:
    status = rpc_status.from_call(err)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo in the status")


async def login(server, username: str, password: str, ip: str):
    req = agent_pb.LoginRequest(username=username, password=password, profile_id="both")
    return await server.agent_stub.Login(req, metadata=from_address(ip))


# --- the buckets themselves ---------------------------------------------------------------


def test_a_bucket_allows_a_burst_then_the_steady_rate():
    b = Bucket(3, 60.0)
    assert [b.take("k", now=0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take("k", now=0.0) == pytest.approx(20.0)  # one token every 20 s
    assert b.take("other", now=0.0) == 0.0  # keys are apart
    assert b.take("k", now=20.0) == 0.0 and b.take("k", now=20.0) > 0


def test_backoff_doubles_after_the_free_failures_and_a_success_clears_it():
    b = Backoff(free=2, base=1.0, cap=8.0)
    for _ in range(2):
        b.failed("k", now=0.0)
    assert b.wait("k", now=0.0) == pytest.approx(1.0)
    for _ in range(5):
        b.failed("k", now=0.0)
    assert b.wait("k", now=0.0) == pytest.approx(8.0)  # capped
    b.succeeded("k")
    assert b.wait("k", now=0.0) == 0.0


# --- each limit ------------------------------------------------------------------------------


@pytest.mark.configure(rate_limits={**ON, "start_chat_per_address": 3})
async def test_start_chat_per_address(server):
    for _ in range(3):
        await start(server, "198.51.100.1")
    err = await expect_error(start(server, "198.51.100.1"), EXHAUSTED, "TOO_MANY_CHATS")
    assert 0 < retry_delay(err) <= 20.5
    await start(server, "198.51.100.2")  # another address is not held back


@pytest.mark.configure(rate_limits={**ON, "start_chat_per_identity": 2, "start_chat_per_address": 0})
async def test_start_chat_per_identity(server):
    def token(sub: str) -> str:
        return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, IDENTITY_SECRET, algorithm="HS256")

    for i in range(2):
        await start(server, f"198.51.100.{i}", identity_token=token("customer-9"))
    await expect_error(start(server, "198.51.100.9", identity_token=token("customer-9")), EXHAUSTED, "TOO_MANY_CHATS")
    await start(server, "198.51.100.9", identity_token=token("customer-10"))


@pytest.mark.configure(rate_limits={**ON, "messages_per_conversation": 5})
async def test_messages_per_conversation_and_sender(server):
    agent, cust = await server.chat()
    for i in range(5):
        await cust.send(f"m{i}")
    err = await expect_error(cust.send("one too many"), EXHAUSTED, "TOO_MANY_MESSAGES")
    assert retry_delay(err) > 0
    await agent.send(cust.id, "the agent is not held back by the customer's flood")


@pytest.mark.configure(rate_limits={**ON, "max_waiting_per_queue": 2})
async def test_a_full_queue_answers_queue_full(server):
    first_request = rid()
    first = await server.customer_stub.StartChat(
        cust_pb.StartChatRequest(queue_id="sales", request_id=first_request), metadata=from_address("198.51.100.1")
    )
    await start(server, "198.51.100.2")
    err = await expect_error(start(server, "198.51.100.3"), EXHAUSTED, "QUEUE_FULL")
    assert retry_delay(err) > 0
    await start(server, "198.51.100.3", queue="support")  # other queues are not full
    # A retry of a chat that got in is answered, full queue or not.
    retry = cust_pb.StartChatRequest(queue_id="sales", request_id=first_request)
    again = await server.customer_stub.StartChat(retry, metadata=from_address("198.51.100.1"))
    assert again.conversation.conversation_id == first.conversation.conversation_id


@pytest.mark.configure(rate_limits={**ON, "login_per_address": 4, "login_per_username": 0, "login_backoff_base": 0})
async def test_logins_per_address(server):
    for i in range(4):
        await expect_error(login(server, f"agent{i + 1}", "wrong", "198.51.100.5"), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(login(server, "agent5", "pw5", "198.51.100.5"), EXHAUSTED, "TOO_MANY_LOGINS")
    await login(server, "agent5", "pw5", "198.51.100.6")


@pytest.mark.configure(rate_limits={**ON, "login_per_username": 3, "login_per_address": 0, "login_backoff_base": 0})
async def test_logins_per_username(server):
    for i in range(3):
        await expect_error(login(server, "agent2", "wrong", f"198.51.100.{i}"), grpc.StatusCode.UNAUTHENTICATED)
    await expect_error(login(server, "agent2", "pw2", "198.51.100.50"), EXHAUSTED, "TOO_MANY_LOGINS")
    await login(server, "agent3", "pw3", "198.51.100.50")


@pytest.mark.configure(
    rate_limits={**ON, "login_free_failures": 2, "login_backoff_base": 30.0, "login_per_address": 0, "login_per_username": 0}
)
async def test_wrong_passwords_back_off_exponentially_without_locking_out_the_real_agent(server):
    attacker, agent_desk = "198.51.100.66", "192.0.2.10"
    for _ in range(2):
        await expect_error(login(server, "agent1", "guess", attacker), grpc.StatusCode.UNAUTHENTICATED)
    err = await expect_error(login(server, "agent1", "pw1", attacker), EXHAUSTED, "LOGIN_BACKOFF")
    assert 25 < retry_delay(err) <= 30.5
    # The real agent, from its own desk, is not locked out by the attacker's failures.
    await login(server, "agent1", "pw1", agent_desk)


@pytest.mark.configure(rate_limits={**ON, "start_chat_per_address": 1, "trusted_proxies": []})
async def test_x_forwarded_for_counts_only_from_a_trusted_proxy(server):
    await start(server, "198.51.100.1")
    # With no trusted proxy, the header is the client's own claim: the loopback peer is the address.
    await expect_error(start(server, "198.51.100.2"), EXHAUSTED, "TOO_MANY_CHATS")


@pytest.mark.configure(rate_limits={"enabled": False, "start_chat_per_address": 1, "max_waiting_per_queue": 1})
async def test_enabled_false_turns_every_limit_off(server):
    for _ in range(5):
        await start(server, "198.51.100.1")


@pytest.mark.configure(rate_limits={**ON, "start_chat_per_address": 0, "start_chat_per_identity": 0})
async def test_a_limit_set_to_0_is_off(server):
    for _ in range(30):
        await start(server, "198.51.100.1")


@pytest.mark.configure(rate_limits={**ON, "start_chat_per_address": 2})
async def test_refusals_are_counted_by_limit(server):
    for _ in range(2):
        await start(server, "198.51.100.1")
    for _ in range(3):
        await expect_error(start(server, "198.51.100.1"), EXHAUSTED, "TOO_MANY_CHATS")
    assert server.core.limiter.refusals["start_chat_per_address"] == 3


# --- a flood ----------------------------------------------------------------------------------


@pytest.mark.configure(rate_limits=ON)  # the defaults
async def test_a_real_customer_and_agent_keep_working_through_a_flood(server):
    agent = await server.agent("agent1")
    bot = "198.51.100.200"

    async def flood_chats() -> list[bool]:
        results = await asyncio.gather(*(start(server, bot) for _ in range(300)), return_exceptions=True)
        return [not isinstance(r, Exception) for r in results]

    began = time.monotonic()
    flood = asyncio.create_task(flood_chats())
    await asyncio.sleep(0)  # the flood is on its way first
    real = await start(server, "192.0.2.77", variables={"name": "Real"})
    accepted = await flood
    # The default: 20 chats a minute from one address, a burst of 20 then one every 3 s.
    assert 1 <= sum(accepted) <= 20 + (time.monotonic() - began) / 3
    conv_id = real.conversation.conversation_id
    # The agent is offered chats in arrival order: take and close the bots' until the real one comes.
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while True:
        item = await agent.offers.wait_for(
            lambda i: i.HasField("event") and i.event.HasField("offer") and i.event.offer.offer_id not in seen
        )
        offer = item.event.offer
        seen.add(offer.offer_id)
        await agent.accept(offer.offer_id)
        if offer.conversation_id == conv_id:
            break
        await agent.close(offer.conversation_id, confirm=True)
        assert time.monotonic() < deadline, "the real customer's chat was never offered"
    md = (("authorization", f"Bearer {real.customer_token}"),)
    sent = await server.customer_stub.SendMessage(
        cust_pb.CustomerServiceSendMessageRequest(conversation_id=conv_id, text="hello", request_id=rid()), metadata=md
    )
    assert sent.event.seq > 0
    await agent.send(conv_id, "Hi, how can I help?")


@pytest.mark.configure(rate_limits={**ON, "uploads_per_conversation": 2, "uploads_per_address": 0})
async def test_uploads_started_per_sender_and_conversation(server):
    from files import Uploader

    agent, cust = await server.chat()
    up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    for i in range(2):
        await up.create(f"f{i}.txt", 10)
    err = await expect_error(up.create("f3.txt", 10), EXHAUSTED, "TOO_MANY_UPLOADS_STARTED")
    assert retry_delay(err) > 0
    await Uploader(agent.stub, agent.md, cust.id, customer=False).create("agent.txt", 10)  # the agent is apart


@pytest.mark.configure(
    rate_limits={**ON, "upload_bytes_per_conversation": 1000, "uploads_per_conversation": 0, "uploads_per_address": 0}
)
async def test_upload_bytes_per_sender_and_conversation(server):
    from files import Uploader

    _, cust = await server.chat()
    up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    await up.create("a.txt", 600)
    await expect_error(up.create("b.txt", 600), EXHAUSTED, "TOO_MANY_UPLOAD_BYTES")
    await up.create("c.txt", 300)


@pytest.mark.configure(rate_limits={**ON, "uploads_per_address": 2, "uploads_per_conversation": 0})
async def test_uploads_started_per_address(server):
    from files import Uploader

    _, first = await server.chat()
    second = await server.customer("support")
    for cust in (first, second):
        md = (*cust.md, ("x-forwarded-for", "198.51.100.77"))
        await Uploader(cust.stub, md, cust.id, customer=True).create("x.txt", 10)
    md = (*first.md, ("x-forwarded-for", "198.51.100.77"))
    await expect_error(
        Uploader(first.stub, md, first.id, customer=True).create("y.txt", 10), EXHAUSTED, "TOO_MANY_UPLOADS_STARTED"
    )


def test_the_peer_address_as_grpc_reports_it_over_ipv6():
    """grpc percent-encodes the brackets of an IPv6 peer; the built-in bridge connects from ::1."""
    from queuechat.api.peer import client_address, peer_ip

    assert peer_ip("ipv6:%5B::1%5D:41768") == "::1"
    assert peer_ip("ipv6:[2001:db8::7]:443") == "2001:db8::7"
    assert peer_ip("ipv6:%5B::ffff:192.0.2.9%5D:5000") == "192.0.2.9"
    assert peer_ip("ipv4:203.0.113.5:1234") == "203.0.113.5"

    class Context:
        def peer(self):
            return "ipv6:%5B::1%5D:41768"

        def invocation_metadata(self):
            return (("x-forwarded-for", "198.51.100.23"),)

    assert client_address(Context(), ["127.0.0.1", "::1"]) == "198.51.100.23"  # type: ignore[arg-type]
    assert client_address(Context(), []) == "::1"  # type: ignore[arg-type]
