"""Schema migrations (queuechat.store.migrations) on SQLite and PostgreSQL.

- A database at revision 0001 (the schema before the hardening commit) with data in it is upgraded
  to head: the data is all there, the new columns have their defaults, and a server runs on it.
- The revisions and the models agree: Alembic's autogenerate finds nothing to do at head, and the
  schema the revisions build is the one create_all + stamp (how an empty database is made) builds,
  down to the partial unique indexes' WHERE clauses.
- Databases made before migrations (no alembic_version) are adopted; one that is behind is refused
  unless asked to migrate, with the command to run; one from a newer queuechat is refused always.
- Nodes starting together: one migrates, the others wait and find it done. A failing upgrade leaves
  the database as it was (SQLite too).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from harness import base_config
from pgutil import pg_schema
from sqlalchemy import MetaData, create_engine, insert, inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool
from sqlmodel import Session, select

from queuechat.__main__ import _upgrade_command, main
from queuechat.config import parse_config
from queuechat.domain.core import Core
from queuechat.domain.log import append_event
from queuechat.store import Database, migrations, sqlite_url
from queuechat.store.migrations import SchemaAhead, SchemaBehind, State
from queuechat.store.models import (
    Admin,
    AdminSession,
    Agent,
    AgentSession,
    ConfiguredAccount,
    Conversation,
    CustomerVariable,
    Event,
    IdentityTokenUse,
    MonitorSession,
    Participant,
    Profile,
    Queue,
    ReadCursor,
)

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
T1 = datetime(2026, 11, 30, 12, 5, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _no_database_env(monkeypatch):
    """The CLI reads these; a developer's own must not leak into the tests."""
    monkeypatch.delenv("QUEUECHAT_DATABASE_URL", raising=False)
    monkeypatch.delenv("QUEUECHAT_DATA", raising=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """A URL on a fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "data")
    else:
        with pg_schema() as url:
            yield url


@pytest.fixture
def other(backend, tmp_path):
    """A second fresh database on the same backend."""
    if backend.startswith("sqlite"):
        yield sqlite_url(tmp_path / "other")
    else:
        with pg_schema() as url:
            yield url


def connect(url: str):
    return create_engine(url, poolclass=NullPool).connect()


def run_revisions(url: str, target: str = "head") -> None:
    """Build the schema by running the revisions themselves (an empty database is otherwise made by create_all)."""
    with migrations.transaction(url) as conn:
        migrations.upgrade_on(conn, migrations.status_of(conn), target)


def make_legacy(url: str) -> None:
    """Turn a database into one made before migrations: the tables, no alembic_version."""
    with connect(url) as conn:
        conn.execute(text(f"DROP TABLE {migrations.VERSION_TABLE}"))
        conn.commit()


# --- data at 0001 ------------------------------------------------------------------------------------


def fill_0001(url: str) -> None:
    """Rows as the 0001 schema holds them, written through that schema's own tables (reflected)."""
    with connect(url) as conn:
        meta = MetaData()
        meta.reflect(conn)
        t = meta.tables
        assert "disabled" not in t["agent"].c and "configured_account" not in t  # really 0001
        rows = {
            "queue": [{"id": "sales", "display_name": "Old sales"}, {"id": "support", "display_name": "Support"}],
            "profile": [{"id": "both", "display_name": "Both"}],
            "profile_queue": [{"profile_id": "both", "queue_id": "sales"}],
            "agent": [
                {"id": "agent1", "display_name": "Old name", "password_hash": "x", "max_chats": 2},
                {"id": "agent2", "display_name": "Agent 2", "password_hash": "y", "max_chats": 3},
            ],
            "agent_profile": [{"agent_id": "agent1", "profile_id": "both"}],
            "admin": [{"id": "admin", "password_hash": "z"}],
            "admin_session": [{"token_hash": "adm-hash", "admin_id": "admin", "created_at": T0}],
            "agent_session": [
                {
                    "id": "s1", "token_hash": "tok-hash", "agent_id": "agent1", "profile_id": "both", "ready": True,
                    "stream_count": 1, "stream_lost_at": None, "created_at": T0, "ended_at": None,
                    "last_offer_at": T1, "feed_seq": 0,
                }
            ],
            "conversation": [
                {
                    "id": "c1", "queue_id": "sales", "status": "active", "customer_connected": True,
                    "customer_name": "Ada", "created_at": T0, "enqueued_at": T0, "closed_at": None, "last_seq": 3,
                    "start_request_id": "start-1",
                }
            ],
            "customer_variable": [
                {"conversation_id": "c1", "name": "email", "value": "ada@example.com", "authenticated": True}
            ],
            "participant": [{"conversation_id": "c1", "agent_id": "agent1", "joined_at": T1, "left_at": None}],
            "conversation_event": [
                {
                    "conversation_id": "c1", "seq": seq, "kind": "message", "visibility": "all", "created_at": T1,
                    "actor": "customer", "request_id": f"m{seq}", "payload": f'{{"text": "hello {seq}"}}',
                }
                for seq in (1, 2, 3)
            ],
        }  # fmt: skip
        for name, values in rows.items():
            conn.execute(insert(t[name]), values)
        conn.commit()


def check_data_at_head(url: str) -> None:
    """The 0001 rows, read through today's models; the new columns have their defaults."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with Session(engine) as s:
            agents = s.exec(select(Agent).order_by(Agent.id)).all()
            # 0005 counts each agent's load from the rows: agent1 is in the active conversation c1.
            assert [(a.id, a.display_name, a.max_chats, a.disabled, a.load) for a in agents] == [
                ("agent1", "Old name", 2, False, 1),
                ("agent2", "Agent 2", 3, False, 0),
            ]
            assert [(a.id, a.password_hash, a.disabled) for a in s.exec(select(Admin)).all()] == [("admin", "z", False)]
            adm = s.exec(select(AdminSession)).one()
            assert (adm.token_hash, adm.admin_id, adm.created_at, adm.last_used_at) == ("adm-hash", "admin", T0, None)
            sess = s.exec(select(AgentSession)).one()
            assert (sess.id, sess.agent_id, sess.ready, sess.stream_count) == ("s1", "agent1", True, 1)
            assert (sess.created_at, sess.last_offer_at, sess.last_seen_at, sess.ended_at) == (T0, T1, None, None)
            conv = s.exec(select(Conversation)).one()
            assert (conv.id, conv.status, conv.customer_name, conv.last_seq) == ("c1", "active", "Ada", 3)
            assert (conv.created_at, conv.enqueued_at, conv.start_request_id) == (T0, T0, "start-1")
            events = s.exec(select(Event).order_by(Event.seq)).all()
            assert [(e.seq, e.payload, e.request_id, e.created_at) for e in events] == [
                (n, f'{{"text": "hello {n}"}}', f"m{n}", T1) for n in (1, 2, 3)
            ]
            var = s.exec(select(CustomerVariable)).one()
            assert (var.name, var.value, var.authenticated) == ("email", "ada@example.com", True)
            part = s.exec(select(Participant)).one()
            assert (part.agent_id, part.joined_at, part.left_at) == ("agent1", T1, None)
            assert s.exec(select(ConfiguredAccount)).all() == []
            # 0003: nothing is wrapped up, rated, read, monitored or supervised yet.
            assert (conv.ended_at, conv.wrap_up_code_id, conv.rating_score, conv.rated_at) == (None, None, None, None)
            assert [q.wrap_up_required for q in s.exec(select(Queue)).all()] == [False, False]
            assert [p.supervisor for p in s.exec(select(Profile)).all()] == [False]
            assert s.exec(select(ReadCursor)).all() == [] and s.exec(select(MonitorSession)).all() == []
            assert s.exec(select(IdentityTokenUse)).all() == []
        # A row written without the new columns gets their server defaults.
        with engine.begin() as conn:
            conn.execute(
                text("INSERT INTO agent (id, display_name, password_hash, max_chats) VALUES ('a3', 'A3', 'h', 1)")
            )
            assert conn.execute(text("SELECT disabled FROM agent WHERE id = 'a3'")).scalar_one() in (False, 0)
            conn.execute(text("DELETE FROM agent WHERE id = 'a3'"))
    finally:
        engine.dispose()


# --- upgrading with data -----------------------------------------------------------------------------


async def test_upgrade_from_0001_keeps_the_data_and_a_server_runs_on_it(backend):
    migrations.upgrade(backend, "0001")
    assert migrations.status(backend) == migrations.Status(State.BEHIND, "0001", migrations.head())
    fill_0001(backend)

    before, after = migrations.upgrade(backend)

    assert (before.state, before.revision) == (State.BEHIND, "0001")
    assert (after.state, after.revision) == (State.CURRENT, migrations.head())
    check_data_at_head(backend)
    # The server starts on it and carries on where the old one stopped.
    core = Core(Database(backend), parse_config(base_config()))
    await core.start()
    try:

        def append(tx):
            return append_event(
                tx, tx.session.get(Conversation, "c1"), "message", {"text": "after"}, actor="customer"
            ).seq

        assert await core.write(append) == 4
        transcript = await core.db.read(lambda s: s.exec(select(Event.seq).where(Event.conversation_id == "c1")).all())
        assert sorted(transcript) == [1, 2, 3, 4]
        accounts = await core.db.read(lambda s: s.exec(select(ConfiguredAccount)).all())
        assert ("agent", "agent1") in {(a.kind, a.id) for a in accounts}  # the configuration file was applied
        sess = await core.db.read(lambda s: s.get(AgentSession, "s1"))
        # last_seen_at is NULL after the upgrade, so its idle time counts from created_at (days ago): ended.
        assert sess.ended_at is not None and sess.last_seen_at is None
    finally:
        await core.stop()
        core.db.close()


def test_downgrade_to_0001_and_up_again_keeps_the_data(backend):
    migrations.upgrade(backend, "0001")
    fill_0001(backend)
    migrations.upgrade(backend)
    migrations.downgrade(backend, "0001")
    with connect(backend) as conn:
        insp = inspect(conn)
        assert "disabled" not in {c["name"] for c in insp.get_columns("agent")}
        assert not insp.has_table("configured_account")
        assert conn.execute(text("SELECT count(*) FROM conversation_event")).scalar_one() == 3
    assert migrations.status(backend).revision == "0001"
    migrations.upgrade(backend)
    check_data_at_head(backend)


# --- the revisions agree with the models -----------------------------------------------------------


def test_autogenerate_finds_nothing_at_head(backend):
    run_revisions(backend)
    with migrations.transaction(backend) as conn:
        assert migrations.status_of(conn).state is State.CURRENT
        assert migrations.differences(conn) == []


def test_autogenerate_sees_what_0001_lacks(backend):
    """The comparison above is not blind: at 0001 it finds exactly what the later revisions add."""
    run_revisions(backend, "0001")
    with migrations.transaction(backend) as conn:
        found = _found(migrations.differences(conn))
    assert (
        found
        == {
            ("add_column", "agent", "disabled"),
            ("add_column", "admin", "disabled"),
            ("add_column", "admin_session", "last_used_at"),
            ("add_column", "agent_session", "last_seen_at"),
            ("add_table", "configured_account"),
            ("add_table", "identity_token_use"),
            ("add_index", "ix_identity_token_use_expires_at"),
            ("add_index", "ix_attachment_sha256"),
            ("add_index", "ix_offer_resolved"),
        }
        | ADDED_BY_0003
        | ADDED_BY_0004
        | ADDED_BY_0005
    )


# What 0003 (the cluster's stream leases and attachment bytes in the database) adds.
ADDED_BY_0003 = {
    ("add_table", "stream_lease"),
    ("add_index", "ix_stream_lease_session_id"),
    ("add_index", "ix_stream_lease_node_id"),
    ("add_index", "ix_stream_lease_expires_at"),
    ("add_table", "blob_chunk"),
}

# What 0004 (issue #13's features) adds.
ADDED_BY_0004 = {
    ("add_column", "queue", "wrap_up_required"),
    ("add_column", "profile", "supervisor"),
    *(
        ("add_column", "conversation", c)
        for c in (
            "ended_at",
            "wrap_up_code_id",
            "wrap_up_code_name",
            "wrap_up_note",
            "wrap_up_agent_id",
            "wrap_up_at",
            "rating_score",
            "rating_comment",
            "rated_at",
            "rating_request_id",
        )
    ),  # fmt: skip
    ("add_index", "ix_conversation_rated_at"),
    ("add_index", "ix_conversation_wrap_up_code_id"),
    ("add_table", "wrap_up_code"),
    ("add_table", "read_cursor"),
    ("add_table", "monitor_session"),
    ("add_index", "ix_monitor_session_conversation_id"),
}

# What 0005 (issue #14: each agent's load on its row, routing's order indexed) adds.
ADDED_BY_0005 = {("add_column", "agent", "load"), ("add_index", "ix_agent_session_idle")}


def test_autogenerate_sees_what_0002_and_0003_lack(backend):
    """At 0002 the comparison finds exactly what 0003, 0004 and 0005 add; at 0003, what 0004 and 0005 add;
    at 0004, what 0005 adds."""
    run_revisions(backend, "0002")
    with migrations.transaction(backend) as conn:
        assert _found(migrations.differences(conn)) == ADDED_BY_0003 | ADDED_BY_0004 | ADDED_BY_0005
    run_revisions(backend, "0003")
    with migrations.transaction(backend) as conn:
        assert _found(migrations.differences(conn)) == ADDED_BY_0004 | ADDED_BY_0005
    run_revisions(backend, "0004")
    with migrations.transaction(backend) as conn:
        assert _found(migrations.differences(conn)) == ADDED_BY_0005


def _found(differences) -> set:
    found = set()
    for diff in differences:
        for d in diff if isinstance(diff, list) else [diff]:
            if d[0] == "add_column":
                found.add(("add_column", d[2], d[3].name))
            elif d[0] == "add_table":
                found.add(("add_table", d[1].name))
            elif d[0] == "add_index":
                found.add(("add_index", d[1].name))
            else:
                found.add((d[0],))
    return found


def reflected_schema(url: str) -> dict:
    """Everything the inspector tells about our tables, plus each index's own DDL (partial WHERE included)."""
    with connect(url) as conn:
        insp = inspect(conn)
        out: dict = {}
        for t in sorted(insp.get_table_names()):
            if t == migrations.VERSION_TABLE:
                continue
            out[t] = {
                "columns": {
                    c["name"]: (str(c["type"]), c["nullable"], str(c["default"]), c.get("autoincrement"))
                    for c in insp.get_columns(t)
                },
                "pk": insp.get_pk_constraint(t),
                "fks": sorted(
                    (fk["name"] or "", tuple(fk["constrained_columns"]), fk["referred_table"], tuple(fk["referred_columns"]), sorted(fk["options"].items()))
                    for fk in insp.get_foreign_keys(t)
                ),
                "uniques": sorted((u["name"] or "", tuple(u["column_names"])) for u in insp.get_unique_constraints(t)),
                "indexes": sorted(
                    (i["name"] or "", tuple(i["column_names"]), i["unique"], sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()))
                    for i in insp.get_indexes(t)
                ),
            }  # fmt: skip
        out["index DDL"] = index_ddl(conn)
    return out


