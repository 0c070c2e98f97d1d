"""Engine set-up and the transaction runner.

Every write runs on one writer thread, one at a time: routing decisions (who
gets which offer, who has capacity) are serialized without locks, and the
event loop never waits on disk or on the network. Reads run on a small pool
of their own.

A write is a named job: job(session) returns its result and what to do once
it has committed (the domain's recorded effects). Those run on the event
loop, in commit order, before the caller is told; one that fails is logged
under the write's name and never leaves another caller waiting.

Group commit: writes that queue up while one runs go into one transaction,
committed once and reported back to the loop in one wake-up. If any of them
fails, the batch is rolled back and each job runs again on its own, so a
refusal only ever undoes its own write. Jobs must therefore be safe to run
twice: they touch nothing outside their transaction.

Work that many writes of a batch would each do at their end (routing after
every arrival and every freed seat) can be done once: a job of a batch
registers a finisher (`defer(session, key, fn)`), and the batch runs each
key's finisher once after its last job, in the same transaction. A job that
runs alone is told so (`batched(session)` is false) and does the work itself.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import bindparam, event
from sqlalchemy import text as sql_text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, SQLModel, col, create_engine, select

from . import migrations, models  # noqa: F401  (models registers the tables)
from .checkpoint import Checkpointer

T = TypeVar("T")
log = logging.getLogger(__name__)

# What a committed write does next: run on the event loop, returns the failures it caught.
AfterCommit = Callable[[], list[BaseException]]
Job = Callable[[Session], tuple[T, AfterCommit | None]]


@dataclass(slots=True)
class WriteStats:
    """Per named write: how often it ran, failed, and how long it took (seconds, on the writer)."""

    count: int = 0
    failures: int = 0
    seconds: float = 0.0
    # Calls, and the seconds they waited queued before the writer took them up (a busy or blocked writer
    # shows here, not in `seconds`).
    calls: int = 0
    queued: float = 0.0


def sqlite_url(data_dir: str | os.PathLike) -> str:
    path = Path(data_dir)
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'queuechat.db'}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):  # pragma: no cover - exercised by every test
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL is durable across process crashes; an OS crash may lose the last commits.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            # Never checkpoint inside a commit: the writer would stall on it (store/checkpoint.py). A WAL file
            # that a burst made large is cut back to 64 MiB when it starts over.
            cur.execute("PRAGMA wal_autocheckpoint=0")
            cur.execute("PRAGMA journal_size_limit=67108864")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8)


def _pg_engines(url: str, readers: int) -> tuple[Engine, Engine]:
    """The writer's and the readers' engines on PostgreSQL, where every statement is a round trip.

    Neither pings a connection when it is checked out (a round trip per write group and per read);
    a connection the server dropped fails its statement instead, which the caller runs again on a fresh
    one (`disconnected`). Reads run in autocommit: under READ COMMITTED each statement takes its own
    snapshot whether or not a transaction wraps it, so BEGIN and ROLLBACK around a read buy nothing and
    cost two round trips. Reads take no locks (those are writes')."""
    writer = create_engine(url, pool_size=1, max_overflow=1)
    reader = create_engine(url, pool_size=readers, max_overflow=0, isolation_level="AUTOCOMMIT")
    return writer, reader


def disconnected(e: BaseException) -> bool:
    """Whether e is a connection the database dropped (restart, failover, idle timeout): the pool has
    been invalidated and a new attempt gets a fresh connection."""
    return bool(getattr(e, "connection_invalidated", False))


# SQLSTATEs a concurrent node can cause and a fresh attempt resolves: serialization failure, deadlock,
# unique violation (two nodes inserted the same key; the rerun finds the other's row and answers from it).
RETRYABLE = {"40001", "40P01", "23505"}
ATTEMPTS = 5
ROUTING_LOCK_CLASS = 0x51430001  # pg_advisory_xact_lock(class, schema): one routing lock per schema


# A finisher: fn(session) -> (what it did after commit or None); run once per key after a batch's last job.
Finisher = Callable[[Session], AfterCommit | None]


def batched(session: Session) -> bool:
    """Whether this job runs in a batch of several, so work deferred with defer() is done at its end."""
    return bool(session.info.get("batched"))


def defer(session: Session, key: str, fn: Finisher) -> None:
    """Run fn once, after the batch's last job, in the same transaction (the first job's fn for each key)."""
    session.info.setdefault("finishers", {}).setdefault(key, fn)


def _as_job(fn: Finisher) -> Job[None]:
    return lambda session: (None, fn(session))


def retryable(e: BaseException) -> bool:
    return getattr(getattr(e, "orig", None), "sqlstate", None) in RETRYABLE


def _pg_routing_lock(session: Session) -> None:
    """Take the cluster-wide routing lock for the rest of this transaction (once per transaction)."""
    if session.info.get("routing_locked"):
        return
    # What earlier writes of a group commit loaded may predate the lock holder's commit: read it afresh.
    session.flush()
    session.expire_all()
    session.connection().execute(
        sql_text("SELECT pg_advisory_xact_lock(:cls, hashtext(coalesce(current_schema(), '')))"),
        {"cls": ROUTING_LOCK_CLASS},
    )
    session.info["routing_locked"] = True


def _lock_conversations(session: Session, batch: list) -> None:
    """The conversation rows the batch's writes will lock, locked now in id order (PostgreSQL): batches of
    two nodes that touch the same conversations then queue instead of deadlocking."""
    ids = sorted({c for item in batch if isinstance(c := getattr(item[1], "conversation", None), str)})
    if len(ids) > 1:
        session.connection().execute(_LOCK_CONVERSATIONS, {"ids": ids})


# Built once: building and keying a statement per batch cost more than the round trip it makes.
_LOCK_CONVERSATIONS = (
    select(models.Conversation.id)
    .where(col(models.Conversation.id).in_(bindparam("ids", expanding=True)))
    .order_by(col(models.Conversation.id))
    .with_for_update()
)


def _checkpointer(engine: Engine, writer_lock: threading.Lock) -> Checkpointer | None:
    """SQLite's WAL checkpoints off the writer's commits (store/checkpoint.py), for a database in a file."""
    path = engine.url.database
    if engine.dialect.name != "sqlite" or not path or path == ":memory:" or path.startswith("file:"):
        return None
    return Checkpointer(os.path.abspath(path), writer_lock)  # as the driver resolves it, whatever the cwd later


class Database:
    def __init__(self, url: str, *, readers: int | None = None, max_batch: int = 64):
        self.url = url
        self.engine = make_engine(url)  # schema, tests, tools; reads and writes use their own below on PostgreSQL
        pg = self.engine.dialect.name == "postgresql"
        # SQLite has one process and one writer thread: routing is serialized already.
        self.routing_lock: Callable[[Session], None] | None = _pg_routing_lock if pg else None
        self.retries = 0  # writes that hit a concurrent node's conflict and ran again
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.stats: dict[str, WriteStats] = {}
        # Sizes of recent group commits (kept short: for metrics and benchmarks).
        self.batches: collections.deque[int] = collections.deque(maxlen=1024)
        # SQLite reads are CPU in this process: two threads. PostgreSQL's are round trips: more overlap well
        # (a cluster node's streams read what they missed from it).
        readers = readers or (8 if pg else 2)
        self._write_engine, self._read_engine = _pg_engines(url, readers) if pg else (self.engine, self.engine)
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-read")
        # Held by the writer around each transaction; SQLite's checkpointer takes it for a checkpoint's tail.
        self._write_lock = threading.Lock()
        self.checkpointer = _checkpointer(self.engine, self._write_lock)
        self._writer = threading.Thread(target=self._write_loop, name="db-write", daemon=True)
        self._writer.start()

    def ensure_schema(self, *, migrate: bool = False) -> None:
        """Make sure the schema is this code's (store/migrations): an empty database gets it, a current one
        is left alone. One that is behind (or made before migrations) is upgraded if `migrate`, else
        migrations.SchemaBehind; one a newer queuechat migrated: migrations.SchemaAhead."""
        migrations.ensure(self.url, migrate=migrate)

    def create_all(self) -> None:
        """ensure_schema(): the name from before migrations (an empty database is still created)."""
        self.ensure_schema()

    def drop_all(self) -> None:
        SQLModel.metadata.drop_all(self.engine)
        with self.engine.begin() as conn:
            conn.execute(sql_text(f"DROP TABLE IF EXISTS {migrations.VERSION_TABLE}"))

    async def transact(self, name: str, job: Job[T]) -> T:
        """Run a named job in a transaction on the writer thread; its after-commit part runs
        on this loop before the result is returned."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._jobs.put((name, job, loop, fut, time.perf_counter()))
        return await fut

    def _write_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)  # stop after this batch
                    break
                batch.append(job)
            if len(batch) == 1:
                self._run_alone(batch[0])
            elif not self._run_batch(batch):
                for job in batch:
                    self._run_alone((*job[:4], None))  # its wait was counted with the batch

    def _timed(self, name: str, job: Job[Any], session: Session) -> tuple[Any, AfterCommit | None]:
        t0 = time.perf_counter()
        try:
            return job(session)
        finally:
            st = self.stats.get(name) or self.stats.setdefault(name, WriteStats())
            st.count += 1
            st.seconds += time.perf_counter() - t0

    def _waited(self, batch: list) -> None:
        """Count how long the batch's calls waited for the writer (a rerun after a failed batch: not again)."""
        now = time.perf_counter()
        for item in batch:
            name, queued_at = item[0], item[4]
            if queued_at is not None:
                st = self.stats.get(name) or self.stats.setdefault(name, WriteStats())
                st.calls += 1
                st.queued += now - queued_at

    def _committed(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.committed()

    def _run_batch(self, batch: list) -> bool:
        done = []
        committing = False
        try:
            with self._write_lock, Session(self._write_engine, expire_on_commit=False) as session:
                if self.routing_lock is not None:
                    if any(getattr(item[1], "routing", False) for item in batch):
                        # Before any row lock of the batch: a node never holds a row while it waits for the lock.
                        self.routing_lock(session)
                    _lock_conversations(session, batch)
                session.info["batched"] = True
                self._waited(batch)
                for name, job, loop, fut, _ in batch:
                    result, after = self._timed(name, job, session)
                    done.append((name, loop, fut, result, after))
                # Their effects follow every job's in the batch, as their rows' seqs do.
                loop = batch[-1][2]
                finishers: dict[str, Finisher] = session.info.pop("finishers", {})
                for key, fn in finishers.items():
                    _, after = self._timed(key, _as_job(fn), session)
                    done.append((key, loop, None, None, after))
                session.flush()  # so that what fails from here on is the COMMIT itself
                committing = True
                session.commit()
            self._committed()
        except BaseException as e:
            if committing and disconnected(e):
                # The connection dropped during COMMIT: whether it took is unknown, so running the jobs
                # again could do them twice. Each caller gets the error (a retry with its request id is safe).
                _deliver([(name, loop, fut, e, _FAILED) for name, _, loop, fut, _ in batch])
                return True
            return False
        self.batches.append(len(batch))
        _deliver(done)
        return True

    def _run_alone(self, item: tuple) -> None:
        name, job, loop, fut, _ = item
        self._waited([item])
        for attempt in range(1, ATTEMPTS + 1):
            committing = False
            try:
                with self._write_lock, Session(self._write_engine, expire_on_commit=False) as session:
                    result, after = self._timed(name, job, session)
                    session.flush()
                    committing = True
                    session.commit()
                self._committed()
            except BaseException as e:
                # A dropped connection before COMMIT undid everything: run again on a fresh one.
                if attempt < ATTEMPTS and (retryable(e) or (disconnected(e) and not committing)):
                    self.retries += 1
                    time.sleep(0.002 * attempt)  # the other node's transaction is committing
                    continue
                self.stats.setdefault(name, WriteStats()).failures += 1
                _deliver([(name, loop, fut, e, _FAILED)])
                return
            self.batches.append(1)
            _deliver([(name, loop, fut, result, after)])
            return

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(session, *args) on a reader thread."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            try:
                with Session(self._read_engine, expire_on_commit=False) as session:
                    return fn(session, *args)
            except DBAPIError as e:
                if not disconnected(e):
                    raise
            with Session(self._read_engine, expire_on_commit=False) as session:  # a fresh connection
                return fn(session, *args)

        return await loop.run_in_executor(self._readers, run)

    def close(self) -> None:
        self._jobs.put(None)
        self._writer.join()
        self._readers.shutdown(wait=True)
        if self.checkpointer is not None:
            self.checkpointer.close()
        for engine in {self.engine, self._write_engine, self._read_engine}:
            engine.dispose()


_FAILED: Any = object()


def _deliver(done: list) -> None:
    """Hand results to their loops in commit order, with each write's effects first."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for name, loop, fut, outcome, after in done:
        by_loop.setdefault(loop, []).append((name, fut, outcome, after))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            loop.call_soon_threadsafe(_complete, items)


def _complete(items: list) -> None:
    for name, fut, outcome, after in items:
        if after is _FAILED:
            if fut is not None and not fut.done():
                fut.set_exception(outcome)
            continue
        if after is not None:
            try:
                failures = after()
            except Exception as e:  # pragma: no cover - after-commit parts catch their own
                failures = [e]
            for failure in failures:
                # Committed all the same: the caller gets its result; the lost effect is logged.
                log.error("after commit of write %s: an effect failed", name, exc_info=failure)
        if fut is not None and not fut.done():
            fut.set_result(outcome)
