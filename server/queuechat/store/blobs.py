"""Attachment bytes: partial uploads by upload id, finished files by SHA-256.

Two stores with one interface (`Blobs`): `BlobStore` keeps files on disk (the
default, with SQLite); `DbBlobStore` keeps chunk rows in PostgreSQL's
blob_chunk table, so that any node of a cluster serves any file and a node's
death loses none. `blob_store_for` picks one for a database.

No user-supplied name ever reaches a path or a key. Every call is blocking
I/O on at most one chunk at a time; callers run it on a thread.

The scan that hashes an upload also looks for active content in PDFs
(`PdfCheck`), in the same single pass and in bounded memory.
"""

from __future__ import annotations

import codecs
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import URL, Engine, create_engine, make_url

READ_BLOCK = 1024 * 1024


@dataclass(frozen=True)
class Scan:
    sha256: str
    size: int
    head: bytes
    tail: bytes
    utf8: bool  # valid UTF-8 with no NUL bytes
    # For a file that starts like a PDF: (reason, what) if it has active content or cannot be checked.
    pdf_problem: tuple[str, str] | None = None


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
        self._sniffed = False
        self._pdf: PdfCheck | None = None
        self._result: Scan | None = None

    def update(self, block: bytes) -> None:
        before = self.size
        if len(self.head) < self._head_size:
            self.head = (self.head + block[: self._head_size])[: self._head_size]
        self._h.update(block)
        self.size += len(block)
        self.tail = (self.tail + block[-self._tail_size :])[-self._tail_size :]
        if self.utf8:
            if block.isascii() and not self._decoder.getstate()[0]:
                self.utf8 = b"\x00" not in block  # ASCII between whole characters: UTF-8, nothing to decode
            else:
                try:
                    self._decoder.decode(block)
                    self.utf8 = b"\x00" not in block
                except UnicodeDecodeError:
                    self.utf8 = False
        if not self._sniffed and len(self.head) >= 4:
            # What filetypes.classify will call a PDF: "%PDF" at the very start.
            self._sniffed = True
            if self.head.startswith(b"%PDF"):
                self._pdf = PdfCheck()
                self._pdf.feed(self.head[:before])  # the few bytes before this block
        if self._pdf is not None:
            self._pdf.feed(block)

    def result(self) -> Scan:
        if self._result is None:
            utf8 = self.utf8
            if utf8:
                try:
                    self._decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    utf8 = False
            problem = self._pdf.finish() if self._pdf is not None else None
            self._result = Scan(self._h.hexdigest(), self.size, self.head, self.tail, utf8, problem)
        return self._result


# --- active content in PDFs ----------------------------------------------------------------
#
# A PDF runs code through actions: JavaScript (an action with /S /JavaScript and its /JS script, the
# document's /JavaScript name tree, /Rendition actions, which carry /JS too), /Launch (start a
# program), and /AA (additional actions: run on opening a page, on a field, on closing). It carries
# other files in /EmbeddedFile(s), /EF and /FileAttachment annotations, Flash and 3D in /RichMedia*,
# and scripted forms in /XFA. /OpenAction alone is harmless (most name a page to open at); its action
# is refused for what it is. Names may spell letters as #xx (/J#61vaScript), so names are decoded.
#
# The file is read as a reader reads it from the start: names inside strings and comments are text,
# not keys, and stream data is skipped, except for object streams (PDF 1.5), which hold ordinary
# objects, compressed: those are inflated (in pieces, at most _INFLATE_BUDGET bytes in all) and read
# the same way. An object stream that cannot be read (another filter, a predictor, encrypted,
# damaged) makes the file unchecked, so refused. Besides, anywhere in the raw bytes (and in inflated
# object streams), an action type written out (/S /JavaScript, /S /Launch, /S /Rendition) or any of
# the names above spelled with #xx is refused: it catches an object hidden where the cross-reference
# table points into a string or into another stream's data.
#
# Memory: a few hundred bytes carried between pieces, plus one inflated piece (_INFLATE_PIECE).