def index_ddl(conn: Connection) -> dict[str, str]:
    if conn.dialect.name == "sqlite":
        rows = conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")
        return {name: " ".join(sql.split()) for name, sql in rows}
    rows = conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = current_schema()"))
    schema = conn.execute(text("SELECT current_schema()")).scalar_one()
    return {name: ddl.replace(f"{schema}.", "") for name, ddl in rows}


def test_revisions_build_the_schema_create_all_builds(backend, other):
    """An empty database is made by create_all + stamp head; one upgraded from 0001 by the revisions: the same."""
    run_revisions(backend, "0001")
    run_revisions(backend)
    before, after = migrations.ensure(other)
    assert (before.state, after.state) == (State.EMPTY, State.CURRENT)
    upgraded, created = reflected_schema(backend), reflected_schema(other)
    assert upgraded.keys() == created.keys()
    for table in upgraded:
        assert upgraded[table] == created[table], table
    assert "WHERE" in created["index DDL"]["ux_offer_one_pending_chat"]
    assert "WHERE" in created["index DDL"]["ux_invite_one_pending"]


# --- states: empty, legacy, behind, ahead ------------------------------------------------------------


def test_an_empty_database_is_created_without_being_asked(backend):
    assert migrations.status(backend).state is State.EMPTY
    before, after = migrations.ensure(backend)  # migrate=False: an empty database is not behind
    assert (before.state, after.state, after.revision) == (State.EMPTY, State.CURRENT, migrations.head())
    assert migrations.ensure(backend)[0].state is State.CURRENT  # and a second start does nothing


