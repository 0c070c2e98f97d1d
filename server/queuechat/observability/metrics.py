"""Prometheus metrics, served at /metrics (docs/operations.md lists them all).

Three sources:

- **Per RPC**, from the server interceptor (interceptor.py): the grpc-ecosystem series
  `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}` and the
  `grpc_server_handling_seconds` histogram, by grpc_type/grpc_service/grpc_method; open streams,
  refusals by reason and lagging streams cut off.
- **Events, counted after commit**: writes record `tx.count(...)` and `tx.observe(...)` (domain/tx.py);
  effects.LocalEffects hands them to `Metrics.count` and `Metrics.observe`. A rolled-back write
  counts nothing; a rerun counts once.
- **State, read at scrape time**: waiting chats and the longest wait per queue, agents by state,
  open conversations. A few aggregate queries on the reader pool, at most once per `max_age`
  (1 s): a scrape awaits `refresh()` on the event loop, then the collector (which prometheus_client
  calls synchronously) only reads the cached values. With nobody scraping, nothing is queried.
  Also read at scrape time, from memory: the store's per-write stats and group-commit sizes
  (Database.stats, Database.batches) and the rate limiter's refusals (Limiter.refusals).

Each server has its own registry (tests run several servers in one process).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlmodel import Session, col

from .. import gctune
from ..domain.read import agent_loads, connection, profile_queues
from ..domain.stats import LIVE_SESSIONS
from ..store.models import Conversation, Queue

if TYPE_CHECKING:
    from ..domain.core import Core
    from ..store.checkpoint import CheckpointStats

log = logging.getLogger(__name__)

# `_created` series double every counter's and histogram's series for little use.
disable_created_metrics()

RPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# grpc_type by (request streaming, response streaming), as go-grpc-prometheus names them.
GRPC_TYPES = {
    (False, False): "unary",
    (True, False): "client_stream",
    (False, True): "server_stream",
    (True, True): "bidi_stream",
}
AGENT_STATES = ("ready", "busy", "not_ready")
_WRITE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_ANSWER_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 300.0)
_WAIT_BUCKETS = (5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)


# --- state read at scrape time ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class State:
    """What the state gauges show, read in one read transaction."""

    queues: tuple[str, ...]
    waiting: dict[str, tuple[int, datetime | None]]  # queue -> (queued chats, oldest enqueued_at)
    open: dict[tuple[str, str], int]  # (queue, status) -> conversations, status queued | active
    agents: dict[tuple[str, str], int]  # (queue, state) -> live sessions whose profile holds the queue
    sessions: dict[str, int]  # state -> live sessions


def read_state(s: Session) -> State:
    """A few aggregate queries. Agent states are the supervisor's (domain/stats.py): busy has no free
    slot (open conversations and pending offers against max_chats, as routing counts them); ready is
    set ready with an offer stream open and a free slot: routing could offer it a chat now; not_ready
    is the rest (set not ready, or no offer stream)."""
    c = connection(s)
    queues = tuple(c.execute(select(col(Queue.id)).order_by(col(Queue.id))).scalars())
    waiting: dict[str, tuple[int, datetime | None]] = {}
    open_: dict[tuple[str, str], int] = {}
    for queue_id, status, n, oldest in c.execute(
        select(col(Conversation.queue_id), col(Conversation.status), func.count(), func.min(Conversation.enqueued_at))
        .where(col(Conversation.status).in_(("queued", "active")))
        .group_by(col(Conversation.queue_id), col(Conversation.status))
    ):
        open_[(queue_id, status)] = n
        if status == "queued":
            waiting[queue_id] = (n, oldest)
    agents: dict[tuple[str, str], int] = {}
    sessions: dict[str, int] = {}
    live = c.execute(LIVE_SESSIONS).all()
    if live:
        loads = agent_loads(s, {row[0] for row in live})
        pq = profile_queues(s)
        for agent_id, profile_id, ready, streams, max_chats in live:
            if loads.get(agent_id, 0) >= max_chats:
                state = "busy"
            elif ready and streams > 0:
                state = "ready"
            else:
                state = "not_ready"
            sessions[state] = sessions.get(state, 0) + 1
            for queue_id in pq.get(profile_id, ()):
                agents[(queue_id, state)] = agents.get((queue_id, state), 0) + 1
    return State(queues, waiting, open_, agents, sessions)


def _copy(items: Any) -> list[Any]:
    """A list of a dict's items or a deque that the writer thread may be changing meanwhile."""
    for _ in range(10):
        try:
            return list(items() if callable(items) else items)
        except RuntimeError:  # changed size during iteration: try again
            continue
    return []


