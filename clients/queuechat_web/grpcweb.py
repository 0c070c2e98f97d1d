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

_FRAME_HEADER = struct.Struct(">BI")
_TIMEOUT = re.compile(r"(\d{1,8})([HMSmun])")
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
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


def parse_frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, pos = [], 0
    while pos < len(body):
        if len(body) - pos < _FRAME_HEADER.size:
            raise ValueError("truncated frame header")
        flag, length = _FRAME_HEADER.unpack_from(body, pos)
        pos += _FRAME_HEADER.size
        if len(body) - pos < length:
            raise ValueError("truncated frame")
        frames.append((flag, body[pos : pos + length]))
        pos += length
    return frames


def decode_text(body: bytes) -> bytes:
    """A grpc-web-text body: base64, possibly several padded segments back to back (one per write)."""
    compact = b"".join(body.split())
    return b"".join(base64.b64decode(seg, validate=True) for seg in _B64_SEGMENT.findall(compact))


def encode(mode: str, data: bytes) -> bytes:
    """Bytes as written on the wire: text mode base64-encodes each write on its own."""
    return base64.b64encode(data) if mode == TEXT else data


def parse_timeout(value: str) -> float:
    """grpc-timeout ("250m", "5S", ...) in seconds."""
    m = _TIMEOUT.fullmatch(value.strip())
    if m is None:
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(m[1]) * _TIMEOUT_UNITS[m[2]]


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
