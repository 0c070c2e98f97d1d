"""Observability: Prometheus metrics scraped over HTTP after a real chat flow, OpenTelemetry spans
(in-memory exporter) for RPCs and named writes, and JSON event logs that carry ids and never a
message body, a password or a token."""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import io
import json
import logging
import os
import socket
import subprocess
import sys

import aiohttp
import grpc
import harness
import pytest
from harness import Harness, expect_error
from prometheus_client.parser import text_string_to_metric_families

from chat.v1 import agent_service_pb2 as agent_pb
from queuechat import gctune
from queuechat.api import server as server_module
from queuechat.api.server import ChatServer
from queuechat.domain.log import conv_topic
from queuechat.observability import logs
from queuechat.observability.tracing import Tracing, wanted

SECRET_TEXT = "my card number is 4111-1111-1111-1111"


async def _observed(tmp_path, config, monkeypatch, **kw) -> Harness:
    """The harness's server with metrics on a free loopback port (and tracing, if given)."""
    monkeypatch.setattr(harness, "ChatServer", functools.partial(ChatServer, metrics_listen="127.0.0.1:0", **kw))
    return await Harness(tmp_path / "data", config).start()


@pytest.fixture
async def observed(tmp_path, config, monkeypatch):
    h = await _observed(tmp_path, config, monkeypatch)
    try:
        yield h
    finally:
        await h.stop()


