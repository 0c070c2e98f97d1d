"""The tabs of the agent's desktop: an offer waiting for an answer, and an accepted chat."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
from collections.abc import Awaitable, Iterable
from datetime import UTC, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from textual import on, work
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.reactive import reactive
from textual.widgets import Button, Input, Label, Static, TabbedContent, TabPane

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import resources_pb2 as rpb

from . import text
from .client import AgentClient, Feed, Progress, Refused, SessionEnded
from .dialogs import (
    MAX_FILES,
    AttachDialog,
    ConfirmClose,
    DownloadDialog,
    InviteDialog,
    MenuComposer,
    PredefinedPicker,
    WrapUpDialog,
)

if TYPE_CHECKING:
    from .app import AgentApp

UNREAD = "● "
READ = "✓ Read"  # after the last line of ours the customer has read
TYPING = "✎"  # after a chat tab's name while someone in the chat is composing
TYPING_EVERY = 2.0  # seconds between this agent's typing signals while composing (the server's rule)
TYPING_SHOWN = 6.0  # the longest an indicator stays without a renewal, whatever expire_time says

# (name, label) of a chat tab's tool buttons: name is the pane's action_<name> (close: request_close).
TOOLS = (
    ("predefined", "F2 Predefined"),
    ("menu", "F3 Menu"),
    ("invite", "F4 Invite"),
    ("private", "F5 Private"),
    ("attach", "F6 Attach"),
    ("download", "F7 Download"),
    ("leave", "F8 Leave"),
    ("close", "^W Close"),
)


class Entry(Static):
    """One line of a conversation or of the home tab's activity log."""

    def __init__(self, line: text.Line):
        self.line = line
        self.mark = ""
        super().__init__(self._content(), classes=f"entry {line.role}" + (" private" if line.private else ""))

    def _content(self) -> Content:
        line = self.line
        parts: list[str | tuple[str, str]] = [(f"{line.time} ", "dim")] if line.time else []
        if line.private:
            parts.append(f"{text.EYE} ")
        if line.sender:
            parts += [(line.sender, "bold"), ": "]
        parts.append(line.text)
        if self.mark:
            parts.append((f"  {self.mark}", "dim italic"))
        return Content.assemble(*parts)

    def set_mark(self, mark: str) -> None:
        """A note after the line, e.g. that the customer has read it ("" removes it)."""
        if mark != self.mark:
            self.mark = mark
            self.update(self._content())


class Pane(TabPane):
    """A tab with a label that shows unread activity until the tab is looked at."""

    app: AgentApp
    FOCUS = ""  # what takes the keyboard when the tab is activated

    def __init__(self, caption: str, *, id: str):
        super().__init__(Content(caption), id=id)
        self.pane_id = id  # self.id, which is typed as optional
        self.caption = caption
        self.unread = False

    @property
    def tabs(self) -> TabbedContent:
        return self.app.query_one("#tabs", TabbedContent)

    @property
    def is_active(self) -> bool:
        return self.tabs.active == self.id

    def set_caption(self, caption: str) -> None:
        if caption != self.caption:
            self.caption = caption
            self._relabel()

    def mark_unread(self) -> None:
        if not self.is_active and not self.unread:
            self.unread = True
            self._relabel()

    def mark_read(self) -> None:
        """The tab is in front: what was new has been seen."""
        if self.unread:
            self.unread = False
            self._relabel()

    def label_text(self) -> str:
        return (UNREAD if self.unread else "") + self.caption

    def _relabel(self) -> None:
        self.tabs.get_tab(self).label = Content(self.label_text())

    def focus_default(self) -> None:
        """Put the keyboard on FOCUS; a tab on its way out has nothing left to focus."""
        for widget in self.query(self.FOCUS):
            widget.focus()
            break


