"""The bus cuts off a subscriber that falls behind instead of stalling anyone."""


import pytest

from queuechat.bus import Bus, Lagging


async def test_slow_subscriber_is_cut_off_and_others_keep_going():
    bus = Bus(queue_size=3)
    slow = bus.subscribe(["t"])
    fast = bus.subscribe(["t"])
    received = []
    for i in range(10):
        bus.publish("t", i)
        received.append(await fast.get(1))
    assert received == list(range(10))
    with pytest.raises(Lagging):
        await slow.get(1)
    assert bus.subscriber_count("t") == 1  # the slow one is gone


async def test_a_waiting_subscriber_wakes_up_when_cut_off():
    bus = Bus(queue_size=1)
    sub = bus.subscribe(["t"])
    bus.publish("t", 1)
    bus.publish("t", 2)  # overflow while nobody reads
    with pytest.raises(Lagging):
        await sub.get(1)


async def test_get_times_out_with_none_and_close_unsubscribes():
    bus = Bus()
    with bus.subscribe(["a", "b"]) as sub:
        assert await sub.get(0.01) is None
        bus.publish("b", "x")
        assert await sub.get(1) == "x"
    assert bus.subscriber_count("a") == bus.subscriber_count("b") == 0
