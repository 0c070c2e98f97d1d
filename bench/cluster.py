"""Cluster phases of scripts/bench: queuechat nodes on PostgreSQL + NATS, driven from this process.

    python bench/cluster.py saturation --nodes N ...   # throughput and CPU per message (nodes, PostgreSQL, NATS)
    python bench/cluster.py cross ...                  # customer on one node, agent on another: latency
    python bench/cluster.py failover ...               # kill -9 of the node holding streams, over and over

Each run creates a private schema in database `test` (dropped afterwards), writes the bench
configuration (bench/run.py config()), starts the nodes as separate `queuechat serve` processes on
fixed loopback ports and prints one JSON line. Clients follow their streams across nodes from their
cursor, as real clients of a cluster do, and every send carries a request_id so a retry after a dead
node is idempotent. What they received is compared with what the sends returned (lost, duplicated);
the routing invariants (over capacity, a chat offered twice) are read from the database every half
second and at the end.

CPU per message is read from /proc/<pid>/stat (utime + stime) over the sending window:
- nodes: the node processes;
- PostgreSQL: the backends serving this run (pg_stat_activity, application_name = the schema, set in
  the nodes' connection options) and, separately, PostgreSQL's own background processes (WAL writer,
  checkpointer, ...), which are shared with anything else using the server;
- NATS: the nats-server process(es), also shared with anything else on this machine using it.

For diagnosis (environment): BENCH_DUMP=FILE writes the cross phase's sends as JSON
[seconds into the talk, ms to answer, side]; BENCH_KEEP_LOGS=DIR copies each node's log and final /metrics
there; BENCH_NODE_ENV="K=V ..." adds variables to the nodes' environment (PYTHONASYNCIODEBUG=1, say).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import grpc
from loadgen import AgentDesk, Pool, md, percentile, timetable

from chat.v1 import agent_service_pb2 as apb
from chat.v1 import customer_service_pb2 as cpb

ROOT = Path(__file__).resolve().parent.parent
PG_HOST = os.environ.get("QC_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("QC_PG_PORT", "5432"))
PG_DB = os.environ.get("QC_PG_DATABASE", "test")
NATS_URL = os.environ.get("QC_NATS_URL", "nats://127.0.0.1:4222")
START_TIMEOUT = 60.0
T0 = time.monotonic()
DUMP: list | None = [] if os.environ.get("BENCH_DUMP") else None  # the cross phase's sends (diagnosis)
ARRIVALS: dict[str, float] = {}  # how the phase's chats arrived: StartChat and offer latency
STEPS: dict[str, float] = {}  # seconds since start at each step of the phase (where the time goes)


def step(name: str) -> None:
    STEPS[name] = round(time.monotonic() - T0, 2)

# The routing invariants, as tests/test_cluster.py checks them.
VIOLATIONS = """
SELECT 'over_capacity', l.agent_id FROM (
    SELECT agent_id, count(*) AS n FROM (
        SELECT p.agent_id FROM participant p JOIN conversation c ON c.id = p.conversation_id
         WHERE p.left_at IS NULL AND c.status <> 'closed'
        UNION ALL
        SELECT o.agent_id FROM offer o WHERE o.status = 'pending'
    ) x GROUP BY agent_id
) l JOIN agent a ON a.id = l.agent_id WHERE l.n > a.max_chats
UNION ALL
SELECT 'double_offers', conversation_id FROM offer WHERE status = 'pending' AND kind = 'chat'
 GROUP BY conversation_id HAVING count(*) > 1
UNION ALL
SELECT 'double_offers', o.conversation_id FROM offer o JOIN conversation c ON c.id = o.conversation_id
 WHERE o.status = 'pending' AND o.kind = 'chat' AND c.status <> 'queued'
UNION ALL
SELECT 'double_offers', conversation_id FROM offer WHERE kind = 'chat' AND status = 'accepted'
 GROUP BY conversation_id HAVING count(*) > 1
