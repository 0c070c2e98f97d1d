"""The grpc-web wire format: length-prefixed frames, the trailer frame, grpc-timeout, base64 text mode.

See https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-WEB.md.
"""

from __future__ import annotations

import base64
import re
import struct
from collections.abc import Iterable
from urllib.parse import quote

DATA = 0x00
COMPRESSED = 0x01
TRAILER = 0x80

PROTO = "application/grpc-web+proto"
TEXT = "application/grpc-web-text"

# grpc-timeout: 1 to 8 ASCII digits and a unit (PROTOCOL-HTTP2.md). Nanoseconds per unit, to keep the sums exact.
_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3_600_000_000_000, "M": 60_000_000_000, "S": 1_000_000_000, "m": 1_000_000, "u": 1_000, "n": 1}
# The longest deadline the bridge passes on: 30 days. The header can say up to 99999999H (about 11,400 years),
# and gRPC Python turns a timeout of 2**33 s (2**32 s still works) into an immediate DEADLINE_EXCEEDED. No call
# to the chat services lives for 30 days, so for a client a clamped deadline is as good as the one it asked for.
MAX_TIMEOUT = 30 * 24 * 3600.0

_FRAME_HEADER = struct.Struct(">BI")
# grpc-message is percent-encoded: everything but printable ASCII, and '%' itself.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if c != 0x25)
_B64_SEGMENT = re.compile(rb"[^=]+=*")


def mode_of(content_type: str) -> str | None:
    """PROTO or TEXT for a grpc-web request's content type; None for anything else (e.g. +json)."""
    base = content_type.split(";", 1)[0].strip().lower()
    if base in ("application/grpc-web", "application/grpc-web+proto"):
        return PROTO
    if base in ("application/grpc-web-text", "application/grpc-web-text+proto"):
        return TEXT
    return None


def frame(flag: int, payload: bytes) -> bytes:
    return _FRAME_HEADER.pack(flag, len(payload)) + payload


def parse_request(body: bytes) -> tuple[int, bytes]:
    """A request body's one frame: (flag, payload). ValueError unless the body is exactly one whole frame.
    The caller checks the flag. Whatever the length field claims, nothing past the body is read."""
    if len(body) < _FRAME_HEADER.size:
        raise ValueError("truncated frame header" if body else "no message frame")
    flag, length = _FRAME_HEADER.unpack_from(body)
    end = _FRAME_HEADER.size + length
    if len(body) < end:
        raise ValueError(f"truncated frame: its header says {length} bytes, {len(body) - _FRAME_HEADER.size} came")
    if len(body) > end:
        raise ValueError("more than one frame; a request is one message frame")
    return flag, body[_FRAME_HEADER.size :]


def decode_text(body: bytes) -> bytes:
    """A grpc-web-text body: base64, possibly several padded segments back to back (one per write)."""
    compact = b"".join(body.split())
    return b"".join(base64.b64decode(seg, validate=True) for seg in _B64_SEGMENT.findall(compact))


def encode(mode: str, data: bytes) -> bytes:
    """Bytes as written on the wire: text mode base64-encodes each write on its own."""
    return base64.b64encode(data) if mode == TEXT else data


def parse_timeout(value: str) -> float:
    """grpc-timeout ("250m", "5S", ...) in seconds, at most MAX_TIMEOUT. ValueError unless it is 1-8 ASCII
    digits and one of the units H, M, S, m, u, n, as the gRPC spec says (no sign, space or fraction)."""
    m = _TIMEOUT.fullmatch(value)
    if m is None:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return min(int(m[1]) * _TIMEOUT_UNITS[m[2]] / 1e9, MAX_TIMEOUT)


def trailer(code: int, message: str, metadata: Iterable[tuple[str, str | bytes]] = ()) -> bytes:
    """The trailer frame: grpc-status, grpc-message and the call's trailing metadata as header lines."""
    lines = [f"grpc-status: {code}"]
    if message:
        lines.append(f"grpc-message: {quote(message, safe=_MESSAGE_SAFE)}")
    for key, value in metadata:
        if key in ("grpc-status", "grpc-message"):
            continue
        if isinstance(value, bytes):
            # Binary (-bin) values: base64, unpadded as the gRPC spec recommends.
            value = base64.b64encode(value).rstrip(b"=").decode()
        lines.append(f"{key}: {value}")
    return frame(TRAILER, "".join(line + "\r\n" for line in lines).encode())
