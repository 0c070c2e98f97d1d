"""Supervisor figures: AdminService.StreamQueueStats through a real server, and the supervisor screen."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import grpc
import pytest
from agent_helpers import click, until
from harness import Stream, auth, error_reason, expect_error

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.domain import stats
from queuechat.domain.tx import utcnow
from queuechat_agent import cli
from queuechat_agent.supervisor import COLUMNS, SupervisorApp, SupervisorLoginScreen

INTERVAL = stats.REFRESH_INTERVAL


async def watch(server, *queue_ids: str, token: str = "") -> Stream:
    """A StreamQueueStats stream, live once its first snapshot is in."""
    token = token or await server.admin_token()
    req = admin_pb.StreamQueueStatsRequest(queue_ids=list(queue_ids))
    s = Stream(server.admin_stub.StreamQueueStats(req, metadata=auth(token)))
    await s.wait_for(lambda i: i.HasField("snapshot"))
    return s


def snapshots(s: Stream, start: int = 0) -> list[admin_pb.QueueStatsSnapshot]:
    return [i.snapshot for i in s.items[start:] if i.HasField("snapshot")]


def by_queue(snapshot: admin_pb.QueueStatsSnapshot) -> dict[str, admin_pb.QueueStats]:
    return {q.queue.queue_id: q for q in snapshot.queues}


async def figures(s: Stream, queue: str, pred, start: int = 0) -> admin_pb.QueueStats:
    """The queue's figures in the first snapshot (from index start) where pred holds."""
    item = await s.wait_for(lambda i: i.HasField("snapshot") and pred(by_queue(i.snapshot)[queue]), start=start)
    return by_queue(item.snapshot)[queue]


def agents(q: admin_pb.QueueStats) -> tuple[int, int, int]:
    return (q.agents_ready, q.agents_busy, q.agents_not_ready)


def outcomes(q: admin_pb.QueueStats) -> tuple[int, int, int]:
    return (q.offers_accepted, q.offers_rejected, q.offers_timed_out)


def seconds(d) -> float:
    return d.ToNanoseconds() / 1e9


async def stop(*streams: Stream) -> None:
    for s in streams:
        await s.cancel()


# --- the figures -------------------------------------------------------------------


async def test_first_snapshot_has_every_queue_and_the_settings(server):
    s = await watch(server)
    [first] = snapshots(s)
    assert [q.queue.queue_id for q in first.queues] == ["sales", "support"]
    assert [q.queue.display_name for q in first.queues] == ["Sales", "Support"]
    for q in first.queues:
        assert q.waiting_count == 0 and seconds(q.longest_wait) == 0
        assert agents(q) == (0, 0, 0) and outcomes(q) == (0, 0, 0)
        assert not q.HasField("service_level")  # nothing answered: no figure, not a made-up 100 %
        assert seconds(q.service_level_target) == 60
    assert seconds(first.window) == 15 * 60
    assert abs(first.compute_time.ToDatetime().timestamp() - utcnow().timestamp()) < 5
    await stop(s)


async def test_waiting_chats_and_the_longest_wait_growing(server):
    s = await watch(server)
    first = await server.customer("sales")
    await server.customer("sales")
    second_since = time.monotonic()
    q = await figures(s, "sales", lambda q: q.waiting_count == 2)
    assert by_queue(snapshots(s)[-1])["support"].waiting_count == 0
    # The oldest chat's wait, and it grows while it waits: once a second at most.
    older = await figures(s, "sales", lambda q: seconds(q.longest_wait) >= 1.0)
    later = await figures(s, "sales", lambda q: seconds(q.longest_wait) > seconds(older.longest_wait))
    assert seconds(later.longest_wait) - seconds(older.longest_wait) >= 0.9 * INTERVAL
    assert later.waiting_count == 2 and seconds(q.longest_wait) <= seconds(older.longest_wait)

    # Taken chats leave the count; the longest wait is the next oldest one's.
    agent = await server.agent("agent1", "sales")
    await agent.take(first.id)
    q = await figures(s, "sales", lambda q: q.waiting_count == 1 and q.offers_accepted == 1)
    assert 0 < seconds(q.longest_wait) <= time.monotonic() - second_since + 1.1  # the second chat's wait
    await stop(s)