@pytest.fixture
def json_log():
    """Every log record of the test, as JSON lines."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def scrape_text(port: int, path: str = "/metrics") -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}{path}") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


def parse(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def scrape(h: Harness) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    assert h.server is not None and h.server.metrics_servers
    return parse(await scrape_text(h.server.metrics_servers[0].port))


def value(samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def rpc(service: str, method: str, grpc_type: str = "unary", **more: str) -> dict[str, str]:
    return {"grpc_service": f"chat.v1.{service}", "grpc_method": method, "grpc_type": grpc_type, **more}


async def test_metrics_after_a_chat_flow(observed):
    h = observed
    agent = await h.agent("agent1", "sales")  # sales only: a support chat waits
    cust = await h.customer("sales")
    cust.open()
    await agent.take(cust.id)
    await cust.send("hello")
    await cust.send("anyone there?")
    await agent.send(cust.id, "hi, how can I help?")
    await expect_error(cust.send("   "), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGE")
    waiting = await h.customer("support")

    m = await scrape(h)
    # Events, counted after commit.
    assert value(m, "queuechat_offers_total", outcome="accepted", kind="chat") == 1
    assert value(m, "queuechat_offers_made_total", kind="chat") == 1
    assert value(m, "queuechat_offer_answer_seconds_count", outcome="accepted") == 1
    assert value(m, "queuechat_chat_wait_seconds_count", queue="sales") == 1
    assert value(m, "queuechat_messages_total", sender="customer", visibility="all") == 2  # not the refused one
    assert value(m, "queuechat_messages_total", sender="agent", visibility="all") == 1
    assert value(m, "queuechat_chats_started_total", queue="support") == 1
    # State, read at scrape time.
    assert value(m, "queuechat_queue_waiting", queue="support") == 1
    assert value(m, "queuechat_queue_waiting", queue="sales") == 0
    assert value(m, "queuechat_queue_longest_wait_seconds", queue="support") > 0
    assert value(m, "queuechat_queue_longest_wait_seconds", queue="sales") == 0
    assert value(m, "queuechat_conversations_open", queue="sales", status="active") == 1
    assert value(m, "queuechat_conversations_open", queue="support", status="queued") == 1
    assert value(m, "queuechat_agents", queue="sales", state="ready") == 1  # one chat of max_chats 3
    assert value(m, "queuechat_agents", queue="support", state="ready") == 0  # the alert's case
    assert value(m, "queuechat_agent_sessions", state="ready") == 1
    # Per RPC.
    send = rpc("CustomerService", "SendMessage")
    assert value(m, "grpc_server_started_total", **send) == 3
    assert value(m, "grpc_server_handled_total", **send, grpc_code="OK") == 2
    assert value(m, "grpc_server_handled_total", **send, grpc_code="InvalidArgument") == 1
    assert value(m, "grpc_server_handling_seconds_count", **send) == 3
    assert value(m, "grpc_server_handled_total", **rpc("AgentService", "AcceptOffer"), grpc_code="OK") == 1
    # Known methods are there from the start, at 0.
    assert value(m, "grpc_server_started_total", **rpc("AdminService", "ListAgents")) == 0
    assert value(m, "queuechat_rpc_refusals_total", grpc_service="chat.v1.CustomerService",
                 grpc_method="SendMessage", grpc_code="InvalidArgument", reason="EMPTY_MESSAGE") == 1
    offers = {"grpc_service": "chat.v1.AgentService", "grpc_method": "StreamOffers"}
    assert value(m, "queuechat_streams_open", **offers) == 1
    assert value(m, "queuechat_streams_open", grpc_service="chat.v1.CustomerService", grpc_method="StreamConversation") == 1
    # The store's figures and the writer hook.
    assert value(m, "queuechat_write_seconds_count", write="routing.accept_offer") >= 1
    assert value(m, "queuechat_write_seconds_sum", write="routing.accept_offer") > 0
    assert value(m, "queuechat_write_latency_seconds_count", write="conversations.send_message") == 4
    # Each call's wait for the writer, once (a refused write reruns alone but waited once).
    assert value(m, "queuechat_write_queue_seconds_count", write="conversations.send_message") == 4
    assert value(m, "queuechat_write_queue_seconds_sum", write="conversations.send_message") >= 0
    assert value(m, "queuechat_write_batch_size", stat="max") >= 1
    # SQLite's WAL checkpoints, on their own thread (each second at least).
    assert value(m, "queuechat_sqlite_checkpoint_seconds_count") is not None
    assert value(m, "queuechat_sqlite_checkpoint_failures_total") == 0
    assert value(m, "queuechat_sqlite_wal_pages", stat="wal") is not None
    assert value(m, "queuechat_sqlite_wal_bytes") > 0  # the WAL file, as commits wrote it
    assert value(m, "queuechat_sqlite_checkpoint_tail_seconds_total") >= 0
    assert value(m, "process_resident_memory_bytes") > 0

    # The stream ends: it is no longer open, and it was handled (Canceled: the client went away).
    await waiting.end()
    await cust.stop()
    for _ in range(100):
        m = await scrape(h)
        if value(m, "queuechat_streams_open", grpc_service="chat.v1.CustomerService", grpc_method="StreamConversation") == 0:
            break
        await asyncio.sleep(0.05)
    stream = rpc("CustomerService", "StreamConversation", "server_stream")
    assert value(m, "queuechat_streams_open", grpc_service="chat.v1.CustomerService", grpc_method="StreamConversation") == 0
    assert value(m, "grpc_server_handled_total", **stream, grpc_code="Canceled") == 1
    assert value(m, "queuechat_offers_total", outcome="accepted", kind="chat") == 1


async def test_garbage_collector_pauses_are_a_histogram_by_generation(observed):
    # No automatic pass from the first reading to the last (one may come between any two awaits): the
    # one below is the only new one.
    gc.disable()
    try:
        m = await scrape(observed)
        before = value(m, "queuechat_gc_pause_seconds_count", generation="2")
        assert before is not None  # every generation is there from the start
        seconds = value(m, "queuechat_gc_pause_seconds_sum", generation="2")
        # A full pass over a heap of a million containers takes well over the 1 ms the histogram counts from.
        heap = [[i] for i in range(1_000_000)]
        gc.collect()
        del heap
        m = await scrape(observed)
    finally:
        gc.enable()
    assert value(m, "queuechat_gc_pause_seconds_count", generation="2") == before + 1
    assert value(m, "queuechat_gc_pause_seconds_sum", generation="2") > seconds + 0.001
    assert value(m, "queuechat_gc_pause_seconds_bucket", generation="2", le="+Inf") == before + 1


def _server_generators() -> list[str]:
    """The live async generators of queuechat's server code in this process, by function name."""
    return sorted(
        g.ag_code.co_qualname
        for g in gc.get_objects()
        if inspect.isasyncgen(g) and g.ag_frame is not None and "/queuechat/" in g.ag_code.co_filename
    )


