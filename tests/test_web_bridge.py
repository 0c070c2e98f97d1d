"""The grpc-web bridge, spoken to by a plain grpc-web client (tests/web_grpcweb.py): binary and text modes,
unary and streaming calls, trailers, deadlines, cancellation, CORS, the body limit, and `queuechat serve`."""

import asyncio
import base64
import os
import re
import sys
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest
from files import MIB
from harness import is_event
from multidict import CIMultiDict
from sqlmodel import select
from web_grpcweb import GrpcWebClient, envelope

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.store.models import AgentSession
from queuechat_web import DEFAULT_MAX_BODY_BYTES, start_bridge
from queuechat_web.bridge import call_metadata

ROOT = Path(__file__).resolve().parent.parent
CS = "/chat.v1.CustomerService/"
AS = "/chat.v1.AgentService/"
SHOP = "https://shop.example"


@pytest.fixture
async def bridge(server):
    b = await start_bridge(server.address, "127.0.0.1", 0, allowed_origins=[SHOP])
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def base_url(bridge) -> str:
    return f"http://127.0.0.1:{bridge.port}"


@pytest.fixture(params=["binary", "text"])
def web(request, bridge, http) -> GrpcWebClient:
    return GrpcWebClient(http, base_url(bridge), text=request.param == "text")


async def start_chat(web: GrpcWebClient, queue: str = "sales") -> tuple[str, str]:
    """StartChat through the bridge: (conversation id, customer token)."""
    req = cust_pb.StartChatRequest(queue_id=queue, request_id=uuid.uuid4().hex, variables={"name": "Ada"})
    resp = await web.unary(CS + "StartChat", req, cust_pb.StartChatResponse)
    return resp.conversation.conversation_id, resp.customer_token


async def read_until(call, message_type, pred):
    """Read a stream until a message matches; return it."""
    while True:
        data = await call.next()
        assert data is not None, f"the stream ended ({call.code}: {call.message}) before a matching message"
        msg = message_type.FromString(data)
        if pred(msg):
            return msg


def event_of(kind: str, pred=lambda e: True):
    return lambda m: m.HasField("event") and m.event.WhichOneof("kind") == kind and pred(m.event)


async def test_unary_calls_in_binary_and_text_mode(web):
    call = await web.call(CS + "ListQueues", cust_pb.ListQueuesRequest())
    (resp,) = call.parse(cust_pb.ListQueuesResponse)
    assert [(q.queue_id, q.display_name) for q in resp.queues] == [("sales", "Sales"), ("support", "Support")]
    # The status travels in the body's trailer frame, never as a response header.
    assert call.trailers == {"grpc-status": "0"}
    assert "grpc-status" not in call.response.headers


async def test_a_customer_chats_through_the_bridge(server, web):
    conv_id, token = await start_chat(web)
    stream = await web.open(
        CS + "StreamConversation",
        cust_pb.CustomerServiceStreamConversationRequest(conversation_id=conv_id),
        token=token,
    )
    R = cust_pb.CustomerServiceStreamConversationResponse
    started = await read_until(stream, R, event_of("chat_started"))
    assert started.event.chat_started.queue.queue_id == "sales"
    pos = await read_until(stream, R, lambda m: m.HasField("queue_position"))
    assert pos.queue_position.position == 1

    agent = await server.agent("agent1")
    await agent.take(conv_id)
    joined = await read_until(
        stream, R, event_of("participant_joined", lambda e: e.participant_joined.participant.agent_id == "agent1")
    )
    assert joined.event.participant_joined.participant.display_name == "Agent 1"
    await agent.send(conv_id, "Hello from the agent")
    await agent.send(conv_id, "a private note", private=True)
    got = await read_until(stream, R, event_of("message"))
    assert got.event.message.text == "Hello from the agent"

    # Idle, the server's heartbeats come through one by one (the harness sends one every 0.5 s).
    for _ in range(2):
        beat = await read_until(stream, R, lambda m: m.HasField("heartbeat"))
        assert beat.heartbeat.latest_seq >= got.event.seq

    sent = await web.unary(
        CS + "SendMessage",
        cust_pb.CustomerServiceSendMessageRequest(conversation_id=conv_id, request_id="r1", text="Hi, it's Ada"),
        cust_pb.CustomerServiceSendMessageResponse,
        token=token,
    )
    await agent.streams[conv_id].wait_for(is_event("message", lambda e: e.seq == sent.event.seq))
    await agent.close(conv_id, confirm=True)
    await read_until(stream, R, event_of("chat_ended"))
    assert await stream.next() is None and stream.code == grpc.StatusCode.OK
    assert all("private" not in m.event.message.text for m in stream.parse(R) if m.HasField("event"))


