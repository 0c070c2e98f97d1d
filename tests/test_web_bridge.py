"""The grpc-web bridge, spoken to by a plain grpc-web client (tests/web_grpcweb.py): binary and text modes,
unary and streaming calls, trailers, deadlines, cancellation, CORS, the limits, and `queuechat serve`. Then
hostile and departing browsers, against a recording stand-in backend where the real server cannot tell:
bad frame flags, grpc-timeout edge cases, forged client addresses, disconnects mid-stream."""

import asyncio
import base64
import contextlib
import logging
import os
import re
import sys
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web as aioweb
from files import MIB
from harness import is_event
from multidict import CIMultiDict
from sqlmodel import select
from web_grpcweb import GrpcWebClient, envelope

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.domain.log import conv_topic
from queuechat.store.models import AgentSession
from queuechat_web import DEFAULT_MAX_BODY_BYTES, grpcweb, start_bridge
from queuechat_web.bridge import call_metadata, client_address

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
    # A malformed grpc-timeout is ignored, as Envoy does (see the tests further down).
    bad = await web.call(CS + "ListQueues", cust_pb.ListQueuesRequest(), headers={"grpc-timeout": "soon"})
    assert bad.code == grpc.StatusCode.OK


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
    # A length field that claims 4 GiB is checked against the body, never allocated.
    lying = await web.call(CS + "ListQueues", body=body(b"\x00\xff\xff\xff\xffabc"))
    assert lying.code == grpc.StatusCode.INVALID_ARGUMENT and "4294967295" in lying.message
    empty = await web.call(CS + "ListQueues", body=b"")
    assert empty.code == grpc.StatusCode.INVALID_ARGUMENT
    compressed = await web.call(CS + "ListQueues", body=body(envelope(b"", flag=1)))
    assert compressed.code == grpc.StatusCode.INVALID_ARGUMENT
    many = await web.call(CS + "ListQueues", body=body(envelope(b"") * 10_000))
    assert many.code == grpc.StatusCode.INVALID_ARGUMENT and "more than one frame" in many.message

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
            "X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https", "Forwarded": "for=6.6.6.6", "X-Real-IP": "6.6.6.6",
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


# --- hostile and departing browsers -------------------------------------------------------------


class Backend:
    """A stand-in gRPC server for CustomerService that records what the bridge sends it: each call's
    method, request bytes, invocation metadata and deadline. StreamConversation sends a message every
    few milliseconds until the caller goes away."""

    def __init__(self):
        self.calls: list[dict] = []
        self.open_streams = 0
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "chat.v1.CustomerService",
                    {
                        "ListQueues": grpc.unary_unary_rpc_method_handler(self.unary),
                        "StreamConversation": grpc.unary_stream_rpc_method_handler(self.stream),
                    },
                ),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    def _record(self, method: str, request: bytes, context) -> None:
        self.calls.append(
            {
                "method": method,
                "request": request,
                "metadata": [(m.key, m.value) for m in context.invocation_metadata()],
                "time_remaining": context.time_remaining(),
            }
        )

    async def unary(self, request: bytes, context) -> bytes:
        self._record("ListQueues", request, context)
        return b""

    async def stream(self, request: bytes, context):
        self._record("StreamConversation", request, context)
        self.open_streams += 1
        try:
            while True:
                yield b"\x08\x01"
                await asyncio.sleep(0.005)
        finally:
            self.open_streams -= 1

    def metadata(self, call: int = -1) -> dict:
        return dict(self.calls[call]["metadata"])


@pytest.fixture
async def backend():
    b = Backend()
    await b.server.start()
    try:
        yield b
    finally:
        await b.server.stop(None)


@pytest.fixture
async def fake_bridge(backend):
    """A bridge in front of the recording backend."""
    b = await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0)
    try:
        yield b
    finally:
        await b.stop()


@pytest.fixture(params=["binary", "text"])
def fake_web(request, fake_bridge, http) -> GrpcWebClient:
    return GrpcWebClient(http, base_url(fake_bridge), text=request.param == "text")