class _Collector(Collector):
    """Builds the state and store series when scraped, from what `Metrics.refresh()` cached and from memory."""

    def __init__(self, metrics: Metrics):
        self.m = metrics

    def describe(self) -> Iterable[Metric]:
        return []  # series appear as found: no name clash to check at registration

    def collect(self) -> Iterable[Metric]:
        m = self.m
        st = m.state
        if st is not None:
            yield from _state_families(st, datetime.now(UTC))
        db = m.core.db
        seconds = SummaryMetricFamily(
            "queuechat_write_seconds",
            "Named writes: runs and seconds spent running them on the writer thread (a group commit's "
            "rolled-back run counts too). From Database.stats.",
            labels=["write"],
        )
        failures = CounterMetricFamily(
            "queuechat_write_failures", "Named writes that failed to commit (from Database.stats).", labels=["write"]
        )
        queued = SummaryMetricFamily(
            "queuechat_write_queue_seconds",
            "Named writes: calls and the seconds they waited for the writer thread before it ran them "
            "(from Database.stats).",
            labels=["write"],
        )
        for name, ws in sorted(_copy(db.stats.items)):
            seconds.add_metric([name], ws.count, ws.seconds)
            failures.add_metric([name], ws.failures)
            queued.add_metric([name], ws.calls, ws.queued)
        yield seconds
        yield failures
        yield queued
        batches = _copy(db.batches)
        size = GaugeMetricFamily(
            "queuechat_write_batch_size",
            f"Writes per group commit over the last {db.batches.maxlen} commits (from Database.batches), by stat: "
            "mean, p50, p90, p99, max.",
            labels=["stat"],
        )
        if batches:
            ordered = sorted(batches)
            size.add_metric(["mean"], sum(ordered) / len(ordered))
            for stat, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
                size.add_metric([stat], ordered[min(len(ordered) - 1, int(q * len(ordered)))])
            size.add_metric(["max"], ordered[-1])
        yield size
        refusals = CounterMetricFamily(
            "queuechat_rate_limit_refusals", "Calls refused by a rate limit, by limit.", labels=["limit"]
        )
        for limit, n in sorted(m.core.limiter.refusals.items()):
            refusals.add_metric([limit], n)
        yield refusals
        yield GaugeMetricFamily(
            "queuechat_timers_pending", "Timers armed (offer time-outs, grace periods).", m.core.effects.pending_timers
        )
        if (cp := db.checkpointer) is not None:
            cst = cp.stats
            runs = SummaryMetricFamily(
                "queuechat_sqlite_checkpoint_seconds",
                "WAL checkpoints run by the checkpointer thread (never by a commit), and their seconds.",
            )
            runs.add_metric([], cst.runs, cst.seconds)
            yield runs
            yield CounterMetricFamily(
                "queuechat_sqlite_checkpoint_tail_seconds",
                "Seconds checkpoints held the writer off to copy the pages committed while they ran.",
                value=cst.tail_seconds,
            )
            yield GaugeMetricFamily("queuechat_sqlite_wal_bytes", "The WAL file's size in bytes.", value=cp.wal_bytes())
            yield CounterMetricFamily(
                "queuechat_sqlite_checkpoint_failures",
                "WAL checkpoints that failed (tried again later).",
                value=cst.failures,
            )
            yield _wal_pages(cst)
        yield CounterMetricFamily(
            "queuechat_write_retries",
            "Writes run again after another node's conflict (deadlock, serialization failure, unique violation).",
            value=db.retries,
        )
        yield from _cluster_families(m.core)
        yield _gc_pauses()


