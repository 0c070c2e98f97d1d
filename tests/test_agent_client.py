"""The agent client library: feeds resume from their cursor across restarts and drops, retries keep their request id."""

import asyncio
import hashlib
import tracemalloc

import grpc
import pytest
from agent_helpers import Proxy, customer_sends_file
from features_helpers import customer_reads, is_cursor
from files import MIB, Uploader, png
from harness import WAIT, is_event

from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.domain.log import conv_topic
from queuechat_agent.client import AgentClient, Backoff, Refused, SessionEnded

FAST = Backoff(initial=0.05, maximum=0.5)


class Collector:
    """Runs a feed in the background and keeps what it yields."""

    def __init__(self, feed):
        self.feed = feed
        self.events = []
        self.error: Exception | None = None
        self._changed = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self):
        try:
            async for ev in self.feed:
                self.events.append(ev)
                self._changed.set()
        except Refused as e:
            self.error = e
        finally:
            self._changed.set()

    async def wait_for(self, pred, what: str):
        async def waiter():
            while not any(pred(e) for e in self.events):
                if self.task.done():
                    raise AssertionError(f"feed ended ({self.error!r}) before {what}")
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(waiter(), WAIT)

    def texts(self):
        return [e.message.text for e in self.events if e.HasField("message")]

    def seqs(self):
        return [e.seq for e in self.events]

    async def stop(self):
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def logged_in(address: str, agent_id="agent1") -> AgentClient:
    client = AgentClient(address, backoff=FAST)
    await client.login(agent_id, f"pw{agent_id.removeprefix('agent')}", "both", ready=True)
    return client


async def chat(server, client: AgentClient, offers: Collector, **customer):
    """A customer chat this client has accepted, followed from the start."""
    cust = await server.customer("sales", **customer)
    cust.open()
    await offers.wait_for(lambda e: e.HasField("offer") and e.offer.conversation_id == cust.id, "the offer")
    offer = next(e.offer for e in offers.events if e.HasField("offer") and e.offer.conversation_id == cust.id)
    await client.accept(offer.offer_id)
    return cust, Collector(client.follow(cust.id))


def message(text):
    return lambda e: e.HasField("message") and e.message.text == text


@pytest.mark.configure(settings={"stream_grace": 30})
async def test_feeds_resume_across_a_server_restart_losing_and_repeating_nothing(server):
    client = await logged_in(server.address)
    states, connected = [], asyncio.Event()

    def on_connection(up: bool) -> None:
        states.append(up)
        if up:
            connected.set()
        else:
            connected.clear()

    client.on_connection = on_connection
    offers = Collector(client.offers())
    await asyncio.wait_for(offers.feed.caught_up.wait(), WAIT)
    cust, conv = await chat(server, client, offers, variables={"name": "Ada"})
    for text in ("m1", "m2"):
        await cust.send(text)
    await client.send(cust.id, "a1")
    await conv.wait_for(message("a1"), "a1 before the restart")

    await server.restart()
    cust.stub = server.customer_stub
    # Sent before the client is back: they come from the replay after its cursor.
    await cust.send("m3")
    await cust.send("m4")
    await conv.wait_for(message("m4"), "m4 after the restart")
    await client.send(cust.id, "a2")
    await conv.wait_for(message("a2"), "a2, live again")

    assert conv.texts() == ["m1", "m2", "a1", "m3", "m4", "a2"]
    assert conv.seqs() == list(range(1, len(conv.events) + 1))
    assert client.reconnects >= 2  # the offer feed and the conversation both came back
    await asyncio.wait_for(connected.wait(), WAIT)  # every feed has caught up again
    assert states[0] is False and states[-1] is True and client.connected

    # The offer feed resumed too: a new chat is offered once, after the earlier events.
    other = await server.customer("support")
    await offers.wait_for(
        lambda e: e.HasField("offer") and e.offer.conversation_id == other.id, "an offer after the restart"
    )
    assert offers.seqs() == sorted(set(offers.seqs()))
    await offers.stop()
    await conv.stop()
    await client.aclose()


