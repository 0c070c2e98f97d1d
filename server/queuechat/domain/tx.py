"""The unit of work: one write's transaction, what it may read besides the
database, and every effect it may have.

A write is a plain function `fn(tx, *args)`. It reads and changes rows
through `tx.session` (or `tx.conn` on hot paths), reads settings, limits and
the time from `tx`, and records its effects on `tx`: publish an event,
arm a timer, mark a queue's positions changed, ask for routing, count or
observe a metric, log an event. Nothing is carried out before the transaction
commits, and nothing at all if it rolls back.

A write may run more than once: when a group commit fails, every write of
the batch runs again on its own, each with a fresh Tx. So a write touches
nothing outside its transaction: no globals, no caches, no I/O.

The effects are carried out by an `Effects` implementation: in-process today
(queuechat.local), cross-process in a cluster. Nothing here knows which.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection
from sqlmodel import Session

from ..config import Limits, Settings
from ..store.fast import connection as fast_connection

T = TypeVar("T")
Topic = tuple[str, str]
WriteFn = Callable[..., Any]
F = TypeVar("F", bound=Callable[..., Any])
EventCheck = Callable[[str, str, dict[str, Any]], None]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Context:
    """What a write may read besides the database, fixed for the write's run."""

    settings: Settings
    limits: Limits
    # Tests set this to parse every event payload with its chat.v1 message at write time.
    check_event: EventCheck | None = None


class Effects(Protocol):
    """What committed writes set in motion; each method is called after commit, in commit order."""

    def publish(self, topic: Topic, item: object) -> None:
        """Fan an event (or a signal) out to the streams subscribed to topic."""

    def schedule(self, when: datetime, fn: WriteFn, args: tuple[Any, ...]) -> None:
        """Run the write fn(tx, *args) at `when` (or soon after, if that is past)."""

    def queue_changed(self, queue_id: str) -> None:
        """Chats left the queue: waiting customers' positions may have moved."""

    def session_ended(self, session_id: str) -> None:
        """An agent session ended: forget its token, end its streams."""

    def settings_changed(self, settings: Settings) -> None:
        """Writes from now on see these settings."""

    def count(self, name: str, value: float, labels: dict[str, str]) -> None:
        """Add value to the event counter `name` (offers, messages, ...): a metric, if metrics are on."""

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        """Record one observation of `name` (offer-to-answer seconds, ...): a metric, if metrics are on."""

    def log(self, event: str, fields: dict[str, object]) -> None:
        """An event that matters (chat.started, offer.accepted, ...), for the log: ids as fields,
        never a secret or a message body."""


def routing_free(fn: F) -> F:
    """Marks a write that neither reads nor changes what routing decides on (offers, agents' presence,
    readiness and load, waiting chats): on PostgreSQL it runs without the cluster-wide routing lock.
    Every other write takes that lock first (runner.py), so routing is serialized across nodes."""
    fn.routing_free = True  # type: ignore[attr-defined]
    return fn


def locks_conversation(fn: F) -> F:
    """Marks a write whose second argument (after who) is the one conversation whose row it locks: on
    PostgreSQL a group commit locks all such rows of the batch first, in id order, so two nodes' batches
    never wait on each other in a cycle (a deadlock PostgreSQL takes a second to break)."""
    fn.locks_conversation = True  # type: ignore[attr-defined]
    return fn


class Writes(Protocol):
    """Runs a write: `await write(fn, *args)` is fn(tx, *args) in a transaction of its own."""

    async def __call__(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T: ...


class Reader(Protocol):
    """Runs a read: `await read(fn, *args)` is fn(session, *args) on a reader thread."""

    async def __call__(self, fn: Callable[..., T], *args: Any) -> T: ...


class Tx:
    """One write's transaction and its recorded effects."""

    __slots__ = ("session", "settings", "limits", "now", "check_event", "_effects", "_queues", "_dispatch", "_only")

    def __init__(self, session: Session, context: Context, now: datetime | None = None):
        self.session = session
        self.settings = context.settings
        self.limits = context.limits
        self.check_event = context.check_event
        # One clock reading per write: every row and event it stamps agrees.
        self.now = now or utcnow()
        self._effects: list[tuple[str, tuple[Any, ...]]] = []
        self._queues: set[str] = set()
        self._dispatch = False
        self._only: set[str] | None = set()  # the queues routing must look at (None: all of them)

    @property
    def conn(self) -> Connection:
        """The transaction's connection, for Core statements on hot paths: several times
        cheaper than the ORM. Pending ORM changes are flushed first, so both see one state."""
        return fast_connection(self.session)

    # --- effects, carried out after commit ---------------------------------

    def publish(self, topic: Topic, item: Hashable | object) -> None:
        self._effects.append(("publish", (topic, item)))

    def schedule(self, when: datetime, fn: WriteFn, *args: Any) -> None:
        self._effects.append(("schedule", (when, fn, args)))

    def queue_changed(self, queue_id: str) -> None:
        if queue_id not in self._queues:
            self._queues.add(queue_id)
            self._effects.append(("queue_changed", (queue_id,)))

    def session_ended(self, session_id: str) -> None:
        self._effects.append(("session_ended", (session_id,)))

    def settings_changed(self, settings: Settings) -> None:
        self._effects.append(("settings_changed", (settings,)))

    # Metrics and event logs are effects too: a rolled-back write counts and logs nothing,
    # and a rerun counts once.

    def count(self, name: str, value: float = 1, **labels: str) -> None:
        self._effects.append(("count", (name, value, labels)))

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._effects.append(("observe", (name, value, labels)))

    def log(self, event: str, **fields: object) -> None:
        self._effects.append(("log", (event, fields)))

    def needs_dispatch(self, queues: Iterable[str] | None = None) -> None:
        """Routing must run: the runner dispatches once, at the end of this same transaction (or of its
        group commit). `queues`: only these can have changed (a chat arrived in one, seats freed for agents
        serving them), so routing may look at them alone; without, it looks at every queue."""
        self._dispatch = True
        if queues is None:
            self._only = None
        elif self._only is not None:
            self._only.update(queues)

    @property
    def dispatch_queues(self) -> frozenset[str] | None:
        """The queues routing must look at, if only some (see needs_dispatch)."""
        return None if self._only is None else frozenset(self._only)

    @property
    def dispatch_needed(self) -> bool:
        return self._dispatch

    def take_dispatch(self) -> bool:
        """For the runner: whether to dispatch now (read dispatch_queues first for where); forgets the request."""
        needed, self._dispatch, self._only = self._dispatch, False, set()
        return needed

    @property
    def effects(self) -> tuple[tuple[str, tuple[Any, ...]], ...]:
        """What was recorded, in order (for tests and the runner)."""
        return tuple(self._effects)

    def carry_out(self, sink: Effects) -> Callable[[], list[BaseException]]:
        """A callable that applies the recorded effects to sink; each failure is caught and returned."""
        effects = self._effects

        def run() -> list[BaseException]:
            failures: list[BaseException] = []
            for name, args in effects:
                try:
                    getattr(sink, name)(*args)
                except Exception as e:  # one failed effect must not stop the others
                    failures.append(e)
            return failures

        return run