def _wal_pages(st: CheckpointStats) -> Metric:
    family = GaugeMetricFamily(
        "queuechat_sqlite_wal_pages",
        "Pages in the WAL at the end of the last checkpoint (wal), and how many of them are in the database file "
        "(copied).",
        labels=["stat"],
    )
    family.add_metric(["wal"], st.wal_pages)
    family.add_metric(["copied"], st.copied_pages)
    return family


def _gc_pauses() -> Metric:
    family = HistogramMetricFamily(
        "queuechat_gc_pause_seconds",
        "Collections of Python's cyclic garbage collector that paused the process 1 ms or more, by "
        "generation (2: a full pass), and the seconds they took (gctune.py).",
        labels=["generation"],
    )
    for gen, counts in sorted(gctune.PAUSES.buckets.items()):
        total, buckets = 0, []
        for bound, n in zip((*map(str, gctune.BUCKETS), "+Inf"), counts, strict=True):
            total += n
            buckets.append((bound, total))
        family.add_metric([str(gen)], buckets, gctune.PAUSES.seconds[gen])
    return family


def _cluster_families(core: Core) -> Iterator[Metric]:
    """A cluster node's link to the others (nothing for the embedded single process)."""
    link, rec = core.link, core.reconciler
    if link is None:
        return
    node = GaugeMetricFamily("queuechat_cluster_node", "This node (value 1), by node id.", labels=["node"])
    node.add_metric([core.node_id], 1)
    yield node
    yield GaugeMetricFamily(
        "queuechat_cluster_nats_connected", "1 while NATS is connected.", 1 if link.connected.is_set() else 0
    )
    items = CounterMetricFamily(
        "queuechat_cluster_items",
        "Items (events, typing, session ends, ...) on NATS, by direction: sent, received, dropped (not sent: "
        "NATS was away; the reconciler covers them).",
        labels=["direction"],
    )
    for direction, n in (("sent", link.sent), ("received", link.received), ("dropped", link.dropped)):
        items.add_metric([direction], n)
    yield items
    yield CounterMetricFamily(
        "queuechat_cluster_streams_behind",
        "Topics the reconciler found behind the database and told their streams to catch up.",
        value=rec.caught_up,
    )


def _state_families(st: State, now: datetime) -> Iterator[Metric]:
    waiting = GaugeMetricFamily(
        "queuechat_queue_waiting", "Chats waiting in the queue (on offer or not).", labels=["queue"]
    )
    longest = GaugeMetricFamily(
        "queuechat_queue_longest_wait_seconds",
        "How long the queue's oldest waiting chat has waited (0 when none waits); a reject keeps its place.",
        labels=["queue"],
    )
    open_ = GaugeMetricFamily(
        "queuechat_conversations_open", "Conversations not closed, by queue and status.", labels=["queue", "status"]
    )
    agents = GaugeMetricFamily(
        "queuechat_agents",
        "Logged-in agents whose profile holds the queue, by state (ready, busy, not_ready).",
        labels=["queue", "state"],
    )
    for queue in st.queues:
        n, oldest = st.waiting.get(queue, (0, None))
        waiting.add_metric([queue], n)
        longest.add_metric([queue], max(0.0, (now - oldest).total_seconds()) if oldest is not None else 0.0)
        for status in ("queued", "active"):
            open_.add_metric([queue, status], st.open.get((queue, status), 0))
        for state in AGENT_STATES:
            agents.add_metric([queue, state], st.agents.get((queue, state), 0))
    sessions = GaugeMetricFamily("queuechat_agent_sessions", "Logged-in agents, by state.", labels=["state"])
    for state in AGENT_STATES:
        sessions.add_metric([state], st.sessions.get(state, 0))
    yield from (waiting, longest, open_, agents, sessions)


