"""Cluster nodes in one test process: each a full server (its own Core, writer, NATS connection) on one
private PostgreSQL schema. Quick checks of what crosses nodes; tests/test_cluster.py runs separate node
processes and kills them."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid

import pytest
from harness import Harness, Stream, base_config, is_event
from pgutil import pg_url  # noqa: F401  (fixture)

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

NATS = os.environ.get("QC_NATS_URL", "nats://127.0.0.1:4222")


@pytest.fixture
def nats_url() -> str:
    host, _, port = NATS.removeprefix("nats://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError as e:
        if os.environ.get("CI"):
            pytest.fail(f"NATS at {NATS} is not reachable ({e}); CI must provide it", pytrace=False)
        pytest.skip(f"NATS at {NATS} is not reachable ({e})")
    return NATS


@pytest.fixture
async def nodes(tmp_path, pg_url, nats_url):  # noqa: F811
    """Start nodes lazily: `await nodes(3)` gives three Harnesses, one cluster."""
    started: list[Harness] = []

    async def start(n: int, **config) -> list[Harness]:
        cfg = base_config(**config)
        cfg.setdefault("cluster", {}).update({"reconcile_interval": 0.3, "sweep_interval": 0.2, "lease_seconds": 2.0})
        for i in range(n):
            h = Harness(tmp_path / f"n{i}", cfg, pg_url, nats_url=nats_url, node_id=f"node{i}")
            await h.start()
            started.append(h)
        return started[-n:]

    yield start
    for h in started:
        await h.stop()


async def test_a_conversation_across_three_nodes_arrives_once_and_in_order(nodes):
    a, b, c = await nodes(3)
    agent = await b.agent("agent1")
    cust = await a.customer("sales")
    cust.open()  # on node a
    offer = await agent.wait_offer(cust.id)  # offered by whichever node dispatched, streamed on b
    await agent.accept(offer.offer_id)
    agent.open_conversation(cust.id)  # on b
    c_customer = c.customer_stub
    for i in range(20):
        if i % 2:
            await agent.send(cust.id, f"a{i}")
        else:
            req = cust_pb.CustomerServiceSendMessageRequest(
                conversation_id=cust.id, text=f"c{i}", request_id=uuid.uuid4().hex
            )
            await c_customer.SendMessage(req, metadata=cust.md)  # through node c
    await agent.streams[cust.id].wait_for(is_event("message", lambda e: e.message.text == "a19"))
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "a19"))
    for stream in (agent.streams[cust.id], cust.stream):
        seqs = [e.seq for e in stream.events()]
        assert seqs == sorted(set(seqs)), "every event once, in seq order"
        texts = [e.message.text for e in stream.events("message")]
        assert texts == [f"{'a' if i % 2 else 'c'}{i}" for i in range(20)]


async def test_a_lost_notification_is_caught_up_by_the_reconciler(nodes):
    a, b = await nodes(2)
    agent = await b.agent("agent1")
    cust = await a.customer("sales")
    await agent.take(cust.id)  # the agent's conversation stream is on b
    await agent.streams[cust.id].wait_for(lambda r: r.HasField("heartbeat"))  # live: the backlog is behind it
    # Node a's NATS messages vanish from now on, as if NATS dropped them.
    a.core.link.send = lambda item: None
    cust.open()
    await cust.send("lost on the way")
    got = await agent.streams[cust.id].wait_for(is_event("message", lambda e: e.message.text == "lost on the way"))
    assert got.event.seq > 0
    assert b.core.reconciler.caught_up >= 1, (b.core.link.received, a.core.link.sent, b.core.reconciler.rounds)


async def test_typing_and_queue_positions_reach_streams_on_another_node(nodes):
    a, b = await nodes(2)
    first = await a.customer("sales")
    second = await a.customer("sales")
    second_on_b = b.customer_stub
    stream = Stream(
        second_on_b.StreamConversation(
            cust_pb.CustomerServiceStreamConversationRequest(conversation_id=second.id), metadata=second.md
        )
    )
    try:
        await stream.wait_for(lambda r: r.HasField("queue_position") and r.queue_position.position == 2)
        agent = await a.agent("agent1")  # on node a: the offer, the accept and the queue change happen there
        await agent.take(first.id)
        await stream.wait_for(lambda r: r.HasField("queue_position") and r.queue_position.position == 1)
        await agent.take(second.id)
        await agent.stub.SetTyping(agent_pb.SetTypingRequest(conversation_id=second.id, typing=True), metadata=agent.md)
        await stream.wait_for(lambda r: r.HasField("typing") and r.typing.typing)
    finally:
        await stream.cancel()


async def test_settings_changed_on_one_node_apply_on_all(nodes):
    a, b = await nodes(2)
    token = await a.admin_token()
    md = (("authorization", f"Bearer {token}"),)
    current = (await a.admin_stub.GetSettings(admin_pb.GetSettingsRequest(), metadata=md)).settings
    current.offer_timeout.FromSeconds(77)
    await a.admin_stub.UpdateSettings(admin_pb.UpdateSettingsRequest(settings=current), metadata=md)
    await wait_until_async(_value(lambda: b.core.settings.offer_timeout), lambda v: v == 77.0, timeout=1.0)


async def test_logout_on_one_node_ends_the_offer_stream_on_another(nodes):
    a, b = await nodes(2)
    agent = await b.agent("agent1")
    await a.agent_stub.Logout(agent_pb.LogoutRequest(), metadata=agent.md)
    await agent.offers.wait_done()


async def test_an_offer_times_out_when_the_node_that_made_it_lost_its_timer(nodes):
    a, b = await nodes(2, settings={"offer_timeout": 0.5})
    agent1 = await a.agent("agent1")
    agent2 = await b.agent("agent2", ready=False)
    cust = await a.customer("sales")
    offer = await agent1.wait_offer(cust.id)
    # Node a's in-memory timers die with it; only the database sweep is left.
    a.core.effects.cancel_timers()
    b.core.effects.cancel_timers()
    await agent2.set_ready(True)
    update = await agent1.wait_offer_update(offer.offer_id, timeout=5)
    assert update.state == agent_pb.OFFER_STATE_TIMED_OUT
    await agent2.wait_offer(cust.id, timeout=5)


async def test_a_dead_nodes_stream_leases_expire_and_other_nodes_leases_stay(nodes):
    a, b = await nodes(2)
    on_a = await a.agent("agent1")
    on_b = await b.agent("agent2")
    assert on_a and on_b
    # Node a stops renewing (as if dead): its lease expires and is swept by b; b's own stays.
    for task in a.core._loops:
        task.cancel()

    async def counts() -> dict[str, int]:
        from sqlmodel import select

        from queuechat.store.models import AgentSession

        def read(s):
            return {x.agent_id: x.stream_count for x in s.exec(select(AgentSession)).all()}

        return await b.core.db.read(read)

    await wait_until_async(lambda: counts(), lambda c: c.get("agent1") == 0, timeout=8)
    assert (await counts())["agent2"] == 1


async def wait_until_async(get, pred, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = await get()
        if pred(value):
            return
        if loop.time() > end:
            raise AssertionError(f"not reached in {timeout}s: {value}")
        await asyncio.sleep(0.1)


def _value(fn):
    async def get():
        return fn()

    return get


async def test_a_node_reports_its_cluster_link_in_metrics_and_its_id_in_health(nodes):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from queuechat.observability.metrics import Metrics

    (a,) = await nodes(1)
    text = Metrics(a.core).exposition()[0].decode()
    assert 'queuechat_cluster_node{node="node0"} 1.0' in text
    assert "queuechat_cluster_nats_connected 1.0" in text
    call = health_pb2_grpc.HealthStub(a.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert (await call).status == health_pb2.HealthCheckResponse.SERVING
    assert ("queuechat-node", "node0") in tuple(await call.trailing_metadata())


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--workers", "2"], "--workers 2 needs a cluster: the embedded SQLite database is for one process"),
        (["--nats-url", "nats://127.0.0.1:4222"], "--nats-url runs a cluster node, which needs PostgreSQL"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_serve_refuses_a_cluster_without_postgresql(tmp_path, capsys, extra, says):
    from pathlib import Path

    from queuechat.__main__ import main

    demo = Path(__file__).resolve().parents[1] / "config" / "demo.toml"
    assert main(["serve", "--config", str(demo), "--data-dir", str(tmp_path), *extra]) == 2
    assert says in capsys.readouterr().err
    assert not (tmp_path / "queuechat.db").exists()  # refused before touching anything


def test_workers_get_their_own_node_ids_and_metrics_ports():
    from queuechat.workers import child_args, metrics_for

    argv = ["serve", "--config", "c.toml", "--workers", "3", "--node-id=x", "--metrics-listen", "0.0.0.0:9464,web"]
    assert child_args(argv) == ["serve", "--config", "c.toml"]
    assert metrics_for("0.0.0.0:9464,web", 2) == "0.0.0.0:9466"
    assert metrics_for("", 1) == ""


async def test_a_stopping_node_ends_its_streams_with_unavailable_at_once(nodes):
    """SIGTERM's drain: streams end at once (not after the grace) with UNAVAILABLE, so clients reconnect
    elsewhere; the agent then resumes on another node with its offers."""
    import grpc

    a, b = await nodes(2)
    agent = await b.agent("agent1")
    cust = await a.customer("sales")
    offer = await agent.wait_offer(cust.id)
    server, b.server = b.server, None
    stopping = asyncio.get_running_loop().create_task(server.stop(grace=30))
    await asyncio.wait_for(agent.offers.wait_done(), 5)  # long before the 30 s grace
    assert agent.offers.error is not None and agent.offers.error.code() == grpc.StatusCode.UNAVAILABLE
    await stopping
    from harness import AgentClient

    moved = AgentClient(a, a.agent_stub, agent.token, "agent1")  # the same session, on a (the next node)
    a._clients.append(moved)
    moved.open_offers(after_seq=0)
    again = await moved.wait_offer(cust.id)
    assert again.offer_id == offer.offer_id  # still pending, kept through the move


async def test_a_read_receipt_notification_lost_on_the_way_is_made_good(nodes):
    a, b = await nodes(2)
    agent = await b.agent("agent1")
    cust = await a.customer("sales")
    await agent.take(cust.id)
    stream = agent.streams[cust.id]
    await stream.wait_for(lambda r: r.HasField("heartbeat"))
    hello = await cust.send("hello")
    a.core.link.send = lambda item: None  # node a's NATS messages vanish from here
    await cust.stub.MarkRead(
        cust_pb.CustomerServiceMarkReadRequest(conversation_id=cust.id, up_to_seq=hello.seq), metadata=cust.md
    )
    got = await stream.wait_for(lambda r: r.HasField("read_cursor") and r.read_cursor.read_seq == hello.seq)
    assert got.read_cursor.participant.kind == rpb.PARTICIPANT_KIND_CUSTOMER
