"""The chat core: a thin facade the three servicers call.

It owns the parts (writer, streams, attachments, positions, effects) and
their life cycle; every write it starts is a domain function of a
transaction (tx.py), run by the writer (runner.py). No domain module
imports this one.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlmodel import Session

from ..bus import Bus
from ..config import Config, Settings
from ..effects import LocalEffects
from ..errors import ChatError, Kind, denied, invalid, precondition, unauthenticated
from ..store import Database
from ..store.blobs import blob_store_for
from ..store.models import Admin, Agent, Conversation
from . import admin, agents, conversations, invites, ratings, receipts, routing, supervision
from .access import readable_conversation
from .attachments import Attachments
from .auth import (
    IdentityClaims,
    PasswordPool,
    Passwords,
    check_customer_token,
    customer_token,
    new_token,
    verify_identity_token,
)
from .log import agent_participant, conv_topic, customer_participant
from .positions import QueuePositions
from .ratelimit import Bucket, Limiter
from .read import conversation_view, is_participant, must_get
from .runner import Background, Writer
from .stats import QueueStats
from .streams import Streams
from .tx import Context, EventCheck, utcnow
from .views import (
    AdminPrincipal,
    AgentAccountView,
    AgentPrincipal,
    ConversationView,
    CustomerPrincipal,
    EventView,
    FeedEventView,
    Heartbeat,
    LiveConversationView,
    ParticipantView,
    PredefinedView,
    ProfileView,
    QueuePositionView,
    QueueView,
    RatingView,
    ReadCursorView,
    SessionView,
    StartedChat,
    Transcript,
    TypingView,
    WrapUpCodeView,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

# How long a checked agent token is trusted without a read. Ends of sessions evict at once (in a cluster
# through NATS, and each reconcile round reads which cached sessions ended, should a notification be lost),
# so the limit is for idleness: a sixtieth of the idle limit, within these bounds. A read per agent every
# 5 s came in bursts on PostgreSQL nodes (cross-node message p50 8-17 ms against 7-9 with 30 s).
_TOKEN_CACHE_SECONDS = (5.0, 30.0)
TYPING_EVERY = 1.0  # seconds between one sender's typing signals in a conversation (clients send every 2 s)
TYPING_SHOWN = 5.0  # seconds a typing indicator lasts unless renewed
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # as api/validate.py refuses in request fields
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

Who = AgentPrincipal | CustomerPrincipal


class Core:
    def __init__(
        self,
        db: Database,
        config: Config,
        files_dir: str | Path = "data/files",
        *,
        check_event: EventCheck | None = None,
        node_id: str | None = None,
        nats_url: str | None = None,
    ):
        """With nats_url this is one node of a cluster (PostgreSQL + NATS, cluster.py); without, the
        embedded single process. node_id names it in leases and logs (default: host-pid)."""
        from ..cluster import default_node_id

        self.db = db
        self.config = config
        self.node_id = node_id or default_node_id()
        self.nats_url = nats_url
        self.settings = config.settings
        self.limits = config.limits
        self.check_event = check_event
        self.bus = Bus(config.limits.subscriber_queue)
        self.passwords = Passwords(config.argon2_time_cost, config.argon2_memory_kib)
        self.password_pool = PasswordPool(self.passwords)
        self.limiter = Limiter(config.rate_limits)
        self.security = config.security
        self.token_secret = b""
        # token -> (principal, valid until): saves a read per call (_TOKEN_CACHE_SECONDS).
        self._agent_tokens: dict[str, tuple[AgentPrincipal, float]] = {}
        self.positions = QueuePositions(db.read, self.bus.publish)
        effects_type = LocalEffects if nats_url is None else _cluster().ClusterEffects
        self.effects = effects_type(
            self.bus,
            self._spawn,
            on_queue_changed=self.positions.mark,
            on_session_ended=self._forget_session,
            on_settings_changed=self._set_settings,
        )
        self.link: Any = None
        self.reconciler: Any = None
        if nats_url is not None:
            cluster = _cluster()
            self.reconciler = cluster.Reconciler(
                self.bus, self._stream_seqs, config.cluster.reconcile_interval, self._make_good
            )
            receiver = cluster.Receiver(
                self.bus,
                self.reconciler,
                on_queue_changed=self.positions.mark,
                on_session_ended=self._forget_session,
                on_settings_changed=self._reload_settings,
            )
            self.link = cluster.NatsLink(nats_url, self.node_id, receiver, self.reconciler.now)
            wired: Any = self.effects
            wired.link, wired.reconciler = self.link, self.reconciler
        self.write = Writer(db, self._context, self.effects)
        self.background = Background(self.write)
        self.read = db.read
        # Files beside SQLite; chunk rows in PostgreSQL, where a cluster's nodes share no disk.
        self.blobs = blob_store_for(db.engine, files_dir)
        self.attachments = Attachments(db.read, self.write, self.limits, self.blobs)
        self.streams = Streams(
            db.read,
            self.write,
            self._spawn,
            self.bus,
            self.positions,
            self.limits,
            self.node_id,
            config.cluster.lease_seconds,
        )
        if self.reconciler is not None:
            self.streams.caught_up = self.reconciler.seed
        self.stats = QueueStats(db.read, self.limits.heartbeat_interval, self.limits.service_level_target)
        self._sweeper: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[None]] = []
        self._typing = Bucket(1, TYPING_EVERY)  # per sender and conversation
        self._pending: set[asyncio.Task[Any]] = set()

    def _context(self) -> Context:
        return Context(self.settings, self.limits, self.check_event)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        self.background.spawn(fn, *args)

    def _set_settings(self, settings: Settings) -> None:
        self.settings = settings

    def _reload_settings(self) -> None:
        """Another node changed the settings: read them (the database has them; the message does not)."""

        async def reload() -> None:
            try:
                self.settings, _ = await self.db.read(admin.load_settings)
            except Exception:
                log.exception("cluster: reloading settings failed")

        self.background_task(reload())

    def background_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _stream_seqs(self, convs: list[str], feeds: list[str]) -> tuple[dict[str, int], dict[str, int], set[str]]:
        return await self.db.read(_stream_seqs, convs, feeds)

    async def _make_good(self) -> None:
        """Each reconcile round: what a lost broadcast would have done. Settings are read again (a change made
        on another node), cached agent tokens of sessions that ended are forgotten, and every watched queue's
        positions are refreshed (sent only where they moved)."""
        self.settings, _ = await self.db.read(admin.load_settings)
        cached = sorted({principal.session_id for principal, _ in self._agent_tokens.values()})
        for session_id in await self.db.read(agents.ended_among, cached) if cached else ():
            self._forget_session(session_id)  # its end's notification was lost
        for queue_id in self.positions.watched():
            self.positions.mark(queue_id)
        convs = [t[1] for t in self.bus.topics() if isinstance(t, tuple) and t[0] == "conv"]
        # Cursors moved in the last few rounds (with room for other machines' clocks): older ones were sent then.
        since = utcnow() - timedelta(seconds=3 * self.config.cluster.reconcile_interval + 5)
        for signal in await self.db.read(receipts.standing, convs, since):
            self.bus.publish(conv_topic(signal.conversation_id), signal)

    def _forget_session(self, session_id: str) -> None:
        for token in [t for t, (p, _) in self._agent_tokens.items() if p.session_id == session_id]:
            del self._agent_tokens[token]

    # --- life cycle --------------------------------------------------------

    async def start(self) -> None:
        # An empty database gets the schema; one that is behind raises SchemaBehind (serve --migrate upgrades first).
        await asyncio.get_running_loop().run_in_executor(None, self.db.ensure_schema)
        stored = await self.db.read(admin.stored_hashes)
        hashes = await asyncio.to_thread(admin.resolve_hashes, self.passwords, self.config, stored)
        await self.write(admin.apply_config, self.config, hashes)
        self.settings, self.token_secret = await self.db.read(admin.load_settings)
        # Embedded, no other process can hold a stream; in a cluster only this node's old leases are gone.
        await self.write(agents.recover, self.node_id, self.link is None)
        await self.write(supervision.recover, self.node_id, self.link is None)
        loop = asyncio.get_running_loop()
        self._sweeper = loop.create_task(self._sweep())
        self._loops = [loop.create_task(self._renew_leases()), loop.create_task(self._sweep_timers())]
        if self.link is not None:
            cluster_id = await self.db.read(admin.cluster_id)
            await self.link.start(cluster_id)
            self.reconciler.start()
            log.info("cluster: node %s joined cluster %s", self.node_id, cluster_id)

    async def _renew_leases(self) -> None:
        """Keeps this node's offer-stream leases alive; puts back any the others swept while it stalled."""
        seconds = self.config.cluster.lease_seconds
        while True:
            await asyncio.sleep(seconds / 3)
            try:
                held = dict(self.streams.leases)
                renewed = await self.write(agents.renew_leases, self.node_id, list(held), seconds)
                if renewed < len(held):
                    await self.write(agents.restore_leases, self.node_id, held, seconds)
            except Exception:
                log.exception("renewing stream leases failed")

    async def _sweep_timers(self) -> None:
        """Offer time-outs, grace periods and dead nodes' leases from the database: they fire even when the
        node that armed the in-memory timer is gone."""
        interval = self.config.cluster.sweep_interval
        while True:
            await asyncio.sleep(interval)
            try:
                cluster = self.link is not None  # only a cluster has other nodes, whose leases may be dead
                if await self.db.read(agents.sweep_due, utcnow(), self.settings.stream_grace, cluster):
                    await self.write(agents.sweep, cluster)
            except Exception:
                log.exception("sweeping timers failed")

    async def _sweep(self) -> None:
        """Now and then: abandoned uploads, expired sessions, identity-token uses past their token's life."""
        sec = self.security
        agent_times, admin_times = (
            (sec.agent_session_idle, sec.agent_session_max),
            (
                sec.admin_session_idle,
                sec.admin_session_max,
            ),
        )
        jobs: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            ("uploads", self.attachments.sweep),
            ("agent sessions", lambda: self.write(agents.end_expired, *agent_times)),
            ("admin sessions", lambda: self.write(admin.end_admin_sessions, *admin_times)),
            ("identity tokens", lambda: self.write(conversations.forget_identity_tokens)),
        ]
        while True:
            for what, job in jobs:  # each on its own: one failing (a disk error, say) must not stop the rest
                try:
                    await job()
                except Exception:
                    log.exception("sweep of %s failed", what)
            await asyncio.sleep(self.limits.upload_sweep_interval)

    def drain(self) -> int:
        """Shutting down: end every stream here with UNAVAILABLE (clients reconnect elsewhere and resume).
        Returns how many topics were told."""
        from .views import Draining

        topics = self.bus.topics()
        for topic in topics:
            self.bus.publish(topic, Draining())
        return len(topics)

    async def stop(self) -> None:
        for task in [self._sweeper, *self._loops]:
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._loops = []
        if self.reconciler is not None:
            await self.reconciler.stop()
        self.effects.cancel_timers()
        await self.positions.stop()
        await self.stats.stop()
        await self.background.drain()
        if self.link is not None:
            await self.link.stop()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        self.blobs.close()
        self.password_pool.close()

    # --- authentication ---------------------------------------------------

    async def authenticate_agent(self, token: str) -> AgentPrincipal:
        now = time.monotonic()
        hit = self._agent_tokens.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        sec = self.security
        try:
            found = await self.db.read(
                agents.find_session, token, utcnow(), sec.agent_session_idle, sec.agent_session_max
            )
        except ChatError as e:
            if e.reason == "SESSION_EXPIRED":
                self._spawn(agents.end_expired, sec.agent_session_idle, sec.agent_session_max, e.metadata["session_id"])
                e.metadata.clear()
            raise
        if found.stale:
            self._spawn(agents.touch, found.principal.session_id)
        if len(self._agent_tokens) > 10_000:
            self._agent_tokens.clear()
        low, high = _TOKEN_CACHE_SECONDS
        trusted = min(high, max(low, sec.agent_session_idle / 60), found.remaining)  # never past its lifetime
        self._agent_tokens[token] = (found.principal, now + trusted)
        return found.principal

    async def authenticate_admin(self, token: str) -> AdminPrincipal:
        sec = self.security
        try:
            found = await self.db.read(admin.find_admin, token, utcnow(), sec.admin_session_idle, sec.admin_session_max)
        except ChatError as e:
            if e.reason == "ADMIN_SESSION_EXPIRED":
                self._spawn(admin.end_admin_sessions, sec.admin_session_idle, sec.admin_session_max, token)
            raise
        if found.stale:
            self._spawn(admin.touch_admin_session, found.token_hash)
        return found.principal

    def authenticate_customer(self, token: str, conversation_id: str) -> CustomerPrincipal:
        """Customer tokens name their conversation; the MAC proves the server issued them."""
        own_id, _, _ = token.removeprefix("qc_").partition(".")
        if not token.startswith("qc_") or not own_id or not check_customer_token(self.token_secret, own_id, token):
            raise unauthenticated("CUSTOMER_TOKEN_INVALID", "The customer token is missing or not valid.")
        if conversation_id and own_id != conversation_id:
            raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
        return CustomerPrincipal(own_id)

    # --- agents -------------------------------------------------------------

    async def login(self, username: str, password: str, profile_id: str, ready: bool, client: str = "") -> SessionView:
        if not username or not password:
            raise invalid("CREDENTIALS_REQUIRED", "Give a username and a password.")
        if not profile_id:
            raise invalid("PROFILE_REQUIRED", "Choose a profile to log in with.")
        await self._check_password(Agent, username, password, client)
        return await self.write(agents.login, username, profile_id, ready, new_token("qa"))

    async def _check_password(
        self, model: type[Agent] | type[Admin], username: str, password: str, client: str
    ) -> None:
        """Rate limits and back-off first (no hashing for a refused attempt), then argon2 on its own pool."""
        key = f"{model.__tablename__}:{username}"
        self.limiter.before_login(key, client)
        stored = await self.db.read(_password_hash, model, username)
        if not await self.password_pool.verify(stored, password):
            self.limiter.login_failed(key, client)
            raise unauthenticated("BAD_CREDENTIALS", "Unknown username or wrong password.")
        self.limiter.login_succeeded(key, client)

    async def logout(self, who: AgentPrincipal) -> None:
        await self.write(agents.logout, who)

    async def set_ready(self, who: AgentPrincipal, ready: bool) -> bool:
        return await self.write(agents.set_ready, who, ready)

    async def accept_offer(self, who: AgentPrincipal, offer_id: str) -> ConversationView:
        return await self.write(routing.accept_offer, who, offer_id)

    async def reject_offer(self, who: AgentPrincipal, offer_id: str) -> None:
        await self.write(routing.reject_offer, who, offer_id)

    def offer_feed(self, who: AgentPrincipal, after_seq: int) -> AsyncIterator[FeedEventView | Heartbeat]:
        return self.streams.offer_feed(who, after_seq)

    # --- conversations ---------------------------------------------------------

    async def list_conversations(self, who: AgentPrincipal, include_closed: bool) -> list[ConversationView]:
        return await self.db.read(conversations.agent_conversations, who, include_closed)

    async def get_conversation(self, who: Who, conversation_id: str) -> ConversationView:
        def run(s: Session) -> ConversationView:
            conv = readable_conversation(s, who, conversation_id)
            return conversation_view(s, conv, for_agent=isinstance(who, AgentPrincipal))

        return await self.db.read(run)

    def conversation_stream(
        self, who: Who, conversation_id: str, after_seq: int
    ) -> AsyncIterator[EventView | Heartbeat | QueuePositionView | TypingView | ReadCursorView]:
        return self.streams.conversation(who, conversation_id, after_seq)

    async def mark_read(self, who: Who, conversation_id: str, up_to_seq: int) -> ReadCursorView:
        """Limited per reader and conversation: each call that moves the cursor is a write."""
        reader = f"agent:{who.agent_id}" if isinstance(who, AgentPrincipal) else "customer"
        self.limiter.check(
            "read_marks_per_conversation",
            f"{conversation_id}\0{reader}",
            "TOO_MANY_READ_MARKS",
            "You are marking messages read too often; send the latest seq now and then.",
        )
        return await self.write(receipts.mark_read, who, conversation_id, up_to_seq)

    async def rate(
        self, who: CustomerPrincipal, conversation_id: str, request_id: str, score: int, comment: str
    ) -> RatingView:
        _check_request_id(request_id)
        self.limiter.check(
            "ratings_per_conversation", conversation_id, "TOO_MANY_RATINGS", "Too many rating attempts; wait a minute."
        )
        return await self.write(ratings.rate, who, conversation_id, request_id, score, comment)

    # --- supervisors ---------------------------------------------------------------

    async def live_conversations(self, who: AgentPrincipal, queue_id: str) -> list[LiveConversationView]:
        return await self.db.read(supervision.live_conversations, who, queue_id, utcnow())

    def monitor(
        self, who: AgentPrincipal, conversation_id: str, after_seq: int
    ) -> AsyncIterator[EventView | Heartbeat | TypingView | ReadCursorView]:
        return self.streams.monitor(who, conversation_id, after_seq)

    async def whisper(self, who: AgentPrincipal, conversation_id: str, request_id: str, text: str) -> EventView:
        _check_request_id(request_id)
        if len(text) > self.limits.max_message_chars:
            conversations.check_text(self.limits, text)
        self.limiter.check(
            "messages_per_conversation",
            f"{conversation_id}\0supervisor:{who.agent_id}",
            "TOO_MANY_MESSAGES",
            "You are sending messages too fast; slow down.",
        )
        return await self.write(supervision.whisper, who, conversation_id, request_id, text)

    async def barge_in(self, who: AgentPrincipal, conversation_id: str) -> ConversationView:
        return await self.write(supervision.barge_in, who, conversation_id)

    async def agent_wrap_up_codes(self, who: AgentPrincipal, conversation_id: str) -> tuple[list[WrapUpCodeView], bool]:
        def run(s: Session) -> tuple[list[WrapUpCodeView], bool]:
            codes, required = conversations.list_wrap_up_codes(s, who, conversation_id)
            return [admin.wrap_up_code_view(c) for c in codes], required

        return await self.db.read(run)

    async def send_message(
        self,
        who: Who,
        conversation_id: str,
        request_id: str,
        text: str,
        private: bool = False,
        predefined_id: str = "",
        attachment_ids: Sequence[str] = (),
    ) -> EventView:
        _check_request_id(request_id)
        if len(text) > self.limits.max_message_chars:
            conversations.check_text(self.limits, text)
        sender = f"agent:{who.agent_id}" if isinstance(who, AgentPrincipal) else "customer"
        self.limiter.check(
            "messages_per_conversation",
            f"{conversation_id}\0{sender}",
            "TOO_MANY_MESSAGES",
            "You are sending messages too fast; slow down.",
        )
        return await self.write(
            conversations.send_message,
            who,
            conversation_id,
            request_id,
            text,
            private,
            predefined_id,
            list(attachment_ids),
        )

    async def list_predefined(self, who: AgentPrincipal, conversation_id: str) -> list[PredefinedView]:
        return await self.db.read(conversations.list_predefined, who, conversation_id)

    async def send_offer_menu(
        self, who: AgentPrincipal, conversation_id: str, request_id: str, prompt: str, options: list[tuple[str, str]]
    ) -> EventView:
        _check_request_id(request_id)
        return await self.write(conversations.send_offer_menu, who, conversation_id, request_id, prompt, options)

    async def invite_agent(
        self, who: AgentPrincipal, conversation_id: str, request_id: str, agent_id: str, queue_id: str
    ) -> dict[str, Any]:
        _check_request_id(request_id)
        return await self.write(invites.invite_agent, who, conversation_id, request_id, agent_id, queue_id)

    async def cancel_invite(self, who: AgentPrincipal, invite_id: str) -> dict[str, Any]:
        return await self.write(invites.cancel_invite, who, invite_id)

    async def leave(self, who: AgentPrincipal, conversation_id: str) -> None:
        await self.write(conversations.leave, who, conversation_id)

    async def close(
        self, who: AgentPrincipal, conversation_id: str, confirm: bool, wrap_up_code_id: str = "", note: str = ""
    ) -> ConversationView:
        return await self.write(conversations.close, who, conversation_id, confirm, wrap_up_code_id, note)

    # --- customers ---------------------------------------------------------------

    async def list_queues(self) -> list[QueueView]:
        return await self.db.read(admin.list_queues)

    async def start_chat(
        self, queue_id: str, request_id: str, variables: dict[str, str], identity_token: str, client: str = ""
    ) -> StartedChat:
        _check_request_id(request_id)
        if request_id and len(request_id) < 16:
            # Anyone repeating it gets this chat's customer token back: it must be unguessable.
            raise invalid("BAD_REQUEST_ID", "StartChat's request_id must be 16-64 characters: use a UUID.")
        if len(variables) > self.limits.max_variables:
            raise invalid("TOO_MANY_VARIABLES", f"At most {self.limits.max_variables} variables.")
        for name, value in variables.items():
            if not _VAR_NAME.match(name):
                raise invalid("BAD_VARIABLE_NAME", f"Variable name {name!r} is not allowed.", name=name)
            if len(value) > self.limits.max_variable_chars:
                raise invalid(
                    "VARIABLE_TOO_LONG", f"Variable {name!r} is longer than {self.limits.max_variable_chars}."
                )
        claims = IdentityClaims({})
        if identity_token:
            claims = verify_identity_token(
                identity_token,
                self.config.identity_signers,
                leeway=self.security.identity_leeway,
                max_lifetime=self.security.identity_max_lifetime,
            )
        flood = "Too many chats started {}; try again in a minute."
        self.limiter.check("start_chat_per_address", client, "TOO_MANY_CHATS", flood.format("from here"))
        if claims.subject:
            self.limiter.check("start_chat_per_identity", claims.subject, "TOO_MANY_CHATS", flood.format("by you"))
        # Tokens often carry claims that are not customer variables (namespaced URIs, large blobs, control
        # characters that no request field may hold): keep the rest.
        verified = {
            k: v
            for k, v in claims.variables.items()
            if _VAR_NAME.match(k) and len(v) <= self.limits.max_variable_chars and not _CONTROL.search(v)
        }
        verified = dict(sorted(verified.items())[: self.limits.max_variables])
        rl = self.config.rate_limits
        conv = await self.write(
            conversations.start_chat,
            queue_id,
            request_id,
            variables,
            verified,
            identity_jti=claims.jti,
            identity_expires=claims.expires_at + timedelta(seconds=self.security.identity_leeway)
            if claims.expires_at
            else None,
            max_waiting=rl.max_waiting_per_queue if rl.enabled else 0,
        )
        return StartedChat(conv, customer_token(self.token_secret, conv.id))

    async def choose_option(
        self, who: CustomerPrincipal, conversation_id: str, menu_id: str, option_id: str
    ) -> EventView:
        return await self.write(conversations.choose_option, who, conversation_id, menu_id, option_id)

    async def end_chat(self, who: CustomerPrincipal, conversation_id: str) -> ConversationView:
        return await self.write(conversations.end_chat, who, conversation_id)

    async def transcript(self, who: Who | AdminPrincipal, conversation_id: str) -> Transcript:
        """Customers get what they could see; admins the organisation's full log."""
        public_only = not isinstance(who, AdminPrincipal)

        def run(s: Session) -> Transcript:
            conv: Conversation | None
            if isinstance(who, AdminPrincipal):
                conv = s.get(Conversation, conversation_id) if conversation_id else None
                if conv is None:
                    raise ChatError(Kind.NOT_FOUND, "CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r}.")
            else:
                conv = readable_conversation(s, who, conversation_id)
            events = conversations.events_after(s, conversation_id, 0, public_only, limit=1_000_000)
            return Transcript(conversation_view(s, conv, for_agent=not public_only), tuple(events))

        return await self.db.read(run)

    # --- admins ------------------------------------------------------------------

    async def admin_login(self, username: str, password: str, client: str = "") -> str:
        await self._check_password(Admin, username, password, client)
        token = new_token("qadm")
        await self.write(admin.create_admin_session, username, token)
        return token

    async def create_upload(
        self, who: Who, conversation_id: str, request_id: str, name: str, size: int, ctype: str, client: str = ""
    ) -> dict[str, Any]:
        """Limits first (uploads started and bytes, per sender in the conversation and per address)."""
        sender = f"{conversation_id}\0" + (f"agent:{who.agent_id}" if isinstance(who, AgentPrincipal) else "customer")
        many, much = "Too many uploads started {}; wait a little.", "Too many bytes uploaded {}; wait a while."
        lim = self.limiter
        lim.check("uploads_per_conversation", sender, "TOO_MANY_UPLOADS_STARTED", many.format("in this chat"))
        lim.check("uploads_per_address", client, "TOO_MANY_UPLOADS_STARTED", many.format("from here"))
        cost = float(max(0, size))
        lim.check("upload_bytes_per_conversation", sender, "TOO_MANY_UPLOAD_BYTES", much.format("in this chat"), cost)
        lim.check("upload_bytes_per_address", client, "TOO_MANY_UPLOAD_BYTES", much.format("from here"), cost)
        return await self.attachments.create(who, conversation_id, request_id, name, size, ctype)

    async def set_typing(self, who: Who, conversation_id: str, typing: bool, private: bool = False) -> None:
        """An ephemeral signal to the other side's streams, straight to the bus (nothing is stored).
        At most one per sender and conversation every TYPING_EVERY seconds: the rest are dropped."""
        key = f"{conversation_id}\0{who.agent_id if isinstance(who, AgentPrincipal) else ''}"
        if typing and self._typing.take(key) > 0:
            return  # over the rate: dropped, never queued (a stop always goes through)
        participant = await self.db.read(_typing_participant, who, conversation_id)
        expires = utcnow() + timedelta(seconds=TYPING_SHOWN)
        view = TypingView(conversation_id, participant, typing, private and participant.kind == "agent", expires)
        self.effects.publish(conv_topic(conversation_id), view)

    async def hash_password(self, password: str) -> str:
        """Off the writer and the event loop: argon2 is slow on purpose."""
        return await self.password_pool.hash(password)

    async def list_profiles(self) -> list[ProfileView]:
        return await self.db.read(admin.list_profiles)

    async def list_agents(self) -> list[AgentAccountView]:
        return await self.db.read(admin.list_agents)

    async def list_all_predefined(self) -> list[PredefinedView]:
        return await self.db.read(admin.list_predefined)

    async def list_all_conversations(
        self, page_size: int, page_token: str, queue_id: str = "", wrap_up_code_id: str = "", rating_score: int = 0
    ) -> tuple[list[ConversationView], str]:
        return await self.db.read(
            admin.list_conversations, page_size, page_token, queue_id, wrap_up_code_id, rating_score
        )

    async def create_queue(self, queue_id: str, display_name: str, wrap_up_required: bool = False) -> QueueView:
        return await self.write(admin.create_queue, queue_id, display_name, wrap_up_required)

    async def update_queue(self, queue_id: str, display_name: str, wrap_up_required: bool = False) -> QueueView:
        return await self.write(admin.update_queue, queue_id, display_name, wrap_up_required)

    async def list_wrap_up_codes(self) -> list[WrapUpCodeView]:
        return await self.db.read(admin.list_wrap_up_codes)

    async def create_wrap_up_code(self, code_id: str, display_name: str, queue_id: str) -> WrapUpCodeView:
        return await self.write(admin.create_wrap_up_code, code_id, display_name, queue_id)

    async def update_wrap_up_code(self, code_id: str, display_name: str, queue_id: str) -> WrapUpCodeView:
        return await self.write(admin.update_wrap_up_code, code_id, display_name, queue_id)

    async def delete_wrap_up_code(self, code_id: str) -> None:
        await self.write(admin.delete_wrap_up_code, code_id)

    async def delete_queue(self, queue_id: str) -> None:
        await self.write(admin.delete_queue, queue_id)

    async def create_profile(
        self, profile_id: str, display_name: str, queue_ids: list[str], supervisor: bool = False
    ) -> ProfileView:
        return await self.write(admin.create_profile, profile_id, display_name, queue_ids, supervisor)

    async def update_profile(
        self, profile_id: str, display_name: str, queue_ids: list[str], supervisor: bool = False
    ) -> ProfileView:
        return await self.write(admin.update_profile, profile_id, display_name, queue_ids, supervisor)

    async def delete_profile(self, profile_id: str) -> None:
        await self.write(admin.delete_profile, profile_id)

    async def create_agent(
        self, agent_id: str, display_name: str, max_chats: int, profile_ids: list[str], password_hash: str
    ) -> AgentAccountView:
        return await self.write(admin.create_agent, agent_id, display_name, max_chats, profile_ids, password_hash)

    async def update_agent(
        self, agent_id: str, display_name: str, max_chats: int, profile_ids: list[str], password_hash: str | None
    ) -> AgentAccountView:
        return await self.write(admin.update_agent, agent_id, display_name, max_chats, profile_ids, password_hash)

    async def delete_agent(self, agent_id: str) -> None:
        await self.write(admin.delete_agent, agent_id)

    async def create_predefined(
        self, message_id: str, title: str, body: str, queue_id: str, profile_id: str
    ) -> PredefinedView:
        return await self.write(admin.create_predefined, message_id, title, body, queue_id, profile_id)

    async def update_predefined(
        self, message_id: str, title: str, body: str, queue_id: str, profile_id: str
    ) -> PredefinedView:
        return await self.write(admin.update_predefined, message_id, title, body, queue_id, profile_id)

    async def delete_predefined(self, message_id: str) -> None:
        await self.write(admin.delete_predefined, message_id)

    async def update_settings(self, new: Settings) -> Settings:
        return await self.write(admin.update_settings, new)

    def queue_stats(self, queue_ids: Sequence[str] = ()) -> AsyncIterator[object]:
        """Supervisor figures per queue: QueueStatsSnapshot, and Heartbeat when idle (domain/stats.py). One
        refresher per process, `self.stats`; it runs only while a stream watches."""
        return self.stats.stream(queue_ids)


