"""A cluster (issue #10) when things fail: real `queuechat serve` nodes as separate processes on loopback, on
one private PostgreSQL schema and NATS (tests/cluster.py), clients that follow their streams across nodes
from their cursors.

Skipped where PostgreSQL or NATS is not reachable; on CI ($CI set) that is a failure instead.

- Three nodes: the customer streams from A, the agent from B, messages go through C: each side gets every
  event once, in seq order, live (the reconciler is slowed down, so only the NATS fan-out can be in time).
- kill -9 of the node holding both streams while messages flow both ways: the clients resume from their
  cursors on the survivors, every message whose send returned OK arrives once on both sides, and the agent
  keeps its session (offers still come after the dead node's lease ran out) and its chat.
- kill -9 of the node that made a pending offer: the offer times out on schedule anyway (the sweep of a
  surviving node) and the chat goes to the other agent; an invite made by a node that dies times out too.
- A routing race on three nodes: 120 chats, six agents accepting, rejecting and ignoring offers on
  different nodes while their offer streams drop and come back, and one node killed halfway: the
  invariants (one pending offer per chat, nobody above max_chats) are checked in the database all along,
  and every chat is accepted once.
- NATS unreachable for ~5 s (a proxy between the nodes and NATS is cut): the sends still succeed, the
  streams catch up when it is back, nothing lost or repeated, and live fan-out works again.
- SIGTERM: the node drains and exits 0; its clients move to other nodes with nothing lost, and a pending
  offer of its agent survives the move.
- The sample agent client (clients/queuechat_agent/client.py) on a multi-address target, and on a
  `--workers 2` port, reconnects by itself after a node (a worker) is killed and resumes from its cursor.
Beyond the issue's list, what else a node's failure may not lose:
- an agent whose only offer stream died with its node: the dead node's lease runs out, the grace period
  nobody alive armed is swept, and the pending offer goes to another agent;
- a node frozen (SIGSTOP) past its lease: its agents' offers move on, and when it thaws it puts its leases
  back and its agents are offered chats again;
- an upload begun on a node killed midway resumes on another, and a third serves the file; one abandoned
  with its node expires anyway, bytes and all;
- broadcasts NATS loses without anyone noticing (the proxy drops publishes): stream events are caught up,
  and a settings change, a session's end and a queue position must be made good too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import time
from datetime import UTC, datetime

import grpc
import pgutil
import pytest
from cluster import (
    Cluster,
    Node,
    assert_once_in_order,
    cluster_env,
    free_port,
    login,
    nats_address,
    nats_url,
    start_chat,
    until,
)
from google.protobuf.duration_pb2 import Duration
from harness import base_config
from natsproxy import NatsProxy

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

pytestmark = pytest.mark.timeout(150)


@pytest.fixture
async def make_cluster(tmp_path):
    """make_cluster("a", "b", ..., config=..., env=..., nats=...): nodes started together on a fresh schema."""
    made: list[Cluster] = []

    async def make(*names: str, config=None, env=None, nats: str | None = None) -> Cluster:
        default_nats = nats_url()  # skip (or fail on CI) before anything starts
        pgutil.pg_user()
        c = Cluster(tmp_path, config or base_config(), env if env is not None else cluster_env(), nats or default_nats)
        made.append(c)
        await c.start(*names)
        return c

    try:
        yield make
    finally:
        for c in made:
            print(c.logs())  # shown when the test failed
            await c.close()


def by_name(c: Cluster) -> dict[str, Node]:
    return {n.name: n for n in c.nodes}


class Talk:
    """Both sides of one chat sending as fast as their calls return, through a preferred node (moving to
    another on UNAVAILABLE with the same request id). ok[...] are the texts whose send returned OK."""

    def __init__(self, agent, cust, cid: str, prefer: Node | None):
        self.agent, self.cust, self.cid, self.prefer = agent, cust, cid, prefer
        self.ok: dict[str, list[str]] = {"agent": [], "customer": []}
        self.failed: list[tuple[str, str, BaseException]] = []
        self._stop = asyncio.Event()
        self._tasks = [
            asyncio.get_running_loop().create_task(self._loop("agent")),
            asyncio.get_running_loop().create_task(self._loop("customer")),
        ]

    async def _loop(self, side: str) -> None:
        i = 0
        while not self._stop.is_set():
            text = f"{side} {i}"
            try:
                if side == "agent":
                    await self.agent.send(self.cid, text, prefer=self.prefer)
                else:
                    await self.cust.send(text, prefer=self.prefer)
                self.ok[side].append(text)
            except (grpc.aio.AioRpcError, TimeoutError) as e:
                self.failed.append((side, text, e))
            i += 1
            await asyncio.sleep(0.01)

    async def wait_sent(self, n: int, timeout: float = 15.0) -> None:
        """At least n more OK sends on each side from now."""
        base = {k: len(v) for k, v in self.ok.items()}
        await until(
            lambda: _true(all(len(self.ok[k]) >= base[k] + n for k in self.ok)), f"{n} more sends each", timeout
        )

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def all_texts(self) -> list[str]:
        return self.ok["agent"] + self.ok["customer"]


async def _true(v):
    return v


def assert_each_once_in_send_order(texts: list[str], talk: Talk, who: str) -> None:
    for side, sent in talk.ok.items():
        got = [t for t in texts if t.startswith(side + " ")]
        repeated = sorted({t for t in got if got.count(t) > 1})
        assert not repeated, f"{who} got {repeated} more than once"
        missing = [t for t in sent if t not in got]
        assert not missing, f"{who} never got {missing} (sent OK)"
        # Each side sends one at a time: its messages' seqs follow the order the sends returned.
        assert [t for t in got if t in set(sent)] == sent, f"{who} got {side}'s messages out of order"


def as_utc(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


async def live_leases(c: Cluster, node_id: str) -> int:
    now = datetime.now(UTC)
    rows = await c.sql("SELECT expires_at FROM stream_lease WHERE node_id = %s", node_id)
    return sum(1 for (exp,) in rows if as_utc(exp) > now)


# --- 1. three nodes ---------------------------------------------------------------------------------------


async def test_customer_on_a_agent_on_b_sends_through_c_each_event_once_in_order(make_cluster):
    # The reconciler every 30 s: within the waits below only the NATS fan-out can deliver.
    c = await make_cluster("a", "b", "c", env=cluster_env(reconcile=30.0))
    a, b, cc = c.nodes
    agent, cust, cid, stream, conv = await chat_across(c, customer_on=a, agent_on=b, calls_via=cc)
    await stream.wait_event(lambda e: e.WhichOneof("kind") == "participant_joined", "the agent joining", 5)

    texts: list[str] = []
    for i in range(8):  # one at a time, taking turns
        await cust.send(f"customer {i}", prefer=cc)
        await agent.send(cid, f"agent {i}", prefer=cc)
        texts += [f"customer {i}", f"agent {i}"]
    await agent.send(cid, "a private note", prefer=cc, private=True)
    # Both sides at once.
    burst = [f"customer burst {i}" for i in range(10)] + [f"agent burst {i}" for i in range(10)]
    await asyncio.gather(
        *(cust.send(t, prefer=cc) for t in burst[:10]), *(agent.send(cid, t, prefer=cc) for t in burst[10:])
    )
    texts += burst

    await conv.wait_until(lambda: set(texts + ["a private note"]) <= set(conv.texts()), "every message (agent)", 5)
    await stream.wait_until(lambda: set(texts) <= set(stream.texts()), "every public message (customer)", 5)

    # Nobody moved: the streams stayed where they were opened, and the events crossed nodes.
    assert [x.node for x in conv.connects] == ["b"] and [x.node for x in stream.connects] == ["a"]
    assert [x.node for x in agent.offers.connects] == ["b"]
    assert_once_in_order(conv, gap_free=True)
    assert_once_in_order(stream)
    assert_once_in_order(agent.offers, gap_free=True)
    rows = await c.sql("SELECT seq, visibility FROM conversation_event WHERE conversation_id = %s ORDER BY seq", cid)
    assert conv.seqs() == [s for s, _ in rows]
    assert stream.seqs() == [s for s, v in rows if v == "all"]
    assert "a private note" not in stream.texts()
    for who, got in (("agent", conv.texts()), ("customer", stream.texts())):
        sequential = [t for t in got if " burst " not in t and t != "a private note"]
        assert sequential == texts[:16], f"{who}: the turns out of order"
    # The offer and its outcome, once each, on the agent's feed.
    kinds = [e.WhichOneof("kind") for e in agent.offers.events]
    assert kinds == ["offer", "offer_update"]
    assert agent.offers.events[1].offer_update.state == agent_pb.OFFER_STATE_ACCEPTED


async def chat_across(c: Cluster, *, customer_on: Node, agent_on: Node, calls_via: Node):
    """agent1 takes a chat, its calls through calls_via; the customer's stream lives on customer_on, the agent's
    offer and conversation streams on agent_on. (agent, customer, conversation id, customer's stream, agent's)"""
    agent = await login(c.nodes, "agent1", via=calls_via)
    agent.follow_offers(prefer=agent_on)
    await agent.offers.wait_live()
    cust = await start_chat(c.nodes, via=calls_via)
    cid = cust.conversation_id
    stream = cust.follow(prefer=customer_on)
    offer = await agent.wait_offer(cid, timeout=5)
    await agent.accept(offer.offer_id, prefer=calls_via)
    conv = agent.follow(cid, prefer=agent_on)
    await conv.wait_live()
    await stream.wait_live()
    return agent, cust, cid, stream, conv


# --- 2. kill -9 of the node holding the streams ----------------------------------------------------------


async def test_kill_9_of_the_node_holding_both_streams_loses_nothing(make_cluster):
    config = base_config(settings={"stream_grace": 5.0})
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=2.0, sweep=0.3, reconcile=1.0))
    a, b, cc = c.nodes
    agent, cust, cid, stream, conv = await chat_across(c, customer_on=a, agent_on=a, calls_via=b)

    # Both sides send through A too: sends in flight when it dies are retried elsewhere with their request id.
    talk = Talk(agent, cust, cid, prefer=a)
    await talk.wait_sent(10)
    await conv.wait_until(lambda: len(conv.texts()) >= 10, "messages flowing")
    await a.kill()
    killed_at = time.monotonic()
    await talk.wait_sent(15)
    await talk.stop()

    want = talk.all_texts()
    await conv.wait_until(lambda: set(want) <= set(conv.texts()), "every OK message on the agent's stream", 10)
    await stream.wait_until(lambda: set(want) <= set(stream.texts()), "every OK message on the customer's", 10)
    for f in (conv, stream, agent.offers):
        assert f.error is None, f"{f.name}: {f.error!r}"
        assert f.connects[0].node == "a" and f.connects[-1].node in ("b", "c"), f"{f.name} {f.connects}"
    assert_once_in_order(conv, gap_free=True)
    assert_once_in_order(stream)
    assert_once_in_order(agent.offers, gap_free=True)
    assert_each_once_in_send_order(conv.texts(), talk, "the agent")
    assert_each_once_in_send_order(stream.texts(), talk, "the customer")
    print(f"sent {len(want)} OK, {len(talk.failed)} failed; resumed after {conv.connects[-1].at - killed_at:.2f} s")

    # The agent keeps the session and the chat...
    convs = await agent.conversations(prefer=b)
    assert cid in [x.conversation_id for x in convs]
    await agent.send(cid, "still here", prefer=cc)
    # ...and stays present once the dead node's leases have run out: the new stream's lease counts.
    await until(lambda: _not(live_leases(c, "a")), "node a's leases to expire", 10)
    cust2 = await start_chat(c.nodes, via=cc)
    await agent.wait_offer(cust2.conversation_id, timeout=5)

    # A restarts under the same node id: it clears its own (dead) leases, never the live ones of the others.
    others = await c.sql("SELECT id, node_id FROM stream_lease WHERE node_id <> 'a' ORDER BY id")
    assert others, "the agent's stream holds no lease on a survivor"
    await a.start()
    assert await c.sql("SELECT id, node_id FROM stream_lease WHERE node_id <> 'a' ORDER BY id") == others
    cust3 = await start_chat(c.nodes, via=a)
    await agent.wait_offer(cust3.conversation_id, timeout=5)
    assert not c.errors(), "the nodes logged errors:\n" + "\n".join(c.errors()[:20])


async def _not(coro):
    return not await coro


# --- 3. kill -9 of the node that made a pending offer ------------------------------------------------------


async def test_kill_9_of_the_offering_node_the_offer_still_times_out_on_schedule(make_cluster):
    timeout = 3.0
    config = base_config(settings={"offer_timeout": timeout, "reject_cooldown": 60.0, "stream_grace": 5.0})
    sweep = 0.3
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=3.0, sweep=sweep))
    a, b, cc = c.nodes
    ag1 = await login(c.nodes, "agent1", via=b)
    ag1.follow_offers(prefer=b)
    ag2 = await login(c.nodes, "agent2", via=cc)
    ag2.follow_offers(prefer=cc)
    await ag1.offers.wait_live()
    await ag2.offers.wait_live()

    cust = await start_chat(c.nodes, via=a)  # A routes the new chat: A makes the offer and arms its time-out
    cid = cust.conversation_id
    waits = {asyncio.ensure_future(ag.wait_offer(cid, timeout=5)): ag for ag in (ag1, ag2)}
    done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    first_task = done.pop()
    first, other = waits[first_task], ag2 if waits[first_task] is ag1 else ag1
    offer = first_task.result()
    await a.kill()
    expire = offer.expire_time.ToDatetime(tzinfo=UTC).timestamp()
    assert expire - time.time() > 1.0, "A died too late for this to test anything"

    upd = await first.wait_update(offer.offer_id, timeout=timeout + 8)
    timed_out_at = time.time()
    assert upd.state == agent_pb.OFFER_STATE_TIMED_OUT
    late = timed_out_at - expire
    print(f"timed out {late:+.2f} s from its expire_time")
    assert late > -0.3, f"timed out {-late:.2f} s early"
    assert late < sweep + 3.0, f"timed out {late:.2f} s late: nobody swept A's timer"
    again = await other.wait_offer(cid, timeout=3)
    assert again.offer_id != offer.offer_id
    # Offered to the other agent only: the cool-down keeps it from the one who let it time out.
    assert [o.conversation_id for o in first.offers_made()] == [cid]
    await other.accept(again.offer_id, prefer=cc)


async def test_kill_9_of_the_node_holding_an_agents_only_stream_frees_its_offer_for_another_agent(make_cluster):
    """The agent's offer stream dies with its node and the agent does not come back: the dead node's lease
    runs out, the grace period (armed by nobody alive) is swept, the pending offer is withdrawn and the
    chat goes to another agent, long before the offer would have timed out."""
    lease, grace, sweep = 2.0, 1.0, 0.3
    config = base_config(settings={"offer_timeout": 60.0, "stream_grace": grace})
    c = await make_cluster("a", "b", config=config, env=cluster_env(lease=lease, sweep=sweep))
    a, b = c.nodes
    ag1 = await login(c.nodes, "agent1", via=b)
    ag1.follow_offers(prefer=a)
    await ag1.offers.wait_live()
    cust = await start_chat(c.nodes, via=b)
    cid = cust.conversation_id
    offer = await ag1.wait_offer(cid, timeout=5)
    ag2 = await login(c.nodes, "agent2", via=b)
    ag2.follow_offers(prefer=b)
    await ag2.offers.wait_live()
    await ag1.offers.stop()  # agent1's client is gone with its node
    await a.kill()
    killed_at = time.monotonic()

    again = await ag2.wait_offer(cid, timeout=lease + grace + 8)
    took = time.monotonic() - killed_at
    print(f"re-offered {took:.2f} s after the kill (lease {lease} s, grace {grace} s)")
    assert took < lease + grace + 5, "the dead node's presence lasted too long"
    rows = await c.sql("SELECT status, withdraw_reason FROM offer WHERE id = %s", offer.offer_id)
    assert rows == [("withdrawn", "agent_unavailable")], rows
    await ag2.accept(again.offer_id, prefer=b)


async def test_upload_begun_on_a_killed_node_resumes_on_another_and_any_node_serves_it(make_cluster):
    """Attachment bytes live in PostgreSQL: the chunks a dead node acknowledged are there, the upload
    resumes on another node, and a third serves the file."""
    from files import MIB, Uploader, sha

    ttl = 4.0  # an upload without progress for this long is removed, by whichever node sweeps
    config = base_config(limits={"upload_ttl": ttl, "upload_sweep_interval": 0.5})
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=2.0, sweep=0.3, reconcile=1.0))
    a, b, cc = c.nodes
    agent = await login(c.nodes, "agent1", via=b)
    agent.follow_offers(prefer=b)
    await agent.offers.wait_live()
    cust = await start_chat(c.nodes, via=b)
    cid = cust.conversation_id
    offer = await agent.wait_offer(cid, timeout=5)
    await agent.accept(offer.offer_id, prefer=b)
    stream = cust.follow(prefer=cc)
    await stream.wait_live()
    # One the customer begins on A and abandons when A dies.
    abandoned = Uploader(a.customer, cust.md, cid, customer=True)
    dropped = await abandoned.create("half.txt", 2 * MIB, "text/plain")
    await abandoned.chunk(dropped.upload_id, 0, b"x" * MIB)

    data = b"".join(b"line %07d of a log the agent sends\n" % i for i in range(80_000))  # ~2.9 MiB of text
    on_a = Uploader(a.agent, agent.md, cid, customer=False)
    up = await on_a.create("server.log", len(data), "text/plain")
    acked = await on_a.chunk(up.upload_id, 0, data[:MIB])
    acked = await on_a.chunk(up.upload_id, acked, data[acked : acked + MIB])
    assert acked == 2 * MIB
    await a.kill()

    on_b = Uploader(b.agent, agent.md, cid, customer=False)
    state = await on_b.get(up.upload_id)
    assert state.received_bytes == acked, "bytes a dead node acknowledged were lost"
    await on_b.send_chunks(up.upload_id, data, start=state.received_bytes)
    att = (await on_b.complete(up.upload_id, sha(data))).attachment
    req = agent_pb.SendMessageRequest(
        conversation_id=cid, request_id="with-the-log", text="the log", attachment_ids=[att.attachment_id]
    )
    await b.agent.SendMessage(req, metadata=agent.md)
    ev = await stream.wait_event(lambda e: e.WhichOneof("kind") == "message", "the message with the file", 10)
    assert [x.attachment_id for x in ev.message.attachments] == [att.attachment_id]

    meta, got = await Uploader(cc.customer, cust.md, cid, customer=True).download(att.attachment_id)
    assert meta.sha256 == sha(data) and got == data
    meta, got = await Uploader(cc.agent, agent.md, cid, customer=False).download(att.attachment_id, offset=MIB + 7)
    assert got == data[MIB + 7 :]

    # The abandoned upload expires though the node it began on is dead, its bytes with it.
    async def gone() -> bool:
        try:
            await Uploader(b.customer, cust.md, cid, customer=True).get(dropped.upload_id)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return True
            raise
        return False

    await until(gone, "the abandoned upload to expire", ttl + 10, every=0.2)
    left = await c.sql("SELECT count(*) FROM blob_chunk WHERE key LIKE %s", f"%{dropped.upload_id}%")
    assert left == [(0,)], "the expired upload's bytes are still in blob_chunk"
    assert await c.sql("SELECT count(*) FROM blob_chunk WHERE key LIKE %s", f"%{up.upload_id}%") == [(0,)]


async def test_a_node_frozen_past_its_lease_loses_its_agents_offers_and_gets_them_back_when_it_thaws(make_cluster):
    """SIGSTOP of the node holding an agent's offer stream: its lease runs out, the grace period passes and
    the agent's pending offer goes to another agent. SIGCONT: the stream was never broken, so the node puts
    its lease back and the agent is offered chats again; the withdrawal reaches its feed once."""
    lease, grace = 2.0, 1.0
    config = base_config(settings={"offer_timeout": 60.0, "stream_grace": grace, "reject_cooldown": 60.0})
    c = await make_cluster("a", "b", config=config, env=cluster_env(lease=lease, sweep=0.3, reconcile=1.0))
    a, b = c.nodes
    ag1 = await login(c.nodes, "agent1", via=b)
    ag1.follow_offers(prefer=a)
    await ag1.offers.wait_live()
    cust = await start_chat(c.nodes, via=b)
    offer = await ag1.wait_offer(cust.conversation_id, timeout=5)
    ag2 = await login(c.nodes, "agent2", via=b)
    ag2.follow_offers(prefer=b)
    await ag2.offers.wait_live()

    a.proc.send_signal(signal.SIGSTOP)
    try:
        again = await ag2.wait_offer(cust.conversation_id, timeout=lease + grace + 8)
    finally:
        a.proc.send_signal(signal.SIGCONT)
    await ag2.accept(again.offer_id, prefer=b)
    upd = await ag1.wait_update(offer.offer_id, timeout=10)
    assert upd.state == agent_pb.OFFER_STATE_WITHDRAWN
    assert upd.withdraw_reason == agent_pb.WITHDRAW_REASON_AGENT_UNAVAILABLE
    # Back: agent1 (the idle one) is offered the next chat on the stream it never lost.
    await ag2.set_ready(False, prefer=b)
    cust2 = await start_chat(c.nodes, via=b)
    await ag1.wait_offer(cust2.conversation_id, timeout=lease + 5)
    assert [x.node for x in ag1.offers.connects] == ["a"]
    assert_once_in_order(ag1.offers, gap_free=True)


async def test_kill_9_of_the_inviting_node_the_invite_still_times_out_on_schedule(make_cluster):
    """An invite is an offer too: its time-out, armed by the node that made it, is swept by a survivor,
    and what it means for the conversation (the invite TIMED_OUT on its stream) happens there."""
    timeout, sweep = 3.0, 0.3
    config = base_config(settings={"offer_timeout": timeout, "stream_grace": 5.0})
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=3.0, sweep=sweep))
    a, b, cc = c.nodes
    ag1 = await login(c.nodes, "agent1", via=b)
    ag1.follow_offers(prefer=b)
    await ag1.offers.wait_live()
    cust = await start_chat(c.nodes, via=b)
    cid = cust.conversation_id
    offer = await ag1.wait_offer(cid, timeout=5)
    await ag1.accept(offer.offer_id, prefer=b)
    conv = ag1.follow(cid, prefer=b)
    await conv.wait_live()
    ag2 = await login(c.nodes, "agent2", via=cc)
    ag2.follow_offers(prefer=cc)
    await ag2.offers.wait_live()

    req = agent_pb.InviteAgentRequest(conversation_id=cid, request_id="ask-agent2", agent_id="agent2")
    invite = (await a.agent.InviteAgent(req, metadata=ag1.md)).invite  # A makes the invite's offer
    inv_offer = await ag2.wait_offer(cid, timeout=5)
    assert inv_offer.kind == agent_pb.OFFER_KIND_INVITE
    await a.kill()
    expire = inv_offer.expire_time.ToDatetime(tzinfo=UTC).timestamp()
    assert expire - time.time() > 1.0, "A died too late for this to test anything"

    upd = await ag2.wait_update(inv_offer.offer_id, timeout=timeout + 8)
    late = time.time() - expire
    print(f"invite offer timed out {late:+.2f} s from its expire_time")
    assert upd.state == agent_pb.OFFER_STATE_TIMED_OUT
    assert -0.3 < late < sweep + 3.0, f"timed out {late:+.2f} s from its expire_time"
    ev = await conv.wait_event(
        lambda e: (
            e.WhichOneof("kind") == "invite_updated" and e.invite_updated.invite.state == rpb.INVITE_STATE_TIMED_OUT
        ),
        "the invite's time-out on the conversation",
        5,
    )
    assert ev.invite_updated.invite.invite_id == invite.invite_id
    assert_once_in_order(conv, gap_free=True)
    assert_once_in_order(ag2.offers, gap_free=True)


# --- 4. the routing race -------------------------------------------------------------------------------------

VIOLATIONS = """
SELECT 'over capacity', l.agent_id || ' holds ' || l.n || ' > ' || a.max_chats FROM (
    SELECT agent_id, count(*) AS n FROM (
        SELECT p.agent_id FROM participant p JOIN conversation c ON c.id = p.conversation_id
         WHERE p.left_at IS NULL AND c.status <> 'closed'
        UNION ALL
        SELECT o.agent_id FROM offer o WHERE o.status = 'pending'
    ) x GROUP BY agent_id
) l JOIN agent a ON a.id = l.agent_id WHERE l.n > a.max_chats
UNION ALL
SELECT 'offered twice', conversation_id || ' has ' || count(*) || ' pending chat offers'
  FROM offer WHERE status = 'pending' AND kind = 'chat' GROUP BY conversation_id HAVING count(*) > 1
