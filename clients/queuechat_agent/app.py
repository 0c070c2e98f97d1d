"""The agent's terminal desktop: log in, get offers as tabs, work several chats at once."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.content import Content
from textual.dom import NoScreen
from textual.screen import Screen
from textual.widgets import Button, Footer, Input, Label, Static, Switch, Tab, TabbedContent, TabPane, Tabs
from textual.widgets._tabbed_content import ContentTab

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import resources_pb2 as rpb

from . import text
from .client import AgentClient, Feed, Refused, Session, SessionEnded
from .monitor import MonitorScreen
from .panes import ChatPane, Entry, OfferPane, Pane

CSS = """
#banner { height: 1; display: none; background: $error; color: $text; text-style: bold; padding: 0 1; }
#status { height: 1; background: $panel; padding: 0 1; }
#status.ready { background: $success-darken-3; }
#tabs { height: 1fr; }
#tabs ContentSwitcher { height: 1fr; }
TabPane { height: 1fr; padding: 0; }

.home { padding: 1 2; }
.home .welcome { margin-bottom: 1; }
.home .activity { height: 1fr; border: round $panel-lighten-2; border-title-color: $text-muted; }

.offer { padding: 1 2; height: auto; border: round $accent; margin: 1 2; }
.offer .offer-title { text-style: bold; color: $accent; }
.offer .waiting { color: $warning; margin-bottom: 1; }
.offer .heading { text-style: bold; }
.offer .answer { height: auto; margin-top: 1; }
.offer .answer Button { margin-right: 2; }

ChatPane > Horizontal { height: 1fr; }
.conversation { width: 1fr; }
.log { height: 1fr; border: round $panel-lighten-2; padding: 0 1; }
.info { width: 32; border: round $panel-lighten-2; padding: 0 1; }
.-narrow .info { width: 24; }
.typing { height: 1; color: $text-muted; text-style: italic; padding: 0 1; display: none; }
.notice { height: auto; color: $warning; padding: 0 1; }
.notice.error { color: $error; }
.staged { height: auto; color: $accent; padding: 0 1; }
.compose { height: 3; }
.compose .mode { width: 12; padding: 1 1; text-style: bold; }
.compose .mode.private { color: $warning; }
.compose Input { width: 1fr; }
.compose Input.private { border: tall $warning; background: $warning 10%; }
.compose Button { margin: 1 0 0 1; min-width: 8; }
.tools { layout: grid; grid-size: 8 1; grid-gutter: 0 1; height: 1; padding: 0 1; }
.-narrow .tools { grid-size: 4 2; height: 2; }
.tools Button { width: 100%; min-width: 0; padding: 0; }

