"""Engine set-up and the transaction runner.

Every write runs on one writer thread, one at a time: routing decisions (who
gets which offer, who has capacity) are serialized without locks, and the
event loop never waits on disk or on the network. Reads run on a small pool
of their own. Side effects (event fan-out, timers) are queued on the
transaction and run on the event loop only after commit, in commit order.

Group commit: writes that queue up while one runs go into one transaction,
committed once and reported back to the loop in one wake-up. If any of them
fails, the batch is rolled back and each write runs again on its own, so a
refusal only ever undoes its own write.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, SQLModel, create_engine

from . import models  # noqa: F401  (registers the tables)

T = TypeVar("T")


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
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=8)


class Tx:
    """The session of one write, plus what to do once it has committed."""

    __slots__ = ("session", "_after_commit")

    def __init__(self, session: Session):
        self.session = session
        self._after_commit: list[Callable[[], Any]] = []

    @property
    def conn(self) -> Connection:
        """The transaction's connection, for Core statements on hot paths: several times
        cheaper than the ORM. Pending ORM changes are flushed first, so both see one state."""
        s = self.session
        if s.new or s.dirty or s.deleted:
            s.flush()
        return s.connection()

    def after_commit(self, fn: Callable[[], Any]) -> None:
        """Run fn on the event loop once this transaction has committed."""
        self._after_commit.append(fn)


class Database:
    def __init__(self, url: str, *, readers: int = 2, max_batch: int = 64):
        self.url = url
        self.engine = make_engine(url)
        self.max_batch = max_batch
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write_loop, name="db-write", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-read")

    def create_all(self) -> None:
        SQLModel.metadata.create_all(self.engine)

    def drop_all(self) -> None:
        SQLModel.metadata.drop_all(self.engine)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(tx, *args) in a transaction on the writer thread."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._jobs.put((fn, args, loop, fut))
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
            if len(batch) == 1 or not self._run_batch(batch):
                for job in batch:
                    self._run_alone(job)

    def _run_batch(self, batch: list) -> bool:
        done = []
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                for fn, args, loop, fut in batch:
                    tx = Tx(session)
                    done.append((loop, fut, fn(tx, *args), tx._after_commit))
                session.commit()
        except BaseException:
            return False
        _deliver(done)
        return True

    def _run_alone(self, job: tuple) -> None:
        fn, args, loop, fut = job
        try:
            with Session(self.engine, expire_on_commit=False) as session:
                tx = Tx(session)
                result = fn(tx, *args)
                session.commit()
        except BaseException as e:
            _deliver([(loop, fut, e, None)])
        else:
            _deliver([(loop, fut, result, tx._after_commit)])

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(session, *args) on a reader thread."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            with Session(self.engine, expire_on_commit=False) as session:
                return fn(session, *args)

        return await loop.run_in_executor(self._readers, run)

    def close(self) -> None:
        self._jobs.put(None)
        self._writer.join()
        self._readers.shutdown(wait=True)
        self.engine.dispose()


def _deliver(done: list) -> None:
    """Hand results to their loops in commit order, with each write's effects first."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for loop, fut, outcome, effects in done:
        by_loop.setdefault(loop, []).append((fut, outcome, effects))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_complete, items)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass


def _complete(items: list) -> None:
    for fut, outcome, effects in items:
        if effects is None:
            if not fut.done():
                fut.set_exception(outcome)
            continue
        _run_all(effects)
        if not fut.done():
            fut.set_result(outcome)


def _run_all(callbacks: list[Callable[[], Any]]) -> None:
    for cb in callbacks:
        cb()
