"""The storage layer on both backends: SQLite (the embedded default) and PostgreSQL (the scale-out store).

Everything goes through queuechat.store.Database and the domain's write
functions, not gRPC, so a failure here points at the schema or the SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from datetime import UTC, datetime, timedelta, timezone
from functools import partial

import pytest
from harness import base_config
from pgutil import pg_schema, pg_url, schema_url  # noqa: F401  (pg_url: fixture)
from sqlalchemy import bindparam, func, insert, inspect, text, update
from sqlalchemy.exc import IntegrityError, StatementError
from sqlmodel import col, select

from queuechat.api.convert import check_payload
from queuechat.config import parse_config
from queuechat.domain import agents, conversations, routing
from queuechat.domain.core import Core
from queuechat.domain.log import append_event, conv_topic
from queuechat.domain.views import QueuePositionView
from queuechat.store import Database, sqlite_url
from queuechat.store.fast import Fast
from queuechat.store.models import (
    AgentSession,
    Conversation,
    CustomerVariable,
    Event,
    Offer,
    Queue,
)

WAIT = 10.0


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """A database URL on a fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "data")
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture
async def core(backend):
    c = Core(Database(backend), parse_config(base_config()), check_event=check_payload)
    await c.start()
    try:
        yield c
    finally:
        await c.stop()
        c.db.close()


# --- helpers -----------------------------------------------------------------


async def new_chat(core: Core, queue: str = "sales", **variables: str) -> str:
    view = await core.write(conversations.start_chat, queue, uuid.uuid4().hex, variables, {})
    return view.id


async def login(core: Core, agent_id: str = "agent1") -> str:
    view = await core.write(agents.login, agent_id, "both", True, f"qa_{uuid.uuid4().hex}")
    return view.session_id


def append_n(tx, conversation_id: str, n: int, tag: str) -> list[int]:
    conv = tx.session.get(Conversation, conversation_id)
    return [
        append_event(tx, conv, "message", {"text": f"{tag}-{i}"}, actor="customer").seq for i in range(n)
    ]


def seqs(s, conversation_id: str) -> list[int]:
    return list(s.exec(select(Event.seq).where(Event.conversation_id == conversation_id).order_by(Event.seq)).all())


def count(s, model, *where) -> int:
    return s.exec(select(func.count()).select_from(model).where(*where)).one()


def make_chat_offer(tx, conversation_id: str, session_id: str) -> str:
    conv = tx.session.get(Conversation, conversation_id)
    sess = tx.session.get(AgentSession, session_id)
    return routing.make_offer(tx, conv, sess.id, sess.agent_id, datetime.now(UTC))


def insert_offer(tx, conversation_id: str, session_id: str, *, kind: str = "chat", status: str = "pending") -> str:
    now = datetime.now(UTC)
    offer = Offer(
        id=uuid.uuid4().hex,
        session_id=session_id,
        agent_id=tx.session.get(AgentSession, session_id).agent_id,
        conversation_id=conversation_id,
        kind=kind,
        status=status,
        created_at=now,
        expires_at=now + timedelta(seconds=30),
        resolved_at=None if status == "pending" else now,
    )
    tx.session.add(offer)
    tx.session.flush()
    return offer.id


def _violates(err: IntegrityError, pg_name: str, sqlite_columns: str) -> bool:
    """The error is that unique index's (PostgreSQL names it; SQLite names its columns)."""
    msg = str(err.orig)
    return f'"{pg_name}"' in msg or f"UNIQUE constraint failed: {sqlite_columns}" in msg


# --- schema ------------------------------------------------------------------


