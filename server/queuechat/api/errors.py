"""Domain errors become canonical gRPC statuses carrying a google.rpc.ErrorInfo."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..bus import Lagging
from ..errors import ChatError, Kind

DOMAIN = "queuechat.chat.v1"
log = logging.getLogger(__name__)

_CODES = {kind: getattr(grpc.StatusCode, kind.value) for kind in Kind}


def status_for(err: ChatError) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata))
    code = _CODES[err.kind]
    return rpc_status.to_status(status_pb2.Status(code=code.value[0], message=err.message, details=[info]))


async def _abort(context: grpc.aio.ServicerContext, err: ChatError) -> None:
    st = status_for(err)
    await context.abort(st.code, st.details, trailing_metadata=st.trailing_metadata)


_LAGGING = ChatError(Kind.UNAVAILABLE, "STREAM_LAGGING", "The stream fell behind; resume from the last seq you saw.")


def rpc(method: Callable) -> Callable:
    """Wrap a servicer method (coroutine or async generator): ChatError -> status."""
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext):
            try:
                async with contextlib.aclosing(method(self, request, context)) as gen:
                    async for item in gen:
                        yield item
            except ChatError as e:
                await _abort(context, e)
            except Lagging:
                await _abort(context, _LAGGING)

        return stream

    @functools.wraps(method)
    async def unary(self: Any, request: Any, context: grpc.aio.ServicerContext):
        try:
            return await method(self, request, context)
        except ChatError as e:
            await _abort(context, e)

    return unary


Resolve = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]


def authenticated(resolve: Resolve) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """One service's authentication, in one place: the decorated call gets the principal that
    resolve(servicer, request, context) returns as a fourth argument, `who`. Refusals become
    statuses like any other ChatError."""

    def decorate(method: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(method):

            @functools.wraps(method)
            async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
                who = await resolve(self, request, context)
                async with contextlib.aclosing(method(self, request, context, who)) as gen:
                    async for item in gen:
                        yield item

            return rpc(stream)

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
            return token.strip() if scheme.lower() == "bearer" else ""
    return ""
