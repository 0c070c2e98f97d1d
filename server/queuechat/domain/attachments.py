"""Attachments: resumable uploads in chunks, content checks, downloads.

An upload is created with its exact size, filled chunk by chunk in order
(the server confirms received_bytes, so a client resumes from there), then
completed with its SHA-256: the file is hashed and sniffed in one streaming
pass and moved to its content address. Only then can a message name it; the
message and its attachments commit together. Nothing holds a whole file in
memory: at most one chunk per call.

Uploads of the same bytes share one blob. A blob goes only when no row names
it, decided under that blob's lock: completing an upload moves its bytes in
place and commits the row that names them under the same lock, so a removal
either sees that row or removes the file before the bytes are moved in again.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlmodel import Session, col, func, select, update

from ..config import Limits
from ..errors import ChatError, exhausted, invalid, not_found, precondition, short
from ..store.blobs import Blobs, Scanner
from ..store.models import Attachment, Conversation
from . import filetypes
from .access import can_read, readable_conversation, require_member
from .log import ts, utcnow
from .tx import Reader, Tx, Writes, routing_free
from .views import AgentPrincipal, CustomerPrincipal

Who = AgentPrincipal | CustomerPrincipal
R = TypeVar("R")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RECORD_EVERY = 8 * 1024 * 1024
_STATES = {
    "uploading": "UPLOAD_STATE_UPLOADING",
    "complete": "UPLOAD_STATE_COMPLETE",
    "attached": "UPLOAD_STATE_ATTACHED",
}


def actor(who: Who) -> str:
    return f"agent:{who.agent_id}" if isinstance(who, AgentPrincipal) else "customer"


def sanitise_name(name: str) -> str:
    """A display name only: no directories, control characters or leading dots; at most 200 characters."""
    name = unicodedata.normalize("NFC", name).replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip().lstrip(".").strip()
    return name[:200] or "file"


def attachment_json(a: Attachment) -> dict[str, Any]:
    return {
        "attachment_id": a.id,
        # Stored safe since completion; made safe here too for rows completed before that.
        "file_name": filetypes.safe_name(a.file_name, a.content_type) if a.content_type else a.file_name,
        "content_type": a.content_type or "",
        "size_bytes": a.size_bytes,
        "sha256": a.sha256 or "",
    }


def upload_json(a: Attachment, chunk: int) -> dict[str, Any]:
    out: dict[str, Any] = {
        "upload_id": a.id,
        "conversation_id": a.conversation_id,
        "file_name": a.file_name,
        "content_type": a.declared_type,
        "size_bytes": a.size_bytes,
        "received_bytes": a.received_bytes,
        "max_chunk_bytes": chunk,
        "state": _STATES[a.status],
    }
    if a.status != "uploading":
        out["attachment"] = attachment_json(a)
    if a.expires_at is not None:
        out["expire_time"] = ts(a.expires_at)
    return out


# --- writes (one transaction each) ------------------------------------------


def _require_writer(tx: Tx, who: Who, conversation_id: str) -> Conversation:
    if isinstance(who, AgentPrincipal):
        conv = require_member(tx, who, conversation_id)
    else:
        conv = readable_conversation(tx.session, who, conversation_id)
        if not conv.customer_connected:
            raise precondition("CHAT_ENDED", "You have ended this chat.")
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conversation_id)
    return conv


def create_upload(
    tx: Tx, who: Who, conversation_id: str, request_id: str, file_name: str, size: int, declared: str
) -> dict[str, Any]:
    s = tx.session
    limits = tx.limits
    conv = _require_writer(tx, who, conversation_id)
    me = actor(who)
    if request_id:
        prior = s.exec(
            select(Attachment).where(
                Attachment.conversation_id == conv.id, Attachment.uploader == me, Attachment.request_id == request_id
            )
        ).first()
        if prior is not None:
            return upload_json(prior, limits.upload_chunk_bytes)
    if size <= 0:
        raise invalid("EMPTY_FILE", "size_bytes must be the file's exact size, more than 0.")
    if size > limits.max_attachment_bytes:
        raise invalid(
            "FILE_TOO_LARGE",
            f"A file may have at most {limits.max_attachment_bytes:,} bytes "
            f"({limits.max_attachment_bytes / 2**20:g} MiB); this one has {size:,}.",
            limit=limits.max_attachment_bytes,
        )
    declared = filetypes.check_declared(declared)
    open_uploads = s.exec(
        select(func.count()).where(
            Attachment.conversation_id == conv.id, Attachment.uploader == me, Attachment.status != "attached"
        )
    ).one()
    if open_uploads >= limits.max_attachments_per_message:
        raise exhausted(
            "TOO_MANY_UPLOADS",
            f"At most {limits.max_attachments_per_message} files can be on their way at once: "
            "send or let some expire.",
        )
    now = tx.now
    row = Attachment(
        id=uuid.uuid4().hex,
        conversation_id=conv.id,
        uploader=me,
        request_id=request_id or None,
        file_name=sanitise_name(file_name),
        declared_type=declared,
        size_bytes=size,
        status="uploading",
        created_at=now,
        expires_at=now + timedelta(seconds=limits.upload_ttl),
    )
    s.add(row)
    return upload_json(row, limits.upload_chunk_bytes)


def _own_upload(s: Session, who: Who, upload_id: str) -> Attachment:
    row = s.get(Attachment, upload_id) if upload_id else None
    if row is None or row.uploader != actor(who) or (
        isinstance(who, CustomerPrincipal) and row.conversation_id != who.conversation_id
    ):
        raise not_found("UPLOAD_NOT_FOUND", f"No upload {upload_id!r} of yours.", upload_id=upload_id)
    return row


@routing_free  # an upload's own row: nothing routing reads
def _record_chunk(tx: Tx, upload_id: str, stored: int, received: int) -> int:
    """One UPDATE, on the condition that the row is as this node last left it."""
    done = tx.conn.execute(
        update(Attachment)
        .where(
            col(Attachment.id) == upload_id,
            col(Attachment.status) == "uploading",
            col(Attachment.received_bytes) == stored,
        )
        .values(received_bytes=received, expires_at=tx.now + timedelta(seconds=tx.limits.upload_ttl))
    )
    if done.rowcount != 1:
        raise precondition("UPLOAD_CHANGED", "The upload changed meanwhile; ask GetUpload where it stands.")
    return received


@routing_free
def _complete(tx: Tx, upload_id: str, sha256: str, content_type: str) -> dict[str, Any]:
    row = tx.session.get(Attachment, upload_id)
    if row is None or row.status != "uploading":  # expired meanwhile (the sweeper takes no upload lock)
        raise not_found("UPLOAD_NOT_FOUND", f"No upload {upload_id!r} of yours.", upload_id=upload_id)
    row.status = "complete"
    row.received_bytes = row.size_bytes  # the stored count was a lower bound until now
    row.sha256 = sha256
    row.content_type = content_type
    # Clients save the file under this name: its extension must open it as what it is.
    row.file_name = filetypes.safe_name(row.file_name, content_type)
    row.expires_at = tx.now + timedelta(seconds=tx.limits.upload_ttl)
    tx.session.add(row)
    return upload_json(row, tx.limits.upload_chunk_bytes)


def attach(tx: Tx, who: Who, conversation_id: str, ids: list[str], visibility: str) -> list[Attachment]:
    """Inside the SendMessage transaction: the message and its attachments commit together."""
    limit = tx.limits.max_attachments_per_message
    if len(ids) > limit:
        raise invalid("TOO_MANY_ATTACHMENTS", f"A message may carry at most {limit} attachments, not {len(ids)}.")
    if len(set(ids)) != len(ids):
        raise invalid("DUPLICATE_ATTACHMENT", "The same attachment is named twice.")
    out = []
    for attachment_id in ids:
        row = tx.session.get(Attachment, attachment_id)
        if row is None or row.uploader != actor(who) or row.conversation_id != conversation_id:
            raise not_found("ATTACHMENT_NOT_FOUND", f"No attachment {attachment_id!r} of yours here.")
        if row.status == "uploading":
            raise precondition("ATTACHMENT_NOT_READY", f"{row.file_name} has not been completed.", attachment_id=row.id)
        if row.status == "attached":
            raise precondition(
                "ATTACHMENT_ALREADY_SENT", f"{row.file_name} is on another message.", attachment_id=row.id
            )
        row.status = "attached"
        row.visibility = visibility
        row.expires_at = None
        tx.session.add(row)
        out.append(row)
    tx.count("attachments", len(out), sender=actor(who).partition(":")[0])
    return out


def delete_upload(tx: Tx, who: Who, upload_id: str) -> tuple[list[str], list[str]]:
    """Returns (part files, blobs that may be unused) to remove once committed, like expire."""
    row = _own_upload(tx.session, who, upload_id)
    if row.status == "attached":
        raise precondition("ATTACHMENT_ALREADY_SENT", f"{row.file_name} is on a message already.", upload_id=upload_id)
    tx.session.delete(row)
    tx.session.flush()
    return _leftovers(tx, [row])


def expire(tx: Tx, now: datetime) -> tuple[list[str], list[str]]:
    """Remove abandoned uploads; returns (part files, blobs that may be unused) to delete once committed."""
    s = tx.session
    rows = s.exec(
        select(Attachment).where(Attachment.status != "attached", col(Attachment.expires_at) < now)
    ).all()
    for row in rows:
        s.delete(row)
    s.flush()
    return _leftovers(tx, rows)


def _leftovers(tx: Tx, deleted: Sequence[Attachment]) -> tuple[list[str], list[str]]:
    """Part files of deleted uploads, and the blobs they named. Whether another row still names a
    blob is decided later, under the blob's lock (Attachments._remove): an upload completing now
    may name it by then."""
    parts = [r.id for r in deleted if r.status == "uploading"]
    return parts, sorted({r.sha256 for r in deleted if r.sha256})


def _blob_unused(s: Session, sha256: str) -> bool:
    return s.exec(select(Attachment.id).where(Attachment.sha256 == sha256).limit(1)).first() is None


# --- the async side: file I/O on threads, one chunk at a time ---------------


@dataclass
class _Live:
    uploader: str
    conversation_id: str
    size: int
    stored: int  # what the database has
    scanner: Scanner | None
    received: int = -1
    scanning: asyncio.Future[None] | None = None  # the last chunk's scan
    recording: asyncio.Future[int] | None = None  # the last write of the stored count, if not seen done
    recording_to: int = 0  # the count that write stores

    def __post_init__(self) -> None:
        if self.received < 0:
            self.received = self.stored

    def recorded(self) -> bool:
        """Takes in the outcome of the last record if it is done: False if it failed (the row changed
        meanwhile: deleted, expired or written by another node)."""
        fut = self.recording
        if fut is None or not fut.done():
            return True
        self.recording = None
        if fut.cancelled() or fut.exception() is not None:
            return False
        self.stored = fut.result()
        return True

    def owned_by(self, who: Who) -> bool:
        return self.uploader == actor(who) and (
            isinstance(who, AgentPrincipal) or self.conversation_id == who.conversation_id
        )


class Attachments:
    def __init__(self, read: Reader, write: Writes, limits: Limits, blobs: Blobs):
        self.read = read
        self.write = write
        self.limits = limits
        self.blobs = blobs
        # Per upload id (chunks, completing, deleting) and per blob ("blob:" + sha256): a blob's file
        # is moved in or removed only together with the database's say on who names it.
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        # Uploads in progress: chunks after the first need no read, completing needs no second
        # pass over the file. Lost on restart: then the stored lower bound and a full scan.
        self._live: dict[str, _Live] = {}

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _blob_lock(self, sha256: str) -> asyncio.Lock:
        return self._lock("blob:" + sha256)

    async def _on_disk(self, row: Attachment) -> int:
        """Bytes confirmed before a restart are in the part file; a torn tail fails the SHA-256 check."""
        return max(row.received_bytes, min(row.size_bytes, await self._io(self.blobs.part_size, row.id)))

    async def _io(self, fn: Callable[..., R], *args: Any) -> R:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def create(
        self, who: Who, conversation_id: str, request_id: str, name: str, size: int, ctype: str
    ) -> dict[str, Any]:
        return await self.write(create_upload, who, conversation_id, request_id, name, size, ctype)

    async def get(self, who: Who, upload_id: str) -> dict[str, Any]:
        row = await self.read(_own_upload, who, upload_id)
        live = self._live.get(upload_id)
        if row.status == "uploading":  # the stored count is a lower bound: report what was confirmed
            row.received_bytes = live.received if live is not None else await self._on_disk(row)
        return upload_json(row, self.limits.upload_chunk_bytes)

    async def chunk(self, who: Who, upload_id: str, offset: int, data: bytes) -> int:
        limits = self.limits
        if not data:
            raise invalid("EMPTY_CHUNK", "A chunk needs data.")
        if len(data) > limits.upload_chunk_bytes:
            raise invalid("CHUNK_TOO_LARGE", f"A chunk may have at most {limits.upload_chunk_bytes:,} bytes.")
        async with self._lock(upload_id):
            live = self._live.get(upload_id)
            if live is not None and not live.recorded():
                del self._live[upload_id]  # the row changed meanwhile: ask the database where it stands
                live = None
            if live is None or not live.owned_by(who):
                row = await self.read(_own_upload, who, upload_id)
                if row.status != "uploading":
                    raise precondition("UPLOAD_COMPLETED", "This upload is already complete.", upload_id=upload_id)
                received = await self._on_disk(row)
                # Resumed after a restart (bytes already in): no running scan, the file is scanned at the end.
                live = _Live(row.uploader, row.conversation_id, row.size_bytes, row.received_bytes,
                             Scanner() if received == 0 else None, received)
            if offset + len(data) > live.size:
                raise invalid(
                    "SIZE_EXCEEDED",
                    f"The upload was declared {live.size:,} bytes; this chunk goes beyond that.",
                    size_bytes=live.size,
                )
            if offset != live.received:
                if offset + len(data) == live.received and offset >= 0:
                    return live.received  # a retry of the chunk we already have
                raise precondition(
                    "OFFSET_MISMATCH", f"Send the chunk at offset {live.received}.", expected_offset=live.received
                )
            self._live.pop(upload_id, None)  # until this chunk is on disk
            if live.scanning is not None:
                # The previous chunk's scan (at most one in flight, in order): it began when that
                # chunk was written, so it is over by now as a rule.
                await asyncio.wait((live.scanning,))
                if live.scanning.cancelled() or live.scanning.exception() is not None:
                    live.scanner = None  # the file is scanned whole at the end instead
                live.scanning = None
            # One job on one thread: the write, whose outcome answers this call, then the chunk's scan,
            # hashed and checked while the next chunk travels (hashlib runs without the GIL). A scan
            # begins only after its chunk is written; a failed write fails the call and drops `live`.
            loop = asyncio.get_running_loop()
            written: asyncio.Future[None] = loop.create_future()
            job = loop.run_in_executor(
                None, _write_then_scan, loop, written, self.blobs, live.scanner, upload_id, offset, data
            )
            job.add_done_callback(_consume)  # a failed write is this call's error, not the log's
            if live.scanner is not None:
                live.scanning = job
            await written
            received = offset + len(data)
            # The stored count is a lower bound written every few MiB (completing writes the last):
            # resuming from it is always safe (a chunk write cuts what lies beyond), and most chunks
            # skip a database write. It is written after the answer, while the next chunk travels:
            # what has arrived is known from the bytes stored (GetUpload, CompleteUpload and other
            # nodes ask the store), and the next record, completing or deleting waits for it first.
            # A record still in flight counts as written: the next chunk does not write its count again.
            last = live.recording_to if live.recording is not None else live.stored
            if received // _RECORD_EVERY != last // _RECORD_EVERY and received < live.size:
                if live.recording is not None:
                    await asyncio.wait((live.recording,))
                    if not live.recorded():
                        raise precondition(
                            "UPLOAD_CHANGED", "The upload changed meanwhile; ask GetUpload where it stands."
                        )
                live.recording_to = received
                live.recording = asyncio.ensure_future(self.write(_record_chunk, upload_id, live.stored, received))
                live.recording.add_done_callback(_consume)
            live.received = received
            self._live[upload_id] = live
            return received

    async def complete(self, who: Who, upload_id: str, sha256: str) -> dict[str, Any]:
        sha256 = sha256.lower()
        if not _SHA256.match(sha256):
            raise invalid("BAD_SHA256", "sha256 must be 64 hexadecimal characters.")
        # Runs to its end even if the caller goes away: once the bytes are in the blob, the row that
        # names them must commit (or fail) before the blob's lock is let go.
        task = asyncio.ensure_future(self._finish(who, upload_id, sha256))
        task.add_done_callback(_consume)
        return await asyncio.shield(task)

    async def _finish(self, who: Who, upload_id: str, sha256: str) -> dict[str, Any]:
        async with self._lock(upload_id):
            live = self._live.get(upload_id)
            if live is not None and live.recording is not None:
                await asyncio.wait((live.recording,))  # the row read next has it (or is gone)
                live.recorded()
            row = await self.read(_own_upload, who, upload_id)
            if row.status != "uploading":
                if row.sha256 == sha256:
                    return upload_json(row, self.limits.upload_chunk_bytes)  # a retry
                raise precondition("UPLOAD_COMPLETED", "This upload is already complete.", upload_id=upload_id)
            # What has arrived (the stored count is a lower bound): all of it, as this node confirmed
            # it, or as the store holds it (another node may have taken the upload on).
            if live is not None and live.received == row.size_bytes:
                received = live.received
            else:
                received = await self._on_disk(row)
            if received != row.size_bytes:
                raise precondition(
                    "UPLOAD_INCOMPLETE",
                    f"{received:,} of {row.size_bytes:,} bytes received.",
                    received_bytes=received,
                )
            if live is not None and live.scanning is not None:
                await asyncio.gather(live.scanning, return_exceptions=True)  # a failure falls back to a scan
            if live is not None and live.scanner is not None and live.scanner.size == row.size_bytes:
                scan = await self._io(live.scanner.result)
            else:
                scan = await self._io(self.blobs.scan, upload_id)
            if scan.sha256 != sha256:
                raise invalid("CHECKSUM_MISMATCH", "The SHA-256 of the bytes received differs; upload the file again.")
            content_type = filetypes.classify(row.declared_type, scan.head, scan.tail, scan.utf8, scan.pdf_problem)
            async with self._blob_lock(sha256):
                await self._io(self.blobs.commit, upload_id, sha256)
                try:
                    done = await self.write(_complete, upload_id, sha256, content_type)
                except ChatError:  # rolled back: the bytes just moved in may be nobody's
                    if await self.read(_blob_unused, sha256):
                        await self._io(self.blobs.remove_blob, sha256)
                    raise
            self._live.pop(upload_id, None)
            return done

    async def download(
        self, who: Who, attachment_id: str, offset: int
    ) -> AsyncIterator[dict[str, Any] | tuple[int, bytes]]:
        row = await self.read(_downloadable, who, attachment_id)
        if offset < 0 or offset > row.size_bytes:
            raise invalid("BAD_OFFSET", f"offset must be between 0 and {row.size_bytes}.")
        yield attachment_json(row)
        step = self.limits.upload_chunk_bytes
        while offset < row.size_bytes:
            data = await self._io(self.blobs.read, row.sha256, offset, step)
            if not data:
                break
            yield (offset, data)
            offset += len(data)

    async def delete(self, who: Who, upload_id: str) -> None:
        async with self._lock(upload_id):
            live = self._live.get(upload_id)
            if live is not None and live.recording is not None:
                await asyncio.wait((live.recording,))
            await self._remove(*await self.write(delete_upload, who, upload_id))

    async def sweep(self) -> None:
        await self._remove(*await self.write(expire, utcnow()))

    async def _remove(self, parts: list[str], blobs: list[str]) -> None:
        for upload_id in parts:
            self._live.pop(upload_id, None)
            await self._io(self.blobs.remove_part, upload_id)
        for sha in blobs:
            # Under the lock no upload of these bytes is between moving them in and committing its row.
            async with self._blob_lock(sha):
                if await self.read(_blob_unused, sha):
                    await self._io(self.blobs.remove_blob, sha)


def _settle(fut: asyncio.Future[None], error: BaseException | None) -> None:
    if not fut.done():  # the call may have gone away
        if error is None:
            fut.set_result(None)
        else:
            fut.set_exception(error)


def _write_then_scan(
    loop: asyncio.AbstractEventLoop, written: asyncio.Future[None], blobs: Blobs, scanner: Scanner | None,
    upload_id: str, offset: int, data: bytes,
) -> None:
    """On an executor thread: write the chunk, hand the outcome to the loop, then scan the chunk."""
    try:
        blobs.write_chunk(upload_id, offset, data)
    except BaseException as e:
        loop.call_soon_threadsafe(_settle, written, e)
        raise
    loop.call_soon_threadsafe(_settle, written, None)
    if scanner is not None:
        scanner.update(data)


def _consume(task: asyncio.Future[Any]) -> None:
    """A completion whose caller went away: its outcome was theirs to see, not the log's."""
    if not task.cancelled():
        task.exception()


def _downloadable(s: Session, who: Who, attachment_id: str) -> Attachment:
    """Visibility follows the message: private ones are for agents only.
    Own uploads are visible to their uploader. Anything else, in whatever conversation, is simply
    not found: the answer tells nothing about other conversations."""
    row = s.get(Attachment, attachment_id) if attachment_id else None
    if row is None or not _may_see(s, who, row):
        raise not_found("ATTACHMENT_NOT_FOUND", f"No attachment {short(attachment_id)!r} that you can see.")
    return row


def _may_see(s: Session, who: Who, row: Attachment) -> bool:
    if isinstance(who, CustomerPrincipal):
        if row.conversation_id != who.conversation_id:
            return False
    elif not can_read(s, who, row.conversation_id):
        return False
    own = row.uploader == actor(who) and row.status == "complete"
    return own or (row.status == "attached" and (isinstance(who, AgentPrincipal) or row.visibility == "all"))
