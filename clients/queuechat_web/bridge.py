"""The grpc-web bridge: browsers call CustomerService and AgentService over HTTP/1.1 or HTTP/2;
the bridge forwards each call to the gRPC server and serves the customer page.

Message bytes pass through untouched (generic calls without (de)serialisers); the call shape comes
from the chat.v1 service descriptors. AdminService is not bridged: it stays on the internal network.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from chat.v1 import agent_service_pb2, customer_service_pb2

from . import grpcweb

log = logging.getLogger(__name__)

# One upload chunk (1 MiB) plus its ids, offset and framing, with room to spare.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024 + 16 * 1024
# Request bodies being read, all together: 256 MiB, some 250 upload chunks in flight at once. Slow or hostile
# clients holding bodies half-sent cannot make the process (which is also the gRPC server) run out of memory.
DEFAULT_MAX_BUFFERED_BYTES = 256 * 1024 * 1024
# Open streams through the bridge, all together: twice the 5,000 chats docs/performance.md measures.
DEFAULT_MAX_STREAMS = 10_000

HERE = Path(__file__).parent
PAGE_DIR = HERE / "page"
BUILD_DIR = HERE / "build"

BRIDGED_SERVICES = (
    customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"],
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
)

# Request headers that describe the HTTP exchange or the browser, not the call: never sent on as metadata.
_NOT_METADATA = {
    "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
    "content-length", "content-type", "content-encoding", "accept", "accept-encoding", "accept-language",
    "origin", "referer", "user-agent", "cookie", "cache-control", "pragma", "priority", "dnt", "x-grpc-web",
    # Who the client is: the bridge says that itself (x-forwarded-for); a browser must not.
    "forwarded", "x-real-ip",
}  # fmt: skip
_NOT_METADATA_PREFIXES = ("grpc-", "sec-", "access-control-", "proxy-", "x-forwarded-")
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]*")

_ALLOW_HEADERS = "authorization, content-type, grpc-timeout, x-grpc-web, x-user-agent"
_EXPOSE_HEADERS = "grpc-status, grpc-message, grpc-status-details-bin"
_PAGE_HEADERS = {
    # The page runs only its own bundle; downloads are blob: URLs.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

_CHANNEL_OPTIONS = [
    # Notice a dead gRPC server even while every stream is idle.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Attachment chunks are 1 MiB; leave room.
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def split_host_port(listen: str) -> tuple[str, int]:
    """(host, port) from "0.0.0.0:8080", "[::]:8080" or ":8080"; an empty host means every interface."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host.strip("[]"), int(port)


MetadataPairs = Iterable[tuple[str, str | bytes]]
# How a call ended: status code, message, trailing metadata.
CallEnd = tuple[grpc.StatusCode, str, MetadataPairs]
# Generic calls: request and response are the message bytes, passed through as they are.
UnaryMethod = grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
StreamMethod = grpc.aio.UnaryStreamMultiCallable[bytes, bytes]


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(specs: Iterable[str]) -> list[IPNetwork]:
    """Networks from addresses and CIDRs ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32"); ValueError for others."""
    return [ipaddress.ip_network(spec.strip(), strict=False) for spec in specs]


def _address(text: str | None) -> IPAddress | None:
    """An IP address from a peer or an X-Forwarded-For entry ("192.0.2.1", "192.0.2.1:4711", "[2001:db8::1]:4711");
    IPv4-mapped IPv6 addresses as IPv4. None for anything else."""
    if not text:
        return None
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]  # IPv4 with a port
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_address(peer: str | None, forwarded_for: Iterable[str], trusted: Sequence[IPNetwork]) -> str | None:
    """The browser's address. The peer, unless the peer is one of the trusted proxies: then the right-most
    X-Forwarded-For entry that is not a trusted proxy (each proxy appends the address it got the request
    from; whatever lies left of that the client wrote). With every entry trusted, the left-most. None when
    the peer is no IP address (a Unix socket)."""
    addr = _address(peer)
    if addr is None:
        return None

    def is_trusted(a: IPAddress) -> bool:
        return any(a in net for net in trusted)

    if not is_trusted(addr):
        return str(addr)
    chain = [entry for value in forwarded_for for entry in value.split(",")]
    for entry in reversed(chain):
        hop = _address(entry)
        if hop is None:
            # A proxy writes addresses: trust nothing from here on, keep the last hop that was one.
            log.debug("unusable X-Forwarded-For entry %r: the client is %s", entry, addr)
            break
        addr = hop
        if not is_trusted(addr):
            break
    return str(addr)


