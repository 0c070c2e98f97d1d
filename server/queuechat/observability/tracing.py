"""Traces with OpenTelemetry: off by default, on with the standard OTEL_* environment variables.

Tracing is on when OTEL_TRACES_EXPORTER names an exporter (not `none`), or, with that unset, when an
OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT: the
exporter is then `otlp`). OTEL_SDK_DISABLED=true turns it off whatever else is set. The rest is
the SDK's and the exporters' own: OTEL_SERVICE_NAME (default here: queuechat),
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_EXPORTER_OTLP_* (protocol
`grpc`, the default, or `http/protobuf`; headers, timeout, ...), OTEL_PROPAGATORS.

Spans: one per RPC (the opentelemetry-instrumentation-grpc aio server interceptor, which also
continues a caller's trace from its `traceparent` metadata), and one per named write, a child of
the RPC's span (`Tracing.write_span`, the Writer's `around` hook in domain/runner.py). A refusal
(ChatError) is no error: the write's span gets `queuechat.refusal` = its reason.

The packages come with the `tracing` extra; without them, tracing asked for is logged and stays off.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from .. import __version__
from ..errors import ChatError

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)


def wanted(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return any(e.strip() not in ("", "none") for e in exporters.split(","))
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    """An exporter by its OTEL_TRACES_EXPORTER name, found by the SDK's entry points."""
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
        name = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}.get(protocol.strip(), "")
        if not name:
            raise ValueError(f"OTLP protocol {protocol!r} is not supported: use grpc or http/protobuf")
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        package = {"otlp_proto_grpc": "opentelemetry-exporter-otlp-proto-grpc"}.get(name, f"the exporter of {name!r}")
        raise LookupError(f"no trace exporter {name!r}: install {package}")
    return next(iter(found)).load()()


class Tracing:
    def __init__(self, provider: TracerProvider):
        self.provider = provider
        self.tracer = provider.get_tracer("queuechat", __version__)

    @classmethod
    def from_env(cls) -> Tracing | None:
        """Tracing as the OTEL_* environment variables ask, or None (off: the default). The SDK and the
        exporters read their own variables from the environment too."""
        env = os.environ
        if not wanted(env):
            return None
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            log.warning("tracing asked for (OTEL_*), but OpenTelemetry is missing: pip install 'queuechat[tracing]'")
            return None
        names = [n.strip() for n in (env.get("OTEL_TRACES_EXPORTER") or "otlp").lower().split(",")]
        try:
            exporters = [_exporter(n, env) for n in names if n and n != "none"]
        except (LookupError, ValueError) as e:
            log.warning("tracing stays off: %s", e)
            return None
        resource = Resource.create()
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "queuechat"}))
        provider = TracerProvider(resource=resource)  # the sampler from OTEL_TRACES_SAMPLER
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        log.info("tracing on: exporting to %s", ", ".join(names))
        return cls(provider)

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """A span per RPC: the OpenTelemetry gRPC instrumentation's aio server interceptor."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        interceptor: grpc.aio.ServerInterceptor = aio_server_interceptor(tracer_provider=self.provider)
        return interceptor

    @contextmanager
    def write_span(self, name: str) -> Iterator[object]:
        """A span for one named write (its caller's view: waiting for the writer, running, committing)."""
        from opentelemetry.trace import SpanKind, Status, StatusCode

        with self.tracer.start_as_current_span(
            name,
            kind=SpanKind.INTERNAL,
            attributes={"queuechat.write": name},
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                yield span
            except ChatError as e:
                span.set_attribute("queuechat.refusal", e.reason)
                raise
            except Exception as e:
                span.record_exception(e)
                span.set_status(Status(StatusCode.ERROR, type(e).__name__))
                raise

    def shutdown(self) -> None:
        """Export what is buffered, then stop the exporters."""
        self.provider.shutdown()
