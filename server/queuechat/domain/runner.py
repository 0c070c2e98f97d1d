"""Runs named writes: `await writer(fn, *args)` runs fn(tx, *args) in one
transaction, dispatches once at its end if the write asked for routing, and
carries out its recorded effects after commit (see tx.py).

In a group commit (store/db.py) the writes that ask for routing share one
dispatch at the batch's end: under load the routing cost per chat falls as
batches grow, instead of every arrival and every freed seat paying for it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from sqlmodel import Session

from ..errors import ChatError
from ..store import Database
from ..store.db import batched, defer
from . import routing
from .tx import Context, Effects, Tx

T = TypeVar("T")
log = logging.getLogger(__name__)
# Wraps each run of a named write, given its name: a trace span, a latency timer (set by the server).
Around = Callable[[str], AbstractContextManager[object]]


def write_name(fn: Callable[..., Any]) -> str:
    """A write's name for logs and metrics: module.function, e.g. routing.accept_offer."""
    explicit = getattr(fn, "write_name", None)
    if isinstance(explicit, str):
        return explicit
    module = getattr(fn, "__module__", "") or ""
    return f"{module.rsplit('.', 1)[-1]}.{getattr(fn, '__name__', 'write')}"


_NONE: frozenset[str] = frozenset()


class Writer:
    def __init__(
        self, db: Database, context: Callable[[], Context], effects: Effects, around: Around | None = None
    ):
        self.db = db
        self.context = context
        self.effects = effects
        self.around = around
        # Several nodes may write to PostgreSQL at once: routing decisions are serialized by a lock.
        self._lock = db.routing_lock

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        name = write_name(fn)
        context = self.context()
        effects = self.effects
        lock = None if getattr(fn, "routing_free", False) else self._lock

        def job(session: Session) -> tuple[T, Callable[[], list[BaseException]]]:
            if lock is not None:
                lock(session)  # first: everything this write reads is then another node's committed state
            tx = Tx(session, context)  # a rerun starts afresh: nothing recorded
            result = fn(tx, *args, **kwargs)
            queues = tx.dispatch_queues
            if tx.take_dispatch():
                if batched(session):
                    # One dispatch for the batch, over the union of what its writes changed.
                    pending = session.info.get("dispatch", _NONE)
                    session.info["dispatch"] = None if queues is None or pending is None else pending | queues
                    defer(session, "routing.dispatch", dispatch_at_end)
                else:
                    routing.dispatch(tx, queues=queues)
            return result, tx.carry_out(effects)

        def dispatch_at_end(session: Session) -> Callable[[], list[BaseException]]:
            tx = Tx(session, context)
            routing.dispatch(tx, queues=session.info.pop("dispatch", None))
            return tx.carry_out(effects)

        job.routing = lock is not None  # type: ignore[attr-defined]  # group commit takes the lock first
        if getattr(fn, "locks_conversation", False) and len(args) > 1:
            job.conversation = args[1]  # type: ignore[attr-defined]  # locked in order with its batch's others

        try:
            if self.around is None:
                return await self.db.transact(name, job)
            with self.around(name):
                return await self.db.transact(name, job)
        except ChatError:
            raise  # a refusal: the caller's answer, not a failure
        except Exception:
            log.exception("write %s failed", name)
            raise


class Background:
    """Writes nobody awaits (timers, stream clean-up): failures are logged, stop() waits for them."""

    def __init__(self, write: Writer):
        self._write = write
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._run(fn, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            await self._write(fn, *args)
        except ChatError as e:
            log.warning("background write %s refused: %s", write_name(fn), e.reason)
        except Exception:
            pass  # logged by the writer with the write's name

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
