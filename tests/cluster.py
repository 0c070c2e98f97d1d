"""Helpers for the cluster failure tests (tests/test_cluster.py): real `queuechat serve` nodes as separate
processes on loopback, on one private PostgreSQL schema and NATS, and clients that follow their streams
across nodes from a cursor, the way a real client of a cluster would.

- `nats_url()`: NATS at $QC_NATS_URL (default nats://127.0.0.1:4222); skipped where it is not reachable,
  a failure when $CI is set (CI must have it), like PostgreSQL in pgutil.
- `Node`: one `queuechat serve` process. Its stderr is kept (and written to <tmp>/<name>.log); it is ready
  when it logs `gRPC listening on port N` and gRPC health says SERVING. `kill()` is `kill -9`,
  `terminate()` a SIGTERM and a wait for the exit.
- `Cluster`: the nodes of one test, their schema, configuration file and cluster timings (environment
  variables QUEUECHAT_CLUSTER__*), and a direct connection to the schema for checking the tables.
- `Follower`: a server stream followed across nodes. It records every event as received (duplicates
  included: exactly-once is asserted, not assumed) and on a broken stream resumes with after_seq = its
  cursor on another live node.
- `call_any`: a unary call on a preferred node that moves to another node on UNAVAILABLE, with the same
  request (so the same request_id: retries are idempotent).

Waiting is on events with a deadline, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
import tomllib
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import pgutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chat.v1 import admin_service_pb2_grpc, agent_service_pb2_grpc, customer_service_pb2_grpc
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 40.0
WAIT = 15.0

# --- NATS --------------------------------------------------------------------------------------------------

_nats_problem: str | None = None
_nats_checked = False


def nats_address() -> tuple[str, int]:
    u = urlparse(os.environ.get("QC_NATS_URL", "nats://127.0.0.1:4222"))
    return u.hostname or "127.0.0.1", u.port or 4222


def nats_url() -> str:
    """The NATS every node uses; skips the test (fails it when $CI is set) if NATS is not reachable."""
    global _nats_problem, _nats_checked
    host, port = nats_address()
    if not _nats_checked:
        _nats_checked = True
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                s.settimeout(3)
                hello = s.recv(4096)
            if not hello.startswith(b"INFO "):
                _nats_problem = f"{host}:{port} answered, but not as NATS: {hello[:40]!r}"
        except OSError as e:
            _nats_problem = f"NATS at {host}:{port} is not reachable ({e})"
    if _nats_problem:
        if os.environ.get("CI"):
            pytest.fail(f"{_nats_problem}; CI must provide NATS", pytrace=False)
        pytest.skip(f"{_nats_problem}; set QC_NATS_URL or start nats-server to run the cluster tests")
    return f"nats://{host}:{port}"


# --- configuration -----------------------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(doc: dict[str, Any]) -> str:
    """The configuration document (tests/harness.py base_config) as a TOML file: flat tables and arrays of them."""
    out: list[str] = []
    tables = {k: v for k, v in doc.items() if isinstance(v, dict)}
    arrays = {k: v for k, v in doc.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)}
    for k, v in doc.items():
        if k not in tables and k not in arrays:
            out.append(f"{k} = {_toml_value(v)}")
    for k, table in tables.items():
        out.append(f"\n[{k}]")
        out += [f"{kk} = {_toml_value(vv)}" for kk, vv in table.items()]
    for k, items in arrays.items():
        for item in items:
            out.append(f"\n[[{k}]]")
            out += [f"{kk} = {_toml_value(vv)}" for kk, vv in item.items()]
    text = "\n".join(out) + "\n"
    assert tomllib.loads(text) == doc, "the TOML writer lost something"
    return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a node --------------------------------------------------------------------------------------------------


class Node:
    """One `queuechat serve` process of the cluster (or, with workers > 1, one port with several)."""

    def __init__(self, cluster: Cluster, name: str, *, port: int = 0, workers: int = 1, nats: str | None = None):
        self.cluster = cluster
        self.name = name
        self.port = port
        self.workers = workers
        self.nats = nats
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.stopping = False  # a signal was sent (for the record; clients find out for themselves)
        self.channel: grpc.aio.Channel | None = None
        self._changed = asyncio.Condition()
        self._reader: asyncio.Task[None] | None = None
        self._log = None

    def __repr__(self) -> str:
        return f"<node {self.name} :{self.port}{' stopping' if self.stopping else ''}>"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        """The process runs (a draining node too: clients find out it is going from its answers, as real ones do)."""
        return self.proc is not None and self.proc.returncode is None

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def command(self) -> list[str]:
        c = self.cluster
        cmd = [
            sys.executable, "-m", "queuechat", "serve", "--config", str(c.config_path),
            "--database-url", c.database_url, "--nats-url", self.nats or c.nats,
            "--node-id", self.name, "--listen", f"127.0.0.1:{self.port}",
            "--web-listen", "", "--metrics-listen", "", "--data-dir", str(c.tmp / f"data-{self.name}"),
        ]  # fmt: skip
        if self.workers > 1:
            cmd += ["--workers", str(self.workers)]
        return cmd

    async def start(self, timeout: float = START_TIMEOUT) -> Node:
        c = self.cluster
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **c.env}
        env.pop("QUEUECHAT_DATABASE_URL", None)
        env.pop("QUEUECHAT_NATS_URL", None)
        if self.channel is not None:  # a restart
            await self.channel.close()
            self.channel = None
        if self._log:
            self._log.close()
        self.lines = []
        self.stopping = False
        self._log = (c.tmp / f"{self.name}.log").open("a")
        self.proc = await asyncio.create_subprocess_exec(
            *self.command(),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=env,
            cwd=str(c.tmp),
            # Its own process group: the teardown can end it and any workers it started, and nothing else.
            start_new_session=True,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read())
        pattern = re.compile(r"gRPC listening on port (\d+)")
        try:
            line = await self.wait_log(pattern, timeout)
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"node {self.name} did not start ({e}):\n{self.log[-6000:]}") from None
        self.port = int(pattern.search(line).group(1))  # type: ignore[union-attr]
        self.channel = grpc.aio.insecure_channel(self.address)
        self.agent = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.customer = customer_service_pb2_grpc.CustomerServiceStub(self.channel)
        self.admin = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        await self.wait_serving(timeout)
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        while line := (await self.proc.stderr.readline()).decode(errors="replace"):
            self.lines.append(line)
            if self._log:
                self._log.write(line)
                self._log.flush()
            async with self._changed:
                self._changed.notify_all()
        await self.proc.wait()
        async with self._changed:
            self._changed.notify_all()

    async def wait_log(self, pattern: re.Pattern[str] | str, timeout: float = WAIT, start: int = 0) -> str:
        """The first stderr line (from line `start`) matching pattern; fails if the node exits first."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern

        async def waiter() -> str:
            async with self._changed:
                while True:
                    for line in self.lines[start:]:
                        if rx.search(line):
                            return line
                    if self.proc is None or (self.proc.returncode is not None and self._reader and self._reader.done()):
                        raise AssertionError(f"node {self.name} exited ({self.proc and self.proc.returncode})")
                    await self._changed.wait()

        return await asyncio.wait_for(waiter(), timeout)

    async def wait_logs(self, pattern: str, n: int, timeout: float = WAIT) -> list[str]:
        """Wait for n stderr lines matching pattern (e.g. every worker's `listening`); those lines."""
        rx = re.compile(pattern)

        async def waiter() -> list[str]:
            async with self._changed:
                while len(found := [x for x in self.lines if rx.search(x)]) < n:
                    if self.proc is None or self.proc.returncode is not None:
                        raise AssertionError(f"node {self.name} exited")
                    await self._changed.wait()
                return found

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise AssertionError(f"node {self.name}: no {n} lines like {pattern!r}:\n{self.log[-4000:]}") from None

    async def wait_serving(self, timeout: float = WAIT) -> None:
        assert self.channel is not None
        stub = health_pb2_grpc.HealthStub(self.channel)
        deadline = time.monotonic() + timeout
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"node {self.name} never said SERVING:\n{self.log[-4000:]}")
            if self.proc is None or self.proc.returncode is not None:
                raise AssertionError(f"node {self.name} exited before serving:\n{self.log[-4000:]}")
            await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """kill -9: no drain, no goodbye, leases and timers left behind."""
        assert self.proc is not None
        self.stopping = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        await asyncio.wait_for(self.proc.wait(), 10)

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM (to the node itself, as a process manager would); its exit code once it has drained."""
        assert self.proc is not None
        self.stopping = True
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def close(self) -> None:
        """Teardown: gone however it is, channel closed."""
        if self.channel is not None:
            await self.channel.close()
            self.channel = None
        if self.proc is not None and self.proc.returncode is None:
            self.stopping = True
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
        elif self.proc is not None:
            # The node is gone, workers it started may not be: its group, and only its group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self._reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._reader, 5)
        if self._log:
            self._log.close()
            self._log = None


# --- the cluster ---------------------------------------------------------------------------------------------


def cluster_env(lease: float = 3.0, sweep: float = 0.3, reconcile: float = 1.0) -> dict[str, str]:
    return {
        "QUEUECHAT_CLUSTER__LEASE_SECONDS": str(lease),
        "QUEUECHAT_CLUSTER__SWEEP_INTERVAL": str(sweep),
        "QUEUECHAT_CLUSTER__RECONCILE_INTERVAL": str(reconcile),
    }


class Cluster:
    """The nodes of one test on one private PostgreSQL schema and one NATS."""

    def __init__(self, tmp: Path, config: dict[str, Any], env: dict[str, str], nats: str):
        self.tmp = tmp
        self.config_path = tmp / "queuechat.toml"
        self.config_path.write_text(to_toml(config))
        self.env = env
        self.nats = nats
        self.schema = pgutil.create_schema()
        self.database_url = pgutil.schema_url(self.schema)
        self.nodes: list[Node] = []
        self.followers: list[Follower] = []  # stopped before the nodes go
        self._db: Any = None

    def node(self, name: str, **kw: Any) -> Node:
        n = Node(self, name, **kw)
        self.nodes.append(n)
        return n

    async def start(self, *names: str, **kw: Any) -> list[Node]:
        """Start nodes together (on an empty schema: they race for its creation and the configuration)."""
        nodes = [self.node(name, **kw) for name in names]
        await asyncio.gather(*(n.start() for n in nodes))
        return nodes

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    async def db(self) -> Any:
        """An autocommit connection to the test's schema, for reading the tables as the nodes write them."""
        if self._db is None:
            import psycopg

            self._db = await psycopg.AsyncConnection.connect(
                host=pgutil.HOST,
                port=pgutil.PORT,
                dbname=pgutil.DATABASE,
                user=pgutil.pg_user(),
                options=f"-csearch_path={self.schema}",
                autocommit=True,
            )
        return self._db

    async def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        db = await self.db()
        cur = await db.execute(query, params or None)
        return await cur.fetchall()

    def errors(self) -> list[str]:
        """Lines the nodes logged at ERROR or worse, and tracebacks: a server that hid a failure from its
        clients (a retried deadlock is fine, an unexpected exception is not)."""
        rx = re.compile(r" (ERROR|CRITICAL) |Traceback")
        return [f"{n.name}: {line.rstrip()}" for n in self.nodes for line in n.lines if rx.search(line)]

    def logs(self) -> str:
        return "\n".join(f"===== node {n.name} =====\n{n.log[-8000:]}" for n in self.nodes)

    async def close(self) -> None:
        for f in self.followers:
            await f.stop()
        for n in self.nodes:
            await n.close()
        if self._db is not None:
            await self._db.close()
        pgutil.drop_schema(self.schema)