def _cluster() -> Any:
    from .. import cluster  # only a cluster node needs it (and nats-py)

    return cluster


def _stream_seqs(s: Session, convs: list[str], feeds: list[str]) -> tuple[dict[str, int], dict[str, int], set[str]]:
    """The database's last seq of each conversation and each session's feed, and which of those sessions
    have ended (for the reconciler)."""
    from sqlmodel import col, select

    from ..cluster import chunks
    from ..store.models import AgentSession

    conv_seqs: dict[str, int] = {}
    feed_seqs: dict[str, int] = {}
    for ids in chunks(convs):
        for cid, seq in s.exec(select(Conversation.id, Conversation.last_seq).where(col(Conversation.id).in_(ids))):
            conv_seqs[cid] = seq
    ended: set[str] = set()
    for ids in chunks(feeds):
        rows = s.exec(
            select(AgentSession.id, AgentSession.feed_seq, AgentSession.ended_at).where(col(AgentSession.id).in_(ids))
        )
        for sid, seq, ended_at in rows:
            feed_seqs[sid] = seq
            if ended_at is not None:
                ended.add(sid)
    return conv_seqs, feed_seqs, ended


def _typing_participant(s: Session, who: Who, conversation_id: str) -> ParticipantView:
    """Who is typing, as the other side sees them; refused like a message would be."""
    conv = readable_conversation(s, who, conversation_id)
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conv.id)
    if isinstance(who, CustomerPrincipal):
        if not conv.customer_connected:
            raise precondition("CHAT_ENDED", "You have ended this chat.")
        return customer_participant(conv)
    if not is_participant(s, conversation_id, who.agent_id):
        raise denied("NOT_A_PARTICIPANT", "You are not in this conversation.", conversation_id=conversation_id)
    return agent_participant(must_get(s, Agent, who.agent_id))


def _password_hash(s: Session, model: type[Agent] | type[Admin], username: str) -> str | None:
    if not username:
        return None
    row = s.get(Agent, username) if model is Agent else s.get(Admin, username)
    return row.password_hash if row is not None else None


def _check_request_id(request_id: str) -> None:
    if request_id and not _REQUEST_ID.match(request_id):
        raise invalid(
            "BAD_REQUEST_ID", "request_id must be 1-64 characters of letters, digits and _.:- (a UUID is best)."
        )
