"""The supervisor screen: every queue's live figures, over chat.v1 AdminService.StreamQueueStats.

`queuechat-agent supervisor` logs in with an admin account (the figures are
the organisation's, not one agent's) and shows one row per queue, refreshed
as the server sends new figures (at most once a second). SupervisorClient is
the small AdminService client it runs on; like the agent's feeds it
reconnects by itself, and as every snapshot is complete a reconnect needs
no cursor.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime, timedelta

import grpc
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import Screen
from textual.widgets import Button, DataTable, Footer, Input, Label, Static

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import admin_service_pb2_grpc

from . import text
from .client import _CHANNEL_OPTIONS, Backoff, Refused, SessionEnded

# (column key, heading): one row per queue.
COLUMNS = (
    ("queue", "Queue"),
    ("waiting", "Waiting"),
    ("longest", "Longest wait"),
    ("ready", "Ready"),
    ("busy", "Busy"),
    ("not_ready", "Not ready"),
    ("accepted", "Accepted"),
    ("rejected", "Rejected"),
    ("timed_out", "Timed out"),
    ("service", "Service level"),
)


class SupervisorClient:
    """An admin's connection: log in, then follow the queue figures."""

    def __init__(self, address: str, token: str = "", *, backoff: Backoff | None = None):
        self.address = address
        self.token = token
        self.backoff = backoff or Backoff()
        # Called with False when the figures stream loses the server, True when it is back.
        self.on_connection: Callable[[bool], None] | None = None
        self.connected = True
        self.reconnects = 0
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = admin_service_pb2_grpc.AdminServiceStub(self.channel)

    async def aclose(self) -> None:
        await self.channel.close()

    async def login(self, username: str, password: str) -> str:
        """An admin token (kept for the calls that follow). Not retried: a wrong address says so at once."""
        try:
            resp = await self.stub.Login(admin_pb.AdminServiceLoginRequest(username=username, password=password))
        except grpc.aio.AioRpcError as err:
            raise Refused.from_error(err) from None
        self.token = str(resp.admin_token)
        return self.token

    async def queue_stats(self, queue_ids: Sequence[str] = ()) -> AsyncIterator[admin_pb.QueueStatsSnapshot | None]:
        """Snapshots as they come, and None for a heartbeat (the figures still hold).

        On UNAVAILABLE it reopens the stream with backoff; the first snapshot after that is complete,
        like every other. UNAUTHENTICATED raises SessionEnded, any other refusal Refused."""
        request = admin_pb.StreamQueueStatsRequest(queue_ids=list(queue_ids))
        delays = self.backoff.delays()
        while True:
            call = self.stub.StreamQueueStats(request, metadata=(("authorization", f"Bearer {self.token}"),))
            try:
                async for item in call:
                    if item.HasField("snapshot"):
                        self._set_connected(True)
                        delays = self.backoff.delays()
                        yield item.snapshot
                    else:
                        yield None
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise Refused.from_error(err) from None
            finally:
                call.cancel()
            # Figures never end: a stream that did (a server going away) is reopened.
            self._set_connected(False)
            self.reconnects += 1
            await asyncio.sleep(next(delays))

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            if self.on_connection is not None:
                self.on_connection(connected)


def cells(q: admin_pb.QueueStats) -> dict[str, str | Text]:
    """One queue's row, by column key. A wait past the service-level target is shown in red."""
    longest = q.longest_wait.ToTimedelta()
    late = q.waiting_count > 0 and longest > q.service_level_target.ToTimedelta()

    def number(n: int) -> Text:
        return Text(str(n), justify="right")

    wait = text.duration(longest) if q.waiting_count else "–"
    return {
        "queue": q.queue.display_name or q.queue.queue_id,
        "waiting": number(q.waiting_count),
        "longest": Text(wait, style="bold red" if late else "", justify="right"),
        "ready": number(q.agents_ready),
        "busy": number(q.agents_busy),
        "not_ready": number(q.agents_not_ready),
        "accepted": number(q.offers_accepted),
        "rejected": number(q.offers_rejected),
        "timed_out": number(q.offers_timed_out),
        "service": Text(f"{q.service_level:.0%}" if q.HasField("service_level") else "–", justify="right"),
    }


def _seconds(d: timedelta) -> str:
    s = d.total_seconds()
    return f"{s:g} s" if s < 120 else f"{s / 60:g} min"


class SupervisorLoginScreen(Screen[tuple[SupervisorClient, str]]):
    """Server and admin credentials: dismisses with (client, admin username)."""

    DEFAULT_CSS = """
    SupervisorLoginScreen { align: center middle; }
    SupervisorLoginScreen > Vertical {
        width: 60; height: auto; border: thick $accent; padding: 1 2; background: $surface;
    }
    SupervisorLoginScreen .title { text-style: bold; margin-bottom: 1; }
    SupervisorLoginScreen Input { margin-bottom: 1; }
    SupervisorLoginScreen Button { margin-top: 1; width: 100%; }
    SupervisorLoginScreen .error { color: $error; margin-top: 1; }
    """

    def __init__(self, server: str, username: str, password: str, message: str = ""):
        super().__init__()
        self.defaults = (server, username, password)
        self.message = message

    def compose(self) -> ComposeResult:
        server, username, password = self.defaults
        with Vertical():
            yield Label("queuechat · supervisor log in (admin account)", classes="title")
            yield Input(server, placeholder="server address, host:port", id="server")
            yield Input(username, placeholder="admin username", id="username")
            yield Input(password, placeholder="password", password=True, id="password")
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
        if not all(value(f) for f in ("server", "username", "password")):
            error.update("Fill in all three fields.")
            return
        error.update("Logging in…")
        client = SupervisorClient(value("server"))
        try:
            await client.login(value("username"), value("password"))
        except Refused as err:
            await client.aclose()
            error.update(Content(str(err)))
            return
        self.dismiss((client, value("username")))