async def test_refusals_carry_code_message_and_error_info(server, web):
    forged = await web.call(
        CS + "SendMessage",
        cust_pb.CustomerServiceSendMessageRequest(conversation_id="c1", text="hi"),
        token="qc_forged.x",
    )
    assert forged.messages == []
    assert forged.code == grpc.StatusCode.UNAUTHENTICATED
    assert forged.reason == "CUSTOMER_TOKEN_INVALID" and forged.message

    # A stream refused before its first message still ends with a trailer frame in the body.
    stream = await web.call(
        CS + "StreamConversation",
        cust_pb.CustomerServiceStreamConversationRequest(conversation_id="c1"),
        token="qc_forged.x",
    )
    assert (stream.messages, stream.code, stream.reason) == (
        [],
        grpc.StatusCode.UNAUTHENTICATED,
        "CUSTOMER_TOKEN_INVALID",
    )

    # grpc-message is percent-encoded: non-ASCII text and '%' survive the trip.
    conv_id, token = await start_chat(web)
    odd = "application/x-smörgås%20"
    refused = await web.call(
        CS + "CreateUpload",
        cust_pb.CustomerServiceCreateUploadRequest(
            conversation_id=conv_id, file_name="a", size_bytes=3, content_type=odd
        ),
        token=token,
    )
    assert refused.code == grpc.StatusCode.INVALID_ARGUMENT and refused.reason == "TYPE_NOT_ALLOWED"
    assert odd in refused.message
    assert refused.trailers["grpc-message"].isascii() and "%25" in refused.trailers["grpc-message"]


async def test_grpc_timeout_is_the_call_deadline(web):
    conv_id, token = await start_chat(web)
    req = cust_pb.CustomerServiceStreamConversationRequest(conversation_id=conv_id)
    loop = asyncio.get_running_loop()
    began = loop.time()
    call = await web.call(CS + "StreamConversation", req, token=token, headers={"grpc-timeout": "300m"})
    assert call.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert call.messages, "it streamed until the deadline"
    assert 0.3 <= loop.time() - began < 5
    unary = await web.call(CS + "ListQueues", cust_pb.ListQueuesRequest(), headers={"grpc-timeout": "10S"})
    assert unary.code == grpc.StatusCode.OK
    bad = await web.call(CS + "ListQueues", cust_pb.ListQueuesRequest(), headers={"grpc-timeout": "soon"})
    assert bad.code == grpc.StatusCode.INVALID_ARGUMENT and "grpc-timeout" in bad.message


async def stream_count(server, agent_id: str) -> int:
    def read(s):
        return (
            s.exec(select(AgentSession).where(AgentSession.agent_id == agent_id, AgentSession.ended_at.is_(None)))
            .one()
            .stream_count
        )

    return await server.core.db.read(read)


async def until(check, timeout: float = 5.0) -> None:
    async def poll():
        while not await check():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


