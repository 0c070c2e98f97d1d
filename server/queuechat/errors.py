"""Domain errors: a canonical kind, a stable reason code and a human message.

The API layer turns them into gRPC statuses with a google.rpc.ErrorInfo;
the domain never imports grpc.
"""

from __future__ import annotations

import enum
from typing import Any


class Kind(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"

# What an error may quote back of a caller's value: a short prefix, never a 10,000-character id.
QUOTE_MAX = 80


class ChatError(Exception):
    """Raised inside a transaction, it rolls the whole write back."""

    def __init__(self, kind: Kind, reason: str, message: str, *, retry_after: float | None = None, **metadata: object):
        super().__init__(message)
        self.kind = kind
        self.reason = reason
        self.message = message if len(message) <= 1024 else message[:1021] + "..."
        self.metadata = {k: short(str(v)) for k, v in metadata.items()}
        # Seconds after which a retry may succeed (RESOURCE_EXHAUSTED): sent as google.rpc.RetryInfo.
        self.retry_after = retry_after


def short(value: str, limit: int = QUOTE_MAX) -> str:
    """At most a short prefix of a caller's value, for messages and metadata."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def invalid(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.INVALID_ARGUMENT, reason, message, **md)


def precondition(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.FAILED_PRECONDITION, reason, message, **md)


def not_found(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.NOT_FOUND, reason, message, **md)


def denied(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.PERMISSION_DENIED, reason, message, **md)


def unauthenticated(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.UNAUTHENTICATED, reason, message, **md)


def already_exists(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.ALREADY_EXISTS, reason, message, **md)


def exhausted(reason: str, message: str, **md: Any) -> ChatError:
    return ChatError(Kind.RESOURCE_EXHAUSTED, reason, message, **md)
