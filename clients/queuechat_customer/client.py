"""An asyncio client for chat.v1.CustomerService on the generated stubs (grpc.aio).

One client is one customer's chat: start_chat() keeps the conversation and its customer token, and
every later call is about that conversation. follow() reads the conversation from a cursor: on
UNAVAILABLE (a dropped connection, a server restart) it reconnects with backoff and resumes with
after_seq, dropping anything at or below the cursor, so nothing is lost or shown twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import grpc

from chat.v1 import customer_service_pb2 as pb
from chat.v1 import customer_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

# Shared with the agent client (no Textual there): the refusal type and the reconnect delays.
from queuechat_agent.client import Backoff as Backoff
from queuechat_agent.client import Refused as Refused

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

ResponseT = TypeVar("ResponseT")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Connection:
    """What follow() yields when the stream drops (False), and when it is caught up again (True)."""

    connected: bool


FeedItem = rpb.ConversationEvent | rpb.QueuePosition | Connection

# The last event a customer's stream carries: the chat is over for the customer.
FINAL = ("chat_ended", "chat_closed")


class CustomerClient:
    """One customer's chat: a channel, the conversation, its customer token and the calls.

    Unary calls are retried with the same request (so the same request_id) on UNAVAILABLE for up to
    retry_for seconds; refusals raise Refused.
    """

    def __init__(self, address: str, *, retry_for: float = 20.0, backoff: Backoff | None = None):
        self.address = address
        self.retry_for = retry_for
        self.backoff = backoff or Backoff()
        self.token = ""
        self.conversation = rpb.Conversation()
        # The last seq seen on an event or a heartbeat: follow() resumes after it.
        self.cursor = 0
        self.reconnects = 0
        self.channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self.stub = customer_service_pb2_grpc.CustomerServiceStub(self.channel)

    async def aclose(self) -> None:
        await self.channel.close()

    @property
    def conversation_id(self) -> str:
        return self.conversation.conversation_id

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    async def _call(
        self, method: Callable[..., Awaitable[ResponseT]], request: object, *, retry_for: float | None = None
    ) -> ResponseT:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.retry_for if retry_for is None else retry_for)
        delays = self.backoff.delays()
        while True:
            try:
                return await method(request, metadata=self._metadata())
            except grpc.aio.AioRpcError as err:
                if not (err.code() == grpc.StatusCode.UNAVAILABLE and loop.time() < deadline):
                    raise Refused.from_error(err) from None
            await asyncio.sleep(next(delays))

    # --- starting ----------------------------------------------------------------

    async def queues(self, retry_for: float | None = None) -> list[rpb.Queue]:
        resp = await self._call(self.stub.ListQueues, pb.ListQueuesRequest(), retry_for=retry_for)
        return list(resp.queues)

    async def start_chat(
        self,
        queue_id: str,
        variables: Mapping[str, str] | None = None,
        identity_token: str = "",
        retry_for: float | None = None,
    ) -> rpb.Conversation:
        """Start the chat; a retry uses the same request_id, so it returns the same chat."""
        req = pb.StartChatRequest(
            queue_id=queue_id,
            request_id=str(uuid.uuid4()),
            variables=dict(variables or {}),
            identity_token=identity_token,
        )
        resp = await self._call(self.stub.StartChat, req, retry_for=retry_for)
        self.conversation, self.token = resp.conversation, resp.customer_token
        return resp.conversation

    # --- the conversation ------------------------------------------------------------

    async def follow(self) -> AsyncIterator[FeedItem]:
        """The conversation's events after the cursor (the whole chat at first), queue positions while it
        waits, and Connection items when the stream drops and comes back. Ends after the last event the
        customer gets (chat_ended, or chat_closed: FINAL). Refusals other than UNAVAILABLE raise Refused."""
        delays = self.backoff.delays()
        live = True
        while True:
            req = pb.CustomerServiceStreamConversationRequest(
                conversation_id=self.conversation_id, after_seq=self.cursor
            )
            call = self.stub.StreamConversation(req, metadata=self._metadata())
            try:
                async for item in call:
                    kind = item.WhichOneof("kind")
                    if kind == "heartbeat":
                        self.cursor = max(self.cursor, item.heartbeat.latest_seq)
                        if not live:
                            live = True
                            delays = self.backoff.delays()
                            yield Connection(True)
                    elif kind == "queue_position":
                        yield item.queue_position
                    elif kind == "event" and item.event.seq > self.cursor:
                        self.cursor = item.event.seq
                        yield item.event
                        if item.event.WhichOneof("kind") in FINAL:
                            return
                # Ended without the last event (a server going away cleanly): resume like after a drop.
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise Refused.from_error(err) from None
            finally:
                call.cancel()
            if live:
                live = False
                yield Connection(False)
            self.reconnects += 1
            await asyncio.sleep(next(delays))

    async def send(self, text: str = "", attachment_ids: Sequence[str] = ()) -> rpb.ConversationEvent:
        req = pb.CustomerServiceSendMessageRequest(
            conversation_id=self.conversation_id,
            request_id=str(uuid.uuid4()),
            text=text,
            attachment_ids=list(attachment_ids),
        )
        return (await self._call(self.stub.SendMessage, req)).event

    async def choose(self, menu_id: str, option_id: str) -> rpb.ConversationEvent:
        req = pb.ChooseOptionRequest(conversation_id=self.conversation_id, menu_id=menu_id, option_id=option_id)
        return (await self._call(self.stub.ChooseOption, req)).event

    async def end(self, retry_for: float | None = None) -> rpb.Conversation:
        req = pb.EndChatRequest(conversation_id=self.conversation_id)
        return (await self._call(self.stub.EndChat, req, retry_for=retry_for)).conversation

    # --- attachments -------------------------------------------------------------------

    async def upload(self, path: str | Path, progress: Progress | None = None) -> rpb.Attachment:
        """Upload a file in chunks of the server's max_chunk_bytes, never holding more than one chunk in
        memory; the attachment to name in send(). A failed upload is deleted (best effort)."""
        path = Path(path)
        # Disk reads go to a thread: a slow disk must not stall the event loop (and the conversation).
        size = (await asyncio.to_thread(path.stat)).st_size
        digest = await asyncio.to_thread(_sha256, path)
        create = pb.CustomerServiceCreateUploadRequest(
            conversation_id=self.conversation_id,
            request_id=str(uuid.uuid4()),
            file_name=path.name,
            size_bytes=size,
        )
        upload = (await self._call(self.stub.CreateUpload, create)).upload
        try:
            step = upload.max_chunk_bytes or MIB
            offset = upload.received_bytes
            f = await asyncio.to_thread(_open_for_reading, path)
            try:
                while offset < size:
                    data = await asyncio.to_thread(_read_at, f, offset, step)
                    if not data:
                        raise ValueError(f"{path} shrank while it was being sent")
                    offset = await self._chunk(upload.upload_id, offset, data)
                    if progress:
                        progress(offset, size)
            finally:
                f.close()  # opened for reading: nothing to flush
            done = await self._call(
                self.stub.CompleteUpload,
                pb.CustomerServiceCompleteUploadRequest(
                    conversation_id=self.conversation_id, upload_id=upload.upload_id, sha256=digest
                ),
            )
        except (Refused, ValueError, OSError):
            await self._delete_upload(upload.upload_id)
            raise
        return done.upload.attachment

    async def _chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        """Send one chunk; the server's received_bytes after it."""
        req = pb.CustomerServiceUploadChunkRequest(
            conversation_id=self.conversation_id, upload_id=upload_id, offset=offset, data=data
        )
        try:
            # A retry after a lost response re-sends the same chunk, which the server accepts.
            received: int = (await self._call(self.stub.UploadChunk, req)).received_bytes
            return received
        except Refused as err:
            if err.reason != "OFFSET_MISMATCH":
                raise
        # The server holds less (or more) than we thought: continue from where it stands.
        get = pb.CustomerServiceGetUploadRequest(conversation_id=self.conversation_id, upload_id=upload_id)
        stands: int = (await self._call(self.stub.GetUpload, get)).upload.received_bytes
        if stands == offset:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "OFFSET_MISMATCH", "the server refused the chunk")
        return stands

    async def _delete_upload(self, upload_id: str) -> None:
        req = pb.CustomerServiceDeleteUploadRequest(conversation_id=self.conversation_id, upload_id=upload_id)
        with contextlib.suppress(Refused):  # else it expires on the server
            await self._call(self.stub.DeleteUpload, req, retry_for=2.0)


def _open_for_reading(path: Path) -> IO[bytes]:
    return path.open("rb")


def _read_at(f: IO[bytes], offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()
