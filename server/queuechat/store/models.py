"""Tables. The database is the source of truth; nothing routing-relevant lives only in memory.

Times are aware UTC datetimes (SQLModel's UTCDateTime), stored alike by SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, cast

from sqlalchemy import BigInteger, Column, Index, LargeBinary, Table, Text, UniqueConstraint, text
from sqlmodel import Field, SQLModel


def table(model: type[SQLModel]) -> Table:
    """A table model's Core table, for Core reads of whole rows: SQLModel sets __table__ but does not declare it."""
    t: Table = cast(Any, model).__table__
    return t


class Setting(SQLModel, table=True):
    key: str = Field(primary_key=True)
    value: str


class Queue(SQLModel, table=True):
    id: str = Field(primary_key=True)
    display_name: str
    # CloseConversation needs a wrap-up code in this queue.
    wrap_up_required: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})


class Profile(SQLModel, table=True):
    id: str = Field(primary_key=True)
    display_name: str
    # Agents logged in with it supervise its queues (monitor, whisper, barge in).
    supervisor: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})


class ProfileQueue(SQLModel, table=True):
    __tablename__ = "profile_queue"
    profile_id: str = Field(foreign_key="profile.id", primary_key=True, ondelete="CASCADE")
    queue_id: str = Field(foreign_key="queue.id", primary_key=True, ondelete="CASCADE")


class Agent(SQLModel, table=True):
    id: str = Field(primary_key=True)
    display_name: str
    password_hash: str
    max_chats: int = 3
    # Set by the file (disabled = true, or removed from it): no login, no session.
    disabled: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})
    # Open conversations plus pending offers: what counts against max_chats (read.agent_loads derives it
    # from those rows). Kept by the writes that change it, under the routing lock, so that routing reads
    # the free agents by an index instead of counting every agent's seats on each arrival.
    load: int = Field(default=0, sa_column_kwargs={"server_default": text("0")})


class AgentProfile(SQLModel, table=True):
    __tablename__ = "agent_profile"
    agent_id: str = Field(foreign_key="agent.id", primary_key=True, ondelete="CASCADE")
    profile_id: str = Field(foreign_key="profile.id", primary_key=True, ondelete="CASCADE")


class Admin(SQLModel, table=True):
    id: str = Field(primary_key=True)
    password_hash: str
    disabled: bool = Field(default=False, sa_column_kwargs={"server_default": text("false")})


class AdminSession(SQLModel, table=True):
    __tablename__ = "admin_session"
    token_hash: str = Field(primary_key=True)
    admin_id: str = Field(foreign_key="admin.id", ondelete="CASCADE")
    created_at: datetime
    # For the idle timeout; written at most once a minute.
    last_used_at: datetime | None = None


class ConfiguredAccount(SQLModel, table=True):
    """The agents and admins the configuration file named when it was last applied: one that
    disappears from the file is disabled and its sessions end."""

    __tablename__ = "configured_account"
    kind: str = Field(primary_key=True)  # agent | admin
    id: str = Field(primary_key=True)


class IdentityTokenUse(SQLModel, table=True):
    """A customer identity token's jti, kept until the token expires: a replay is refused."""

    __tablename__ = "identity_token_use"
    jti: str = Field(primary_key=True)
    expires_at: datetime = Field(index=True)
    conversation_id: str


class PredefinedMessage(SQLModel, table=True):
    __tablename__ = "predefined_message"
    id: str = Field(primary_key=True)
    title: str
    body: str = Field(sa_column=Column(Text, nullable=False))
    queue_id: str | None = Field(default=None, foreign_key="queue.id", ondelete="CASCADE")
    profile_id: str | None = Field(default=None, foreign_key="profile.id", ondelete="CASCADE")


