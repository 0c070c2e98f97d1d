"""Load generator: runs one benchmark phase against a server and prints its results as JSON.

It runs in its own process, on the generated stubs, so the server's CPU and
memory are the server's alone. Latencies use this process's monotonic clock:
the send time travels inside the message text.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import sys
import time
import uuid

import grpc

from chat.v1 import agent_service_pb2 as apb
from chat.v1 import agent_service_pb2_grpc, customer_service_pb2_grpc
from chat.v1 import customer_service_pb2 as cpb
from chat.v1 import resources_pb2 as rpb

MIB = 1024 * 1024
STREAMS_PER_CHANNEL = 100


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def md(token: str):
    return (("authorization", f"Bearer {token}"),)


class Pool:
    """Channels shared by up to STREAMS_PER_CHANNEL streams each, like many browsers would bring."""

    def __init__(self, target: str):
        self.target = target
        self.channels: list[grpc.aio.Channel] = []
        self.used = 0

    def channel(self) -> grpc.aio.Channel:
        if not self.channels or self.used >= STREAMS_PER_CHANNEL:
            self.channels.append(grpc.aio.insecure_channel(self.target))
            self.used = 0
        self.used += 1
        return self.channels[-1]

    def customers(self):
        return customer_service_pb2_grpc.CustomerServiceStub(self.channel())

    def agents(self):
        return agent_service_pb2_grpc.AgentServiceStub(self.channel())

    async def close(self):
        await asyncio.gather(*(c.close() for c in self.channels))


async def timetable(start: float, interval: float, stop_at: float):
    """Yield 0, 1, 2, ... at start, start + interval, ... (time.monotonic) until stop_at: an open-loop
    schedule, whatever each turn's call took."""
    k = 0
    while (at := start + k * interval) < stop_at:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        yield k
        k += 1


async def start_chat(stub, queue="q") -> cpb.StartChatResponse:
    return await stub.StartChat(cpb.StartChatRequest(queue_id=queue, request_id=uuid.uuid4().hex))


class AgentDesk:
    """Logged-in agents that accept every offer; conversation_id -> (agent stub, token) once accepted.

    `accept=False`: agents who never answer (their pending offers hold their capacity). `hold`: close
    each accepted conversation that many seconds later (a steady state: chats end as others arrive)."""

    def __init__(self, pool: Pool, count: int, *, prefix: str = "agent", profile: str = "p", accept: bool = True,
                 hold: float | None = None):
        self.pool, self.count = pool, count
        self.prefix, self.profile, self.accept, self.hold = prefix, profile, accept, hold
        self.offered: dict[str, float] = {}
        self.accepted: dict[str, tuple] = {}
        self.accept_ms: dict[str, float] = {}  # conversation_id -> AcceptOffer call, ms
        self.all_accepted = asyncio.Event()
        self.expected = 0
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        async def one(i: int):
            stub = self.pool.agents()
            login = await stub.Login(apb.LoginRequest(username=f"{self.prefix}{i}", password="pw",
                                                      profile_id=self.profile, ready=True))
            ready = asyncio.Event()
            self.tasks.append(asyncio.create_task(self._serve(stub, login.session_token, ready)))
            await ready.wait()

        for lo in range(1, self.count + 1, 100):  # logins in waves: argon2 has a bounded queue
            await asyncio.gather(*(one(i) for i in range(lo, min(self.count, lo + 99) + 1)))

    async def _serve(self, stub, token: str, ready: asyncio.Event):
        async def accept(offer):
            t0 = time.monotonic()
            await stub.AcceptOffer(apb.AcceptOfferRequest(offer_id=offer.offer_id), metadata=md(token))
            self.accept_ms[offer.conversation_id] = (time.monotonic() - t0) * 1000
            self.accepted[offer.conversation_id] = (stub, token)
            if self.expected and len(self.accepted) >= self.expected:
                self.all_accepted.set()
            if self.hold is not None:
                await asyncio.sleep(self.hold)
                await stub.CloseConversation(apb.CloseConversationRequest(
                    conversation_id=offer.conversation_id, confirm=True), metadata=md(token))

        async for item in stub.StreamOffers(apb.StreamOffersRequest(), metadata=md(token)):
            ready.set()
            if item.HasField("event") and item.event.HasField("offer"):
                offer = item.event.offer
                self.offered[offer.conversation_id] = time.monotonic()
                if self.accept:
                    # Answer in its own task: the stream keeps being read, so arrival times are true.
                    self.tasks.append(asyncio.create_task(accept(offer)))

    def stop(self):
        for t in self.tasks:
            t.cancel()


