"""Queue positions: every waiting customer's stream follows its position and the queue's length.

Positions are derived (domain/positions.py): a queue whose chats change is re-read at most every
0.2 s and each watching stream gets a QueuePosition when its position or waiting_count changed.
"""

import asyncio
import time

import pytest
from harness import WAIT, Stream

from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.domain.log import conv_topic

REFRESH = 0.2  # QueuePositions' interval


def positions(stream: Stream) -> list[tuple[int, int]]:
    return [
        (i.queue_position.position, i.queue_position.waiting_count)
        for i in stream.items
        if i.HasField("queue_position")
    ]


def at(position: int, waiting: int):
    return lambda i: (
        i.HasField("queue_position")
        and (i.queue_position.position, i.queue_position.waiting_count) == (position, waiting)
    )


def open_stream(cust) -> Stream:
    """Another StreamConversation of the same customer (a second tab, an overlapping reconnect)."""
    return Stream(
        cust.stub.StreamConversation(
            cust_pb.CustomerServiceStreamConversationRequest(conversation_id=cust.id), metadata=cust.md
        )
    )


async def until(pred, what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_waiting_count_follows_arrivals(server):
    """The first in line sees the queue grow behind them: "1 of 1", "1 of 2", "1 of 3"."""
    first = await server.customer("support")
    stream = first.open()
    await stream.wait_for(at(1, 1))
    await server.customer("support")
    await stream.wait_for(at(1, 2))
    await server.customer("support")
    await stream.wait_for(at(1, 3))
    assert positions(stream) == [(1, 1), (1, 2), (1, 3)]


async def test_waiting_count_follows_departures_behind(server):
    """A chat behind you leaves: your position stays 1, the count drops, and you are told."""
    first = await server.customer("support")
    await server.customer("support")
    third = await server.customer("support")
    fourth = await server.customer("support")
    stream = first.open()
    await stream.wait_for(at(1, 4))
    await fourth.end()
    await stream.wait_for(at(1, 3))
    await third.end()
    await stream.wait_for(at(1, 2))


async def test_arrivals_are_sent_at_a_bounded_rate(server):
    """A burst of arrivals costs a watcher a few updates, not one per arrival: at most one per 0.2 s."""
    first = await server.customer("support")
    stream = first.open()
    await stream.wait_for(at(1, 1))
    before = len(positions(stream))
    started = time.monotonic()
    await asyncio.gather(*(server.customer("support") for _ in range(15)))
    await stream.wait_for(at(1, 16))
    elapsed = time.monotonic() - started
    updates = positions(stream)[before:]
    assert updates[-1] == (1, 16)
    assert len(updates) <= elapsed / REFRESH + 1, f"{len(updates)} updates in {elapsed:.2f}s: {updates}"
    assert all(p == 1 for p, _ in updates)
    assert [n for _, n in updates] == sorted(set(n for _, n in updates)), "the count only grows, each value once"


@pytest.mark.parametrize("closes", ["old", "new"])
async def test_positions_continue_after_another_stream_of_the_chat_closes(server, closes):
    """Two streams of one waiting chat (a second tab, an overlapping reconnect): when either ends,
    the other still gets every position change."""
    first = await server.customer("support")
    cust = await server.customer("support")
    old = open_stream(cust)
    new = None
    try:
        await old.wait_for(at(2, 2))
        new = open_stream(cust)
        await new.wait_for(at(2, 2))
        gone, survivor = (old, new) if closes == "old" else (new, old)
        await gone.cancel()
        # Wait until the server has ended that stream (it unsubscribes and stops watching in one step).
        await until(lambda: server.core.bus.subscriber_count(conv_topic(cust.id)) == 1, "the closed stream to end")

        await first.end()
        await survivor.wait_for(at(1, 1))
    finally:
        await old.cancel()
        if new is not None:
            await new.cancel()
