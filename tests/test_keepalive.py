"""Keepalive: the server notices a frozen client within keepalive_time + keepalive_timeout.

A frozen client (a suspended laptop, a stopped process, a dead NAT mapping) still has an open TCP
connection; only the server's HTTP/2 keepalive pings, unanswered, reveal it. In production that is
30 s + 10 s (docs/api.md). Since grpc 1.5x the wait for a ping's ack is grpc.http2.ping_timeout_ms
(default 60 s), and keepalive_timeout_ms alone no longer shortens it: without that option a frozen
agent held its offers for ~90 s.

The test runs the server's own option set with the times scaled down, and an agent in a separate
process that it freezes with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from harness import WAIT, Harness
from sqlmodel import col, select

from queuechat.api import server as api_server
from queuechat.store.models import AgentSession

KEEPALIVE_TIME = 1.0  # s, for grpc.keepalive_time_ms (production: 30 s)
KEEPALIVE_TIMEOUT = 0.5  # s, for grpc.keepalive_timeout_ms and grpc.http2.ping_timeout_ms (production: 10 s)
MARGIN = 2.5  # s: the server ends the call, the stream's clean-up write, this test's polling, a busy machine
PING_TIMEOUT_DEFAULT_MS = 60_000  # grpc core's grpc.http2.ping_timeout_ms when it is not set
SERVER_DIR = Path(__file__).resolve().parents[1] / "server"  # the generated chat.v1 stubs

# A minimal agent on the generated stubs: log in, open StreamOffers, say "ready" once the first item
# (heartbeat or offer) arrived and an offer was seen, then keep reading.
AGENT = r"""
import sys

import grpc

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import agent_service_pb2_grpc as rpc

address, username, password = sys.argv[1:4]
stub = rpc.AgentServiceStub(grpc.insecure_channel(address))
login = stub.Login(pb.LoginRequest(username=username, password=password, profile_id="both", ready=True), timeout=10)
md = (("authorization", "Bearer " + login.session_token),)
for item in stub.StreamOffers(pb.StreamOffersRequest(after_seq=0), metadata=md):
    if item.HasField("event") and item.event.HasField("offer"):
        print("ready", item.event.offer.conversation_id, flush=True)
"""


def scaled(options: list[tuple[str, object]]) -> list[tuple[str, object]]:
    """The server's options with the keepalive times made short; options it lacks stay unset.

    BDP probing is switched off: its pings, sent as a stream starts, would notice a client frozen right
    after it opened its stream without any keepalive. The test is about the keepalive."""
    short = {
        "grpc.keepalive_time_ms": int(KEEPALIVE_TIME * 1000),
        "grpc.keepalive_timeout_ms": int(KEEPALIVE_TIMEOUT * 1000),
        "grpc.http2.ping_timeout_ms": int(KEEPALIVE_TIMEOUT * 1000),
    }
    return [(k, short.get(k, v)) for k, v in options] + [("grpc.http2.bdp_probe", 0)]


@pytest.fixture
async def server(monkeypatch, tmp_path, config):
    # ChatServer(core, address) builds its grpc.aio server from the module's _OPTIONS.
    monkeypatch.setattr(api_server, "_OPTIONS", scaled(api_server._OPTIONS))
    h = await Harness(tmp_path / "data", config).start()
    try:
        yield h
    finally:
        await h.stop()


def test_production_options_notice_a_frozen_peer_within_40_seconds():
    """The promise of docs/api.md: keepalive 30 s + 10 s timeout, and the ping's own timeout no longer."""
    opts = dict(api_server._OPTIONS)
    time_ms, timeout_ms = opts["grpc.keepalive_time_ms"], opts["grpc.keepalive_timeout_ms"]
    assert (time_ms, timeout_ms) == (30_000, 10_000)
    ping_timeout_ms = opts.get("grpc.http2.ping_timeout_ms", PING_TIMEOUT_DEFAULT_MS)
    assert ping_timeout_ms <= timeout_ms, "grpc waits grpc.http2.ping_timeout_ms for a ping's ack"
    assert time_ms + ping_timeout_ms <= 40_000


def _streams_of(agent_id: str):
    def read(s) -> int:
        rows = s.exec(
            select(AgentSession.stream_count).where(
                AgentSession.agent_id == agent_id, col(AgentSession.ended_at).is_(None)
            )
        ).all()
        assert len(rows) == 1, rows
        return rows[0]

    return read


async def _start_agent(tmp_path: Path, address: str, agent_id: str) -> tuple[asyncio.subprocess.Process, Path]:
    err = tmp_path / f"{agent_id}.stderr"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SERVER_DIR), env.get("PYTHONPATH")]))
    with err.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            AGENT,
            address,
            agent_id,
            "pw" + agent_id.removeprefix("agent"),
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
    return proc, err


async def _stop(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(proc.wait(), WAIT)


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs SIGSTOP")
async def test_frozen_agent_is_noticed_within_keepalive_time_plus_timeout(server, tmp_path):
    """SIGSTOP the agent's process: within keepalive_time + keepalive_timeout its offer stream ends on
    the server (stream_count drops to 0), and after stream_grace its pending offer goes to another agent."""
    cust = await server.customer("sales")
    proc, err = await _start_agent(tmp_path, server.address, "agent1")
    try:
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        except TimeoutError:
            raise AssertionError(f"the agent process did not get its offer: {err.read_text()}") from None
        assert line.decode().split() == ["ready", cust.id], (line, err.read_text())
        streams_of_agent1 = _streams_of("agent1")
        assert await server.core.db.read(streams_of_agent1) == 1

        os.kill(proc.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        deadline = frozen + KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + MARGIN
        while (count := await server.core.db.read(streams_of_agent1)) != 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        noticed = time.monotonic() - frozen
        assert count == 0, (
            f"the frozen agent's offer stream is still open after {noticed:.1f}s "
            f"(keepalive {KEEPALIVE_TIME}s + timeout {KEEPALIVE_TIMEOUT}s + margin {MARGIN}s)"
        )

        # Past stream_grace the offer is withdrawn and the chat goes to an agent who is there.
        grace = server.core.settings.stream_grace
        other = await server.agent("agent2", "both")
        offer = await other.wait_offer(
            cust.id, timeout=max(0.1, frozen + KEEPALIVE_TIME + KEEPALIVE_TIMEOUT + grace + MARGIN - time.monotonic())
        )
        assert offer.conversation_id == cust.id
    finally:
        await _stop(proc)