"""


# --- where PostgreSQL and NATS are ----------------------------------------------------------------------------

_pg_user: str | None = None


def pg_connect(user: str | None = None, schema: str | None = None):
    import psycopg

    kw = {"options": f"-csearch_path={schema}"} if schema else {}
    return psycopg.connect(
        host=PG_HOST,
        port=PG_PORT,
        dbname=PG_DB,
        user=user or pg_user(),
        connect_timeout=5,
        autocommit=True,
        application_name="queuechat-bench",
        **kw,
    )


def pg_user() -> str:
    """The first of $QC_PG_USER, $PGUSER, postgres, root that connects (trust auth), as tests/pgutil.py."""
    global _pg_user
    if _pg_user is None:
        errors = []
        for user in dict.fromkeys(
            u for u in (os.environ.get("QC_PG_USER"), os.environ.get("PGUSER"), "postgres", "root") if u
        ):
            try:
                with pg_connect(user) as c:
                    c.execute("select 1")
                _pg_user = user
                break
            except Exception as e:  # noqa: BLE001 - any failure means "not usable"
                errors.append(f"as {user}: {' '.join(str(e).split())}")
        if _pg_user is None:
            raise RuntimeError(f"PostgreSQL at {PG_HOST}:{PG_PORT}/{PG_DB} is not reachable ({'; '.join(errors)})")
    return _pg_user


def problem() -> str | None:
    """Why the cluster phases cannot run here (PostgreSQL or NATS unreachable, driver missing), or None."""
    try:
        import nats  # noqa: F401
        import psycopg  # noqa: F401
    except ImportError as e:
        return f"the cluster extras are not installed ({e})"
    try:
        pg_user()
    except RuntimeError as e:
        return str(e)
    u = urlparse(NATS_URL)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=3) as s:
            s.settimeout(3)
            if not s.recv(4096).startswith(b"INFO "):
                return f"{NATS_URL} answered, but not as NATS"
    except OSError as e:
        return f"NATS at {NATS_URL} is not reachable ({e})"
    return None


# --- CPU ---------------------------------------------------------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def nats_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{d}/comm") as f:
                if f.read().strip() == "nats-server":
                    out.append(int(d))
    return out


class CpuMeter:
    """CPU seconds of the nodes, this run's PostgreSQL backends, PostgreSQL's background processes and NATS
    between start() and stop(). A backend that appears in between counts from zero (it started then)."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster

    def _pids(self) -> dict[str, list[int]]:
        nodes = {f"node_{n.name}": [n.proc.pid] for n in self.cluster.alive()}
        with pg_connect() as c:
            rows = c.execute(
                "SELECT pid, application_name, backend_type FROM pg_stat_activity WHERE pid IS NOT NULL"
            ).fetchall()
        return {
            "nodes": self.cluster.pids(),
            "postgres": [r[0] for r in rows if r[1] == self.cluster.schema],
            "postgres_background": [r[0] for r in rows if r[2] != "client backend"],
            "nats": nats_pids(),
            "client": [os.getpid()],  # this process: the load itself
            **nodes,
        }

    def _read(self) -> dict[str, dict[int, float]]:
        return {g: {p: c for p in pids if (c := proc_cpu(p)) is not None} for g, pids in self._pids().items()}

    def start(self) -> None:
        self.t0 = self._read()

    def stop(self) -> dict[str, float]:
        t1 = self._read()
        return {g: sum(c - self.t0[g].get(p, 0.0) for p, c in t1[g].items()) for g in t1}


# --- the nodes ------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_config(agents: int, max_chats: int) -> str:
    from run import config

    return config(agents, max_chats)


