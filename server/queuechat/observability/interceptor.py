"""The gRPC server interceptor: per-RPC metrics, and one log line per refusal.

Every RPC: `grpc_server_started_total` when it starts; `grpc_server_handled_total{grpc_code}` and
`grpc_server_handling_seconds` when it ends (a stream: when it closes); open streams by method. A
call that ends with an error status is counted by its google.rpc.ErrorInfo reason (the api layer
puts one on every refusal, api/errors.py), STREAM_LAGGING also as a lagging stream cut off, and
logged as `rpc.refused` (at most a burst of lines per reason, then one a second, with the number
left out). Cancellations (the client went away) are neither.

grpc_code uses Go's spelling of the codes (OK, InvalidArgument, Canceled, ...), as go-grpc-prometheus
does, so rules and dashboards written for it work unchanged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from . import logs
from .metrics import GRPC_TYPES

if TYPE_CHECKING:
    from .metrics import Metrics, RpcMetrics

GO_CODES = {c: c.name.title().replace("_", "") for c in grpc.StatusCode} | {
    grpc.StatusCode.OK: "OK",
    grpc.StatusCode.CANCELLED: "Canceled",
}
# Server faults: the api layer logs these with their traceback already (api/errors.py).
_FAILURES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

Client = Callable[[grpc.aio.ServicerContext], str]


def error_info(trailing_metadata: Any) -> tuple[str, str]:
    """The ErrorInfo reason in a status's details (grpc-status-details-bin), and the rate limit that
    refused the call if one did; "" for either that is not there."""
    for key, value in trailing_metadata or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            try:
                status = status_pb2.Status.FromString(value)
            except DecodeError:
                return "", ""
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):  # False: another kind of detail
                    return info.reason, info.metadata.get("limit", "")
    return "", ""


class _NoMetrics:
    """Metrics are off: the interceptor still logs refusals."""

    def started(self) -> None:
        pass

    def opened(self) -> None:
        pass

    def closed(self) -> None:
        pass

    def handled(self, code: str, seconds: float) -> None:
        pass

    def refused(self, code: str, reason: str) -> None:
        pass


_NO_METRICS = _NoMetrics()


class _Budget:
    """Per key: a burst of `burst` log lines, then one every `every` seconds; the rest are counted."""

    def __init__(self, burst: int = 20, every: float = 1.0):
        self.burst, self.every = burst, every
        self._state: dict[str, tuple[float, float, int]] = {}  # key -> (tokens, at, suppressed)

    def allow(self, key: str) -> int | None:
        """None: do not log; else log, saying how many were left out since the last line."""
        now = time.monotonic()
        tokens, at, suppressed = self._state.get(key, (float(self.burst), now, 0))
        tokens = min(float(self.burst), tokens + (now - at) / self.every)
        if tokens < 1:
            self._state[key] = (tokens, now, suppressed + 1)
            return None
        if len(self._state) > 1000 and key not in self._state:
            self._state.clear()  # keys are reasons, a short list: this never happens
        self._state[key] = (tokens - 1, now, 0)
        return suppressed


@dataclass(slots=True)
class _Hooks:
    """A stream's metrics and refusal log, for a wrapper that watches the stream itself (errors.rpc)."""

    observer: ServerObserver
    m: RpcMetrics | _NoMetrics
    service: str
    method: str

    def begin(self) -> float:
        self.m.started()
        self.m.opened()
        return time.perf_counter()

    def end(self, context: grpc.aio.ServicerContext, fallback: grpc.StatusCode, began: float) -> None:
        self.m.closed()
        self.observer._end(self.m, context, fallback, time.perf_counter() - began, self.service, self.method)


class ServerObserver(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None = None, client: Client | None = None):
        self.metrics = metrics
        self.client = client or (lambda context: context.peer() or "")
        self._budget = _Budget()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler  # unknown method: grpc answers UNIMPLEMENTED
        path = handler_call_details.method
        if isinstance(path, bytes):
            path = path.decode()
        return self.wrap(path, handler)

    def wrap(self, path: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        """The method's handler, observed. The server calls this once per method when it registers
        it (api/server.py), which costs a call nothing; intercept_service does the same per call."""
        service, _, method = path.lstrip("/").partition("/")
        streaming = (bool(handler.request_streaming), bool(handler.response_streaming))
        m: RpcMetrics | _NoMetrics = (
            self.metrics.rpc(GRPC_TYPES[streaming], service, method) if self.metrics is not None else _NO_METRICS
        )
        field = ("stream_" if streaming[0] else "unary_") + ("stream" if streaming[1] else "unary")
        behavior = getattr(handler, field)
        if inspect.isasyncgenfunction(behavior):
            wrapped: Any = self._stream(behavior, m, service, method)
        elif inspect.iscoroutinefunction(behavior):
            wrapped = self._unary(behavior, m, service, method)
        else:
            return handler  # a synchronous handler: none here
        return handler._replace(**{field: wrapped})  # type: ignore[attr-defined]

    def _unary(self, behavior: Callable[..., Any], m: RpcMetrics | _NoMetrics, service: str, method: str) -> Any:
        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            m.started()
            t0 = time.perf_counter()
            fallback = grpc.StatusCode.OK
            try:
                return await behavior(request, context)
            except asyncio.CancelledError:
                fallback = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                fallback = grpc.StatusCode.UNKNOWN  # what grpc answers for an exception that escapes
                raise
            finally:
                self._end(m, context, fallback, time.perf_counter() - t0, service, method)

        return unary

    def _stream(self, behavior: Callable[..., Any], m: RpcMetrics | _NoMetrics, service: str, method: str) -> Any:
        hooks = _Hooks(self, m, service, method)
        observed = getattr(behavior, "observed", None)  # api/errors.py rpc(): watched from inside its wrapper
        if observed is not None and inspect.ismethod(behavior):
            return types.MethodType(observed(hooks), behavior.__self__)

        # Any other stream (health's Watch, say): a wrapper of our own, with the same hooks.
        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            began = hooks.begin()
            fallback = grpc.StatusCode.OK
            try:
                async with aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except (asyncio.CancelledError, GeneratorExit):
                fallback = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                fallback = grpc.StatusCode.UNKNOWN
                raise
            finally:
                hooks.end(context, fallback, began)

        return stream

    def _end(
        self,
        m: RpcMetrics | _NoMetrics,
        context: grpc.aio.ServicerContext,
        fallback: grpc.StatusCode,
        seconds: float,
        service: str,
        method: str,
    ) -> None:
        try:
            code = context.code()
        except Exception:  # a finished call's context: nothing more to learn
            code = None
        status = code if isinstance(code, grpc.StatusCode) else fallback
        m.handled(GO_CODES[status], seconds)
        if status in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
            return
        try:
            reason, limit = error_info(context.trailing_metadata())
        except Exception:
            reason, limit = "", ""
        m.refused(GO_CODES[status], reason)
        suppressed = self._budget.allow(reason or status.name)
        if suppressed is None:
            return
        failed = status in _FAILURES
        fields = {
            "grpc_service": service,
            "grpc_method": method,
            "grpc_code": status.name,
            "reason": reason or None,
            "limit": limit or None,  # the other metadata may hold what the caller sent: not logged
            "client": self._client(context),
            "suppressed": suppressed or None,
        }
        logs.event("rpc.failed" if failed else "rpc.refused", fields, logging.WARNING if failed else logging.INFO)

    def _client(self, context: grpc.aio.ServicerContext) -> str | None:
        try:
            return self.client(context) or None
        except Exception:
            return None
