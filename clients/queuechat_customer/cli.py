"""queuechat-customer: start a chat in a queue, print the conversation as it streams, send what is typed.

Lines read from stdin are sent as messages; a few start with a slash (/help lists them). End of input
(Ctrl-D, or the end of a pipe) ends the chat, like /end; so does Ctrl-C. Works the same with stdin
and stdout on pipes, and --json prints one JSON object per line, for scripts and tests.

Exit codes: 0 the chat is over, 1 refused by the server or the server unreachable (code, reason and
message on stderr), 2 usage, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import json
import os
import shlex
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc

from chat.v1 import resources_pb2 as rpb

from . import identity, text
from .client import Connection, CustomerClient, Refused

PROG = "queuechat-customer"
DEFAULT_SERVER = "localhost:50051"
MAX_FILES = 5
# After /end (or end of input) the server's chat_ended closes the stream; wait this long for it.
END_WAIT = 10.0
# StartChat and ListQueues: a wrong address or a stopped server should say so soon.
CONNECT_FOR = 5.0

HELP = """\
Type a line and press Enter to send it. Commands:
  /choose N        answer the last menu with option N (or its label)
  /file PATH ...   send files: text, PDF or images, up to 5 (quote a path with spaces)
  /end             end the chat; so do Ctrl-D (end of input) and Ctrl-C
  /help            this list
  //text           send a line that starts with a slash ("/text")"""


