"""The grpc.aio server: the three chat.v1 services plus health and reflection."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
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

from ..domain.core import Core
from . import convert
from .admin import AdminService
from .agent import AgentService
from .customer import CustomerService
from .errors import UNDECODABLE

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

    def __init__(self, server: grpc.aio.Server):
        self._server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # registered below, from the same dictionary, with tolerant deserializers

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        safe = {
            name: h._replace(request_deserializer=_tolerant(h.request_deserializer))  # type: ignore[attr-defined]
            if h.request_deserializer is not None
            else h
            for name, h in handlers.items()
        }
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, safe),))
        self._server.add_registered_method_handlers(service, safe)


class ChatServer:
    def __init__(self, core: Core, address: str):
        self.core = core
        if os.environ.get("QUEUECHAT_CHECK_EVENTS") == "1":
            core.check_event = convert.check_payload  # every stored payload must parse as its message
        self.server = grpc.aio.server(options=_OPTIONS)
        services = _Registration(self.server)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(AgentService(core), services)
        customer_service_pb2_grpc.add_CustomerServiceServicer_to_server(CustomerService(core), services)
        admin_service_pb2_grpc.add_AdminServiceServicer_to_server(AdminService(core), services)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(address)

    async def start(self) -> None:
        await self.core.start()
        await self.server.start()
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """Drain: report NOT_SERVING, let calls finish for `grace` seconds, then cancel streams."""
        for name in SERVICE_NAMES + ("",):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        await self.core.stop()
        self.core.db.close()


async def serve(core: Core, address: str, web_listen: str = "", web_origins: list[str] | None = None) -> None:
    """Run until SIGINT/SIGTERM; with web_listen ("HOST:PORT") also the customer page and grpc-web bridge."""
    from queuechat_web import split_host_port, start_bridge

    srv = ChatServer(core, address)
    await srv.start()
    log.info("queuechat gRPC listening on port %d", srv.port)
    bridge = None
    if web_listen:
        # The bridge calls this process's gRPC port; a wildcard listen address is reached on localhost.
        grpc_host = address.rpartition(":")[0].strip("[]")
        grpc_host = "localhost" if grpc_host in ("", "0.0.0.0", "::", "*") else grpc_host
        target = f"[{grpc_host}]:{srv.port}" if ":" in grpc_host else f"{grpc_host}:{srv.port}"
        bridge = await start_bridge(target, *split_host_port(web_listen), allowed_origins=web_origins)
        log.info("queuechat web bridge and customer page listening on port %d", bridge.port)
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
