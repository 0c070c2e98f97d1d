"""An asyncio client for chat.v1.AgentService on the generated stubs (grpc.aio).

Used by both the terminal app and the scriptable mode; it knows nothing about
either. Streams are followed from a cursor: they reconnect with backoff and
resume with after_seq, dropping anything at or below the cursor, so a dropped
connection or a server restart loses nothing and shows nothing twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Generic, Literal, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import agent_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

MIB = 1024 * 1024

# Reconnect soon after the server comes back instead of gRPC's default (1 s, growing to 120 s);
# keepalive notices a connection that died without a word.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * MIB),
]

Progress = Callable[[int, int], None]

# What a Feed yields: pb.OfferEvent for the offer feed, rpb.ConversationEvent for a conversation.
EventT = TypeVar("EventT")
ResponseT = TypeVar("ResponseT")


class Refused(Exception):
    """The server refused a call (or could not be reached): status code, ErrorInfo reason, message."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, metadata: dict[str, str] | None = None):
        super().__init__(f"{code.name} {reason}: {message}" if reason else f"{code.name}: {message}")
        self.code, self.reason, self.message = code, reason, message
        self.metadata = metadata or {}

    @staticmethod
    def from_error(err: grpc.aio.AioRpcError) -> Refused:
        reason, metadata = "", {}
        # from_call reads code(), details() and trailing_metadata(), which an AioRpcError has as plain
        # methods; the grpcio-status stubs ask for a grpc.Call only.
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        for detail in status.details if status else ():
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
                break
        cls = SessionEnded if err.code() == grpc.StatusCode.UNAUTHENTICATED else Refused
        return cls(err.code(), reason, err.details() or "", metadata)


class SessionEnded(Refused):
    """UNAUTHENTICATED: the session token is gone (logout, a login elsewhere). Log in again."""


@dataclass(frozen=True)
class Session:
    token: str
    agent_id: str
    display_name: str
    profile_id: str
    profile_name: str
    queue_ids: tuple[str, ...]
    ready: bool
    # Logged in with a supervisor profile: may monitor its queues' chats, whisper and barge in.
    supervisor: bool = False


@dataclass
class Backoff:
    """Exponential delays with jitter between reconnect attempts."""

    initial: float = 0.1
    maximum: float = 3.0

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * random.uniform(0.5, 1.0)
            delay = min(delay * 2, self.maximum)


class Feed(Generic[EventT]):
    """A server stream (offers or one conversation) followed from a cursor.

    Iterate it for the events. On UNAVAILABLE (STREAM_LAGGING included, and a
    dropped connection or a stopping server, which gRPC reports the same way) it
    reopens with after_seq = the last seq seen on an event or a heartbeat.
    UNAUTHENTICATED raises SessionEnded, any other refusal Refused. It ends when
    the server ends the stream normally (a conversation closed, or left).

    Ephemeral items with no seq (a TypingIndicator, a ReadCursor) are not events:
    they go to on_signal, when set, as (kind, item), e.g. ("typing", indicator).
    """

    def __init__(
        self, client: AgentClient, open_call: Callable[[int], grpc.aio.UnaryStreamCall[Any, Any]], after_seq: int
    ):
        self._client = client
        self._open = open_call
        self.cursor = after_seq
        self.live = False
        # Set at the first heartbeat: the backlog has been replayed, events are live from here.
        self.caught_up = asyncio.Event()
        self.on_signal: Callable[[str, Any], None] | None = None

    async def __aiter__(self) -> AsyncIterator[EventT]:
        delays = self._client.backoff.delays()
        try:
            while True:
                call = self._open(self.cursor)
                try:
                    async for item in call:
                        kind = item.WhichOneof("kind")
                        if kind == "heartbeat":
                            self.cursor = max(self.cursor, item.heartbeat.latest_seq)
                            if not self.live:
                                self._set_live(True)
                                delays = self._client.backoff.delays()
                        elif kind == "event":
                            if item.event.seq > self.cursor:
                                self.cursor = item.event.seq
                                yield item.event
                        elif kind is not None and self.on_signal is not None:
                            self.on_signal(kind, getattr(item, kind))
                    return
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE:
                        raise Refused.from_error(err) from None
                finally:
                    call.cancel()
                self._set_live(False)
                self._client.reconnects += 1
                await asyncio.sleep(next(delays))
        finally:
            self._client._feed_gone(self)

    def _set_live(self, live: bool) -> None:
        self.live = live
        if live:
            self.caught_up.set()
        self._client._feed_status(self, live)