_D = rb"\x00\t\n\x0c\r ()<>\[\]{}/%"  # whitespace and delimiters, for a character class
_NAME_END = rb"(?![^" + _D + rb"])"
# Possessive: giving back a character never helps (none of them is the "#" or the delimiter that must
# follow), and a run that would be given back is most of what the regex does over binary data.
_ESCAPED = rb"/[^" + _D + rb"#]{0,64}+#[0-9A-Fa-f]{2}(?:[^" + _D + rb"#]|#[0-9A-Fa-f]{2}){0,64}+" + _NAME_END
_ACTIVE = frozenset(
    {
        b"JavaScript", b"JS", b"Rendition", b"Launch", b"AA",
        b"EmbeddedFile", b"EmbeddedFiles", b"EF", b"FileAttachment", b"XFA",
    }
)  # fmt: skip
_FLATE = frozenset({b"FlateDecode", b"Fl"})
_OTHER_FILTERS = frozenset(
    {
        b"ASCIIHexDecode", b"AHx", b"ASCII85Decode", b"A85", b"LZWDecode", b"LZW", b"RunLengthDecode",
        b"RL", b"CCITTFaxDecode", b"CCF", b"JBIG2Decode", b"DCTDecode", b"DCT", b"JPXDecode", b"Crypt",
    }
)  # fmt: skip
_DICT_NAMES = _FLATE | _OTHER_FILTERS | {b"First", b"ObjStm", b"Predictor"}
_WATCHED = sorted(_ACTIVE | _DICT_NAMES, key=len, reverse=True)
# One token of object syntax that matters here; the regex engine skips everything between them (the
# look-ahead lets it jump to the next possible first byte).
_TOKEN = re.compile(
    rb"(?=[(%<>/s])(?:(?P<str>\()|(?P<com>%)|(?P<open><<)|(?P<close>>>)|(?P<hex><)"
    rb"|/(?P<name>" + b"|".join(map(re.escape, _WATCHED)) + rb"|RichMedia[A-Za-z]*)" + _NAME_END
    + rb"|(?P<esc>" + _ESCAPED + rb")"
    + rb"|(?P<stream>stream)" + _NAME_END + rb")"
)  # fmt: skip
_KEYWORD_AFTER = frozenset(b"\x00\t\n\x0c\r ()<>[]{}%")  # what may precede the keyword "stream"
# Anywhere, strings and stream data included.
_RAW = re.compile(
    rb"/(?:S[\x00\t\n\x0c\r ]{0,32}/(?P<name>JavaScript|Launch|Rendition)" + _NAME_END
    + rb"|(?P<esc>" + _ESCAPED[1:] + rb"))"
)  # fmt: skip
_IN_STRING = re.compile(rb"[()\\]")
_EOL = re.compile(rb"[\r\n]")
_NOT_WS = re.compile(rb"[^\x00\t\n\x0c\r ]")
_HEX_ESCAPE = re.compile(rb"#([0-9A-Fa-f]{2})")
_CARRY = 320  # longer than any token above: a token cut by a piece's end is read with the next piece
_SKIP_FAST = 64  # pieces longer than this skip stream data without being copied
_INFLATE_PIECE = 1024 * 1024
_INFLATE_BUDGET = 64 * 1024 * 1024


def _libc_memmem() -> Any:
    """The C library's memmem, called through ctypes (which lets go of the GIL for the call), or None."""
    try:
        name = ctypes.util.find_library("c")
        fn = ctypes.CDLL(name).memmem if name else None
    except (OSError, AttributeError):
        return None
    if fn is not None:
        fn.restype = ctypes.c_void_p
        fn.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
    return fn


_MEMMEM = _libc_memmem()


def _contains(data: bytes, needle: bytes) -> bool:
    """`needle in data`. Over a big piece (stream data: an image, a font...) CPython's search costs a
    few tenths of a millisecond per MiB, all of it holding the GIL that the event loop waits for,
    next to the next chunk's bytes; libc's memmem is about four times as fast and runs without it."""
    if _MEMMEM is None or type(data) is not bytes or len(data) < 4096:
        return needle in data
    return _MEMMEM(data, len(data), needle, len(needle)) is not None


ACTIVE_CONTENT = "PDF_ACTIVE_CONTENT"
UNCHECKABLE = "PDF_UNCHECKABLE"


def _is_active(name: bytes) -> bool:
    return name in _ACTIVE or name.startswith(b"RichMedia")


def _decode_name(token: bytes) -> bytes:
    return _HEX_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), token[1:])


class _Problem(Exception):
    def __init__(self, reason: str, what: str):
        super().__init__(reason, what)
        self.reason, self.what = reason, what