@pytest.mark.configure(max_chats={"agent1": 1})
async def test_agents_ready_busy_and_not_ready(server):
    s = await watch(server)
    a1 = await server.agent("agent1", "both")  # ready, offer stream open, one slot
    await server.agent("agent2", "both", ready=False)  # set not ready
    await server.agent("agent3", "sales", offers=False)  # ready but no offer stream: routing passes them over
    a4 = await server.agent("agent4", "support")
    await figures(s, "sales", lambda q: agents(q) == (1, 0, 2))
    await figures(s, "support", lambda q: agents(q) == (2, 0, 1))

    # A pending offer takes agent1's only slot: busy in every queue of the profile.
    cust = await server.customer("sales")
    offer = await a1.wait_offer(cust.id)
    await figures(s, "sales", lambda q: agents(q) == (0, 1, 2))
    await figures(s, "support", lambda q: agents(q) == (1, 1, 1))
    await a1.accept(offer.offer_id)

    # Busy counts whatever the ready state: agent1 at capacity and not ready is busy, not "not ready".
    await a1.set_ready(False)
    start = len(s.items)
    await a4.set_ready(False)
    await figures(s, "support", lambda q: agents(q) == (0, 1, 2), start=start)
    assert agents(by_queue(snapshots(s)[-1])["sales"]) == (0, 1, 2)

    # Closing the chat frees the slot: agent1 is not ready now. Logging out leaves the figures.
    await a1.close(cust.id, confirm=True)
    await figures(s, "sales", lambda q: agents(q) == (0, 0, 3))
    await a4.stub.Logout(agent_pb.LogoutRequest(), metadata=a4.md)
    await figures(s, "support", lambda q: agents(q) == (0, 0, 2))
    await stop(s)


@pytest.mark.configure(settings={"offer_timeout": 1.0})
async def test_offer_outcomes_and_service_level(server):
    s = await watch(server)
    server.core.stats.service_level_target = 0.5  # as [limits] service_level_target = 0.5 would
    a1 = await server.agent("agent1", "sales")

    # Answered at once: within the target.
    fast = await server.customer("sales")
    await a1.take(fast.id)
    q = await figures(s, "sales", lambda q: q.offers_accepted == 1)
    assert q.service_level == 1.0 and seconds(q.service_level_target) == 0.5

    # Rejected, then left to time out, then accepted: it waited longer than the target.
    slow = await server.customer("sales")
    first = await a1.wait_offer(slow.id)
    await a1.reject(first.offer_id)
    second = await a1.offers.wait_for(
        lambda i: i.HasField("event") and i.event.HasField("offer") and i.event.offer.offer_id != first.offer_id
        and i.event.offer.conversation_id == slow.id
    )
    update = await a1.wait_offer_update(second.event.offer.offer_id)
    assert update.state == agent_pb.OFFER_STATE_TIMED_OUT
    third = await a1.offers.wait_for(
        lambda i: i.HasField("event") and i.event.HasField("offer") and i.event.offer.conversation_id == slow.id
        and i.event.offer.offer_id not in (first.offer_id, second.event.offer.offer_id)
    )
    await a1.accept(third.event.offer.offer_id)
    q = await figures(s, "sales", lambda q: q.offers_accepted == 2)
    assert outcomes(q) == (2, 1, 1)
    assert q.service_level == 0.5
    support = by_queue(snapshots(s)[-1])["support"]
    assert outcomes(support) == (0, 0, 0) and not support.HasField("service_level")

    # The same chats under the default target: all answered in time.
    start = len(s.items)
    server.core.stats.service_level_target = stats.SERVICE_LEVEL_TARGET
    q = await figures(s, "sales", lambda q: seconds(q.service_level_target) == 60, start=start)
    assert q.service_level == 1.0 and outcomes(q) == (2, 1, 1)
    await stop(s)

    # Fifteen minutes on, the offers are out of the window.
    later = await server.core.db.read(stats.compute, utcnow() + timedelta(minutes=16), 60.0)
    sales = next(v for v in later.queues if v.queue_id == "sales")
    assert (sales.offers_accepted, sales.offers_rejected, sales.offers_timed_out, sales.service_level) == (0, 0, 0, None)