class Node:
    def __init__(self, cluster: Cluster, i: int):
        self.cluster, self.i, self.name = cluster, i, f"n{i}"
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen | None = None
        self.pool: Pool | None = None
        self.errors: list[str] = []
        self.starts = 0
        self.dead = False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and not self.dead

    def start(self) -> threading.Event:
        c = self.cluster
        cmd = [sys.executable, "-m", "queuechat", "serve", "--config", str(c.config_path),
               "--database-url", c.url, "--nats-url", NATS_URL, "--node-id", self.name,
               "--listen", self.target, "--web-listen", "", "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
               "--data-dir", str(c.tmp / f"data-{self.name}")]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **c.env}
        for kv in os.environ.get("BENCH_NODE_ENV", "").split():  # e.g. PYTHONASYNCIODEBUG=1 (diagnosis)
            env[kv.partition("=")[0]] = kv.partition("=")[2]
        env.pop("QUEUECHAT_DATABASE_URL", None)
        env.pop("QUEUECHAT_NATS_URL", None)
        self.dead = False
        self.starts += 1
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            cwd=c.tmp,
            env=env,
            start_new_session=True,
        )
        ready = threading.Event()
        log = (c.tmp / f"{self.name}.log").open("a")
        proc = self.proc

        def read():
            tail: list[str] = []
            block: list[str] | None = None
            for line in proc.stderr:
                log.write(line)
                tail = (tail + [line])[-40:]
                if "gRPC listening on port" in line:
                    ready.set()
                if block is not None:  # inside a traceback: up to its last line, the exception
                    block.append(line)
                    if not line.startswith((" ", "Traceback")):
                        self.errors.append("".join(block)[-3000:])
                        block = None
                elif line.startswith("Traceback"):
                    block = [line]
                elif re.search(r"\bERROR\b", line):
                    self.errors.append(line.strip()[:300])
            log.close()
            if not ready.is_set():
                self.errors.append(f"exited before listening: {''.join(tail)[-2000:]}")
                ready.set()

        threading.Thread(target=read, daemon=True).start()
        return ready

    async def wait_ready(self, ready: threading.Event) -> None:
        if not await asyncio.to_thread(ready.wait, START_TIMEOUT) or self.proc.poll() is not None:
            raise RuntimeError(f"node {self.name} did not start: {self.errors[-1:] or 'timeout'}")
        # A fresh channel (the old one may be backing off from the dead port), in place before the old one
        # closes: a talker that picks this node meanwhile must not find a closed channel.
        old, self.pool = self.pool, Pool(self.target)
        if old is not None:
            await old.close()

    def link_stats(self) -> dict[str, float]:
        """This node's NATS items sent / received / dropped and streams the reconciler found behind (/metrics)."""
        import urllib.request

        out: dict[str, float] = {}
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        except OSError:
            return out
        for m in re.finditer(r'^queuechat_cluster_(items_total\{direction="(\w+)"\}|streams_behind_total) (\S+)$',
                             text, re.M):
            out[f"nats_{m.group(2)}" if m.group(2) else "streams_behind"] = float(m.group(3))
        return out

    def kill(self) -> None:
        """kill -9 (its process group: nothing else)."""
        self.dead = True
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Cluster:
    """n nodes on a fresh schema; an async context manager."""

    def __init__(self, n: int, agents: int, max_chats: int, env: dict[str, str] | None = None):
        self.n = n
        self.tmpdir = tempfile.TemporaryDirectory(prefix="qcbench-")
        self.tmp = Path(self.tmpdir.name)
        self.config_path = self.tmp / "bench.toml"
        self.config_path.write_text(bench_config(agents, max_chats))
        self.schema = f"qcbench_{secrets.token_hex(5)}"
        opts = f"-csearch_path={self.schema} -capplication_name={self.schema}"
        from sqlalchemy.engine import URL

        self.url = URL.create(
            "postgresql+psycopg",
            username=pg_user(),
            host=PG_HOST,
            port=PG_PORT,
            database=PG_DB,
            query={"options": opts},
        ).render_as_string(hide_password=False)
        self.env = env or {}
        self.nodes = [Node(self, i) for i in range(n)]
        self.violations: dict[str, set[str]] = {"over_capacity": set(), "double_offers": set()}
        self.samples = 0
        self.killed_stats: dict[str, float] = {}
        self._db = None

    async def __aenter__(self) -> Cluster:
        with pg_connect() as c:
            c.execute(f'CREATE SCHEMA "{self.schema}"')
        try:
            readies = [n.start() for n in self.nodes]  # together: they race for the schema, as in production
            for n, r in zip(self.nodes, readies):
                await n.wait_ready(r)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        if os.environ.get("BENCH_KEEP_LOGS"):  # diagnosis: each live node's /metrics beside its log
            import urllib.request

            for n in self.alive():
                with contextlib.suppress(OSError):
                    url = f"http://127.0.0.1:{n.metrics_port}/metrics"
                    (self.tmp / f"{n.name}.metrics.log").write_bytes(urllib.request.urlopen(url, timeout=5).read())
        for n in self.nodes:
            if n.pool is not None:
                with contextlib.suppress(Exception):
                    await n.pool.close()
        # kill -9: the run's data is dropped with the schema, and a drain would take seconds per node.
        await asyncio.to_thread(lambda: [n.kill() for n in self.nodes if n.proc is not None])
        if self._db is not None:
            self._db.close()
        with pg_connect() as c:
            c.execute("SET lock_timeout = '15s'")
            c.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
        if os.environ.get("BENCH_KEEP_LOGS"):
            for f in self.tmp.glob("*.log"):
                shutil.copy(f, os.environ["BENCH_KEEP_LOGS"])
        self.tmpdir.cleanup()

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.nodes if n.alive]

    def alive(self) -> list[Node]:
        return [n for n in self.nodes if n.alive]

    def errors(self) -> list[str]:
        return [f"{n.name}: {e}" for n in self.nodes for e in n.errors]

    def _check(self) -> None:
        if self._db is None:
            self._db = pg_connect(schema=self.schema)
        for kind, key in self._db.execute(VIOLATIONS).fetchall():
            self.violations[kind].add(key)
        self.samples += 1

    async def check(self) -> None:
        await asyncio.to_thread(self._check)

    @contextlib.asynccontextmanager
    async def watching(self, every: float = 0.5):
        """Check the routing invariants every `every` seconds meanwhile, and once at the end."""

        async def loop():
            while True:
                await asyncio.sleep(every)
                await self.check()

        task = asyncio.create_task(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await self.check()

    async def link_stats(self) -> dict[str, float]:
        """NATS items sent / received / dropped and streams caught up by the reconciler, over the live nodes and
        the ones killed so far."""
        total = dict(self.killed_stats)
        for n in self.alive():
            for k, v in (await asyncio.to_thread(n.link_stats)).items():
                total[k] = total.get(k, 0) + v
        return total

    def invariants(self) -> dict:
        return {
            "over_capacity": len(self.violations["over_capacity"]),
            "double_offers": len(self.violations["double_offers"]),
            "invariant_samples": self.samples,
        }


class Spread:
    """AgentDesk's pool: agents log in and stream offers on the nodes in turn."""

    def __init__(self, nodes: list[Node]):
        self.nodes, self.i = nodes, 0

    def agents(self):
        self.i += 1
        return self.nodes[self.i % len(self.nodes)].pool.agents()


# --- clients ------------------------------------------------------------------------------------------------

RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN)