def _active(name: bytes) -> _Problem:
    return _Problem(ACTIVE_CONTENT, "/" + name.decode("latin-1"))


class _Raw:
    """The markers of _RAW anywhere in a sequence of pieces.

    Read as if the pieces were one string: each feed looks at the matches that start before its last
    _CARRY bytes (a match is shorter than that) and keeps those bytes for the next. Matches never overlap
    (one starts at a slash; inside a match a slash only begins the name after /S, which no match starts
    with), so the matches starting in the carried bytes and those starting in the new piece are found
    apart: the piece itself is scanned where it lies, never copied."""

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, data: bytes, final: bool = False) -> None:
        carry = self._carry
        c = len(carry)
        limit = c + len(data) if final else c + len(data) - _CARRY
        if limit <= 0:
            self._carry = carry + data
            return
        if c:
            # Matches that start in the carried bytes: each lies within the next _CARRY bytes.
            self._check(carry + data[:_CARRY], min(c, limit))
        if limit > c:
            self._check(data, limit - c)
            self._carry = data[limit - c :]
        else:
            self._carry = carry[limit:] + data

    @staticmethod
    def _check(buf: bytes, limit: int) -> None:
        for m in _RAW.finditer(buf):
            if m.start() >= limit:
                break
            name = m["name"] or _decode_name(m[0])
            if _is_active(name):
                raise _active(name)


