"""Engine set-up and the transaction runner.

Every write runs on one writer thread, one transaction at a time: routing
decisions (who gets which offer, who has capacity) are serialized without
locks, and the event loop never waits on disk or on the network. Reads run
on a small pool of their own. Side effects (event fan-out, timers) are
queued on the transaction and run on the event loop only after commit, in
commit order.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Engine
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

    def after_commit(self, fn: Callable[[], Any]) -> None:
        """Run fn on the event loop once this transaction has committed."""
        self._after_commit.append(fn)


class Database:
    def __init__(self, url: str, *, readers: int = 2):
        self.url = url
        self.engine = make_engine(url)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="db-write")
        self._readers = ThreadPoolExecutor(readers, thread_name_prefix="db-read")

    def create_all(self) -> None:
        SQLModel.metadata.create_all(self.engine)

    def drop_all(self) -> None:
        SQLModel.metadata.drop_all(self.engine)

    async def write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(tx, *args) in its own transaction on the writer thread."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            with Session(self.engine, expire_on_commit=False) as session:
                tx = Tx(session)
                result = fn(tx, *args)
                session.commit()
            if tx._after_commit:
                # Scheduled from this thread, so effects reach the loop in commit order.
                loop.call_soon_threadsafe(_run_all, tx._after_commit)
            return result

        return await loop.run_in_executor(self._writer, run)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(session, *args) on a reader thread."""
        loop = asyncio.get_running_loop()

        def run() -> T:
            with Session(self.engine, expire_on_commit=False) as session:
                return fn(session, *args)

        return await loop.run_in_executor(self._readers, run)

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """A write outside the event loop (start-up, tools); after-commit effects are dropped."""
        with Session(self.engine, expire_on_commit=False) as session:
            tx = Tx(session)
            result = fn(tx, *args)
            session.commit()
            return result

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._readers.shutdown(wait=True)
        self.engine.dispose()


def _run_all(callbacks: list[Callable[[], Any]]) -> None:
    for cb in callbacks:
        cb()