class Follower:
    """A conversation stream followed across nodes: on a broken stream it resumes from its cursor on another
    live node. Records (seq, arrival, node) of every event, repeats included."""

    def __init__(self, cluster: Cluster, node: Node, open_call, on_message=None):
        self.cluster, self.node, self.open_call, self.on_message = cluster, node, open_call, on_message
        self.cursor = 0
        self.seqs: list[int] = []
        self.arrivals: list[tuple[float, Node]] = []  # of every event
        self.live = asyncio.Event()
        self.breaks = 0
        self.broken_at: list[float] = []  # when each break was seen
        self.live_at: list[float] = []  # the first heartbeat of each connection (caught up)
        self.error: str | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        backoff = 0.02
        while True:
            node = self.node
            if not node.alive:
                others = self.cluster.alive()
                if not others:
                    await asyncio.sleep(0.05)
                    continue
                node = self.node = random.choice(others)
            call = self.open_call(node, self.cursor)
            try:
                async for item in call:
                    if item.HasField("heartbeat"):
                        self.cursor = max(self.cursor, item.heartbeat.latest_seq)
                        if not self.live.is_set():
                            self.live_at.append(time.monotonic())
                        self.live.set()
                        backoff = 0.02
                    elif item.HasField("event"):
                        ev = item.event
                        self.seqs.append(ev.seq)
                        self.arrivals.append((time.monotonic(), node))
                        self.cursor = max(self.cursor, ev.seq)
                        if self.on_message is not None and ev.HasField("message"):
                            self.on_message(ev.message)
                return
            except grpc.aio.AioRpcError as e:
                if e.code() not in RESUMABLE:
                    self.error = f"{e.code().name}: {e.details()}"
                    return
                self.breaks += 1
                self.broken_at.append(time.monotonic())
                self.live.clear()
                # Another live node (kill -9 was seen as a reset; a drained node says UNAVAILABLE).
                others = [n for n in self.cluster.alive() if n is not node] or self.cluster.alive()
                if others:
                    self.node = random.choice(others)
                await asyncio.sleep(backoff)
                backoff = min(0.5, backoff * 2)
            finally:
                call.cancel()

    def stop(self) -> None:
        self.task.cancel()