class _Syntax:
    """Object syntax read from the start, piece by piece: names outside strings and comments, the
    dictionary before each `stream` keyword, and (with streams) what each stream's data is."""

    NORMAL, STRING, COMMENT, HEX, EOL, CR, SKIP, PLAIN, INFLATE = range(9)

    def __init__(self, owner: PdfCheck, streams: bool):
        self._owner = owner
        self._streams = streams
        self._carry = b" "  # one byte of context before the next piece (for the keyword's look-behind)
        self._state = self.NORMAL
        self._depth = 0  # << >> nesting
        self._string_depth = 0
        self._escape = False
        self._after_dict = False  # only whitespace and comments since a top-level dictionary ended
        self._keys: dict[bytes, int] = {}  # names of interest in the current top-level dictionary
        self._inner: _Syntax | None = None  # an object stream's contents
        self._inner_raw: _Raw | None = None
        self._inflate: zlib._Decompress | None = None

    def feed(self, data: bytes, final: bool = False) -> None:
        if self._state == self.SKIP and len(data) > _SKIP_FAST and not self._ends_stream(data):
            # Inside a stream's data (an image, a font...) with no "endstream" in this piece: nothing
            # to read, and no copy of the piece. What the steps below would keep: the last bytes, where
            # a keyword cut by the piece's end may begin.
            if final:
                self._carry = data[-1:]
                self._finish()
            else:
                self._carry = data[-9:]
            return
        buf = self._carry + data
        pos, end = 1, len(buf)
        while pos < end:
            step = self._step(buf, pos, final)
            if step is None:
                break
            pos = step
        if final:
            self._finish()
        self._carry = buf[pos - 1 :]

    def _ends_stream(self, data: bytes) -> bool:
        """Whether "endstream" begins in this piece or in the bytes carried before it (the first of
        which is context only)."""
        return _contains(data, b"endstream") or b"endstream" in (self._carry + data[:16])[1:]

    def _finish(self) -> None:
        if self._state == self.INFLATE and self._inflate is not None:
            self._inflated(self._inflate.flush())
        if self._inner is not None:
            self._end_stream()

    # Each state's step reads from pos and returns where it stopped, or None to wait for more bytes.

    def _step(self, buf: bytes, pos: int, final: bool) -> int | None:
        state = self._state
        if state == self.NORMAL:
            return self._normal(buf, pos, final)
        if state == self.STRING:
            return self._string(buf, pos)
        if state == self.COMMENT or state == self.EOL:
            m = _EOL.search(buf, pos)
            if m is None:
                return len(buf)
            if state == self.EOL:
                self._state = self.CR if m[0] == b"\r" else self._data_state()
            else:
                self._state = self.NORMAL
            return m.end()
        if state == self.CR:  # "stream" CR LF: the data starts after the LF
            self._state = self._data_state()
            return pos + 1 if buf[pos : pos + 1] == b"\n" else pos
        if state == self.HEX:
            i = buf.find(b">", pos)
            if i < 0:
                return len(buf)
            self._state = self.NORMAL
            return i + 1
        if state == self.INFLATE:
            return self._inflating(buf, pos)
        # SKIP or PLAIN: stream data up to "endstream"
        i = buf.find(b"endstream", pos)
        stop = i if i >= 0 else (len(buf) if final else max(pos, len(buf) - 8))
        if state == self.PLAIN and self._inner is not None:
            self._inner.feed(buf[pos:stop])
        if i < 0:
            return None if stop == pos else stop
        self._end_stream()
        self._state = self.NORMAL
        return i + 9

    def _normal(self, buf: bytes, pos: int, final: bool) -> int | None:
        limit = len(buf) if final else len(buf) - _CARRY
        if pos >= limit:
            return None
        m = _TOKEN.search(buf, pos)
        skipped_to = limit if m is None or m.start() >= limit else m.start()
        # A stream's dictionary is the one just before the keyword: only whitespace and comments between.
        if self._after_dict and _NOT_WS.search(buf, pos, skipped_to):
            self._after_dict = False
        if m is None or m.start() >= limit:
            return limit
        kind = m.lastgroup
        if kind not in ("com", "stream"):
            self._after_dict = False
        if kind == "str":
            self._state, self._string_depth, self._escape = self.STRING, 1, False
        elif kind == "com":
            self._state = self.COMMENT
        elif kind == "open":
            if self._depth == 0:
                self._keys = {}
            self._depth += 1
        elif kind == "close":
            if self._depth > 0:
                self._depth -= 1
                self._after_dict = self._depth == 0
        elif kind == "hex":
            self._state = self.HEX
        elif kind == "stream":
            if buf[m.start() - 1] not in _KEYWORD_AFTER:  # "endstream", "/stream"
                return m.end()
            if self._streams and self._after_dict:
                self._state = self.EOL
            self._after_dict = False
        else:
            name = m["name"] or _decode_name(m["esc"])
            if _is_active(name):
                raise _active(name)
            if self._depth > 0 and name in _DICT_NAMES:
                self._keys[name] = self._keys.get(name, 0) + 1
        return m.end()

    def _string(self, buf: bytes, pos: int) -> int:
        if self._escape:
            self._escape = False
            return pos + 1
        while True:
            m = _IN_STRING.search(buf, pos)
            if m is None:
                return len(buf)
            c, pos = m[0], m.end()
            if c == b"\\":
                if pos >= len(buf):
                    self._escape = True
                    return pos
                pos += 1
            elif c == b"(":
                self._string_depth += 1
            else:
                self._string_depth -= 1
                if self._string_depth == 0:
                    self._state = self.NORMAL
                    return pos

    def _data_state(self) -> int:
        """What to do with the data of the stream whose dictionary was just read."""
        keys = self._keys
        self._keys = {}
        if b"First" not in keys and b"ObjStm" not in keys:
            return self.SKIP  # page content, an image, a font...: no objects in there
        flate = keys.get(b"FlateDecode", 0) + keys.get(b"Fl", 0)
        other = sorted(k.decode() for k in keys if k in _OTHER_FILTERS)
        if other or flate > 1 or b"Predictor" in keys:
            what = "/" + other[0] if other else "a predictor" if b"Predictor" in keys else "two /FlateDecode filters"
            raise _Problem(UNCHECKABLE, f"an object stream encoded with {what}")
        self._inner = _Syntax(self._owner, streams=False)
        if flate:
            self._inner_raw = _Raw()
            self._inflate = zlib.decompressobj()
            return self.INFLATE
        return self.PLAIN

    def _inflating(self, buf: bytes, pos: int) -> int:
        d = self._inflate
        assert d is not None
        try:
            out = d.decompress(buf[pos:], _INFLATE_PIECE)
            while True:
                self._inflated(out)
                if d.eof or not d.unconsumed_tail:
                    break
                out = d.decompress(d.unconsumed_tail, _INFLATE_PIECE)
        except zlib.error:
            raise _Problem(UNCHECKABLE, "an encrypted or damaged object stream") from None
        if not d.eof:
            return len(buf)
        self._end_stream()
        self._state = self.SKIP  # anything after the compressed data, up to "endstream"
        return len(buf) - len(d.unused_data)

    def _inflated(self, out: bytes) -> None:
        if not out:
            return
        self._owner.inflated += len(out)
        if self._owner.inflated > _INFLATE_BUDGET:
            raise _Problem(UNCHECKABLE, f"object streams of more than {_INFLATE_BUDGET // 2**20} MiB")
        assert self._inner is not None and self._inner_raw is not None
        self._inner.feed(out)
        self._inner_raw.feed(out)

    def _end_stream(self) -> None:
        if self._inner is not None:
            self._inner.feed(b"", final=True)
        if self._inner_raw is not None:
            self._inner_raw.feed(b"", final=True)
        self._inner = self._inner_raw = self._inflate = None