async def test_a_dropped_connection_reconnects_and_resumes_from_the_cursor(server):
    proxy = await Proxy(server.port).start()
    client = await logged_in(proxy.address)
    offers = Collector(client.offers())
    cust, conv = await chat(server, client, offers)
    await cust.send("before")
    await conv.wait_for(message("before"), "before the drop")

    proxy.drop()
    await cust.send("during")
    await cust.send("after")
    await conv.wait_for(message("after"), "after the drop")
    assert conv.texts() == ["before", "during", "after"]
    assert conv.seqs() == list(range(1, len(conv.events) + 1))
    assert client.reconnects >= 1
    await offers.stop()
    await conv.stop()
    await client.aclose()
    await proxy.stop()


async def test_stream_lagging_is_a_reconnect_not_an_error(server):
    client = await logged_in(server.address)
    offers = Collector(client.offers())
    cust, conv = await chat(server, client, offers)
    await cust.send("one")
    await conv.wait_for(message("one"), "one")
    reconnects = client.reconnects
    # Overflow every subscriber of the conversation: the server ends the stream with UNAVAILABLE STREAM_LAGGING.
    for _ in range(server.core.bus.queue_size + 1):
        server.core.bus.publish(conv_topic(cust.id), object())
    await cust.send("two")
    await conv.wait_for(message("two"), "two after the lag")
    assert conv.texts() == ["one", "two"] and client.reconnects > reconnects
    await offers.stop()
    await conv.stop()
    await client.aclose()


async def test_a_lost_send_response_is_retried_with_the_same_request_id(server):
    client = await logged_in(server.address)
    offers = Collector(client.offers())
    cust, conv = await chat(server, client, offers)
    real, attempts = client.stub.SendMessage, []

    async def lose_first_response(request, **kw):
        attempts.append(request.request_id)
        response = await real(request, **kw)
        if len(attempts) == 1:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, details="connection reset")
        return response

    client.stub.SendMessage = lose_first_response
    ev = await client.send(cust.id, "once")
    assert len(attempts) == 2 and attempts[0] == attempts[1]
    t = await cust.transcript()
    assert [e.seq for e in t.events if e.HasField("message") and e.message.text == "once"] == [ev.seq]
    await offers.stop()
    await conv.stop()
    await client.aclose()


async def test_an_ended_session_is_fatal_for_feeds_and_calls(server):
    client = await logged_in(server.address)
    offers = Collector(client.offers())
    await asyncio.wait_for(offers.feed.caught_up.wait(), WAIT)
    await server.agent("agent1")  # the same agent logs in elsewhere: this session ends
    await asyncio.wait_for(offers.task, WAIT)
    assert isinstance(offers.error, SessionEnded) and offers.error.reason == "SESSION_ENDED"
    with pytest.raises(SessionEnded) as refused:
        await client.conversations()
    assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and refused.value.reason == "SESSION_INVALID"
    await client.aclose()


async def test_refusals_carry_code_reason_and_message(server):
    client = AgentClient(server.address)
    with pytest.raises(Refused) as refused:
        await client.login("agent1", "wrong", "both")
    assert (refused.value.code, refused.value.reason) == (grpc.StatusCode.UNAUTHENTICATED, "BAD_CREDENTIALS")
    assert refused.value.message and str(refused.value).startswith("UNAUTHENTICATED BAD_CREDENTIALS: ")
    await client.aclose()


