"""A small grpc-web client for the bridge tests, written from the protocol, not from the bridge's code.

Binary (application/grpc-web+proto) or text (application/grpc-web-text) mode over aiohttp; messages are
read as they arrive, then the trailer frame.
"""

from __future__ import annotations

import asyncio
import base64
import re
import struct
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import aiohttp
import grpc
from google.rpc import error_details_pb2, status_pb2
from multidict import CIMultiDict

WAIT = 10.0
_B64_RUN = re.compile(rb"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def b64decode_runs(text: bytes) -> bytes:
    """Decode base64 made of padded runs written back to back, as a grpc-web-text stream is."""
    return b"".join(base64.b64decode(run) for run in _B64_RUN.findall(text) if run)


def envelope(message: Any, flag: int = 0) -> bytes:
    data = message if isinstance(message, bytes) else message.SerializeToString()
    return struct.pack(">BI", flag, len(data)) + data


@dataclass
class Call:
    """One grpc-web call: its HTTP response, the messages read so far, then the trailers."""

    response: aiohttp.ClientResponse
    text: bool
    messages: list[bytes] = field(default_factory=list)
    trailers: dict[str, str] | None = None
    _raw: bytes = b""
    _buf: bytes = b""

    async def _fill(self) -> bool:
        chunk = await self.response.content.readany()
        if not chunk:
            return False
        if self.text:
            # Decode whole 4-character groups; keep the rest for the next read.
            self._raw += chunk
            cut = len(self._raw) // 4 * 4
            self._buf += b64decode_runs(self._raw[:cut])
            self._raw = self._raw[cut:]
        else:
            self._buf += chunk
        return True

    async def _frame(self) -> tuple[int, bytes] | None:
        while True:
            if len(self._buf) >= 5:
                flag, length = struct.unpack(">BI", self._buf[:5])
                if len(self._buf) >= 5 + length:
                    data, self._buf = self._buf[5 : 5 + length], self._buf[5 + length :]
                    return flag, data
            if not await self._fill():
                assert not self._buf and not self._raw, "the body ended inside a frame"
                return None

    async def next(self, timeout: float = WAIT) -> bytes | None:
        """The next message, or None once the trailers have come."""
        if self.trailers is not None:
            return None
        got = await asyncio.wait_for(self._frame(), timeout)
        assert got is not None, "the body ended without a trailer frame"
        flag, data = got
        if flag & 0x80:
            self.trailers = {}
            for line in data.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    self.trailers[key.strip().lower()] = value.strip()
            assert await self._frame() is None, "data after the trailer frame"
            return None
        assert flag == 0, f"unexpected frame flag {flag:#x}"
        self.messages.append(data)
        return data

    async def finish(self, timeout: float = WAIT) -> Call:
        while await self.next(timeout) is not None:
            pass
        return self

    def parse(self, message_type: type) -> list[Any]:
        return [message_type.FromString(m) for m in self.messages]

    @property
    def code(self) -> grpc.StatusCode:
        assert self.trailers is not None, "no trailers yet"
        value = int(self.trailers["grpc-status"])
        return next(c for c in grpc.StatusCode if c.value[0] == value)

    @property
    def message(self) -> str:
        return unquote(self.trailers.get("grpc-message", ""))

    @property
    def reason(self) -> str:
        """The google.rpc.ErrorInfo reason in grpc-status-details-bin."""
        raw = self.trailers["grpc-status-details-bin"]
        status = status_pb2.Status.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4)))
        assert status.code == int(self.trailers["grpc-status"]) and status.message == self.message
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                return info.reason
        raise AssertionError("no ErrorInfo in grpc-status-details-bin")

    def close(self) -> None:
        """Drop the connection, as a closed browser tab does."""
        self.response.close()


class GrpcWebClient:
    def __init__(self, http: aiohttp.ClientSession, base_url: str, *, text: bool = False):
        self.http, self.base_url, self.text = http, base_url.rstrip("/"), text

    @property
    def content_type(self) -> str:
        return "application/grpc-web-text" if self.text else "application/grpc-web+proto"

    async def open(
        self,
        path: str,
        request: Any = b"",
        *,
        token: str = "",
        headers: dict[str, str] | CIMultiDict[str] | None = None,
        body: bytes | None = None,
    ) -> Call:
        """Start a call; read it with Call.next/finish. body replaces the enveloped request. headers replace
        the defaults; a CIMultiDict sends a header more than once."""
        hdrs = CIMultiDict({"content-type": self.content_type, "x-grpc-web": "1"})
        extra = CIMultiDict(headers or {})
        for key in extra:
            hdrs.popall(key, None)
        hdrs.extend(extra)
        if token:
            hdrs["authorization"] = f"Bearer {token}"
        if body is None:
            body = envelope(request)
            if self.text:
                body = base64.b64encode(body)
        response = await self.http.post(self.base_url + path, data=body, headers=hdrs)
        assert response.status == 200, f"HTTP {response.status}: {await response.text()}"
        expected = self.content_type
        assert response.headers["content-type"].startswith(expected), response.headers["content-type"]
        return Call(response, self.text)

    async def call(self, path: str, request: Any = b"", **kw: Any) -> Call:
        """A whole call: messages and trailers."""
        return await (await self.open(path, request, **kw)).finish()

    async def unary(self, path: str, request: Any, response_type: type, **kw: Any) -> Any:
        """A unary call that must succeed: its response."""
        call = await self.call(path, request, **kw)
        assert call.code == grpc.StatusCode.OK, f"{call.code}: {call.message}"
        (response,) = call.parse(response_type)
        return response
