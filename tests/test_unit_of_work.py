"""The unit of work (domain/tx.py, domain/runner.py, store/db.py): effects happen only after
commit and exactly once, a rerun starts from a fresh tx, a failed effect keeps nobody waiting,
routing runs once per write, writes carry their names, and stored payloads match the contract."""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid

import pytest
from harness import base_config

from queuechat.api.convert import check_payload
from queuechat.config import parse_config
from queuechat.domain import conversations, runner
from queuechat.domain.core import Core
from queuechat.domain.log import append_event, conv_topic
from queuechat.domain.tx import Tx
from queuechat.errors import ChatError, invalid
from queuechat.store import Database, sqlite_url
from queuechat.store.models import Conversation, Event

WAIT = 10.0


@pytest.fixture
async def core(tmp_path):
    c = Core(Database(sqlite_url(tmp_path / "data")), parse_config(base_config()), check_event=check_payload)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        c.db.close()


async def new_chat(core: Core) -> str:
    view = await core.write(conversations.start_chat, "sales", uuid.uuid4().hex, {}, {})
    return view.id


def say(tx: Tx, conversation_id: str, text: str) -> int:
    conv = tx.session.get(Conversation, conversation_id)
    return append_event(tx, conv, "message", {"text": text}, actor="customer").seq