class SupervisorApp(App[None]):
    """Every queue's figures, live: one row per queue."""

    TITLE = "queuechat supervisor"
    ENABLE_COMMAND_PALETTE = False
    CSS = """
    #banner { height: 1; display: none; background: $error; color: $text; text-style: bold; padding: 0 1; }
    #status { height: 1; background: $panel; padding: 0 1; }
    #figures { height: 1fr; }
    #legend { height: auto; color: $text-muted; padding: 0 1; }
    """
    BINDINGS = [Binding("ctrl+q", "quit", "Quit", priority=True)]

    def __init__(
        self, server: str = "localhost:50051", username: str = "", password: str = "", queue_ids: Sequence[str] = ()
    ):
        super().__init__()
        self.login_defaults = (server, username, password)
        self.queue_ids = tuple(queue_ids)
        self.client: SupervisorClient | None = None
        self.admin = ""
        self.snapshot: admin_pb.QueueStatsSnapshot | None = None
        self.heard: datetime | None = None  # the last snapshot or heartbeat

    def compose(self) -> ComposeResult:
        yield Static(id="banner")
        yield Static(id="status")
        yield DataTable(id="figures", cursor_type="row", zebra_stripes=True)
        yield Static(
            "Waiting: chats in the queue, on offer included · Ready: can be offered a chat now · "
            "Busy: every slot taken · Not ready: set not ready, or no offer stream · "
            "Accepted/Rejected/Timed out: chat offers in the window · Service level: answered within the target",
            id="legend",
        )
        yield Footer()

    def on_mount(self) -> None:
        table = self.table
        for key, label in COLUMNS:
            table.add_column(label if key == "queue" else Text(label, justify="right"), key=key)
        self._show_login()

    async def on_unmount(self) -> None:
        if self.client is not None:
            await self.client.aclose()

    @property
    def table(self) -> DataTable[str | Text]:
        return self.query_one("#figures", DataTable)

    def _show_login(self, message: str = "") -> None:
        self.push_screen(SupervisorLoginScreen(*self.login_defaults, message=message), self._login_done)

    def _login_done(self, result: tuple[SupervisorClient, str] | None) -> None:
        if result is None:
            return
        self.client, self.admin = result
        self.client.on_connection = self._connection_changed
        self._refresh_status()
        self._follow()

    @work(exit_on_error=False, group="stats", exclusive=True)
    async def _follow(self) -> None:
        client = self.client
        if client is None:
            return
        try:
            async for snapshot in client.queue_stats(self.queue_ids):
                self.heard = datetime.now()
                if snapshot is not None:
                    self.show(snapshot)
                self._refresh_status()
        except SessionEnded as err:
            await self._logged_out(f"Your admin session has ended ({err.reason or err.code.name}). Log in again.")
        except Refused as err:
            self.query_one("#status", Static).update(Content(f"The figures stopped: {err}"))

    async def _logged_out(self, message: str) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.snapshot = None
        self.table.clear()
        self._connection_changed(True)
        self._refresh_status()
        self._show_login(message)

    def show(self, snapshot: admin_pb.QueueStatsSnapshot) -> None:
        """Update the rows in place (the cursor stays), or rebuild them when queues came or went."""
        table = self.table
        rows = [(q.queue.queue_id, cells(q)) for q in snapshot.queues]
        if [key.value for key in table.rows] != [queue_id for queue_id, _ in rows]:
            table.clear()
            for queue_id, row in rows:
                table.add_row(*(row[key] for key, _ in COLUMNS), key=queue_id)
        else:
            for queue_id, row in rows:
                for key, value in row.items():
                    table.update_cell(queue_id, key, value)
        self.snapshot = snapshot

    def _connection_changed(self, connected: bool) -> None:
        banner = self.query_one("#banner", Static)
        address = self.client.address if self.client else ""
        banner.update(Content(f"Connection to {address} lost: reconnecting. The figures shown are not live."))
        banner.display = not connected

    def _refresh_status(self) -> None:
        status = self.query_one("#status", Static)
        if self.client is None:
            status.update("")
            return
        parts = [f"Supervisor {self.admin}", self.client.address]
        snap = self.snapshot
        if snap is not None:
            target = snap.queues[0].service_level_target.ToTimedelta() if snap.queues else None
            parts.append(f"offers over the last {_seconds(snap.window.ToTimedelta())}")
            if target is not None:
                parts.append(f"service-level target {_seconds(target)}")
        if self.heard is not None:
            parts.append(f"live at {self.heard.strftime('%H:%M:%S')}")
        status.update(Content(" · ".join(parts)))