def customer_stream(cid: str, token: str):
    def open_call(node: Node, after: int):
        req = cpb.CustomerServiceStreamConversationRequest(conversation_id=cid, after_seq=after)
        return node.pool.customers().StreamConversation(req, metadata=md(token))

    return open_call


def agent_stream(cid: str, token: str):
    def open_call(node: Node, after: int):
        req = apb.StreamConversationRequest(conversation_id=cid, after_seq=after)
        return node.pool.agents().StreamConversation(req, metadata=md(token))

    return open_call


async def send_any(cluster: Cluster, prefer: Node, fn, timeout: float = 20.0, attempt: float = 5.0):
    """fn(node) on prefer, or on another live node on UNAVAILABLE / no answer in `attempt` s (the same request,
    so the same request_id: a retry is idempotent)."""
    deadline = time.monotonic() + timeout
    node = prefer
    while True:
        if not node.alive:
            node = random.choice(cluster.alive() or [node])
        try:
            return await asyncio.wait_for(fn(node), attempt)
        except (grpc.aio.AioRpcError, TimeoutError, asyncio.CancelledError) as e:
            if isinstance(e, asyncio.CancelledError):
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # this send is being cancelled, not a call that died with its node's channel
            elif isinstance(e, grpc.aio.AioRpcError) and e.code() not in RESUMABLE:
                raise
            if time.monotonic() > deadline:
                raise
            others = [n for n in cluster.alive() if n is not node]
            node = random.choice(others) if others else node
            await asyncio.sleep(0.02)