def test_create_all_on_fresh_database(backend):
    db = Database(backend)
    try:
        assert inspect(db.engine).get_table_names() == []
        db.create_all()
        db.create_all()  # idempotent: a restart runs it again
        insp = inspect(db.engine)
        tables = set(insp.get_table_names())
        assert {
            "setting",
            "queue",
            "profile",
            "profile_queue",
            "agent",
            "agent_profile",
            "admin",
            "admin_session",
            "predefined_message",
            "agent_session",
            "conversation",
            "customer_variable",
            "participant",
            "conversation_event",
            "offer",
            "invite",
            "offer_menu",
            "agent_feed_event",
        } <= tables
        offer_indexes = {ix["name"]: ix for ix in insp.get_indexes("offer")}
        assert offer_indexes["ux_offer_one_pending_chat"]["unique"]
        assert {ix["name"] for ix in insp.get_indexes("invite")} >= {"ux_invite_one_pending"}
        uniques = {tuple(u["column_names"]) for u in insp.get_unique_constraints("conversation_event")}
        assert {("conversation_id", "seq"), ("conversation_id", "actor", "request_id")} <= uniques
        if db.engine.dialect.name == "postgresql":
            # Times are timestamptz, so PostgreSQL itself keeps them absolute.
            created = {c["name"]: c["type"] for c in insp.get_columns("conversation")}["created_at"]
            assert getattr(created, "timezone", False) is True
    finally:
        db.close()


# --- seq ---------------------------------------------------------------------


async def test_seq_gap_free_and_increasing_across_many_appends(core):
    a, b = await new_chat(core), await new_chat(core, "support")
    # start_chat wrote chat_started and participant_joined.
    assert await core.db.read(seqs, a) == [1, 2]

    # Many concurrent writes, several appends each, interleaved over two conversations.
    results = await asyncio.gather(
        *(core.write(append_n, cid, 1 + i % 4, f"w{i}") for i in range(60) for cid in (a, b))
    )
    per_write = [r for r in results if r]
    for r in per_write:  # each transaction's own appends are consecutive
        assert r == list(range(r[0], r[0] + len(r)))
    total = 2 + sum(1 + i % 4 for i in range(60))
    for cid in (a, b):
        assert await core.db.read(seqs, cid) == list(range(1, total + 1))
        conv = await core.db.read(lambda s, c=cid: s.get(Conversation, c))
        assert conv.last_seq == total


async def test_two_servers_on_one_postgresql_store_get_distinct_seqs(pg_url):  # noqa: F811
    """Scale-out: two processes (two Databases) append to one conversation at the same moment."""
    a = Core(Database(pg_url), parse_config(base_config()))
    b = Core(Database(pg_url), parse_config(base_config()))
    await a.start()
    await b.start()
    try:
        cid = await new_chat(a)
        both_read = threading.Barrier(2, timeout=WAIT)

        def append_after_both_read(tx):
            conv = tx.session.get(Conversation, cid)
            # Both transactions have seen last_seq == 2; a fix that makes the other wait breaks the barrier.
            with contextlib.suppress(threading.BrokenBarrierError):
                both_read.wait()
            return append_event(tx, conv, "message", {"text": "x"}, actor="customer").seq

        got = await asyncio.gather(a.write(append_after_both_read), b.write(append_after_both_read))
        assert sorted(got) == [3, 4]
        assert await a.db.read(seqs, cid) == [1, 2, 3, 4]
    finally:
        for c in (a, b):
            await c.stop()
            c.db.close()


# --- constraints -------------------------------------------------------------


async def test_one_pending_chat_offer_per_conversation(core):
    cid, other = await new_chat(core), await new_chat(core)
    s1, s2 = await login(core, "agent1"), await login(core, "agent2")

    first = await core.write(make_chat_offer, cid, s1)
    # The database, not only the dispatcher, refuses a second pending chat offer.
    with pytest.raises(IntegrityError) as err:
        await core.write(make_chat_offer, cid, s2)
    assert _violates(err.value, "ux_offer_one_pending_chat", "offer.conversation_id")
    with pytest.raises(IntegrityError) as err:
        await core.write(insert_offer, cid, s2)
    assert _violates(err.value, "ux_offer_one_pending_chat", "offer.conversation_id")
    # The failed writes left nothing behind (the feed entry of the refused offer included).
    assert await core.db.read(lambda s: [o.id for o in s.exec(select(Offer).where(Offer.conversation_id == cid))]) == [
        first
    ]
    assert await core.db.read(lambda s: s.get(AgentSession, s2).feed_seq) == 0

    # Non-pending chat offers and pending invite offers are not limited.
    await core.write(partial(insert_offer, status="rejected"), cid, s2)
    await core.write(partial(insert_offer, status="timed_out"), cid, s2)
    await core.write(partial(insert_offer, kind="invite"), cid, s2)
    # Another conversation has its own slot.
    await core.write(insert_offer, other, s2)

    # Once the pending one is resolved, a new pending chat offer is allowed.
    def resolve(tx):
        o = tx.session.get(Offer, first)
        o.status = "rejected"
        o.resolved_at = datetime.now(UTC)
        tx.session.add(o)

    await core.write(resolve)
    await core.write(make_chat_offer, cid, s2)
    pending = await core.db.read(
        lambda s: count(s, Offer, Offer.conversation_id == cid, Offer.kind == "chat", Offer.status == "pending")
    )
    assert pending == 1


