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
import time
import uuid

import grpc

from chat.v1 import agent_service_pb2 as apb
from chat.v1 import agent_service_pb2_grpc
from chat.v1 import customer_service_pb2 as cpb
from chat.v1 import customer_service_pb2_grpc
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


async def start_chat(stub, queue="q") -> cpb.StartChatResponse:
    return await stub.StartChat(cpb.StartChatRequest(queue_id=queue, request_id=uuid.uuid4().hex))


class AgentDesk:
    """Logged-in agents that accept every offer; conversation_id -> (agent stub, token) once accepted."""

    def __init__(self, pool: Pool, count: int):
        self.pool, self.count = pool, count
        self.offered: dict[str, float] = {}
        self.accepted: dict[str, tuple] = {}
        self.all_accepted = asyncio.Event()
        self.expected = 0
        self.tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        async def one(i: int):
            stub = self.pool.agents()
            login = await stub.Login(apb.LoginRequest(username=f"agent{i}", password="pw", profile_id="p", ready=True))
            ready = asyncio.Event()
            self.tasks.append(asyncio.create_task(self._serve(stub, login.session_token, ready)))
            await ready.wait()

        await asyncio.gather(*(one(i) for i in range(1, self.count + 1)))

    async def _serve(self, stub, token: str, ready: asyncio.Event):
        async def accept(offer):
            await stub.AcceptOffer(apb.AcceptOfferRequest(offer_id=offer.offer_id), metadata=md(token))
            self.accepted[offer.conversation_id] = (stub, token)
            if self.expected and len(self.accepted) >= self.expected:
                self.all_accepted.set()

        async for item in stub.StreamOffers(apb.StreamOffersRequest(), metadata=md(token)):
            ready.set()
            if item.HasField("event") and item.event.HasField("offer"):
                offer = item.event.offer
                self.offered[offer.conversation_id] = time.monotonic()
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

    stop_at = time.monotonic() + args.duration

    async def talk(cid: str):
        astub, atoken = desk.accepted[cid]
        cstub, ctoken = customers[cid]
        await asyncio.sleep(random.uniform(0, args.interval))
        customer_turn = True
        while time.monotonic() < stop_at:
            text = f"t={time.monotonic_ns()}"
            if customer_turn:
                await cstub.SendMessage(
                    cpb.CustomerServiceSendMessageRequest(conversation_id=cid, text=text), metadata=md(ctoken)
                )
            else:
                await astub.SendMessage(apb.SendMessageRequest(conversation_id=cid, text=text), metadata=md(atoken))
            customer_turn = not customer_turn
            await asyncio.sleep(args.interval)

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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("phase", choices=["chat", "saturation", "memory", "attachments"])
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
    args = p.parse_args()
    phase = {"chat": phase_chat, "saturation": phase_saturation, "memory": phase_memory, "attachments": phase_attachments}
    print(json.dumps(asyncio.run(phase[args.phase](args))), flush=True)


if __name__ == "__main__":
    main()
