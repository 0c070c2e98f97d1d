"""Hardening: what an attacker or a careless integrator sends gets a clear status with a reason,
changes nothing and leaks nothing; identity tokens as hosting sites make them; sessions that end
when the configuration says so; password hashing that cannot starve file transfers."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import grpc
import jwt
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from harness import IDENTITY_SECRET, error_reason, expect_error
from sqlmodel import func, select

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.store.models import AgentSession, Conversation, CustomerVariable

INVALID = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def rid() -> str:
    return uuid.uuid4().hex


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def count_rows(server, model) -> int:
    return await server.core.db.read(lambda s: s.exec(select(func.count()).select_from(model)).one())


# --- control characters, on both databases --------------------------------------------


async def test_control_characters_are_refused_in_every_string_field_on_both_databases(any_db_server):
    server = any_db_server
    chats_before = await count_rows(server, Conversation)
    refusals = [
        server.agent_stub.Login(agent_pb.LoginRequest(username="al\x00ice", password="pw1", profile_id="both")),
        server.agent_stub.Login(agent_pb.LoginRequest(username="agent1", password="pw\x001", profile_id="both")),
        server.customer_stub.StartChat(cust_pb.StartChatRequest(queue_id="a\x00b", request_id=rid())),
        server.customer_stub.StartChat(
            cust_pb.StartChatRequest(queue_id="sales", request_id=rid(), variables={"name": "Ada\x00"})
        ),
        server.customer_stub.StartChat(
            cust_pb.StartChatRequest(queue_id="sales", request_id=rid(), variables={"na\x07me": "Ada"})
        ),
        server.admin_stub.Login(admin_pb.AdminServiceLoginRequest(username="admin\x1b", password="adminpw")),
    ]
    for call in refusals:
        err = await expect_error(call, INVALID, "BAD_CHARACTERS")
        assert "SELECT" not in err.details() and "psycopg" not in err.details()
    assert await count_rows(server, Conversation) == chats_before

    agent, cust = await server.chat()
    await expect_error(cust.send("hi\x00there"), INVALID, "BAD_CHARACTERS")
    await expect_error(cust.send("bell\x07"), INVALID, "BAD_CHARACTERS")
    sent = await cust.send("two lines\nand a\ttab\r\n")  # line breaks and tabs belong in text
    assert sent.message.text == "two lines\nand a\ttab\r\n"
    await expect_error(agent.send(cust.id, "x", request_id="id\x00"), INVALID, "BAD_CHARACTERS")


# --- nothing internal reaches a client ----------------------------------------------------


async def test_undecodable_request_bytes_are_invalid_argument_without_a_traceback(server, caplog):
    caplog.set_level(logging.DEBUG)
    raw = server.channel.unary_unary(
        "/chat.v1.CustomerService/StartChat", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    for garbage in (b"\xff\xff\xff\xff", b"\x0a\xff\xff\xff\x0f", b"\x12\x05ab"):
        err = await expect_error(raw(garbage), INVALID, "UNDECODABLE_REQUEST")
        assert "class" not in err.details() and "DecodeError" not in err.details()
    assert not any(r.exc_info for r in caplog.records), "a traceback was logged for a client's bad bytes"


async def test_a_bearer_token_with_non_ascii_characters_is_unauthenticated(server):
    """grpc's own clients refuse to send such metadata; other HTTP/2 clients and proxies do not."""
    from queuechat.api.errors import bearer
    from queuechat.errors import ChatError

    class Context:
        def __init__(self, value):
            self.value = value

        def invocation_metadata(self):
            return (("authorization", self.value),)

    _, cust = await server.chat()
    for value in (f"Bearer qc_{cust.id}.é-not-ascii", "Bearer qa_ünïcode", b"Bearer \xff\xfe"):
        token_ = bearer(Context(value))  # type: ignore[arg-type]
        with pytest.raises(ChatError) as refused:
            server.core.authenticate_customer(token_, cust.id)
        assert refused.value.kind.value == "UNAUTHENTICATED"
        with pytest.raises(ChatError) as refused:
            await server.core.authenticate_agent(token_)
        assert refused.value.kind.value == "UNAUTHENTICATED"
    # And straight to the check, past bearer(): still a refusal, not a TypeError.
    with pytest.raises(ChatError):
        server.core.authenticate_customer(f"qc_{cust.id}.é", cust.id)