# Heartbeats far apart: the backend stream must end because the browser left, not at a failed write.
@pytest.mark.configure(limits={"heartbeat_interval": 60.0})
async def test_agent_service_through_the_bridge_and_a_closed_response_ends_the_backend_stream(server, web):
    login = await web.unary(
        AS + "Login",
        agent_pb.LoginRequest(username="agent1", password="pw1", profile_id="both", ready=True),
        agent_pb.LoginResponse,
    )
    token = login.session_token
    offers = await web.open(AS + "StreamOffers", agent_pb.StreamOffersRequest(), token=token)
    R = agent_pb.StreamOffersResponse
    await read_until(offers, R, lambda m: m.HasField("heartbeat"))  # live
    assert await stream_count(server, "agent1") == 1

    cust = await server.customer("sales")
    cust.open()
    offer = (await read_until(offers, R, lambda m: m.HasField("event") and m.event.HasField("offer"))).event.offer
    assert offer.conversation_id == cust.id
    accepted = await web.unary(
        AS + "AcceptOffer",
        agent_pb.AcceptOfferRequest(offer_id=offer.offer_id),
        agent_pb.AcceptOfferResponse,
        token=token,
    )
    assert accepted.conversation.state == rpb.CONVERSATION_STATE_ACTIVE
    await web.unary(
        AS + "SendMessage",
        agent_pb.SendMessageRequest(conversation_id=cust.id, request_id="a1", text="Hello via grpc-web"),
        agent_pb.SendMessageResponse,
        token=token,
    )
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "Hello via grpc-web"))

    # The browser goes away: the backend stream ends at once, not at its next heartbeat or offer.
    offers.close()

    async def closed():
        return await stream_count(server, "agent1") == 0

    await until(closed)


async def test_cors_for_configured_origins(bridge, http):
    url = base_url(bridge) + CS + "ListQueues"
    wanted = "authorization,content-type,grpc-timeout,x-grpc-web,x-user-agent"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": wanted}
    async with http.options(url, headers={"Origin": SHOP, **preflight}) as ok:
        assert ok.status == 204
        assert ok.headers["Access-Control-Allow-Origin"] == SHOP
        assert "POST" in ok.headers["Access-Control-Allow-Methods"]
        allowed = {h.strip() for h in ok.headers["Access-Control-Allow-Headers"].split(",")}
        assert set(wanted.split(",")) <= allowed
    async with http.options(url, headers={"Origin": "https://evil.example", **preflight}) as denied:
        assert denied.status == 403 and "Access-Control-Allow-Origin" not in denied.headers

    shop = GrpcWebClient(http, base_url(bridge))
    call = await shop.call(CS + "ListQueues", cust_pb.ListQueuesRequest(), headers={"Origin": SHOP})
    assert call.code == grpc.StatusCode.OK
    assert call.response.headers["Access-Control-Allow-Origin"] == SHOP
    exposed = {h.strip() for h in call.response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"grpc-status", "grpc-message", "grpc-status-details-bin"} <= exposed
    # The page's own origin needs no configuration.
    same = await shop.call(CS + "ListQueues", cust_pb.ListQueuesRequest(), headers={"Origin": base_url(bridge)})
    assert same.code == grpc.StatusCode.OK
    body = envelope(cust_pb.ListQueuesRequest())
    headers = {"Origin": "https://evil.example", "content-type": "application/grpc-web+proto"}
    async with http.post(url, data=body, headers=headers) as refused:
        assert refused.status == 403


async def test_upload_chunks_fit_and_larger_bodies_are_refused(server, web):
    conv_id, token = await start_chat(web)
    await (await server.agent("agent1")).take(conv_id)
    up = await web.unary(
        CS + "CreateUpload",
        cust_pb.CustomerServiceCreateUploadRequest(conversation_id=conv_id, file_name="big.txt", size_bytes=2 * MIB),
        cust_pb.CustomerServiceCreateUploadResponse,
        token=token,
    )
    chunk = cust_pb.CustomerServiceUploadChunkRequest(
        conversation_id=conv_id, upload_id=up.upload.upload_id, offset=0, data=b"a" * MIB
    )
    done = await web.unary(CS + "UploadChunk", chunk, cust_pb.CustomerServiceUploadChunkResponse, token=token)
    assert done.received_bytes == MIB

    chunk.offset, chunk.data = MIB, b"a" * DEFAULT_MAX_BODY_BYTES
    refused = await web.call(CS + "UploadChunk", chunk, token=token)
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(DEFAULT_MAX_BODY_BYTES) in refused.message