class OfferPane(Pane):
    """A chat or invite offer: queue, waiting time, the customer's variables; accept or reject."""

    FOCUS = "Button.accept"

    def __init__(self, client: AgentClient, offer: pb.Offer):
        invite = offer.kind == pb.OFFER_KIND_INVITE
        queue = offer.queue.display_name or offer.queue.queue_id
        super().__init__(f"{'Invite' if invite else 'Offer'}: {queue}", id=f"offer-{offer.offer_id}")
        self.client = client
        self.offer = offer
        self.invite = invite
        self.received = time.monotonic()
        self.answering = False

    def compose(self) -> ComposeResult:
        o = self.offer
        queue = o.queue.display_name or o.queue.queue_id
        with Vertical(classes="offer"):
            if self.invite:
                title = f"{o.invite.inviter.display_name} invites you into a chat in {queue}"
            else:
                title = f"New chat in {queue}"
            yield Label(Content(title), classes="offer-title")
            yield Static(classes="waiting")
            yield Label("Customer", classes="heading")
            yield Static(self._variables(o.variables), classes="variables")
            with Horizontal(classes="answer"):
                yield Button("Accept (a)", name="accept", classes="accept", variant="success")
                yield Button("Reject (r)", name="reject", variant="error")

    def on_mount(self) -> None:
        self._tick()
        self.set_interval(1, self._tick)
        if self.invite:
            # Invite offers carry no variables; the invitee may look at the conversation before answering.
            self._load_variables()

    @staticmethod
    def _variables(variables: Iterable[rpb.CustomerVariable]) -> Content:
        lines = [text.variable(v) for v in variables]
        return Content("\n".join(lines) if lines else "(no details)")

    @work(exit_on_error=False)
    async def _load_variables(self) -> None:
        try:
            conv = await self.client.conversation(self.offer.conversation_id)
        except Refused:
            return  # e.g. the invite was withdrawn meanwhile: its update removes this tab
        self.query_one(".variables", Static).update(self._variables(conv.variables))

    def _tick(self) -> None:
        o = self.offer
        # Durations from the server's own times plus what passed here: the two clocks need not agree.
        elapsed = time.monotonic() - self.received
        left = (o.expire_time.ToDatetime() - o.create_time.ToDatetime()).total_seconds() - elapsed
        left_text = text.duration(timedelta(seconds=left))
        if self.invite:
            # The customer's time in the queue says nothing about an invite: who asked, and since when.
            inv = o.invite
            since = (o.create_time.ToDatetime() - inv.create_time.ToDatetime()).total_seconds() + elapsed
            at = inv.create_time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M")
            who = inv.inviter.display_name or inv.inviter.agent_id
            ago = text.duration(timedelta(seconds=since))
            shown = f"Invited by {who} at {at} ({ago} ago) · answer within {left_text}"
        else:
            waiting = o.waiting_time.ToTimedelta().total_seconds() + elapsed
            shown = f"Waiting {text.duration(timedelta(seconds=waiting))} · answer within {left_text}"
        self.query_one(".waiting", Static).update(Content(shown))

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.answer(event.button.name == "accept")

    def answer(self, accept: bool) -> None:
        if not self.answering:
            self.answering = True
            self.app.answer_offer(self, accept)


