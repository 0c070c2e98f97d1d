"""Supervisor monitoring through a real server: agents logged in with a supervisor profile list the live
conversations of its queues, monitor one (everything its agents see, private included, resumable, read-only),
whisper to its agents and barge in. Monitor starts and stops are in the organisation's export; nothing of it
reaches the customer but a barge-in, which it sees as an agent joining."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from features_helpers import (
    SUPERVISOR,
    agent_view,
    barge_in,
    export,
    is_message,
    kinds,
    live,
    monitor,
    monitoring,
    supervisor,
    whisper,
    with_supervisors,
)
from harness import WAIT, expect_error, is_event

from chat.v1 import resources_pb2 as rpb

PRIVATE = rpb.VISIBILITY_AGENTS_ONLY


@pytest.fixture
def config(config):
    return with_supervisors(config)


async def wait_until(pred, timeout: float = WAIT) -> None:
    async def poll():
        while not await pred():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(poll(), timeout)


async def test_only_supervisors_supervise(server):
    agent, cust = await server.chat()
    for call in (
        live(agent),
        whisper(agent, cust.id, "psst"),
        barge_in(agent, cust.id),
    ):
        await expect_error(call, grpc.StatusCode.PERMISSION_DENIED, "NOT_A_SUPERVISOR")
    stream = monitor(agent, cust.id)
    await stream.wait_done()
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.PERMISSION_DENIED
    # The same agent logged in without the supervisor profile is no supervisor either.
    plain = await server.agent(SUPERVISOR, "both", ready=False, offers=False)
    await expect_error(live(plain), grpc.StatusCode.PERMISSION_DENIED, "NOT_A_SUPERVISOR")
    assert kinds((await export(server, cust.id)).events).count("monitor_started") == 0


async def test_live_conversations_with_queue_agents_and_times(server):
    agent, answered = await server.chat(queue="sales")
    waiting = await server.customer("support")
    sup = await supervisor(server)
    rows = await live(sup)
    by_id = {r.conversation.conversation_id: r for r in rows}
    assert set(by_id) == {answered.id, waiting.id}
    a, w = by_id[answered.id], by_id[waiting.id]
    assert a.conversation.queue.queue_id == "sales" and [p.agent_id for p in a.conversation.agents] == ["agent1"]
    assert a.conversation.state == rpb.CONVERSATION_STATE_ACTIVE and a.handling_time.ToNanoseconds() > 0
    assert w.conversation.state == rpb.CONVERSATION_STATE_QUEUED and w.handling_time.ToNanoseconds() == 0
    assert w.waiting_time.ToNanoseconds() > 0 and list(w.monitors) == []
    assert [r.conversation.conversation_id for r in await live(sup, "support")] == [waiting.id]
    # A sales supervisor sees sales only; closed conversations are not live.
    sales_sup = await supervisor(server, "sales-supervisors")
    assert [r.conversation.conversation_id for r in await live(sales_sup)] == [answered.id]
    await expect_error(live(sales_sup, "support"), grpc.StatusCode.PERMISSION_DENIED, "QUEUE_NOT_SUPERVISED")
    await agent.close(answered.id, confirm=True)
    assert [r.conversation.conversation_id for r in await live(sup)] == [waiting.id]


async def test_monitoring_sees_everything_agents_see_and_the_customer_nothing(server):
    agent, cust = await server.chat()
    await cust.send("hello")
    await agent.send(cust.id, "note to self", private=True)
    sup = await supervisor(server)
    watch = await monitoring(sup, cust.id)
    replayed = watch.events()
    assert "note to self" in [e.message.text for e in replayed if e.HasField("message")]
    started = [e for e in replayed if e.HasField("monitor_started")]
    assert len(started) == 1 and started[0].visibility == PRIVATE
    assert started[0].monitor_started.supervisor.agent_id == SUPERVISOR
    # Live: public and private, and the listing names the monitor.
    await cust.send("still there?")
    await agent.send(cust.id, "checking", private=True)
    await watch.wait_for(is_message("checking"))
    assert [m.agent_id for m in (await live(sup))[0].monitors] == [SUPERVISOR]
    # Agents see that they are monitored; the conversation's participants do not change.
    await agent.streams[cust.id].wait_for(is_event("monitor_started"))
    assert [p.agent_id for p in (await agent_view(agent, cust.id)).agents] == ["agent1"]
    await watch.cancel()
    await agent.streams[cust.id].wait_for(is_event("monitor_stopped"))
    # The customer saw none of it, and its transcript has none of it.
    await agent.send(cust.id, "marker")
    await cust.stream.wait_for(is_message("marker"))
    seen = kinds(cust.stream.events())
    assert "monitor_started" not in seen and "monitor_stopped" not in seen
    assert all(e.visibility == rpb.VISIBILITY_ALL for e in cust.stream.events())
    transcript = await cust.transcript()
    assert {"monitor_started", "monitor_stopped"}.isdisjoint(kinds(transcript.events))
    # The organisation's export has both, as agents-only events.
    log = (await export(server, cust.id)).events
    assert kinds(log).count("monitor_started") == 1 and kinds(log).count("monitor_stopped") == 1
    assert all(e.visibility == PRIVATE for e in log if e.WhichOneof("kind").startswith("monitor_"))
    await wait_until(lambda: _no_monitors(sup))


async def _no_monitors(sup) -> bool:
    return all(not r.monitors for r in await live(sup))


async def test_a_monitor_resumes_from_its_cursor(server):
    agent, cust = await server.chat()
    sup = await supervisor(server)
    first = await monitoring(sup, cust.id)
    last = first.events()[-1].seq
    await first.cancel()
    await agent.send(cust.id, "while away", private=True)
    again = await monitoring(sup, cust.id, after_seq=last)
    seqs = [e.seq for e in again.events()]
    assert seqs == sorted(seqs) and min(seqs) > last
    assert "while away" in [e.message.text for e in again.events() if e.HasField("message")]


async def test_whisper_reaches_the_agents_only(server):
    agent, cust = await server.chat()
    sup = await supervisor(server)
    await expect_error(whisper(sup, cust.id, "psst"), grpc.StatusCode.FAILED_PRECONDITION, "NOT_MONITORING")
    watch = await monitoring(sup, cust.id)
    ev = await whisper(sup, cust.id, "offer the discount", request_id="w-1")
    assert ev.visibility == PRIVATE and ev.message.whisper and ev.message.sender.agent_id == SUPERVISOR
    assert (await whisper(sup, cust.id, "offer the discount", request_id="w-1")).seq == ev.seq  # stored once
    got = await agent.streams[cust.id].wait_for(is_message("offer the discount"))
    assert got.event.message.whisper and got.event.visibility == PRIVATE
    await watch.wait_for(is_message("offer the discount"))
    await expect_error(whisper(sup, cust.id, "   "), grpc.StatusCode.INVALID_ARGUMENT, "EMPTY_MESSAGE")
    await agent.send(cust.id, "marker")
    await cust.stream.wait_for(is_message("marker"))
    assert "offer the discount" not in [e.message.text for e in cust.stream.events("message")]
    assert "offer the discount" not in [e.message.text for e in (await cust.transcript()).events]
    assert [e.message.text for e in (await export(server, cust.id)).events if e.message.whisper] == [
        "offer the discount"
    ]


async def test_barge_in_joins_like_an_invited_agent(server):
    agent, cust = await server.chat()
    sup = await supervisor(server)
    await expect_error(barge_in(sup, cust.id), grpc.StatusCode.FAILED_PRECONDITION, "NOT_MONITORING")
    await monitoring(sup, cust.id)
    conv = await barge_in(sup, cust.id)
    assert [p.agent_id for p in conv.agents] == ["agent1", SUPERVISOR]
    joined = await cust.stream.wait_for(is_event("participant_joined", lambda e: e.participant_joined.barge_in))
    assert joined.event.participant_joined.participant.agent_id == SUPERVISOR
    assert joined.event.visibility == rpb.VISIBILITY_ALL
    assert [p.agent_id for p in (await barge_in(sup, cust.id)).agents] == ["agent1", SUPERVISOR]  # a retry
    # Now a participant: it writes like any agent.
    await sup.send(cust.id, "Hello, I am the team lead.")
    await cust.stream.wait_for(is_message("Hello, I am the team lead."))


async def test_supervision_refusals(server):
    agent, cust = await server.chat(queue="support")
    waiting = await server.customer("sales")
    sales_sup = await supervisor(server, "sales-supervisors")
    stream = monitor(sales_sup, cust.id)
    await stream.wait_done()
    assert stream.error is not None and stream.error.code() == grpc.StatusCode.PERMISSION_DENIED
    sup = await supervisor(server)
    await monitoring(sup, waiting.id)  # a queued chat may be watched, not joined
    await expect_error(barge_in(sup, waiting.id), grpc.StatusCode.FAILED_PRECONDITION, "NOT_ANSWERED_YET")
    missing = monitor(sup, "nope")
    await missing.wait_done()
    assert missing.error is not None and missing.error.code() == grpc.StatusCode.NOT_FOUND
    await agent.close(cust.id, confirm=True)
    closed = monitor(sup, cust.id)
    await closed.wait_done()
    assert closed.error is not None and closed.error.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_closing_ends_the_monitor_after_its_stop_is_recorded(server):
    agent, cust = await server.chat()
    sup = await supervisor(server)
    watch = await monitoring(sup, cust.id)
    await agent.close(cust.id, confirm=True)
    await watch.wait_done()
    assert watch.error is None and kinds(watch.events())[-2:] == ["monitor_stopped", "chat_closed"]
    log = kinds((await export(server, cust.id)).events)
    assert log[-1] == "chat_closed" and log.count("monitor_stopped") == 1


async def test_a_restart_records_the_stop_of_monitors_it_cut(server):
    _, cust = await server.chat()
    sup = await supervisor(server)
    await monitoring(sup, cust.id)
    await server.restart()
    log = kinds((await export(server, cust.id)).events)
    assert log.count("monitor_started") == 1 and log.count("monitor_stopped") == 1


async def test_login_says_whether_the_profile_supervises(server):
    from chat.v1 import agent_service_pb2 as agent_pb

    n = SUPERVISOR.removeprefix("agent")
    for profile, supervises in (("supervisors", True), ("both", False)):
        req = agent_pb.LoginRequest(username=SUPERVISOR, password=f"pw{n}", profile_id=profile)
        resp = await server.agent_stub.Login(req)
        assert resp.profile.supervisor is supervises