# --- the metrics of one server -------------------------------------------------------------------


class RpcMetrics:
    """One method's series, with their labels bound once (the interceptor calls these per RPC)."""

    __slots__ = ("_m", "_labels", "started", "_seconds", "_open", "_handled")

    def __init__(self, m: Metrics, grpc_type: str, service: str, method: str):
        self._m = m
        self._labels = (grpc_type, service, method)
        self.started = m.rpc_started.labels(*self._labels).inc
        self._seconds = m.rpc_seconds.labels(*self._labels)
        self._open = m.streams_open.labels(service, method) if grpc_type.endswith("stream") else None
        self._handled: dict[str, Any] = {"OK": m.rpc_handled.labels(*self._labels, "OK")}

    def opened(self) -> None:
        if self._open is not None:
            self._open.inc()

    def closed(self) -> None:
        if self._open is not None:
            self._open.dec()

    def handled(self, code: str, seconds: float) -> None:
        child = self._handled.get(code)
        if child is None:
            child = self._handled[code] = self._m.rpc_handled.labels(*self._labels, code)
        child.inc()
        self._seconds.observe(seconds)

    def refused(self, code: str, reason: str) -> None:
        _, service, method = self._labels
        self._m.rpc_refusals.labels(service, method, code, reason).inc()
        if reason == "STREAM_LAGGING":
            self._m.stream_lagging.labels(service, method).inc()


