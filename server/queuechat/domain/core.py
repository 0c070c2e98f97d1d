"""The chat core: the async entry points the API layer calls.

Each write is one transaction on the writer (see store.db); its events fan
out after commit. Streams subscribe to the bus before reading the backlog,
then skip what the backlog already sent, so nothing falls between the two.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ..bus import Bus
from ..config import Config
from ..errors import ChatError, Kind, denied, invalid, unauthenticated
from ..store import Database, Tx
from ..store.blobs import BlobStore
from ..store.models import Admin, Agent, Conversation, FeedEvent, Queue
from . import admin, agents, conversations, invites, routing
from .attachments import Attachments
from .auth import Passwords, check_customer_token, customer_token, new_token, verify_identity_token
from .log import conv_topic, feed_topic, feed_view, utcnow
from .positions import QueuePositions, position_of
from .read import conversation_view
from .views import (
    AdminPrincipal,
    AgentPrincipal,
    ConversationView,
    CustomerPrincipal,
    EventView,
    FeedEventView,
    Heartbeat,
    QueuePositionView,
    SessionView,
    StartedChat,
    Transcript,
)

log = logging.getLogger(__name__)

_SESSION_ENDED = object()
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")

Who = AgentPrincipal | CustomerPrincipal


class Core:
    def __init__(self, db: Database, config: Config, files_dir: str | Path = "data/files"):
        self.db = db
        self.config = config
        self.settings = config.settings
        self.limits = config.limits
        self.bus = Bus(config.limits.subscriber_queue)
        self.passwords = Passwords(config.argon2_time_cost, config.argon2_memory_kib)
        self.positions = QueuePositions(self)
        self.attachments = Attachments(self, BlobStore(files_dir))
        self.token_secret = b""
        self._timers: set[asyncio.TimerHandle] = set()
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sweeper: asyncio.Task | None = None
        # token -> (principal, valid until): saves a read per call. Ends of sessions in this
        # process evict at once; the short lifetime covers sessions ended by another process.
        self._agent_tokens: dict[str, tuple[AgentPrincipal, float]] = {}

    # --- life cycle --------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self.db.create_all)
        await self.db.write(admin.apply_config, self.config, self.passwords)
        self.settings, self.token_secret = await self.db.read(admin.load_settings)
        await self.db.write(agents.recover, self)
        self._sweeper = self._loop.create_task(self._sweep_uploads())

    async def _sweep_uploads(self) -> None:
        while True:
            try:
                await self.attachments.sweep()
            except Exception:
                log.exception("removing expired uploads failed")
            await asyncio.sleep(self.limits.upload_sweep_interval)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        for h in self._timers:
            h.cancel()
        self._timers.clear()
        await self.positions.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # --- effects queued by write paths ------------------------------------

    def schedule(self, tx: Tx, when: datetime, fn: Callable[..., Any], *args: Any) -> None:
        """After commit, run the write fn(tx, core, *args) at `when`."""
        tx.after_commit(lambda: self._call_at(when, fn, args))

    def _call_at(self, when: datetime, fn: Callable[..., Any], args: tuple) -> None:
        assert self._loop is not None
        delay = max(0.0, (when - utcnow()).total_seconds())
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self.spawn_write(fn, *args)

        handle = self._loop.call_later(delay, fire)
        self._timers.add(handle)

    def spawn_write(self, fn: Callable[..., Any], *args: Any) -> None:
        task = asyncio.get_running_loop().create_task(self._background_write(fn, args))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _background_write(self, fn: Callable[..., Any], args: tuple) -> None:
        try:
            await self.db.write(fn, self, *args)
        except Exception:
            log.exception("background write %s failed", getattr(fn, "__name__", fn))

    def queue_changed(self, tx: Tx, queue_id: str) -> None:
        tx.after_commit(lambda: self.positions.mark(queue_id))

    def session_ended(self, tx: Tx, session_id: str) -> None:
        def ended() -> None:
            for token in [t for t, (p, _) in self._agent_tokens.items() if p.session_id == session_id]:
                del self._agent_tokens[token]
            self.bus.publish(feed_topic(session_id), _SESSION_ENDED)

        tx.after_commit(ended)

    # --- authentication ---------------------------------------------------

    async def authenticate_agent(self, token: str) -> AgentPrincipal:
        now = time.monotonic()
        hit = self._agent_tokens.get(token)
        if hit is not None and hit[1] > now:
            return hit[0]
        who = await self.db.read(agents.find_session, token)
        if len(self._agent_tokens) > 10_000:
            self._agent_tokens.clear()
        self._agent_tokens[token] = (who, now + _TOKEN_CACHE_SECONDS)
        return who

    async def authenticate_admin(self, token: str) -> AdminPrincipal:
        return await self.db.read(admin.find_admin, token)

    def authenticate_customer(self, token: str, conversation_id: str) -> CustomerPrincipal:
        """Customer tokens name their conversation; the MAC proves the server issued them."""
        own_id, _, _ = token.removeprefix("qc_").partition(".")
        if not token.startswith("qc_") or not own_id or not check_customer_token(self.token_secret, own_id, token):
            raise unauthenticated("CUSTOMER_TOKEN_INVALID", "The customer token is missing or not valid.")
        if conversation_id and own_id != conversation_id:
            raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
        return CustomerPrincipal(own_id)

    # --- agents -------------------------------------------------------------

    async def login(self, username: str, password: str, profile_id: str, ready: bool) -> SessionView:
        if not username or not password:
            raise invalid("CREDENTIALS_REQUIRED", "Give a username and a password.")
        if not profile_id:
            raise invalid("PROFILE_REQUIRED", "Choose a profile to log in with.")
        stored = await self.db.read(lambda s: getattr(s.get(Agent, username), "password_hash", None))
        ok = await asyncio.get_running_loop().run_in_executor(None, self.passwords.verify, stored, password)
        if not ok:
            raise unauthenticated("BAD_CREDENTIALS", "Unknown username or wrong password.")
        return await self.db.write(agents.login, self, username, profile_id, ready, new_token("qa"))

    async def logout(self, who: AgentPrincipal) -> None:
        await self.db.write(agents.logout, self, who)

    async def set_ready(self, who: AgentPrincipal, ready: bool) -> bool:
        return await self.db.write(agents.set_ready, self, who, ready)

    async def accept_offer(self, who: AgentPrincipal, offer_id: str) -> ConversationView:
        return await self.db.write(routing.accept_offer, self, who, offer_id)

    async def reject_offer(self, who: AgentPrincipal, offer_id: str) -> None:
        await self.db.write(routing.reject_offer, self, who, offer_id)

    async def offer_feed(self, who: AgentPrincipal, after_seq: int) -> AsyncIterator[FeedEventView | Heartbeat]:
        """The session's offer feed: backlog after the cursor, then live. Offers are made while it is open."""
        sub = self.bus.subscribe([feed_topic(who.session_id)])
        opened = False
        try:
            await self.db.write(agents.stream_opened, self, who.session_id)
            opened = True
            last = max(0, after_seq)
            while True:
                page = await self.db.read(_feed_after, who.session_id, last)
                for ev in page:
                    last = ev.seq
                    yield ev
                if len(page) < _PAGE:
                    break
            del page
            yield Heartbeat(last)  # caught up: live from here
            while True:
                item = await sub.get(self.limits.heartbeat_interval)
                if item is None:
                    yield Heartbeat(last)
                elif item is _SESSION_ENDED:
                    raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
                elif item.seq > last:
                    last = item.seq
                    yield item
        finally:
            sub.close()
            if opened:
                self.spawn_write(agents.stream_closed, who.session_id)

    # --- conversations ---------------------------------------------------------

    async def list_conversations(self, who: AgentPrincipal, include_closed: bool) -> list[ConversationView]:
        return await self.db.read(conversations.agent_conversations, who, include_closed)

    async def get_conversation(self, who: Who, conversation_id: str) -> ConversationView:
        def run(s):
            conv = conversations.readable_conversation(s, who, conversation_id)
            return conversation_view(s, conv, for_agent=isinstance(who, AgentPrincipal))

        return await self.db.read(run)

    async def conversation_stream(
        self, who: Who, conversation_id: str, after_seq: int
    ) -> AsyncIterator[EventView | Heartbeat | QueuePositionView]:
        """Backlog after the cursor, then live. Customers never get private events; an agent's
        stream ends with their session, when they leave, or when the invite that let them look ends."""
        customer = isinstance(who, CustomerPrincipal)
        watching: QueuePositionView | None = None
        topics = [conv_topic(conversation_id)]
        if not customer:
            topics.append(feed_topic(who.session_id))  # carries the end of the session
        sub = self.bus.subscribe(topics)
        try:
            # Checked after subscribing, so no change of access can fall in between.
            watching_invite = await self.db.read(conversations.stream_access, who, conversation_id)
            sent = seen = max(0, after_seq)
            while True:
                page = await self.db.read(conversations.events_after, conversation_id, sent, customer, _PAGE)
                for ev in page:
                    sent = seen = ev.seq
                    yield ev
                    if _final(ev, who):
                        return
                if len(page) < _PAGE:
                    break
            del page  # a stream lives for hours: keep no backlog alive
            yield Heartbeat(sent if customer else seen)  # caught up: live from here
            pos = await self.db.read(_position, conversation_id)
            if pos is not None:
                watching = pos  # while it waits, this stream gets position updates
                self.positions.watch(pos.queue_id, conversation_id)
                yield pos
            while True:
                item = await sub.get(self.limits.heartbeat_interval)
                if item is None:
                    # Customers' cursors count only what they may see: private activity stays invisible.
                    yield Heartbeat(sent if customer else seen)
                elif item is _SESSION_ENDED:
                    raise unauthenticated("SESSION_ENDED", "This session has ended; log in again.")
                elif isinstance(item, QueuePositionView):
                    yield item
                elif isinstance(item, EventView) and item.seq > seen:
                    seen = item.seq
                    if customer and not item.public:
                        continue
                    if watching_invite and _invite_over(item, watching_invite):
                        raise denied("NOT_A_PARTICIPANT", "The invite that let you see this conversation has ended.")
                    if watching is not None and item.kind in ("participant_joined", "chat_ended", "chat_closed"):
                        self.positions.unwatch(watching.queue_id, conversation_id)  # out of the queue now
                        watching = None
                    sent = item.seq
                    yield item
                    if _final(item, who):
                        return
        finally:
            sub.close()
            if watching is not None:
                self.positions.unwatch(watching.queue_id, conversation_id)

    async def send_message(
        self,
        who: Who,
        conversation_id: str,
        request_id: str,
        text: str,
        private: bool = False,
        predefined_id: str = "",
        attachment_ids: list[str] = (),  # type: ignore[assignment]
    ) -> EventView:
        _check_request_id(request_id)
        if len(text) > self.limits.max_message_chars:
            conversations.check_text(self, text)
        return await self.db.write(
            conversations.send_message,
            self,
            who,
            conversation_id,
            request_id,
            text,
            private,
            predefined_id,
            list(attachment_ids),
        )

    async def list_predefined(self, who: AgentPrincipal, conversation_id: str):
        return await self.db.read(conversations.list_predefined, who, conversation_id)

    async def send_offer_menu(
        self, who: AgentPrincipal, conversation_id: str, request_id: str, prompt: str, options: list[tuple[str, str]]
    ) -> EventView:
        _check_request_id(request_id)
        return await self.db.write(
            conversations.send_offer_menu, self, who, conversation_id, request_id, prompt, options
        )

    async def invite_agent(
        self, who: AgentPrincipal, conversation_id: str, request_id: str, agent_id: str, queue_id: str
    ) -> dict:
        _check_request_id(request_id)
        return await self.db.write(invites.invite_agent, self, who, conversation_id, request_id, agent_id, queue_id)

    async def cancel_invite(self, who: AgentPrincipal, invite_id: str) -> dict:
        return await self.db.write(invites.cancel_invite, self, who, invite_id)

    async def leave(self, who: AgentPrincipal, conversation_id: str) -> None:
        await self.db.write(conversations.leave, self, who, conversation_id)

    async def close(self, who: AgentPrincipal, conversation_id: str, confirm: bool) -> ConversationView:
        return await self.db.write(conversations.close, self, who, conversation_id, confirm)

    # --- customers ---------------------------------------------------------------

    async def list_queues(self) -> list[Queue]:
        from sqlmodel import select

        return await self.db.read(lambda s: list(s.exec(select(Queue).order_by(Queue.id)).all()))

    async def start_chat(
        self, queue_id: str, request_id: str, variables: dict[str, str], identity_token: str
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
                raise invalid("VARIABLE_TOO_LONG", f"Variable {name!r} is longer than {self.limits.max_variable_chars}.")
        verified = verify_identity_token(identity_token, self.config.identity_secrets).variables if identity_token else {}
        # Tokens often carry claims that are not customer variables (namespaced URIs, large blobs): keep the rest.
        verified = {
            k: v for k, v in verified.items() if _VAR_NAME.match(k) and len(v) <= self.limits.max_variable_chars
        }
        verified = dict(sorted(verified.items())[: self.limits.max_variables])
        conv = await self.db.write(conversations.start_chat, self, queue_id, request_id, variables, verified)
        return StartedChat(conv, customer_token(self.token_secret, conv.id))

    async def choose_option(self, who: CustomerPrincipal, conversation_id: str, menu_id: str, option_id: str) -> EventView:
        return await self.db.write(conversations.choose_option, self, who, conversation_id, menu_id, option_id)

    async def end_chat(self, who: CustomerPrincipal, conversation_id: str) -> ConversationView:
        return await self.db.write(conversations.end_chat, self, who, conversation_id)

    async def transcript(self, who: Who | AdminPrincipal, conversation_id: str) -> Transcript:
        """Customers get what they could see; admins the organisation's full log."""
        public_only = not isinstance(who, AdminPrincipal)

        def run(s):
            if isinstance(who, AdminPrincipal):
                conv = s.get(Conversation, conversation_id) if conversation_id else None
                if conv is None:
                    raise ChatError(Kind.NOT_FOUND, "CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r}.")
            else:
                conv = conversations.readable_conversation(s, who, conversation_id)
            events = conversations.events_after(s, conversation_id, 0, public_only, limit=1_000_000)
            return Transcript(conversation_view(s, conv, for_agent=not public_only), tuple(events))

        return await self.db.read(run)

    # --- admins ------------------------------------------------------------------

    async def admin_login(self, username: str, password: str) -> str:
        stored = await self.db.read(lambda s: getattr(s.get(Admin, username), "password_hash", None))
        ok = await asyncio.get_running_loop().run_in_executor(None, self.passwords.verify, stored, password)
        if not ok:
            raise unauthenticated("BAD_CREDENTIALS", "Unknown admin or wrong password.")
        token = new_token("qadm")
        await self.db.write(admin.create_admin_session, username, token)
        return token


_PAGE = 500
_TOKEN_CACHE_SECONDS = 5.0


def _feed_after(s, session_id: str, after_seq: int) -> list[FeedEventView]:
    from sqlmodel import select

    rows = s.exec(
        select(FeedEvent)
        .where(FeedEvent.session_id == session_id, FeedEvent.seq > after_seq)
        .order_by(FeedEvent.seq)
        .limit(_PAGE)
    ).all()
    return [feed_view(r) for r in rows]


def _position(s, conversation_id: str) -> QueuePositionView | None:
    conv = s.get(Conversation, conversation_id)
    return position_of(s, conv) if conv is not None and conv.status == "queued" else None


def _invite_over(ev: EventView, invite_id: str) -> bool:
    """The invite an invitee is looking through ended without them joining."""
    if ev.kind != "invite_updated" or ev.payload["invite"]["invite_id"] != invite_id:
        return False
    return ev.payload["invite"]["state"] not in ("INVITE_STATE_PENDING", "INVITE_STATE_ACCEPTED")


def _final(ev: EventView, who: Who) -> bool:
    """The last event this viewer gets on this stream."""
    if ev.kind == "chat_closed":
        return True
    if isinstance(who, CustomerPrincipal):
        return ev.kind == "chat_ended"
    if ev.kind == "participant_left":
        return ev.payload["participant"].get("agent_id") == who.agent_id
    return False


def _check_request_id(request_id: str) -> None:
    if request_id and not _REQUEST_ID.match(request_id):
        raise invalid("BAD_REQUEST_ID", "request_id must be 1-64 characters of letters, digits and _.:- (a UUID is best).")

