"""A node of a cluster: several processes on one PostgreSQL database, with NATS as the doorbell.

The database stays the source of truth. After a commit a node delivers the
write's events to its own streams and publishes them on NATS; the other nodes
hand them to theirs. NATS is at-most-once, so nothing depends on it arriving:

- a stream delivers by seq and reads a gap from the database (domain/streams.py);
- the reconciler compares, every few seconds and on every NATS reconnect,
  the highest seq this node has seen on each open stream's topic with the
  database, and tells streams that are behind to catch up (a `Behind` item);
- timers are also swept from the database (agents.sweep), and presence is a
  lease each node renews (agents.renew_leases).

So a lost notification, a NATS outage or a node that died between commit and
publish delays an event by a reconcile interval at most, and loses nothing.

Messages are JSON, batched per event-loop turn:
    {"n": node id, "i": [item, ...]}
with items ev (conversation event), fe (offer-feed event), ty (typing), rs (a read cursor moved),
se (session ended: its streams end), sx (forget a session's cached token),
qc (a queue's waiting positions changed), st (settings changed: reload).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import uuid
from collections.abc import Callable, Hashable, Iterable
from datetime import datetime
from typing import Any

from .bus import Bus
from .config import Settings
from .domain.log import conv_topic, feed_topic
from .domain.views import Behind, EventView, FeedEventView, ParticipantView, ReadSignal, SessionEnded, TypingView
from .effects import LocalEffects

log = logging.getLogger(__name__)
Topic = tuple[str, str]


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


# --- items on the wire ------------------------------------------------------------------------------


def encode(item: object) -> dict[str, Any] | None:
    """An item for the other nodes; None for what each node works out for itself (queue positions)."""
    if isinstance(item, EventView):
        return {
            "k": "ev",
            "c": item.conversation_id,
            "s": item.seq,
            "t": item.kind,
            "v": item.visibility,
            "at": item.created_at.isoformat(),
            "p": item.payload,
        }
    if isinstance(item, FeedEventView):
        return {"k": "fe", "sid": item.session_id, "s": item.seq, "t": item.kind, "at": item.created_at.isoformat(),
                "p": item.payload}  # fmt: skip
    if isinstance(item, TypingView):
        p = item.participant
        return {"k": "ty", "c": item.conversation_id, "pk": p.kind, "pa": p.agent_id, "pn": p.display_name,
                "y": item.typing, "pr": item.private, "x": item.expires_at.isoformat()}  # fmt: skip
    if isinstance(item, ReadSignal):
        p = item.participant
        return {"k": "rs", "c": item.conversation_id, "pk": p.kind, "pa": p.agent_id, "pn": p.display_name,
                "s": item.seq, "at": item.read_at.isoformat(), "ps": item.public_seq,
                "pat": item.public_read_at.isoformat(), "pm": item.public_moved}  # fmt: skip
    if isinstance(item, SessionEnded):
        return {"k": "se", "sid": item.session_id}
    return None


def decode(d: dict[str, Any]) -> tuple[Topic, object] | None:
    k = d.get("k")
    if k == "ev":
        ev = EventView(d["c"], int(d["s"]), d["t"], d["v"], datetime.fromisoformat(d["at"]), d["p"])
        return conv_topic(ev.conversation_id), ev
    if k == "fe":
        fe = FeedEventView(d["sid"], int(d["s"]), d["t"], datetime.fromisoformat(d["at"]), d["p"])
        return feed_topic(fe.session_id), fe
    if k == "ty":
        who = ParticipantView(d["pk"], d["pa"], d["pn"])
        ty = TypingView(d["c"], who, bool(d["y"]), bool(d["pr"]), datetime.fromisoformat(d["x"]))
        return conv_topic(ty.conversation_id), ty
    if k == "rs":
        who = ParticipantView(d["pk"], d["pa"], d["pn"])
        at, pat = datetime.fromisoformat(d["at"]), datetime.fromisoformat(d["pat"])
        rs = ReadSignal(d["c"], who, int(d["s"]), at, int(d["ps"]), pat, bool(d["pm"]))
        return conv_topic(rs.conversation_id), rs
    if k == "se":
        return feed_topic(d["sid"]), SessionEnded(d["sid"])
    return None


# --- the NATS connection ------------------------------------------------------------------------------


class NatsLink:
    """One NATS connection: publishes this node's items (one message per loop turn) and hands the other
    nodes' to `on_items`. Connects in the background and keeps reconnecting: while NATS is away the node
    serves on, its streams caught up by the reconciler."""

    def __init__(
        self,
        url: str,
        node_id: str,
        on_items: Callable[[list[dict[str, Any]]], None],
        on_reconnect: Callable[[], None],
    ):
        self.url = url
        self.node_id = node_id
        self._on_items = on_items
        self._on_reconnect = on_reconnect
        self._nc: Any = None
        self._subject = ""
        self._out: list[dict[str, Any]] = []
        self._flush_at: asyncio.Handle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self.connected = asyncio.Event()
        self._closing = False
        # Not the node id: two nodes given the same id by mistake must still hear each other.
        self._instance = uuid.uuid4().hex
        self.sent = self.received = self.dropped = 0

    async def start(self, cluster_id: str, wait: float = 5.0) -> None:
        """Subscribe to the cluster's subject; waits up to `wait` seconds, then goes on connecting behind."""
        self._subject = f"queuechat.{cluster_id}.events"
        self._connecting = asyncio.get_running_loop().create_task(self._connect())
        try:
            await asyncio.wait_for(asyncio.shield(self.connected.wait()), wait)
        except TimeoutError:
            log.warning("cluster: NATS at %s not reachable yet; serving, and connecting in the background", self.url)

    async def _connect(self) -> None:
        import nats

        delay = 0.5
        while self._nc is None:
            try:
                nc = await nats.connect(
                    [u.strip() for u in self.url.split(",") if u.strip()],  # a NATS cluster: any of its servers
                    name=f"queuechat {self.node_id}",
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    ping_interval=5,
                    max_outstanding_pings=2,
                    disconnected_cb=self._disconnected,
                    reconnected_cb=self._reconnected,
                    error_cb=self._error,
                )
            except Exception as e:
                log.warning("cluster: cannot connect to NATS at %s (%s); retrying", self.url, e)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            try:
                await nc.subscribe(self._subject, cb=self._on_message)
            except Exception as e:  # the connection went at once: start over
                log.warning("cluster: cannot subscribe on NATS (%s); retrying", e)
                with contextlib.suppress(Exception):
                    await nc.close()
                await asyncio.sleep(delay)
                continue
            self._nc = nc
            self.connected.set()
            log.info("cluster: connected to NATS at %s, subject %s", self.url, self._subject)
            self._on_reconnect()  # anything published before this is caught up from the database

    async def _disconnected(self) -> None:
        self.connected.clear()
        if self._closing:
            return
        log.warning("cluster: NATS connection lost; reconnecting (streams catch up from the database)")

    async def _reconnected(self) -> None:
        self.connected.set()
        log.info("cluster: NATS reconnected")
        self._on_reconnect()

    async def _error(self, e: Exception) -> None:
        log.debug("cluster: NATS error: %s", e)

    def send(self, item: dict[str, Any]) -> None:
        self._out.append(item)
        if self._flush_at is None:
            self._flush_at = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_at = None
        items, self._out = self._out, []
        if self._nc is None or not items:
            self.dropped += len(items)  # not connected yet: the reconciler covers them
            return
        limit = max(1024, int(getattr(self._nc, "max_payload", 0) or 1024 * 1024) - 256)
        for batch in _split(items, limit):
            payload = json.dumps({"n": self._instance, "i": batch}, separators=(",", ":")).encode()
            task = asyncio.get_running_loop().create_task(self._publish(payload, len(batch)))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)

    async def _publish(self, payload: bytes, n: int) -> None:
        try:
            await self._nc.publish(self._subject, payload)
            self.sent += n
        except Exception as e:  # disconnected, buffer full: at-most-once, the reconciler catches up
            self.dropped += n
            log.warning("cluster: %d items not published on NATS (%s); streams catch up from the database", n, e)

    async def _on_message(self, msg: Any) -> None:
        try:
            data = json.loads(msg.data)
            if data.get("n") == self._instance:
                return
            items = data["i"]
            self.received += len(items)
            self._on_items(items)
        except Exception:
            log.exception("cluster: a message from NATS could not be handled")

    async def stop(self) -> None:
        self._closing = True
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush()
        if self._sends:
            await asyncio.gather(*self._sends, return_exceptions=True)
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        if self._nc is not None:
            try:
                await self._nc.drain()
            except Exception:
                await self._nc.close()


