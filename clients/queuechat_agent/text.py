"""Plain-text descriptions of offers and conversation events, for the app and the command line."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, timedelta
from typing import Any

from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import resources_pb2 as rpb

# Symbols of the desktop, narrow everywhere: neither emoji nor East Asian wide or ambiguous, so every
# terminal gives them one cell, as Rich counts them, and the panes' borders stay in line. (👁, 📎 and ☰
# were not: emoji fonts draw 👁 two cells wide where Rich counts one, Rich counts ☰ two where most
# terminals draw one.) The lock is wide everywhere, which is just as safe.
LOCK = "🔒"
EYE = "◉"
CLIP = "⎘"
MENU = "⋮"
CHOSEN = "✓"

_INVITE_STATES = {
    rpb.INVITE_STATE_PENDING: "pending",
    rpb.INVITE_STATE_ACCEPTED: "accepted",
    rpb.INVITE_STATE_REJECTED: "rejected",
    rpb.INVITE_STATE_TIMED_OUT: "timed out",
    rpb.INVITE_STATE_CANCELLED: "cancelled",
    rpb.INVITE_STATE_WITHDRAWN: "withdrawn",
}

_OFFER_STATES = {
    pb.OFFER_STATE_ACCEPTED: "accepted",
    pb.OFFER_STATE_REJECTED: "rejected",
    pb.OFFER_STATE_TIMED_OUT: "timed out",
    pb.OFFER_STATE_WITHDRAWN: "withdrawn",
}

_WITHDRAW_REASONS = {
    pb.WITHDRAW_REASON_CUSTOMER_LEFT: "the customer left",
    pb.WITHDRAW_REASON_TAKEN_ELSEWHERE: "taken elsewhere",
    pb.WITHDRAW_REASON_CANCELLED: "the inviter cancelled",
    pb.WITHDRAW_REASON_AGENT_UNAVAILABLE: "you were unavailable",
}


@dataclass(frozen=True)
class Line:
    """One line of a conversation log. role: system, customer, me, agent, whisper, menu, choice, invite."""

    role: str
    sender: str
    text: str
    private: bool = False
    time: str = ""
    seq: int = 0  # the event's, 0 for a line that is no event

    @property
    def plain(self) -> str:
        eye = f"{EYE} " if self.private else ""
        head = f"{eye}{self.sender}: " if self.sender else eye
        return f"{head}{self.text}"


def size(n: int) -> str:
    if n < 1000:
        return f"{n} B"
    return f"{n / 1000:.1f} kB" if n < 1_000_000 else f"{n / 1_000_000:.1f} MB"


def duration(d: timedelta) -> str:
    seconds = max(0, int(d.total_seconds()))
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


def variable(v: rpb.CustomerVariable) -> str:
    """A customer variable: authenticated ones carry a lock."""
    return f"{LOCK if v.authenticated else '  '} {v.name}: {v.value}"


def customer_name(
    variables: Iterable[rpb.CustomerVariable], queue: rpb.Queue | None = None, conversation_id: str = ""
) -> str:
    """The customer's name; an anonymous one as "Customer · support #3f2a" (queue, short conversation number)."""
    for v in variables:
        if v.name == "name" and v.value:
            return v.value
    parts = ["Customer"]
    if queue is not None and queue.queue_id:
        parts.append(queue.queue_id)
    name = " · ".join(parts)
    return f"{name} #{short_id(conversation_id)}" if conversation_id else name


def short_id(conversation_id: str) -> str:
    """Four hex digits that tell conversations apart at a glance: the id's own start when it is hex."""
    head = conversation_id[:4].lower()
    if len(head) == 4 and all(c in "0123456789abcdef" for c in head):
        return head
    return hashlib.sha256(conversation_id.encode()).hexdigest()[:4]


def invite_target(invite: rpb.Invite) -> str:
    who = invite.invitee.display_name or invite.invitee.agent_id
    return f"{who} (from queue {invite.queue_id})" if invite.queue_id else who


