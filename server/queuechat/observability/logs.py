"""Logs: one line per event that matters, with ids as fields.

Events are logged on the `queuechat.events` logger with `extra={...}` fields: `event` (a dotted
name such as `offer.accepted`) and ids (`conversation_id`, `agent_id`, ...). Never a secret (tokens,
passwords, hashes) nor a message body: the writes choose their fields with that in mind.

Two formats: `text` (the usual line, then the fields as key=value) for people, and `json` (one
object per line: time, level, logger, message, the fields, and the traceback if any) for log shippers.
"""

from __future__ import annotations

import atexit
import copy
import json
import logging
import logging.handlers
import queue
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

EVENTS = logging.getLogger("queuechat.events")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("text", "json")

# What every LogRecord has: the rest of its attributes are the caller's extra fields.
_RESERVED = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def event(name: str, fields: Mapping[str, Any], level: int = logging.INFO) -> None:
    """Log one event: its name is the message (and the `event` field), the ids are fields."""
    EVENTS.log(level, name, extra=extra(name, fields))


def extra(name: str, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The `extra` of an event: fields that are None are left out; one that would clash with a
    LogRecord attribute gets a trailing _."""
    out: dict[str, Any] = {"event": name}
    for key, value in fields.items():
        if value is not None:
            out[f"{key}_" if key in _RESERVED else key] = value
    return out


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")}


def _text(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class TextFormatter(logging.Formatter):
    """The usual line, then the fields as key=value (values with spaces or quotes are quoted)."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = fields_of(record)
        fields.pop("event", None)  # it is the message
        if not fields:
            return line
        head, sep, tail = line.partition("\n")  # a traceback stays below the fields
        return head + " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items()) + sep + tail


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def formatter(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter()
    if fmt == "text":
        return TextFormatter()
    raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def handler(fmt: str = "text") -> logging.Handler:
    """A handler writing to stderr in the given format (`logging.basicConfig(handlers=[handler(fmt)])`).

    In the background: the caller only queues the record and a thread formats and writes
    it. A write is a system call, and a system call on the event loop's thread lets go of the GIL;
    with the database writer's thread busy, taking it back costs far more than the write (measured:
    a tenth of the event loop's time at 200 chat arrivals/s). Records still queued at exit are written
    by `atexit`; a process killed outright loses at most those."""
    out = logging.StreamHandler(sys.stderr)
    out.setFormatter(formatter(fmt))
    records: queue.SimpleQueue[logging.LogRecord | None] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, out)
    listener.start()
    atexit.register(listener.stop)
    return _Queued(records)


class _Queued(logging.handlers.QueueHandler):
    """Hands a copy of the record over: formatting (with its traceback) is the writing thread's work,
    and other handlers keep the record as they got it. The message is merged with its arguments now,
    while they still say what they said."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = copy.copy(record)
        if record.args:
            record.msg, record.args = record.getMessage(), None
        return record
