"""The chat.v1 contract: Buf style, browser-friendly call shapes, health and reflection."""

import subprocess
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chat.v1 import admin_service_pb2, agent_service_pb2, customer_service_pb2

ROOT = Path(__file__).resolve().parent.parent
SERVICES = [
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
    customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
]


def test_buf_lint_passes():
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("buf is missing: scripts/setup installs it with npm ci")
    result = subprocess.run([str(buf), "lint"], cwd=ROOT / "proto", capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_only_unary_and_server_streaming_calls():
    """Everything must work over grpc-web from a browser."""
    for service in SERVICES:
        for method in service.methods:
            assert not method.client_streaming, f"{service.full_name}/{method.name} streams from the client"


async def test_health_and_reflection_are_served(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in SERVICES + [None]:
        name = service.full_name if service else ""
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for resp in responses:
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {s.full_name for s in SERVICES} <= names
    assert "grpc.health.v1.Health" in names

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