async def test_an_unexpected_failure_is_internal_with_an_error_id_and_no_internal_text(server, monkeypatch, caplog):
    async def broken(*args, **kwargs):
        raise RuntimeError("/srv/queuechat/secret.py line 7: KeyError 'password_hash'")

    monkeypatch.setattr(server.core, "list_queues", broken)
    caplog.set_level(logging.ERROR)
    err = await expect_error(server.customer_stub.ListQueues(cust_pb.ListQueuesRequest()), grpc.StatusCode.INTERNAL)
    details = err.details()
    assert "secret" not in details and "RuntimeError" not in details and "password_hash" not in details
    assert "error id" in details
    error_id = details.split("error id ")[1].rstrip(").")
    logged = [r for r in caplog.records if error_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None  # the id leads to the traceback


async def test_long_values_are_refused_early_and_quoted_short(server):
    agent = await server.agent("agent1")
    long_id = "o" * 10_000
    err = await expect_error(agent.accept(long_id), INVALID, "FIELD_TOO_LONG")
    status = rpc_status.from_call(err)
    assert status is not None and len(err.details()) < 300
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    assert all(len(v) <= 80 for v in info.metadata.values()) and long_id not in err.details()
    await expect_error(
        server.customer_stub.StartChat(cust_pb.StartChatRequest(queue_id="q" * 10_000, request_id=rid())),
        INVALID,
        "FIELD_TOO_LONG",
    )
    # Just under the cap: the domain's own answer, quoting only a short prefix.
    err = await expect_error(
        server.customer_stub.StartChat(cust_pb.StartChatRequest(queue_id="q" * 120, request_id=rid())),
        grpc.StatusCode.NOT_FOUND,
        "QUEUE_NOT_FOUND",
    )
    assert "q" * 100 not in err.details()


# --- identity tokens as hosting sites make them -------------------------------------------


def token(secret: str = IDENTITY_SECRET, **claims) -> str:
    now = int(time.time())
    claims.setdefault("iat", now)
    claims.setdefault("exp", now + 600)
    return jwt.encode(claims, secret, algorithm="HS256")


async def start(server, identity_token: str, request_id: str | None = None):
    req = cust_pb.StartChatRequest(queue_id="sales", request_id=request_id or rid(), identity_token=identity_token)
    return await server.customer_stub.StartChat(req)


def variables(resp) -> dict[str, tuple[str, bool]]:
    return {v.name: (v.value, v.authenticated) for v in resp.conversation.variables}


async def test_registered_claims_like_aud_are_accepted_and_not_variables(server):
    resp = await start(server, token(aud="https://shop.example", iss="shop", sub="c-1", jti=rid(), vip=True, n=3))
    got = variables(resp)
    assert got["sub"] == ("c-1", True) and got["vip"] == ("true", True) and got["n"] == ("3", True)
    assert not {"aud", "iss", "exp", "iat", "jti"} & set(got)


@pytest.mark.configure(
    security={
        "identity_tokens": [{"secret": "shop-secret-0123456789abcdef0123", "audience": "queuechat", "issuer": "shop"}]
    }
)
async def test_audience_and_issuer_are_checked_when_configured(server):
    good = "shop-secret-0123456789abcdef0123"
    await start(server, token(good, aud="queuechat", iss="shop"))
    for bad in (token(good, aud="other", iss="shop"), token(good, iss="shop"), token(good, aud="queuechat", iss="x")):
        await expect_error(start(server, bad), UNAUTHENTICATED, "IDENTITY_TOKEN_INVALID")
    # The plain identity_secrets signer still checks neither.
    await start(server, token(aud="anything"))


@pytest.mark.configure(security={"identity_leeway": 30.0, "identity_max_lifetime": 3600.0})
async def test_clock_skew_leeway_and_lifetime_cap(server):
    now = int(time.time())
    await start(server, token(iat=now - 20, exp=now - 10))  # expired 10 s ago: within the leeway
    await expect_error(start(server, token(iat=now - 100, exp=now - 60)), UNAUTHENTICATED, "IDENTITY_TOKEN_EXPIRED")
    await start(server, token(iat=now + 20, nbf=now + 20))  # a clock 20 s ahead
    await expect_error(start(server, token(nbf=now + 120)), UNAUTHENTICATED, "IDENTITY_TOKEN_INVALID")
    await expect_error(start(server, token(iat=now, exp=now + 7200)), UNAUTHENTICATED, "IDENTITY_TOKEN_INVALID")
    await expect_error(start(server, token(exp=now + 7200, iat=None)), UNAUTHENTICATED, "IDENTITY_TOKEN_INVALID")


async def test_a_replayed_jti_is_refused_but_a_retry_of_the_same_start_is_not(server):
    t = token(jti="once-" + rid(), sub="c-2")
    request_id = rid()
    first = await start(server, t, request_id)
    again = await start(server, t, request_id)  # the same call retried: the same chat
    assert again.conversation.conversation_id == first.conversation.conversation_id
    await expect_error(start(server, t), UNAUTHENTICATED, "IDENTITY_TOKEN_REPLAYED")


# --- sessions ---------------------------------------------------------------------------


async def test_a_password_changed_in_the_file_ends_the_agents_sessions(server):
    agent = await server.agent("agent1", offers=False)
    other = await server.agent("agent2", offers=False)
    server.config_doc["agents"][0]["password"] = "a new password"
    await server.restart()
    for token_ in (agent.token,):
        await expect_error(
            server.agent_stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=auth(token_)),
            UNAUTHENTICATED,
        )
    await server.agent_stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=auth(other.token))