class WriterGate:
    """Holds the single writer busy so the writes queued behind it form one group commit."""

    def __init__(self, core: Core):
        self.core = core
        self.holding = threading.Event()
        self.release = threading.Event()
        self.task: asyncio.Future[None] | None = None

    def _hold(self, tx: Tx) -> None:
        self.holding.set()
        assert self.release.wait(WAIT)

    async def __aenter__(self) -> WriterGate:
        self.task = asyncio.ensure_future(self.core.write(self._hold))
        assert await asyncio.to_thread(self.holding.wait, WAIT)  # alone in its batch: the rest queue behind
        return self

    async def queued(self, n: int) -> None:
        """Wait until n writes wait behind the gate."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while self.core.db._jobs.qsize() < n:
            assert loop.time() < deadline, "writes did not queue up"
            await asyncio.sleep(0.005)

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, WAIT)


async def drain(sub, timeout: float = 0.3) -> list:
    items = []
    while (item := await sub.get(timeout)) is not None:
        items.append(item)
    return items


async def test_a_rerun_write_starts_from_a_fresh_tx_and_its_effects_happen_once(core):
    cid = await new_chat(core)
    seen_effects: list[int] = []

    def good(tx: Tx) -> int:
        seen_effects.append(len(tx.effects))  # what a previous run recorded must not be here
        return say(tx, cid, "kept")

    def refused(tx: Tx) -> None:
        say(tx, cid, "undone")
        raise invalid("NOPE", "refused on purpose")

    sub = core.bus.subscribe([conv_topic(cid)])
    async with WriterGate(core) as gate:
        a = asyncio.ensure_future(core.write(good))
        b = asyncio.ensure_future(core.write(refused))
        await gate.queued(2)
    assert await asyncio.wait_for(a, WAIT) == 3
    with pytest.raises(ChatError):
        await asyncio.wait_for(b, WAIT)
    assert seen_effects == [0, 0]  # ran in the failed batch, then again alone, each time afresh
    published = [(i.seq, i.payload["text"]) for i in await drain(sub)]
    assert published == [(3, "kept")]  # once, and nothing of the refused write
    sub.close()


async def test_a_failing_effect_is_logged_under_the_write_name_and_keeps_nobody_waiting(core, caplog):
    good_ids = [await new_chat(core) for _ in range(3)]
    bad_id = await new_chat(core)
    real_publish = core.effects.publish

    def publish(topic, item):
        if topic == conv_topic(bad_id):
            raise RuntimeError("the bus broke")
        real_publish(topic, item)

    core.effects.publish = publish  # type: ignore[method-assign]
    subs = [core.bus.subscribe([conv_topic(c)]) for c in good_ids]
    caplog.set_level(logging.ERROR)
    async with WriterGate(core) as gate:
        writes = [asyncio.ensure_future(core.write(say, c, "hi")) for c in [good_ids[0], bad_id, *good_ids[1:]]]
        await gate.queued(len(writes))
    # One group commit: the failing effect is in the middle of it, every caller still gets its answer.
    assert await asyncio.wait_for(asyncio.gather(*writes), WAIT) == [3, 3, 3, 3]
    for sub in subs:
        assert [i.seq for i in await drain(sub)] == [3]
        sub.close()
    failures = [r for r in caplog.records if "an effect failed" in r.getMessage()]
    assert len(failures) == 1 and "test_unit_of_work.say" in failures[0].getMessage()
    assert await core.db.read(lambda s: s.get(Conversation, bad_id).last_seq) == 3  # committed all the same


async def test_effects_of_a_write_that_fails_never_happen(core):
    cid = await new_chat(core)
    sub = core.bus.subscribe([conv_topic(cid)])

    def fails(tx: Tx) -> None:
        say(tx, cid, "lost")
        tx.queue_changed("sales")
        tx.schedule(tx.now, say, cid, "never")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await core.write(fails)
    assert await drain(sub) == []
    assert core.effects.pending_timers == 0
    sub.close()


async def test_routing_runs_once_at_the_end_of_the_write(core, monkeypatch):
    calls: list[Tx] = []
    real = runner.routing.dispatch

    def counting(tx: Tx, now=None, queues=None) -> int:
        calls.append(tx)
        return real(tx, now, queues)

    monkeypatch.setattr(runner.routing, "dispatch", counting)

    def asks_three_times(tx: Tx) -> str:
        for _ in range(3):
            tx.needs_dispatch()
        return "done"

    assert await core.write(asks_three_times) == "done"
    assert len(calls) == 1
    await core.write(lambda tx: None)
    assert len(calls) == 1  # nobody asked


async def test_a_group_commit_dispatches_once_over_what_its_writes_changed(core, monkeypatch):
    calls: list[frozenset[str] | None] = []
    real = runner.routing.dispatch

    def counting(tx: Tx, now=None, queues=None) -> int:
        calls.append(queues)
        return real(tx, now, queues)

    monkeypatch.setattr(runner.routing, "dispatch", counting)
    # Hold the writer so that the next writes queue up and commit as one batch.
    release, holding = threading.Event(), threading.Event()

    def hold(session):
        holding.set()
        release.wait(WAIT)
        return None, None

    held = asyncio.ensure_future(core.db.transact("test.hold", hold))
    assert await asyncio.to_thread(holding.wait, WAIT)

    def arrival(tx: Tx, queue_id: str) -> str:
        tx.needs_dispatch([queue_id])
        return queue_id

    writes = [asyncio.ensure_future(core.write(arrival, q)) for q in ("sales", "support", "sales")]
    deadline = asyncio.get_running_loop().time() + WAIT
    while core.db._jobs.qsize() < len(writes):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    release.set()
    await held
    assert await asyncio.gather(*writes) == ["sales", "support", "sales"]
    assert calls == [frozenset({"sales", "support"})]  # one dispatch, after the batch's last write

    # One write that asks without naming queues makes it a dispatch over all of them.
    calls.clear()
    holding.clear()
    release.clear()
    held = asyncio.ensure_future(core.db.transact("test.hold", hold))
    assert await asyncio.to_thread(holding.wait, WAIT)

    def anything(tx: Tx) -> None:
        tx.needs_dispatch()

    writes = [asyncio.ensure_future(core.write(arrival, "sales")), asyncio.ensure_future(core.write(anything))]
    while core.db._jobs.qsize() < len(writes):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    release.set()
    await held
    await asyncio.gather(*writes)
    assert calls == [None]


async def test_writes_carry_their_names_in_stats_and_failure_logs(core, caplog):
    cid = await new_chat(core)
    assert core.db.stats["conversations.start_chat"].count >= 1

    def broken(tx: Tx, conversation_id: str) -> None:
        raise KeyError(conversation_id)

    caplog.set_level(logging.ERROR)
    with pytest.raises(KeyError):
        await core.write(broken, cid)
    assert any("write test_unit_of_work.broken failed" in r.getMessage() for r in caplog.records)
    assert core.db.stats["test_unit_of_work.broken"].failures == 1


async def test_a_payload_that_is_not_its_contract_message_fails_the_write(core):
    cid = await new_chat(core)

    def wrong_key(tx: Tx) -> None:
        conv = tx.session.get(Conversation, cid)
        append_event(tx, conv, "message", {"txt": "typo"}, actor="customer")

    def wrong_kind(tx: Tx) -> None:
        conv = tx.session.get(Conversation, cid)
        append_event(tx, conv, "no_such_kind", {}, actor="customer")

    for fn in (wrong_key, wrong_kind):
        with pytest.raises(ValueError):
            await core.write(fn)
    assert await core.db.read(lambda s: len(s.exec(Event.__table__.select().where(Event.conversation_id == cid)).all())) == 2


async def test_a_write_that_meets_another_nodes_conflict_runs_again(tmp_path):
    """A deadlock, serialization failure or unique violation (as PostgreSQL reports them when another node got
    there first) reruns the write on a fresh transaction; any other database error is the caller's at once."""

    class Orig(Exception):
        def __init__(self, sqlstate: str):
            self.sqlstate = sqlstate

    class Conflict(Exception):
        def __init__(self, sqlstate: str):
            self.orig = Orig(sqlstate)

    db = Database(sqlite_url(tmp_path))
    try:
        for sqlstate, fails, expect in (("40P01", 2, "done"), ("23505", 1, "done"), ("42P01", 1, Conflict)):
            runs = []

            def job(session, sqlstate=sqlstate, fails=fails, runs=runs):
                runs.append(1)
                if len(runs) <= fails:
                    raise Conflict(sqlstate)
                return "done", None

            if expect is Conflict:
                with pytest.raises(Conflict):
                    await db.transact("test.conflict", job)
                assert len(runs) == 1  # not a conflict to wait out
            else:
                assert await db.transact("test.conflict", job) == expect
                assert len(runs) == fails + 1
        assert db.retries == 3
    finally:
        db.close()