async def test_only_the_chat_services_and_well_formed_requests_pass(bridge, http, web):
    admin = await web.call(
        "/chat.v1.AdminService/Login", admin_pb.AdminServiceLoginRequest(username="admin", password="adminpw")
    )
    assert admin.code == grpc.StatusCode.UNIMPLEMENTED
    assert (await web.call(CS + "NoSuchMethod", b"")).code == grpc.StatusCode.UNIMPLEMENTED

    def body(raw: bytes) -> bytes:
        return base64.b64encode(raw) if web.text else raw

    truncated = await web.call(CS + "ListQueues", body=body(b"\x00\x00\x00\x00\x09abc"))
    assert truncated.code == grpc.StatusCode.INVALID_ARGUMENT
    compressed = await web.call(CS + "ListQueues", body=body(envelope(b"", flag=1)))
    assert compressed.code == grpc.StatusCode.INVALID_ARGUMENT
    two = await web.call(CS + "ListQueues", body=body(envelope(b"") * 2))
    assert two.code == grpc.StatusCode.INVALID_ARGUMENT

    json_headers = {"content-type": "application/grpc-web+json"}
    async with http.post(base_url(bridge) + CS + "ListQueues", data=b"{}", headers=json_headers) as resp:
        assert resp.status == 415


def test_request_headers_become_call_metadata():
    headers = CIMultiDict(
        {
            "Host": "chat.example", "Connection": "keep-alive", "Content-Length": "5",
            "Content-Type": "application/grpc-web+proto", "TE": "trailers", "Accept": "*/*", "Origin": SHOP,
            "Cookie": "session=1", "Sec-Fetch-Mode": "cors", "X-Grpc-Web": "1", "Grpc-Timeout": "1S",
            "Authorization": "Bearer qc_x", "X-Request-Id": "r-1",
            "Trace-Bin": base64.b64encode(b"\x00\x01\x02").decode().rstrip("="), "X-Bad": "caf\u00e9",
        }
    )  # fmt: skip
    assert dict(call_metadata(headers)) == {
        "authorization": "Bearer qc_x",
        "x-request-id": "r-1",
        "trace-bin": b"\x00\x01\x02",
    }


async def test_stopping_the_bridge_ends_streams_with_unavailable(server, http):
    b = await start_bridge(server.address, "127.0.0.1", 0)
    web = GrpcWebClient(http, base_url(b))
    conv_id, token = await start_chat(web)
    stream = await web.open(
        CS + "StreamConversation",
        cust_pb.CustomerServiceStreamConversationRequest(conversation_id=conv_id),
        token=token,
    )
    assert await stream.next() is not None
    await b.stop()
    await stream.finish()
    assert stream.code == grpc.StatusCode.UNAVAILABLE


async def test_queuechat_serve_runs_the_page_and_the_bridge(tmp_path, http):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queuechat", "serve", "--config", str(ROOT / "config/demo.toml"),
        "--data-dir", str(tmp_path), "--listen", "127.0.0.1:0", "--web-listen", "127.0.0.1:0",
        "--web-origins", f"{SHOP}, https://other.example",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip

    async def bridge_port() -> int:
        # The server logs the ports it bound.
        while line := (await proc.stderr.readline()).decode():
            if m := re.search(r"web bridge and customer page listening on port (\d+)", line):
                return int(m.group(1))
        raise AssertionError("the server exited before the bridge started")

    try:
        port = await asyncio.wait_for(bridge_port(), 30)
        async with http.get(f"http://127.0.0.1:{port}/") as page:
            assert page.status == 200 and "<title>Chat with us</title>" in await page.text()
        web = GrpcWebClient(http, f"http://127.0.0.1:{port}")
        queues = await web.unary(
            CS + "ListQueues", cust_pb.ListQueuesRequest(), cust_pb.ListQueuesResponse, headers={"Origin": SHOP}
        )
        assert [q.queue_id for q in queues.queues] == ["sales", "support"]
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 15) == 0


def test_demo_help_points_at_the_customer_page(capsys):
    from queuechat.config import load_config
    from queuechat.demo import print_demo_help

    print_demo_help(load_config(ROOT / "config/demo.toml"), "[::]:50051", "0.0.0.0:8080")
    out = capsys.readouterr().out
    assert "open http://localhost:8080/ in a browser" in out
    assert "http://localhost:8080/#identity_token=ey" in out
