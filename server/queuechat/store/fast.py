"""Core statements run straight on the DB-API cursor, for the hot paths' statements on SQLite.

SQLAlchemy's `Connection.execute` of an already compiled, cached statement costs 15-20 us of Python
(execution context, parameter processing, the result proxy) around SQLite's own few microseconds, on
the writer thread, holding the GIL the event loop needs. A `Fast` statement is compiled once per
dialect and set of parameter names, with its parameters' order and type conversions worked out then;
each run is one `cursor.execute` with a tuple. The SQL is SQLAlchemy's, the text `Connection.execute`
would send, in the same connection and transaction, and the rows come back converted by the same
result types.

On PostgreSQL the round trip dominates and psycopg's conversions are wanted: `run` takes the ordinary
path there, and wherever the fast one cannot be sure to match it (expanding IN lists, a column
default only SQLAlchemy would fill in).
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Iterator
from operator import itemgetter
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError, MultipleResultsFound, NoResultFound
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable

Convert = Callable[[Any], Any] | None


class _Plan:
    __slots__ = ("sql", "slots", "values", "make", "results")

    def __init__(
        self, sql: str, slots: list[tuple[str | None, Any, Convert]], names: list[str], results: list[Convert]
    ):
        self.sql = sql
        # Per positional parameter: the caller's key (None for a value the statement carries), that
        # value, the type's conversion.
        self.slots = slots
        self.values = _values(slots)
        self.make = namedtuple("Row", names, rename=True)._make if names else None  # type: ignore[attr-defined]
        self.results = results if any(results) else None


def _values(slots: list[tuple[str | None, Any, Convert]]) -> Callable[[dict[str, Any]], tuple]:
    """params -> the positional values. Most statements take their parameters as given, and then one
    C-level itemgetter builds the tuple (a generator over the slots cost several microseconds a run)."""
    if slots and all(name is not None and conv is None for name, _, conv in slots):
        get = itemgetter(*(name for name, _, _ in slots))
        return get if len(slots) > 1 else lambda params: (get(params),)

    def values(params: dict[str, Any]) -> tuple:
        return tuple(
            fixed if name is None else (conv(params[name]) if conv else params[name]) for name, fixed, conv in slots
        )

    return values


class Result:
    """The part of SQLAlchemy's Result the hot paths use."""

    __slots__ = ("_rows", "rowcount")

    def __init__(self, rows: list[Any], rowcount: int):
        self._rows = rows
        self.rowcount = rowcount

    def first(self) -> Any:
        return self._rows[0] if self._rows else None

    def scalar(self) -> Any:
        return self._rows[0][0] if self._rows else None

    def all(self) -> list[Any]:
        return self._rows

    def one(self) -> Any:
        if len(self._rows) != 1:
            raise (NoResultFound if not self._rows else MultipleResultsFound)("expected one row")
        return self._rows[0]

    def scalar_one(self) -> Any:
        return self.one()[0]

    def scalars(self) -> Iterator[Any]:
        return (r[0] for r in self._rows)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._rows)


def connection(s: Session) -> Connection:
    """The session's connection for Core statements, with pending ORM changes flushed first, so both see
    one state (what autoflush does before an ORM query). About 0.4 us against 3 for `s.new or s.dirty or
    s.deleted` and `s.connection()`: a hot write runs some fifteen statements."""
    if not s._is_clean():  # flush()'s own test of whether there is anything to flush
        s.flush()
    tx = s._transaction
    held = s.info.get("fast_connection")
    # (A transaction a failed flush deactivated: s.connection() refuses it, as it must.)
    if held is not None and held[0] is tx and tx is not None and tx.is_active:
        return held[1]
    conn = s.connection()
    s.info["fast_connection"] = (s._transaction, conn)
    return conn


class Fast:
    """A Core statement with a fast path on SQLite (see the module's note)."""

    __slots__ = ("stmt", "_plans")

    def __init__(self, stmt: Any):  # a Core statement: select, insert, update, delete
        self.stmt = stmt
        self._plans: dict[tuple[str, tuple[str, ...]], _Plan | None] = {}

    def _plan(self, dialect: Dialect, keys: tuple[str, ...]) -> _Plan | None:
        if dialect.name != "sqlite" or dialect.paramstyle != "qmark":
            return None
        compiled: Any = self.stmt.compile(dialect=dialect, column_keys=list(keys))
        if compiled.positiontup is None or compiled.insert_prefetch or compiled.update_prefetch:
            return None  # (prefetch: column defaults SQLAlchemy computes at execution)
        slots: list[tuple[str | None, Any, Convert]] = []
        for name in compiled.positiontup:
            bind = compiled.binds[name]
            conv = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if bind.expanding:
                return None
            if bind.key in keys:
                slots.append((bind.key, None, conv))
            elif bind.callable is not None or bind.value is not None:
                value = bind.effective_value  # carried by the statement (`last_seq + 1`): converted once
                slots.append((None, conv(value) if conv else value, None))
            else:
                return None  # a parameter the caller left out: let SQLAlchemy say so
        names: list[str] = []
        results: list[Convert] = []
        columns = getattr(self.stmt, "exported_columns", None)  # what it selects or returns
        if columns is None:
            return None
        for key, column in columns.items():
            names.append(key)
            results.append(column.type.dialect_impl(dialect).result_processor(dialect, None))
        return _Plan(str(compiled), slots, names, results)

    def run(self, conn: Connection, params: dict[str, Any]) -> Any:
        """The statement's result: SQLAlchemy's, or on SQLite a `Result` of named tuples."""
        dialect = conn.dialect
        key = (dialect.name, tuple(params))
        try:
            plan = self._plans[key]
        except KeyError:
            plan = self._plans[key] = self._plan(dialect, key[1])
        if plan is None:
            return conn.execute(cast(Executable, self.stmt), params)
        values = plan.values(params)
        try:
            cursor = conn.connection.driver_connection.execute(plan.sql, values)  # type: ignore[union-attr]
        except dialect.loaded_dbapi.Error as e:
            # As SQLAlchemy raises it (IntegrityError and so on), for the callers and the writer's retries.
            raise DBAPIError.instance(plan.sql, values, e, dialect.loaded_dbapi.Error, dialect=dialect) from e
        if plan.make is None:
            return Result([], cursor.rowcount)
        rows = cursor.fetchall()
        if plan.results is not None:
            procs = plan.results
            rows = [[p(v) if p else v for p, v in zip(procs, r, strict=True)] for r in rows]
        make = plan.make
        return Result([make(r) for r in rows], cursor.rowcount)
