"""The supervisor's monitor screen in the agent desktop: the live chats of the supervised queues; watch one,
whisper to its agents, barge in.

Agents logged in with a supervisor profile open it with F9. The list is
ListLiveConversations, refreshed every two seconds. Enter watches the chosen
chat (MonitorConversation: everything its agents see, private notes included,
followed from a cursor like any conversation); the input whispers to its
agents; F10 barges in, which opens the chat as a tab of the desktop. Esc goes
back to the list, and from the list back to the desktop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import resources_pb2 as rpb

from . import text
from .client import AgentClient, Feed, Refused, SessionEnded
from .panes import TYPING_SHOWN, Entry

if TYPE_CHECKING:
    from .app import AgentApp

REFRESH = 2.0  # seconds between refreshes of the list

# (column key, heading)
COLUMNS = (
    ("queue", "Queue"),
    ("customer", "Customer"),
    ("agents", "Agents"),
    ("waited", "Waited"),
    ("handling", "Handling"),
    ("monitors", "Monitored by"),
)


def row(live: pb.LiveConversation) -> dict[str, str | Text]:
    conv = live.conversation
    agents = ", ".join(a.display_name or a.agent_id for a in conv.agents)
    return {
        "queue": conv.queue.display_name or conv.queue.queue_id,
        "customer": text.customer_name(conv.variables, conv.queue, conv.conversation_id),
        "agents": agents or Text("waiting", style="bold yellow"),
        "waited": Text(text.duration(live.waiting_time.ToTimedelta()), justify="right"),
        "handling": Text(text.duration(live.handling_time.ToTimedelta()) if agents else "–", justify="right"),
        "monitors": ", ".join(m.display_name or m.agent_id for m in live.monitors),
    }


class MonitorScreen(Screen[None]):
    """The live list, and one chat watched at a time."""

    app: AgentApp
    BINDINGS = [
        Binding("escape", "back", "Back"),
        Binding("f10", "barge_in", "Barge in"),
        Binding("f5", "refresh", "Refresh"),
    ]
    DEFAULT_CSS = """
    MonitorScreen { layout: vertical; }
    MonitorScreen .heading { height: 1; background: $panel; padding: 0 1; text-style: bold; }
    MonitorScreen #live { height: 1fr; }
    MonitorScreen .empty { padding: 1 2; color: $text-muted; }
    MonitorScreen #watch { height: 1fr; display: none; }
    MonitorScreen #watch .log { height: 1fr; border: round $panel-lighten-2; padding: 0 1; }
    MonitorScreen #watch .typing { height: 1; color: $text-muted; text-style: italic; padding: 0 1; }
    MonitorScreen #watch .notice { height: auto; color: $warning; padding: 0 1; }
    MonitorScreen #watch .notice.error { color: $error; }
    MonitorScreen #watch Horizontal { height: 3; }
    MonitorScreen #watch .mode { width: 10; padding: 1 1; text-style: bold; color: $accent; }
    MonitorScreen #watch Input { width: 1fr; border: tall $accent; }
    MonitorScreen #watch Button { margin: 1 0 0 1; min-width: 8; }
    """

    def __init__(self, client: AgentClient, me: str):
        super().__init__()
        self.client = client
        self.me = me
        self.live: dict[str, pb.LiveConversation] = {}
        self.watching = ""  # the conversation id watched, "" on the list
        self.feed: Feed[rpb.ConversationEvent] | None = None
        self.menus: dict[str, str] = {}
        self.typing_until = 0.0  # when the typing line goes (monotonic)

    def compose(self) -> ComposeResult:
        yield Static("Live chats of your queues · Enter watches · Esc back to the desktop", classes="heading")
        yield DataTable(id="live", cursor_type="row", zebra_stripes=True)
        yield Static("No live chats in your queues.", classes="empty")
        with Vertical(id="watch"):
            yield VerticalScroll(classes="log")
            yield Static(classes="typing")
            yield Static(classes="notice")
            with Horizontal():
                yield Label("Whisper", classes="mode")
                yield Input(placeholder="To the agents only · Enter sends", classes="whisper")
                yield Button("Barge in (F10)", name="barge", classes="barge", compact=True, variant="warning")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#live", DataTable)
        for key, label in COLUMNS:
            table.add_column(label if key not in ("waited", "handling") else Text(label, justify="right"), key=key)
        self.query_one("#watch .log").anchor()
        self.refresh_list()
        self.set_interval(REFRESH, self.refresh_list)
        table.focus()

    # --- the list -------------------------------------------------------------------

    @work(exclusive=True, group="list", exit_on_error=False)
    async def refresh_list(self) -> None:
        if self.watching:
            return
        try:
            found = await self.client.live_conversations()
        except SessionEnded as err:
            self.dismiss(None)
            self.app.session_ended(err)
            return
        except Refused as err:
            self.notify(f"Could not list the live chats: {err}", severity="error")
            return
        self.show_list(found)

    def show_list(self, found: list[pb.LiveConversation]) -> None:
        table = self.query_one("#live", DataTable)
        self.live = {lc.conversation.conversation_id: lc for lc in found}
        rows = [(cid, row(lc)) for cid, lc in self.live.items()]
        if [key.value for key in table.rows] != [cid for cid, _ in rows]:
            chosen = self._chosen()
            table.clear()
            for cid, cells in rows:
                table.add_row(*(cells[key] for key, _ in COLUMNS), key=cid)
            if chosen in self.live:
                table.move_cursor(row=table.get_row_index(chosen))
        else:
            for cid, cells in rows:
                for key, value in cells.items():
                    table.update_cell(cid, key, value)
        self.query_one(".empty").display = not rows

    def _chosen(self) -> str:
        table = self.query_one("#live", DataTable)
        if not table.row_count:
            return ""
        key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return str(key.value or "")

    @on(DataTable.RowSelected, "#live")
    def selected(self, event: DataTable.RowSelected) -> None:
        if event.row_key.value:
            self.watch_chat(str(event.row_key.value))

    def action_refresh(self) -> None:
        self.refresh_list()

    # --- watching -----------------------------------------------------------------

    def watch_chat(self, conversation_id: str) -> None:
        self.watching = conversation_id
        self.menus = {}
        self.query_one("#watch .log").remove_children()
        self.query_one("#watch .typing", Static).update("")
        self._notice("")
        for widget in self.query("#live, .empty"):
            widget.display = False
        self.query_one("#watch").display = True
        live = self.live.get(conversation_id)
        name = text.customer_name(live.conversation.variables, live.conversation.queue, conversation_id) if live else ""
        self.query_one(".heading", Static).update(
            Content(f"Watching {name} · Enter whispers to the agents · F10 barges in · Esc: the list")
        )
        self.query_one(".whisper", Input).focus()
        self.refresh_bindings()
        self._follow(conversation_id)

    @work(exclusive=True, group="monitor", exit_on_error=False)
    async def _follow(self, conversation_id: str) -> None:
        self.feed = self.client.monitor(conversation_id)
        self.feed.on_signal = self._signal
        try:
            async for ev in self.feed:
                line = text.describe(ev, self.me, self.menus)
                await self.query_one("#watch .log").mount(Entry(line))
                if ev.HasField("message"):
                    self.typing_until = 0.0  # the message the typing was for
                    self.query_one("#watch .typing", Static).update("")
            self._notice("The chat is closed.")
        except SessionEnded as err:
            self.dismiss(None)
            self.app.session_ended(err)
        except Refused as err:
            self._notice(f"Cannot watch this chat: {err}", error=True)

    def _signal(self, kind: str, item: object) -> None:
        if kind == "typing" and isinstance(item, rpb.TypingIndicator):
            who = item.participant.display_name or "Customer"
            self.query_one("#watch .typing", Static).update(Content(f"{who} is typing…" if item.typing else ""))
            # Shown until a newer indicator, or for TYPING_SHOWN without one.
            self.typing_until = time.monotonic() + TYPING_SHOWN if item.typing else 0.0
            if item.typing:
                self.set_timer(TYPING_SHOWN + 0.05, self._typing_expired)

    def _typing_expired(self) -> None:
        if time.monotonic() >= self.typing_until:
            self.query_one("#watch .typing", Static).update("")

    def _notice(self, message: str, error: bool = False) -> None:
        notice = self.query_one("#watch .notice", Static)
        notice.update(Content(message))
        notice.set_class(error, "error")

    @on(Input.Submitted, ".whisper")
    def whisper(self, event: Input.Submitted) -> None:
        if event.value.strip() and self.watching:
            event.input.value = ""
            self._whisper(self.watching, event.value.strip())

    @work(group="whisper", exit_on_error=False)
    async def _whisper(self, conversation_id: str, body: str) -> None:
        try:
            await self.client.whisper(conversation_id, body)
        except Refused as err:
            self._notice(f"Not whispered: {err}", error=True)
            field = self.query_one(".whisper", Input)
            if not field.value:
                field.value = body

    @on(Button.Pressed, ".barge")
    def barge_pressed(self) -> None:
        self.action_barge_in()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "barge_in":
            return bool(self.watching)
        return True

    def action_barge_in(self) -> None:
        if self.watching:
            self._barge_in(self.watching)

    @work(exclusive=True, group="barge", exit_on_error=False)
    async def _barge_in(self, conversation_id: str) -> None:
        try:
            conv = await self.client.barge_in(conversation_id)
        except Refused as err:
            self._notice(f"Could not barge in: {err}", error=True)
            return
        # The chat becomes one of the desktop's tabs; the monitor stream ends with the screen.
        self.app.open_barged_in(conv)
        self.dismiss(None)

    def action_back(self) -> None:
        if not self.watching:
            self.dismiss(None)
            return
        # Stop watching (the monitor stream ends: the server records MonitorStopped); back to the list.
        self.workers.cancel_group(self, "monitor")
        self.feed = None
        self.watching = ""
        self.query_one("#watch").display = False
        self.query_one("#live").display = True
        self.query_one(".heading", Static).update("Live chats of your queues · Enter watches · Esc back to the desktop")
        self.query_one("#live").focus()
        self.refresh_bindings()
        self.refresh_list()