def _split(items: list[dict[str, Any]], limit: int) -> Iterable[list[dict[str, Any]]]:
    """Batches whose JSON stays under NATS's max_payload (one item over it goes alone: NATS refuses it, and
    the reconciler delivers it from the database)."""
    batch: list[dict[str, Any]] = []
    size = 0
    for item in items:
        n = len(json.dumps(item, separators=(",", ":"))) + 1
        if batch and size + n > limit:
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += n
    if batch:
        yield batch


# --- effects: the local ones, and the other nodes told ----------------------------------------------


class ClusterEffects(LocalEffects):
    """LocalEffects, and every effect other nodes must see goes out over NATS too."""

    link: NatsLink
    reconciler: Reconciler

    def publish(self, topic: tuple[str, str], item: object) -> None:
        super().publish(topic, item)
        if isinstance(item, EventView | FeedEventView):
            self.reconciler.saw(topic, item.seq)
        out = encode(item)
        if out is not None:
            self.link.send(out)

    def queue_changed(self, queue_id: str) -> None:
        super().queue_changed(queue_id)
        self.link.send({"k": "qc", "q": queue_id})

    def session_ended(self, session_id: str) -> None:
        super().session_ended(session_id)
        self.link.send({"k": "sx", "sid": session_id})

    def settings_changed(self, settings: Settings) -> None:
        super().settings_changed(settings)
        self.link.send({"k": "st"})


