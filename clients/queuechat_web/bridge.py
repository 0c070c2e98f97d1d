"""The grpc-web bridge: browsers call CustomerService and AgentService over HTTP/1.1 or HTTP/2;
the bridge forwards each call to the gRPC server and serves the customer page.

Message bytes pass through untouched (generic calls without (de)serialisers); the call shape comes
from the chat.v1 service descriptors. AdminService is not bridged: it stays on the internal network.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from aiohttp import web

from chat.v1 import agent_service_pb2, customer_service_pb2

from . import grpcweb

log = logging.getLogger(__name__)

# One upload chunk (1 MiB) plus its ids, offset and framing, with room to spare.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024 + 16 * 1024

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
}  # fmt: skip
_NOT_METADATA_PREFIXES = ("grpc-", "sec-", "access-control-", "proxy-")
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


class Bridge:
    def __init__(self, grpc_target: str, allowed_origins: list[str], max_body_bytes: int):
        self.allowed_origins = set(allowed_origins)
        self.max_body_bytes = max_body_bytes
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

    async def _read_body(self, request: web.Request, limit: int) -> bytes | None:
        """The body, or None when it is over the limit (stop reading there)."""
        if request.content_length is not None and request.content_length > limit:
            return None
        body = bytearray()
        async for chunk in request.content.iter_any():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

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

        def refuse(code: grpc.StatusCode, message: str) -> web.Response:
            return web.Response(body=grpcweb.encode(mode, self._trailer(code, message, ())), headers=headers)

        method = self.methods.get(request.path)
        if method is None:
            return refuse(grpc.StatusCode.UNIMPLEMENTED, f"{request.path} is not available through the web bridge.")
        # Text mode is base64: 4 bytes on the wire per 3 of message.
        limit = self.max_body_bytes if mode == grpcweb.PROTO else (self.max_body_bytes + 2) // 3 * 4
        body = await self._read_body(request, limit)
        if body is None:
            return refuse(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"The request is larger than {self.max_body_bytes} bytes."
            )
        try:
            frames = grpcweb.parse_frames(grpcweb.decode_text(body) if mode == grpcweb.TEXT else body)
        except ValueError as e:
            return refuse(grpc.StatusCode.INVALID_ARGUMENT, f"Malformed grpc-web request: {e}.")
        if len(frames) != 1 or frames[0][0] & grpcweb.COMPRESSED:
            return refuse(grpc.StatusCode.INVALID_ARGUMENT, "A grpc-web request is one uncompressed message.")
        timeout = None
        if "grpc-timeout" in request.headers:
            try:
                timeout = grpcweb.parse_timeout(request.headers["grpc-timeout"])
            except ValueError as e:
                return refuse(grpc.StatusCode.INVALID_ARGUMENT, str(e))

        call = method(frames[0][1], timeout=timeout, metadata=call_metadata(request.headers))
        try:
            if isinstance(call, grpc.aio.UnaryStreamCall):
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
        await response.prepare(request)
        self.streams.add(call)
        end: CallEnd
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
        finally:
            self.streams.discard(call)
        await response.write(grpcweb.encode(mode, self._trailer(*end)))
        await response.write_eof()
        return response

    @staticmethod
    def _trailer(code: grpc.StatusCode, message: str, metadata: MetadataPairs) -> bytes:
        return grpcweb.trailer(code.value[0], message, metadata)

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        if not await asyncio.to_thread((BUILD_DIR / "app.js").exists):
            log.warning("the customer page is not built: run scripts/build-web")
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, host or None, port).start()
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
) -> Bridge:
    """Serve the customer page and grpc-web on host:port (port 0: any free port, see .port),
    forwarding to the gRPC server at grpc_target. allowed_origins: other sites' pages that may call it."""
    bridge = Bridge(grpc_target, allowed_origins or [], max_body_bytes)
    await bridge.start(host, port)
    return bridge