def test_a_pre_migration_0001_database_is_stamped_then_upgraded(backend):
    run_revisions(backend, "0001")
    fill_0001(backend)
    make_legacy(backend)
    assert migrations.status(backend).state is State.LEGACY
    with pytest.raises(SchemaBehind):
        migrations.ensure(backend)  # without --migrate: refused
    before, after = migrations.ensure(backend, migrate=True)
    assert (before.state, after.state) == (State.LEGACY, State.CURRENT)
    check_data_at_head(backend)


def test_a_database_the_old_create_all_brought_up_to_date_is_stamped_head(backend):
    """What every database made by the code before migrations looks like (create_all + the column stop-gap):
    the 0002 schema without alembic_version. It is stamped 0002 and upgraded to head."""
    run_revisions(backend, "0002")
    make_legacy(backend)
    assert migrations.status(backend).state is State.LEGACY
    migrations.upgrade(backend)
    assert migrations.status(backend).state is State.CURRENT
    with migrations.transaction(backend) as conn:
        assert migrations.differences(conn) == []


async def test_a_server_refuses_a_database_that_is_behind(backend):
    migrations.upgrade(backend, "0001")
    core = Core(Database(backend), parse_config(base_config()))
    try:
        with pytest.raises(SchemaBehind, match="at revision 0001"):
            await core.start()
    finally:
        core.db.close()
    assert migrations.status(backend).revision == "0001"  # untouched