async def phase_chat(args) -> dict:
    """Offer latency with N chats arriving for M agents, then message latency with N open conversations."""
    pool = Pool(args.target)
    desk = AgentDesk(pool, args.agents)
    await desk.start()
    desk.expected = args.chats
    sent: dict[str, float] = {}
    customers: dict[str, tuple] = {}
    answered: list[float] = []

    async def arrive(i: int):
        await asyncio.sleep(i / args.rate)
        stub = pool.customers()
        t0 = time.monotonic()
        resp = await start_chat(stub)
        answered.append((time.monotonic() - t0) * 1000)
        cid = resp.conversation.conversation_id
        sent[cid] = t0
        customers[cid] = (stub, resp.customer_token)

    await asyncio.gather(*(arrive(i) for i in range(args.chats)))
    await asyncio.wait_for(desk.all_accepted.wait(), 120)
    offer_ms = [(desk.offered[c] - sent[c]) * 1000 for c in sent]

    # Both sides of every conversation stream it; each sends every `interval` seconds.
    c2a: list[float] = []
    a2c: list[float] = []
    live = []

    async def watch(call, sink, from_kind, ready):
        async for item in call:
            if item.HasField("heartbeat"):
                ready.set()
            elif item.HasField("event") and item.event.HasField("message"):
                m = item.event.message
                if m.sender.kind == from_kind and m.text.startswith("t="):
                    sink.append((time.monotonic_ns() - int(m.text[2:])) / 1e6)

    readies = []
    for cid, (astub, atoken) in desk.accepted.items():
        cstub, ctoken = customers[cid]
        r1, r2 = asyncio.Event(), asyncio.Event()
        readies += [r1, r2]
        live.append(asyncio.create_task(watch(
            astub.StreamConversation(apb.StreamConversationRequest(conversation_id=cid), metadata=md(atoken)),
            c2a, rpb.PARTICIPANT_KIND_CUSTOMER, r1)))
        live.append(asyncio.create_task(watch(
            cstub.StreamConversation(cpb.CustomerServiceStreamConversationRequest(conversation_id=cid), metadata=md(ctoken)),
            a2c, rpb.PARTICIPANT_KIND_AGENT, r2)))
    await asyncio.wait_for(asyncio.gather(*(r.wait() for r in readies)), 120)

    # On a timetable (open loop), not "sleep after each answer": a stall of this process would otherwise
    # bunch every conversation it held up into one burst that comes back every interval for the whole run.
    # The first sends start a moment after all talkers are set up, spread over one interval.
    t0 = time.monotonic() + 1.0
    stop_at = t0 + args.duration

    async def talk(cid: str):
        astub, atoken = desk.accepted[cid]
        cstub, ctoken = customers[cid]
        async for turn in timetable(t0 + random.uniform(0, args.interval), args.interval, stop_at):
            text = f"t={time.monotonic_ns()}"
            if turn % 2 == 0:
                await cstub.SendMessage(
                    cpb.CustomerServiceSendMessageRequest(conversation_id=cid, text=text), metadata=md(ctoken)
                )
            else:
                await astub.SendMessage(apb.SendMessageRequest(conversation_id=cid, text=text), metadata=md(atoken))

    await asyncio.gather(*(talk(c) for c in desk.accepted))
    await asyncio.sleep(0.5)  # let the last deliveries land
    for t in live:
        t.cancel()
    desk.stop()
    await pool.close()
    both = c2a + a2c
    return {
        "chats": args.chats,
        "agents": args.agents,
        "offer_p50_ms": percentile(offer_ms, 0.5),
        "offer_p99_ms": percentile(offer_ms, 0.99),
        "start_chat_p50_ms": percentile(answered, 0.5),
        "start_chat_p99_ms": percentile(answered, 0.99),
        "conversations": len(desk.accepted),
        "messages": len(both),
        "message_p50_ms": percentile(both, 0.5),
        "message_p99_ms": percentile(both, 0.99),
        "customer_to_agent_p50_ms": percentile(c2a, 0.5),
        "customer_to_agent_p99_ms": percentile(c2a, 0.99),
        "agent_to_customer_p50_ms": percentile(a2c, 0.5),
        "agent_to_customer_p99_ms": percentile(a2c, 0.99),
    }