class PdfCheck:
    """Active content in a PDF fed in pieces (see above). `finish` returns (reason, what) or None."""

    def __init__(self) -> None:
        self.problem: tuple[str, str] | None = None
        self.inflated = 0
        self._raw = _Raw()
        self._syntax = _Syntax(self, streams=True)
        self._done = False

    def feed(self, data: bytes) -> None:
        self._run(data, False)

    def finish(self) -> tuple[str, str] | None:
        self._run(b"", True)
        return self.problem

    def _run(self, data: bytes, final: bool) -> None:
        if self._done:
            return
        self._done = final
        try:
            self._raw.feed(data, final)
            self._syntax.feed(data, final)
        except _Problem as p:
            self.problem = (p.reason, p.what)
            self._done = True  # the verdict is in: no need to read further


class Blobs(Protocol):
    """What the attachments domain needs of a store. A chunk is written at the end of what is there
    (or over it: what lies beyond is cut), parts are checked by `scan`, then `commit` gives them
    their content address; `read` serves ranges of committed blobs."""

    def write_chunk(self, upload_id: str, offset: int, data: bytes) -> None: ...
    def part_size(self, upload_id: str) -> int: ...
    def scan(self, upload_id: str) -> Scan: ...
    def commit(self, upload_id: str, sha256: str) -> None: ...
    def read(self, sha256: str, offset: int, size: int) -> bytes: ...
    def remove_part(self, upload_id: str) -> None: ...
    def remove_blob(self, sha256: str) -> None: ...
    def close(self) -> None: ...