def test_a_database_from_a_newer_queuechat_is_refused(backend):
    migrations.ensure(backend)
    with connect(backend) as conn:
        conn.execute(text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '9999'"))
        conn.commit()
    assert migrations.status(backend).state is State.AHEAD
    with pytest.raises(SchemaAhead, match="9999"):
        migrations.ensure(backend, migrate=True)
    with pytest.raises(SchemaAhead):
        migrations.upgrade(backend)


# --- locking and atomicity ---------------------------------------------------------------------------


def test_nodes_starting_together_migrate_once(backend):
    migrations.upgrade(backend, "0001")
    fill_0001(backend)
    start = threading.Barrier(4, timeout=30)
    results: list = []
    errors: list = []

    def node():
        try:
            start.wait()
            results.append(migrations.ensure(backend, migrate=True))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=node) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == []
    # One saw it behind and upgraded it; the others waited for the lock and found it current.
    assert sorted(before.state.value for before, _ in results) == ["behind", "current", "current", "current"]
    assert {after.state for _, after in results} == {State.CURRENT}
    check_data_at_head(backend)


def test_a_failing_upgrade_changes_nothing(backend):
    """0002 adds columns, then a table; if that table is in the way, the columns are not left behind either."""
    migrations.upgrade(backend, "0001")
    fill_0001(backend)
    with connect(backend) as conn:
        conn.execute(text("CREATE TABLE configured_account (x INTEGER)"))
        conn.commit()
    with pytest.raises(Exception, match="(?i)configured_account"):
        migrations.upgrade(backend)
    assert migrations.status(backend).revision == "0001"
    with connect(backend) as conn:
        assert "disabled" not in {c["name"] for c in inspect(conn).get_columns("agent")}


