"""Helpers for the agent client tests: polling the app, logging in through it, a droppable TCP proxy."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable

import jwt
from files import Uploader
from harness import IDENTITY_SECRET, WAIT
from textual.widget import Widget
from textual.widgets import Button

from chat.v1 import customer_service_pb2 as cust_pb
from queuechat_agent.app import AgentApp
from queuechat_agent.panes import Entry, OfferPane


async def until(pilot, pred: Callable[[], object], what: str, timeout: float = WAIT):
    """Let the app run until pred() is truthy; its value."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (value := pred()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)
    return value


async def click(pilot, selector: str) -> None:
    """Click a widget once it is on screen, and not while a button press still animates (that click is ignored)."""

    def ready() -> bool:
        widget = next(iter(pilot.app.screen.query(selector)), None)
        pressing = isinstance(widget, Button) and widget.has_class("-active")
        return widget is not None and bool(widget.region) and not pressing

    await until(pilot, ready, f"{selector} ready for a click")
    await pilot.click(selector)


async def log_in(pilot, address: str, agent_id: str = "agent1", profile: str = "both") -> None:
    """Fill in the login screen like an agent would, and wait for the desktop."""
    app: AgentApp = pilot.app
    n = agent_id.removeprefix("agent")
    for field, value in (("#server", address), ("#username", agent_id), ("#password", f"pw{n}"), ("#profile", profile)):
        app.screen.query_one(field).value = value
    await click(pilot, "#login")
    await until(pilot, lambda: app.session is not None and len(app.screen_stack) == 1, "the desktop after login")
    # Offers only come while the offer stream is open: wait for it to be live.
    await until(pilot, lambda: app.offer_feed is not None and app.offer_feed.live, "the offer stream")


def lines(pane: Widget) -> list[str]:
    """The plain text of the lines in a chat tab (or the home tab's activity)."""
    return [e.line.plain for e in pane.query(Entry)]


def screen_text(app: AgentApp) -> list[str]:
    """What the terminal shows now, one string per row (cells as Rich counts them)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


def offer_pane(app: AgentApp, conversation_id: str) -> OfferPane | None:
    """The offer tab for a conversation, once it is on screen with its parts (mounted, then composed)."""
    return next(
        (
            p
            for p in app.offers.values()
            if p.offer.conversation_id == conversation_id and p.is_mounted and p.query(".waiting")
        ),
        None,
    )


async def customer_sends_file(cust, data: bytes, name: str, text: str = ""):
    """The customer uploads a file and sends it on a message; its attachment."""
    att = await Uploader(cust.stub, cust.md, cust.id, customer=True).upload(data, name)
    req = cust_pb.CustomerServiceSendMessageRequest(
        conversation_id=cust.id, text=text, attachment_ids=[att.attachment_id], request_id=uuid.uuid4().hex
    )
    await cust.stub.SendMessage(req, metadata=cust.md)
    return att


def identity_token(**claims: str) -> str:
    """An identity token as the hosting site signs it: its claims become authenticated variables."""
    return jwt.encode({**claims, "exp": int(time.time()) + 300}, IDENTITY_SECRET, algorithm="HS256")


class Proxy:
    """A TCP proxy in front of the server whose connections can be cut, like a network drop."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.links: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.connections += 1
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.links -= {writer, up_writer}

    def drop(self) -> None:
        """Cut every open connection; new ones are still let through."""
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()

    async def stop(self) -> None:
        self.drop()
        self.server.close()
        await self.server.wait_closed()
