"""A private PostgreSQL schema per test.

Each test gets a fresh schema ``qc_<random>`` in database ``test`` and a
SQLAlchemy URL whose every connection uses it (``options=-csearch_path=...``
passed through to psycopg), so tests never see each other's tables and can
run in parallel. The schema is dropped (CASCADE) afterwards.

Where PostgreSQL lives: QC_PG_HOST / QC_PG_PORT / QC_PG_DATABASE / QC_PG_USER
(defaults 127.0.0.1, 5432, test, and the first of $PGUSER, postgres, root that
can connect; trust auth). If it cannot be reached the test is skipped, except
when $CI is set: CI must have PostgreSQL, so there it is a failure.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import URL

HOST = os.environ.get("QC_PG_HOST", "127.0.0.1")
PORT = int(os.environ.get("QC_PG_PORT", "5432"))
DATABASE = os.environ.get("QC_PG_DATABASE", "test")
CONNECT_TIMEOUT = 5

_user: str | None = None
_unreachable: str | None = None


def _candidate_users() -> list[str]:
    users = [os.environ.get("QC_PG_USER"), os.environ.get("PGUSER"), "postgres", "root"]
    return list(dict.fromkeys(u for u in users if u))


def _connect(user: str):
    import psycopg

    return psycopg.connect(
        host=HOST, port=PORT, dbname=DATABASE, user=user, connect_timeout=CONNECT_TIMEOUT, autocommit=True
    )


def pg_user() -> str:
    """The user to connect as; skips (or fails on CI) if PostgreSQL is unreachable. Probed once per run."""
    global _user, _unreachable
    if _user is None and _unreachable is None:
        errors = []
        for user in _candidate_users():
            try:
                with _connect(user) as conn:
                    conn.execute("select 1")
                _user = user
                break
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                errors.append(f"as {user}: {' '.join(str(e).split())}")
        if _user is None:
            _unreachable = f"PostgreSQL at {HOST}:{PORT}/{DATABASE} is not reachable (" + "; ".join(errors) + ")"
    if _user is None:
        assert _unreachable is not None
        if os.environ.get("CI"):
            pytest.fail(f"{_unreachable}; CI must provide PostgreSQL", pytrace=False)
        pytest.skip(f"{_unreachable}; set QC_PG_HOST/QC_PG_PORT/QC_PG_USER or start PostgreSQL to run these tests")
    return _user


def schema_url(schema: str, user: str | None = None, **settings: str) -> str:
    """A SQLAlchemy URL on which every connection uses `schema` (plus any extra GUC settings, e.g. TimeZone)."""
    opts = " ".join(f"-c{k}={v}" for k, v in {"search_path": schema, **settings}.items())
    url = URL.create(
        "postgresql+psycopg",
        username=user or pg_user(),
        host=HOST,
        port=PORT,
        database=DATABASE,
        query={"options": opts},
    )
    # render_as_string URL-encodes the query ("=" and " " included).
    return url.render_as_string(hide_password=False)


def create_schema() -> str:
    schema = f"qc_{secrets.token_hex(6)}"
    with _connect(pg_user()) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    return schema


def drop_schema(schema: str) -> None:
    with _connect(pg_user()) as conn:
        # A connection still inside a transaction would block the drop: fail loudly instead of hanging.
        conn.execute("SET lock_timeout = '15s'")
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """Create a private schema, yield its URL, drop it afterwards."""
    schema = create_schema()
    try:
        yield schema_url(schema)
    finally:
        drop_schema(schema)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A database URL on a fresh, private PostgreSQL schema (skipped or, on CI, failed without PostgreSQL)."""
    with pg_schema() as url:
        yield url