.entry { padding: 0 1; }
.entry.customer { color: $text; }
.entry.me { color: $primary-lighten-2; }
.entry.agent { color: $success-lighten-1; }
.entry.system, .entry.invite { color: $text-muted; text-style: italic; }
.entry.menu, .entry.choice { color: $accent; }
.entry.private { background: $warning 20%; color: $warning-lighten-2; }
.entry.whisper { background: $accent 20%; color: $accent-lighten-2; }
"""


DESKTOP_ACTIONS = {"offer", "chat", "toggle_ready", "close_tab", "next_tab", "previous_tab", "monitor"}


class Desk(TabbedContent):
    """The tabs. A widget focused in a pane brings that pane to the front (Textual's TabPane.Focused), but
    the news travels by message: by the time it comes, the agent may have clicked another tab and the focus
    moved on. Only a pane that still holds the focus comes to the front."""

    def _on_tab_pane_focused(self, event: TabPane.Focused) -> None:
        focused = self.screen.focused
        if focused is None or event.tab_pane not in focused.ancestors:
            # Textual runs every class's handler of a message: prevent_default keeps TabbedContent's out.
            event.stop()
            event.prevent_default()
        # Otherwise TabbedContent's own handler brings the pane to the front.


class LoginScreen(Screen[tuple[AgentClient, Session]]):
    """Server, credentials, profile and ready: dismisses with (client, session)."""

    DEFAULT_CSS = """
    LoginScreen { align: center middle; }
    LoginScreen > Vertical {
        width: 60; max-width: 100%; height: auto; border: thick $accent; padding: 0 2; background: $surface;
    }
    LoginScreen .title { text-style: bold; margin: 1 0; }
    LoginScreen Horizontal { height: auto; }
    LoginScreen .ready { padding: 1 1; width: 1fr; }
    LoginScreen Button { min-width: 14; }
    LoginScreen .error { color: $error; height: auto; margin-bottom: 1; }
    """

    def __init__(self, server: str, username: str, password: str, profile: str, ready: bool, message: str = ""):
        super().__init__()
        self.defaults = (server, username, password, profile, ready)
        self.message = message

    def compose(self) -> ComposeResult:
        server, username, password, profile, ready = self.defaults
        with Vertical():
            yield Label("queuechat · agent log in", classes="title")
            yield Input(server, placeholder="server address, host:port", id="server")
            yield Input(username, placeholder="username", id="username")
            yield Input(password, placeholder="password", password=True, id="password")
            yield Input(profile, placeholder="profile, e.g. frontline", id="profile")
            # One row for the switch and the button: the box fits a terminal of 80×24.
            with Horizontal():
                yield Switch(ready, id="ready")
                yield Label("Ready for chats", classes="ready")
                yield Button("Log in", variant="primary", id="login")
            yield Static(Content(self.message), classes="error")

    def on_mount(self) -> None:
        empty = [i for i in self.query(Input) if not i.value]
        (empty[0] if empty else self.query_one("#login")).focus()

    @on(Input.Submitted)
    @on(Button.Pressed, "#login")
    def submit(self) -> None:
        self._login()

    @work(exclusive=True, exit_on_error=False)
    async def _login(self) -> None:
        def value(name: str) -> str:
            return self.query_one(f"#{name}", Input).value.strip()

        error = self.query_one(".error", Static)
        if not all(value(f) for f in ("server", "username", "password", "profile")):
            error.update("Fill in all four fields.")
            return
        error.update("Logging in…")
        client = AgentClient(value("server"))
        try:
            session = await client.login(
                value("username"), value("password"), value("profile"), self.query_one(Switch).value
            )
        except Refused as err:
            await client.aclose()
            error.update(Content(str(err)))
            return
        self.dismiss((client, session))


class HomePane(TabPane):
    """The first tab: who is logged in, the keys, and what happened to offers and chats."""

    def __init__(self) -> None:
        super().__init__("Home", id="home")

    def compose(self) -> ComposeResult:
        with Vertical(classes="home"):
            yield Static(classes="welcome")
            yield VerticalScroll(classes="activity")

    def on_mount(self) -> None:
        self.query_one(".activity").border_title = "Activity"
        self.query_one(".activity").anchor()

    def log_activity(self, message: str) -> None:
        self.query_one(".activity").mount(
            Entry(text.Line("system", "", message, time=datetime.now().strftime("%H:%M")))
        )


class AgentApp(App[None]):
    """One agent's shift: offers and chats in tabs, over the chat.v1 AgentService."""

    TITLE = "queuechat agent"
    CSS = CSS
    # The smallest supported terminal is 80×24; below 128 columns the chat tools take two rows.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (128, "-wide")]
    ENABLE_COMMAND_PALETTE = False
    # Keys act on the tab in front, whatever has the focus within it (check_action says which apply).
    BINDINGS = [
        # Priority: with an offer in front, a and r answer it even if the focus is still in a chat's input
        # on its way out (check_action leaves the keys to the chat's input when a chat is in front).
        Binding("a", "offer(True)", "Accept", priority=True),
        Binding("r", "offer(False)", "Reject", priority=True),
        Binding("f2", "chat('predefined')", "Predefined", show=False),
        Binding("f3", "chat('menu')", "Menu", show=False),
        Binding("f4", "chat('invite')", "Invite", show=False),
        Binding("f5", "chat('private')", "Private", show=False),
        Binding("f6", "chat('attach')", "Attach", show=False),
        Binding("f7", "chat('download')", "Download", show=False),
        Binding("f8", "chat('leave')", "Leave", show=False),
        Binding("ctrl+r", "toggle_ready", "Ready"),
        Binding("f9", "monitor", "Monitor"),  # supervisors only
        # Priority: the message input would otherwise take Ctrl+W (delete word).
        Binding("ctrl+w", "close_tab", "Close", priority=True),
        Binding("ctrl+n", "next_tab", "Next tab", show=False),
        Binding("ctrl+b", "previous_tab", "Previous tab", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(
        self,
        server: str = "localhost:50051",
        username: str = "",
        password: str = "",
        profile: str = "",
        ready: bool = True,
        downloads: Path | None = None,
    ):
        super().__init__()
        self.login_defaults = (server, username, password, profile, ready)
        self.downloads = downloads or Path.home() / "Downloads"
        self.client: AgentClient | None = None
        self.session: Session | None = None
        self.ready = False
        self.offer_feed: Feed[pb.OfferEvent] | None = None
        self.offers: dict[str, OfferPane] = {}
        self.chats: dict[str, ChatPane] = {}
        # conversation id -> the id of the tab left of its offer's tab when that went: where a new offer goes.
        self.offer_places: dict[str, str] = {}

    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        yield Static(id="status")
        with Desk(id="tabs"):
            yield HomePane()
        yield Footer()

    def on_mount(self) -> None:
        # Clicking a tab should not pull the keyboard out of the chat: tabs change by click or Ctrl+N/Ctrl+B.
        self.tabs.query_one(Tabs).can_focus = False
        self._show_login()

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    @property
    def tabs(self) -> TabbedContent:
        return self.query_one("#tabs", TabbedContent)

    @property
    def home(self) -> HomePane:
        return self.query_one(HomePane)

    @property
    def api(self) -> AgentClient:
        """The logged-in client. Offers, chats and the desktop's keys only come after _logged_in has set it."""
        if self.client is None:
            raise RuntimeError("not logged in")
        return self.client

    # --- session ---------------------------------------------------------------------

    def _show_login(self, message: str = "") -> None:
        self.push_screen(LoginScreen(*self.login_defaults, message=message), self._login_done)

    def _login_done(self, result: tuple[AgentClient, Session] | None) -> None:
        if result is not None:
            self._logged_in(result)

    @work(exit_on_error=False)
    async def _logged_in(self, result: tuple[AgentClient, Session]) -> None:
        self.client, self.session = result
        self.ready = self.session.ready
        self.client.on_connection = self._connection_changed
        s = self.session
        self.home.query_one(".welcome", Static).update(
            Content.assemble(
                (f"Hello {s.display_name}. ", "bold"),
                f"Profile {s.profile_name}: {', '.join(s.queue_ids)}. Offers open as new tabs: ",
                "a accepts, r rejects. Ctrl+R switches ready/not ready, Ctrl+W closes a tab, "
                "Ctrl+N/Ctrl+B move between tabs.",
                " You supervise these queues: F9 shows their live chats." if s.supervisor else "",
            )
        )
        self._refresh_status()
        try:
            for conv in await self.client.conversations():
                await self.open_chat(conv)
        except Refused as err:
            self.home.log_activity(f"Could not list your chats: {err}")
        self._follow_offers()

    @work(exit_on_error=False, group="offers", exclusive=True)
    async def _follow_offers(self) -> None:
        self.offer_feed = self.api.offers()
        try:
            async for ev in self.offer_feed:
                if ev.HasField("offer"):
                    await self._offered(ev.offer)
                else:
                    await self._offer_updated(ev.offer_update)
        except SessionEnded as err:
            self.session_ended(err)
        except Refused as err:
            self.home.log_activity(f"The offer stream stopped: {err}")

    def session_ended(self, err: Refused) -> None:
        """The token is gone (logged in elsewhere, logged out): back to the login screen."""
        if self.session is None:
            return
        self.session = None
        self.workers.cancel_group(self, "offers")
        self.offer_feed = None
        self._reset(f"Your session has ended ({err.reason or err.code.name}). Log in again.")

    @work(exit_on_error=False)
    async def _reset(self, message: str) -> None:
        for pane in [*self.offers.values(), *self.chats.values()]:
            await self.tabs.remove_pane(pane.pane_id)
        self.offers.clear()
        self.chats.clear()
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self._connection_changed(True)
        self._show_login(message)

    def _connection_changed(self, connected: bool) -> None:
        banner = self.query_one("#banner", Static)
        address = self.client.address if self.client else ""
        banner.update(Content(f"Connection to {address} lost: reconnecting. Every chat resumes where it stopped."))
        banner.display = not connected

    def _refresh_status(self) -> None:
        status = self.query_one("#status", Static)
        if self.session is None:
            status.update("")
            return
        s = self.session
        state = "● Ready" if self.ready else "○ Not ready"
        status.update(
            Content(
                f"{s.display_name} ({s.agent_id}) · {s.profile_name} · {state} · "
                f"{len(self.chats)} chat(s), {len(self.offers)} offer(s) · {self.api.address}"
            )
        )
        status.set_class(self.ready, "ready")

    # --- offers ----------------------------------------------------------------------

    async def _offered(self, offer: pb.Offer) -> None:
        if offer.offer_id in self.offers or offer.conversation_id in self.chats:
            return
        pane = OfferPane(self.api, offer)
        self.offers[offer.offer_id] = pane
        # An offer for a conversation that was on offer before (it timed out, came back) takes the old
        # tab's place, so the tabs after it do not shift under the agent's keys.
        after = self.offer_places.pop(offer.conversation_id, None)
        await self.tabs.add_pane(pane, after=after if after in self._pane_ids() else None)
        kind = "Invite" if offer.kind == pb.OFFER_KIND_INVITE else "Chat offer"
        self.home.log_activity(f"{kind} in {offer.queue.display_name or offer.queue.queue_id}")
        self.bell()
        # Do not pull the agent out of a chat they are typing in.
        if self.tabs.active == "home":
            self.activate(pane.pane_id)
        else:
            pane.mark_unread()
        self._refresh_status()

    async def _offer_updated(self, update: pb.OfferUpdate) -> None:
        pane = self.offers.get(update.offer_id)
        if pane is None:
            return
        if update.state == pb.OFFER_STATE_ACCEPTED:
            # Accepted by this session elsewhere (e.g. the command line): show the chat.
            if not pane.answering:
                try:
                    await self.open_chat(await self.api.conversation(pane.offer.conversation_id), replace=pane)
                except Refused as err:
                    await self.remove_pane(pane, f"Accepted elsewhere, but the chat could not be opened: {err}")
            return
        await self.remove_pane(pane, f"Offer in {pane.offer.queue.display_name}: {text.offer_update(update)}")

    @work(exit_on_error=False)
    async def answer_offer(self, pane: OfferPane, accept: bool) -> None:
        try:
            if accept:
                await self.open_chat(await self.api.accept(pane.offer.offer_id), replace=pane, activate=True)
            else:
                await self.api.reject(pane.offer.offer_id)
                await self.remove_pane(pane, f"Offer in {pane.offer.queue.display_name}: rejected")
        except Refused as err:
            if err.reason in ("OFFER_NO_LONGER_VALID", "OFFER_NOT_FOUND"):
                await self.remove_pane(pane, f"Offer in {pane.offer.queue.display_name}: no longer valid")
            else:
                # Still pending as far as we know (e.g. the server is unreachable): let the agent try again.
                pane.answering = False
                self.notify(f"Could not answer the offer: {err}", severity="error")

    # --- tabs ------------------------------------------------------------------------

    async def open_chat(
        self, conv: rpb.Conversation, replace: OfferPane | None = None, activate: bool = False
    ) -> ChatPane:
        """The chat's tab (in place of its offer's tab), opened once."""
        pane = self.chats.get(conv.conversation_id)
        if pane is None:
            if self.session is None:
                raise RuntimeError("not logged in")
            pane = ChatPane(self.api, conv, self.session.agent_id, self.downloads)
            # Registered before the await, so a racing offer update finds it.
            self.chats[conv.conversation_id] = pane
            in_place = replace is not None and self.offers.get(replace.offer.offer_id) is replace
            await self.tabs.add_pane(pane, after=replace if in_place else None)
        if replace is not None:
            await self.remove_pane(replace, replaced_by=pane)
        if activate:
            self.activate(pane.pane_id)
        self._refresh_status()
        return pane

    async def remove_pane(self, pane: Pane, activity: str = "", replaced_by: Pane | None = None) -> None:
        """Remove a tab once, however many paths (our answer, the offer feed) ask for it."""
        if isinstance(pane, OfferPane) and self.offers.get(pane.offer.offer_id) is pane:
            del self.offers[pane.offer.offer_id]
            if replaced_by is not None:
                if pane.is_active:
                    self.activate(replaced_by.pane_id)
            else:
                ids = self._pane_ids()
                if pane.pane_id in ids:
                    self.offer_places[pane.offer.conversation_id] = ids[max(ids.index(pane.pane_id) - 1, 0)]
                if pane.is_active:
                    # Not the neighbouring tab: a key meant for the offer (a, r) would land in a chat's input.
                    self.activate("home")
        elif isinstance(pane, ChatPane) and self.chats.get(pane.conversation_id) is pane:
            del self.chats[pane.conversation_id]
        else:
            return
        if activity:
            self.home.log_activity(activity)  # first: once the tab is gone, what happened to it is there
        await self.tabs.remove_pane(pane.pane_id)
        self._refresh_status()

    def activate(self, pane_id: str) -> None:
        # A widget focused in the old tab would pull it back to the front (TabPane.Focused): let go first.
        self.set_focus(None)
        self.tabs.active = pane_id

    @work(exit_on_error=False)
    async def drop_pane(self, pane: Pane, activity: str = "") -> None:
        """remove_pane for a pane removing itself: the removal cancels the pane's own workers."""
        await self.remove_pane(pane, activity)

    @on(TabbedContent.TabActivated)
    def tab_activated(self, event: TabbedContent.TabActivated) -> None:
        try:
            desk = event.tabbed_content.screen  # under a dialog or the login, maybe: their focus is their own
        except NoScreen:
            return  # the app is closing
        left_in = next((a for a in desk.focused.ancestors if isinstance(a, TabPane)), None) if desk.focused else None
        if left_in is not None and left_in is not event.pane:
            # A key typed now must not land in the tab just left (its input is hidden, not gone).
            desk.set_focus(None)
        if isinstance(event.pane, Pane):
            event.pane.mark_read()
            self.refresh_bindings()
            # After the refresh that shows the pane: a hidden widget cannot take focus.
            self.call_after_refresh(event.pane.focus_default)

    # --- keys ------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in DESKTOP_ACTIONS:
            return True
        # The desktop's keys, not under the login screen or a dialog.
        if len(self.screen_stack) > 1 or self.session is None:
            return False
        pane = self.tabs.active_pane
        if action == "offer":
            return isinstance(pane, OfferPane)
        if action == "chat":
            return isinstance(pane, ChatPane)
        if action == "close_tab":
            return isinstance(pane, (ChatPane, OfferPane))
        if action == "monitor":
            return self.session.supervisor
        return True

    def action_offer(self, accept: bool) -> None:
        pane = self.tabs.active_pane
        if isinstance(pane, OfferPane):
            pane.answer(accept)

    def action_monitor(self) -> None:
        if self.session is not None:
            self.push_screen(MonitorScreen(self.api, self.session.agent_id))

    @work(exit_on_error=False)
    async def open_barged_in(self, conv: rpb.Conversation) -> None:
        """A chat the supervisor barged into from the monitor screen: a tab, in front."""
        await self.open_chat(conv, activate=True)
        self.home.log_activity(f"Barged into the chat with {self.chats[conv.conversation_id].customer}")

    def action_chat(self, tool: str) -> None:
        getattr(self.tabs.active_pane, f"action_{tool}")()

    @work(exit_on_error=False, exclusive=True, group="ready")
    async def action_toggle_ready(self) -> None:
        try:
            self.ready = await self.api.set_ready(not self.ready)
        except Refused as err:
            self.notify(str(err), severity="error")
        self._refresh_status()

    def action_close_tab(self) -> None:
        pane = self.tabs.active_pane
        if isinstance(pane, ChatPane):
            pane.request_close()
        elif isinstance(pane, OfferPane):
            pane.answer(False)

    def action_next_tab(self) -> None:
        self._move_tab(1)

    def action_previous_tab(self) -> None:
        self._move_tab(-1)

    def _pane_ids(self) -> list[str]:
        """The panes' ids in the order of their tabs (the panes themselves are in the order they came)."""
        return [ContentTab.sans_prefix(t.id) for t in self.tabs.query_one(Tabs).query(Tab) if t.id is not None]

    def _move_tab(self, step: int) -> None:
        ids = self._pane_ids()
        if ids:
            here = ids.index(self.tabs.active) if self.tabs.active in ids else 0
            self.activate(ids[(here + step) % len(ids)])
