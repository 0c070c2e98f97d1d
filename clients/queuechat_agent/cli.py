"""queuechat-agent: the terminal desktop (no subcommand, or `ui`) and a scriptable mode for integrators.

Exit codes: 0 ok, 1 refused by the server (code, reason and message on stderr), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any, TextIO

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import resources_pb2 as rpb

from . import text
from .client import AgentClient, Refused

DEFAULT_SERVER = "localhost:50051"


class Usage(Exception):
    """A mistake in how the command was called (exit code 2)."""


def _default_session_file() -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "queuechat-agent" / "session.json"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="queuechat-agent", description="The queuechat agent's terminal desktop, and a scriptable mode."
    )
    p.add_argument(
        "--server",
        help=f"server address (default: the logged-in session's, else $QUEUECHAT_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--session-file",
        type=Path,
        help="where login keeps the session token "
        "(default: $QUEUECHAT_AGENT_SESSION or ~/.local/state/queuechat-agent/session.json)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    ui = sub.add_parser("ui", help="the terminal desktop (the default)")
    ui.add_argument("--username", default=os.environ.get("QUEUECHAT_AGENT_USER", ""))
    ui.add_argument("--profile", default=os.environ.get("QUEUECHAT_AGENT_PROFILE", ""))
    ui.add_argument("--not-ready", action="store_true", help="log in not ready")
    ui.add_argument(
        "--downloads",
        type=Path,
        default=os.environ.get("QUEUECHAT_AGENT_DOWNLOADS"),
        help="where downloads go (default ~/Downloads)",
    )

    sup = sub.add_parser("supervisor", help="the supervisor screen: every queue's live figures (an admin login)")
    sup.add_argument("--username", default=os.environ.get("QUEUECHAT_ADMIN_USER", ""), help="the admin's username")
    sup.add_argument(
        "--queue", action="append", default=[], metavar="ID", help="only this queue (repeat for more; default: all)"
    )

    login = sub.add_parser("login", help="log in; prints the session as JSON and saves it to the session file")
    login.add_argument("--username", required=True)
    login.add_argument(
        "--password", default=os.environ.get("QUEUECHAT_AGENT_PASSWORD"), help="default: $QUEUECHAT_AGENT_PASSWORD"
    )
    login.add_argument("--profile", required=True)
    login.add_argument("--ready", action="store_true", help="start ready for chats")

    sub.add_parser("logout", help="end the session and remove the session file")
    ready = sub.add_parser("ready", help="ready (on) or not ready (off) for chats")
    ready.add_argument("state", choices=["on", "off"])

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--json", action="store_true", help="JSON output (one object per line)")
        return c

    offers = cmd("offers", "stream offers and their outcomes (offers are only made while this runs)")
    offers.add_argument("--once", action="store_true", help="exit after the first offer")
    offers.add_argument("--after-seq", type=int, default=0, help="resume the session's offer feed after this seq")
    cmd("accept", "accept an offer").add_argument("offer_id")
    cmd("reject", "reject an offer").add_argument("offer_id")
    conversations = cmd("conversations", "the conversations you are in")
    conversations.add_argument("--closed", action="store_true", help="include closed ones")
    send = cmd("send", "send a message (text, a predefined message, files)")
    send.add_argument("conversation_id")
    send.add_argument("text", nargs="?", default="")
    send.add_argument("--private", action="store_true", help="agents only")
    send.add_argument(
        "--predefined", default="", metavar="ID", help="a predefined message; its body is sent when TEXT is empty"
    )
    send.add_argument("--attach", nargs="+", default=[], type=Path, metavar="PATH", help="up to five files")
    predefined = cmd("predefined", "list predefined messages")
    predefined.add_argument("conversation_id", nargs="?", default="")
    menu = cmd("menu", "offer the customer a menu")
    menu.add_argument("conversation_id")
    menu.add_argument("prompt")
    menu.add_argument("options", nargs="+", metavar="OPTION")
    invite = cmd("invite", "invite a named agent or a random agent of a queue")
    invite.add_argument("conversation_id")
    target = invite.add_mutually_exclusive_group(required=True)
    target.add_argument("--agent", default="")
    target.add_argument("--queue", default="")
    cmd("leave", "leave a conversation other agents stay in").add_argument("conversation_id")
    close = cmd("close", "close a conversation for everyone")
    close.add_argument("conversation_id")
    close.add_argument("--confirm", action="store_true", help="needed while the customer is still connected")
    close.add_argument("--wrap-up", default="", metavar="CODE", help="a wrap-up code (see wrap-up-codes)")
    close.add_argument("--note", default="", help="a wrap-up note (at most 1000 characters)")
    cmd("wrap-up-codes", "the wrap-up codes close takes for a conversation").add_argument("conversation_id")
    read = cmd("read", "mark a conversation read up to a seq")
    read.add_argument("conversation_id")
    read.add_argument("up_to_seq", type=int)
    cmd("live", "supervisors: the live chats of the supervised queues").add_argument("--queue", default="")
    monitor = cmd("monitor", "supervisors: print a conversation's events, private ones included, until it closes")
    monitor.add_argument("conversation_id")
    monitor.add_argument("--after-seq", type=int, default=0, help="only events after this seq")
    whisper = cmd("whisper", "supervisors: a note to the agents of a chat you monitor (monitor runs meanwhile)")
    whisper.add_argument("conversation_id")
    whisper.add_argument("text")
    cmd("barge-in", "supervisors: join a chat you monitor").add_argument("conversation_id")
    watch = cmd("watch", "print a conversation's events until it closes (or you leave)")
    watch.add_argument("conversation_id")
    watch.add_argument("--after-seq", type=int, default=0, help="only events after this seq")
    download = cmd("download", "download an attachment")
    download.add_argument("attachment_id")
    download.add_argument("--to", type=Path, default=Path("."), help="a directory or a file name (default: .)")
    return p


class Command:
    """One invocation: arguments, the session file and where output goes.

    The session file is read (every command but login) and written in a thread, off the event loop.
    """

    def __init__(self, args: argparse.Namespace, out: TextIO):
        self.args = args
        self.out = out
        self.session_file: Path = args.session_file or Path(
            os.environ.get("QUEUECHAT_AGENT_SESSION") or _default_session_file()
        )
        self._saved: dict[str, Any] | None = None  # the session file, once run() has read it

    def _read_session(self) -> dict[str, Any] | None:
        try:
            saved: dict[str, Any] = json.loads(self.session_file.read_text())
        except FileNotFoundError:
            return None
        return saved

    def _write_session(self, saved: dict[str, Any]) -> None:
        self.session_file.parent.mkdir(parents=True, exist_ok=True)
        # The token is a credential: readable by this user only.
        fd = os.open(self.session_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(saved, f)

    def saved(self) -> dict[str, Any]:
        if self._saved is None:
            raise Usage(f"no session in {self.session_file}: run `queuechat-agent login` first")
        return self._saved

    def server(self) -> str:
        if self.args.server:
            return str(self.args.server)
        if self._saved is not None:
            return str(self._saved.get("server", DEFAULT_SERVER))
        return os.environ.get("QUEUECHAT_SERVER", DEFAULT_SERVER)

    def emit(self, obj: dict[str, Any], human: str) -> None:
        print(
            json.dumps(obj, ensure_ascii=False) if getattr(self.args, "json", False) else human,
            file=self.out,
            flush=True,
        )

    async def run(self) -> None:
        a = self.args
        if a.command != "login":
            self._saved = await asyncio.to_thread(self._read_session)
        # A script should hear about a dead server soon rather than wait out a long retry.
        client = AgentClient(self.server(), retry_for=5.0)
        try:
            if a.command == "login":
                await self.login(client)
            else:
                client.token = self.saved()["session_token"]
                await getattr(self, a.command.replace("-", "_"))(client)
        finally:
            await client.aclose()

    async def login(self, client: AgentClient) -> None:
        a = self.args
        if not a.password:
            raise Usage("give --password or set QUEUECHAT_AGENT_PASSWORD")
        s = await client.login(a.username, a.password, a.profile, a.ready)
        saved = {
            "server": client.address,
            "session_token": s.token,
            "agent_id": s.agent_id,
            "display_name": s.display_name,
            "profile_id": s.profile_id,
            "queue_ids": list(s.queue_ids),
            "ready": s.ready,
            "supervisor": s.supervisor,
        }
        await asyncio.to_thread(self._write_session, saved)
        print(json.dumps(saved), file=self.out, flush=True)

    async def logout(self, client: AgentClient) -> None:
        await client.logout()
        await asyncio.to_thread(self.session_file.unlink, missing_ok=True)

    async def ready(self, client: AgentClient) -> None:
        ready = await client.set_ready(self.args.state == "on")
        print("ready" if ready else "not ready", file=self.out)

    async def offers(self, client: AgentClient) -> None:
        async for ev in client.offers(self.args.after_seq):
            if ev.HasField("offer"):
                o = ev.offer
                kind = "invite" if o.kind == pb.OFFER_KIND_INVITE else "chat"
                variables = ", ".join(text.variable(v).strip() for v in o.variables)
                human = f"{ev.seq} offer {o.offer_id} {kind} in {o.queue.queue_id} for {o.conversation_id} {variables}"
                self.emit(text.as_json(ev, kind="offer"), human)
                if self.args.once:
                    return
            else:
                u = ev.offer_update
                self.emit(text.as_json(ev, kind="offer_update"), f"{ev.seq} offer {u.offer_id} {text.offer_update(u)}")

    async def accept(self, client: AgentClient) -> None:
        conv = await client.accept(self.args.offer_id)
        self.emit(text.as_json(conv), f"accepted: conversation {conv.conversation_id}")

    async def reject(self, client: AgentClient) -> None:
        await client.reject(self.args.offer_id)
        self.emit({"offer_id": self.args.offer_id, "rejected": True}, "rejected")

    async def conversations(self, client: AgentClient) -> None:
        for conv in await client.conversations(self.args.closed):
            connected = "customer connected" if conv.customer_connected else "customer gone"
            human = f"{conv.conversation_id} {conv.queue.queue_id} {text.customer_name(conv.variables)} ({connected})"
            self.emit(text.as_json(conv), human)

    async def send(self, client: AgentClient) -> None:
        a = self.args
        if len(a.attach) > 5:
            raise Usage("at most five files per message")
        if not (a.text or a.predefined or a.attach):
            raise Usage("give TEXT, --predefined or --attach")
        ids = [(await client.upload(a.conversation_id, path)).attachment_id for path in a.attach]
        ev = await client.send(
            a.conversation_id, a.text, private=a.private, predefined_id=a.predefined, attachment_ids=ids
        )
        self.emit(text.as_json(ev, kind="message"), f"sent: seq {ev.seq}")

    async def predefined(self, client: AgentClient) -> None:
        for m in await client.predefined(self.args.conversation_id):
            self.emit(text.as_json(m), f"{m.predefined_message_id}: {m.title}: {m.body}")

    async def menu(self, client: AgentClient) -> None:
        ev = await client.send_menu(self.args.conversation_id, self.args.prompt, self.args.options)
        self.emit(text.as_json(ev, kind="offer_menu"), f"menu {ev.offer_menu.menu_id} sent: seq {ev.seq}")

    async def invite(self, client: AgentClient) -> None:
        inv = await client.invite(self.args.conversation_id, agent_id=self.args.agent, queue_id=self.args.queue)
        self.emit(text.as_json(inv), f"invite {inv.invite_id} to {text.invite_target(inv)}: pending")

    async def leave(self, client: AgentClient) -> None:
        await client.leave(self.args.conversation_id)
        self.emit({"conversation_id": self.args.conversation_id, "left": True}, "left")

    async def close(self, client: AgentClient) -> None:
        a = self.args
        conv = await client.close(a.conversation_id, a.confirm, wrap_up_code_id=a.wrap_up, wrap_up_note=a.note)
        self.emit(text.as_json(conv), f"closed {conv.conversation_id}")

    async def wrap_up_codes(self, client: AgentClient) -> None:
        codes, required = await client.wrap_up_codes(self.args.conversation_id)
        for c in codes:
            self.emit(text.as_json(c, required=required), f"{c.wrap_up_code_id}: {c.display_name}")
        if required and not getattr(self.args, "json", False):
            print("(this queue requires a code to close)", file=self.out)

    async def read(self, client: AgentClient) -> None:
        cursor = await client.mark_read(self.args.conversation_id, self.args.up_to_seq)
        self.emit(text.as_json(cursor), f"read up to {cursor.read_seq}")

    async def live(self, client: AgentClient) -> None:
        for lc in await client.live_conversations(self.args.queue):
            conv = lc.conversation
            agents = ", ".join(a.agent_id for a in conv.agents) or "waiting"
            name = text.customer_name(conv.variables, conv.queue, conv.conversation_id)
            handled = text.duration(lc.handling_time.ToTimedelta())
            waited = text.duration(lc.waiting_time.ToTimedelta())
            human = f"{conv.conversation_id} {conv.queue.queue_id} {name} ({agents}) waited {waited}, handled {handled}"
            self.emit(text.as_json(lc), human)

    async def watch(self, client: AgentClient) -> None:
        await self._print(client.follow(self.args.conversation_id, self.args.after_seq))

    async def monitor(self, client: AgentClient) -> None:
        await self._print(client.monitor(self.args.conversation_id, self.args.after_seq))

    async def _print(self, feed: AsyncIterable[rpb.ConversationEvent]) -> None:
        saved = self.saved()
        menus: dict[str, str] = {}
        async for ev in feed:
            line = text.describe(ev, saved.get("agent_id", ""), menus)
            self.emit(text.as_json(ev, kind=ev.WhichOneof("kind")), f"{ev.seq} {line.time} {line.plain}")

    async def whisper(self, client: AgentClient) -> None:
        ev = await client.whisper(self.args.conversation_id, self.args.text)
        self.emit(text.as_json(ev, kind="message"), f"whispered: seq {ev.seq}")

    async def barge_in(self, client: AgentClient) -> None:
        conv = await client.barge_in(self.args.conversation_id)
        self.emit(text.as_json(conv), f"joined {conv.conversation_id}")

    async def download(self, client: AgentClient) -> None:
        path = await client.download(self.args.attachment_id, self.args.to)
        self.emit({"attachment_id": self.args.attachment_id, "path": str(path)}, str(path))


async def run(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The scriptable mode: the exit code. (The desktop needs main(), which owns the terminal.)"""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # argparse's usage and help
            args = parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    if args.command in (None, "ui", "supervisor"):
        print("queuechat-agent: the desktop runs from main(), not run()", file=err)
        return 2
    try:
        await Command(args, out).run()
    except Usage as e:
        print(f"queuechat-agent: {e}", file=err)
        return 2
    except Refused as e:
        print(e, file=err)
        return 1
    except (OSError, ValueError) as e:
        print(f"queuechat-agent: {e}", file=err)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parser().parse_args(argv)
        if args.command is None:
            # Global options come before the subcommand, so the desktop is `... ui`.
            args = parser().parse_args([*argv, "ui"])
    except SystemExit as exit:
        return int(exit.code or 0)
    if args.command not in ("ui", "supervisor"):
        try:
            return asyncio.run(run(argv))
        except KeyboardInterrupt:
            return 130
    if args.command == "supervisor":
        from .supervisor import SupervisorApp

        SupervisorApp(
            server=args.server or os.environ.get("QUEUECHAT_SERVER", DEFAULT_SERVER),
            username=args.username,
            password=os.environ.get("QUEUECHAT_ADMIN_PASSWORD", ""),
            queue_ids=args.queue,
        ).run()
        return 0
    from .app import AgentApp

    AgentApp(
        server=args.server or os.environ.get("QUEUECHAT_SERVER", DEFAULT_SERVER),
        username=args.username,
        password=os.environ.get("QUEUECHAT_AGENT_PASSWORD", ""),
        profile=args.profile,
        ready=not args.not_ready,
        downloads=args.downloads,
    ).run()
    return 0