@pytest.mark.parametrize(
    "flag, code, words",
    [
        (0x80, grpc.StatusCode.INVALID_ARGUMENT, "trailer frame"),
        (0x81, grpc.StatusCode.INVALID_ARGUMENT, "trailer frame"),
        (0x02, grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
        (0x40, grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
        (0x7E, grpc.StatusCode.INVALID_ARGUMENT, "reserved"),
        # Compressed, but no grpc-encoding says how: ill-formed.
        (0x01, grpc.StatusCode.INVALID_ARGUMENT, "compressed"),
    ],
)
async def test_request_frames_other_than_one_plain_message_are_refused_before_the_backend(
    backend, fake_web, flag, code, words
):
    def body(raw: bytes) -> bytes:
        return base64.b64encode(raw) if fake_web.text else raw

    request = b"\x0a\x01x"  # the backend takes any bytes
    refused = await fake_web.call(CS + "ListQueues", body=body(envelope(request, flag=flag)))
    assert (refused.code, refused.messages) == (code, [])
    assert words in refused.message.lower() and f"{flag:#04x}" in refused.message
    # A trailer frame after a good message frame is refused too.
    after = await fake_web.call(
        CS + "ListQueues", body=body(envelope(request) + envelope(b"grpc-status: 0\r\n", flag=flag))
    )
    assert after.code == grpc.StatusCode.INVALID_ARGUMENT
    assert backend.calls == [], "the backend was called"

    ok = await fake_web.call(CS + "ListQueues", body=body(envelope(request)))
    assert ok.code == grpc.StatusCode.OK
    assert [c["request"] for c in backend.calls] == [request]


async def test_compressed_request_messages_get_unimplemented_with_the_encodings_accepted(backend, fake_web):
    body = envelope(b"\x1f\x8b\x08\x00", flag=0x01)
    refused = await fake_web.call(
        CS + "ListQueues", body=base64.b64encode(body) if fake_web.text else body, headers={"grpc-encoding": "gzip"}
    )
    assert refused.code == grpc.StatusCode.UNIMPLEMENTED and "gzip" in refused.message
    assert refused.trailers["grpc-accept-encoding"] == "identity"
    assert backend.calls == []


@pytest.mark.parametrize(
    "header, seconds",
    [
        ("99999999H", grpcweb.MAX_TIMEOUT),  # the longest the spec allows: clamped, not an instant deadline
        ("99999999S", grpcweb.MAX_TIMEOUT),
        ("10000000M", grpcweb.MAX_TIMEOUT),
        ("2H", 7200),
        ("90S", 90),
        ("30000m", 30),
        ("30000000u", 30),
        ("30000000n", 0.03),
    ],
)
async def test_grpc_timeout_is_parsed_per_the_spec_and_clamped(backend, fake_web, header, seconds):
    call = await fake_web.call(CS + "ListQueues", b"", headers={"grpc-timeout": header})
    assert call.code == grpc.StatusCode.OK, f"{call.code}: {call.message}"
    # gRPC rounds the deadline it sends up a little.
    assert backend.calls[-1]["time_remaining"] == pytest.approx(seconds, rel=0.01, abs=5)


@pytest.mark.parametrize(
    "header",
    ["soon", "", "5", "S", "1s", "1h", "1.5S", "-1S", "+1S", "100000000H", "1 S", "0x10S", "\u0661\u0662S", "5SS"],
)
async def test_a_malformed_grpc_timeout_is_ignored_like_envoy_does(backend, fake_web, header):
    call = await fake_web.call(CS + "ListQueues", b"", headers={"grpc-timeout": header})
    assert call.code == grpc.StatusCode.OK, f"{call.code}: {call.message}"
    assert backend.calls[-1]["time_remaining"] is None, "a malformed grpc-timeout became a deadline"


def test_parse_timeout():
    assert grpcweb.parse_timeout("1n") == 1e-9
    assert grpcweb.parse_timeout("0S") == 0
    assert grpcweb.parse_timeout("12345678m") == 12345.678
    assert grpcweb.parse_timeout("1000000M") == grpcweb.MAX_TIMEOUT == 30 * 24 * 3600
    assert grpcweb.parse_timeout("99999999H") == grpcweb.MAX_TIMEOUT
    assert grpcweb.parse_timeout("99999999n") == pytest.approx(0.099999999)
    for bad in ("100000000n", "1", "H", "1d", "\u0661S", " 1S", "1S ", "1\u00a0S"):
        with pytest.raises(ValueError):
            grpcweb.parse_timeout(bad)


# Heartbeats every 2 ms: data is on its way to the browsers when they leave.
@pytest.mark.configure(limits={"heartbeat_interval": 0.002})
async def test_browsers_leaving_mid_stream_end_their_streams_quietly(server, bridge, caplog):
    """Before the fix about one aborted stream in ten logged `ERROR aiohttp.server: Error handling request`
    with a traceback (ClientConnectionResetError: Cannot write to closing transport). That is a race, so
    this runs 3 rounds of 50; the next test makes the race certain."""
    caplog.set_level(logging.DEBUG)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True)) as http:
        conv_id, token = await start_chat(GrpcWebClient(http, base_url(bridge)))
        topic = conv_topic(conv_id)
        body = envelope(cust_pb.CustomerServiceStreamConversationRequest(conversation_id=conv_id))
        headers = {"content-type": "application/grpc-web+proto", "authorization": f"Bearer {token}"}

        async def watch_then_leave() -> None:
            resp = await http.post(base_url(bridge) + CS + "StreamConversation", data=body, headers=headers)
            assert resp.status == 200
            assert await resp.content.readany(), "the stream sent nothing"
            resp.close()  # a closed tab: the connection goes

        for _ in range(3):
            await asyncio.gather(*(watch_then_leave() for _ in range(50)))

            async def all_gone():
                return server.core.bus.subscriber_count(topic) == 0

            await until(all_gone)  # the backend streams were cancelled
            assert not bridge.streams
    noisy = [r for r in caplog.records if r.levelno > logging.DEBUG and r.name.startswith(("aiohttp", "queuechat_web"))]
    assert noisy == [], [f"{r.name} {r.levelname}: {r.getMessage()} {r.exc_info and r.exc_info[1]!r}" for r in noisy]
    assert [r for r in caplog.records if r.exc_info] == []


