"""Schema migrations: Alembic, run from code (there is no alembic.ini).

The revisions are in versions/: 0001 is the schema as create_all made it before there were
migrations; every change since is a revision. `env.py` is Alembic's environment; it runs on the
connection this module hands it. docs/operations.md tells the operator's side.

Every run is one transaction on one connection, and it holds a lock while it looks and changes:
a transaction-level advisory lock on PostgreSQL (one per schema), so nodes starting together do not
race (the first migrates, the others wait and find the schema current); BEGIN IMMEDIATE on SQLite.
PostgreSQL's DDL is transactional, and SQLite's is here too (pysqlite is told to leave BEGIN to
SQLAlchemy), so a failed upgrade leaves the database as it was. SQLite runs with foreign keys off,
as its ALTER TABLE procedure needs when batch mode copies a table; they are checked before commit.

The states a database can be in (`status`):

- empty: none of the tables: `ensure` creates the head schema. An empty database is not behind.
- legacy: tables but no alembic_version: made by create_all before there were migrations.
  `upgrade` stamps the revision it matches (`adopt`), then upgrades.
- behind: at an older revision: `upgrade` runs the revisions since.
- current: at head.
- ahead: at a revision this code does not know (a newer queuechat migrated it): refused.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import Script, ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool
from sqlmodel import SQLModel, create_engine
from sqlmodel.sql.sqltypes import AutoString, UTCDateTime

from .. import models  # noqa: F401  (registers the tables)

log = logging.getLogger(__name__)

SCRIPT_LOCATION = Path(__file__).parent
VERSION_TABLE = "alembic_version"
# pg_advisory_xact_lock(LOCK_CLASS, hashtext(schema)): one migration at a time per schema.
LOCK_CLASS = 0x5143  # "QC"


class State(Enum):
    EMPTY = "empty"
    LEGACY = "legacy"
    BEHIND = "behind"
    CURRENT = "current"
    AHEAD = "ahead"


@dataclass(frozen=True, slots=True)
class Status:
    state: State
    revision: str | None  # the database's; None when empty or legacy
    head: str

    def describe(self) -> str:
        if self.state is State.EMPTY:
            return f"empty (no queuechat tables); this queuechat's schema is revision {self.head}"
        if self.state is State.LEGACY:
            return (
                "from before queuechat had migrations (tables but no alembic_version); "
                f"this queuechat's schema is revision {self.head}"
            )
        if self.state is State.CURRENT:
            return f"at revision {self.revision} (head)"
        if self.state is State.BEHIND:
            return f"at revision {self.revision}; this queuechat's schema is revision {self.head}"
        return (
            f"at revision {self.revision}, which this queuechat does not know (its head is {self.head}): "
            "a newer queuechat migrated it"
        )


class SchemaError(Exception):
    """The database's schema is not the one this code runs on."""

    def __init__(self, status: Status):
        super().__init__(f"the database is {status.describe()}")
        self.status = status


class SchemaBehind(SchemaError):
    """Behind (or legacy): `queuechat db upgrade`, or serve --migrate, brings it up."""


class SchemaAhead(SchemaError):
    """Migrated by a newer queuechat: this code must not run on it."""


# --- Alembic set-up ---------------------------------------------------------------------------------


def alembic_config(connection: Connection | None = None) -> Config:
    """The Config env.py reads: script location in this package; the connection to run on, if any."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def script() -> ScriptDirectory:
    """The revisions (read once per process)."""
    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    rev = script().get_current_head()
    assert rev is not None, "no revisions in queuechat/store/migrations/versions"
    return rev


def revisions() -> list[Script]:
    """All revisions, newest first."""
    return list(script().walk_revisions())


def _render_item(type_: str, obj: Any, autogen_context: Any) -> str | bool:
    """Autogenerated revisions spell SQLModel's column types in plain SQLAlchemy (as 0001 does)."""
    if type_ == "type":
        if isinstance(obj, AutoString):
            return "sa.String()"
        if isinstance(obj, UTCDateTime):
            return "sa.DateTime(timezone=True)"
    return False