async def test_an_open_stream_is_two_generators_with_its_metrics_watched_from_inside(observed):
    """Each async generator layer costs an open stream about a KiB: the metrics interceptor watches
    streams from inside rpc()'s wrapper, and the servicer method hands over the domain stream."""
    h = observed
    agent = await h.agent("agent1", "sales")
    cust = await h.customer("sales")
    before = _server_generators()
    cust.open()
    await cust.stream.wait_for(lambda item: item.HasField("heartbeat") or item.HasField("event"))
    await agent.take(cust.id)  # and opens the conversation's stream
    await agent.streams[cust.id].wait_for(lambda item: item.HasField("event"))
    opened = _server_generators()
    for g in before:
        opened.remove(g)
    assert opened == sorted(["_stream.<locals>.make.<locals>.stream", "Streams.conversation"] * 2)
    await cust.send("still watched")
    m = await scrape(h)
    stream = rpc("CustomerService", "StreamConversation", "server_stream")
    assert value(m, "grpc_server_started_total", **stream) == 1
    assert value(m, "queuechat_streams_open", grpc_service="chat.v1.CustomerService", grpc_method="StreamConversation") == 1


async def test_a_stream_without_rpc_wrapper_is_watched_by_the_interceptors_own():
    """A stream handler rpc() did not wrap (no `observed`) gets the interceptor's generator, same hooks."""
    from queuechat.observability.interceptor import ServerObserver

    seen = []

    class Metrics:
        def started(self):
            seen.append("started")

        def opened(self):
            seen.append("opened")

        def closed(self):
            seen.append("closed")

        def handled(self, code, seconds):
            seen.append(("handled", code))

    class Context:
        def code(self):
            return None

    async def numbers(request, context):
        yield 1
        yield 2

    observer = ServerObserver()
    handler = grpc.unary_stream_rpc_method_handler(numbers)
    m = Metrics()
    wrapped = observer._stream(handler.unary_stream, m, "x.Svc", "Numbers")
    assert wrapped is not numbers
    assert [item async for item in wrapped(None, Context())] == [1, 2]
    assert seen == ["started", "opened", "closed", ("handled", "OK")]


def test_tune_freezes_the_heap_and_enlarges_the_young_generation():
    """In a process of its own: the test process keeps Python's settings."""
    probe = (
        "import gc, json; from queuechat import gctune; before = gc.get_threshold(); "
        "tuned = gctune.tune(); print(json.dumps([tuned, before, gc.get_threshold(), gc.get_freeze_count() > 1000]))"
    )
    env = {**os.environ, "QUEUECHAT_GC": ""}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    tuned, before, after, frozen = json.loads(out)
    assert tuned and frozen
    assert before == [700, 10, 10] and after == [gctune.YOUNG, gctune.MIDDLE, gctune.OLD]
    env["QUEUECHAT_GC"] = "default"  # Python's own settings, for comparison
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == [False, [700, 10, 10], [700, 10, 10], False]


@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("", (gctune.YOUNG, gctune.MIDDLE, gctune.OLD)),
        ("8000", (8000, gctune.MIDDLE, gctune.OLD)),
        ("8000,5,7", (8000, 5, 7)),
        ("lots", (gctune.YOUNG, gctune.MIDDLE, gctune.OLD)),
        ("0", (gctune.YOUNG, gctune.MIDDLE, gctune.OLD)),  # 0 would switch the collector off
        ("1,2,3,4", (gctune.YOUNG, gctune.MIDDLE, gctune.OLD)),
    ],
)
def test_gc_thresholds_from_the_environment(setting, expected):
    assert gctune.thresholds(setting) == expected