# --- the command line --------------------------------------------------------------------------------


def test_db_commands_on_sqlite(tmp_path, capsys):
    data = tmp_path / "data"
    url = sqlite_url(data)
    run_revisions(url, "0001")
    make_legacy(url)

    assert main(["db", "current", "--data-dir", str(data), "--check"]) == 1
    out = capsys.readouterr().out
    assert "from before queuechat had migrations" in out and f"run: queuechat db upgrade --data-dir {data}" in out

    assert main(["serve", "--config", str(ROOT / "config/demo.toml"), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"run: queuechat db upgrade --data-dir {data}" in err and "--migrate" in err

    assert main(["db", "upgrade", "--data-dir", str(data)]) == 0
    assert f"legacy -> {migrations.head()} (head)" in capsys.readouterr().out
    assert main(["db", "upgrade", "--data-dir", str(data)]) == 0
    assert "already at revision" in capsys.readouterr().out
    assert main(["db", "current", "--data-dir", str(data), "--check"]) == 0
    assert f"at revision {migrations.head()} (head)" in capsys.readouterr().out
    assert main(["db", "history", "--data-dir", str(data)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{migrations.head()} (head, current)") and lines[-1].startswith("0001 ")


def test_db_commands_do_not_make_a_database_by_looking(tmp_path, capsys):
    data = tmp_path / "nowhere"
    assert main(["db", "current", "--data-dir", str(data), "--check"]) == 1
    assert main(["db", "history", "--data-dir", str(data)]) == 0
    assert "no database at" in capsys.readouterr().out
    assert not data.exists()


def test_db_commands_on_postgresql(capsys):
    with pg_schema() as url:
        run_revisions(url, "0001")
        assert main(["db", "current", "--database-url", url, "--check"]) == 1
        assert "run: queuechat db upgrade --database-url " in capsys.readouterr().out
        assert main(["db", "upgrade", "--database-url", url]) == 0
        assert main(["db", "current", "--database-url", url, "--check"]) == 0


def test_the_command_to_run_never_shows_the_password(monkeypatch):
    url = "postgresql+psycopg://qc:s3cret@db.example:5432/chat"
    cmd = _upgrade_command(argparse.Namespace(database_url=url, data_dir="data"))
    assert "s3cret" not in cmd and "qc:***@db.example" in cmd
    monkeypatch.setenv("QUEUECHAT_DATABASE_URL", url)
    cmd = _upgrade_command(argparse.Namespace(database_url=url, data_dir="data"))
    assert "s3cret" not in cmd and cmd.startswith("queuechat db upgrade ")


async def test_serve_with_migrate_upgrades_a_legacy_data_dir_and_runs(tmp_path):
    """What scripts/serve does (--migrate) on a data dir from before migrations."""
    data = tmp_path / "data"
    url = sqlite_url(data)
    run_revisions(url, "0001")
    fill_0001(url)
    make_legacy(url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queuechat", "serve", "--config", str(ROOT / "config/demo.toml"),
        "--data-dir", str(data), "--listen", "127.0.0.1:0", "--web-listen", "", "--migrate",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines: list[str] = []

    async def listening() -> None:
        while line := (await proc.stderr.readline()).decode():
            lines.append(line)
            if re.search(r"gRPC listening on port \d+", line):
                return
        raise AssertionError("the server exited:\n" + "".join(lines))

    try:
        await asyncio.wait_for(listening(), 30)
    finally:
        proc.terminate()
        # Stopped as it sets up its signal handlers (after this line), it may die of the SIGTERM itself.
        assert await asyncio.wait_for(proc.wait(), 15) in (0, -signal.SIGTERM)
    log = "".join(lines)
    assert "stamped as revision 0001" in log
    revs = [r.revision for r in reversed(migrations.revisions())]  # oldest first
    for src, dst in zip(revs, revs[1:], strict=False):
        assert f"upgraded {src} -> {dst}" in log
    assert migrations.status(url).state is State.CURRENT


# --- for developers: the next revision ----------------------------------------------------------------


def test_db_revision_writes_the_next_revision(tmp_path, monkeypatch, capsys):
    """`queuechat db revision` autogenerates the revision after head against a scratch database; with the models
    unchanged it is empty."""
    copy = tmp_path / "migrations"
    shutil.copytree(migrations.SCRIPT_LOCATION, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(migrations, "SCRIPT_LOCATION", copy)
    migrations.script.cache_clear()
    try:
        head = migrations.head()
        following = f"{int(head) + 1:04d}"
        assert main(["db", "revision", "-m", "nothing yet"]) == 0
        written = sorted((copy / "versions").glob(f"{following}_*.py"))
        assert [p.name for p in written] == [f"{following}_nothing_yet.py"]
        source = written[0].read_text()
        compile(source, str(written[0]), "exec")
        assert re.search(rf"down_revision: str \| Sequence\[str\] \| None = [\"']{head}[\"']", source)
        assert "op." not in source  # models and revisions agree: nothing to do
    finally:
        migrations.script.cache_clear()