def _log_step(*, step: Any, **_: Any) -> None:
    if step.is_stamp:
        return
    src = ",".join(step.source_revision_ids) or "empty"
    dst = ",".join(step.destination_revision_ids) or "empty"
    doc = " ".join(step.up_revision.doc.split()) if step.up_revision is not None else ""
    log.info("database schema: %s %s -> %s (%s)", "upgraded" if step.is_upgrade else "downgraded", src, dst, doc)


def context_options(dialect: str) -> dict[str, Any]:
    """Options for Alembic's migration context: the same for migrating, autogenerating and comparing."""
    return {
        "target_metadata": SQLModel.metadata,
        # SQLite cannot ALTER most things: batch mode copies the table (plain ALTER where SQLite can).
        "render_as_batch": dialect == "sqlite",
        "compare_type": True,
        "compare_server_default": True,
        "render_item": _render_item,
        "version_table": VERSION_TABLE,
        "on_version_apply": _log_step,
    }


# --- connections --------------------------------------------------------------------------------------


def _engine(url: str) -> Engine:
    """An engine for one migration run (no pool: one connection, closed after)."""
    if not url.startswith("sqlite"):
        return create_engine(url, poolclass=NullPool)
    engine = create_engine(url, poolclass=NullPool, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite would commit before each DDL statement: take BEGIN/COMMIT from SQLAlchemy instead.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")  # as store.db's engine: it stays with the file
        # Off while tables may be copied (batch mode); checked before commit instead.
        cur.execute("PRAGMA foreign_keys=OFF")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # IMMEDIATE: take the write lock now, so that two processes never migrate one file together.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


_RAN_REVISIONS = "queuechat.ran_revisions"  # in Connection.info: revisions ran (tables may have been copied)


@contextlib.contextmanager
def transaction(url: str) -> Iterator[Connection]:
    """One connection in one transaction, holding the migration lock; commits if the block succeeds."""
    engine = _engine(url)
    try:
        with engine.connect() as conn, conn.begin():
            if conn.dialect.name == "postgresql":
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(:cls, hashtext(coalesce(current_schema(), '')))"),
                    {"cls": LOCK_CLASS},
                )
            yield conn
            if conn.dialect.name == "sqlite" and conn.info.pop(_RAN_REVISIONS, False):
                # Only then: on a big database the check reads every table that has a foreign key.
                broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"the migration broke foreign keys: {broken[:10]}")
    finally:
        engine.dispose()


# --- looking ----------------------------------------------------------------------------------------


def status_of(conn: Connection) -> Status:
    top = head()
    insp = inspect(conn)
    if not insp.has_table(VERSION_TABLE):
        ours = {t.name for t in SQLModel.metadata.sorted_tables}
        if ours.isdisjoint(insp.get_table_names()):
            return Status(State.EMPTY, None, top)
        return Status(State.LEGACY, None, top)
    heads = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_heads()
    if not heads:  # the table is there but empty (stamped down to base): as good as empty, if no tables
        ours = {t.name for t in SQLModel.metadata.sorted_tables}
        state = State.EMPTY if ours.isdisjoint(insp.get_table_names()) else State.LEGACY
        return Status(state, None, top)
    rev = heads[0]
    if len(heads) > 1:
        return Status(State.AHEAD, ",".join(heads), top)
    if rev == top:
        return Status(State.CURRENT, rev, top)
    try:
        known = script().get_revision(rev)
    except CommandError:
        known = None
    if known is None:
        return Status(State.AHEAD, rev, top)
    return Status(State.BEHIND, rev, top)


def status(url: str) -> Status:
    with transaction(url) as conn:
        return status_of(conn)


def differences(conn: Connection) -> list[Any]:
    """What autogenerate would put in a new revision: the database against the models."""
    ctx = MigrationContext.configure(conn, opts=context_options(conn.dialect.name))
    diffs: list[Any] = compare_metadata(ctx, SQLModel.metadata)
    return diffs