async def test_a_write_that_finds_the_browser_gone_ends_the_stream_quietly(
    backend, fake_bridge, http, caplog, monkeypatch
):
    """The race above, made certain: the browser's connection closes just before the bridge writes the
    stream's third message, so the write finds the transport closing before aiohttp has cancelled the handler."""
    caplog.set_level(logging.DEBUG)
    write = aioweb.StreamResponse.write
    writes = 0

    async def close_then_write(response, data):
        nonlocal writes
        writes += 1
        if writes == 3:
            response._req.transport.close()
        return await write(response, data)

    monkeypatch.setattr(aioweb.StreamResponse, "write", close_then_write)
    stream = await GrpcWebClient(http, base_url(fake_bridge)).open(CS + "StreamConversation")
    with contextlib.suppress(aiohttp.ClientPayloadError, AssertionError):
        await stream.finish()  # the body ends without a trailer frame
    assert writes == 3

    async def cancelled():
        return backend.open_streams == 0

    await until(cancelled)
    assert not fake_bridge.streams
    assert [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []
    assert any(r.levelno == logging.DEBUG and "left" in r.getMessage() for r in caplog.records)


async def test_a_stream_the_browser_leaves_cancels_the_backend_call(backend, fake_bridge, http, caplog):
    caplog.set_level(logging.DEBUG)
    web = GrpcWebClient(http, base_url(fake_bridge))
    streams = [await web.open(CS + "StreamConversation") for _ in range(10)]
    for s in streams:
        assert await s.next() is not None
    assert backend.open_streams == 10
    for s in streams:
        s.close()

    async def cancelled():
        return backend.open_streams == 0

    await until(cancelled)
    assert [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []


async def test_the_backend_sees_the_browsers_address_and_no_forged_one(backend, fake_web):
    forged = {
        "X-Forwarded-For": "6.6.6.6",
        "Forwarded": "for=6.6.6.6",
        "X-Real-IP": "6.6.6.6",
        "X-Forwarded-Host": "evil",
    }
    await fake_web.call(CS + "ListQueues", b"", headers=forged)
    md = backend.metadata()
    assert md["x-forwarded-for"] == "127.0.0.1"
    assert not {"forwarded", "x-real-ip", "x-forwarded-host"} & md.keys()
    assert all("6.6.6.6" not in str(v) for v in md.values())
    # Streams too.
    stream = await fake_web.open(CS + "StreamConversation", headers=forged)
    assert await stream.next() is not None
    stream.close()
    assert backend.metadata()["x-forwarded-for"] == "127.0.0.1"


async def test_behind_trusted_proxies_the_rightmost_untrusted_address_is_the_client(backend, http):
    b = await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0, trusted_proxies=["127.0.0.1", "10.0.0.0/8"])
    try:
        web = GrpcWebClient(http, base_url(b))

        async def seen(*xff: str) -> str:
            headers = CIMultiDict(("X-Forwarded-For", v) for v in xff)
            await web.call(CS + "ListQueues", b"", headers=headers)
            return backend.metadata()["x-forwarded-for"]

        # The browser may write anything on the left; the proxies append what they saw.
        assert await seen("6.6.6.6, 203.0.113.7, 10.1.2.3") == "203.0.113.7"
        assert await seen("6.6.6.6", "203.0.113.7,10.1.2.3") == "203.0.113.7"  # two header lines are one list
        assert await seen("203.0.113.7:4711, 10.1.2.3") == "203.0.113.7"
        assert await seen("[2001:db8::7]:4711") == "2001:db8::7"
        assert await seen("10.0.0.1, 10.0.0.2") == "10.0.0.1"  # all trusted: the left-most
        assert await seen() == "127.0.0.1"  # no header: the proxy itself
        assert await seen("6.6.6.6, not-an-address") == "127.0.0.1"  # garbage from a proxy: trust nothing in it
    finally:
        await b.stop()

    # A peer that is not a trusted proxy cannot set the address.
    b = await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0, trusted_proxies=["10.0.0.0/8"])
    try:
        await GrpcWebClient(http, base_url(b)).call(CS + "ListQueues", b"", headers={"X-Forwarded-For": "203.0.113.7"})
        assert backend.metadata()["x-forwarded-for"] == "127.0.0.1"
    finally:
        await b.stop()
    with pytest.raises(ValueError):
        await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0, trusted_proxies=["10.0.0.0/33"])