class Usage(Exception):
    """A mistake in how the command was called (exit code 2)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Chat as a customer: start a chat in a queue, see the conversation, send what you type.",
        epilog="Lines you type are sent as messages; /help in the chat lists the commands. "
        "End of input (Ctrl-D) or /end ends the chat.",
    )
    p.add_argument(
        "--server",
        metavar="HOST:PORT",
        default=os.environ.get("QUEUECHAT_SERVER", DEFAULT_SERVER),
        help=f"server address (default: $QUEUECHAT_SERVER or {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--queue", metavar="ID", help="queue id, e.g. sales (default: list the queues, and ask when on a terminal)"
    )
    p.add_argument("--name", help="your name, shown to the agent")
    p.add_argument("--email", metavar="ADDRESS", help="your e-mail address, shown to the agent")
    p.add_argument(
        "--var",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another variable for the agent, e.g. order=A-1001 (repeatable)",
    )
    signed = p.add_mutually_exclusive_group()
    signed.add_argument(
        "--identity-secret",
        metavar="SECRET",
        help="sign name and e-mail into an identity token with this secret: the agent sees them as verified",
    )
    signed.add_argument(
        "--demo-identity",
        action="store_true",
        help="the same with the server configuration's secret (--config); "
        f"name and e-mail default to {identity.DEMO_NAME} <{identity.DEMO_EMAIL}>",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="the server's configuration file, for --demo-identity (default: $QUEUECHAT_CONFIG or config/demo.toml)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object per line (events, queue positions)")
    return p


class StdinLines:
    """Lines from a file descriptor (stdin), read by a daemon thread.

    os.read, not sys.stdin: a thread blocked in sys.stdin.readline() holds the buffer's lock, which can
    stop the interpreter at exit; and non-blocking reads on a terminal would make its writes
    non-blocking too. The thread is a daemon: it may stay blocked in read() when the chat is over.
    """

    def __init__(self, fd: int = 0):
        self._fd = fd
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._pump, name="stdin", daemon=True).start()

    def _put(self, line: str | None) -> bool:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, line)
        except RuntimeError:  # the event loop is closed: nobody is reading any more
            return False
        return True

    def _pump(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                data = b""
            pending += decoder.decode(data, final=not data)
            *lines, pending = pending.split("\n")
            for line in lines:
                if not self._put(line.removesuffix("\r")):
                    return
            if not data:
                if pending:
                    self._put(pending)
                self._put(None)
                return

    async def readline(self) -> str | None:
        """The next line without its line break; None at the end of input."""
        return await self._queue.get()


class Chat:
    """One invocation: the client, where output goes, and the last offer menu."""

    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO):
        self.args = args
        self.out = out
        self.err = err
        self.json: bool = args.json
        self.client = CustomerClient(args.server)
        self.queue_name = ""
        self.menu: rpb.OfferMenu | None = None

    # --- output ----------------------------------------------------------------------

    def emit(self, obj: dict[str, Any], human: Sequence[str]) -> None:
        """A line of the conversation: obj with --json, else the human lines."""
        if self.json:
            print(json.dumps(obj, ensure_ascii=False), file=self.out, flush=True)
        else:
            print(*human, sep="\n", file=self.out, flush=True)

    def note(self, message: str) -> None:
        """For the person at the keyboard: on stdout, or on stderr with --json (stdout stays JSON)."""
        print(message, file=self.err if self.json else self.out, flush=True)

    def error(self, message: str) -> None:
        print(f"{PROG}: {message}", file=self.err, flush=True)

    # --- starting ------------------------------------------------------------------------

    def variables(self) -> tuple[dict[str, str], str]:
        """The unverified variables, and the identity token (empty without one)."""
        a = self.args
        variables: dict[str, str] = {}
        for item in a.var:
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                raise Usage(f"--var wants NAME=VALUE, not {item!r}")
            variables[name.strip()] = value
        if a.config is not None and not a.demo_identity:
            raise Usage("--config goes with --demo-identity")
        if not (a.identity_secret or a.demo_identity):
            if a.name:
                variables["name"] = a.name
            if a.email:
                variables["email"] = a.email
            return variables, ""
        if a.demo_identity:
            try:
                signer = identity.signer_from_config(a.config or identity.default_config())
            except identity.IdentityError as e:
                raise Usage(str(e)) from None
        else:
            signer = identity.Signer(a.identity_secret)
        # Name and e-mail go in the token only: signed, they are what the agent sees (with a lock).
        claims = {"name": a.name or identity.DEMO_NAME, "email": a.email or identity.DEMO_EMAIL}
        return variables, identity.sign(signer, claims)

    async def pick_queue(self, lines: StdinLines, interactive: bool) -> rpb.Queue:
        queues = await self.client.queues(retry_for=CONNECT_FOR)
        if not queues:
            raise Usage(f"the server at {self.client.address} has no queues")
        if self.args.queue:
            for q in queues:
                if q.queue_id == self.args.queue:
                    return q
            raise Usage(f"there is no queue {self.args.queue!r}; the queues are:\n{_queue_list(queues)}")
        if not interactive:
            raise Usage(f"give --queue; the queues are:\n{_queue_list(queues)}")
        print("Queues:", file=self.err)
        for i, q in enumerate(queues, 1):
            print(f"  {i}. {q.display_name or q.queue_id} ({q.queue_id})", file=self.err)
        while True:
            print(f"Queue [1-{len(queues)}]: ", end="", file=self.err, flush=True)
            answer = await lines.readline()
            if answer is None:
                raise Usage("no queue chosen")
            answer = answer.strip()
            for i, q in enumerate(queues, 1):
                if answer in (str(i), q.queue_id):
                    return q

    async def start(self, lines: StdinLines, interactive: bool) -> None:
        variables, token = self.variables()
        queue = await self.pick_queue(lines, interactive)
        self.queue_name = queue.display_name or queue.queue_id
        conv = await self.client.start_chat(queue.queue_id, variables, token, retry_for=CONNECT_FOR)
        if self.json:
            self.emit({"kind": "conversation", "conversation": text.as_json(conv)}, [])
        if interactive:
            self.note("Type a message and press Enter to send it; /help lists the commands, /end ends the chat.")

    # --- the conversation -------------------------------------------------------------------

    async def watch(self) -> None:
        """Print the conversation until the server ends the stream (the chat is over for us)."""
        async for item in self.client.follow():
            if isinstance(item, Connection):
                self.emit(
                    {"kind": "connection", "connected": item.connected},
                    ["Reconnected." if item.connected else "Connection lost; reconnecting..."],
                )
            elif isinstance(item, rpb.QueuePosition):
                obj = {
                    "kind": "queue_position",
                    "queue_id": self.client.conversation.queue.queue_id,
                    "position": item.position,
                    "waiting_count": item.waiting_count,
                }
                self.emit(obj, [text.position(item, self.queue_name)])
            else:
                if item.HasField("offer_menu"):
                    self.menu = item.offer_menu
                self.emit(text.as_json(item, kind=item.WhichOneof("kind")), text.describe(item))

    async def talk(self, lines: StdinLines) -> None:
        """Send what is typed until /end or the end of input, then end the chat."""
        while True:
            line = await lines.readline()
            if line is None or line.strip() == "/end":
                await self.client.end()
                return
            try:
                await self.command(line.strip())
            except (Refused, OSError, ValueError) as e:
                # Said, and the chat goes on: the line can be typed again.
                self.error(f"not sent: {e}")

    async def command(self, line: str) -> None:
        if not line:
            return
        if line.startswith("//"):
            await self.client.send(line[1:])
            return
        if not line.startswith("/"):
            await self.client.send(line)
            return
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if name == "/help":
            self.note(HELP)
        elif name == "/choose":
            await self.choose(rest)
        elif name == "/file":
            await self.send_files(rest)
        else:
            self.error(f"unknown command {name}: /help lists them (//text sends a line starting with /)")

    async def choose(self, answer: str) -> None:
        menu = self.menu
        if menu is None:
            self.error("no menu to answer yet")
            return
        options = list(menu.options)
        for i, o in enumerate(options, 1):
            if answer == str(i) or answer.casefold() == o.label.casefold():
                await self.client.choose(menu.menu_id, o.option_id)
                return
        self.error(f"/choose 1-{len(options)}: the options of “{menu.prompt}”")

    async def send_files(self, rest: str) -> None:
        try:
            names = shlex.split(rest)
        except ValueError as e:
            self.error(f"/file: {e}")
            return
        paths = await asyncio.to_thread(_expand, names)  # ~ may need the password database
        if not paths or len(paths) > MAX_FILES:
            self.error(f"/file PATH ...: one to {MAX_FILES} files")
            return
        ids: list[str] = []
        for path in paths:
            if not self.json:
                size = (await asyncio.to_thread(path.stat)).st_size
                self.note(f"Sending {path.name} ({text.size(size)})...")
            ids.append((await self.client.upload(path)).attachment_id)
        await self.client.send("", ids)

    async def run(self, lines: StdinLines, interactive: bool) -> int:
        await self.start(lines, interactive)
        loop = asyncio.get_running_loop()
        interrupted = asyncio.Event()

        def on_signal() -> None:
            if interactive:
                print(file=self.err, flush=True)  # off the line the terminal's ^C is on
            interrupted.set()
            # A second Ctrl-C quits at once (KeyboardInterrupt), without waiting for the server.
            loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on this platform
            loop.add_signal_handler(signal.SIGINT, on_signal)
        watch = asyncio.create_task(self.watch())
        talk = asyncio.create_task(self.talk(lines))
        stop = asyncio.create_task(interrupted.wait())
        try:
            await asyncio.wait({watch, talk, stop}, return_when=asyncio.FIRST_COMPLETED)
            code = 0
            if watch.done():
                watch.result()  # a refusal: raised
                return 0  # the chat is over (ended, or closed by the agent)
            if stop.done():
                talk.cancel()
                code = 130
                with contextlib.suppress(Refused):
                    await self.client.end(retry_for=2.0)
            else:
                talk.result()  # /end or end of input, and EndChat said yes (else: raised)
            # The chat_ended the server now sends ends the stream: print it and anything before it.
            done, _ = await asyncio.wait({watch}, timeout=END_WAIT)
            if watch in done:
                watch.result()
            return code
        finally:
            for task in (watch, talk, stop):
                task.cancel()
            await asyncio.gather(watch, talk, stop, return_exceptions=True)
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGINT)


def _expand(names: list[str]) -> list[Path]:
    return [Path(name).expanduser() for name in names]


def _queue_list(queues: Sequence[rpb.Queue]) -> str:
    width = max(len(q.queue_id) for q in queues)
    return "\n".join(f"  {q.queue_id:<{width}}  {q.display_name}" for q in queues)


async def run(argv: list[str] | None = None, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The command: the exit code."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):  # argparse's usage and help
            args = parser().parse_args(argv)
    except SystemExit as exit:
        return int(exit.code or 0)
    interactive = sys.stdin is not None and sys.stdin.isatty()
    chat = Chat(args, out, err)
    try:
        return await chat.run(StdinLines(), interactive)
    except Usage as e:
        chat.error(str(e))
        return 2
    except Refused as e:
        print(e, file=err, flush=True)
        if e.code == grpc.StatusCode.UNAVAILABLE:
            chat.error(f"is the server running at {args.server}? (scripts/serve starts one)")
        return 1
    except BrokenPipeError:
        # Whoever read the output has gone (`| head`): nothing more to say, and nowhere to say it.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if chat.client.conversation_id:
            with contextlib.suppress(Refused):
                await chat.client.end(retry_for=2.0)
        return 1
    except OSError as e:
        chat.error(str(e))
        return 1
    finally:
        await chat.client.aclose()


def main(argv: list[str] | None = None) -> int:
    try:
        return asyncio.run(run(argv))
    except KeyboardInterrupt:
        return 130