# --- changing ---------------------------------------------------------------------------------------


def adopt(conn: Connection) -> str:
    """Stamp a legacy database (tables, no alembic_version) with the revision its schema is.

    Before migrations, create_all made the missing tables at every start, and from the hardening commit
    (263a211) on a stop-gap added missing columns too. So a database that has configured_account (a table
    that commit added) has all of 0002; one without it is 0001. (Older code's schema differed from 0001
    only by the attachment table, which create_all added at the next start.) No later revision can be a
    legacy database's: pre-migration code made none of them. upgrade_on then warns about any difference."""
    rev = "0002" if inspect(conn).has_table("configured_account") else "0001"
    command.stamp(alembic_config(conn), rev)
    log.info("database schema: made before migrations; stamped as revision %s", rev)
    return rev


def upgrade_on(conn: Connection, before: Status, target: str = "head") -> None:
    if before.state is State.AHEAD:
        raise SchemaAhead(before)
    legacy = before.state is State.LEGACY
    if legacy:
        adopt(conn)
    conn.info[_RAN_REVISIONS] = True
    command.upgrade(alembic_config(conn), target)
    if legacy:
        for diff in differences(conn):
            log.warning(
                "database schema: after adopting a pre-migration database, it differs from the models: %s", diff
            )


def create_on(conn: Connection) -> None:
    """An empty database gets the models' tables and is stamped head, as Alembic's cookbook
    ("Building an up to date database from scratch") has it: the same schema as running every revision
    (tests/test_migrations.py checks that they agree) at a third of the cost."""
    SQLModel.metadata.create_all(conn)
    MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).stamp(script(), "head")
    log.info("database schema: created at revision %s", head())


def ensure(url: str, *, migrate: bool = False) -> tuple[Status, Status]:
    """What a server does at start: (status before, status after).

    Current: nothing. Empty: create the head schema. Behind or legacy: upgrade if `migrate`, else
    SchemaBehind. Ahead: SchemaAhead."""
    with transaction(url) as conn:
        before = status_of(conn)
        if before.state is State.CURRENT:
            return before, before
        if before.state is State.AHEAD:
            raise SchemaAhead(before)
        if before.state is State.EMPTY:
            create_on(conn)
        elif migrate:
            upgrade_on(conn, before)
        else:
            raise SchemaBehind(before)
        return before, status_of(conn)


def upgrade(url: str, target: str = "head") -> tuple[Status, Status]:
    """`queuechat db upgrade`: (status before, status after). An empty database is created (at head), or
    upgraded revision by revision if a target is named."""
    with transaction(url) as conn:
        before = status_of(conn)
        if before.state is State.EMPTY and target == "head":
            create_on(conn)
        elif before.state is not State.CURRENT or target != "head":
            upgrade_on(conn, before, target)
        return before, status_of(conn)


def downgrade(url: str, target: str) -> None:
    """Run revisions' downgrade() back to `target` (for tests and developers; no command runs it)."""
    with transaction(url) as conn:
        conn.info[_RAN_REVISIONS] = True
        command.downgrade(alembic_config(conn), target)


def new_revision(message: str, url: str) -> Script | None:
    """Autogenerate the next revision (0003, ...) into versions/: the models against a database that the
    revisions brought to head (`url`: empty, or at head; `queuechat db revision` uses a scratch SQLite file).
    Review what it wrote: autogenerate misses some changes (a renamed column is a drop and an add)."""
    with transaction(url) as conn:
        before = status_of(conn)
        if before.state is State.EMPTY:
            upgrade_on(conn, before)  # the revisions themselves, not create_all: that would find nothing new
        elif before.state is not State.CURRENT:
            raise SchemaBehind(before)
        rev_id = f"{max(int(s.revision) for s in revisions()) + 1:04d}"
        made = command.revision(alembic_config(conn), message=message, autogenerate=True, rev_id=rev_id)
    script.cache_clear()
    assert made is None or isinstance(made, Script)
    return made