async def test_a_filter_and_a_new_queue(server):
    md = auth(await server.admin_token())
    only = await watch(server, "support", "support")
    everything = await watch(server)
    assert [q.queue.queue_id for q in snapshots(only)[0].queues] == ["support"]

    await server.admin_stub.CreateQueue(
        admin_pb.CreateQueueRequest(queue=rpb.Queue(queue_id="billing", display_name="Billing")), metadata=md
    )
    await everything.wait_for(lambda i: i.HasField("snapshot") and "billing" in by_queue(i.snapshot))
    await server.customer("sales")
    await everything.wait_for(lambda i: i.HasField("snapshot") and by_queue(i.snapshot)["sales"].waiting_count == 1)
    # The support-only stream saw nothing change: it sent no snapshot since its first.
    assert len(snapshots(only)) == 1
    await stop(only, everything)

    call = server.admin_stub.StreamQueueStats(admin_pb.StreamQueueStatsRequest(queue_ids=["nope"]), metadata=md)
    await expect_error(_drain(call), grpc.StatusCode.NOT_FOUND, "QUEUE_NOT_FOUND")
    many = [f"q{i}" for i in range(stats.MAX_QUEUE_IDS + 1)]
    call = server.admin_stub.StreamQueueStats(admin_pb.StreamQueueStatsRequest(queue_ids=many), metadata=md)
    await expect_error(_drain(call), grpc.StatusCode.INVALID_ARGUMENT, "TOO_MANY_QUEUE_IDS")


async def test_heartbeats_while_nothing_changes(server):
    s = await watch(server)
    beat = await s.wait_for(lambda i: i.HasField("heartbeat"))
    assert beat.heartbeat.latest_seq == 0 and beat.heartbeat.server_time.seconds > 0
    await s.wait_for(lambda i: i.HasField("heartbeat"), start=s.items.index(beat) + 1)
    assert len(snapshots(s)) == 1
    await stop(s)


# --- the refresher -------------------------------------------------------------------


async def test_refreshed_at_most_once_a_second(server):
    s = await watch(server)
    before = server.core.stats.refreshes
    loop = asyncio.get_running_loop()
    started = loop.time()
    for _ in range(6):  # six changes in well under a second
        await server.customer("sales")
    await figures(s, "sales", lambda q: q.waiting_count == 6)
    elapsed = loop.time() - started
    got = snapshots(s, 1)
    assert 1 <= len(got) <= elapsed / INTERVAL + 1, (len(got), elapsed)
    assert server.core.stats.refreshes - before <= elapsed / INTERVAL + 1
    # Each snapshot was computed at least a second after the one before it.
    times = [snap.compute_time.ToDatetime().timestamp() for snap in snapshots(s)]
    assert all(b - a >= 0.95 * INTERVAL for a, b in zip(times, times[1:])), times
    await stop(s)


async def test_no_refresher_while_nobody_watches(server):
    assert idle_or_absent(server)  # nothing runs before the first stream
    one = await watch(server)
    two = await watch(server)
    stats_ = server.core.stats
    assert stats_.running and stats_.watchers == 2
    await one.cancel()
    await until_true(lambda: stats_.watchers == 1)
    assert stats_.running
    await two.cancel()
    await until_true(lambda: not stats_.running and stats_.watchers == 0)
    refreshes = stats_.refreshes
    await asyncio.sleep(2 * INTERVAL)  # proving that nothing happens takes a little time
    assert stats_.refreshes == refreshes

    # The next stream starts it again, with fresh figures at once.
    await server.customer("sales")
    three = await watch(server)
    assert stats_.running and by_queue(snapshots(three)[0])["sales"].waiting_count == 1
    await three.cancel()
    await until_true(lambda: not stats_.running)


async def test_an_admin_token_is_required(server):
    agent = await server.agent("agent1", offers=False)
    for md in ((), auth(agent.token), auth("qadm_garbage")):
        call = server.admin_stub.StreamQueueStats(admin_pb.StreamQueueStatsRequest(), metadata=md)
        await expect_error(_drain(call), grpc.StatusCode.UNAUTHENTICATED, "ADMIN_SESSION_INVALID")
    assert idle_or_absent(server)


def idle_or_absent(server) -> bool:
    """No refresher runs (Core makes its QueueStats at the first stream)."""
    found = getattr(server.core, "stats", None)
    return found is None or not found.running