def call_metadata(headers: Mapping[str, str]) -> tuple[tuple[str, str | bytes], ...]:
    """The request headers that are call metadata, lower-case; -bin values decoded."""
    md: list[tuple[str, str | bytes]] = []
    for key, value in headers.items():
        key = key.lower()
        if key in _NOT_METADATA or key.startswith(_NOT_METADATA_PREFIXES) or not _METADATA_KEY.fullmatch(key):
            continue
        if key.endswith("-bin"):
            try:
                md.append((key, base64.b64decode(value + "=" * (-len(value) % 4), validate=True)))
            except ValueError:
                continue
        elif _PRINTABLE.fullmatch(value):
            md.append((key, value))
    return tuple(md)


class _Refused(Exception):
    """Refuse the call with this status; the backend is not called."""

    def __init__(self, code: grpc.StatusCode, message: str, metadata: MetadataPairs = ()):
        super().__init__(message)
        self.code, self.message, self.metadata = code, message, metadata


class Bridge:
    def __init__(
        self,
        grpc_target: str,
        allowed_origins: list[str],
        max_body_bytes: int,
        *,
        trusted_proxies: Iterable[str] = (),
        max_streams: int = DEFAULT_MAX_STREAMS,
        max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    ):
        self.allowed_origins = set(allowed_origins)
        self.max_body_bytes = max_body_bytes
        self.trusted_proxies = parse_networks(trusted_proxies)
        self.max_streams = max_streams
        self.max_buffered_bytes = max_buffered_bytes
        self.buffered_bytes = 0  # request bodies being read now, all together
        self.channel = grpc.aio.insecure_channel(grpc_target, options=_CHANNEL_OPTIONS)
        # Path -> generic callable. grpc-web has no client streaming; chat.v1 has none either.
        self.methods: dict[str, UnaryMethod | StreamMethod] = {}
        for service in BRIDGED_SERVICES:
            for m in service.methods:
                path = f"/{service.full_name}/{m.name}"
                if m.server_streaming:
                    self.methods[path] = self.channel.unary_stream(path)
                else:
                    self.methods[path] = self.channel.unary_unary(path)
        self.streams: set[grpc.aio.Call] = set()
        self.closing = False
        self.runner: web.AppRunner | None = None
        self.port = 0

    # --- HTTP ---------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self._file(PAGE_DIR / "index.html"))
        app.router.add_get("/app.css", self._file(PAGE_DIR / "app.css"))
        app.router.add_get("/app.js", self._file(BUILD_DIR / "app.js"))
        app.router.add_post("/{service}/{method}", self.call)
        app.router.add_route("OPTIONS", "/{service}/{method}", self.preflight)
        return app

    def _file(self, path: Path) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            if not await asyncio.to_thread(path.exists):
                raise web.HTTPNotFound(text=f"{path.name} is missing: run scripts/build-web")
            return web.FileResponse(path, headers=_PAGE_HEADERS)

        return handler

    def _cors(self, request: web.Request) -> dict[str, str] | None:
        """Headers for a cross-origin caller that is allowed, {} for same-origin, None for a refused origin."""
        origin = request.headers.get("Origin")
        if origin is None or urlsplit(origin).netloc == request.host:
            return {}
        if origin in self.allowed_origins or "*" in self.allowed_origins:
            return {
                "Access-Control-Allow-Origin": origin,
                "Vary": "Origin",
                "Access-Control-Expose-Headers": _EXPOSE_HEADERS,
            }
        return None

    async def preflight(self, request: web.Request) -> web.Response:
        cors = self._cors(request)
        if cors is None:
            return web.Response(status=403, text="origin not allowed")
        cors.pop("Access-Control-Expose-Headers", None)
        return web.Response(
            status=204,
            headers={
                **cors,
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": _ALLOW_HEADERS,
                "Access-Control-Max-Age": "7200",
            },
        )

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        """The body. Refused (reading stops there) over the limit, or when the bodies being read
        take more than max_buffered_bytes together."""
        too_large = _Refused(
            grpc.StatusCode.RESOURCE_EXHAUSTED, f"The request is larger than {self.max_body_bytes} bytes."
        )
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        try:
            async for chunk in request.content.iter_any():
                body += chunk
                self.buffered_bytes += len(chunk)
                if len(body) > limit:
                    raise too_large
                if self.buffered_bytes > self.max_buffered_bytes:
                    raise _Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, "The web bridge is busy; try again shortly.")
        finally:
            self.buffered_bytes -= len(body)
        return bytes(body)

    def _message(self, request: web.Request, mode: str, body: bytes) -> bytes:
        """The request message: the body must be one frame, flag 0x00. Compressed messages are not accepted:
        UNIMPLEMENTED when grpc-encoding names a compression (as the gRPC compression spec says), otherwise the
        flag is as malformed as a trailer frame or a reserved bit."""
        try:
            flag, message = grpcweb.parse_request(grpcweb.decode_text(body) if mode == grpcweb.TEXT else body)
        except ValueError as e:
            raise _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed grpc-web request: {e}.") from None
        if flag == grpcweb.DATA:
            return message
        if flag & grpcweb.TRAILER:
            problem = f"frame flag {flag:#04x} marks a trailer frame"
        elif flag & ~grpcweb.COMPRESSED:
            problem = f"frame flag {flag:#04x} has reserved bits set"
        else:
            encoding = request.headers.get("grpc-encoding", "identity").strip()
            if encoding.lower() != "identity":
                raise _Refused(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"Compressed request messages (grpc-encoding {encoding}) are not supported; send them"
                    " uncompressed.",
                    (("grpc-accept-encoding", "identity"),),
                )
            problem = f"frame flag {flag:#04x} marks a compressed message, but no grpc-encoding says how"
        raise _Refused(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Malformed grpc-web request: {problem}; a request is one message frame with flag 0x00.",
        )

    def _timeout(self, request: web.Request) -> float | None:
        """grpc-timeout, clamped to grpcweb.MAX_TIMEOUT. A malformed one is ignored, as Envoy and gRPC's C core do."""
        value = request.headers.get("grpc-timeout")
        if value is None:
            return None
        try:
            return grpcweb.parse_timeout(value)
        except ValueError:
            log.debug("ignored a malformed grpc-timeout %r on %s", value, request.path)
            return None

    def _metadata(self, request: web.Request) -> tuple[tuple[str, str | bytes], ...]:
        """The call metadata: the browser's headers, and its address as x-forwarded-for (for the server's
        rate limits), replacing any the browser sent."""
        md = call_metadata(request.headers)
        addr = client_address(request.remote, request.headers.getall("X-Forwarded-For", ()), self.trusted_proxies)
        return md if addr is None else (*md, ("x-forwarded-for", addr))

    # --- calls --------------------------------------------------------------------------------

    async def call(self, request: web.Request) -> web.StreamResponse:
        cors = self._cors(request)
        if cors is None:
            return web.Response(status=403, text="origin not allowed")
        mode = grpcweb.mode_of(request.headers.get("Content-Type", ""))
        if mode is None:
            return web.Response(
                status=415, text="use application/grpc-web+proto or application/grpc-web-text", headers=cors
            )
        headers = {**cors, "Content-Type": mode}
        try:
            method = self.methods.get(request.path)
            if method is None:
                raise _Refused(
                    grpc.StatusCode.UNIMPLEMENTED, f"{request.path} is not available through the web bridge."
                )
            # Text mode is base64: 4 bytes on the wire per 3 of message.
            limit = self.max_body_bytes if mode == grpcweb.PROTO else (self.max_body_bytes + 2) // 3 * 4
            message = self._message(request, mode, await self._read_body(request, limit))
            streaming = isinstance(method, grpc.aio.UnaryStreamMultiCallable)
            if streaming and len(self.streams) >= self.max_streams:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "The web bridge has too many open streams; try again shortly."
                )
        except _Refused as r:
            body = grpcweb.encode(mode, self._trailer(r.code, r.message, r.metadata))
            return web.Response(body=body, headers=headers)
        except ConnectionError:
            # The browser left while sending the request.
            log.debug("the browser left %s before its request was read", request.path)
            return web.Response(status=499)

        call = method(message, timeout=self._timeout(request), metadata=self._metadata(request))
        try:
            if isinstance(call, grpc.aio.UnaryStreamCall):
                self.streams.add(call)  # before any await: max_streams holds however many arrive at once
                return await self._stream(request, call, mode, headers)
            return await self._unary(call, mode, headers)
        finally:
            # A no-op for a finished call. When the browser goes away aiohttp cancels this handler,
            # and this ends the backend call at once instead of at its next message.
            call.cancel()

    async def _unary(
        self, call: grpc.aio.UnaryUnaryCall[bytes, bytes], mode: str, headers: dict[str, str]
    ) -> web.Response:
        end: CallEnd
        try:
            message = await call
            body = grpcweb.frame(grpcweb.DATA, message)
            end = (grpc.StatusCode.OK, "", await call.trailing_metadata())
        except grpc.aio.AioRpcError as e:
            body, end = b"", (e.code(), e.details() or "", e.trailing_metadata() or ())
        return web.Response(body=grpcweb.encode(mode, body + self._trailer(*end)), headers=headers)

    async def _stream(
        self, request: web.Request, call: grpc.aio.UnaryStreamCall[bytes, bytes], mode: str, headers: dict[str, str]
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=headers)
        end: CallEnd
        try:
            await response.prepare(request)
            try:
                async for message in call:
                    # Each message (the server's heartbeats included) goes out at once: idle proxies see traffic.
                    await response.write(grpcweb.encode(mode, grpcweb.frame(grpcweb.DATA, message)))
                end = (await call.code(), await call.details(), await call.trailing_metadata())
            except grpc.aio.AioRpcError as e:
                end = (e.code(), e.details() or "", e.trailing_metadata() or ())
            except asyncio.CancelledError:
                # stop() cancelled the backend call, not this handler: end properly so the browser reconnects.
                task = asyncio.current_task()
                if not self.closing or (task is not None and task.cancelling()):
                    raise
                end = (grpc.StatusCode.UNAVAILABLE, "The web bridge is shutting down; reconnect.", ())
            await response.write(grpcweb.encode(mode, self._trailer(*end)))
            await response.write_eof()
        except ConnectionError:
            # The browser went away (a closed tab, a dropped network) and a write found the connection closing
            # before aiohttp cancelled this handler. That is how streams end, not an error: call() cancels the
            # backend call, and aiohttp ignores the response.
            log.debug("the browser left %s mid-stream", request.path)
        finally:
            self.streams.discard(call)
        return response

    @staticmethod
    def _trailer(code: grpc.StatusCode, message: str, metadata: MetadataPairs) -> bytes:
        return grpcweb.trailer(code.value[0], message, metadata)

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int, reuse_port: bool = False) -> None:
        """reuse_port: several processes serve this port (a cluster's nodes on one machine, serve --workers)."""
        if not await asyncio.to_thread((BUILD_DIR / "app.js").exists):
            log.warning("the customer page is not built: run scripts/build-web")
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host or None, port, reuse_port=reuse_port or None).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        """End open streams with UNAVAILABLE (clients reconnect), let unary calls finish, close the channel."""
        self.closing = True
        for call in list(self.streams):
            call.cancel()
        if self.runner is not None:
            await self.runner.cleanup()
        await self.channel.close()


async def start_bridge(
    grpc_target: str,
    host: str,
    port: int,
    allowed_origins: list[str] | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    *,
    trusted_proxies: list[str] | None = None,
    max_streams: int = DEFAULT_MAX_STREAMS,
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES,
    reuse_port: bool = False,
) -> Bridge:
    """Serve the customer page and grpc-web on host:port (port 0: any free port, see .port),
    forwarding to the gRPC server at grpc_target. allowed_origins: other sites' pages that may call it.
    trusted_proxies: addresses and CIDRs of reverse proxies in front of the bridge whose X-Forwarded-For
    says who the client is (ValueError for one that is neither). max_streams: open streams, all together;
    max_buffered_bytes: request bodies being read, all together (over either: RESOURCE_EXHAUSTED)."""
    bridge = Bridge(
        grpc_target,
        allowed_origins or [],
        max_body_bytes,
        trusted_proxies=trusted_proxies or [],
        max_streams=max_streams,
        max_buffered_bytes=max_buffered_bytes,
    )
    await bridge.start(host, port, reuse_port)
    return bridge