async def test_request_id_unique_per_conversation_and_actor(core):
    cid, other = await new_chat(core), await new_chat(core)

    def append(tx, conversation_id, actor, request_id):
        conv = tx.session.get(Conversation, conversation_id)
        return append_event(tx, conv, "message", {"text": "x"}, actor=actor, request_id=request_id).seq

    await core.write(append, cid, "customer", "req-1")
    with pytest.raises(IntegrityError) as err:
        await core.write(append, cid, "customer", "req-1")
    assert _violates(
        err.value,
        "conversation_event_conversation_id_actor_request_id_key",
        "conversation_event.conversation_id, conversation_event.actor, conversation_event.request_id",
    )
    # Scoped by actor and by conversation; absent request ids never collide.
    await core.write(append, cid, "agent:agent1", "req-1")
    await core.write(append, other, "customer", "req-1")
    await core.write(append, cid, "customer", None)
    await core.write(append, cid, "customer", None)
    # The refused append used no seq: the log stays gap-free.
    assert await core.db.read(seqs, cid) == [1, 2, 3, 4, 5, 6]


# --- times -------------------------------------------------------------------


async def test_aware_utc_datetimes_round_trip(core, backend):
    cid = await new_chat(core)
    created = datetime(2024, 3, 31, 1, 59, 58, 123456, tzinfo=UTC)
    # Given in another zone (01:59:59.654321 UTC): stored as the same instant.
    enqueued = datetime(2024, 3, 31, 4, 29, 59, 654321, tzinfo=timezone(timedelta(hours=2, minutes=30)))
    closed = datetime(2024, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)

    def set_times(tx):
        conv = tx.session.get(Conversation, cid)
        conv.created_at, conv.enqueued_at, conv.closed_at = created, enqueued, closed
        tx.session.add(conv)

    await core.write(set_times)

    def check(conv):
        for got, want in ((conv.created_at, created), (conv.enqueued_at, enqueued), (conv.closed_at, closed)):
            assert got.tzinfo is not None and got.utcoffset() == timedelta(0), got
            assert got == want and got.microsecond == want.astimezone(UTC).microsecond

    check(await core.db.read(lambda s: s.get(Conversation, cid)))

    # Comparisons in SQL agree with Python's (what cut-offs and queue order rely on).
    def between(s):
        q = select(Conversation.id).where(
            Conversation.enqueued_at > created + timedelta(microseconds=1),
            Conversation.enqueued_at < created + timedelta(seconds=3),
        )
        return list(s.exec(q).all())

    assert await core.db.read(between) == [cid]

    # A fresh engine (another process) reads the same instants; on PostgreSQL also in a non-UTC session.
    url = backend
    if backend.startswith("postgresql"):
        schema = core.db.engine.url.query["options"].removeprefix("-csearch_path=")
        url = schema_url(schema, TimeZone="America/St_Johns")
    other = Database(url)
    try:
        check(await other.read(lambda s: s.get(Conversation, cid)))
    finally:
        other.close()

    # Naive datetimes are refused on both backends rather than stored ambiguously.
    def naive(tx):
        conv = tx.session.get(Conversation, cid)
        conv.closed_at = datetime(2024, 1, 1, 12, 0)
        tx.session.add(conv)

    with pytest.raises((StatementError, ValueError)):
        await core.write(naive)
    check(await core.db.read(lambda s: s.get(Conversation, cid)))