class Metrics:
    """All the metrics of one server, in their own registry; also the effects' metrics sink."""

    def __init__(self, core: Core, *, max_age: float = 1.0, refresh_timeout: float = 5.0):
        self.core = core
        self.max_age = max_age
        self.refresh_timeout = refresh_timeout
        self.registry = r = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        gctune.watch()  # for queuechat_gc_pause_seconds

        # Per RPC: the grpc-ecosystem names (go-grpc-prometheus), fed by interceptor.ServerObserver.
        self.rpc_started = Counter("grpc_server_started", "RPCs started on the server.", RPC_LABELS, registry=r)
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever the outcome, by status code (Go's spelling: OK, "
            "InvalidArgument, Canceled, ...).",
            (*RPC_LABELS, "grpc_code"),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Seconds from the start of an RPC to its end (a stream's whole life).",
            RPC_LABELS,
            registry=r,
        )
        self.streams_open = Gauge(
            "queuechat_streams_open",
            "Streaming RPCs open now, by method (StreamOffers, StreamConversation, downloads, ...).",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.stream_lagging = Counter(
            "queuechat_stream_lagging",
            "Streams cut off because their client read too slowly (UNAVAILABLE STREAM_LAGGING).",
            ("grpc_service", "grpc_method"),
            registry=r,
        )
        self.rpc_refusals = Counter(
            "queuechat_rpc_refusals",
            "RPCs that ended with an error status, by code and ErrorInfo reason.",
            ("grpc_service", "grpc_method", "grpc_code", "reason"),
            registry=r,
        )

        # Events, counted after commit (tx.count / tx.observe in the write paths).
        self._counters: dict[str, Counter] = {
            "offers": Counter(
                "queuechat_offers",
                "Offers ended, by outcome (accepted, rejected, timed_out, withdrawn) and kind (chat, invite).",
                ("outcome", "kind"),
                registry=r,
            ),
            "offers_made": Counter("queuechat_offers_made", "Offers made, by kind.", ("kind",), registry=r),
            "messages": Counter(
                "queuechat_messages",
                "Messages sent, by sender (customer, agent) and visibility (all, agents).",
                ("sender", "visibility"),
                registry=r,
            ),
            "attachments": Counter(
                "queuechat_attachments", "Files attached to sent messages, by sender.", ("sender",), registry=r
            ),
            "chats_started": Counter("queuechat_chats_started", "Chats started, by queue.", ("queue",), registry=r),
            "chats_closed": Counter("queuechat_chats_closed", "Chats closed, by queue.", ("queue",), registry=r),
            "ratings": Counter(
                "queuechat_ratings", "Customer ratings given, by queue and score (1-5).", ("queue", "score"), registry=r
            ),
        }
        self._histograms: dict[str, Histogram] = {
            "offer_answer_seconds": Histogram(
                "queuechat_offer_answer_seconds",
                "Seconds from an offer to its outcome, by outcome.",
                ("outcome",),
                buckets=_ANSWER_BUCKETS,
                registry=r,
            ),
            "chat_wait_seconds": Histogram(
                "queuechat_chat_wait_seconds",
                "Seconds a chat waited in the queue before an agent accepted it (its place, kept across rejects).",
                ("queue",),
                buckets=_WAIT_BUCKETS,
                registry=r,
            ),
        }
        self.write_latency = Histogram(
            "queuechat_write_latency_seconds",
            "Seconds a named write takes as its caller sees it: waiting for the writer thread, running, "
            "committing and its effects.",
            ("write",),
            buckets=_WRITE_BUCKETS,
            registry=r,
        )
        self._write_children: dict[str, Any] = {}
        self.refresh_errors = Counter(
            "queuechat_metrics_refresh_errors", "Scrapes whose state read failed (stale values shown).", registry=r
        )
        self.state: State | None = None
        self._state_at = float("-inf")
        self._lock = asyncio.Lock()
        r.register(_Collector(self))
        self._rpcs: dict[tuple[str, str, str], RpcMetrics] = {}

    # --- the effects' sink ----------------------------------------------------------------------

    def count(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._counters[name].labels(**labels).inc(value)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        self._histograms[name].labels(**labels).observe(value)

    # --- RPCs and writes ------------------------------------------------------------------------

    def known(self, services: Iterable[ServiceDescriptor]) -> None:
        """Start every method's series at 0, so that rates and alerts see them before their first call."""
        for service in services:
            for m in service.methods:
                self.rpc(GRPC_TYPES[(m.client_streaming, m.server_streaming)], service.full_name, m.name)

    def rpc(self, grpc_type: str, service: str, method: str) -> RpcMetrics:
        key = (grpc_type, service, method)
        found = self._rpcs.get(key)
        if found is None:
            found = self._rpcs[key] = RpcMetrics(self, grpc_type, service, method)
        return found

    def time_write(self, name: str) -> _Timer:
        child = self._write_children.get(name)
        if child is None:
            child = self._write_children[name] = self.write_latency.labels(name)
        return _Timer(child)

    # --- scrapes -------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the state if it is older than max_age; scrapes at the same time share one read.
        A failed read is logged and counted, and the last values stay."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            if loop.time() - self._state_at < self.max_age:
                return
            try:
                self.state = await asyncio.wait_for(self.core.db.read(read_state), self.refresh_timeout)
            except Exception:
                self.refresh_errors.inc()
                log.warning("metrics: reading the state failed", exc_info=True)
            self._state_at = loop.time()

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The registry in the format the Accept header asks for (Prometheus text or OpenMetrics)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    async def handle(self, request: web.Request) -> web.Response:
        """GET /metrics (here and, when asked, on the web port)."""
        await self.refresh()
        body, content_type = self.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def serve(self, listen: str) -> MetricsServer:
        """Serve GET /metrics on listen ("HOST:PORT", "[::]:PORT" or ":PORT"; port 0: any free port)."""
        host, sep, port = listen.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"metrics: expected HOST:PORT, got {listen!r}")
        app = web.Application()
        app.router.add_get("/metrics", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host.strip("[]") or None, int(port)).start()
        return MetricsServer(runner, runner.addresses[0][1])


@dataclass(slots=True)
class MetricsServer:
    runner: web.AppRunner
    port: int

    async def stop(self) -> None:
        await self.runner.cleanup()


class _Timer:
    __slots__ = ("_child", "_t0")

    def __init__(self, child: Any):
        self._child = child
        self._t0 = 0.0

    def __enter__(self) -> _Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._child.observe(time.perf_counter() - self._t0)