class Ledger:
    """Sends that returned OK against what each side received: lost and duplicated."""

    def __init__(self):
        self.acked: dict[str, set[int]] = {}  # conversation -> seqs whose send returned OK
        self.followers: dict[str, list[Follower]] = {}  # conversation -> the streams that must see them
        self.failed: list[str] = []  # sends that never returned OK (not counted as sent)

    def ok(self, cid: str, seq: int) -> None:
        self.acked.setdefault(cid, set()).add(seq)

    async def settle(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout

        def missing() -> int:
            return sum(len(seqs - set(f.seqs)) for cid, seqs in self.acked.items() for f in self.followers[cid])

        while missing() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        dup = sum(len(f.seqs) - len(set(f.seqs)) for fs in self.followers.values() for f in fs)
        return {"sent_ok": sum(map(len, self.acked.values())), "lost": missing(), "duplicated": dup}


async def open_chats(cluster: Cluster, desk: AgentDesk, count: int, node_of, rate: float) -> list[tuple]:
    """count chats started (chat k through node_of(k)), every offer accepted: [(cid, customer token, node)]."""
    desk.expected = count
    out = []
    sent: dict[str, float] = {}
    answered: list[float] = []

    async def one(k: int):
        await asyncio.sleep(k / rate)
        node = node_of(k)
        req = cpb.StartChatRequest(queue_id="q", request_id=uuid.uuid4().hex)
        t0 = time.monotonic()
        # A chat's arrival may queue behind others for a while: wait for it rather than start it twice.
        resp = await send_any(cluster, node, lambda n: n.pool.customers().StartChat(req), timeout=120, attempt=60)
        answered.append((time.monotonic() - t0) * 1000)
        cid = resp.conversation.conversation_id
        sent[cid] = t0
        out.append((cid, resp.customer_token, node))

    await asyncio.gather(*(one(k) for k in range(count)))
    await asyncio.wait_for(desk.all_accepted.wait(), 120)
    offer_ms = [(desk.offered[c] - sent[c]) * 1000 for c in sent if c in desk.offered]
    ARRIVALS.update(start_chat_p99_ms=percentile(answered, 0.99), offer_p50_ms=percentile(offer_ms, 0.5),
                    offer_p99_ms=percentile(offer_ms, 0.99), arrivals_per_s=rate)
    return out


# --- phases ------------------------------------------------------------------------------------------------


async def phase_saturation(args) -> dict:
    """K conversations, 4 senders each as fast as the cluster answers; the customer sends through one node,
    the agent streams from the next one. Messages/s and CPU per 1,000 messages by process group."""
    n = args.nodes
    agents = max(1, args.conversations // 50)
    async with Cluster(n, agents, 60) as cl:
        desk = AgentDesk(Spread(cl.nodes), agents)
        step("nodes up")
        await desk.start()
        step("agents in")
        async with cl.watching():
            chats = await open_chats(cl, desk, args.conversations, lambda k: cl.nodes[k % n], 200)
            step("chats accepted")
            ledger = Ledger()
            for cid, _, node in chats:
                _, atoken = desk.accepted[cid]
                f = Follower(cl, cl.nodes[(node.i + 1) % n], agent_stream(cid, atoken))
                ledger.followers[cid] = [f]
            await asyncio.wait_for(asyncio.gather(*(f.live.wait() for fs in ledger.followers.values() for f in fs)), 60)
            stop_at = time.monotonic() + args.duration

            async def sender(cid, token, node):
                stub = node.pool.customers()
                while time.monotonic() < stop_at:
                    resp = await stub.SendMessage(
                        cpb.CustomerServiceSendMessageRequest(conversation_id=cid, text="x" * 40), metadata=md(token)
                    )
                    ledger.ok(cid, resp.event.seq)

            meter = CpuMeter(cl)
            await asyncio.to_thread(meter.start)
            t0 = time.monotonic()
            await asyncio.gather(*(sender(*c) for c in chats for _ in range(args.loops)))
            elapsed = time.monotonic() - t0
            cpu = await asyncio.to_thread(meter.stop)
            step("load done")
            settled = await ledger.settle()
            step("settled")
            settled["link"] = await cl.link_stats()
        desk.stop()
        for fs in ledger.followers.values():
            for f in fs:
                f.stop()
        acked = settled["sent_ok"]
        per = {f"{g}_cpu_s_per_1000_msgs": v / acked * 1000 for g, v in cpu.items()}
        return {
            "nodes": n,
            "conversations": len(chats),
            "msgs_per_s": acked / elapsed,
            **settled,
            **per,
            "cluster_cpu_s_per_1000_msgs": (cpu["nodes"] + cpu["postgres"] + cpu["nats"]) / acked * 1000,
            **cl.invariants(),
            "server_errors": cl.errors()[:20],
        }


async def phase_cross(args) -> dict:
    """N conversations, the customer on node 0 (streams and sends there), the agent on node 1; each side sends
    every `interval` s in turn: send-to-receive latency on the other side, which always crosses nodes."""
    agents = min(args.agents, args.conversations)
    max_chats = -(-args.conversations // agents) + 1
    async with Cluster(args.nodes, agents, max_chats) as cl:
        a, b = cl.nodes[0], cl.nodes[-1]  # --nodes 1: both sides on one node, for comparison
        desk = AgentDesk(Spread([b]), agents)
        step("nodes up")
        await desk.start()
        step("agents in")
        async with cl.watching(1.0):
            chats = await open_chats(cl, desk, args.conversations, lambda k: a, args.rate)
            step("chats accepted")
            c2a: list[float] = []
            a2c: list[float] = []
            send_ms: list[float] = []  # SendMessage call to its answer (the commit), as the sender sees it

            def timer(sink, prefix):
                def on_message(m):
                    if m.text.startswith(prefix):
                        sink.append((time.monotonic_ns() - int(m.text[len(prefix) :])) / 1e6)

                return on_message

            ledger = Ledger()
            for cid, ctoken, _ in chats:
                _, atoken = desk.accepted[cid]
                ledger.followers[cid] = [
                    Follower(cl, a, customer_stream(cid, ctoken), timer(a2c, "a=")),
                    Follower(cl, b, agent_stream(cid, atoken), timer(c2a, "c=")),
                ]
            await asyncio.wait_for(
                asyncio.gather(*(f.live.wait() for fs in ledger.followers.values() for f in fs)), 120
            )
            # On a timetable (open loop, loadgen.timetable), from a moment after every talker is set up.
            t0 = time.monotonic() + 1.0
            stop_at = t0 + args.duration

            async def talk(cid, ctoken, _node):
                _, atoken = desk.accepted[cid]
                cstub, astub = a.pool.customers(), b.pool.agents()
                async for turn in timetable(t0 + random.uniform(0, args.interval), args.interval, stop_at):
                    t_send = time.monotonic()
                    if turn % 2 == 0:
                        resp = await cstub.SendMessage(
                            cpb.CustomerServiceSendMessageRequest(
                                conversation_id=cid, text=f"c={time.monotonic_ns()}", request_id=uuid.uuid4().hex
                            ),
                            metadata=md(ctoken),
                        )
                    else:
                        resp = await astub.SendMessage(
                            apb.SendMessageRequest(
                                conversation_id=cid, text=f"a={time.monotonic_ns()}", request_id=uuid.uuid4().hex
                            ),
                            metadata=md(atoken),
                        )
                    send_ms.append((time.monotonic() - t_send) * 1000)
                    if DUMP is not None:
                        DUMP.append((t_send - t_talk, send_ms[-1], turn % 2))
                    ledger.ok(cid, resp.event.seq)

            meter = CpuMeter(cl)
            await asyncio.to_thread(meter.start)
            t_talk = time.monotonic()
            await asyncio.gather(*(talk(*c) for c in chats))
            cpu = await asyncio.to_thread(meter.stop)
            cores = {g: round(v / (time.monotonic() - t_talk), 3) for g, v in cpu.items()}
            step("load done")
            if DUMP is not None:
                with open(os.environ["BENCH_DUMP"], "w") as f:
                    json.dump(DUMP, f)
            settled = await ledger.settle()
            step("settled")
            settled["link"] = await cl.link_stats()
        desk.stop()
        for fs in ledger.followers.values():
            for f in fs:
                f.stop()
        both = c2a + a2c
        return {
            "conversations": len(chats),
            "interval_s": args.interval,
            "messages": len(both),
            "cross_node_message_p50_ms": percentile(both, 0.5),
            "cross_node_message_p99_ms": percentile(both, 0.99),
            "customer_to_agent_p99_ms": percentile(c2a, 0.99),
            "agent_to_customer_p99_ms": percentile(a2c, 0.99),
            "send_p50_ms": percentile(send_ms, 0.5),
            "send_p99_ms": percentile(send_ms, 0.99),
            "cores_busy": cores,
            **settled,
            **cl.invariants(),
            "server_errors": cl.errors()[:20],
        }


async def phase_failover(args) -> dict:
    """Conversations whose both sides stream, messages sent every `interval` s per conversation (alternately
    customer and agent, through any live node). `kills` times: kill -9 of the node holding the most streams,
    then for each stream it held, the time from the kill to the next event delivered on a surviving node;
    restart the killed node (fresh, same port and node id) before the next kill."""
    n = args.nodes
    agents = max(1, min(args.agents, args.conversations))
    max_chats = -(-args.conversations // agents) + 1
    env = {
        "QUEUECHAT_CLUSTER__LEASE_SECONDS": "3",
        "QUEUECHAT_CLUSTER__SWEEP_INTERVAL": "0.5",
        "QUEUECHAT_CLUSTER__RECONCILE_INTERVAL": "1",
    }
    async with Cluster(n, agents, max_chats, env) as cl:
        desk = AgentDesk(Spread(cl.nodes), agents)
        step("nodes up")
        await desk.start()
        step("agents in")
        async with cl.watching():
            chats = await open_chats(cl, desk, args.conversations, lambda k: cl.nodes[k % n], 100)
            step("chats accepted")
            desk.stop()  # offers are done; agents keep their session (stream grace) and chats
            ledger = Ledger()
            followers: list[Follower] = []
            for k, (cid, ctoken, node) in enumerate(chats):
                _, atoken = desk.accepted[cid]
                fs = [
                    Follower(cl, node, customer_stream(cid, ctoken)),
                    Follower(cl, cl.nodes[(node.i + 1) % n], agent_stream(cid, atoken)),
                ]
                ledger.followers[cid] = fs
                followers += fs
            await asyncio.wait_for(asyncio.gather(*(f.live.wait() for f in followers)), 60)
            done = asyncio.Event()

            async def talk(cid, ctoken):
                _, atoken = desk.accepted[cid]
                await asyncio.sleep(random.uniform(0, args.interval))
                turn = 0
                while not done.is_set():
                    rid = uuid.uuid4().hex
                    prefer = random.choice(cl.alive() or cl.nodes)
                    try:
                        if turn % 2 == 0:
                            req = cpb.CustomerServiceSendMessageRequest(conversation_id=cid, text="c", request_id=rid)
                            resp = await send_any(
                                cl, prefer, lambda nd: nd.pool.customers().SendMessage(req, metadata=md(ctoken))
                            )
                        else:
                            req = apb.SendMessageRequest(conversation_id=cid, text="a", request_id=rid)
                            resp = await send_any(
                                cl, prefer, lambda nd: nd.pool.agents().SendMessage(req, metadata=md(atoken))
                            )
                        ledger.ok(cid, resp.event.seq)
                    except grpc.aio.AioRpcError as e:
                        ledger.failed.append(f"{e.code().name}: {e.details()}")
                    turn += 1
                    await asyncio.sleep(args.interval)

            talkers = [asyncio.create_task(talk(cid, ctoken)) for cid, ctoken, _ in chats]
            samples: list[float] = []
            detect: list[float] = []  # kill -> the client sees its stream broken
            resumed: list[float] = []  # kill -> live again on another node (first heartbeat)
            per_kill: list[dict] = []
            unrecovered = 0
            restarts: list[float] = []
            for _ in range(args.kills):
                await asyncio.sleep(args.pause)
                held: dict[Node, list[Follower]] = {}
                for f in followers:
                    if f.live.is_set() and f.node.alive:
                        held.setdefault(f.node, []).append(f)
                victim = max(held, key=lambda nd: len(held[nd]))
                affected = held[victim]
                for k, v in (await asyncio.to_thread(victim.link_stats)).items():
                    cl.killed_stats[k] = cl.killed_stats.get(k, 0) + v
                marks = [len(f.arrivals) for f in affected]
                t0 = time.monotonic()
                victim.kill()

                def recovered(f, mark):
                    return next((t - t0 for t, nd in f.arrivals[mark:] if nd is not victim and t > t0), None)

                deadline = t0 + 20
                while time.monotonic() < deadline and any(recovered(f, m) is None for f, m in zip(affected, marks)):
                    await asyncio.sleep(0.01)
                for f in affected:
                    seen = next((t - t0 for t in f.broken_at if t > t0), None)
                    back = next((t - t0 for t in f.live_at if t > t0), None)
                    if seen is not None:
                        detect.append(seen)
                    if back is not None:
                        resumed.append(back)
                got = [recovered(f, m) for f, m in zip(affected, marks)]
                unrecovered += sum(g is None for g in got)
                # A stream that never came back counts as the deadline: a lower bound, and a target missed.
                got = [g if g is not None else deadline - t0 for g in got]
                samples += got
                per_kill.append({"node": victim.name, "streams": len(affected), "max_s": max(got, default=None)})
                if len(per_kill) < args.kills:  # after the last kill the cluster goes anyway
                    t1 = time.monotonic()
                    await victim.wait_ready(victim.start())
                    restarts.append(round(time.monotonic() - t1, 2))
            done.set()
            await asyncio.gather(*talkers)
            step("load done")
            settled = await ledger.settle()
            step("settled")
            settled["link"] = await cl.link_stats()
        for f in followers:
            f.stop()
        return {
            "nodes": n,
            "conversations": len(chats),
            "kills": len(per_kill),
            "samples": len(samples),
            "unrecovered": unrecovered,
            "failover_p50_s": percentile(samples, 0.5),
            "failover_p99_s": percentile(samples, 0.99),
            "failover_max_s": max(samples, default=float("nan")),
            "broken_seen_p99_s": percentile(detect, 0.99),
            "resumed_p50_s": percentile(resumed, 0.5),
            "resumed_p99_s": percentile(resumed, 0.99),
            "restart_s": restarts,
            "per_kill": per_kill,
            "failed_sends": ledger.failed[:10],
            **settled,
            **cl.invariants(),
            "server_errors": cl.errors()[:20],
        }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["saturation", "cross", "failover"])
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--loops", type=int, default=4, help="concurrent senders per conversation (saturation)")
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--rate", type=float, default=100.0, help="chats started per second (cross)")
    p.add_argument(
        "--interval",
        type=float,
        default=5.0,
        help="seconds between a conversation's messages (cross; failover: default 0.1)",
    )
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--pause", type=float, default=1.0, help="seconds of traffic before each kill")
    args = p.parse_args()
    if args.phase == "failover" and "--interval" not in sys.argv:
        args.interval = 0.1  # the next event is at most this far behind the resumed stream
    phase = {"saturation": phase_saturation, "cross": phase_cross, "failover": phase_failover}[args.phase]
    from queuechat import gctune

    gctune.tune()  # the load generator's own collector pauses are not the server's latency
    res = asyncio.run(phase(args))
    step("torn down")
    print(json.dumps({**res, "arrivals": ARRIVALS, "steps": STEPS}), flush=True)


if __name__ == "__main__":
    main()