class AgentSession(SQLModel, table=True):
    """One login. Offers belong to a session; conversations belong to the agent."""

    __tablename__ = "agent_session"
    id: str = Field(primary_key=True)
    token_hash: str = Field(unique=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    profile_id: str = Field(foreign_key="profile.id")
    ready: bool = False
    # Open offer streams; offers are made only while > 0.
    stream_count: int = 0
    stream_lost_at: datetime | None = None
    created_at: datetime
    # For the idle timeout: the last call with this session's token (written at most once a minute).
    last_seen_at: datetime | None = None
    ended_at: datetime | None = Field(default=None, index=True)
    # Routing picks the agent idle longest: the oldest of these.
    last_offer_at: datetime
    # Last seq of this session's offer feed.
    feed_seq: int = 0

    __table_args__ = (
        # Routing's order among live sessions (idle longest first), read until it finds a free agent: the
        # live ones (ended_at NULL) are one range of it, already in order.
        Index("ix_agent_session_idle", "ended_at", "last_offer_at", "created_at", "id"),
    )


class Conversation(SQLModel, table=True):
    id: str = Field(primary_key=True)
    queue_id: str = Field(foreign_key="queue.id")
    # queued | active | closed
    status: str = Field(index=True)
    customer_connected: bool = True
    customer_name: str = ""
    created_at: datetime
    # Place in the queue; a rejected chat keeps it.
    enqueued_at: datetime
    closed_at: datetime | None = None
    last_seq: int = 0
    start_request_id: str | None = Field(default=None, unique=True)
    # When the chat with the customer ended (EndChat, or closed while connected): the rating window's start.
    ended_at: datetime | None = None
    # Wrap-up: the code's id and its name when used (codes may be renamed or deleted later), a note, who.
    wrap_up_code_id: str | None = Field(default=None, index=True)
    wrap_up_code_name: str | None = None
    wrap_up_note: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    wrap_up_agent_id: str | None = None
    wrap_up_at: datetime | None = None
    # The customer's rating (1-5), once.
    rating_score: int | None = None
    rating_comment: str | None = Field(default=None, sa_column=Column(Text, nullable=True))
    # The supervisor figures count ratings given in the last 15 minutes.
    rated_at: datetime | None = Field(default=None, index=True)
    rating_request_id: str | None = None

    __table_args__ = (Index("ix_conversation_queue_wait", "status", "queue_id", "enqueued_at"),)


class CustomerVariable(SQLModel, table=True):
    __tablename__ = "customer_variable"
    conversation_id: str = Field(foreign_key="conversation.id", primary_key=True)
    name: str = Field(primary_key=True)
    value: str = Field(sa_column=Column(Text, nullable=False))
    authenticated: bool = False


class Participant(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    agent_id: str = Field(foreign_key="agent.id", index=True)
    joined_at: datetime
    left_at: datetime | None = None


class Event(SQLModel, table=True):
    """A conversation's log. seq is gap-free per conversation, assigned in the committing transaction."""

    __tablename__ = "conversation_event"
    id: int | None = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id")
    seq: int
    kind: str
    # all | agents
    visibility: str
    created_at: datetime
    # Who caused it ("customer" or "agent:<id>"); scopes request_id.
    actor: str
    request_id: str | None = None
    payload: str = Field(sa_column=Column(Text, nullable=False))

    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("conversation_id", "actor", "request_id"),
    )


class Offer(SQLModel, table=True):
    id: str = Field(primary_key=True)
    session_id: str = Field(foreign_key="agent_session.id", index=True)
    agent_id: str = Field(foreign_key="agent.id")
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    # chat | invite
    kind: str
    invite_id: str | None = Field(default=None, foreign_key="invite.id")
    # pending | accepted | rejected | timed_out | withdrawn
    status: str
    withdraw_reason: str | None = None
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None = None

    __table_args__ = (
        # A chat is offered to one agent at a time: the database enforces it.
        Index(
            "ux_offer_one_pending_chat",
            "conversation_id",
            unique=True,
            sqlite_where=text("kind = 'chat' AND status = 'pending'"),
            postgresql_where=text("kind = 'chat' AND status = 'pending'"),
        ),
        Index("ix_offer_status", "status", "agent_id"),
        # The supervisor figures count offers answered in the last 15 minutes.
        Index("ix_offer_resolved", "kind", "resolved_at"),
    )


class Invite(SQLModel, table=True):
    id: str = Field(primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    inviter_id: str = Field(foreign_key="agent.id")
    invitee_id: str = Field(foreign_key="agent.id")
    queue_id: str | None = None
    # pending | accepted | rejected | timed_out | cancelled | withdrawn
    status: str
    request_id: str | None = None
    created_at: datetime
    expires_at: datetime
    resolved_at: datetime | None = None

    __table_args__ = (
        Index(
            "ux_invite_one_pending",
            "conversation_id",
            unique=True,
            sqlite_where=text("status = 'pending'"),
            postgresql_where=text("status = 'pending'"),
        ),
        UniqueConstraint("conversation_id", "inviter_id", "request_id"),
    )


class OfferMenu(SQLModel, table=True):
    __tablename__ = "offer_menu"
    id: str = Field(primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    prompt: str = Field(sa_column=Column(Text, nullable=False))
    # JSON list of {"option_id", "label"}
    options: str = Field(sa_column=Column(Text, nullable=False))
    chosen_option_id: str | None = None
    chosen_at: datetime | None = None


class FeedEvent(SQLModel, table=True):
    """An agent session's offer feed, resumable by seq like a conversation."""

    __tablename__ = "agent_feed_event"
    id: int | None = Field(default=None, primary_key=True)
    session_id: str = Field(foreign_key="agent_session.id")
    seq: int
    kind: str
    created_at: datetime
    payload: str = Field(sa_column=Column(Text, nullable=False))

    __table_args__ = (UniqueConstraint("session_id", "seq"),)


class Attachment(SQLModel, table=True):
    """An upload, and once complete, the attachment it becomes. Bytes live in the blob store."""

    id: str = Field(primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    # "customer" or "agent:<id>": only the uploader continues, completes or sends it.
    uploader: str
    request_id: str | None = None
    file_name: str
    declared_type: str
    size_bytes: int
    received_bytes: int = 0
    # uploading | complete | attached
    status: str
    sha256: str | None = Field(default=None, index=True)  # "does any row still name this blob?"
    content_type: str | None = None
    created_at: datetime
    # Unfinished or unsent uploads are removed after this; None once on a message.
    expires_at: datetime | None = None
    event_seq: int | None = None
    # all | agents, as the message it is on
    visibility: str | None = None

    __table_args__ = (
        UniqueConstraint("conversation_id", "uploader", "request_id"),
        Index("ix_attachment_expiry", "status", "expires_at"),
    )


class StreamLease(SQLModel, table=True):
    """An open offer stream, held by the node that serves it. The node renews its leases; a dead node's
    expire, so presence never outlives the process that had it (agent_session.stream_count counts these)."""

    __tablename__ = "stream_lease"
    id: str = Field(primary_key=True)
    session_id: str = Field(foreign_key="agent_session.id", index=True, ondelete="CASCADE")
    node_id: str = Field(index=True)
    created_at: datetime
    expires_at: datetime = Field(index=True)


class BlobChunk(SQLModel, table=True):
    """Attachment bytes in the database (PostgreSQL, a cluster): any node serves any file and a node's
    death loses none. key is "part:<upload id>" while uploading, "sha:<sha256>" once complete."""

    __tablename__ = "blob_chunk"
    key: str = Field(primary_key=True)
    offset: int = Field(sa_column=Column(BigInteger, primary_key=True, autoincrement=False))
    data: bytes = Field(sa_column=Column(LargeBinary, nullable=False))


class WrapUpCode(SQLModel, table=True):
    """A reason an agent picks when closing: for every queue (queue_id None) or one."""

    __tablename__ = "wrap_up_code"
    id: str = Field(primary_key=True)
    display_name: str
    queue_id: str | None = Field(default=None, foreign_key="queue.id", ondelete="CASCADE")


class ReadCursor(SQLModel, table=True):
    """How far one participant ("customer" or "agent:<id>") has read a conversation; only moves forward.
    public_seq is seq clamped to the highest public event at or below it: what the customer may be told."""

    __tablename__ = "read_cursor"
    conversation_id: str = Field(foreign_key="conversation.id", primary_key=True)
    reader: str = Field(primary_key=True)
    seq: int
    read_at: datetime
    public_seq: int
    public_read_at: datetime


class MonitorSession(SQLModel, table=True):
    """A supervisor watching a conversation (AgentService.MonitorConversation), from start to stop."""

    __tablename__ = "monitor_session"
    id: str = Field(primary_key=True)
    conversation_id: str = Field(foreign_key="conversation.id", index=True)
    agent_id: str = Field(foreign_key="agent.id")
    session_id: str
    # The node whose stream it is: a restarting node stops its own monitors, never another node's.
    node_id: str = ""
    started_at: datetime
    ended_at: datetime | None = None