async def test_fast_statements_read_write_and_fail_as_sqlalchemy_does(core):
    """store.fast runs hot statements on SQLite's cursor: the same rows (types converted), the same
    exceptions, and defaults it cannot fill left to SQLAlchemy."""
    cid = await new_chat(core, name="Ada")
    when = datetime(2024, 3, 31, 4, 29, 59, 654321, tzinfo=timezone(timedelta(hours=2)))
    claim = (
        update(Conversation)
        .where(col(Conversation.id) == bindparam("c"))
        .values(last_seq=Conversation.last_seq + 1, enqueued_at=bindparam("t"))
        .returning(col(Conversation.last_seq), col(Conversation.customer_connected), col(Conversation.enqueued_at))
    )
    fast_claim, add = Fast(claim), Fast(insert(Event))

    def both(tx):
        c = tx.conn
        slow = c.execute(claim, {"c": cid, "t": when}).first()
        quick = fast_claim.run(c, {"c": cid, "t": when}).first()
        assert fast_claim.run(c, {"c": "nobody", "t": when}).first() is None
        add.run(c, event(quick.last_seq, "r1"))
        return tuple(slow), tuple(quick)

    def event(seq, request_id):
        return {"conversation_id": cid, "seq": seq, "kind": "message", "visibility": "all",
                "created_at": when, "actor": "customer", "request_id": request_id, "payload": "{}"}  # fmt: skip

    # An expanding IN list takes SQLAlchemy's own path, with the same answer.
    names = Fast(select(Conversation.customer_name).where(col(Conversation.id).in_(bindparam("ids", expanding=True))))
    assert await core.db.read(lambda s: names.run(s.connection(), {"ids": [cid, "nobody"]}).all()) == [("Ada",)]

    slow, quick = await core.write(both)
    assert quick == (slow[0] + 1, *slow[1:])
    assert quick[1] is True and quick[2] == when and quick[2].utcoffset() == timedelta(0)
    assert await core.db.read(seqs, cid) == [1, 2, quick[0]]

    def again(tx):
        fast_claim.run(tx.conn, {"c": cid, "t": when})
        add.run(tx.conn, event(quick[0], "r2"))  # that seq is taken

    with pytest.raises(IntegrityError):
        await core.write(again)
    assert await core.db.read(lambda s: (s.get(Conversation, cid).last_seq, seqs(s, cid))) == (quick[0], [1, 2, quick[0]])


async def test_get_loads_what_session_get_loads(core):
    """read.get makes the instance the ORM's own loading would: the same values, persistent, one per
    key in the session, changes tracked and committed; what the session already holds (changed,
    deleted) answers as Session.get answers."""
    from sqlalchemy import inspect as sa_inspect

    from queuechat.domain.read import get

    cid, other = await new_chat(core, name="Ada"), await new_chat(core, name="Bo")
    columns = sa_inspect(Conversation).column_attrs.keys()

    def check(tx):
        s = tx.session
        want = {k: getattr(s.get(Conversation, cid), k) for k in columns}
        s.expunge_all()
        conv = get(s, Conversation, cid)
        assert {k: getattr(conv, k) for k in columns} == want and sa_inspect(conv).persistent
        assert get(s, Conversation, cid) is conv is s.get(Conversation, cid)
        assert get(s, Conversation, "nobody") is None
        conv.customer_name = "Renamed"
        assert conv in s.dirty and get(s, Conversation, cid).customer_name == "Renamed"
        gone = get(s, Conversation, other)
        s.delete(gone)
        assert get(s, Conversation, other) is s.get(Conversation, other)
        s.expunge(gone)
        fresh = Queue(id="fresh", display_name="Fresh")
        s.add(fresh)  # added, not flushed: Session.get would flush it and answer with it
        assert get(s, Queue, "fresh") is fresh

    await core.write(check)
    assert await core.db.read(lambda s: s.get(Conversation, cid).customer_name) == "Renamed"


