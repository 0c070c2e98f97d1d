"""What the domain hands to the API layer: plain immutable values.

Event payloads are kept in the proto3 JSON form of the chat.v1 messages, so
the stored log is self-describing and the API layer parses it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class EventView:
    conversation_id: str
    seq: int
    kind: str
    visibility: str  # "all" | "agents"
    created_at: datetime
    payload: dict[str, Any]

    @property
    def public(self) -> bool:
        return self.visibility == "all"


@dataclass(frozen=True, slots=True)
class FeedEventView:
    session_id: str
    seq: int
    kind: str  # "offer" | "offer_update"
    created_at: datetime
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class QueuePositionView:
    conversation_id: str
    position: int
    waiting_count: int
    queue_id: str = ""


@dataclass(frozen=True, slots=True)
class ParticipantView:
    kind: str  # "customer" | "agent"
    agent_id: str = ""
    display_name: str = ""

    def to_json(self) -> dict[str, Any]:
        kind = "PARTICIPANT_KIND_AGENT" if self.kind == "agent" else "PARTICIPANT_KIND_CUSTOMER"
        out: dict[str, Any] = {"kind": kind, "display_name": self.display_name}
        if self.agent_id:
            out["agent_id"] = self.agent_id
        return out


@dataclass(frozen=True, slots=True)
class VariableView:
    name: str
    value: str
    authenticated: bool


@dataclass(frozen=True, slots=True)
class ConversationView:
    id: str
    queue_id: str
    queue_name: str
    status: str
    customer_connected: bool
    variables: tuple[VariableView, ...]
    agents: tuple[ParticipantView, ...]
    last_seq: int
    created_at: datetime
    closed_at: datetime | None
    pending_invite: dict[str, Any] | None = None
    # Agents see every cursor as stored; the customer the agents' clamped to public seqs, and its own.
    read_cursors: tuple[ReadCursorView, ...] = ()
    wrap_up: WrapUpView | None = None  # agents and admins only
    rating: RatingView | None = None
    ended_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ReadCursorView:
    participant: ParticipantView
    seq: int
    read_at: datetime


@dataclass(frozen=True, slots=True)
class ReadSignal:
    """A participant read further: an ephemeral signal to the others' streams (the cursor itself is stored).
    public_seq is seq clamped to the highest public event at or below it; the customer is told only that,
    and only when it moved."""

    conversation_id: str
    participant: ParticipantView
    seq: int
    read_at: datetime
    public_seq: int
    public_read_at: datetime
    public_moved: bool


@dataclass(frozen=True, slots=True)
class WrapUpView:
    code_id: str
    code_name: str
    note: str
    agent: ParticipantView
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RatingView:
    score: int
    comment: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class WrapUpCodeView:
    id: str
    display_name: str
    queue_id: str | None


@dataclass(frozen=True, slots=True)
class LiveConversationView:
    conversation: ConversationView
    waiting: float  # seconds from entering the queue to the first agent joining (or now)
    handling: float  # seconds since the first agent joined; 0 while waiting
    monitors: tuple[ParticipantView, ...]


@dataclass(frozen=True, slots=True)
class SessionView:
    session_id: str
    agent_id: str
    display_name: str
    max_chats: int
    profile_id: str
    profile_name: str
    queue_ids: tuple[str, ...]
    ready: bool
    token: str = ""
    supervisor: bool = False  # the profile supervises its queues (domain/supervision.py)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    latest_seq: int


@dataclass(frozen=True, slots=True)
class StartedChat:
    conversation: ConversationView
    customer_token: str


@dataclass(frozen=True, slots=True)
class AgentPrincipal:
    session_id: str
    agent_id: str
    profile_id: str


@dataclass(frozen=True, slots=True)
class CustomerPrincipal:
    conversation_id: str


@dataclass(frozen=True, slots=True)
class AdminPrincipal:
    admin_id: str


@dataclass(frozen=True, slots=True)
class Transcript:
    conversation: ConversationView
    events: tuple[EventView, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class SessionEnded:
    """Published on a session's feed topic when it ends: its streams close."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Behind:
    """On a topic's streams: the database holds its events up to `seq`; a stream short of it reads
    what it missed (a cluster's reconciler sends it when a notification was lost)."""

    topic: tuple[str, str]
    seq: int


@dataclass(frozen=True, slots=True)
class Draining:
    """Published on every topic when this node shuts down: its streams end with UNAVAILABLE, so clients
    reconnect (to another node) and resume from their cursors."""


@dataclass(frozen=True, slots=True)
class QueueView:
    id: str
    display_name: str
    wrap_up_required: bool = False


@dataclass(frozen=True, slots=True)
class ProfileView:
    id: str
    display_name: str
    queue_ids: tuple[str, ...]
    supervisor: bool = False


@dataclass(frozen=True, slots=True)
class AgentAccountView:
    id: str
    display_name: str
    max_chats: int
    profile_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class PredefinedView:
    id: str
    title: str
    body: str
    queue_id: str | None
    profile_id: str | None


@dataclass(frozen=True, slots=True)
class QueueStatsView:
    """One queue's supervisor figures (domain/stats.py has what each one counts)."""

    queue_id: str
    queue_name: str
    waiting_count: int
    longest_wait: float  # seconds; 0 when none waits
    agents_ready: int
    agents_busy: int
    agents_not_ready: int
    offers_accepted: int
    offers_rejected: int
    offers_timed_out: int
    service_level: float | None  # 0..1; None when no chat was answered in the window
    service_level_target: float  # seconds
    ratings_count: int = 0  # customer ratings given in the window
    average_rating: float | None = None  # None when there were none


@dataclass(frozen=True, slots=True)
class QueueStatsSnapshot:
    """Every queue's figures, read together at computed_at; offers count over the `window` seconds before it."""

    queues: tuple[QueueStatsView, ...]
    computed_at: datetime
    window: float


@dataclass(frozen=True, slots=True)
class TypingView:
    """Someone is composing: an ephemeral signal (not stored, no seq, not replayed)."""

    conversation_id: str
    participant: ParticipantView
    typing: bool
    private: bool  # an agent composing a private message: never shown to the customer
    expires_at: datetime