async def phase_saturation(args) -> dict:
    """Messages per second as fast as the server takes them, each delivered to one subscriber."""
    pool = Pool(args.target)
    convs = []  # (sender stub, sender metadata, conversation id)
    received = 0
    subscribers = []
    ready = []

    async def count(call, ev):
        nonlocal received
        async for item in call:
            if item.HasField("heartbeat"):
                ev.set()
            elif item.HasField("event") and item.event.HasField("message"):
                received += 1

    if args.kind == "relay":
        for _ in range(args.conversations):
            stub = pool.customers()
            resp = await start_chat(stub)
            cid = resp.conversation.conversation_id
            ev = asyncio.Event()
            ready.append(ev)
            sub = pool.customers().StreamConversation(cpb.CustomerServiceStreamConversationRequest(conversation_id=cid))
            subscribers.append(asyncio.create_task(count(sub, ev)))
            convs.append((stub, None, cid))
    else:
        desk = AgentDesk(pool, max(1, args.conversations // 50))
        await desk.start()
        desk.expected = args.conversations
        custs = {}
        for _ in range(args.conversations):
            stub = pool.customers()
            resp = await start_chat(stub)
            custs[resp.conversation.conversation_id] = (stub, md(resp.customer_token))
        await asyncio.wait_for(desk.all_accepted.wait(), 60)
        for cid, (astub, atoken) in desk.accepted.items():
            ev = asyncio.Event()
            ready.append(ev)
            sub = astub.StreamConversation(apb.StreamConversationRequest(conversation_id=cid), metadata=md(atoken))
            subscribers.append(asyncio.create_task(count(sub, ev)))
            convs.append((custs[cid][0], custs[cid][1], cid))
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 60)

    acked = 0
    stop_at = time.monotonic() + args.duration

    async def sender(stub, metadata, cid):
        nonlocal acked
        while time.monotonic() < stop_at:
            await stub.SendMessage(
                cpb.CustomerServiceSendMessageRequest(conversation_id=cid, text="x" * 40), metadata=metadata
            )
            acked += 1

    cpu0, t0 = cpu_seconds(args.server_pid), time.monotonic()
    await asyncio.gather(*(sender(*c) for c in convs for _ in range(args.loops)))
    elapsed = time.monotonic() - t0
    cpu = cpu_seconds(args.server_pid) - cpu0
    deadline = time.monotonic() + 30
    while received < acked and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    for t in subscribers:
        t.cancel()
    if args.kind != "relay":
        desk.stop()
    await pool.close()
    return {
        "kind": args.kind,
        "msgs_per_s": acked / elapsed,
        "acked": acked,
        "delivered": received,
        "server_cpu_s_per_1000_msgs": cpu / acked * 1000 if acked else float("nan"),
    }


async def phase_memory(args) -> dict:
    """Server resident memory per open customer stream at growing numbers of concurrent chats."""
    pool = Pool(args.target)
    base = rss_bytes(args.server_pid)
    calls = []
    out = {}

    async def open_one():
        stub = pool.customers()
        resp = await start_chat(stub)
        call = stub.StreamConversation(
            cpb.CustomerServiceStreamConversationRequest(conversation_id=resp.conversation.conversation_id),
            metadata=md(resp.customer_token),
        )
        calls.append(call)
        async for _ in call:  # live once the first item arrives
            break

    for target in args.counts:
        while len(calls) < target:
            batch = min(200, target - len(calls))
            await asyncio.gather(*(open_one() for _ in range(batch)))
        out[str(target)] = (rss_bytes(args.server_pid) - base) / target / 1024
    for c in calls:
        c.cancel()
    await pool.close()
    return {"kib_per_stream": out, "base_rss_mib": base / MIB}


async def phase_attachments(args) -> dict:
    """Upload and download of one 20 MiB file, as a customer, in 1 MiB chunks."""
    # A PDF as they come (a scan, say): a little object syntax around one big image stream. The
    # server reads the syntax for active content and skips stream data, as a PDF reader does.
    def head(n: int) -> bytes:
        return b"%PDF-1.4\n1 0 obj\n<< /Type /XObject /Subtype /Image /Length " + str(n).encode() + b" >>\nstream\n"

    tail = b"\nendstream\nendobj\ntrailer\n<< /Size 2 >>\n%%EOF\n"
    body = 20 * MIB - len(head(20 * MIB)) - len(tail)
    data = head(body) + os.urandom(body) + tail
    digest = hashlib.sha256(data).hexdigest()
    async with grpc.aio.insecure_channel(args.target) as ch:
        stub = customer_service_pb2_grpc.CustomerServiceStub(ch)
        up_rates, down_rates = [], []
        for _ in range(args.repeat):
            resp = await start_chat(stub)
            cid, meta = resp.conversation.conversation_id, md(resp.customer_token)
            t0 = time.monotonic()
            up = (await stub.CreateUpload(cpb.CustomerServiceCreateUploadRequest(
                conversation_id=cid, file_name="bench.pdf", size_bytes=len(data), content_type="application/pdf"),
                metadata=meta)).upload
            for off in range(0, len(data), MIB):
                await stub.UploadChunk(cpb.CustomerServiceUploadChunkRequest(
                    conversation_id=cid, upload_id=up.upload_id, offset=off, data=data[off:off + MIB]), metadata=meta)
            done = (await stub.CompleteUpload(cpb.CustomerServiceCompleteUploadRequest(
                conversation_id=cid, upload_id=up.upload_id, sha256=digest), metadata=meta)).upload
            up_rates.append(len(data) / MIB / (time.monotonic() - t0))
            t0 = time.monotonic()
            got = 0
            async for item in stub.DownloadAttachment(cpb.CustomerServiceDownloadAttachmentRequest(
                    conversation_id=cid, attachment_id=done.attachment.attachment_id), metadata=meta):
                if item.HasField("chunk"):
                    got += len(item.chunk.data)
            assert got == len(data), (got, len(data))
            down_rates.append(len(data) / MIB / (time.monotonic() - t0))
    return {"upload_mb_per_s": max(up_rates), "download_mb_per_s": max(down_rates)}


async def phase_arrivals(args) -> dict:
    """Arrivals into queue q at steady rates while `backlog` chats wait in queue w.

    The backlog's own agents (`busy`, profile pw) hold pending offers they never answer, so its chats
    keep waiting and dispatch sees them as a long queue nobody free serves. `agents` agents (profile p,
    queue q) accept every offer at once and close the chat `hold` seconds later. For each rate in turn:
    offer latency (StartChat sent -> offer read on the stream), StartChat and AcceptOffer call times,
    server CPU per chat. Rates go up until offer p99 passes `stop_ms`."""
    pool = Pool(args.target)
    busy = AgentDesk(pool, args.busy, prefix="busy", profile="pw", accept=False)
    await busy.start()
    t0 = time.monotonic()
    sem = asyncio.Semaphore(64)

    async def wait_one():
        async with sem:
            await start_chat(pool.customers(), "w")

    for lo in range(0, args.backlog, 1000):
        await asyncio.gather(*(wait_one() for _ in range(min(1000, args.backlog - lo))))
    fill_s = time.monotonic() - t0
    desk = AgentDesk(pool, args.agents, hold=args.hold)
    await desk.start()
    print("arrivals: steps begin", file=sys.stderr, flush=True)  # a profiler may attach now
    steps = []
    for rate in args.rates:
        # The growth comparison's rate runs longer: its p99 is then over hundreds of chats, not ~125.
        seconds = args.long_seconds if rate == args.long_rate else args.step_seconds
        n = max(1, round(rate * seconds))
        sent: dict[str, float] = {}
        answered: list[float] = []
        start = time.monotonic() + 0.05

        async def arrive(i: int, start: float, rate: float, sent: dict, answered: list):
            await asyncio.sleep(max(0.0, start + i / rate - time.monotonic()))
            stub = pool.customers()
            t = time.monotonic()
            resp = await start_chat(stub)
            answered.append((time.monotonic() - t) * 1000)
            sent[resp.conversation.conversation_id] = t

        cpu0 = cpu_seconds(args.server_pid) if args.server_pid else 0.0
        await asyncio.gather(*(arrive(i, start, rate, sent, answered) for i in range(n)))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not all(c in desk.accept_ms for c in sent):
            await asyncio.sleep(0.05)
        cpu = (cpu_seconds(args.server_pid) if args.server_pid else 0.0) - cpu0
        offer_ms = [(desk.offered[c] - t) * 1000 for c, t in sent.items() if c in desk.offered]
        accept_ms = [desk.accept_ms[c] for c in sent if c in desk.accept_ms]
        step = {
            "rate": rate, "chats": n, "seconds": seconds, "offered": len(offer_ms),
            "achieved_per_s": (n - 1) / max(1e-9, max(sent.values()) - min(sent.values())) if n > 1 else rate,
            "offer_p50_ms": percentile(offer_ms, 0.5), "offer_p99_ms": percentile(offer_ms, 0.99),
            "start_chat_p50_ms": percentile(answered, 0.5), "start_chat_p99_ms": percentile(answered, 0.99),
            "accept_p50_ms": percentile(accept_ms, 0.5), "accept_p99_ms": percentile(accept_ms, 0.99),
            "server_cpu_ms_per_chat": cpu / n * 1000,
        }
        steps.append(step)
        print(json.dumps(step), file=sys.stderr, flush=True)
        await asyncio.sleep(args.hold + 0.5)  # the step's chats close before the next step
        if len(offer_ms) < n or step["offer_p99_ms"] > args.stop_ms:
            break
    desk.stop()
    busy.stop()
    await pool.close()
    return {"agents": args.agents, "backlog": args.backlog, "busy": args.busy, "fill_s": fill_s,
            "hold_s": args.hold, "step_s": args.step_seconds, "steps": steps}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["chat", "saturation", "memory", "attachments", "arrivals"])
    p.add_argument("--target", required=True)
    p.add_argument("--kind", default="queuechat", choices=["queuechat", "relay"])
    p.add_argument("--server-pid", type=int, default=0)
    p.add_argument("--agents", type=int, default=100)
    p.add_argument("--chats", type=int, default=1000)
    p.add_argument("--rate", type=float, default=200.0, help="chats started per second")
    p.add_argument("--interval", type=float, default=5.0, help="seconds between messages of a conversation")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--conversations", type=int, default=50)
    p.add_argument("--loops", type=int, default=4, help="concurrent senders per conversation")
    p.add_argument("--counts", type=int, nargs="+", default=[100, 1000, 5000])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--backlog", type=int, default=1000, help="chats waiting in queue w")
    p.add_argument("--busy", type=int, default=10, help="agents of queue w, who never answer")
    p.add_argument("--rates", type=float, nargs="+", default=[50.0], help="arrival rates, one step each")
    p.add_argument("--step-seconds", type=float, default=5.0)
    p.add_argument("--long-rate", type=float, default=-1.0, help="the arrival rate whose step lasts --long-seconds")
    p.add_argument("--long-seconds", type=float, default=5.0)
    p.add_argument("--hold", type=float, default=1.0, help="seconds an accepted chat stays open")
    p.add_argument("--stop-ms", type=float, default=1000.0, help="no higher rate once offer p99 passes this")
    args = p.parse_args()
    phase = {"chat": phase_chat, "saturation": phase_saturation, "memory": phase_memory,
             "attachments": phase_attachments, "arrivals": phase_arrivals}
    print(json.dumps(asyncio.run(phase[args.phase](args))), flush=True)


if __name__ == "__main__":
    main()