def test_no_hot_statement_carries_its_own_in_list():
    """A list written into a statement (`status IN ('a', 'b')`) compiles to an expanding parameter,
    which Fast leaves to SQLAlchemy's slow path without a word: the hot statements spell it with OR."""
    import gc

    from sqlalchemy.dialects import sqlite

    from queuechat.domain import read  # noqa: F401  (its statements are built at import)

    statements = [o for o in gc.get_objects() if isinstance(o, Fast)]
    assert len(statements) > 20
    dialect = sqlite.dialect(paramstyle="qmark")
    carried = [
        str(f.stmt)
        for f in statements
        if any(b.expanding and (b.value is not None or b.callable is not None)
               for b in f.stmt.compile(dialect=dialect).binds.values())
    ]  # fmt: skip
    assert carried == []
    assert routing._COOLING._plan(dialect, ("conv", "cutoff")) is not None


def test_the_cool_down_read_looks_up_the_chats_own_offers(tmp_path):
    """Without statistics SQLite would read the cool-down's offers by (kind, resolved_at): every chat
    offer answered lately, thousands under load, for each chat routed. (PostgreSQL plans by its
    statistics.)"""
    db = Database(sqlite_url(tmp_path / "plan.db"))
    try:
        db.create_all()
        sql = str(routing._COOLING.stmt.compile(dialect=db.engine.dialect))
        with db.engine.connect() as c:
            plan = [row[-1] for row in c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, (None,) * sql.count("?"))]
    finally:
        db.close()
    assert plan == ["SEARCH offer USING INDEX ix_offer_conversation_id (conversation_id=?)"]


def test_routing_reads_free_agents_in_index_order(tmp_path):
    """Routing reads live sessions idle longest first by ix_agent_session_idle and stops at the few it
    needs: no sort of every live session (a temporary B-tree) on each arrival."""
    db = Database(sqlite_url(tmp_path / "plan.db"))
    try:
        db.create_all()
        plans = {}
        for name in ("_FREE_AGENTS", "_FREE_FOR_QUEUE", "_FREE_FOR_QUEUE_AFTER"):
            sql = str(getattr(routing, name).stmt.compile(dialect=db.engine.dialect))
            with db.engine.connect() as c:
                rows = c.exec_driver_sql("EXPLAIN QUERY PLAN " + sql, (None,) * sql.count("?"))
                plans[name] = [row[-1] for row in rows]
    finally:
        db.close()
    for name, plan in plans.items():
        assert plan[0].startswith("SEARCH agent_session USING INDEX ix_agent_session_idle (ended_at=?"), (name, plan)
        assert not any("TEMP B-TREE" in step for step in plan), (name, plan)
    assert "(last_offer_at,created_at,id)>(?,?,?)" in plans["_FREE_FOR_QUEUE_AFTER"][0]


# --- transactions ------------------------------------------------------------


async def test_failed_write_rolls_back_everything(core):
    cid = await new_chat(core, name="Ada")
    before = await core.db.read(lambda s: (s.get(Conversation, cid).last_seq, count(s, Conversation)))
    sub = core.bus.subscribe([conv_topic(cid)])

    class Boom(Exception):
        pass

    def fails(tx):
        append_n(tx, cid, 3, "lost")
        conv = tx.session.get(Conversation, cid)
        conv.customer_name = "Changed"
        tx.session.add(CustomerVariable(conversation_id=cid, name="extra", value="v"))
        conversations.start_chat(tx, "support", "lost-chat", {}, {})
        tx.session.flush()  # the rows really reached the database before the failure
        raise Boom()

    with pytest.raises(Boom):
        await core.write(fails)

    def state(s):
        conv = s.get(Conversation, cid)
        return (
            conv.last_seq,
            count(s, Conversation),
            conv.customer_name,
            count(s, CustomerVariable, CustomerVariable.conversation_id == cid),
            seqs(s, cid),
            s.exec(select(Conversation).where(Conversation.start_request_id == "lost-chat")).first(),
        )

    assert await core.db.read(state) == (before[0], before[1], "Ada", 1, [1, 2], None)

    # No after-commit effect ran for it: the next thing published is the next successful append,
    # with the seq the failed write had taken.
    [seq] = await core.write(append_n, cid, 1, "kept")
    assert seq == before[0] + 1
    item = await sub.get(WAIT)
    while isinstance(item, QueuePositionView):  # queue positions share the topic
        item = await sub.get(WAIT)
    assert item is not None and item.seq == seq and item.payload == {"text": "kept-0"}
    sub.close()