# --- clients across nodes --------------------------------------------------------------------------------------

RETRY_CODES = (grpc.StatusCode.UNAVAILABLE,)


def pick(nodes: Iterable[Node], prefer: Node | None = None, avoid: Iterable[Node] = ()) -> Node:
    """prefer if it is alive, else the first live node not in avoid (else any live one)."""
    nodes = list(nodes)
    avoid = set(avoid)
    if prefer is not None and prefer.alive and prefer not in avoid:
        return prefer
    for n in nodes:
        if n.alive and n not in avoid:
            return n
    for n in nodes:
        if n.alive:
            return n
    raise AssertionError(f"no live node among {nodes}")


async def call_any(
    nodes: Iterable[Node],
    fn: Callable[[Node], Awaitable[Any]],
    *,
    prefer: Node | None = None,
    timeout: float = WAIT,
    attempt_timeout: float = 5.0,
) -> Any:
    """fn(node) on prefer (or a live node); on UNAVAILABLE, or a node that does not answer in attempt_timeout,
    the same call on another live node, until timeout. Other errors are raised."""
    nodes = list(nodes)
    deadline = time.monotonic() + timeout
    failed: list[Node] = []
    while True:
        node = pick(nodes, prefer, failed)
        try:
            return await asyncio.wait_for(fn(node), attempt_timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() not in RETRY_CODES or time.monotonic() > deadline:
                raise
        except TimeoutError:
            if time.monotonic() > deadline:
                raise
        failed.append(node)
        await asyncio.sleep(0.05)


def md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class Connect:
    node: str
    after_seq: int
    at: float


class Follower:
    """A server stream followed across nodes from a cursor.

    open_call(node, after_seq) opens the stream on node. Every event is recorded as it arrives (a repeat or
    an out-of-order seq stays in `events` for the test to find); the cursor moves with events and heartbeats
    (latest_seq), as the sample clients do. A stream broken with UNAVAILABLE, CANCELLED (not by us) or a dead
    connection resumes from the cursor on `prefer` if it is alive, else another live node, avoiding the node
    it just lost. Any other error ends the follower (`error`); a normal end sets `ended`.
    """

    def __init__(
        self,
        name: str,
        nodes: list[Node],
        open_call: Callable[[Node, int], Any],
        *,
        prefer: Node | None = None,
        after_seq: int = 0,
        on_event: Callable[[Any], None] | None = None,
    ):
        self.name = name
        self.nodes = nodes
        self.open_call = open_call
        self.prefer = prefer
        self.cursor = after_seq
        self.on_event = on_event
        self.events: list[Any] = []
        self.connects: list[Connect] = []
        self.breaks: list[tuple[str, str]] = []  # (node, status code) of each broken stream
        self.heartbeats = 0
        self.positions: list[Any] = []  # QueuePosition items of a customer's stream, as they came
        self.error: grpc.aio.AioRpcError | None = None
        self.ended = False
        self.node: Node | None = None
        self.live = asyncio.Event()  # set by the first heartbeat of each connection (caught up), cleared on a break
        self._call: Any = None
        self._stopping = False
        self._paused: asyncio.Event = asyncio.Event()
        self._paused.set()
        self._cond = asyncio.Condition()
        self._task = asyncio.get_running_loop().create_task(self._run())
        if nodes:
            nodes[0].cluster.followers.append(self)

    def __repr__(self) -> str:
        return f"<follower {self.name} on {self.node} cursor {self.cursor} events {len(self.events)}>"

    async def _notify(self) -> None:
        async with self._cond:
            self._cond.notify_all()

    async def _run(self) -> None:
        avoid: list[Node] = []
        backoff = 0.05
        try:
            while True:
                await self._paused.wait()
                try:
                    node = pick(self.nodes, self.prefer, avoid)
                except AssertionError:
                    await asyncio.sleep(0.1)
                    continue
                self.node = node
                self.connects.append(Connect(node.name, self.cursor, time.monotonic()))
                self._call = call = self.open_call(node, self.cursor)
                try:
                    async for item in call:
                        kind = item.WhichOneof("kind")
                        if kind == "heartbeat":
                            self.heartbeats += 1
                            self.cursor = max(self.cursor, item.heartbeat.latest_seq)
                            if not self.live.is_set():
                                self.live.set()
                                avoid, backoff = [], 0.05
                        elif kind == "queue_position":
                            self.positions.append(item.queue_position)
                        elif kind == "event":
                            self.events.append(item.event)
                            self.cursor = max(self.cursor, item.event.seq)
                            if self.on_event is not None:
                                self.on_event(item.event)
                        await self._notify()
                    self.ended = True
                    return
                except asyncio.CancelledError:
                    if self._stopping or self._paused.is_set():
                        raise
                    # drop() cancelled the call: down until resume().
                    self.breaks.append((node.name, "DROPPED"))
                    self.live.clear()
                    await self._notify()
                    continue
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                    self.breaks.append((node.name, code.name))
                    self.live.clear()
                    await self._notify()
                    if code == grpc.StatusCode.CANCELLED and not self._paused.is_set():
                        continue  # we dropped it on purpose (drop()); resume() reopens
                    if code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN):
                        self.error = e
                        return
                    if code == grpc.StatusCode.UNKNOWN and "Stream removed" not in (e.details() or ""):
                        # grpc reports a peer that vanished mid-stream as UNKNOWN "Stream removed"; anything else
                        # UNKNOWN is a server bug to see, not to paper over.
                        self.error = e
                        return
                    avoid = [node]
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 0.5)
                finally:
                    call.cancel()
        finally:
            self.live.clear()
            await self._notify()

    async def drop(self) -> None:
        """Cut the stream from the client side (a network drop); it stays down until resume()."""
        self._paused.clear()
        if self._call is not None:
            self._call.cancel()
        await self.wait_until(lambda: not self.live.is_set(), "the stream to drop", 5)

    def resume(self, prefer: Node | None = None) -> None:
        if prefer is not None:
            self.prefer = prefer
        self._paused.set()

    async def wait_until(self, pred: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
        async def waiter() -> Any:
            async with self._cond:
                while not (value := pred()):
                    if self._task.done():
                        raise AssertionError(f"{self.name}: stream over ({self.error!r}) while waiting for {what}")
                    await self._cond.wait()
                return value

        try:
            return await asyncio.wait_for(waiter(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name}: timed out after {timeout} s waiting for {what}; {self!r}") from None

    async def wait_live(self, timeout: float = WAIT) -> None:
        await self.wait_until(self.live.is_set, "a live stream (its first heartbeat)", timeout)

    async def wait_event(self, pred: Callable[[Any], bool], what: str, timeout: float = WAIT, start: int = 0) -> Any:
        return await self.wait_until(lambda: next((e for e in self.events[start:] if pred(e)), None), what, timeout)

    def kinds(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.WhichOneof("kind") == kind]

    def texts(self) -> list[str]:
        return [e.message.text for e in self.kinds("message")]

    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]

    async def stop(self) -> None:
        self._stopping = True
        self._paused.set()
        if self._call is not None:
            self._call.cancel()
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task


def assert_once_in_order(f: Follower, *, gap_free: bool = False, first: int = 1) -> None:
    """Every event arrived once, in seq order (across reconnects); gap_free: no seq missing either."""
    seqs = f.seqs()
    repeated = sorted({s for s in seqs if seqs.count(s) > 1})
    assert not repeated, f"{f.name}: seqs {repeated} arrived more than once (connects {f.connects})"
    assert seqs == sorted(seqs), f"{f.name}: events out of seq order: {seqs}"
    if gap_free and seqs:
        missing = sorted(set(range(first, seqs[-1] + 1)) - set(seqs))
        assert not missing, f"{f.name}: seqs {missing} never arrived (connects {f.connects})"


# --- agents and customers ----------------------------------------------------------------------------------------


@dataclass
class Agent:
    """An agent logged in on the cluster: its token, its offer feed follower, its conversation followers."""

    agent_id: str
    token: str
    nodes: list[Node]
    offers: Follower | None = None
    convs: dict[str, Follower] = field(default_factory=dict)

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return md(self.token)

    def follow_offers(self, prefer: Node | None = None, after_seq: int = 0, **kw: Any) -> Follower:
        self.offers = Follower(
            f"{self.agent_id} offers",
            self.nodes,
            lambda n, after: n.agent.StreamOffers(agent_pb.StreamOffersRequest(after_seq=after), metadata=self.md),
            prefer=prefer,
            after_seq=after_seq,
            **kw,
        )
        return self.offers

    def follow(self, conversation_id: str, prefer: Node | None = None, after_seq: int = 0) -> Follower:
        def open_call(n: Node, after: int) -> Any:
            req = agent_pb.StreamConversationRequest(conversation_id=conversation_id, after_seq=after)
            return n.agent.StreamConversation(req, metadata=self.md)

        f = Follower(
            f"{self.agent_id} {conversation_id[:8]}", self.nodes, open_call, prefer=prefer, after_seq=after_seq
        )
        self.convs[conversation_id] = f
        return f

    def offers_made(self) -> list[agent_pb.Offer]:
        assert self.offers is not None
        return [e.offer for e in self.offers.events if e.WhichOneof("kind") == "offer"]

    def updates(self, offer_id: str) -> list[agent_pb.OfferUpdate]:
        assert self.offers is not None
        return [
            e.offer_update
            for e in self.offers.events
            if e.WhichOneof("kind") == "offer_update" and e.offer_update.offer_id == offer_id
        ]

    async def wait_offer(self, conversation_id: str, timeout: float = WAIT) -> agent_pb.Offer:
        assert self.offers is not None
        ev = await self.offers.wait_event(
            lambda e: e.WhichOneof("kind") == "offer" and e.offer.conversation_id == conversation_id,
            f"an offer of {conversation_id}",
            timeout,
        )
        return ev.offer

    async def wait_update(self, offer_id: str, timeout: float = WAIT) -> agent_pb.OfferUpdate:
        assert self.offers is not None
        ev = await self.offers.wait_event(
            lambda e: e.WhichOneof("kind") == "offer_update" and e.offer_update.offer_id == offer_id,
            f"the outcome of offer {offer_id}",
            timeout,
        )
        return ev.offer_update

    async def accept(self, offer_id: str, prefer: Node | None = None) -> rpb.Conversation:
        resp = await call_any(
            self.nodes,
            lambda n: n.agent.AcceptOffer(agent_pb.AcceptOfferRequest(offer_id=offer_id), metadata=self.md),
            prefer=prefer,
        )
        return resp.conversation

    async def reject(self, offer_id: str, prefer: Node | None = None) -> None:
        await call_any(
            self.nodes,
            lambda n: n.agent.RejectOffer(agent_pb.RejectOfferRequest(offer_id=offer_id), metadata=self.md),
            prefer=prefer,
        )

    async def send(self, conversation_id: str, text: str, *, prefer: Node | None = None, private: bool = False):
        req = agent_pb.SendMessageRequest(
            conversation_id=conversation_id,
            request_id=uuid.uuid4().hex,
            text=text,
            visibility=rpb.VISIBILITY_AGENTS_ONLY if private else rpb.VISIBILITY_ALL,
        )
        resp = await call_any(self.nodes, lambda n: n.agent.SendMessage(req, metadata=self.md), prefer=prefer)
        return resp.event

    async def set_ready(self, ready: bool, prefer: Node | None = None) -> None:
        state = agent_pb.AGENT_STATE_READY if ready else agent_pb.AGENT_STATE_NOT_READY
        req = agent_pb.SetAgentStateRequest(state=state)
        await call_any(self.nodes, lambda n: n.agent.SetAgentState(req, metadata=self.md), prefer=prefer)

    async def close_chat(self, conversation_id: str, prefer: Node | None = None) -> None:
        req = agent_pb.CloseConversationRequest(conversation_id=conversation_id, confirm=True)
        await call_any(self.nodes, lambda n: n.agent.CloseConversation(req, metadata=self.md), prefer=prefer)

    async def conversations(self, prefer: Node | None = None) -> list[rpb.Conversation]:
        resp = await call_any(
            self.nodes,
            lambda n: n.agent.ListConversations(agent_pb.ListConversationsRequest(), metadata=self.md),
            prefer=prefer,
        )
        return list(resp.conversations)

    async def stop(self) -> None:
        for f in [*self.convs.values(), *([self.offers] if self.offers else [])]:
            await f.stop()


async def login(nodes: list[Node], agent_id: str, *, via: Node | None = None, ready: bool = True) -> Agent:
    n = agent_id.removeprefix("agent")
    req = agent_pb.LoginRequest(username=agent_id, password=f"pw{n}", profile_id="both", ready=ready)
    resp = await call_any(nodes, lambda node: node.agent.Login(req), prefer=via)
    return Agent(agent_id, resp.session_token, nodes)


@dataclass
class Customer:
    conversation_id: str
    token: str
    nodes: list[Node]
    stream: Follower | None = None

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return md(self.token)

    def follow(self, prefer: Node | None = None, after_seq: int = 0) -> Follower:
        def open_call(n: Node, after: int) -> Any:
            req = cust_pb.CustomerServiceStreamConversationRequest(
                conversation_id=self.conversation_id, after_seq=after
            )
            return n.customer.StreamConversation(req, metadata=self.md)

        self.stream = Follower(
            f"customer {self.conversation_id[:8]}", self.nodes, open_call, prefer=prefer, after_seq=after_seq
        )
        return self.stream

    async def send(self, text: str, *, prefer: Node | None = None):
        req = cust_pb.CustomerServiceSendMessageRequest(
            conversation_id=self.conversation_id, text=text, request_id=uuid.uuid4().hex
        )
        resp = await call_any(self.nodes, lambda n: n.customer.SendMessage(req, metadata=self.md), prefer=prefer)
        return resp.event

    async def transcript(self, prefer: Node | None = None) -> list[rpb.ConversationEvent]:
        req = cust_pb.GetTranscriptRequest(conversation_id=self.conversation_id)
        resp = await call_any(self.nodes, lambda n: n.customer.GetTranscript(req, metadata=self.md), prefer=prefer)
        return list(resp.events)

    async def stop(self) -> None:
        if self.stream is not None:
            await self.stream.stop()


async def start_chat(nodes: list[Node], queue: str = "sales", *, via: Node | None = None, name: str = "") -> Customer:
    req = cust_pb.StartChatRequest(
        queue_id=queue, request_id=uuid.uuid4().hex, variables={"name": name} if name else {}
    )
    resp = await call_any(nodes, lambda n: n.customer.StartChat(req), prefer=via)
    return Customer(resp.conversation.conversation_id, resp.customer_token, nodes)


async def until(pred: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT, every: float = 0.05) -> Any:
    """Poll an async condition (the database, a call) until it holds; its value. For what no stream tells."""
    deadline = time.monotonic() + timeout
    while True:
        value = await pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(every)
