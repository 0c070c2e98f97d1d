"""What the customer command prints: a conversation event as lines of text, or as JSON."""

from __future__ import annotations

from datetime import UTC
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from chat.v1 import resources_pb2 as rpb

CLIP = "📎"
YOU = "You"


def size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    return f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1_000_000:.1f} MB"


def who(p: rpb.Participant) -> str:
    """The customer is "You"; an agent is their display name."""
    if p.kind == rpb.PARTICIPANT_KIND_CUSTOMER:
        return YOU
    return p.display_name or p.agent_id or "An agent"


def attachment(a: rpb.Attachment) -> str:
    return f"{CLIP} {a.file_name} ({size(a.size_bytes)})"


def clock(ev: rpb.ConversationEvent) -> str:
    """The event's time, local, as HH:MM."""
    return ev.create_time.ToDatetime(tzinfo=UTC).astimezone().strftime("%H:%M")


def describe(ev: rpb.ConversationEvent) -> list[str]:
    """ev as lines: the first starts with the time; an offer menu adds one line per option."""
    kind = ev.WhichOneof("kind")
    lines: list[str]
    if kind == "message":
        m = ev.message
        parts = [m.text] if m.text else []
        parts += [attachment(a) for a in m.attachments]
        lines = [f"{who(m.sender)}: " + "  ".join(parts)]
    elif kind == "offer_menu":
        menu = ev.offer_menu
        lines = [f"{who(menu.sender)} asks: {menu.prompt}"]
        lines += [f"        {i}. {o.label}" for i, o in enumerate(menu.options, 1)]
        lines.append(f"      Answer with /choose 1-{len(menu.options)}.")
    elif kind == "option_chosen":
        c = ev.option_chosen
        lines = [f"{who(c.chooser)} chose “{c.label}”"]
    elif kind == "chat_started":
        queue = ev.chat_started.queue
        lines = [f"Chat started in {queue.display_name or queue.queue_id}"]
    elif kind == "participant_joined":
        p = ev.participant_joined.participant
        lines = ["You joined the queue" if p.kind == rpb.PARTICIPANT_KIND_CUSTOMER else f"{who(p)} joined"]
    elif kind == "participant_left":
        lines = [f"{who(ev.participant_left.participant)} left"]
    elif kind == "chat_ended":
        lines = [f"{who(ev.chat_ended.ended_by)} ended the chat"]
    elif kind == "chat_closed":
        lines = [f"{who(ev.chat_closed.closed_by)} closed the chat"]
    else:  # invite_updated is for agents only; anything newer than this client
        lines = [(kind or "event").replace("_", " ")]
    return [f"{clock(ev)} {lines[0]}", *lines[1:]]


def position(pos: rpb.QueuePosition, queue_name: str) -> str:
    return f"Waiting in queue {queue_name}: {pos.position} of {pos.waiting_count}"


def as_json(message: Message, **extra: object) -> dict[str, Any]:
    """A message as a JSON-ready dict with proto field names (seq and last_seq stay numbers), after extra."""
    out = MessageToDict(message, preserving_proto_field_name=True)
    for key in ("seq", "last_seq"):
        if key in out:
            out[key] = int(out[key])
    return {**extra, **out}
