"""Nothing the customer can see depends on private activity (hypothesis, on the bare harness).

A random sequence of steps runs twice, on two fresh databases: once as drawn, and once without its
private steps (private messages, a supervisor's monitor starts and stops and whispers, private typing).
Everything else, the reads included ("the agent reads everything", "the customer reads everything"),
runs in both, at the same times (each step a second after the one before, a skipped one too). What the customer can observe must be the same in
both runs, up to seq numbers (private events take seqs; the customer's are compared by their place
among the public events):

- its transcript (every public event, in order, with its time and content);
- its conversation view: last_seq and the read cursors it is shown;
- what its stream would carry: for every published item, the stream's own filters decide (public
  events, typing it may see, read cursors as receipts.shown_to tells them, only moving forward).

So no typing signal, read cursor, whisper or monitor event ever reveals private activity to the customer.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from bare import Bare
from features_helpers import SUPERVISOR, with_supervisors
from harness import base_config

from queuechat.domain import conversations, receipts, supervision
from queuechat.domain.read import conversation_view
from queuechat.domain.streams import _shows_typing
from queuechat.domain.views import (
    CustomerPrincipal,
    EventView,
    ParticipantView,
    ReadSignal,
    TypingView,
)

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

PRIVATE_STEPS = {"private_message", "monitor_start", "monitor_stop", "whisper", "private_typing"}
STEPS = (
    "customer_message",
    "agent_message",
    "agent_reads_all",
    "agent_reads_public",
    "customer_reads_all",
    "typing",
    *sorted(PRIVATE_STEPS),
)
DOC = with_supervisors(base_config())
SCRATCH = "/dev/shm" if Path("/dev/shm").is_dir() else None


def _run(path: Path, steps: list[str], *, private: bool = True) -> dict[str, Any]:
    """Run the steps (without the private ones unless `private`: those only let the clock move on)."""
    b = Bare(path, profiles=DOC["profiles"], agents=DOC["agents"])
    try:
        agent = b.agent("agent1")
        conv_id = b.chat("sales")
        b.accept(agent, b.pending(conv_id)[0].id)
        sup = b.login(SUPERVISOR, "supervisors", ready=False)
        customer = CustomerPrincipal(conv_id)
        published: list[object] = []
        monitor_id = ""
        for i, step in enumerate(steps):
            b.advance(1)
            effects: tuple[Any, ...] = ()
            if step in PRIVATE_STEPS and not private:
                continue
            if step == "customer_message":
                _, effects = b.run(conversations.send_message, customer, conv_id, f"c{i}", f"from the customer {i}", False, "")
            elif step == "agent_message":
                _, effects = b.run(conversations.send_message, agent, conv_id, f"a{i}", f"from the agent {i}", False, "")
            elif step == "private_message":
                _, effects = b.run(conversations.send_message, agent, conv_id, f"p{i}", f"private {i}", True, "")
            elif step == "monitor_start" and not monitor_id:
                monitor_id, effects = b.run(supervision.start_monitor, sup, conv_id)
            elif step == "monitor_stop" and monitor_id:
                _, effects = b.run(supervision.stop_monitor, monitor_id)
                monitor_id = ""
            elif step == "whisper" and monitor_id:
                _, effects = b.run(supervision.whisper, sup, conv_id, f"w{i}", f"whisper {i}")
            elif step == "agent_reads_all":
                last = b.read(lambda s: conversation_view(s, _conv(s, conv_id)).last_seq)
                _, effects = b.run(receipts.mark_read, agent, conv_id, last)
            elif step == "agent_reads_public":
                last = b.read(lambda s: conversation_view(s, _conv(s, conv_id), for_agent=False).last_seq)
                _, effects = b.run(receipts.mark_read, agent, conv_id, last)
            elif step == "customer_reads_all":
                last = b.read(lambda s: conversation_view(s, _conv(s, conv_id), for_agent=False).last_seq)
                _, effects = b.run(receipts.mark_read, customer, conv_id, last)
            elif step in ("typing", "private_typing"):
                # As Core.set_typing publishes it (straight to the bus, nothing stored).
                who = ParticipantView("agent", "agent1", "Agent 1")
                published.append(TypingView(conv_id, who, True, step == "private_typing", b.now + timedelta(seconds=5)))
            published.extend(args[1] for name, args in effects if name == "publish")
        return _customer_sees(b, customer, conv_id, published)
    finally:
        b.close()


def _conv(s, conv_id):
    from queuechat.store.models import Conversation

    return s.get(Conversation, conv_id)


def _content(ev: EventView) -> tuple[Any, ...]:
    payload = dict(ev.payload)
    payload.pop("message_id", None)  # random per run
    assert ev.public and not ev.kind.startswith("monitor_") and not payload.get("whisper"), ev
    return (ev.kind, ev.created_at, repr(sorted(payload.items())))


def _customer_sees(b: Bare, customer: CustomerPrincipal, conv_id: str, published: list[object]) -> dict[str, Any]:
    transcript = b.read(lambda s: conversations.events_after(s, conv_id, 0, True, limit=10_000))
    view = b.read(lambda s: conversation_view(s, _conv(s, conv_id), for_agent=False))
    place = {ev.seq: n for n, ev in enumerate(transcript, start=1)}  # a public seq -> its place

    def at(seq: int) -> int:
        assert seq == 0 or seq in place, f"the customer was shown seq {seq}, which is not a public event"
        return place.get(seq, 0)

    stream: list[tuple[Any, ...]] = []
    shown: dict[tuple[str, str], int] = {}
    for item in published:
        if isinstance(item, EventView):
            if item.public:  # as Streams.conversation filters them for a customer
                stream.append(("event", *_content(item)))
        elif isinstance(item, TypingView):
            if _shows_typing(item, customer):
                stream.append(("typing", item.participant, item.typing))
        elif isinstance(item, ReadSignal):
            cursor = receipts.shown_to(item, customer)
            key = (item.participant.kind, item.participant.agent_id)
            if cursor is not None and cursor.seq > shown.get(key, 0):
                shown[key] = cursor.seq
                stream.append(("read", cursor.participant, at(cursor.seq), cursor.read_at))
    return {
        "transcript": [_content(ev) for ev in transcript],
        "last_seq": at(view.last_seq),
        "cursors": [(c.participant, at(c.seq), c.read_at) for c in view.read_cursors],
        "stream": stream,
    }


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(STEPS), max_size=20))
def test_the_customer_sees_the_same_with_or_without_private_activity(steps):
    # Two databases per example, a commit per step: in memory-backed /dev/shm where there is one.
    tmp = Path(tempfile.mkdtemp(prefix="queuechat-privacy-", dir=SCRATCH))
    try:
        with_private = _run(tmp / "full.db", steps)
        without = _run(tmp / "public.db", steps, private=False)
        assert with_private == without
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_an_agent_reading_a_private_note_tells_the_customer_nothing(tmp_path):
    """One case spelt out: the property's central example."""
    seen = _run(tmp_path / "a.db", ["agent_message", "agent_reads_all", "private_message", "agent_reads_all"])
    assert [kind for kind, *_ in seen["stream"]].count("read") == 1
    assert seen["cursors"][0][1] == seen["last_seq"]  # the public message, the last one the customer knows