UNION ALL
SELECT 'offered while taken', o.conversation_id || ' is ' || c.status
  FROM offer o JOIN conversation c ON c.id = o.conversation_id
 WHERE o.status = 'pending' AND o.kind = 'chat' AND c.status <> 'queued'
"""

# Agents at their max_chats (chats plus pending offers): the race is only a race when some are.
FULL = """
SELECT count(*) FROM (
    SELECT agent_id, count(*) AS n FROM (
        SELECT p.agent_id FROM participant p JOIN conversation c ON c.id = p.conversation_id
         WHERE p.left_at IS NULL AND c.status <> 'closed'
        UNION ALL
        SELECT o.agent_id FROM offer o WHERE o.status = 'pending'
    ) x GROUP BY agent_id
) l JOIN agent a ON a.id = l.agent_id WHERE l.n = a.max_chats
"""

N_CHATS = 120


async def test_routing_race_across_three_nodes_keeps_the_invariants(make_cluster):
    rng = random.Random(10)
    config = base_config(settings={"offer_timeout": 1.0, "reject_cooldown": 0.5, "stream_grace": 1.0})
    for a in config["agents"]:
        a["max_chats"] = 2
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=3.0, sweep=0.2, reconcile=1.0))
    nodes = c.nodes
    bad_codes: list[str] = []
    refusals: dict[str, int] = {}
    answered = {"accept": 0, "reject": 0, "ignore": 0}
    closers: set[asyncio.Task] = set()

    def refused(e: grpc.aio.AioRpcError, what: str) -> None:
        if e.code() in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE):
            bad_codes.append(f"{what}: {e.code().name} {e.details()}")
        refusals[e.code().name] = refusals.get(e.code().name, 0) + 1

    async def hold_then_close(ag, cid: str) -> None:
        await asyncio.sleep(rng.uniform(0.05, 0.4))  # the chat itself
        try:
            await ag.close_chat(cid, prefer=rng.choice(c.alive()))
        except grpc.aio.AioRpcError as e:
            refused(e, f"close {cid}")

    async def work(ag, q: asyncio.Queue) -> None:
        while True:
            ev = await q.get()
            if ev.WhichOneof("kind") != "offer":
                continue
            r = rng.random()
            node = rng.choice(c.alive())
            try:
                if r < 0.6:
                    conv = await ag.accept(ev.offer.offer_id, prefer=node)
                    answered["accept"] += 1
                    t = asyncio.get_running_loop().create_task(hold_then_close(ag, conv.conversation_id))
                    closers.add(t)
                    t.add_done_callback(closers.discard)
                elif r < 0.85:
                    await ag.reject(ev.offer.offer_id, prefer=node)
                    answered["reject"] += 1
                else:
                    answered["ignore"] += 1  # it times out
            except grpc.aio.AioRpcError as e:
                refused(e, f"answer {ev.offer.offer_id}")

    agents, workers = [], []
    for i in range(6):
        ag = await login(nodes, f"agent{i + 1}", via=nodes[i % 3])
        q: asyncio.Queue = asyncio.Queue()
        ag.follow_offers(prefer=nodes[i % 3], on_event=q.put_nowait)
        agents.append(ag)
        workers.append(asyncio.get_running_loop().create_task(work(ag, q)))
    for ag in agents:
        await ag.offers.wait_live()

    violations: list[tuple[float, list]] = []
    polls = 0
    stop = asyncio.Event()

    full_polls = 0

    async def watch() -> None:
        nonlocal polls, full_polls
        while not stop.is_set():
            rows = await c.sql(VIOLATIONS)
            polls += 1
            if rows:
                violations.append((time.monotonic(), rows))
            if polls % 5 == 0 and (await c.sql(FULL))[0][0]:
                full_polls += 1
            await asyncio.sleep(0.02)

    drops = {"short": 0, "long": 0}

    async def chaos() -> None:
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            ag = rng.choice(agents)
            await ag.offers.drop()
            long = rng.random() < 0.25  # past the grace period: its pending offers are withdrawn
            drops["long" if long else "short"] += 1
            await asyncio.sleep(1.6 if long else rng.uniform(0.02, 0.3))
            ag.offers.resume(prefer=rng.choice(nodes))

    cids: list[str] = []

    async def customers() -> None:
        for _ in range(N_CHATS):
            cust = await start_chat(nodes, rng.choice(["sales", "support"]), via=rng.choice(nodes))
            cids.append(cust.conversation_id)
            # The chaos kept in step with the arrivals (a stream dropped per sixth of them at least): routing
            # got fast enough to serve them all before the chaos had dropped five streams.
            while sum(drops.values()) < len(cids) * 6 // N_CHATS and not chaos_task.done():
                await asyncio.sleep(0.05)
            if len(cids) == N_CHATS // 2:
                # Halfway, kill -9 a node: its streams move, its offers' timers and grace periods are swept.
                await c.nodes[2].kill()
            await asyncio.sleep(rng.uniform(0.0, 0.04))  # faster than they are served: a queue, agents at capacity

    watcher = asyncio.get_running_loop().create_task(watch())
    chaos_task = asyncio.get_running_loop().create_task(chaos())
    started = time.monotonic()
    try:
        await customers()

        async def all_accepted() -> bool:
            rows = await c.sql("SELECT count(DISTINCT conversation_id) FROM participant")
            return rows[0][0] >= N_CHATS

        await until(all_accepted, f"all {N_CHATS} chats accepted", 80, every=0.2)
    finally:
        stop.set()
        took = time.monotonic() - started
        chaos_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await chaos_task
        for ag in agents:
            ag.offers.resume()
        await watcher
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for t in list(closers):
            t.cancel()
        print(
            f"{N_CHATS} chats in {took:.1f} s, {polls} checks ({full_polls} of {polls // 5} sampled with an agent "
            f"at capacity), answers {answered}, drops {drops}, refusals {refusals}"
        )

    assert not violations, f"invariants broken ({len(violations)} times), first: {violations[0][1]}"
    assert polls >= 50, "the invariants were hardly checked"
    assert full_polls >= polls // 5 // 4, "agents were seldom at capacity: the race was hardly run"
    assert not bad_codes, f"calls failed with server errors: {bad_codes[:5]}"
    assert not c.errors(), "the nodes logged errors:\n" + "\n".join(c.errors()[:20])
    assert answered["reject"] > 0 and answered["ignore"] > 0  # (accepts are counted in the database below)
    assert drops["short"] + drops["long"] >= 5
    accepted = await c.sql(
        "SELECT conversation_id, count(*) FROM offer WHERE kind = 'chat' AND status = 'accepted' GROUP BY conversation_id"
    )
    assert sorted(cid for cid, _ in accepted) == sorted(cids)
    assert all(n == 1 for _, n in accepted), "a chat was accepted twice"
    joined = await c.sql("SELECT conversation_id, count(*) FROM participant GROUP BY conversation_id")
    assert all(n == 1 for _, n in joined), f"two agents in one chat: {[r for r in joined if r[1] > 1]}"
    assert not await c.sql("SELECT id FROM conversation WHERE status = 'queued'")
    for ag in agents:
        assert ag.offers.error is None, f"{ag.offers.name}: {ag.offers.error!r}"
        assert_once_in_order(ag.offers, gap_free=True)


# --- 5. NATS away for a while ----------------------------------------------------------------------------


async def test_nats_unreachable_for_seconds_then_back_streams_catch_up(make_cluster):
    nats_url()
    proxy = await NatsProxy(*nats_address()).start()
    try:
        # The periodic reconcile every 20 s: the catch-up below comes from the reconcile on NATS reconnect,
        # and the last messages from NATS itself, or not in time.
        c = await make_cluster("a", "b", "c", nats=proxy.url, env=cluster_env(reconcile=20.0))
        a, b, cc = c.nodes
        assert proxy.connections >= 3, "the nodes did not connect to NATS through the proxy"
        agent, cust, cid, stream, conv = await chat_across(c, customer_on=a, agent_on=b, calls_via=cc)
        sent: list[str] = []

        async def both(tag: str) -> None:
            await cust.send(f"customer {tag}", prefer=cc)
            await agent.send(cid, f"agent {tag}", prefer=cc)
            sent.extend([f"customer {tag}", f"agent {tag}"])

        await both("before")
        await conv.wait_until(lambda: set(sent) <= set(conv.texts()), "live fan-out before the cut", 5)
        await stream.wait_until(lambda: set(sent) <= set(stream.texts()), "live fan-out before the cut", 5)

        connections = proxy.connections
        await proxy.cut()
        cut_at = time.monotonic()
        i = 0
        while time.monotonic() - cut_at < 5.0:  # NATS stays away ~5 s; the chat goes on meanwhile
            await both(f"during {i}")  # PostgreSQL has them: the sends succeed
            i += 1
            await asyncio.sleep(0.4)
        during = [t for t in sent if " during " in t]
        early = (len(set(during) & set(conv.texts())), len(set(during) & set(stream.texts())))
        await proxy.restore()
        restored_at = time.monotonic()
        await conv.wait_until(lambda: set(sent) <= set(conv.texts()), "the agent's catch-up", 12)
        await stream.wait_until(lambda: set(sent) <= set(stream.texts()), "the customer's catch-up", 12)
        print(
            f"caught up {time.monotonic() - restored_at:.2f} s after NATS came back; {len(during)} messages sent "
            f"during the cut, (agent, customer) had {early} of them before it came back"
        )
        # The nodes are back on NATS (through the proxy again), not just caught up by reading the database.
        await until(lambda: _true(proxy.connections >= connections + 3), "the nodes to reconnect to NATS", 10)

        await both("after")
        await conv.wait_until(lambda: set(sent) <= set(conv.texts()), "live fan-out after the cut", 5)
        await stream.wait_until(lambda: set(sent) <= set(stream.texts()), "live fan-out after the cut", 5)
        assert_once_in_order(conv, gap_free=True)
        assert_once_in_order(stream)
        for got, who in ((conv.texts(), "agent"), (stream.texts(), "customer")):
            assert sorted(got) == sorted(set(got)), f"the {who} got a message twice"
            for side in ("customer ", "agent "):  # each side sent one at a time: in that order
                assert [t for t in got if t.startswith(side)] == [t for t in sent if t.startswith(side)], who
        rows = await c.sql("SELECT seq FROM conversation_event WHERE conversation_id = %s ORDER BY seq", cid)
        assert conv.seqs() == [s for (s,) in rows]
        print(f"stream connects: agent {conv.connects}, customer {stream.connects}")
    finally:
        await proxy.stop()


async def test_notifications_nats_loses_are_made_good_from_the_database(make_cluster):
    """NATS is at-most-once: what a node publishes can be lost without anyone noticing (the proxy drops the
    nodes' publishes for a while; no connection breaks, no reconnect). Stream events are caught up by the
    periodic reconcile; what else rides on NATS must be made good too: a settings change (every node takes
    it "within a second") and the end of a session (its streams on other nodes end)."""
    nats_url()
    proxy = await NatsProxy(*nats_address()).start()
    try:
        c = await make_cluster("a", "b", "c", nats=proxy.url, env=cluster_env(reconcile=1.0))
        a, b, cc = c.nodes
        adm = await a.admin.Login(admin_pb.AdminServiceLoginRequest(username="admin", password="adminpw"))
        admin_md = (("authorization", f"Bearer {adm.admin_token}"),)

        def settings(offer_timeout: int) -> admin_pb.UpdateSettingsRequest:
            return admin_pb.UpdateSettingsRequest(
                settings=admin_pb.Settings(
                    offer_timeout=Duration(seconds=offer_timeout),
                    reject_cooldown=Duration(seconds=30),
                    stream_grace=Duration(seconds=1),
                )
            )

        async def offer_timeout_on(node: Node) -> float:
            resp = await node.admin.GetSettings(admin_pb.GetSettingsRequest(), metadata=admin_md)
            return resp.settings.offer_timeout.ToTimedelta().total_seconds()

        async def everywhere(seconds: float) -> bool:
            return all([await offer_timeout_on(n) == seconds for n in (b, cc)])

        # With every publish arriving: on every node within about a second.
        await a.admin.UpdateSettings(settings(20), metadata=admin_md)
        await until(lambda: everywhere(20.0), "a settings change to reach the other nodes", 2)

        agent = await login(c.nodes, "agent1", via=cc)
        agent.follow_offers(prefer=b)
        leaving = await login(c.nodes, "agent2", via=a, ready=False)
        leaving.follow_offers(prefer=b)
        await agent.offers.wait_live()
        await leaving.offers.wait_live()
        await leaving.conversations(prefer=b)  # b knows agent2's token now
        cust = await start_chat(c.nodes, via=cc)
        cid = cust.conversation_id
        stream = cust.follow(prefer=a)
        offer = await agent.wait_offer(cid, timeout=5)
        await agent.accept(offer.offer_id, prefer=cc)
        conv = agent.follow(cid, prefer=b)
        await conv.wait_live()
        await stream.wait_live()
        connections = proxy.connections

        proxy.blackhole(True)
        sent = []
        for i in range(3):
            for side, send in (("customer", cust.send), ("agent", lambda t, **kw: agent.send(cid, t, **kw))):
                await send(f"{side} lost {i}", prefer=cc)
                sent.append(f"{side} lost {i}")
        await a.admin.UpdateSettings(settings(7), metadata=admin_md)
        await a.agent.Logout(agent_pb.LogoutRequest(), metadata=leaving.md)
        # Stream events: the periodic reconcile (1 s) finds them in the database, NATS or not.
        await conv.wait_until(lambda: set(sent) <= set(conv.texts()), "the agent's stream to catch up", 5)
        await stream.wait_until(lambda: set(sent) <= set(stream.texts()), "the customer's to catch up", 5)
        proxy.blackhole(False)
        assert proxy.dropped > 0 and proxy.connections == connections, "the proxy lost nothing, or broke links"
        print(f"{proxy.dropped} publishes lost")

        problems = []
        try:
            await until(lambda: everywhere(7.0), "the lost settings change to reach b and c", 5)
        except AssertionError:
            problems.append(
                f"5 s after a lost settings broadcast b and c still use offer_timeout {await offer_timeout_on(b)} s "
                f"and {await offer_timeout_on(cc)} s; a changed it to 7 s"
            )
        try:
            await leaving.offers.wait_until(
                lambda: leaving.offers.error is not None or leaving.offers.ended, "the ended session's stream", 5
            )
            assert leaving.offers.error is not None
            assert leaving.offers.error.code() == grpc.StatusCode.UNAUTHENTICATED, leaving.offers.error
        except AssertionError as e:
            problems.append(f"agent2 logged out on a, its offer stream on b still open: {e}")

        async def token_refused_on_b() -> bool:
            try:
                await b.agent.ListConversations(agent_pb.ListConversationsRequest(), metadata=leaving.md)
            except grpc.aio.AioRpcError as e:
                return e.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        try:  # b trusts a checked token for up to 30 s: a reconcile round forgets it (1 s here)
            await until(token_refused_on_b, "b to refuse the ended session's token", 5)
        except AssertionError:
            problems.append("agent2 logged out on a, b still takes its token 5 s later")
        assert_once_in_order(conv, gap_free=True)
        assert_once_in_order(stream)
        assert not problems, "; ".join(problems)
    finally:
        await proxy.stop()


async def test_queue_positions_reach_a_customer_on_another_node_even_when_nats_loses_one(make_cluster):
    """Chats ahead of a waiting customer end on node A; the customer streams from B. Each change of the
    queue reaches it, and one whose notification NATS lost is made good within seconds, not at the next
    change of the queue."""
    nats_url()
    proxy = await NatsProxy(*nats_address()).start()
    try:
        c = await make_cluster("a", "b", nats=proxy.url, env=cluster_env(reconcile=1.0))
        a, b = c.nodes
        ahead = [await start_chat(c.nodes, "support", via=a) for _ in range(2)]
        cust = await start_chat(c.nodes, "support", via=b)
        stream = cust.follow(prefer=b)

        def at(position: int, waiting: int):
            return lambda: any(p.position == position and p.waiting_count == waiting for p in stream.positions)

        await stream.wait_until(at(3, 3), "position 3 of 3", 5)
        await a.customer.EndChat(cust_pb.EndChatRequest(conversation_id=ahead[0].conversation_id), metadata=ahead[0].md)
        await stream.wait_until(at(2, 2), "position 2 of 2 after a chat ahead ended on A", 5)
        proxy.blackhole(True)
        await a.customer.EndChat(cust_pb.EndChatRequest(conversation_id=ahead[1].conversation_id), metadata=ahead[1].md)
        try:
            await stream.wait_until(at(1, 1), "position 1 of 1 though NATS lost the news", 5)
        finally:
            proxy.blackhole(False)
            print(f"positions seen: {[(p.position, p.waiting_count) for p in stream.positions]}")
    finally:
        await proxy.stop()


# --- 6. SIGTERM ------------------------------------------------------------------------------------------------


async def test_sigterm_drains_and_its_clients_move_with_nothing_lost(make_cluster):
    # Leases of 10 s (the default): presence after the move must not wait for A's leases to run out.
    config = base_config(settings={"stream_grace": 5.0, "offer_timeout": 60.0})
    c = await make_cluster("a", "b", "c", config=config, env=cluster_env(lease=10.0, sweep=0.3, reconcile=1.0))
    a, b, cc = c.nodes
    agent, cust, cid, stream, conv = await chat_across(c, customer_on=a, agent_on=a, calls_via=b)
    # A second chat offered to the agent and left pending across the drain.
    cust2 = await start_chat(c.nodes, via=b)
    pending = await agent.wait_offer(cust2.conversation_id, timeout=5)

    talk = Talk(agent, cust, cid, prefer=a)
    await talk.wait_sent(10)
    t0 = time.monotonic()
    rc = await a.terminate(timeout=20)
    drained = time.monotonic() - t0
    await talk.wait_sent(10)
    await talk.stop()
    moved = {f.name: f"{f.connects[-1].at - t0:+.2f} s ({f.breaks})" for f in (conv, stream, agent.offers)}
    print(f"A drained in {drained:.2f} s (exit {rc}); streams moved after SIGTERM: {moved}")
    assert rc == 0, f"A exited with {rc} on SIGTERM:\n{a.log[-3000:]}"
    # A drain hands its long-lived streams back at once (UNAVAILABLE: clients reconnect elsewhere) rather than
    # holding them until the server's 5 s shutdown grace cuts them.
    for f in (conv, stream, agent.offers):
        assert f.connects[-1].at - t0 < 4.0, f"{f.name} moved only after {moved[f.name]}"

    want = talk.all_texts()
    await conv.wait_until(lambda: set(want) <= set(conv.texts()), "every OK message on the agent's stream", 10)
    await stream.wait_until(lambda: set(want) <= set(stream.texts()), "every OK message on the customer's", 10)
    for f in (conv, stream, agent.offers):
        assert f.error is None and not f.ended, f"{f.name}: ended {f.ended}, {f.error!r} (a drain must not end it)"
        assert f.connects[-1].node in ("b", "c"), f"{f.name} {f.connects}"
    assert_once_in_order(conv, gap_free=True)
    assert_once_in_order(stream)
    assert_once_in_order(agent.offers, gap_free=True)
    assert_each_once_in_send_order(conv.texts(), talk, "the agent")
    assert_each_once_in_send_order(stream.texts(), talk, "the customer")
    # The pending offer moved with the agent: not withdrawn, still answerable on another node.
    assert not agent.updates(pending.offer_id), agent.updates(pending.offer_id)
    taken = await agent.accept(pending.offer_id, prefer=cc)
    assert taken.conversation_id == cust2.conversation_id
    # Still present: a third chat is offered at once (A's lease must not be what keeps or blocks it).
    cust3 = await start_chat(c.nodes, via=b)
    await agent.wait_offer(cust3.conversation_id, timeout=5)
    assert not c.errors(), "the nodes logged errors:\n" + "\n".join(c.errors()[:20])


# --- 7. the sample agent client on a cluster address ------------------------------------------------------------


async def test_sample_agent_client_reconnects_to_a_cluster_address_after_a_kill(make_cluster):
    from queuechat_agent.client import AgentClient, Backoff

    c = await make_cluster("a", "b", env=cluster_env(lease=2.0, sweep=0.3, reconcile=1.0))
    nodes = by_name(c)
    target = f"ipv4:127.0.0.1:{nodes['a'].port},127.0.0.1:{nodes['b'].port}"
    client = AgentClient(target, retry_for=20.0, backoff=Backoff(initial=0.05, maximum=0.5))
    got: dict[str, list] = {"offers": [], "conv": []}
    cond = asyncio.Condition()

    async def collect(key: str, feed) -> None:
        async for ev in feed:
            async with cond:
                got[key].append(ev)
                cond.notify_all()

    async def wait(pred, what: str, timeout: float = 10.0):
        async def waiter():
            async with cond:
                while not (v := pred()):
                    await cond.wait()
                return v

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}; reconnects {client.reconnects}") from None

    tasks = []
    try:
        await client.login("agent1", "pw1", "both", ready=True)
        offers = client.offers()
        tasks.append(asyncio.get_running_loop().create_task(collect("offers", offers)))
        await asyncio.wait_for(offers.caught_up.wait(), 10)
        cust = await start_chat(c.nodes, via=nodes["b"])
        cid = cust.conversation_id
        offer = await wait(
            lambda: next(
                (e.offer for e in got["offers"] if e.HasField("offer") and e.offer.conversation_id == cid), None
            ),
            "the offer",
        )
        await client.accept(offer.offer_id)
        feed = client.follow(cid)
        tasks.append(asyncio.get_running_loop().create_task(collect("conv", feed)))
        await asyncio.wait_for(feed.caught_up.wait(), 10)

        def texts():
            return [e.message.text for e in got["conv"] if e.HasField("message")]

        await cust.send("before", prefer=nodes["b"])
        await client.send(cid, "agent before")
        await wait(lambda: {"before", "agent before"} <= set(texts()), "messages before the kill")

        # Kill the node that holds the client's streams (its offer stream's lease says which).
        holders = {r[0] for r in await c.sql("SELECT node_id FROM stream_lease")}
        assert len(holders) == 1, f"leases held by {holders}"
        victim = nodes[holders.pop()]
        survivor = nodes["b" if victim.name == "a" else "a"]
        await victim.kill()

        await cust.send("after 1", prefer=survivor)
        await client.send(cid, "agent after")  # retried on UNAVAILABLE until the channel finds the survivor
        await cust.send("after 2", prefer=survivor)
        want = ["before", "agent before", "after 1", "agent after", "after 2"]
        await wait(lambda: set(want) <= set(texts()), "every message after the kill", 15)
        assert texts() == want, texts()
        seqs = [e.seq for e in got["conv"]]
        assert seqs == sorted(set(seqs)), f"the client saw {seqs}"
        assert client.reconnects >= 1
        # The offer feed came back too: a new chat is offered through it.
        cust2 = await start_chat(c.nodes, via=survivor)
        await wait(
            lambda: any(
                e.HasField("offer") and e.offer.conversation_id == cust2.conversation_id for e in got["offers"]
            ),
            "an offer after the kill",
        )
        feed_seqs = [e.seq for e in got["offers"]]
        assert feed_seqs == list(range(1, len(feed_seqs) + 1)), feed_seqs
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()


async def test_sample_agent_client_on_a_workers_port_survives_a_worker_kill(make_cluster):
    """`serve --workers 2`: two nodes behind one port (SO_REUSEPORT). The worker holding the client's streams
    is killed; the kernel hands the reconnect to the other, and the client resumes from its cursor."""
    from queuechat_agent.client import AgentClient, Backoff

    c = await make_cluster(env=cluster_env(lease=2.0, sweep=0.3, reconcile=1.0))
    w = c.node("w", port=free_port(), workers=2)
    await w.start()
    await w.wait_logs(r"gRPC listening on port", 2, timeout=40)
    pids = {
        m.group(2): int(m.group(1))
        for m in (re.search(r"started worker \d+ \(pid (\d+), node (\S+)\)", x) for x in w.lines)
        if m
    }
    assert sorted(pids) == ["w-0", "w-1"], w.log[-3000:]
    client = AgentClient(w.address, retry_for=20.0, backoff=Backoff(initial=0.05, maximum=0.5))
    convs: list = []
    cond = asyncio.Condition()

    async def collect(feed) -> None:
        async for ev in feed:
            async with cond:
                convs.append(ev)
                cond.notify_all()

    def texts():
        return [e.message.text for e in convs if e.HasField("message")]

    async def wait_texts(want: list[str], timeout: float = 15.0) -> None:
        async def waiter():
            async with cond:
                while not set(want) <= set(texts()):
                    await cond.wait()

        try:
            await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise AssertionError(f"got {texts()}, want {want}; reconnects {client.reconnects}") from None

    tasks = []
    try:
        await client.login("agent1", "pw1", "both", ready=True)
        offers = client.offers()
        offer_events: list = []

        async def collect_offers() -> None:
            async for ev in offers:
                offer_events.append(ev)

        tasks.append(asyncio.get_running_loop().create_task(collect_offers()))
        await asyncio.wait_for(offers.caught_up.wait(), 10)
        cust = await start_chat([w], via=w)
        cid = cust.conversation_id
        offer = await until(
            lambda: _true(next((e.offer for e in offer_events if e.HasField("offer")), None)), "the offer", 10
        )
        await client.accept(offer.offer_id)
        feed = client.follow(cid)
        tasks.append(asyncio.get_running_loop().create_task(collect(feed)))
        await asyncio.wait_for(feed.caught_up.wait(), 10)
        await client.send(cid, "agent before")
        await cust.send("before")
        await wait_texts(["agent before", "before"])

        holders = {r[0] for r in await c.sql("SELECT node_id FROM stream_lease")}
        assert len(holders) == 1 and holders <= set(pids), f"leases held by {holders}, workers {pids}"
        os.kill(pids[holders.pop()], signal.SIGKILL)  # one worker dies; the parent will start it again

        await client.send(cid, "agent after")
        await cust.send("after")
        want = ["agent before", "before", "agent after", "after"]
        await wait_texts(want)
        assert texts() == want
        seqs = [e.seq for e in convs]
        assert seqs == sorted(set(seqs)), f"the client saw {seqs}"
        assert client.reconnects >= 1
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await client.aclose()
