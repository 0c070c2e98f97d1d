"""Domain errors become canonical gRPC statuses carrying a google.rpc.ErrorInfo.

Every request is checked first (api/validate.py). An exception that is not a
ChatError never reaches the client as it is: it becomes INTERNAL with a
generic message and an error id, and the id is logged with the traceback
(rate-limited, so a flood of failing calls cannot flood the log).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..bus import Lagging
from ..errors import ChatError, Kind, invalid
from .validate import check_request

DOMAIN = "queuechat.chat.v1"
log = logging.getLogger(__name__)

_CODES = {kind: getattr(grpc.StatusCode, kind.value) for kind in Kind}


def status_for(err: ChatError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    details = [info]
    if err.retry_after is not None:
        retry = any_pb2.Any()
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(1_000_000, int(err.retry_after * 1e9)))  # at least 1 ms: "retry later", not "now"
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
        details.append(retry)
    code = _CODES[err.kind]
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=err.message, details=details))


# Requests grpc could not parse reach the handler as this (see UndecodableRequests in server.py).
UNDECODABLE: Any = object()


class _LogBudget:
    """At most `burst` tracebacks, then one a `every` seconds; the rest are counted."""

    def __init__(self, burst: int = 10, every: float = 10.0):
        self.tokens, self.burst, self.every = float(burst), burst, every
        self.at = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) / self.every)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


_log_budget = _LogBudget()


def _internal(method: str, e: BaseException) -> ChatError:
    error_id = uuid.uuid4().hex[:16]
    if _log_budget.allow():
        extra = f" ({_log_budget.suppressed} more since, not logged)" if _log_budget.suppressed else ""
        _log_budget.suppressed = 0
        log.error("internal error %s in %s%s", error_id, method, extra, exc_info=e)
    return ChatError(
        Kind.INTERNAL, "INTERNAL", f"Something went wrong on the server (error id {error_id}).", error_id=error_id
    )


def _first_check(request: Any) -> None:
    if request is UNDECODABLE:
        # A new error each time: re-raising one object would chain every request's frames onto it.
        raise invalid("UNDECODABLE_REQUEST", "The request could not be parsed as the method's message.")
    check_request(request)


async def _abort(context: grpc.aio.ServicerContext, err: ChatError) -> None:
    st = status_for(err)
    await context.abort(st.code, st.details, trailing_metadata=st.trailing_metadata)


_LAGGING = ChatError(Kind.UNAVAILABLE, "STREAM_LAGGING", "The stream fell behind; resume from the last seq you saw.")


Resolve = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


class StreamHooks(Protocol):
    """What watches a stream from outside (observability/interceptor.py: metrics, refusal logs)."""

    def begin(self) -> float: ...

    def end(self, context: grpc.aio.ServicerContext, fallback: grpc.StatusCode, began: float) -> None: ...


def rpc(method: Callable[..., Any], resolve: Resolve | None = None) -> Callable[..., Any]:
    """Wrap a servicer method (coroutine or async generator): check the request first; ChatError -> its
    status; anything unexpected -> INTERNAL with an error id. With `resolve` (see authenticated), the
    method gets the caller's principal as a fourth argument."""
    if inspect.isasyncgenfunction(method):
        return _stream(method, resolve, None)
    name = method.__name__

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            _first_check(request)
            return await method(self, request, context)
        except ChatError as e:
            await _abort(context, e)
        except grpc.aio.AbortError:
            raise
        except Exception as e:
            await _abort(context, _internal(name, e))

    return unary


def stream_of(convert: Callable[[Any], Any], resolve: Resolve | None = None) -> Callable[..., Any]:
    """For a servicer stream that only converts a domain stream's items: the method is a coroutine that
    returns the domain stream (its checks, like authentication, done before it returns), and the
    wrapper converts each item with `convert`: one async generator fewer per open stream."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        return _stream(method, resolve, convert)

    return decorate


def _stream(
    method: Callable[..., Any], resolve: Resolve | None, convert: Callable[[Any], Any] | None
) -> Callable[..., Any]:
    """rpc()'s wrapper of a stream. It also has `observed(hooks)`: the same wrapper with the
    interceptor's watching inside it, so that an open stream is one generator layer fewer (each layer
    is about a KiB per open stream: frame, generator and the loop's weak reference to it)."""
    name = method.__name__

    def make(hooks: StreamHooks | None) -> Callable[..., Any]:
        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            began = hooks.begin() if hooks is not None else 0.0
            fallback = grpc.StatusCode.OK
            try:
                try:
                    _first_check(request)
                    args: tuple[Any, ...] = (self, request, context)
                    if resolve is not None:
                        args += (await resolve(self, request, context),)
                    items = method(*args) if convert is None else await method(*args)
                    try:
                        async for item in items:
                            yield item if convert is None else convert(item)
                            del item  # not held while the stream waits for the next one
                    finally:
                        await items.aclose()
                except ChatError as e:
                    await _abort(context, e)
                except Lagging:
                    await _abort(context, _LAGGING)
                except grpc.aio.AbortError:
                    raise
                except Exception as e:
                    await _abort(context, _internal(name, e))
            except (asyncio.CancelledError, GeneratorExit):
                fallback = grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                fallback = grpc.StatusCode.UNKNOWN  # an abort: the context has its code
                raise
            finally:
                if hooks is not None:
                    hooks.end(context, fallback, began)

        stream.observed = make  # type: ignore[attr-defined]
        return stream

    return make(None)


def authenticated(resolve: Resolve) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One service's authentication, in one place: the decorated call gets the principal that
    resolve(servicer, request, context) returns as a fourth argument, `who`. Refusals become
    statuses like any other ChatError."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(method):
            return rpc(method, resolve)

        @functools.wraps(method)
        async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await method(self, request, context, await resolve(self, request, context))

        return rpc(unary)

    return decorate


def bearer(context: grpc.aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            if isinstance(value, bytes):  # typed str | bytes; gRPC gives bytes only for "-bin" keys
                try:
                    value = value.decode("ascii")
                except UnicodeDecodeError:
                    return ""
            scheme, _, token = value.partition(" ")
            token = token.strip()
            # Tokens this server issues are ASCII and short; anything else is no token at all.
            return token if scheme.lower() == "bearer" and token.isascii() and len(token) <= 512 else ""
    return ""