class ChatPane(Pane):
    """An accepted chat: the conversation, customer information, the input and the chat tools."""

    FOCUS = "Input.message"
    private = reactive(False)

    def __init__(self, client: AgentClient, conversation: rpb.Conversation, me: str, downloads: Path):
        self.conversation_id = conversation.conversation_id
        self.customer = text.customer_name(conversation.variables, conversation.queue, conversation.conversation_id)
        self.customer_connected = conversation.customer_connected
        self.closed = conversation.state == rpb.CONVERSATION_STATE_CLOSED
        # Who is composing now: "customer" or an agent id -> (name, until when, monotonic).
        self.typing: dict[str, tuple[str, float]] = {}
        self.typing_said = 0.0  # when we last told the server this agent is typing (monotonic), 0: not typing
        super().__init__(self._caption(), id=f"chat-{self.conversation_id}")
        self.client = client
        self.me = me
        self.downloads = downloads
        self.queue = conversation.queue
        self.variables = list(conversation.variables)
        self.agents = {a.agent_id: a.display_name for a in conversation.agents}
        self.pending_invite = conversation.pending_invite if conversation.HasField("pending_invite") else None
        self.received: list[tuple[rpb.Attachment, str]] = []
        self.staged: list[rpb.Attachment] = []
        self.predefined_id = ""
        self.menus: dict[str, str] = {}
        self.feed: Feed[rpb.ConversationEvent] | None = None
        self._send_lock = asyncio.Lock()
        # Read cursors, "customer" or an agent id -> read_seq (only ever higher); this agent's own among them.
        self.cursors: dict[str, int] = {}
        for c in conversation.read_cursors:
            self._cursor(c)
        self.last_seq = 0  # of the events shown
        self.others: list[int] = []  # the seqs of the lines not by this agent: what may be unread
        self.read_entry: Entry | None = None  # the line marked as read by the customer
        self._reading = False  # a MarkRead is due or on its way

    def compose(self) -> ComposeResult:
        with Horizontal():
            with Vertical(classes="conversation"):
                yield VerticalScroll(classes="log")
                yield Static(classes="typing")
                yield Static(classes="notice")
                yield Static(classes="staged")
                with Horizontal(classes="compose"):
                    yield Label("Message", classes="mode")
                    yield Input(placeholder="Type a message · Enter sends", classes="message")
                    yield Button("Send", name="send", classes="send", variant="primary", compact=True)
            with VerticalScroll(classes="info"):
                yield Static(classes="info-customer")
                yield Static(classes="info-chat")
        # The tools carry their keys (the footer leaves them out, to fit 80 columns): one row on a wide
        # terminal, two on a narrow one.
        with Grid(classes="tools"):
            for name, label in TOOLS:
                yield Button(label, name=name, compact=True)

    def on_mount(self) -> None:
        self.query_one(".log").anchor()
        self.notice("")
        self._refresh_staged()
        self._refresh_info()
        self._refresh_state()
        self._follow()

    # --- the conversation stream ------------------------------------------------

    @work(exit_on_error=False, group="follow")
    async def _follow(self) -> None:
        self.feed = self.client.follow(self.conversation_id)
        self.feed.on_signal = self._signal
        try:
            async for ev in self.feed:
                await self._apply(ev, live=self.feed.caught_up.is_set())
        except SessionEnded as err:
            self.app.session_ended(err)
        except Refused as err:
            self.notice(f"The conversation stream stopped: {err}", error=True)

    def _signal(self, kind: str, item: object) -> None:
        """Ephemeral items of the stream: typing indicators, read cursors."""
        if kind == "read_cursor" and isinstance(item, rpb.ReadCursor):
            if self._cursor(item) == "customer":
                self._refresh_read_mark()
            self._relabel()
        elif kind == "typing" and isinstance(item, rpb.TypingIndicator):
            p = item.participant
            key = "customer" if p.kind == rpb.PARTICIPANT_KIND_CUSTOMER else p.agent_id
            if key == self.me:
                return
            if item.typing:
                # Until expire_time, measured here: at most TYPING_SHOWN from now, whatever the clocks say.
                left = item.expire_time.ToDatetime(tzinfo=UTC).timestamp() - time.time()
                left = min(max(left, 1.0), TYPING_SHOWN)
                self.typing[key] = (p.display_name or "Customer", time.monotonic() + left)
                self.set_timer(left + 0.05, self._refresh_typing)
            else:
                self.typing.pop(key, None)
            self._refresh_typing()

    # --- read receipts ------------------------------------------------------------------

    def _cursor(self, c: rpb.ReadCursor) -> str:
        """Keep a read cursor (the highest seen per reader); the reader's key."""
        key = "customer" if c.participant.kind == rpb.PARTICIPANT_KIND_CUSTOMER else c.participant.agent_id
        self.cursors[key] = max(self.cursors.get(key, 0), c.read_seq)
        return key

    @property
    def unread_count(self) -> int:
        """Lines by others after this agent's read cursor."""
        mine = self.cursors.get(self.me, 0)
        return len(self.others) - bisect.bisect_right(self.others, mine)

    def label_text(self) -> str:
        n = 0 if self.is_active else self.unread_count
        return f"{UNREAD}{self.caption} ({n})" if n else self.caption

    def mark_read(self) -> None:
        self._read_soon()
        self._relabel()

    def _read_soon(self) -> None:
        """While the tab is in front, tell the server how far this agent has read (one call at a time,
        a moment after the last event: a burst of lines is one MarkRead)."""
        if self._reading or not self.is_active or self.last_seq <= self.cursors.get(self.me, 0):
            return
        self._reading = True
        self.set_timer(0.3, self._send_read)

    @work(exit_on_error=False, group="read")
    async def _send_read(self) -> None:
        try:
            self._cursor(await self.client.mark_read(self.conversation_id, self.last_seq))
        except Refused:
            return  # e.g. over the rate: the next event or visit tries again
        finally:
            self._reading = False
        self._relabel()
        self._read_soon()  # more came meanwhile

    def _is_read_candidate(self, entry: Entry) -> bool:
        """A line of ours (agents') the customer sees: one that can carry the customer's read mark."""
        return entry.line.role in ("me", "agent") and not entry.line.private and entry.line.seq > 0

    def _refresh_read_mark(self) -> None:
        """Mark the last line of ours the customer has read."""
        upto = self.cursors.get("customer", 0)
        entries = list(self.query_one(".log").query(Entry))
        latest = next((e for e in reversed(entries) if self._is_read_candidate(e) and e.line.seq <= upto), None)
        self._move_read_mark(latest)

    def _move_read_mark(self, entry: Entry | None) -> None:
        if entry is self.read_entry:
            return
        if self.read_entry is not None:
            self.read_entry.set_mark("")
        self.read_entry = entry
        if entry is not None:
            entry.set_mark(READ)

    # --- typing -------------------------------------------------------------------------

    def _refresh_typing(self) -> None:
        now = time.monotonic()
        self.typing = {k: v for k, v in self.typing.items() if v[1] > now}
        names = [name for name, _ in self.typing.values()]
        line = self.query_one(".typing", Static)
        if not names:
            line.update("")
        elif len(names) == 1:
            line.update(Content(f"{names[0]} is typing…"))
        else:
            line.update(Content(f"{', '.join(names)} are typing…"))
        line.display = bool(names)
        self.set_caption(self._caption())

    async def _apply(self, ev: rpb.ConversationEvent, live: bool) -> None:
        line = text.describe(ev, self.me, self.menus)
        kind = ev.WhichOneof("kind")
        if kind == "message":
            # A message ends its sender's typing.
            sender = ev.message.sender
            if self.typing.pop("customer" if sender.kind == rpb.PARTICIPANT_KIND_CUSTOMER else sender.agent_id, None):
                self._refresh_typing()
        if kind == "message" and ev.message.sender.agent_id != self.me:
            self.received += [(a, ev.message.sender.display_name) for a in ev.message.attachments]
        elif kind == "participant_joined" and ev.participant_joined.participant.kind == rpb.PARTICIPANT_KIND_AGENT:
            p = ev.participant_joined.participant
            self.agents[p.agent_id] = p.display_name
        elif kind == "participant_left":
            self.agents.pop(ev.participant_left.participant.agent_id, None)
        elif kind == "invite_updated":
            inv = ev.invite_updated.invite
            self.pending_invite = inv if inv.state == rpb.INVITE_STATE_PENDING else None
        elif kind == "chat_ended":
            self.customer_connected = False
        elif kind == "chat_closed":
            self.closed = True
        self._refresh_info()
        self._refresh_state()
        entry = Entry(line)
        await self.query_one(".log").mount(entry)
        self.last_seq = max(self.last_seq, ev.seq)
        if line.role != "me":
            self.others.append(ev.seq)
        if self._is_read_candidate(entry) and ev.seq <= self.cursors.get("customer", 0):
            self._move_read_mark(entry)  # lines come in seq order: the newest one read so far
        self._relabel()
        if live or self.is_active:
            self._read_soon()

    # --- what the tab shows -----------------------------------------------------------

    def _caption(self) -> str:
        caption = self.customer + (" (ended)" if self.closed or not self.customer_connected else "")
        return caption + (f" {TYPING}" if self.typing else "")

    def _refresh_info(self) -> None:
        variables = [text.variable(v) + "\n" for v in self.variables] or ["(no details)\n"]
        self.query_one(".info-customer", Static).update(Content.assemble(("Customer\n", "bold"), *variables))
        chat: list[str | tuple[str, str]] = [
            ("Queue\n", "bold"),
            f"{self.queue.display_name or self.queue.queue_id}\n",
            ("\nAgents\n", "bold"),
        ]
        chat += [f"{name}\n" for name in self.agents.values()]
        if self.pending_invite is not None:
            chat += [("\nInvite\n", "bold"), f"{text.invite_target(self.pending_invite)}: pending\n"]
        if self.received:
            chat += [("\nFiles received\n", "bold")] + [f"{text.attachment(a)}\n" for a, _ in self.received]
        self.query_one(".info-chat", Static).update(Content.assemble(*chat))

    def _refresh_state(self) -> None:
        if self.closed:
            self.notice("The chat is closed. Ctrl+W closes the tab.")
        elif not self.customer_connected:
            self.notice("Customer ended the chat. Ctrl+W closes the tab without asking.")
        self.set_caption(self._caption())

    def notice(self, message: str, error: bool = False) -> None:
        notice = self.query_one(".notice", Static)
        notice.update(Content(message))
        notice.set_class(error, "error")
        notice.display = bool(message)

    def _refresh_staged(self) -> None:
        files = "  ".join(text.attachment(a) for a in self.staged)
        staged = self.query_one(".staged", Static)
        staged.update(Content(f"To send: {files} · Enter sends"))
        staged.display = bool(files)

    def watch_private(self, private: bool) -> None:
        if self.typing_said:
            # Composing changed sides: the stop goes to whoever was told (a public stop reaches the customer).
            self.typing_said = 0.0
            self._say_typing(False, not private)
        self.query_one(".mode", Label).update(f"{text.EYE} Private" if private else "Message")
        self.query_one(".message", Input).set_class(private, "private")
        self.query_one(".mode", Label).set_class(private, "private")

    # --- sending ------------------------------------------------------------------------

    @on(Input.Submitted, ".message")
    def submitted(self) -> None:
        self._send()

    @on(Input.Changed, ".message")
    def changed(self, event: Input.Changed) -> None:
        if not event.value:
            self.predefined_id = ""
        self._composing(bool(event.value.strip()))

    def _composing(self, typing: bool) -> None:
        """Tell the others this agent is composing: at most every TYPING_EVERY seconds, and once on stopping."""
        if self.closed or not self.is_mounted:
            return
        now = time.monotonic()
        if typing and now - self.typing_said >= TYPING_EVERY:
            self.typing_said = now
            self._say_typing(True, self.private)
        elif not typing and self.typing_said:
            self.typing_said = 0.0
            self._say_typing(False, self.private)

    @work(exit_on_error=False, group="typing")
    async def _say_typing(self, typing: bool, private: bool) -> None:
        # Best effort: a lost signal only means a missing "typing…" on the other side.
        with contextlib.suppress(Refused):
            await self.client.set_typing(self.conversation_id, typing, private=private)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.name == "send":
            self._send()
        elif event.button.name == "close":
            self.request_close()
        else:
            getattr(self, f"action_{event.button.name}")()

    @work(exit_on_error=False, group="send")
    async def _send(self) -> None:
        field = self.query_one(".message", Input)
        body, predefined, files, private = field.value, self.predefined_id, list(self.staged), self.private
        if not (body.strip() or predefined or files):
            return
        field.value, self.predefined_id, self.staged = "", "", []
        self._refresh_staged()
        # One at a time, so messages arrive in the order they were typed.
        async with self._send_lock:
            try:
                await self.client.send(
                    self.conversation_id,
                    body,
                    private=private,
                    predefined_id=predefined,
                    attachment_ids=[a.attachment_id for a in files],
                )
            except Refused as err:
                self.notice(f"Not sent: {err}", error=True)
                if not field.value:
                    field.value, self.predefined_id, self.staged = body, predefined, files
                    self._refresh_staged()
                return
        self.notice("")
        self._refresh_state()

    # --- tools ------------------------------------------------------------------------------

    def action_private(self) -> None:
        self.private = not self.private

    @work(exit_on_error=False)
    async def action_predefined(self) -> None:
        try:
            messages = await self.client.predefined(self.conversation_id)
        except Refused as err:
            self.notice(f"No predefined messages: {err}", error=True)
            return
        if not messages:
            self.notice("There are no predefined messages for this chat.")
            return
        chosen = await self.app.push_screen_wait(PredefinedPicker(messages))
        if chosen is not None:
            field = self.query_one(".message", Input)
            field.value = chosen.body
            self.predefined_id = chosen.predefined_message_id
            field.focus()

    @work(exit_on_error=False)
    async def action_menu(self) -> None:
        composed = await self.app.push_screen_wait(MenuComposer())
        if composed is not None:
            prompt, labels = composed
            await self._call(self.client.send_menu(self.conversation_id, prompt, labels), "Menu not sent")

    @work(exit_on_error=False)
    async def action_invite(self) -> None:
        queues = list(self.app.session.queue_ids) if self.app.session else []
        choice = await self.app.push_screen_wait(InviteDialog(self.pending_invite, queues))
        if choice is None:
            return
        what, target = choice
        if what == "cancel":
            await self._call(self.client.cancel_invite(target), "Invite not cancelled")
        elif what == "agent":
            await self._call(self.client.invite(self.conversation_id, agent_id=target), "Invite failed")
        else:
            await self._call(self.client.invite(self.conversation_id, queue_id=target), "Invite failed")

    @work(exit_on_error=False)
    async def action_attach(self) -> None:
        room = MAX_FILES - len(self.staged)
        if room <= 0:
            self.notice(f"At most {MAX_FILES} files per message: send these first.", error=True)
            return
        attached = await self.app.push_screen_wait(AttachDialog(room, self._upload_file))
        if attached:
            self.staged += attached
            self._refresh_staged()
            self.focus_default()

    @work(exit_on_error=False)
    async def action_download(self) -> None:
        if not self.received:
            self.notice("No files received in this chat yet.")
            return
        await asyncio.to_thread(self.downloads.mkdir, parents=True, exist_ok=True)
        path = await self.app.push_screen_wait(DownloadDialog(self.received, self._download_file))
        if path is not None:
            self.notice(f"Saved {path}")

    async def _upload_file(self, path: Path, progress: Progress) -> rpb.Attachment:
        return await self.client.upload(self.conversation_id, path, progress)

    async def _download_file(self, attachment: rpb.Attachment, progress: Progress) -> Path:
        return await self.client.download(attachment.attachment_id, self.downloads, progress)

    @work(exit_on_error=False)
    async def action_leave(self) -> None:
        try:
            await self.client.leave(self.conversation_id)
        except Refused as err:
            if err.reason == "LAST_AGENT_MUST_CLOSE":
                self.notice("You are the last agent here: close the chat instead (Ctrl+W).", error=True)
            elif err.reason == "WRAP_UP_REQUIRED":
                self.notice("Leaving would close the chat, and its queue needs a wrap-up code: close it (Ctrl+W).")
            else:
                self.notice(f"Could not leave: {err}", error=True)
            return
        self.app.drop_pane(self, f"You left the chat with {self.customer}")

    async def _call(self, coro: Awaitable[object], failure: str) -> None:
        try:
            await coro
        except Refused as err:
            self.notice(f"{failure}: {err}", error=True)

    # --- closing ----------------------------------------------------------------------------

    @work(exit_on_error=False, exclusive=True, group="close")
    async def request_close(self) -> None:
        """Close the tab: a closed chat just goes; a connected customer needs a confirmation first."""
        if not self.closed:
            # customer_connected only ever turns false, so a stale view errs on the side of asking.
            confirm = self.customer_connected
            try:
                codes, required = await self.client.wrap_up_codes(self.conversation_id)
            except Refused:
                codes, required = [], False  # closing does not depend on the list: the server says if it must
            code, note = "", ""
            if codes or required:
                # One dialog: the wrap-up, with the warning when the customer is still there.
                choice = await self.app.push_screen_wait(WrapUpDialog(self.customer, codes, required, confirm))
                if choice is None:
                    return
                code, note = choice
            elif confirm and not await self.app.push_screen_wait(ConfirmClose(self.customer)):
                return
            try:
                await self.client.close(self.conversation_id, confirm=confirm, wrap_up_code_id=code, wrap_up_note=note)
            except Refused as err:
                if err.reason == "WRAP_UP_REQUIRED":
                    self.notice("This queue needs a wrap-up code: close again (Ctrl+W) and pick one.", error=True)
                else:
                    self.notice(f"Not closed: {err}", error=True)
                return
        self.app.drop_pane(self, f"Closed the chat with {self.customer}")
