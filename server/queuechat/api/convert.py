"""Domain views -> chat.v1 messages. Event payloads are already in proto JSON form."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Any

from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as pb

from ..domain.views import (
    ConversationView,
    EventView,
    FeedEventView,
    Heartbeat,
    ParticipantView,
    QueuePositionView,
    RatingView,
    ReadCursorView,
    SessionView,
    TypingView,
    WrapUpCodeView,
)

_VISIBILITY = {"all": pb.VISIBILITY_ALL, "agents": pb.VISIBILITY_AGENTS_ONLY}
_STATE = {
    "queued": pb.CONVERSATION_STATE_QUEUED,
    "active": pb.CONVERSATION_STATE_ACTIVE,
    "closed": pb.CONVERSATION_STATE_CLOSED,
}


def timestamp(dt: datetime | None) -> Timestamp | None:
    if dt is None:
        return None
    t = Timestamp()
    _set_time(t, dt)
    return t


def now_timestamp() -> Timestamp:
    t = Timestamp()
    t.GetCurrentTime()
    return t


def conversation(v: ConversationView) -> pb.Conversation:
    # Built in place: keyword arguments copy each sub-message they are given (about twice the cost; three
    # of these go out per chat: StartChat, AcceptOffer, CloseConversation).
    msg = pb.Conversation(
        conversation_id=v.id,
        state=_STATE[v.status],
        customer_connected=v.customer_connected,
        last_seq=v.last_seq,
    )
    queue = msg.queue
    queue.queue_id = v.queue_id
    queue.display_name = v.queue_name
    variables = msg.variables
    for x in v.variables:
        variables.add(name=x.name, value=x.value, authenticated=x.authenticated)
    agents = msg.agents
    for a in v.agents:
        agents.add(kind=pb.PARTICIPANT_KIND_AGENT, agent_id=a.agent_id, display_name=a.display_name)
    _set_time(msg.create_time, v.created_at)
    if v.closed_at is not None:
        _set_time(msg.close_time, v.closed_at)
    if v.pending_invite:
        json_format.ParseDict(v.pending_invite, msg.pending_invite)
    msg.read_cursors.extend(read_cursor(c) for c in v.read_cursors)
    if v.wrap_up is not None:
        w = v.wrap_up
        msg.wrap_up.CopyFrom(
            pb.WrapUp(
                wrap_up_code_id=w.code_id,
                display_name=w.code_name,
                note=w.note,
                agent=participant(w.agent),
                create_time=timestamp(w.created_at),
            )
        )
    if v.rating is not None:
        msg.rating.CopyFrom(rating(v.rating))
    if v.ended_at is not None:
        _set_time(msg.end_time, v.ended_at)
    return msg


def _set_time(t: Timestamp, dt: datetime) -> None:
    """`t.FromDatetime(dt)` (a time without a zone is UTC, as the store's are), in integers: half its cost,
    a dozen times per chat."""
    d = dt.replace(tzinfo=None) - _EPOCH
    t.seconds = d.days * 86400 + d.seconds
    t.nanos = d.microseconds * 1000


def participant(p: ParticipantView) -> pb.Participant:
    kind = pb.PARTICIPANT_KIND_AGENT if p.kind == "agent" else pb.PARTICIPANT_KIND_CUSTOMER
    return pb.Participant(kind=kind, agent_id=p.agent_id, display_name=p.display_name)


def read_cursor(v: ReadCursorView) -> pb.ReadCursor:
    return pb.ReadCursor(participant=participant(v.participant), read_seq=v.seq, read_time=timestamp(v.read_at))


def rating(v: RatingView) -> pb.Rating:
    return pb.Rating(score=v.score, comment=v.comment, create_time=timestamp(v.created_at))


def wrap_up_code(v: WrapUpCodeView) -> pb.WrapUpCode:
    return pb.WrapUpCode(wrap_up_code_id=v.id, display_name=v.display_name, queue_id=v.queue_id or "")


def event(v: EventView) -> pb.ConversationEvent:
    """Converted once per event however many streams carry it. Callers copy, never change it."""
    key = (v.conversation_id, v.seq)
    msg = _events.get(key)
    if msg is None:
        # An event goes out to its streams within a few loop turns: a few hundred cover that, and each
        # entry holds a converted message (about 1 KiB) for as long as it is kept.
        if len(_events) > 512:
            _events.clear()
        msg = _events[key] = _event(v)
    return msg


_events: dict[tuple[str, int], pb.ConversationEvent] = {}


def _event(v: EventView) -> pb.ConversationEvent:
    msg = pb.ConversationEvent(
        conversation_id=v.conversation_id,
        seq=v.seq,
        create_time=timestamp(v.created_at),
        visibility=_VISIBILITY[v.visibility],
    )
    body = getattr(msg, v.kind)
    body.SetInParent()
    if v.kind != "message" or not _message_fast(v.payload, body):
        json_format.ParseDict(v.payload, body)
    return msg


_MESSAGE_KEYS = frozenset({"message_id", "sender", "text", "visibility", "predefined_message_id", "whisper"})
_SENDER_KEYS = frozenset({"kind", "agent_id", "display_name"})


def _message_fast(p: dict, body: pb.Message) -> bool:
    """The most common event, set field by field: ParseDict costs about 50 us a message, this about 7.
    False (nothing set) for anything else it carries, such as attachments: ParseDict takes those."""
    sender = p.get("sender")
    if not (p.keys() <= _MESSAGE_KEYS and isinstance(sender, dict) and sender.keys() <= _SENDER_KEYS):
        return False
    body.message_id = p.get("message_id", "")
    body.text = p.get("text", "")
    body.visibility = pb.Visibility.Value(p.get("visibility", "VISIBILITY_UNSPECIFIED"))  # type: ignore[assignment]
    body.predefined_message_id = p.get("predefined_message_id", "")
    body.whisper = bool(p.get("whisper", False))
    body.sender.kind = pb.ParticipantKind.Value(sender.get("kind", "PARTICIPANT_KIND_UNSPECIFIED"))  # type: ignore[assignment]
    body.sender.agent_id = sender.get("agent_id", "")
    body.sender.display_name = sender.get("display_name", "")
    return True


def check_payload(stream: str, kind: str, payload: dict) -> None:
    """Parse a payload with the chat.v1 message it claims to be; raises ValueError if it is not one.
    Installed as Core.check_event in tests (QUEUECHAT_CHECK_EVENTS=1), so a wrong key fails the
    write that stored it rather than a stream later."""
    envelope = pb.ConversationEvent() if stream == "event" else agent_pb.OfferEvent()
    if envelope.DESCRIPTOR.fields_by_name.get(kind) is None:
        raise ValueError(f"{type(envelope).__name__} has no kind {kind!r}")
    try:
        json_format.ParseDict(payload, getattr(envelope, kind))
    except json_format.ParseError as e:
        raise ValueError(f"{stream} {kind}: {e}") from None


def offer_event(v: FeedEventView) -> agent_pb.OfferEvent:
    msg = agent_pb.OfferEvent(seq=v.seq, create_time=timestamp(v.created_at))
    body = getattr(msg, v.kind)
    body.SetInParent()
    fast = _offer_fast if v.kind == "offer" else _offer_update_fast if v.kind == "offer_update" else None
    if fast is None or not fast(v.payload, body):
        json_format.ParseDict(v.payload, body)
    return msg


# Every chat's offer and its outcome pass here: ParseDict costs about 60 us an offer, this about 10.
_OFFER_KEYS = frozenset(
    {"offer_id", "kind", "conversation_id", "queue", "variables", "enqueue_time", "waiting_time", "create_time",
     "expire_time"}
)  # fmt: skip
_QUEUE_KEYS = frozenset({"queue_id", "display_name"})
_VARIABLE_KEYS = frozenset({"name", "value", "authenticated"})
_OFFER_UPDATE_KEYS = frozenset({"offer_id", "state", "withdraw_reason"})
_RFC3339 = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")
_DURATION = re.compile(r"(-?)(\d+)(?:\.(\d{1,9}))?s")
_EPOCH = datetime(1970, 1, 1)
_MAX_DURATION_SECONDS = 315_576_000_000  # google.protobuf.Duration's range: ParseDict refuses beyond it


def _offer_fast(p: dict, body: Any) -> bool:
    """An offer as the routing writes it, field by field; False (nothing set) for anything else it
    carries (an invite, say) or any value not in the form written: ParseDict takes those."""
    queue = p.get("queue", {})
    variables = p.get("variables", [])
    if not (
        p.keys() <= _OFFER_KEYS
        and isinstance(queue, dict)
        and queue.keys() <= _QUEUE_KEYS
        and isinstance(variables, list)
        and all(
            isinstance(x, dict) and x.keys() <= _VARIABLE_KEYS and type(x.get("authenticated", False)) is bool
            for x in variables
        )
    ):
        return False
    times = {}
    for key in ("enqueue_time", "create_time", "expire_time"):
        if key in p:
            m = _RFC3339.fullmatch(p[key]) if isinstance(p[key], str) else None
            if m is None:
                return False
            times[key] = m
    waiting = p.get("waiting_time")
    w = _DURATION.fullmatch(waiting) if isinstance(waiting, str) else None
    if waiting is not None and (w is None or int(w[2]) > _MAX_DURATION_SECONDS):
        return False
    try:
        body.offer_id = p.get("offer_id", "")
        body.kind = agent_pb.OfferKind.Value(p.get("kind", "OFFER_KIND_UNSPECIFIED"))
        body.conversation_id = p.get("conversation_id", "")
        if "queue" in p:
            body.queue.SetInParent()
            body.queue.queue_id = queue.get("queue_id", "")
            body.queue.display_name = queue.get("display_name", "")
        for x in variables:
            body.variables.add(
                name=x.get("name", ""), value=x.get("value", ""), authenticated=x.get("authenticated", False)
            )
        for key, m in times.items():
            t = getattr(body, key)
            t.seconds = (datetime.fromisoformat(m[1]) - _EPOCH) // timedelta(seconds=1)
            t.nanos = int((m[2] or "0").ljust(9, "0"))
        if w is not None:
            sign = -1 if w[1] else 1
            body.waiting_time.seconds = sign * int(w[2])
            body.waiting_time.nanos = sign * int((w[3] or "0").ljust(9, "0"))
    except (TypeError, ValueError):  # a value of another type, an unknown enum name: ParseDict says what
        body.Clear()
        return False
    return True


def _offer_update_fast(p: dict, body: Any) -> bool:
    if not p.keys() <= _OFFER_UPDATE_KEYS:
        return False
    try:
        body.offer_id = p.get("offer_id", "")
        body.state = agent_pb.OfferState.Value(p.get("state", "OFFER_STATE_UNSPECIFIED"))
        body.withdraw_reason = agent_pb.WithdrawReason.Value(p.get("withdraw_reason", "WITHDRAW_REASON_UNSPECIFIED"))
    except (TypeError, ValueError):
        body.Clear()
        return False
    return True


def heartbeat(v: Heartbeat) -> pb.Heartbeat:
    return pb.Heartbeat(latest_seq=v.latest_seq, server_time=now_timestamp())


def typing(v: TypingView) -> pb.TypingIndicator:
    p = v.participant
    kind = pb.PARTICIPANT_KIND_AGENT if p.kind == "agent" else pb.PARTICIPANT_KIND_CUSTOMER
    return pb.TypingIndicator(
        participant=pb.Participant(kind=kind, agent_id=p.agent_id, display_name=p.display_name),
        typing=v.typing,
        expire_time=timestamp(v.expires_at),
    )


def queue_position(v: QueuePositionView) -> pb.QueuePosition:
    return pb.QueuePosition(position=v.position, waiting_count=v.waiting_count)


def session(v: SessionView) -> agent_pb.LoginResponse:
    return agent_pb.LoginResponse(
        session_token=v.token,
        agent=agent_pb.Agent(agent_id=v.agent_id, display_name=v.display_name, max_chats=v.max_chats),
        profile=pb.Profile(
            profile_id=v.profile_id, display_name=v.profile_name, queue_ids=list(v.queue_ids), supervisor=v.supervisor
        ),
        state=agent_pb.AGENT_STATE_READY if v.ready else agent_pb.AGENT_STATE_NOT_READY,
    )


def invite(payload: dict) -> pb.Invite:
    return json_format.ParseDict(payload, pb.Invite())


def upload(payload: dict) -> pb.Upload:
    return json_format.ParseDict(payload, pb.Upload())


def attachment(payload: dict) -> pb.Attachment:
    return json_format.ParseDict(payload, pb.Attachment())