async def test_offer_outcomes_and_the_answer_time(tmp_path, config, monkeypatch):
    config["settings"]["offer_timeout"] = 0.3
    h = await _observed(tmp_path, config, monkeypatch)
    try:
        agent1 = await h.agent("agent1", "sales")
        cust = await h.customer("sales")
        offer = await agent1.wait_offer(cust.id)
        await agent1.reject(offer.offer_id)
        agent2 = await h.agent("agent2", "sales")
        second = await agent2.wait_offer(cust.id)
        await agent2.wait_offer_update(second.offer_id)  # timed out
        m = await scrape(h)
        assert value(m, "queuechat_offers_total", outcome="rejected", kind="chat") == 1
        assert value(m, "queuechat_offers_total", outcome="timed_out", kind="chat") >= 1
        assert value(m, "queuechat_offer_answer_seconds_count", outcome="timed_out") >= 1
        assert value(m, "queuechat_offer_answer_seconds_sum", outcome="timed_out") >= 0.3
    finally:
        await h.stop()


@pytest.mark.configure(rate_limits={"enabled": True, "messages_per_conversation": 2})
async def test_rate_limit_refusals_are_counted_by_limit(observed, json_log):
    agent, cust = await observed.chat()
    await cust.send("one")
    await cust.send("two")
    await expect_error(cust.send("three"), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_MESSAGES")
    m = await scrape(observed)
    assert value(m, "queuechat_rate_limit_refusals_total", limit="messages_per_conversation") == 1
    assert value(m, "grpc_server_handled_total", **rpc("CustomerService", "SendMessage"), grpc_code="ResourceExhausted") == 1
    assert value(m, "queuechat_messages_total", sender="customer", visibility="all") == 2
    refused = [json.loads(line) for line in json_log.getvalue().splitlines() if '"rpc.refused"' in line]
    assert [(r["reason"], r["limit"], r["grpc_code"]) for r in refused] == [
        ("TOO_MANY_MESSAGES", "messages_per_conversation", "RESOURCE_EXHAUSTED")
    ]


async def test_a_lagging_stream_cut_off_is_counted(observed):
    agent, cust = await observed.chat()
    stream = cust.stream
    await stream.wait_for(lambda i: i.HasField("heartbeat"))
    for _ in range(observed.core.bus.queue_size + 1):
        observed.core.bus.publish(conv_topic(cust.id), object())
    for _ in range(200):
        if stream.done:
            break
        await asyncio.sleep(0.02)
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.UNAVAILABLE
    m = await scrape(observed)
    lagging = {"grpc_service": "chat.v1.CustomerService", "grpc_method": "StreamConversation"}
    assert value(m, "queuechat_stream_lagging_total", **lagging) == 1
    assert value(m, "queuechat_rpc_refusals_total", **lagging, grpc_code="Unavailable", reason="STREAM_LAGGING") == 1


async def test_metrics_on_the_web_port_too(observed):
    bridge = await server_module._start_bridge(observed.address, "127.0.0.1:0", None, observed.server.metrics)
    try:
        m = parse(await scrape_text(bridge.port))
        assert value(m, "queuechat_queue_waiting", queue="sales") == 0
    finally:
        await bridge.stop()


async def test_a_metrics_port_in_use_does_not_stop_the_server(tmp_path, config, monkeypatch, caplog):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setattr(harness, "ChatServer", functools.partial(ChatServer, metrics_listen=f"127.0.0.1:{port}"))
        h = await Harness(tmp_path / "data", config).start()
        try:
            assert h.server.metrics is not None and h.server.metrics_servers == []
            assert f"cannot listen on 127.0.0.1:{port}" in caplog.text
            await h.chat()  # the chat works, and is counted all the same
            assert h.server.metrics.exposition()[0].count(b'queuechat_offers_total{kind="chat",outcome="accepted"} 1.0') == 1
        finally:
            await h.stop()


async def test_metrics_off_by_default_count_nothing(server):
    """The harness's plain server: no metrics, and the writes' count effects go nowhere."""
    assert server.server.metrics is None and server.server.metrics_servers == []
    agent, cust = await server.chat()
    await cust.send("hello")


# --- traces -------------------------------------------------------------------------------------------


@pytest.fixture
def spans():
    pytest.importorskip("opentelemetry.sdk")
    pytest.importorskip("opentelemetry.instrumentation.grpc")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Tracing(provider), exporter
    provider.shutdown()


async def test_a_span_per_rpc_and_per_named_write(tmp_path, config, monkeypatch, spans):
    from opentelemetry.trace import SpanKind

    tracing, exporter = spans
    h = await _observed(tmp_path, config, monkeypatch, tracing=tracing)
    try:
        agent = await h.agent("agent1", "sales")
        cust = await h.customer("sales")
        await agent.take(cust.id)
        await expect_error(agent.accept("no-such-offer"), grpc.StatusCode.NOT_FOUND, "OFFER_NOT_FOUND")
    finally:
        await h.stop()
    finished = exporter.get_finished_spans()
    by_name: dict[str, list] = {}
    for span in finished:
        by_name.setdefault(span.name, []).append(span)
    accept_rpcs = by_name["/chat.v1.AgentService/AcceptOffer"]
    assert {s.kind for s in accept_rpcs} == {SpanKind.SERVER} and len(accept_rpcs) == 2
    writes = by_name["routing.accept_offer"]
    assert len(writes) == 2 and {s.kind for s in writes} == {SpanKind.INTERNAL}
    # Each write's span is a child of its RPC's span.
    assert {(w.context.trace_id, w.parent.span_id) for w in writes} == {
        (r.context.trace_id, r.context.span_id) for r in accept_rpcs
    }
    refused = [w for w in writes if w.attributes.get("queuechat.refusal")]
    assert [w.attributes["queuechat.refusal"] for w in refused] == ["OFFER_NOT_FOUND"]
    assert "conversations.start_chat" in by_name and "/chat.v1.CustomerService/StartChat" in by_name
    assert "agents.login" in by_name


def test_tracing_is_off_unless_the_environment_asks(monkeypatch):
    assert not wanted({})
    assert not wanted({"OTEL_TRACES_EXPORTER": "none"})
    assert not wanted({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"})
    assert wanted({"OTEL_TRACES_EXPORTER": "console"})
    assert wanted({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"})
    for name in ("OTEL_SDK_DISABLED", "OTEL_TRACES_EXPORTER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES",
                 "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert Tracing.from_env() is None
    pytest.importorskip("opentelemetry.sdk")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    default = Tracing.from_env()
    assert default is not None and default.provider.resource.attributes["service.name"] == "queuechat"
    default.shutdown()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "qc-test")
    named = Tracing.from_env()
    assert named is not None and named.provider.resource.attributes["service.name"] == "qc-test"
    named.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert Tracing.from_env() is None
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    assert Tracing.from_env() is None  # logged; tracing stays off


# --- logs --------------------------------------------------------------------------------------------


async def test_event_logs_are_json_with_ids_and_no_secrets(server, json_log):
    agent = await server.agent("agent1", "sales")
    cust = await server.customer("sales")
    cust.open()
    await agent.take(cust.id)
    await cust.send(SECRET_TEXT)
    await agent.send(cust.id, SECRET_TEXT + " (quoted back)")
    await expect_error(cust.send("   "), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGE")
    await agent.close(cust.id, confirm=True)
    await expect_error(
        server.agent_stub.Login(agent_pb.LoginRequest(username="agent2", password="wrong-password-xyz", profile_id="sales")),
        grpc.StatusCode.UNAUTHENTICATED,
        "BAD_CREDENTIALS",
    )
    text = json_log.getvalue()
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    events = {}
    for line in lines:
        assert {"time", "level", "logger", "message"} <= line.keys()
        if "event" in line:
            events.setdefault(line["event"], []).append(line)

    (login,) = [e for e in events["agent.login"] if e["agent_id"] == "agent1"]
    assert login["session_id"] and login["profile_id"] == "sales"
    (started,) = events["chat.started"]
    assert started["conversation_id"] == cust.id and started["queue_id"] == "sales"
    (made,) = events["offer.made"]
    (accepted,) = events["offer.accepted"]
    assert made["offer_id"] == accepted["offer_id"] and accepted["conversation_id"] == cust.id
    assert accepted["agent_id"] == "agent1" and "reason" not in accepted
    (closed,) = events["chat.closed"]
    assert closed["conversation_id"] == cust.id and closed["closed_by"] == "agent:agent1"
    refusals = {e["reason"]: e for e in events["rpc.refused"]}
    assert refusals["EMPTY_MESSAGE"]["grpc_method"] == "SendMessage"
    assert refusals["EMPTY_MESSAGE"]["grpc_code"] == "INVALID_ARGUMENT"
    assert refusals["BAD_CREDENTIALS"]["client"] == "127.0.0.1"
    # Never a message body, a password or a token.
    for secret in (SECRET_TEXT, "4111", "wrong-password-xyz", "pw1", agent.token, cust.token):
        assert secret not in text, secret


async def test_a_refused_write_logs_nothing(server, json_log):
    """Event logs are effects: carried out after commit, so a rolled-back write logs nothing."""
    await expect_error(
        server.agent_stub.Login(agent_pb.LoginRequest(username="agent1", password="pw1", profile_id="support-nope")),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    events = [json.loads(line).get("event") for line in json_log.getvalue().splitlines() if line.strip()]
    assert "agent.login" not in events and "rpc.refused" in events


def test_text_format_puts_fields_after_the_message():
    record = logging.LogRecord("queuechat.events", logging.INFO, __file__, 1, "chat.started", None, None)
    for key, value in logs.extra("chat.started", {"conversation_id": "c1", "queue_id": "sales", "note": "a b", "x": None}).items():
        setattr(record, key, value)
    line = logs.TextFormatter().format(record)
    assert line.endswith('INFO queuechat.events: chat.started conversation_id=c1 queue_id=sales note="a b"')
    as_json = json.loads(logs.JsonFormatter().format(record))
    assert as_json["event"] == "chat.started" and as_json["queue_id"] == "sales" and "x" not in as_json
    # A field named like a LogRecord attribute is kept, renamed.
    assert logs.extra("e", {"name": "n", "message": "m"}) == {"event": "e", "name_": "n", "message_": "m"}


def test_logs_are_written_by_a_thread_of_their_own_and_all_of_them_by_exit():
    """The event loop only queues a record (a write on its thread would hand the GIL away); the writing
    thread formats it, traceback and fields included, and whatever is queued at exit is still written."""
    script = (
        "import logging\n"
        "from queuechat.observability import logs\n"
        "logging.basicConfig(level=logging.INFO, handlers=[logs.handler('json')])\n"
        "kept = []\n"
        "class Keep(logging.Handler):\n"
        "    def emit(self, record):\n"
        "        kept.append((record.msg, record.args))\n"
        "logging.getLogger().addHandler(Keep())  # after the queue's handler\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('queuechat.x').exception('failed %s of %d', 'step', 3)\n"
        "for i in range(500):\n"
        "    logs.event('chat.started', {'conversation_id': f'c{i}'})\n"
        "assert isinstance(logging.getLogger().handlers[0], logging.handlers.QueueHandler)\n"
        "assert kept[0] == ('failed %s of %d', ('step', 3)), kept[0]  # other handlers get the record as it was\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert lines[0]["message"] == "failed step of 3" and "ZeroDivisionError" in lines[0]["exception"]
    assert [line["conversation_id"] for line in lines[1:]] == [f"c{i}" for i in range(500)]