async def test_read_sees_committed_write_at_once(core):
    cid = await new_chat(core)
    for i in range(40):
        [seq] = await core.write(append_n, cid, 1, f"r{i}")
        # Every reader thread sees it, right after write() returned.
        got = await asyncio.gather(
            core.db.read(lambda s: s.get(Conversation, cid).last_seq),
            core.db.read(lambda s: seqs(s, cid)[-1]),
            core.db.read(
                lambda s: s.execute(
                    text("select max(seq) from conversation_event where conversation_id = :c"), {"c": cid}
                ).scalar()
            ),
        )
        assert got == [seq, seq, seq]


# --- connections the database drops ------------------------------------------------------


async def test_a_write_whose_connection_drops_reruns_before_commit_and_fails_at_commit(pg_url):  # noqa: F811
    """No connection is pinged before use, so a dropped one shows at a statement. Dropped before COMMIT:
    nothing took, and the write runs again on a fresh connection. Dropped at COMMIT: whether it took is
    unknown, so the caller gets the error and the write is not run a second time."""
    import psycopg
    from pgutil import pg_user
    from sqlalchemy import event

    db = Database(pg_url)
    db.create_all()
    engine = db._write_engine
    kill_at: list[str] = []  # "statement" or "commit": drop the writer's connection there, once

    def drop(conn) -> None:
        pid = conn.connection.dbapi_connection.info.backend_pid
        with psycopg.connect(host="127.0.0.1", dbname="test", user=pg_user(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    @event.listens_for(engine, "before_cursor_execute")
    def at_statement(conn, *_):
        if kill_at == ["statement"]:
            kill_at.clear()
            drop(conn)

    @event.listens_for(engine, "commit")
    def at_commit(conn):
        if kill_at == ["commit"]:
            kill_at.clear()
            drop(conn)

    runs: list[str] = []

    def job(name: str):
        def run(session):
            runs.append(name)
            session.connection().execute(text("CREATE TABLE IF NOT EXISTS probe (name text)"))
            session.connection().execute(text("INSERT INTO probe VALUES (:n)"), {"n": name})
            return name, None

        return run

    def stored(session) -> list[str]:
        return list(session.connection().execute(text("SELECT name FROM probe ORDER BY name")).scalars())

    try:
        kill_at.append("statement")
        assert await db.transact("probe", job("first")) == "first"
        assert runs == ["first", "first"] and not kill_at  # dropped, then run again
        kill_at.append("commit")
        with pytest.raises(Exception) as raised:
            await db.transact("probe", job("second"))
        assert getattr(raised.value, "connection_invalidated", False)
        assert runs == ["first", "first", "second"]  # not run again
        assert await db.read(stored) in (["first"], ["first", "second"])
        assert await db.transact("probe", job("third")) == "third"  # and the writer goes on
        assert "third" in await db.read(stored)
    finally:
        db.close()


# --- WAL checkpoints (SQLite) ------------------------------------------------------------


def _rows_in_the_database_file_alone(db_path, tmp_path, torn: int | None = None) -> int:
    """What the main database file holds without its WAL: what checkpoints have copied there."""
    copy = tmp_path / "alone.db"
    copy.write_bytes(db_path.read_bytes())
    import sqlite3

    conn = sqlite3.connect(copy)
    try:
        return conn.execute("SELECT count(*) FROM scratch").fetchone()[0]
    except sqlite3.OperationalError:  # the table itself is still only in the WAL
        return 0
    except sqlite3.DatabaseError:
        if torn is None:
            raise
        return torn
    finally:
        conn.close()


@pytest.fixture
def scratch_db(tmp_path):
    """A SQLite Database with a table `scratch` (x TEXT) to fill."""
    db = Database(sqlite_url(tmp_path / "data"))
    try:
        db.ensure_schema()
        with db.engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE scratch (x TEXT)")
            conn.commit()
        yield db
    finally:
        db.close()


async def _fill(db: Database, rows: int) -> None:
    def job(s):
        s.connection().execute(text("INSERT INTO scratch (x) VALUES (:x)"), [{"x": "x" * 5000}] * 10)
        return None, None

    for _ in range(rows // 10):
        await db.transact("fill", job)


async def test_commits_never_checkpoint_the_checkpointer_does(scratch_db, tmp_path):
    """A commit that took the WAL past 1,000 pages used to checkpoint on the writer (10-15 ms with every
    write behind it waiting). Now commits never do; the checkpointer thread copies the WAL over."""
    db, db_path = scratch_db, tmp_path / "data" / "queuechat.db"
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    assert db.checkpointer is not None
    db.checkpointer.close()  # stopped: only commits could checkpoint now
    await _fill(db, 1500)  # about 2,000 pages, twice what set off an automatic checkpoint
    assert _rows_in_the_database_file_alone(db_path, tmp_path) == 0

    st = db.checkpointer.stats
    runs = st.runs  # (it may have run before it was stopped)
    db.checkpointer.run_once()  # what its thread does every second or 500 commits
    assert st.runs == runs + 1 and st.wal_pages > 1000 and st.copied_pages == st.wal_pages
    assert _rows_in_the_database_file_alone(db_path, tmp_path) == 1500


async def test_the_checkpointer_thread_keeps_up_with_the_writer(scratch_db, tmp_path):
    db, db_path = scratch_db, tmp_path / "data" / "queuechat.db"
    await _fill(db, 1500)  # 150 commits: the thread wakes each second (and after 500)
    st = db.checkpointer.stats
    deadline = asyncio.get_running_loop().time() + WAIT
    # (A copy taken while a checkpoint writes the file may be torn: counted as not there yet.)
    # (The rows reach the file before the run that copied them is counted.)
    while st.runs < 1 or _rows_in_the_database_file_alone(db_path, tmp_path, torn=-1) != 1500:
        assert asyncio.get_running_loop().time() < deadline, st
        await asyncio.sleep(0.05)
    assert st.failures == 0


async def test_the_wal_starts_over_while_the_writer_keeps_writing(scratch_db, tmp_path):
    """Only a checkpoint that copied every page lets the next write start the WAL file over, and a writer
    that never stops commits during each checkpoint: the checkpointer copies that tail with the writer held
    off. Without it the file grew by everything written (188 MB in 15 s at 700 commits/s)."""
    db, wal = scratch_db, tmp_path / "data" / "queuechat.db-wal"
    db.checkpointer.interval = 0.1
    await _fill(db, 100)  # the thread is now on the short interval
    written, runs = 0, db.checkpointer.stats.runs
    starts = set()  # the WAL header's checkpoint sequence number: it goes up each time the file starts over
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while db.checkpointer.stats.runs < runs + 10:  # writes never pause across ten checkpoints
        assert loop.time() < deadline, db.checkpointer.stats
        await _fill(db, 10)
        written += 10 * 5000
        with wal.open("rb") as f:
            starts.add(int.from_bytes(f.read(16)[12:16], "big"))
    assert len(starts) >= 5, (starts, db.checkpointer.stats)
    assert wal.stat().st_size < written / 2, (wal.stat().st_size, written, db.checkpointer.stats)
    assert db.checkpointer.stats.failures == 0


def test_fast_connection_refuses_a_transaction_a_failed_flush_ended(tmp_path):
    """As Session.connection() does: a Core write on the cached connection would run outside any transaction."""
    from sqlalchemy.exc import PendingRollbackError
    from sqlmodel import Session

    from queuechat.store.fast import connection

    db = Database(sqlite_url(tmp_path / "data"))
    try:
        db.ensure_schema()
        with Session(db.engine) as s:
            connection(s)
            s.add(Queue(id="q1", display_name="Q"))
            s.add(Queue(id="q1", display_name="Q again"))
            with pytest.raises(IntegrityError):
                s.flush()
            with pytest.raises(PendingRollbackError):
                s.connection()
            with pytest.raises(PendingRollbackError):
                connection(s)
    finally:
        db.close()