def attachment(a: rpb.Attachment) -> str:
    return f"{CLIP} {a.file_name} ({size(a.size_bytes)})"


def describe(ev: rpb.ConversationEvent, me: str, menus: dict[str, str] | None = None) -> Line:
    """ev as a log line; me is this agent's id; menus maps menu ids to prompts seen so far."""
    role, sender, text = _describe(ev, me, menus if menus is not None else {})
    local = ev.create_time.ToDatetime(tzinfo=UTC).astimezone()
    # Only messages are marked private: invite updates are agents-only by nature.
    private = ev.HasField("message") and ev.visibility == rpb.VISIBILITY_AGENTS_ONLY
    return Line(role, sender, text, private, local.strftime("%H:%M"), ev.seq)


def _describe(ev: rpb.ConversationEvent, me: str, menus: dict[str, str]) -> tuple[str, str, str]:
    kind = ev.WhichOneof("kind")
    if kind == "message":
        m = ev.message
        role = (
            "customer"
            if m.sender.kind == rpb.PARTICIPANT_KIND_CUSTOMER
            else "me"
            if m.sender.agent_id == me
            else "agent"
        )
        parts = [m.text] if m.text else []
        parts += [attachment(a) for a in m.attachments]
        if m.whisper:
            # A supervisor's note to the agents, from monitoring.
            return "whisper", m.sender.display_name, "  ".join(["(whisper)", *parts])
        return role, m.sender.display_name, "  ".join(parts)
    if kind == "offer_menu":
        menu = ev.offer_menu
        menus[menu.menu_id] = menu.prompt
        options = "  ".join(f"[{i}] {o.label}" for i, o in enumerate(menu.options, 1))
        return "menu", menu.sender.display_name, f"{MENU} {menu.prompt}  {options}"
    if kind == "option_chosen":
        c = ev.option_chosen
        about = f" ({menus[c.menu_id]})" if c.menu_id in menus else ""
        return "choice", c.chooser.display_name, f"{CHOSEN} chose “{c.label}”{about}"
    if kind == "invite_updated":
        inv = ev.invite_updated.invite
        text = f"Invite to {invite_target(inv)}: {_INVITE_STATES.get(inv.state, 'unknown')}"
        if inv.state == rpb.INVITE_STATE_ACCEPTED and inv.inviter.agent_id == me:
            text += ". Stay, or leave the chat (F8)"
        return "invite", "", text
    if kind == "chat_started":
        queue = ev.chat_started.queue
        return "system", "", f"Chat started in {queue.display_name or queue.queue_id}"
    if kind == "participant_joined":
        how = " (barged in from monitoring)" if ev.participant_joined.barge_in else ""
        return "system", "", f"{ev.participant_joined.participant.display_name} joined{how}"
    if kind == "monitor_started":
        return "system", "", f"{ev.monitor_started.supervisor.display_name} started monitoring"
    if kind == "monitor_stopped":
        return "system", "", f"{ev.monitor_stopped.supervisor.display_name} stopped monitoring"
    if kind == "participant_left":
        return "system", "", f"{ev.participant_left.participant.display_name} left"
    if kind == "chat_ended":
        by = ev.chat_ended.ended_by
        if by.kind == rpb.PARTICIPANT_KIND_CUSTOMER:
            return "system", "", "Customer ended the chat"
        return "system", "", f"Chat ended by {by.display_name}"
    if kind == "chat_closed":
        return "system", "", f"Chat closed by {ev.chat_closed.closed_by.display_name}"
    return "system", "", kind or "event"


def offer_update(u: pb.OfferUpdate) -> str:
    text = _OFFER_STATES.get(u.state, "changed")
    reason = _WITHDRAW_REASONS.get(u.withdraw_reason)
    return f"{text} ({reason})" if reason else text


def as_json(message: Message, **extra: object) -> dict[str, Any]:
    """A message as JSON-ready dict with proto field names; seq stays a number."""
    out = MessageToDict(message, preserving_proto_field_name=True)
    if "seq" in out:
        out["seq"] = int(out["seq"])
    return {**extra, **out}