@pytest.mark.configure(security={"admin_session_max": 2.0})
async def test_the_stream_ends_with_the_admin_session(server, monkeypatch):
    from queuechat.api import admin as admin_api

    monkeypatch.setattr(admin_api, "SESSION_RECHECK", 0.2)
    s = await watch(server)
    await s.wait_done(timeout=10)
    assert s.error is not None and s.error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_reason(s.error) == "ADMIN_SESSION_EXPIRED"
    await until_true(lambda: not server.core.stats.running)


async def _drain(call) -> None:
    async for _ in call:
        pass


async def until_true(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


# --- the supervisor screen --------------------------------------------------------------

SIZE = (140, 30)


def supervisor(**kw) -> SupervisorApp:
    app = SupervisorApp(**kw)
    app.animation_level = "none"
    return app


def row(app: SupervisorApp, queue_id: str) -> dict[str, str]:
    """A queue's row as the supervisor reads it, by column key ({} while there is none)."""
    table = app.table
    if queue_id not in [k.value for k in table.rows]:
        return {}
    return {key: str(getattr(cell, "plain", cell)) for (key, _), cell in zip(COLUMNS, table.get_row(queue_id))}


async def supervisor_log_in(pilot, address: str, password: str = "adminpw") -> None:
    app = pilot.app
    for field, value in (("#server", address), ("#username", "admin"), ("#password", password)):
        app.screen.query_one(field).value = value
    await click(pilot, "#login")


async def test_the_supervisor_screen_shows_live_figures(server):
    app = supervisor()
    async with app.run_test(size=SIZE) as pilot:
        # An agent's password is not an admin's: the login screen says why and stays.
        await supervisor_log_in(pilot, server.address, password="nope")
        error = app.screen.query_one(".error")
        await until(pilot, lambda: "BAD_CREDENTIALS" in error.render().plain, "the refusal")
        assert isinstance(app.screen, SupervisorLoginScreen)

        await supervisor_log_in(pilot, server.address)
        await until(pilot, lambda: row(app, "sales") and row(app, "support"), "a row per queue")
        assert row(app, "sales") == {
            "queue": "Sales", "waiting": "0", "longest": "–", "ready": "0", "busy": "0", "not_ready": "0",
            "accepted": "0", "rejected": "0", "timed_out": "0", "service": "–",
        }
        status = app.query_one("#status")
        assert "Supervisor admin" in status.render().plain
        assert "service-level target 60 s" in status.render().plain

        # Live: a waiting chat, its wait growing, then an agent who takes it.
        cust = await server.customer("sales")
        await until(pilot, lambda: row(app, "sales")["waiting"] == "1", "the waiting chat")
        await until(pilot, lambda: row(app, "sales")["longest"] not in ("–", "0:00"), "its wait growing")
        agent = await server.agent("agent1", "sales")
        await agent.take(cust.id)
        await until(
            pilot,
            lambda: (row(app, "sales")["waiting"], row(app, "sales")["accepted"], row(app, "sales")["service"])
            == ("0", "1", "100%"),
            "the chat answered in time",
        )
        assert row(app, "sales")["ready"] == "1" and row(app, "support")["ready"] == "0"
        assert server.core.stats.watchers == 1

        # The server goes away: a banner says the figures are not live; they come back by themselves.
        banner = app.query_one("#banner")
        await server.stop()
        await until(pilot, lambda: banner.display, "the banner")
        assert "not live" in banner.render().plain
        await server.start()
        await until(pilot, lambda: not banner.display, "the banner gone")
        await until(pilot, lambda: row(app, "sales")["accepted"] == "1", "the figures after the restart")

    # The app gone, its stream is gone, and with it the refresher.
    await until_true(lambda: not server.core.stats.running)


async def test_the_supervisor_screen_can_watch_some_queues_and_needs_the_desktop_entry_point(server):
    app = supervisor(server=server.address, username="admin", password="adminpw", queue_ids=["support"])
    async with app.run_test(size=SIZE) as pilot:
        await click(pilot, "#login")
        await until(pilot, lambda: row(app, "support"), "the support row")
        assert [k.value for k in app.table.rows] == ["support"]
    # `queuechat-agent supervisor` is a desktop, run by main(), not by the scriptable run().
    assert await cli.run(["supervisor"]) == 2
    args = cli.parser().parse_args(["supervisor", "--username", "boss", "--queue", "sales", "--queue", "support"])
    assert (args.command, args.username, args.queue) == ("supervisor", "boss", ["sales", "support"])