async def test_upload_resumes_after_a_drop_and_download_checks_the_file(server, tmp_path):
    proxy = await Proxy(server.port).start()
    client = await logged_in(proxy.address)
    offers = Collector(client.offers())
    cust, conv = await chat(server, client, offers)
    big = tmp_path / "notes.txt"
    big.write_bytes(b"line of text\n" * (MIB // 5))  # 2.6 MiB: three chunks
    progress = []

    def on_progress(sent, total):
        if not progress:
            proxy.drop()  # the connection dies between chunks
        progress.append((sent, total))

    att = await client.upload(cust.id, big, on_progress)
    assert proxy.connections >= 2  # it went on over a new connection
    size = big.stat().st_size
    assert progress[-1] == (size, size) and [p[0] for p in progress] == sorted(p[0] for p in progress)
    assert (att.file_name, att.size_bytes, att.content_type) == ("notes.txt", size, "text/plain")
    assert att.sha256 == hashlib.sha256(big.read_bytes()).hexdigest()
    await client.send(cust.id, "the notes", attachment_ids=[att.attachment_id])
    got = await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "the notes"))
    _, data = await Uploader(cust.stub, cust.md, cust.id, customer=True).download(
        got.event.message.attachments[0].attachment_id
    )
    assert data == big.read_bytes()

    # The customer sends a picture: downloads get its name, then a free one; the bytes are checked.
    pic = png(40, 40)
    c_att = await customer_sends_file(cust, pic, "photo.png")
    first = await client.download(c_att.attachment_id, tmp_path)
    second = await client.download(c_att.attachment_id, tmp_path)
    assert (first.name, second.name) == ("photo.png", "photo (1).png")
    assert first.read_bytes() == second.read_bytes() == pic
    assert not list(tmp_path.glob("*.part"))
    await offers.stop()
    await conv.stop()
    await client.aclose()
    await proxy.stop()


async def test_uploads_and_downloads_hold_a_chunk_not_the_file(server, tmp_path):
    client = await logged_in(server.address)
    offers = Collector(client.offers())
    cust, conv = await chat(server, client, offers)
    path = tmp_path / "big.txt"
    with path.open("wb") as f:
        for _ in range(16):
            f.write(b"x" * (MIB - 1) + b"\n")
    tracemalloc.start()
    try:
        att = await client.upload(cust.id, path)
        await client.send(cust.id, "", attachment_ids=[att.attachment_id])
        out = await client.download(att.attachment_id, tmp_path / "copy.txt")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 16 MiB went up and came down (server included, same process); a whole file in memory would be 16 MiB.
    assert peak < 8 * MIB, f"peak {peak / MIB:.1f} MiB"
    assert out.stat().st_size == path.stat().st_size
    await offers.stop()
    await conv.stop()
    await client.aclose()


async def test_typing_and_read_cursors_reach_on_signal_and_are_not_events(server):
    client = await logged_in(server.address)
    offers = Collector(client.offers())
    await asyncio.wait_for(offers.feed.caught_up.wait(), WAIT)
    signals: list[tuple[str, object]] = []
    cust = await server.customer("sales", variables={"name": "Ada"})
    cust.open()
    await offers.wait_for(lambda e: e.HasField("offer") and e.offer.conversation_id == cust.id, "the offer")
    await client.accept(next(e.offer.offer_id for e in offers.events if e.HasField("offer")))
    feed = client.follow(cust.id)
    feed.on_signal = lambda kind, item: signals.append((kind, item))
    conv = Collector(feed)
    await asyncio.wait_for(feed.caught_up.wait(), WAIT)

    await customer_types(cust)
    await cust.send("hello")
    await conv.wait_for(message("hello"), "the message")
    hello = conv.events[-1].seq
    await customer_reads(cust, hello)
    await until_true(lambda: any(k == "read_cursor" and i.read_seq == hello for k, i in signals), "the cursor")
    assert [i.participant.display_name for k, i in signals if k == "typing"] == ["Ada"]
    assert all(e.WhichOneof("kind") not in ("typing", "read_cursor") for e in conv.events)

    # This agent's side: typing and reading reach the customer; the cursor only moves forward.
    await client.set_typing(cust.id, True)
    await cust.stream.wait_for(lambda i: i.HasField("typing") and i.typing.participant.agent_id == "agent1")
    assert (await client.mark_read(cust.id, hello)).read_seq == hello
    assert (await client.mark_read(cust.id, 1)).read_seq == hello
    await cust.stream.wait_for(is_cursor(lambda c: c.participant.agent_id == "agent1" and c.read_seq == hello))
    await offers.stop()
    await conv.stop()
    await client.aclose()


async def until_true(pred, what: str) -> None:
    async def poll():
        while not pred():
            await asyncio.sleep(0.02)

    try:
        await asyncio.wait_for(poll(), WAIT)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def customer_types(cust) -> None:
    req = cust_pb.CustomerServiceSetTypingRequest(conversation_id=cust.id, typing=True)
    await cust.stub.SetTyping(req, metadata=cust.md)
