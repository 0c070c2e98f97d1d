"""The grpc.aio server: the three chat.v1 services plus health and reflection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chat.v1 import (
    admin_service_pb2,
    admin_service_pb2_grpc,
    agent_service_pb2,
    agent_service_pb2_grpc,
    customer_service_pb2,
    customer_service_pb2_grpc,
)

from .. import __version__, eventloop, gctune
from ..domain.core import Core
from ..observability import logs
from ..observability.interceptor import ServerObserver
from ..observability.metrics import Metrics, MetricsServer
from ..observability.tracing import Tracing
from . import convert
from .admin import AdminService
from .agent import AgentService
from .customer import CustomerService
from .errors import UNDECODABLE
from .peer import client_address

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"].full_name,
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name,
)

_OPTIONS = [
    # Keep idle streams alive through NATs and notice dead peers.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    # Since grpc 1.5x the ping's own timeout is this one; without it a frozen peer is noticed only after ~90 s.
    ("grpc.http2.ping_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    # Room for a 1 MiB upload chunk plus framing.
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def run(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError and friends: the handler answers INVALID_ARGUMENT
            return UNDECODABLE

    return run


class _Registration:
    """What the generated add_*Servicer_to_server functions see as the server. It registers their
    handlers with a deserializer that never raises, so bytes that are not the method's message get
    INVALID_ARGUMENT UNDECODABLE_REQUEST instead of grpc's UNKNOWN naming a Python class (and a
    logged traceback per call)."""

    def __init__(self, server: grpc.aio.Server, observer: ServerObserver | None = None):
        self._server = server
        self._observer = observer

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # registered below, from the same dictionary, with tolerant deserializers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        safe = {
            name: h._replace(request_deserializer=_tolerant(h.request_deserializer))  # type: ignore[attr-defined]
            if h.request_deserializer is not None
            else h
            for name, h in handlers.items()
        }
        if self._observer is not None:
            safe = {name: self._observer.wrap(f"/{service}/{name}", h) for name, h in safe.items()}
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        self._server.add_registered_method_handlers(service, safe)


def metrics_addresses(metrics_listen: str) -> list[str]:
    """The entries of --metrics-listen: HOST:PORT, or `web` for the web port; empty: metrics off."""
    return [a.strip() for a in metrics_listen.split(",") if a.strip()]


class ChatServer:
    """The gRPC server. metrics_listen: where to serve /metrics (comma-separated HOST:PORT; `web`
    serves it on the web port, see serve(); empty: metrics off). tracing: spans per RPC and per write
    (observability/tracing.py; None: off)."""

    def __init__(self, core: Core, address: str, *, metrics_listen: str = "", tracing: Tracing | None = None):
        self.core = core
        if os.environ.get("QUEUECHAT_CHECK_EVENTS") == "1":
            core.check_event = convert.check_payload  # every stored payload must parse as its message
        listen = metrics_addresses(metrics_listen)
        self.metrics = Metrics(core) if listen else None
        self.metrics_listen = [a for a in listen if a != "web"]
        self.metrics_servers: list[MetricsServer] = []
        self.tracing = tracing
        if self.metrics is not None:
            core.effects.metrics = self.metrics  # counts and observations of committed writes
            self.metrics.known(
                pb.DESCRIPTOR.services_by_name[name]
                for pb, name in (
                    (agent_service_pb2, "AgentService"),
                    (customer_service_pb2, "CustomerService"),
                    (admin_service_pb2, "AdminService"),
                )
            )
        core.write.around = self._around_write()
        trusted = core.config.rate_limits.trusted_proxies
        # Observed when registered, not per call: an interceptor costs every call an extra await.
        observer = ServerObserver(self.metrics, lambda context: client_address(context, trusted))
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if tracing is not None:
            interceptors.append(tracing.interceptor())
        # A cluster's nodes on one machine share the port (serve --workers); an embedded server never does.
        reuse = ("grpc.so_reuseport", 1 if core.link is not None else 0)
        self.server = grpc.aio.server(options=[*_OPTIONS, reuse], interceptors=interceptors or None)
        services = _Registration(self.server, observer)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(core), services)
        customer_service_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(core), services)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(core), services)
        self.health = _NodeHealth(core.node_id)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(address)

    def _around_write(self) -> Callable[[str], contextlib.AbstractContextManager[object]] | None:
        """The Writer's hook for each named write: a latency timer and a span, as far as they are on."""
        metrics, tracing = self.metrics, self.tracing
        if metrics is None and tracing is None:
            return None
        if tracing is None:
            assert metrics is not None
            return metrics.time_write
        if metrics is None:
            return tracing.write_span

        @contextlib.contextmanager
        def both(name: str) -> Iterator[object]:
            with metrics.time_write(name), tracing.write_span(name) as span:
                yield span

        return both

    async def start(self) -> None:
        await self.core.start()
        await self.server.start()
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        for listen in self.metrics_listen:
            assert self.metrics is not None
            try:
                self.metrics_servers.append(await self.metrics.serve(listen))
            except OSError as e:
                # Metrics never take the chat down: Prometheus sees the target down, the log says why.
                log.error("metrics: cannot listen on %s (%s); serving without this /metrics endpoint", listen, e)
        fields = {
            "version": __version__,
            "grpc_port": self.port,
            "metrics_ports": [m.port for m in self.metrics_servers] or None,
            "node": self.core.node_id,
            "cluster": self.core.link is not None,
            "database": self.core.db.engine.dialect.name,  # never the URL: it may hold a password
            "tracing": self.tracing is not None,
            "event_loop": eventloop.name(asyncio.get_running_loop()),
        }
        logs.event("node.started", fields)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, let calls finish for `grace` seconds, then cancel streams."""
        logs.event("node.stopping", {"grpc_port": self.port})
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        # New calls are refused from the first moment of stop(); then open streams end with UNAVAILABLE at once,
        # so their clients reconnect (through the balancer, to another node) rather than wait for the grace.
        stopping = asyncio.get_running_loop().create_task(self.server.stop(grace))
        await asyncio.sleep(0)
        self.core.drain()
        await stopping
        await self.core.stop()
        self.core.db.close()
        for server in self.metrics_servers:
            await server.stop()
        self.metrics_servers.clear()
        logs.event("node.stopped", {"grpc_port": self.port})


class _NodeHealth(health.aio.HealthServicer):
    """grpc health, answering which node it is in the `queuechat-node` trailer (behind one address, which
    node answered is otherwise invisible)."""

    def __init__(self, node_id: str):
        super().__init__()
        self._node = (("queuechat-node", node_id),)

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method name
        context.set_trailing_metadata(self._node)
        return await super().Check(request, context)


async def _start_bridge(
    target: str, web_listen: str, web_origins: list[str] | None, metrics: Metrics | None, reuse_port: bool = False
) -> Any:
    """The web bridge; with metrics, it also serves GET /metrics (--metrics-listen web)."""
    from queuechat_web import split_host_port, start_bridge
    from queuechat_web.bridge import DEFAULT_MAX_BODY_BYTES, Bridge

    if metrics is None:
        return await start_bridge(
            target, *split_host_port(web_listen), allowed_origins=web_origins, reuse_port=reuse_port
        )

    handle = metrics.handle

    class WithMetrics(Bridge):
        def app(self) -> Any:
            app = super().app()
            app.router.add_get("/metrics", handle)
            return app

    bridge = WithMetrics(target, web_origins or [], DEFAULT_MAX_BODY_BYTES)
    await bridge.start(*split_host_port(web_listen), reuse_port)
    return bridge


async def serve(
    core: Core,
    address: str,
    web_listen: str = "",
    web_origins: list[str] | None = None,
    metrics_listen: str = "",
) -> None:
    """Run until SIGINT/SIGTERM; with web_listen ("HOST:PORT") also the customer page and grpc-web bridge;
    with metrics_listen (HOST:PORT entries, or `web`: on the web port) Prometheus metrics at /metrics.
    Traces go where the OTEL_* environment variables say (off without them)."""
    tracing = Tracing.from_env()
    srv = ChatServer(core, address, metrics_listen=metrics_listen, tracing=tracing)
    await srv.start()
    log.info("queuechat gRPC listening on port %d", srv.port)
    for m in srv.metrics_servers:
        log.info("queuechat metrics listening on port %d (/metrics)", m.port)
    on_web = "web" in metrics_addresses(metrics_listen)
    if on_web and not web_listen:
        log.warning("--metrics-listen web: the web port is off (--web-listen is empty), so no /metrics there")
    bridge = None
    if web_listen:
        # The bridge calls this process's gRPC port; a wildcard listen address is reached on localhost.
        grpc_host = address.rpartition(":")[0].strip("[]")
        grpc_host = "localhost" if grpc_host in ("", "0.0.0.0", "::", "*") else grpc_host
        target = f"[{grpc_host}]:{srv.port}" if ":" in grpc_host else f"{grpc_host}:{srv.port}"
        bridge = await _start_bridge(
            target, web_listen, web_origins, srv.metrics if on_web else None, core.link is not None
        )
        log.info("queuechat web bridge and customer page listening on port %d", bridge.port)
    gctune.tune()  # what start-up built leaves the collector's passes (gctune.py)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    # Browsers first: their streams end with UNAVAILABLE and they reconnect once the server is back.
    if bridge is not None:
        await bridge.stop()
    await srv.stop()
    if tracing is not None:
        tracing.shutdown()  # export what is buffered