class AgentClient:
    """One agent's connection: a channel, a session token, the calls and the feeds.

    Unary calls are retried with the same request (so the same request_id) on
    UNAVAILABLE for up to retry_for seconds; refusals raise Refused.
    """

    def __init__(self, address: str, token: str = "", *, retry_for: float = 20.0, backoff: Backoff | None = None):
        self.address = address
        self.token = token
        self.retry_for = retry_for
        self.backoff = backoff or Backoff()
        # Called with False when a live feed loses its connection, True when all are back.
        self.on_connection: Callable[[bool], None] | None = None
        self.reconnects = 0
        self._down: set[Feed[Any]] = set()
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = agent_service_pb2_grpc.AgentServiceStub(self.channel)

    async def aclose(self) -> None:
        await self.channel.close()

    @property
    def connected(self) -> bool:
        return not self._down

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    async def _call(
        self, method: Callable[..., Awaitable[ResponseT]], request: object, *, retry: bool = True
    ) -> ResponseT:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delays = self.backoff.delays()
        while True:
            try:
                return await method(request, metadata=self._metadata())
            except grpc.aio.AioRpcError as err:
                if not (retry and err.code() == grpc.StatusCode.UNAVAILABLE and loop.time() < deadline):
                    raise Refused.from_error(err) from None
            await asyncio.sleep(next(delays))

    def _feed_status(self, feed: Feed[Any], live: bool) -> None:
        was_connected = self.connected
        if live:
            self._down.discard(feed)
        else:
            self._down.add(feed)
        if self.connected != was_connected and self.on_connection is not None:
            self.on_connection(self.connected)

    def _feed_gone(self, feed: Feed[Any]) -> None:
        if feed in self._down:
            self._feed_status(feed, True)

    # --- session -------------------------------------------------------------

    async def login(self, username: str, password: str, profile_id: str, ready: bool = False) -> Session:
        # Not retried: a wrong address should say so at once, not after retry_for.
        req = pb.LoginRequest(username=username, password=password, profile_id=profile_id, ready=ready)
        resp = await self._call(self.stub.Login, req, retry=False)
        self.token = resp.session_token
        return Session(
            token=resp.session_token,
            agent_id=resp.agent.agent_id,
            display_name=resp.agent.display_name,
            profile_id=resp.profile.profile_id,
            profile_name=resp.profile.display_name,
            queue_ids=tuple(resp.profile.queue_ids),
            ready=resp.state == pb.AGENT_STATE_READY,
            supervisor=resp.profile.supervisor,
        )

    async def logout(self) -> None:
        await self._call(self.stub.Logout, pb.LogoutRequest())
        self.token = ""

    async def set_ready(self, ready: bool) -> bool:
        state = pb.AGENT_STATE_READY if ready else pb.AGENT_STATE_NOT_READY
        resp = await self._call(self.stub.SetAgentState, pb.SetAgentStateRequest(state=state))
        return resp.state == pb.AGENT_STATE_READY

    # --- offers --------------------------------------------------------------

    def offers(self, after_seq: int = 0) -> Feed[pb.OfferEvent]:
        """The session's offer feed (OfferEvents). Offers are only made while it is open."""

        def open_call(after: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
            return self.stub.StreamOffers(pb.StreamOffersRequest(after_seq=after), metadata=self._metadata())

        return Feed(self, open_call, after_seq)

    async def accept(self, offer_id: str) -> rpb.Conversation:
        return (await self._call(self.stub.AcceptOffer, pb.AcceptOfferRequest(offer_id=offer_id))).conversation

    async def reject(self, offer_id: str) -> None:
        await self._call(self.stub.RejectOffer, pb.RejectOfferRequest(offer_id=offer_id))

    # --- conversations ---------------------------------------------------------

    async def conversations(self, include_closed: bool = False) -> list[rpb.Conversation]:
        resp = await self._call(self.stub.ListConversations, pb.ListConversationsRequest(include_closed=include_closed))
        return list(resp.conversations)

    async def conversation(self, conversation_id: str) -> rpb.Conversation:
        req = pb.GetConversationRequest(conversation_id=conversation_id)
        return (await self._call(self.stub.GetConversation, req)).conversation

    def follow(self, conversation_id: str, after_seq: int = 0) -> Feed[rpb.ConversationEvent]:
        """A conversation's events after after_seq (0: the whole history), then live."""

        def open_call(after: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
            req = pb.StreamConversationRequest(conversation_id=conversation_id, after_seq=after)
            return self.stub.StreamConversation(req, metadata=self._metadata())

        return Feed(self, open_call, after_seq)

    async def send(
        self,
        conversation_id: str,
        text: str = "",
        *,
        private: bool = False,
        predefined_id: str = "",
        attachment_ids: list[str] | tuple[str, ...] = (),
    ) -> rpb.ConversationEvent:
        req = pb.SendMessageRequest(
            conversation_id=conversation_id,
            request_id=uuid.uuid4().hex,
            text=text,
            visibility=rpb.VISIBILITY_AGENTS_ONLY if private else rpb.VISIBILITY_ALL,
            predefined_message_id=predefined_id,
            attachment_ids=list(attachment_ids),
        )
        return (await self._call(self.stub.SendMessage, req)).event

    async def set_typing(self, conversation_id: str, typing: bool = True, *, private: bool = False) -> None:
        """Say whether this agent is composing (at most every 2 s while typing). Not retried: a late signal is
        worse than none."""
        req = pb.SetTypingRequest(
            conversation_id=conversation_id,
            typing=typing,
            visibility=rpb.VISIBILITY_AGENTS_ONLY if private else rpb.VISIBILITY_ALL,
        )
        await self._call(self.stub.SetTyping, req, retry=False)

    async def predefined(self, conversation_id: str = "") -> list[rpb.PredefinedMessage]:
        req = pb.ListPredefinedMessagesRequest(conversation_id=conversation_id)
        return list((await self._call(self.stub.ListPredefinedMessages, req)).predefined_messages)

    async def send_menu(self, conversation_id: str, prompt: str, labels: list[str]) -> rpb.ConversationEvent:
        """An offer menu with one option per label (ids o1, o2, ...)."""
        options = [rpb.OfferMenuOption(option_id=f"o{i}", label=label) for i, label in enumerate(labels, 1)]
        req = pb.SendOfferMenuRequest(
            conversation_id=conversation_id, request_id=uuid.uuid4().hex, prompt=prompt, options=options
        )
        return (await self._call(self.stub.SendOfferMenu, req)).event

    async def invite(self, conversation_id: str, *, agent_id: str = "", queue_id: str = "") -> rpb.Invite:
        """Invite a named agent, or a random available agent of a queue."""
        req = pb.InviteAgentRequest(conversation_id=conversation_id, request_id=uuid.uuid4().hex)
        if agent_id:
            req.agent_id = agent_id
        if queue_id:
            req.queue_id = queue_id
        return (await self._call(self.stub.InviteAgent, req)).invite

    async def cancel_invite(self, invite_id: str) -> rpb.Invite:
        return (await self._call(self.stub.CancelInvite, pb.CancelInviteRequest(invite_id=invite_id))).invite

    async def leave(self, conversation_id: str) -> None:
        await self._call(self.stub.LeaveConversation, pb.LeaveConversationRequest(conversation_id=conversation_id))

    async def close(
        self, conversation_id: str, confirm: bool = False, *, wrap_up_code_id: str = "", wrap_up_note: str = ""
    ) -> rpb.Conversation:
        req = pb.CloseConversationRequest(
            conversation_id=conversation_id, confirm=confirm, wrap_up_code_id=wrap_up_code_id, wrap_up_note=wrap_up_note
        )
        return (await self._call(self.stub.CloseConversation, req)).conversation

    async def wrap_up_codes(self, conversation_id: str) -> tuple[list[rpb.WrapUpCode], bool]:
        """The wrap-up codes close() takes for this conversation, and whether its queue requires one."""
        resp = await self._call(self.stub.ListWrapUpCodes, pb.ListWrapUpCodesRequest(conversation_id=conversation_id))
        return list(resp.wrap_up_codes), resp.wrap_up_required

    async def mark_read(self, conversation_id: str, up_to_seq: int) -> rpb.ReadCursor:
        """Every event with seq <= up_to_seq read; the others see it. A lower value than before changes nothing."""
        req = pb.MarkReadRequest(conversation_id=conversation_id, up_to_seq=up_to_seq)
        return (await self._call(self.stub.MarkRead, req)).read_cursor

    # --- supervisors ------------------------------------------------------------

    async def live_conversations(self, queue_id: str = "") -> list[pb.LiveConversation]:
        """The supervised queues' queued and active conversations, oldest first (a supervisor profile only)."""
        req = pb.ListLiveConversationsRequest(queue_id=queue_id)
        return list((await self._call(self.stub.ListLiveConversations, req)).live_conversations)

    def monitor(self, conversation_id: str, after_seq: int = 0) -> Feed[rpb.ConversationEvent]:
        """Watch a conversation as its agents see it (private included), without joining; like follow()."""

        def open_call(after: int) -> grpc.aio.UnaryStreamCall[Any, Any]:
            req = pb.MonitorConversationRequest(conversation_id=conversation_id, after_seq=after)
            return self.stub.MonitorConversation(req, metadata=self._metadata())

        return Feed(self, open_call, after_seq)

    async def whisper(self, conversation_id: str, text: str) -> rpb.ConversationEvent:
        """A note to the agents of a conversation this supervisor monitors (the customer never sees it)."""
        req = pb.WhisperRequest(conversation_id=conversation_id, request_id=uuid.uuid4().hex, text=text)
        return (await self._call(self.stub.Whisper, req)).event

    async def barge_in(self, conversation_id: str) -> rpb.Conversation:
        """Join a monitored conversation as one of its agents."""
        return (await self._call(self.stub.BargeIn, pb.BargeInRequest(conversation_id=conversation_id))).conversation

    # --- attachments -------------------------------------------------------------

    async def upload(
        self, conversation_id: str, path: str | Path, progress: Progress | None = None, content_type: str = ""
    ) -> rpb.Attachment:
        """Upload a file in chunks, never holding more than one chunk in memory; the attachment to send."""
        path = Path(path)
        # Disk reads and writes go to a thread: a slow disk must not stall the app's event loop.
        size = (await asyncio.to_thread(path.stat)).st_size
        digest = await asyncio.to_thread(_sha256, path)
        create = pb.CreateUploadRequest(
            conversation_id=conversation_id,
            request_id=uuid.uuid4().hex,
            file_name=path.name,
            size_bytes=size,
            content_type=content_type,
        )
        upload = (await self._call(self.stub.CreateUpload, create)).upload
        step = upload.max_chunk_bytes or MIB
        offset = upload.received_bytes
        f = await asyncio.to_thread(_open_binary, path, "rb")
        try:
            while offset < size:
                data = await asyncio.to_thread(_read_at, f, offset, step)
                req = pb.UploadChunkRequest(upload_id=upload.upload_id, offset=offset, data=data)
                try:
                    # A retry after a lost response re-sends the same chunk, which the server accepts.
                    offset = (await self._call(self.stub.UploadChunk, req)).received_bytes
                except Refused as err:
                    if err.reason != "OFFSET_MISMATCH":
                        raise
                    # The server holds less (or more) than we thought: continue from where it stands.
                    state = await self._call(self.stub.GetUpload, pb.GetUploadRequest(upload_id=upload.upload_id))
                    if state.upload.received_bytes == offset:
                        raise
                    offset = state.upload.received_bytes
                if progress:
                    progress(offset, size)
        finally:
            f.close()  # opened for reading: nothing to flush
        done = await self._call(
            self.stub.CompleteUpload, pb.CompleteUploadRequest(upload_id=upload.upload_id, sha256=digest)
        )
        return done.upload.attachment

    async def download(self, attachment_id: str, dest: str | Path, progress: Progress | None = None) -> Path:
        """Stream an attachment to dest (a directory gets the attachment's own name, made unique).

        A dropped stream resumes from the bytes already written; the result is
        checked against the attachment's SHA-256 before it takes its name.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.retry_for
        delays = self.backoff.delays()
        offset, hasher = 0, hashlib.sha256()
        meta: rpb.Attachment | None = None
        target: Path | None = None
        part: Path | None = None
        out: IO[bytes] | None = None
        try:
            while True:
                req = pb.DownloadAttachmentRequest(attachment_id=attachment_id, offset=offset)
                call = self.stub.DownloadAttachment(req, metadata=self._metadata())
                try:
                    async for item in call:
                        if item.HasField("attachment"):
                            meta = item.attachment
                            if out is None:
                                target = await asyncio.to_thread(_target, Path(dest), meta.file_name or attachment_id)
                                part = target.with_name(target.name + ".part")
                                out = await asyncio.to_thread(_open_binary, part, "wb")
                            continue
                        if out is None or meta is None:
                            raise ValueError(f"download of {attachment_id} sent bytes before saying what they are")
                        if item.chunk.offset != offset:
                            raise ValueError(
                                f"download of {attachment_id} jumped to byte {item.chunk.offset}, expected {offset}"
                            )
                        await asyncio.to_thread(out.write, item.chunk.data)
                        hasher.update(item.chunk.data)
                        offset += len(item.chunk.data)
                        if progress:
                            progress(offset, meta.size_bytes)
                    break
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNAVAILABLE or loop.time() >= deadline:
                        raise Refused.from_error(err) from None
                await asyncio.sleep(next(delays))
        finally:
            if out is not None:
                # Flushes the last writes: a thread, like them. Cancelled meanwhile, the close still completes.
                await asyncio.to_thread(out.close)
        assert meta is not None and target is not None and part is not None
        if hasher.hexdigest() != meta.sha256:
            await asyncio.to_thread(part.unlink)
            raise ValueError(f"{meta.file_name}: the downloaded bytes do not match the attachment's SHA-256")
        await asyncio.to_thread(part.replace, target)
        return target


def _open_binary(path: Path, mode: Literal["rb", "wb"]) -> IO[bytes]:
    return path.open(mode)


def _read_at(f: IO[bytes], offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


def _target(dest: Path, file_name: str) -> Path:
    """dest itself, or a name in the directory dest that is not taken yet ("a.pdf", "a (1).pdf", ...)."""
    if not dest.is_dir():
        return dest
    name = Path(file_name).name or "attachment"
    candidate, n = dest / name, 1
    while candidate.exists() or candidate.with_name(candidate.name + ".part").exists():
        candidate = dest / f"{Path(name).stem} ({n}){Path(name).suffix}"
        n += 1
    return candidate