def blob_store_for(database: str | URL | Engine, files_dir: str | os.PathLike) -> Blobs:
    """The store for a database: chunk rows in PostgreSQL itself (a cluster's nodes share no disk),
    files under files_dir otherwise (SQLite: one process). An engine's URL is used for a pool of the
    store's own, so that file bytes never hold up the writer's connection."""
    url = database.url if isinstance(database, Engine) else make_url(database)
    if url.get_backend_name() == "postgresql":
        return DbBlobStore(url)
    return BlobStore(files_dir)


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
        """Write at offset and cut what lies beyond (left by a write whose commit never happened).
        Straight from the caller's bytes: no buffer, no copy, four system calls."""
        path = self.part_path(upload_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
        try:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            os.ftruncate(fd, offset + len(view))
        finally:
            os.close(fd)

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

    def close(self) -> None:
        pass


# --- bytes in PostgreSQL -------------------------------------------------------------------
#
# One row per chunk as it arrived: blob_chunk(key, offset, data), key "part:<upload id>" while
# uploading, "sha:<sha256>" once committed. Committing renames the part's rows in place (an UPDATE of
# the key: PostgreSQL keeps the TOASTed bytes where they are), or drops them when the blob is there
# already. Rows of one key never overlap: a chunk write cuts what lies beyond its offset first.
#
# Across nodes, commit and remove_blob of one SHA-256 take the same transaction-scoped advisory lock,
# and both consult the attachment table inside that transaction: commit marks the upload's row with
# the SHA-256 it is about to name (`attachment.sha256`, which the completing write then keeps), and
# remove_blob deletes the bytes only if no row names them. So a node sweeping the last attachment of a
# file never removes the bytes another node's upload of the same file has just been deduplicated onto.
#
# The statements run on psycopg itself (through the store's SQLAlchemy pool): bytes travel in binary
# both ways, about twice as fast to write and eight times as fast to read as bytea's hex text.

_LOCK_SPACE = 0x51430B  # the first key of pg_advisory_xact_lock(int, int): "QC" blobs

_WRITE_CUT = 'DELETE FROM blob_chunk WHERE key = %(k)s AND "offset" >= %(off)s'
# Only the row just below the offset can reach past it (rows never overlap).
_WRITE_TRIM = (
    'UPDATE blob_chunk SET data = substring(data FROM 1 FOR CAST(%(off)s - "offset" AS integer)) '
    'WHERE key = %(k)s AND "offset" = (SELECT max("offset") FROM blob_chunk WHERE key = %(k)s AND "offset" < %(off)s) '
    'AND "offset" + octet_length(data) > %(off)s'
)
_WRITE_PUT = (
    'INSERT INTO blob_chunk (key, "offset", data) VALUES (%(k)s, %(off)s, %(data)b) '
    'ON CONFLICT (key, "offset") DO UPDATE SET data = excluded.data'
)
# The contiguous length from 0: where the first row starts other than where the ones before it end.
# octet_length of a TOASTed value reads its header only.
_PART_SIZE = (
    'SELECT coalesce(min(start) FILTER (WHERE start <> "offset"), max(start + len), 0) FROM ('
    'SELECT "offset", octet_length(data) AS len, coalesce(sum(octet_length(data)) OVER (ORDER BY "offset" '
    "ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS start FROM blob_chunk WHERE key = %(k)s) AS r"
)
_SCAN = 'SELECT "offset", data FROM blob_chunk WHERE key = %(k)s ORDER BY "offset"'
# The rows overlapping [off, end), each cut to its part of the range (a row wholly inside is sent as it
# is: no copy), found by the primary key's index.
_READ = (
    'SELECT "offset", CASE WHEN "offset" >= %(off)s AND "offset" + octet_length(data) <= %(end)s THEN data '
    'ELSE substring(data FROM CAST(greatest(%(off)s - "offset", 0) + 1 AS integer) '
    'FOR CAST(%(end)s - greatest("offset", %(off)s) AS integer)) END FROM blob_chunk '
    'WHERE key = %(k)s AND "offset" < %(end)s AND "offset" >= coalesce('
    '(SELECT max("offset") FROM blob_chunk WHERE key = %(k)s AND "offset" <= %(off)s), 0) ORDER BY "offset"'
)
_EXISTS = "SELECT 1 FROM blob_chunk WHERE key = %(k)s LIMIT 1"
_REMOVE = "DELETE FROM blob_chunk WHERE key = %(k)s"
_LOCK = "SELECT pg_advisory_xact_lock(%(space)s, %(lock)s)"
_RENAME = "UPDATE blob_chunk SET key = %(new)s WHERE key = %(old)s"
_CLAIM = "UPDATE attachment SET sha256 = %(sha)s WHERE id = %(id)s AND sha256 IS NULL"
_REMOVE_UNNAMED = (
    "DELETE FROM blob_chunk WHERE key = %(k)s AND NOT EXISTS (SELECT 1 FROM attachment WHERE sha256 = %(sha)s)"
)
_SCAN_ROWS = 4  # rows (chunks, at most 1 MiB by default) fetched at a time


def _part_key(upload_id: str) -> str:
    return "part:" + upload_id


def _blob_key(sha256: str) -> str:
    return "sha:" + sha256


def _lock_params(sha256: str) -> dict[str, int]:
    digest = hashlib.blake2b(sha256.encode(), digest_size=4).digest()
    return {"space": _LOCK_SPACE, "lock": int.from_bytes(digest, "big", signed=True)}


class DbBlobStore:
    """Chunk rows in PostgreSQL (see above), on a connection pool of its own."""

    def __init__(self, database: str | URL | Engine, *, pool_size: int = 8):
        url = database.url if isinstance(database, Engine) else make_url(database)
        # psycopg 3 whatever the URL named: the statements below are written for it.
        url = url.set(drivername="postgresql+psycopg")
        self.engine = create_engine(url, pool_pre_ping=True, pool_size=pool_size, max_overflow=pool_size)

    @contextlib.contextmanager
    def _transaction(self, *, name: str | None = None) -> Iterator[Any]:
        """A psycopg cursor (server-side if named) in a transaction, committed if the block succeeds."""
        pooled = self.engine.raw_connection()
        try:
            conn = pooled.driver_connection
            assert conn is not None
            with conn.transaction(), conn.cursor(name, binary=True) if name else conn.cursor(binary=True) as cur:
                yield cur
        finally:
            pooled.close()

    def write_chunk(self, upload_id: str, offset: int, data: bytes) -> None:
        """Write at offset and cut what lies beyond, in one transaction: a chunk sent again (a retry,
        or a resume on another node) replaces itself."""
        params = {"k": _part_key(upload_id), "off": offset}
        with self._transaction() as cur:
            cur.execute(_WRITE_CUT, params)
            if offset > 0:
                cur.execute(_WRITE_TRIM, params)
            cur.execute(_WRITE_PUT, {**params, "data": data})

    def part_size(self, upload_id: str) -> int:
        with self._transaction() as cur:
            cur.execute(_PART_SIZE, {"k": _part_key(upload_id)})
            return int(cur.fetchone()[0])

    def scan(self, upload_id: str) -> Scan:
        """Hash and check the part's rows in one streaming pass (a few rows in memory at a time).
        Stops at a gap: what follows one is not the file the client sent."""
        scanner = Scanner()
        with self._transaction(name="blob_scan") as cur:
            cur.itersize = _SCAN_ROWS
            cur.execute(_SCAN, {"k": _part_key(upload_id)})
            for offset, data in cur:
                if offset != scanner.size:
                    break
                scanner.update(data)
        return scanner.result()

    def commit(self, upload_id: str, sha256: str) -> None:
        """Give a checked upload's rows their content address (a blob already there is the same bytes:
        then the part's rows go), and mark the upload's row as naming it; all in one transaction."""
        with self._transaction() as cur:
            cur.execute(_LOCK, _lock_params(sha256))
            cur.execute(_EXISTS, {"k": _blob_key(sha256)})
            if cur.fetchone() is not None:
                cur.execute(_REMOVE, {"k": _part_key(upload_id)})
            else:
                cur.execute(_RENAME, {"new": _blob_key(sha256), "old": _part_key(upload_id)})
            cur.execute(_CLAIM, {"sha": sha256, "id": upload_id})

    def read(self, sha256: str, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        key = _blob_key(sha256)
        with self._transaction() as cur:
            cur.execute(_READ, {"k": key, "off": offset, "end": offset + size})
            rows = cur.fetchall()
            if not rows:
                cur.execute(_EXISTS, {"k": key})
                if cur.fetchone() is None:
                    raise FileNotFoundError(f"no blob {sha256}")
        if len(rows) == 1 and rows[0][0] <= offset:
            return bytes(rows[0][1])  # the usual case: a read within one chunk
        out = bytearray()
        for row_offset, piece in rows:
            if max(row_offset, offset) != offset + len(out):
                break  # a gap (never written so): the blob ends here
            out += piece
        return bytes(out)

    def remove_part(self, upload_id: str) -> None:
        with self._transaction() as cur:
            cur.execute(_REMOVE, {"k": _part_key(upload_id)})

    def remove_blob(self, sha256: str) -> None:
        """Remove the blob unless an attachment row names it (decided under the blob's lock, across
        nodes: see above)."""
        with self._transaction() as cur:
            cur.execute(_LOCK, _lock_params(sha256))
            cur.execute(_REMOVE_UNNAMED, {"k": _blob_key(sha256), "sha": sha256})

    def import_files(self, root: str | os.PathLike) -> int:
        """Copy what a file store (`BlobStore(root)`) holds into the database: finished files and the
        parts of uploads in progress, chunk by chunk. What the database has already is left as it is,
        so running it again (or on several nodes) is harmless. Returns how many files it copied.
        For a database that served attachments from files before it became a cluster's."""
        files = BlobStore(root)
        # (key, lock, file): a blob under the lock its commits and removals take.
        found = [(_blob_key(p.name), p.name, p) for p in sorted(files._blobs.glob("*/*")) if p.is_file()]
        found += [(_part_key(p.name), _part_key(p.name), p) for p in sorted(files._parts.glob("*")) if p.is_file()]
        copied = 0
        for key, lock, path in found:
            with self._transaction() as cur:
                cur.execute(_LOCK, _lock_params(lock))
                cur.execute(_EXISTS, {"k": key})
                if cur.fetchone() is not None:
                    continue
                with open(path, "rb") as f:
                    offset = 0
                    while block := f.read(READ_BLOCK):
                        cur.execute(_WRITE_PUT, {"k": key, "off": offset, "data": block})
                        offset += len(block)
                copied += 1
        return copied

    def close(self) -> None:
        self.engine.dispose()
