"""File bytes on disk: partial uploads by upload id, finished files by SHA-256.

No user-supplied name ever reaches a path. Every call is blocking I/O on at
most one chunk at a time; callers run it on a thread.
"""

from __future__ import annotations

import codecs
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Scan:
    sha256: str
    size: int
    head: bytes
    tail: bytes
    utf8: bool  # valid UTF-8 with no NUL bytes


class Scanner:
    """The same checks as BlobStore.scan, fed chunk by chunk as an upload arrives."""

    def __init__(self, head_size: int = 8192, tail_size: int = 2048):
        self._h = hashlib.sha256()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._head_size, self._tail_size = head_size, tail_size
        self.utf8 = True
        self.size = 0
        self.head = b""
        self.tail = b""

    def update(self, block: bytes) -> None:
        if len(self.head) < self._head_size:
            self.head = (self.head + block[: self._head_size])[: self._head_size]
        self._h.update(block)
        self.size += len(block)
        self.tail = (self.tail + block[-self._tail_size :])[-self._tail_size :]
        if self.utf8:
            try:
                self._decoder.decode(block)
                self.utf8 = b"\x00" not in block
            except UnicodeDecodeError:
                self.utf8 = False

    def result(self) -> Scan:
        utf8 = self.utf8
        if utf8:
            try:
                self._decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                utf8 = False
        return Scan(self._h.hexdigest(), self.size, self.head, self.tail, utf8)


class BlobStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._parts = self.root / "uploads"
        self._blobs = self.root / "blobs"

    def part_path(self, upload_id: str) -> Path:
        return self._parts / upload_id

    def blob_path(self, sha256: str) -> Path:
        return self._blobs / sha256[:2] / sha256

    def write_chunk(self, upload_id: str, offset: int, data: bytes) -> None:
        """Write at offset and cut what lies beyond (left by a write whose commit never happened)."""
        path = self.part_path(upload_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "r+b" if path.exists() else "wb") as f:
            f.seek(offset)
            f.write(data)
            f.truncate()

    def part_size(self, upload_id: str) -> int:
        try:
            return self.part_path(upload_id).stat().st_size
        except FileNotFoundError:
            return 0

    def scan(self, upload_id: str) -> Scan:
        """Hash and check the whole part file in one streaming pass (after a restart lost the running scan)."""
        scanner = Scanner()
        with open(self.part_path(upload_id), "rb") as f:
            while block := f.read(READ_BLOCK):
                scanner.update(block)
        return scanner.result()

    def commit(self, upload_id: str, sha256: str) -> None:
        """Move a checked upload to its content address (a file already there is the same bytes)."""
        part = self.part_path(upload_id)
        blob = self.blob_path(sha256)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            part.unlink(missing_ok=True)
        else:
            os.replace(part, blob)

    def read(self, sha256: str, offset: int, size: int) -> bytes:
        with open(self.blob_path(sha256), "rb") as f:
            f.seek(offset)
            return f.read(size)

    def remove_part(self, upload_id: str) -> None:
        self.part_path(upload_id).unlink(missing_ok=True)

    def remove_blob(self, sha256: str) -> None:
        self.blob_path(sha256).unlink(missing_ok=True)