async def test_an_agent_removed_from_or_disabled_in_the_file_is_out(server):
    a3 = await server.agent("agent3", offers=False)
    a4 = await server.agent("agent4", offers=False)
    admin_token = await server.admin_token()
    server.config_doc["agents"] = [a for a in server.config_doc["agents"] if a["id"] != "agent3"]
    next(a for a in server.config_doc["agents"] if a["id"] == "agent4")["disabled"] = True
    await server.restart()
    for t in (a3.token, a4.token):
        await expect_error(
            server.agent_stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=auth(t)), UNAUTHENTICATED
        )
    for agent_id in ("agent3", "agent4"):
        n = agent_id[-1]
        login = agent_pb.LoginRequest(username=agent_id, password=f"pw{n}", profile_id="both")
        await expect_error(server.agent_stub.Login(login), grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_DISABLED")
    # The admin was neither: still in.
    await server.admin_stub.ListQueues(admin_pb.AdminServiceListQueuesRequest(), metadata=auth(admin_token))


async def test_admin_sessions_end_on_password_change_removal_and_disable(server):
    token_ = await server.admin_token()
    server.config_doc["admins"][0]["password"] = "another admin pw"
    await server.restart()
    req = admin_pb.AdminServiceListQueuesRequest()
    await expect_error(server.admin_stub.ListQueues(req, metadata=auth(token_)), UNAUTHENTICATED)
    login = admin_pb.AdminServiceLoginRequest(username="admin", password="another admin pw")
    token_ = (await server.admin_stub.Login(login)).admin_token
    server.config_doc["admins"][0]["disabled"] = True
    await server.restart()
    await expect_error(server.admin_stub.ListQueues(req, metadata=auth(token_)), UNAUTHENTICATED)
    await expect_error(server.admin_stub.Login(login), grpc.StatusCode.PERMISSION_DENIED, "ACCOUNT_DISABLED")


@pytest.mark.configure(security={"admin_session_idle": 0.6, "admin_session_max": 3600.0})
async def test_admin_sessions_expire_when_idle(server):
    token_ = await server.admin_token()
    req = admin_pb.AdminServiceListQueuesRequest()
    await server.admin_stub.ListQueues(req, metadata=auth(token_))
    deadline = time.monotonic() + 10
    while True:  # expires once idle for 0.6 s; each try is a call, so poll slower than that
        await asyncio.sleep(0.8)
        try:
            await server.admin_stub.ListQueues(req, metadata=auth(token_))
        except grpc.aio.AioRpcError as e:
            assert e.code() == UNAUTHENTICATED and error_reason(e) in ("ADMIN_SESSION_EXPIRED", "ADMIN_SESSION_INVALID")
            break
        assert time.monotonic() < deadline, "the idle admin session never expired"


@pytest.mark.configure(security={"admin_session_idle": 3600.0, "admin_session_max": 1.0})
async def test_admin_sessions_have_an_absolute_lifetime(server):
    token_ = await server.admin_token()
    req = admin_pb.AdminServiceListQueuesRequest()
    deadline = time.monotonic() + 10
    while True:  # busy all along, still out after 1 s
        try:
            await server.admin_stub.ListQueues(req, metadata=auth(token_))
        except grpc.aio.AioRpcError as e:
            assert e.code() == UNAUTHENTICATED
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)


@pytest.mark.configure(security={"agent_session_idle": 0.5, "agent_session_max": 3600.0})
async def test_an_agent_session_without_an_offer_stream_expires_when_idle(server):
    present = await server.agent("agent1")  # holds its offer stream: never idle
    absent = await server.agent("agent2", offers=False)
    req = agent_pb.ListConversationsRequest()
    deadline = time.monotonic() + 10
    while True:
        await asyncio.sleep(0.7)
        try:
            await server.agent_stub.ListConversations(req, metadata=auth(absent.token))
        except grpc.aio.AioRpcError as e:
            assert e.code() == UNAUTHENTICATED
            break
        assert time.monotonic() < deadline
    await server.agent_stub.ListConversations(req, metadata=auth(present.token))

    async def ended() -> bool:
        rows = await server.core.db.read(
            lambda s: s.exec(select(AgentSession).where(AgentSession.agent_id == "agent2")).all()
        )
        return all(r.ended_at is not None for r in rows)

    while not await ended():
        assert time.monotonic() < deadline + 5
        await asyncio.sleep(0.05)


