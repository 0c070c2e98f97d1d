"""The arrival cycle at the domain layer, without gRPC: StartChat, the offer, AcceptOffer, CloseConversation,
one chat at a time, through Core on a fresh SQLite file. Prints CPU per chat, writer time per named write,
SQL statements per chat by table (through SQLAlchemy and through store.fast) and what dispatch costs. For profiling routing and the write paths
(docs/performance.md); `scripts/bench` measures through gRPC.

    .venv/bin/python bench/cycle.py [--agents 100] [--waiting 1000] [--chats 300]

The waiting chats sit in a second queue whose ten agents each hold an offer they never answer (as in
scripts/bench's arrivals phase), so every dispatch sees a long queue nobody free serves.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "server"), str(ROOT / "bench")]

import run  # noqa: E402
from sqlalchemy import event  # noqa: E402

from queuechat.config import parse_config  # noqa: E402
from queuechat.domain import routing  # noqa: E402
from queuechat.domain.core import Core  # noqa: E402
from queuechat.store import Database, sqlite_url  # noqa: E402
from queuechat.store.fast import Fast  # noqa: E402


async def main(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp()
    core = Core(Database(sqlite_url(tmp)), parse_config(tomllib.loads(run.config(args.agents, 50, 10))),
                files_dir=f"{tmp}/files")
    core.db.ensure_schema()
    await core.start()
    offers: dict[str, tuple] = {}
    got = asyncio.Event()

    async def feed(who) -> None:
        async for item in core.offer_feed(who, 0):
            if getattr(item, "kind", "") == "offer":
                offers[item.payload["conversation_id"]] = (who, item.payload["offer_id"])
                got.set()

    tasks = []
    for prefix, n, profile in (("agent", args.agents, "p"), ("busy", 10, "pw")):
        for i in range(1, n + 1):
            view = await core.login(f"{prefix}{i}", "pw", profile, True)
            tasks.append(asyncio.create_task(feed(await core.authenticate_agent(view.token))))
    for _ in range(args.waiting):
        await core.start_chat("w", uuid.uuid4().hex, {}, "")

    dispatched = {"n": 0, "s": 0.0}
    real = routing.dispatch

    def timed(tx, now=None, queues=None):
        t = time.perf_counter()
        try:
            return real(tx, now, queues)
        finally:
            dispatched["n"] += 1
            dispatched["s"] += time.perf_counter() - t

    routing.dispatch = timed
    tables: collections.Counter[str] = collections.Counter()

    def count(conn, cursor, statement, params, context, executemany) -> None:
        words = statement.split()
        verb = words[0]
        table = words[words.index("FROM") + 1] if "FROM" in words else words[2 if verb == "INSERT" else 1]
        tables[f"{verb} {table}"] += 1

    fast: collections.Counter[str] = collections.Counter()
    real_run = Fast.run

    names: dict[int, str] = {}

    def counted(self, conn, params):
        if (name := names.get(id(self))) is None:
            words = str(self.stmt).split()
            verb = words[0]
            table = words[words.index("FROM") + 1] if "FROM" in words else words[2 if verb == "INSERT" else 1]
            name = names[id(self)] = f"{verb} {table}"
        fast[name] += 1
        return real_run(self, conn, params)

    core.db.stats.clear()
    event.listen(core.db.engine, "before_cursor_execute", count)
    Fast.run = counted  # type: ignore[method-assign]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.chats):
        started = await core.start_chat("q", uuid.uuid4().hex, {}, "")
        cid = started.conversation.id
        while cid not in offers:
            got.clear()
            await asyncio.wait_for(got.wait(), 5)
        who, offer_id = offers.pop(cid)
        await core.accept_offer(who, offer_id)
        await core.close(who, cid, True)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    event.remove(core.db.engine, "before_cursor_execute", count)
    Fast.run = real_run  # type: ignore[method-assign]
    n = args.chats
    print(f"{n} chats ({args.agents} agents, {args.waiting} waiting): CPU {cpu / n * 1000:.2f} ms per chat, "
          f"wall {wall / n * 1000:.2f} ms")
    for name, st in sorted(core.db.stats.items(), key=lambda kv: -kv[1].seconds)[:6]:
        print(f"  {name:30s} {st.count:6d} runs, {st.seconds / st.count * 1000:6.3f} ms each on the writer")
    if (cp := getattr(core.db, "checkpointer", None)) is not None:
        print(f"  WAL checkpoints (their own thread): {cp.stats.runs} runs, {cp.stats.seconds * 1000 / n:.3f} ms per chat; "
              f"their tails held the writer {cp.stats.tail_seconds * 1000 / max(1, cp.stats.runs):.2f} ms per run")
    print(f"  dispatch: {dispatched['n']} runs, {dispatched['s'] / max(1, dispatched['n']) * 1000:.3f} ms each")
    print(f"  SQL statements per chat through SQLAlchemy: {sum(tables.values()) / n:.1f} (store.fast ones not counted)")
    for key, k in tables.most_common():
        print(f"    {k / n:5.2f}  {key}")
    print(f"  Fast statements per chat: {sum(fast.values()) / n:.1f}")
    for key, k in fast.most_common():
        print(f"    {k / n:5.2f}  {key}")
    for t in tasks:
        t.cancel()
    await core.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--waiting", type=int, default=1000)
    p.add_argument("--chats", type=int, default=300)
    asyncio.run(main(p.parse_args()))
