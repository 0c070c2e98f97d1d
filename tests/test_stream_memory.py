"""What keeps an idle stream small (docs/performance.md, "Memory per stream") still behaves: the bus's
shared heartbeat wheel, buffers made only when items wait, one-subscriber topics, positions counted in SQL."""

import asyncio

import pytest

from queuechat.bus import Bus, Lagging


async def test_silence_gives_none_after_the_timeout_not_before():
    bus = Bus()
    sub = bus.subscribe(["t"])
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert await sub.get(0.2) is None
    waited = loop.time() - t0
    assert 0.2 <= waited < 0.2 + 0.2 / 16 + 0.1  # late by at most a slot of the wheel (and the loop's slack)


async def test_a_busy_subscription_sits_in_one_slot_and_still_gets_its_heartbeat():
    bus = Bus()
    sub = bus.subscribe(["t"])
    loop = asyncio.get_running_loop()
    for i in range(50):  # items keep coming: each get waits again, the wheel keeps one entry
        loop.call_later(0.002, bus.publish, "t", i)
        assert await sub.get(0.3) == i
    assert sum(len(s) for s in bus._wheel._slots.values()) <= 1
    t0 = loop.time()
    assert await sub.get(0.1) is None
    assert loop.time() - t0 >= 0.1


async def test_many_waiters_share_a_few_timers():
    bus = Bus()
    subs = [bus.subscribe([("conv", str(i))]) for i in range(500)]
    waits = [asyncio.ensure_future(s.get(0.3)) for s in subs]
    await asyncio.sleep(0)
    assert len(bus._wheel._slots) <= 2
    bus.publish(("conv", "7"), "x")
    assert await waits[7] == "x"
    assert await asyncio.gather(*waits[:7], *waits[8:]) == [None] * 499


async def test_items_wait_in_order_and_an_emptied_buffer_is_dropped():
    bus = Bus()
    sub = bus.subscribe(["t"])
    assert sub._items is None
    for i in range(3):
        bus.publish("t", i)
    assert [await sub.get(1) for _ in range(3)] == [0, 1, 2]
    assert sub._items is None


async def test_an_item_handed_to_a_waiter_counts_against_the_buffer():
    bus = Bus(queue_size=2)
    sub = bus.subscribe(["t"])
    waiting = asyncio.ensure_future(sub.get(1))
    await asyncio.sleep(0)
    bus.publish("t", 1)  # handed to the waiting get
    bus.publish("t", 2)  # buffered: two pending
    bus.publish("t", 3)  # a third: cut off
    assert await waiting == 1
    with pytest.raises(Lagging):
        await sub.get(1)
    assert bus.subscriber_count("t") == 0


async def test_an_item_for_a_cancelled_waiter_is_kept_for_the_next_get():
    bus = Bus()
    sub = bus.subscribe(["t"])
    waiting = asyncio.ensure_future(sub.get(1))
    await asyncio.sleep(0)
    waiting.cancel()
    await asyncio.sleep(0)
    bus.publish("t", "kept")
    assert await sub.get(1) == "kept"


def test_topics_with_one_or_several_subscribers():
    bus = Bus()
    a, b, c = bus.subscribe(["t", "u"]), bus.subscribe(["t"]), bus.subscribe(["t"])
    assert (bus.subscriber_count("t"), bus.subscriber_count("u")) == (3, 1)
    b.close()
    b.close()  # twice: nothing more happens
    assert bus.subscriber_count("t") == 2
    a.close()
    assert (bus.subscriber_count("t"), bus.subscriber_count("u")) == (1, 0)
    assert bus.topics() == ["t"]
    c.close()
    assert bus.topics() == []


def test_position_counted_in_sql_matches_the_waiting_list_order():
    """position_of counts the chats ahead (enqueued_at, then id, as waiting_ids orders them) instead of
    reading the whole waiting list for every stream that opens."""
    from datetime import UTC, datetime, timedelta

    from sqlmodel import Session, SQLModel, create_engine

    from queuechat.domain.positions import position_of, waiting_ids
    from queuechat.store.models import Conversation

    engine = create_engine("sqlite://")
    SQLModel.metadata.create_all(engine)
    t = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    rows = [  # ties on enqueued_at are broken by id; other queues and other states do not count
        ("c5", "q", "queued", t), ("c2", "q", "queued", t), ("c9", "q", "queued", t - timedelta(seconds=1)),
        ("c1", "q", "active", t - timedelta(seconds=5)), ("c3", "other", "queued", t - timedelta(seconds=9)),
        ("c7", "q", "queued", t + timedelta(microseconds=1)),
    ]
    with Session(engine) as s:
        for cid, queue, status, at in rows:
            s.add(Conversation(id=cid, queue_id=queue, status=status, created_at=at, enqueued_at=at))
        s.commit()
        order = waiting_ids(s, "q")
        assert order == ["c9", "c2", "c5", "c7"]
        for cid in order:
            pos = position_of(s, s.get(Conversation, cid))
            assert (pos.position, pos.waiting_count, pos.queue_id) == (order.index(cid) + 1, 4, "q")
        assert position_of(s, s.get(Conversation, "c1")).position == 0