@pytest.mark.configure(security={"agent_session_max": 2.0})
async def test_a_cached_agent_token_is_not_trusted_past_its_sessions_lifetime(server):
    """Tokens are trusted for up to 30 s without a read (the idle limit is long here), but never
    beyond the session's lifetime."""
    started = time.monotonic()
    agent = await server.agent("agent1", offers=False)
    req = agent_pb.ListConversationsRequest()
    await server.agent_stub.ListConversations(req, metadata=auth(agent.token))  # read, then cached
    await asyncio.sleep(max(0.0, started + 2.3 - time.monotonic()))
    await expect_error(
        server.agent_stub.ListConversations(req, metadata=auth(agent.token)), UNAUTHENTICATED, "SESSION_EXPIRED"
    )


# --- password hashing does not starve file transfers --------------------------------------


@pytest.mark.configure(security={"argon2_time_cost": 3, "argon2_memory_kib": 65536})
async def test_a_burst_of_wrong_logins_does_not_stall_uploads(server):
    from files import Uploader

    agent, cust = await server.chat()
    up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    data = b"x" * (256 * 1024)
    created = await up.create("notes.txt", len(data) * 8)

    wrong = [
        server.agent_stub.Login(agent_pb.LoginRequest(username="agent2", password=f"wrong{i}", profile_id="both"))
        for i in range(48)
    ]
    burst = asyncio.gather(*wrong, return_exceptions=True)
    await asyncio.sleep(0)  # the burst is on its way
    slowest = 0.0
    for i in range(8):
        t0 = time.perf_counter()
        await up.chunk(created.upload_id, i * len(data), data)
        slowest = max(slowest, time.perf_counter() - t0)
    results = await burst
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
    assert slowest < 1.0, f"an upload round trip took {slowest:.2f} s during the login burst"


async def test_a_customer_variable_with_nul_leaves_nothing_behind(server):
    before = await count_rows(server, CustomerVariable)
    await expect_error(
        server.customer_stub.StartChat(
            cust_pb.StartChatRequest(queue_id="sales", request_id=rid(), variables={"a": "ok", "b": "\x00"})
        ),
        INVALID,
        "BAD_CHARACTERS",
    )
    assert await count_rows(server, CustomerVariable) == before


def test_the_demo_identity_token_passes_the_demo_configurations_checks(capsys):
    """scripts/serve prints a link with a signed token: it must pass the lifetime cap and the rest."""
    from pathlib import Path

    from queuechat.config import load_config
    from queuechat.demo import print_demo_help
    from queuechat.domain.auth import verify_identity_token

    config = load_config(Path(__file__).resolve().parents[1] / "config/demo.toml", environ={})
    print_demo_help(config, "[::]:50051", "0.0.0.0:8080")
    token = capsys.readouterr().out.split("#identity_token=")[1].split()[0]
    claims = verify_identity_token(
        token,
        config.identity_signers,
        leeway=config.security.identity_leeway,
        max_lifetime=config.security.identity_max_lifetime,
    )
    assert claims.variables["name"] == "Ada Lovelace"


@pytest.mark.configure(security={"agent_session_idle": 0.5, "agent_session_max": 3600.0})
async def test_time_with_the_offer_stream_open_is_not_idle_time(server):
    """An agent who waited on the offer stream longer than the idle time, then lost it for a moment
    (a network blip, a restart), is still logged in when it reconnects."""
    agent = await server.agent("agent1")
    started = time.monotonic()
    while time.monotonic() - started < 1.2:  # well past the idle time, the stream open all along
        await agent.offers.wait_for(lambda i: i.HasField("heartbeat"), start=len(agent.offers.items))
    await agent.offers.cancel()
    server.core._agent_tokens.clear()  # as once the cache lapses, or on another node: the session is read again
    agent.open_offers()  # reconnects at once: its session is still good
    await agent.offers.wait_for(lambda i: i.HasField("heartbeat"))
    await server.agent_stub.ListConversations(agent_pb.ListConversationsRequest(), metadata=auth(agent.token))


async def test_identity_claims_with_control_characters_are_not_variables(server):
    t = jwt.encode(
        {"name": "Ada\x00", "note": "bell\x07", "email": "ada@example.com", "exp": int(time.time()) + 600},
        IDENTITY_SECRET,
        algorithm="HS256",
    )
    resp = await start(server, t)
    got = variables(resp)
    assert "name" not in got and "note" not in got and got["email"] == ("ada@example.com", True)
