"""A bare, synchronous harness for the domain: one write is one `Tx` on a temporary SQLite file,
run exactly as domain/runner.py runs it (fn, then dispatch if asked, then commit), without a
gRPC server, an event loop or the writer thread.

The clock is the harness's: every write runs at `bare.now` unless given `now=` (an explicit
time later than `bare.now` moves the clock on), so time-based rules (cool-down, offer expiry)
are deterministic. Scheduled timers are recorded, not run: `fire_due()` runs those whose time
has come, as the in-process effects would.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from harness import base_config, configure, load_drift
from sqlalchemy import text
from sqlmodel import Session, SQLModel, select

from queuechat.api.convert import check_payload
from queuechat.config import parse_config
from queuechat.domain import admin, agents, conversations, routing
from queuechat.domain.auth import Passwords
from queuechat.domain.read import agent_loads
from queuechat.domain.tx import Context, Tx
from queuechat.domain.views import AgentPrincipal, CustomerPrincipal
from queuechat.store.db import make_engine
from queuechat.store.models import AgentSession, Offer

T0 = datetime(2030, 1, 1, 9, 0, 0, tzinfo=UTC)
Effects = tuple[tuple[str, tuple[Any, ...]], ...]
_templates: dict[str, Path] = {}


class Bare:
    def __init__(
        self,
        path: str | Path,
        *,
        max_chats: dict[str, int] | None = None,
        check_events: bool = True,
        **sections: Any,
    ):
        """`path` is the SQLite file; `max_chats` and `sections` (settings={...}, ...) adjust base_config()."""
        doc = base_config()
        doc["security"].update({"argon2_time_cost": 1, "argon2_memory_kib": 1024})
        configure(doc, max_chats=max_chats, **sections)
        self.config = parse_config(doc)
        self.settings = self.config.settings
        self.context = Context(self.config.settings, self.config.limits, check_payload if check_events else None)
        self.passwords = Passwords(self.config.argon2_time_cost, self.config.argon2_memory_kib)
        self.now = T0
        # Check each one-queue dispatch against the whole-dispatch path (see run); off where a test counts
        # routing's reads.
        self.compare_paths = True
        # (when, fn, args) of every timer a committed write armed, in order.
        self.timers: list[tuple[datetime, Callable[..., Any], tuple[Any, ...]]] = []
        # A configured database is made once per configuration and copied: create_all and the
        # password hashes cost more than most tests.
        key = json.dumps(doc, sort_keys=True)
        template = _templates.get(key)
        if template is None:
            template = Path(tempfile.mkdtemp(prefix="queuechat-bare-")) / "template.db"
            self.engine = make_engine(f"sqlite:///{template}")
            SQLModel.metadata.create_all(self.engine)
            with Session(self.engine) as s:
                stored = admin.stored_hashes(s)
            self.run(admin.apply_config, self.config, admin.resolve_hashes(self.passwords, self.config, stored))
            self.timers.clear()
            with self.engine.connect() as c:
                c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
            self.engine.dispose()
            _templates[key] = template
            atexit.register(shutil.rmtree, template.parent, True)
        shutil.copyfile(template, path)
        self.engine = make_engine(f"sqlite:///{path}")

    def close(self) -> None:
        with self.engine.connect() as conn:
            drift = load_drift(conn)
        self.engine.dispose()
        assert not drift, f"agent.load differs from the rows it counts (id, kept, counted): {drift}"

    # --- the clock ---------------------------------------------------------

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now

    # --- writes and reads --------------------------------------------------

    def run(self, fn: Callable[..., Any], *args: Any, now: datetime | None = None) -> tuple[Any, Effects]:
        """Run the write fn(tx, *args) as runner.Writer does; a ChatError rolls it back and propagates.

        It runs at `now` if given (which also moves the clock on to it, never back), else at `self.now`."""
        if now is None:
            now = self.now
        else:
            self.now = max(self.now, now)
        with Session(self.engine, expire_on_commit=False) as session:
            tx = Tx(session, self.context, now)
            result = fn(tx, *args)
            queues = tx.dispatch_queues
            if tx.take_dispatch():
                # One queue takes routing's reading-as-it-goes path: it must choose as the whole-dispatch
                # path would, which is tried first and undone (with a queue that does not exist beside it).
                expected = (
                    self._chosen_by_every_queue_path(session, queues, now)
                    if self.compare_paths and queues and len(queues) == 1
                    else None
                )
                routing.dispatch(tx, queues=queues)
                if expected is not None:
                    assert _pending_offers(session) == expected, "one queue's dispatch chose otherwise"
            session.commit()
        effects = tx.effects
        self.timers.extend(args for name, args in effects if name == "schedule")
        return result, effects

    def _chosen_by_every_queue_path(self, session: Session, queues: frozenset[str], now: datetime) -> set[tuple]:
        savepoint = session.begin_nested()
        try:
            routing.dispatch(Tx(session, self.context, now), queues=set(queues) | {"(no such queue)"})
            return _pending_offers(session)
        finally:
            savepoint.rollback()

    def write(self, fn: Callable[..., Any], *args: Any, now: datetime | None = None) -> Any:
        return self.run(fn, *args, now=now)[0]

    def read(self, fn: Callable[..., Any], *args: Any) -> Any:
        with Session(self.engine, expire_on_commit=False) as session:
            return fn(session, *args)

    def fire_due(self) -> int:
        """Run every recorded timer due by now, earliest first, each at `now` (as a timer that fires
        late would); timers armed by these writes run too if due. Returns how many ran."""
        ran = 0
        while True:
            due = sorted((t for t in self.timers if t[0] <= self.now), key=lambda t: t[0])
            if not due:
                return ran
            timer = due[0]
            self.timers.remove(timer)
            when, fn, args = timer
            self.run(fn, *args, now=self.now)
            ran += 1

    # --- helpers -----------------------------------------------------------

    def login(
        self, agent_id: str, profile: str = "both", *, ready: bool = True, now: datetime | None = None
    ) -> AgentPrincipal:
        view = self.write(agents.login, agent_id, profile, ready, f"token-{agent_id}-{uuid.uuid4().hex}", now=now)
        return AgentPrincipal(view.session_id, view.agent_id, view.profile_id)

    def agent(
        self, agent_id: str, profile: str = "both", *, ready: bool = True, now: datetime | None = None
    ) -> AgentPrincipal:
        """Log in and open the offer stream: eligible for offers (if ready)."""
        who = self.login(agent_id, profile, ready=ready, now=now)
        self.write(agents.stream_opened, who.session_id, now=now)
        return who

    def chat(self, queue: str = "sales", *, now: datetime | None = None) -> str:
        return self.write(conversations.start_chat, queue, "", {}, {}, now=now).id

    def customer(self, conversation_id: str) -> CustomerPrincipal:
        return CustomerPrincipal(conversation_id)

    def pending(
        self, conversation_id: str | None = None, agent_id: str | None = None, kind: str | None = None
    ) -> list[Offer]:
        """Pending offers, oldest first, optionally of one conversation, agent or kind."""

        def q(s: Session) -> list[Offer]:
            stmt = select(Offer).where(Offer.status == "pending")
            if conversation_id:
                stmt = stmt.where(Offer.conversation_id == conversation_id)
            if agent_id:
                stmt = stmt.where(Offer.agent_id == agent_id)
            if kind:
                stmt = stmt.where(Offer.kind == kind)
            return list(s.exec(stmt.order_by(Offer.created_at, Offer.id)).all())

        return self.read(q)

    def offered_to(self, conversation_id: str) -> str | None:
        """The agent the conversation's pending chat offer is for, if any."""
        offers = self.pending(conversation_id, kind="chat")
        assert len(offers) <= 1, offers
        return offers[0].agent_id if offers else None

    def offer(self, offer_id: str) -> Offer:
        return self.read(lambda s: s.get(Offer, offer_id))

    def session(self, session_id: str) -> AgentSession:
        return self.read(lambda s: s.get(AgentSession, session_id))

    def loads(self, agent_ids: list[str] | None = None) -> dict[str, int]:
        return self.read(agent_loads, agent_ids)

    def accept(self, who: AgentPrincipal, offer_id: str, *, now: datetime | None = None) -> Any:
        return self.write(routing.accept_offer, who, offer_id, now=now)

    def reject(self, who: AgentPrincipal, offer_id: str, *, now: datetime | None = None) -> None:
        self.write(routing.reject_offer, who, offer_id, now=now)


def _pending_offers(session: Session) -> set[tuple]:
    """Every pending offer: to whom (session, agent), for which conversation, of which kind."""
    rows = session.execute(
        text("SELECT session_id, agent_id, conversation_id, kind FROM offer WHERE status = 'pending'")
    )
    return {tuple(r) for r in rows}


def schedules(
    effects: Effects, fn: Callable[..., Any] | None = None
) -> list[tuple[datetime, Callable[..., Any], tuple[Any, ...]]]:
    return [args for name, args in effects if name == "schedule" and (fn is None or args[1] is fn)]