def test_client_address():
    import ipaddress

    trusted = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert client_address("192.0.2.1", ["10.0.0.9"], trusted) == "192.0.2.1"
    assert client_address("10.0.0.1", ["192.0.2.5, 10.0.0.9"], trusted) == "192.0.2.5"
    assert client_address("::ffff:10.0.0.1", ["192.0.2.5"], trusted) == "192.0.2.5"  # a v4 peer on a dual-stack socket
    assert client_address("::1", ["::ffff:192.0.2.5"], trusted) == "192.0.2.5"
    # Garbage (here an empty entry) ends the walk: the last hop that was an address.
    assert client_address("10.0.0.1", ["192.0.2.5, , 10.0.0.9"], trusted) == "10.0.0.9"
    assert client_address("10.0.0.1", ["192.0.2.5, unknown"], trusted) == "10.0.0.1"
    assert client_address("::ffff:192.0.2.1", [], []) == "192.0.2.1"
    assert client_address(None, ["192.0.2.5"], trusted) is None


async def raw_request(
    port: int, path: str, parts: list[bytes], content_length: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A grpc-web POST written by hand, so the test decides when each part of the body goes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/grpc-web+proto\r\n"
        f"Content-Length: {content_length}\r\n\r\n".encode()
    )
    for part in parts:
        writer.write(part)
    await writer.drain()
    return reader, writer


async def raw_response(reader: asyncio.StreamReader) -> bytes:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200"), head
    length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
    return await asyncio.wait_for(reader.readexactly(length), 5)


async def test_request_bodies_being_read_are_capped_all_together(backend, http, caplog):
    b = await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0, max_body_bytes=1000, max_buffered_bytes=1500)
    try:
        body = envelope(b"x" * 900)
        # A slow client holds 800 bytes of its body in the bridge...
        slow_r, slow_w = await raw_request(b.port, CS + "ListQueues", [body[:800]], len(body))

        async def holding():
            return b.buffered_bytes == 800

        await until(holding)
        # ...so a second one that would take the total over 1500 is refused at once.
        other_r, other_w = await raw_request(b.port, CS + "ListQueues", [body[:800]], len(body))
        refused = await raw_response(other_r)
        assert b"grpc-status: 8\r\n" in refused and b"busy" in refused
        other_w.close()
        # The slow one finishes, and is answered.
        slow_w.write(body[800:])
        assert b"grpc-status: 0\r\n" in await raw_response(slow_r)
        slow_w.close()
        assert [c["request"] for c in backend.calls] == [b"x" * 900]

        # A client that leaves halfway through its body is no error either.
        caplog.set_level(logging.DEBUG)
        gone_r, gone_w = await raw_request(b.port, CS + "ListQueues", [body[:500]], len(body))

        async def reading():
            return b.buffered_bytes == 500

        await until(reading)
        gone_w.transport.abort()

        async def released():
            return b.buffered_bytes == 0

        await until(released)
        await asyncio.sleep(0.1)
        assert [r for r in caplog.records if r.levelno > logging.DEBUG or r.exc_info] == []
        assert len(backend.calls) == 1
    finally:
        await b.stop()


async def test_open_streams_are_capped_all_together(backend, http):
    b = await start_bridge(f"127.0.0.1:{backend.port}", "127.0.0.1", 0, max_streams=2)
    try:
        web = GrpcWebClient(http, base_url(b))
        first, second = [await web.open(CS + "StreamConversation") for _ in range(2)]
        for s in (first, second):
            assert await s.next() is not None
        third = await web.call(CS + "StreamConversation")
        assert third.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "too many open streams" in third.message
        assert (backend.open_streams, len(backend.calls)) == (2, 2)
        # Unary calls are not streams.
        assert (await web.call(CS + "ListQueues")).code == grpc.StatusCode.OK

        first.close()

        async def one_left():
            return backend.open_streams == 1 and len(b.streams) == 1

        await until(one_left)
        again = await web.open(CS + "StreamConversation")
        assert await again.next() is not None
        again.close()
        second.close()
    finally:
        await b.stop()