class Receiver:
    """The other nodes' items, handed to this node's bus and caches."""

    def __init__(
        self,
        bus: Bus,
        reconciler: Reconciler,
        *,
        on_queue_changed: Callable[[str], None],
        on_session_ended: Callable[[str], None],
        on_settings_changed: Callable[[], None],
    ):
        self._bus = bus
        self._reconciler = reconciler
        self._queue_changed = on_queue_changed
        self._session_ended = on_session_ended
        self._settings_changed = on_settings_changed

    def __call__(self, items: list[dict[str, Any]]) -> None:
        for d in items:
            k = d.get("k")
            if k == "qc":
                self._queue_changed(d["q"])
            elif k == "sx":
                self._session_ended(d["sid"])
            elif k == "st":
                self._settings_changed()
            else:
                key = d.get("c") or d.get("sid")
                if not self._bus.subscriber_count(("feed" if k in ("fe", "se") else "conv", key)):
                    continue  # nobody here watches it: not even worth decoding
                got = decode(d)
                if got is None:
                    continue
                topic, item = got
                if self._bus.subscriber_count(topic):
                    if isinstance(item, EventView | FeedEventView):
                        self._reconciler.saw(topic, item.seq)
                    self._bus.publish(topic, item)


class Reconciler:
    """Every few seconds (and on a NATS reconnect): for each topic this node's streams watch, compare the
    highest seq seen here with the database's, and send `Behind` to the streams of a topic that is behind.
    What NATS carries besides events is made good in the same round: a session that ended ends its streams
    here, and `also` (the node's settings reload and queue-position refresh) runs."""

    def __init__(
        self,
        bus: Bus,
        read_seqs: Callable[[list[str], list[str]], Any],
        interval: float,
        also: Callable[[], Any] | None = None,
    ):
        self._bus = bus
        # async (conversation ids, session ids) -> ({id: last_seq}, {id: feed_seq}, {ended session ids})
        self._read_seqs = read_seqs
        self._also = also
        self.interval = interval
        self.settle = min(0.2, interval / 4)
        self._highest: dict[Hashable, int] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.caught_up = 0  # topics found behind (a lost or late notification)
        self.rounds = 0

    def saw(self, topic: Hashable, seq: int) -> None:
        if seq > self._highest.get(topic, 0):
            self._highest[topic] = seq

    def seed(self, topic: Hashable, seq: int) -> None:
        """A stream here has read its backlog up to seq: where this topic stands, if nothing here knew yet.
        (Never raised by a later stream: an older one on the topic may be short of it.)"""
        self._highest.setdefault(topic, seq)

    def now(self) -> None:
        """Reconcile at once (NATS is back: what it dropped meanwhile is in the database)."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.interval)
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("cluster: reconciling streams failed; trying again")

    async def reconcile(self) -> int:
        if self._also is not None:
            await self._also()
        topics = [t for t in self._bus.topics() if isinstance(t, tuple) and t[0] in ("conv", "feed")]
        for gone in set(self._highest) - set(topics):
            del self._highest[gone]
        if not topics:
            return 0
        convs = [t[1] for t in topics if t[0] == "conv"]
        feeds = [t[1] for t in topics if t[0] == "feed"]
        conv_seqs, feed_seqs, ended = await self._read_seqs(convs, feeds)
        # Commits just read may still be on their way over NATS (a millisecond or so): give them a moment,
        # rather than send streams to the database for events that are arriving anyway.
        await asyncio.sleep(self.settle)
        for session_id in ended:  # its end's notification was lost: its streams here end now
            self._bus.publish(("feed", session_id), SessionEnded(session_id))
        behind = 0
        for kind, seqs in (("conv", conv_seqs), ("feed", feed_seqs)):
            for key, seq in seqs.items():
                topic = (kind, key)
                known = self._highest.get(topic)
                if seq > (known or 0):
                    self._highest[topic] = seq
                    self._bus.publish(topic, Behind(topic, seq))
                    if known is not None:  # a topic's first round only learns where it stands: not a catch-up
                        behind += 1
        self.rounds += 1
        self.caught_up += behind
        return behind


def chunks(ids: Iterable[str], size: int = 500) -> Iterable[list[str]]:
    batch: list[str] = []
    for i in ids:
        batch.append(i)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
