"""queuechat-customer as a subprocess: `python -m queuechat_customer` against the test server, driven through its
stdin (a pipe) and read line by line from its stdout, with an agent on the harness's stubs at the other end.

Every wait is a readline under a timeout, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import IDENTITY_SECRET, WAIT, is_event

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """PYTHONPATH with server/ (queuechat, the generated chat.v1) and clients/ (queuechat_customer)."""
    paths = [str(ROOT / "server"), str(ROOT / "clients")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}


class Customer:
    """A running `python -m queuechat_customer`: write lines to it, wait for lines from it."""

    def __init__(self, proc: asyncio.subprocess.Process, json_mode: bool):
        self.proc = proc
        self.json = json_mode
        self.lines: list = []  # everything printed so far: dicts with --json, else str
        self._stderr: list[str] = []
        self._err_task = asyncio.get_running_loop().create_task(self._drain_stderr())

    @classmethod
    async def start(cls, server, *args: str, json_mode: bool = True) -> Customer:
        argv = [sys.executable, "-m", "queuechat_customer", "--server", server.address, *args]
        if json_mode:
            argv.append("--json")
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_env(),
            cwd=ROOT,
        )
        return cls(proc, json_mode)

    async def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._stderr.append(line.decode())

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    async def _next(self, timeout: float):
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            raise AssertionError(f"the customer command ended; stderr:\n{self.stderr}")
        line = raw.decode().rstrip("\n")
        item = json.loads(line) if self.json else line
        self.lines.append(item)
        return item

    async def wait_for(self, pred: Callable[[object], bool], timeout: float = WAIT, start: int = 0):
        """The first line printed (from index start) that matches pred, reading more lines as needed."""
        for item in self.lines[start:]:
            if pred(item):
                return item
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            try:
                item = await self._next(max(left, 0.01))
            except TimeoutError:
                raise AssertionError(
                    f"no matching line in {timeout} s; got {self.lines}\nstderr:\n{self.stderr}"
                ) from None
            if pred(item):
                return item

    async def write(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    async def exit_code(self, timeout: float = WAIT) -> int:
        """Read the rest of the output and wait for the process to end."""
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), timeout)
        for line in rest.decode().splitlines():
            self.lines.append(json.loads(line) if self.json else line)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await asyncio.wait_for(self._err_task, timeout)
        return code

    def events(self, kind: str | None = None) -> list[dict]:
        """The conversation events printed so far (the lines with a seq)."""
        assert self.json
        return [e for e in self.lines if "seq" in e and (kind is None or e["kind"] == kind)]

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._err_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._err_task


@pytest.fixture
async def customers():
    """Start customer commands with customers(server, args...); any still running at the end are killed."""
    started: list[Customer] = []

    async def start(server, *args: str, json_mode: bool = True) -> Customer:
        c = await Customer.start(server, *args, json_mode=json_mode)
        started.append(c)
        return c

    yield start
    for c in started:
        await c.kill()


def kind(name: str, pred: Callable[[dict], bool] = lambda e: True) -> Callable[[object], bool]:
    return lambda item: isinstance(item, dict) and item.get("kind") == name and pred(item)


def message(text: str) -> Callable[[object], bool]:
    return kind("message", lambda e: e["message"].get("text") == text)


async def conversation_id(cust: Customer) -> str:
    started = await cust.wait_for(kind("conversation"))
    return started["conversation"]["conversation_id"]


def agent_message(text: str):
    return is_event("message", lambda e: e.message.text == text)


def assert_in_order_once(cust: Customer) -> None:
    """Every event the customer may see, each once, in seq order (no private events here: no gaps)."""
    seqs = [e["seq"] for e in cust.events()]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


async def test_a_chat_from_the_customer_command(server, customers):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "sales", "--name", "Ada")
    conv_id = await conversation_id(cust)
    waiting = await cust.wait_for(kind("queue_position"))
    assert waiting == {"kind": "queue_position", "queue_id": "sales", "position": 1, "waiting_count": 1}

    await agent.take(conv_id)
    joined = await cust.wait_for(
        kind("participant_joined", lambda e: "agent_id" in e["participant_joined"]["participant"])
    )
    assert joined["participant_joined"]["participant"]["display_name"] == "Agent 1"
    await agent.send(conv_id, "Hello Ada, how can I help?")
    got = await cust.wait_for(message("Hello Ada, how can I help?"))
    assert got["message"]["sender"] == {
        "kind": "PARTICIPANT_KIND_AGENT",
        "agent_id": "agent1",
        "display_name": "Agent 1",
    }

    stream = agent.streams[conv_id]
    await cust.write("I'd like a quote for 12 seats")
    said = await stream.wait_for(agent_message("I'd like a quote for 12 seats"))
    assert said.event.message.sender.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    assert said.event.message.sender.display_name == "Ada"
    await cust.wait_for(message("I'd like a quote for 12 seats"))  # the customer's own line, as stored
    await cust.write("//etc is not a command")
    await stream.wait_for(agent_message("/etc is not a command"))

    await cust.write("/end")
    assert await cust.exit_code() == 0, cust.stderr
    ended = await stream.wait_for(is_event("chat_ended"))
    assert ended.event.chat_ended.ended_by.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    assert cust.events()[-1]["kind"] == "chat_ended"
    assert_in_order_once(cust)


async def test_menus_files_and_the_end_of_input(server, customers, tmp_path):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "support", "--var", "order=A-1001")
    conv_id = await conversation_id(cust)
    await agent.take(conv_id)
    stream = agent.streams[conv_id]

    req = agent_pb.SendOfferMenuRequest(
        conversation_id=conv_id,
        request_id=uuid.uuid4().hex,
        prompt="What would you like us to do?",
        options=[
            rpb.OfferMenuOption(option_id="refund", label="Refund"),
            rpb.OfferMenuOption(option_id="swap", label="Replacement"),
        ],
    )
    await agent.stub.SendOfferMenu(req, metadata=agent.md)
    menu = await cust.wait_for(kind("offer_menu"))
    assert [o["label"] for o in menu["offer_menu"]["options"]] == ["Refund", "Replacement"]
    await cust.write("/choose 3")  # no such option: refused here, nothing sent
    await cust.write("/choose 2")
    chosen = await stream.wait_for(is_event("option_chosen"))
    assert (chosen.event.option_chosen.option_id, chosen.event.option_chosen.label) == ("swap", "Replacement")

    receipt = tmp_path / "my receipt.txt"
    receipt.write_bytes(b"order A-1001, 12 seats\n" * 100)
    await cust.write(f"/file '{receipt}'")
    sent = await stream.wait_for(is_event("message", lambda e: len(e.message.attachments) == 1))
    att = sent.event.message.attachments[0]
    assert (att.file_name, att.size_bytes, att.content_type) == ("my receipt.txt", receipt.stat().st_size, "text/plain")
    shown = await cust.wait_for(kind("message", lambda e: bool(e["message"].get("attachments"))))
    assert shown["message"]["attachments"][0]["file_name"] == "my receipt.txt"
    await cust.write("/file /no/such/file.pdf")  # an error on stderr; the chat goes on
    await cust.write("still here")
    await stream.wait_for(agent_message("still here"))

    cust.close_stdin()  # the end of input ends the chat, as /end does
    assert await cust.exit_code() == 0, cust.stderr
    await stream.wait_for(is_event("chat_ended"))
    assert [e["kind"] for e in cust.events()][-4:] == ["option_chosen", "message", "message", "chat_ended"]
    # The mistakes were said on stderr, and the chat went on.
    assert "/choose 1-2" in cust.stderr and "/no/such/file.pdf" in cust.stderr
    assert_in_order_once(cust)


@pytest.mark.configure(limits={"upload_chunk_bytes": 4096})
async def test_a_file_goes_in_chunks_of_the_servers_size(server, customers, tmp_path):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "sales")
    conv_id = await conversation_id(cust)
    await agent.take(conv_id)
    data = b"".join(f"line {i}\n".encode() for i in range(3000))  # 25 kB: seven chunks of 4 kB
    doc = tmp_path / "log.txt"
    doc.write_bytes(data)
    await cust.write(f"/file {doc}")
    sent = await agent.streams[conv_id].wait_for(is_event("message", lambda e: len(e.message.attachments) == 1))
    att = sent.event.message.attachments[0]
    assert (att.file_name, att.size_bytes, att.sha256) == ("log.txt", len(data), hashlib.sha256(data).hexdigest())
    cust.close_stdin()
    assert await cust.exit_code() == 0, cust.stderr


async def test_the_agent_closing_ends_the_command_with_readable_lines(server, customers):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "sales", "--name", "Ada", json_mode=False)
    line = await cust.wait_for(lambda s: s.startswith("Waiting in queue"))
    assert line == "Waiting in queue Sales: 1 of 1"
    conv = (await agent.wait_offer()).conversation_id
    await agent.take(conv)
    await agent.send(conv, "Hello Ada")
    line = await cust.wait_for(lambda s: s.endswith("Agent 1: Hello Ada"))
    assert line[:2].isdigit() and line[2] == ":" and line[5] == " "  # HH:MM first
    await agent.close(conv, confirm=True)
    await cust.wait_for(lambda s: s.endswith(" Agent 1 ended the chat"))
    assert await cust.exit_code() == 0, cust.stderr  # stdin still open: the chat is over all the same
    assert [s[6:] for s in cust.lines if s[:2].isdigit()] == [
        "Chat started in Sales",
        "You joined the queue",
        "Agent 1 joined",
        "Agent 1: Hello Ada",
        "Agent 1 ended the chat",
    ]


@pytest.mark.configure(settings={"stream_grace": 30})
async def test_the_command_resumes_after_a_server_restart(server, customers):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "sales", "--name", "Ada")
    conv_id = await conversation_id(cust)
    await agent.take(conv_id)
    await agent.send(conv_id, "before the restart")
    await cust.wait_for(message("before the restart"))

    await server.stop()
    await cust.wait_for(kind("connection", lambda e: e["connected"] is False))
    await server.start()  # the same port and database
    agent.stub = server.agent_stub
    # Sent while the command may still be reconnecting: it arrives once, from the backlog or live.
    await agent.send(conv_id, "during the reconnect")
    await cust.wait_for(kind("connection", lambda e: e["connected"] is True))
    await cust.wait_for(message("during the reconnect"))
    await agent.send(conv_id, "after the restart")
    await cust.wait_for(message("after the restart"))
    stream = agent.open_conversation(conv_id, after_seq=0)
    await cust.write("and the customer still talks")
    await stream.wait_for(agent_message("and the customer still talks"))

    await cust.write("/end")
    assert await cust.exit_code() == 0, cust.stderr
    texts = [e["message"]["text"] for e in cust.events("message")]
    assert texts == ["before the restart", "during the reconnect", "after the restart", "and the customer still talks"]
    assert_in_order_once(cust)


async def test_demo_identity_signs_name_and_email(server, customers, tmp_path):
    config = tmp_path / "server.toml"
    config.write_text(f'[security]\nidentity_secrets = ["{IDENTITY_SECRET}"]\n')
    agent = await server.agent("agent1")
    cust = await customers(
        server, "--queue", "sales", "--demo-identity", "--config", str(config), "--name", "Grace", "--var", "order=A-1"
    )
    conv_id = await conversation_id(cust)
    offer = await agent.wait_offer(conv_id)
    variables = {v.name: (v.value, v.authenticated) for v in offer.variables}
    assert variables == {"name": ("Grace", True), "email": ("ada@example.com", True), "order": ("A-1", False)}
    cust.close_stdin()
    assert await cust.exit_code() == 0, cust.stderr


async def test_refusals_and_usage(server, customers, tmp_path):
    # No --queue and stdin not a terminal: the queues, and exit 2.
    cust = await customers(server)
    cust.close_stdin()
    assert await cust.exit_code() == 2
    assert "give --queue" in cust.stderr and "sales" in cust.stderr and "support" in cust.stderr
    cust = await customers(server, "--queue", "nope")
    assert await cust.exit_code() == 2 and "no queue 'nope'" in cust.stderr
    cust = await customers(server, "--queue", "sales", "--var", "novalue")
    assert await cust.exit_code() == 2 and "NAME=VALUE" in cust.stderr
    # A token signed with a secret the server does not know: refused, exit 1.
    cust = await customers(server, "--queue", "sales", "--identity-secret", "not-the-servers-secret-0123456789")
    assert await cust.exit_code() == 1
    assert cust.stderr.startswith("UNAUTHENTICATED IDENTITY_TOKEN_INVALID: "), cust.stderr
    cust = await customers(server, "--queue", "sales", "--demo-identity", "--config", str(tmp_path / "missing.toml"))
    assert await cust.exit_code() == 2 and "missing.toml" in cust.stderr


async def test_ctrl_c_ends_the_chat(server, customers):
    agent = await server.agent("agent1")
    cust = await customers(server, "--queue", "sales")
    conv_id = await conversation_id(cust)
    await agent.take(conv_id)
    await cust.wait_for(kind("participant_joined", lambda e: "agent_id" in e["participant_joined"]["participant"]))
    cust.proc.send_signal(signal.SIGINT)
    assert await cust.exit_code() == 130, cust.stderr
    await agent.streams[conv_id].wait_for(is_event("chat_ended"))
    assert cust.events()[-1]["kind"] == "chat_ended"
