"""The first check of every request, before authentication or the domain:
no control characters and no over-long strings in any string field.

It walks the request by its descriptor, so a field added to the contract is
covered without a change here. The caps are generous outer bounds (the
domain applies the configured, tighter limits with their own reasons); they
exist so that nothing unbounded is hashed, stored, looked up or quoted back
in an error. docs/api.md lists them.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from ..errors import invalid

# Free text: may hold newlines and tabs; its configured length is the domain's to check.
FREE_TEXT = frozenset({"text", "body", "prompt", "comment", "wrap_up_note"})
FREE_TEXT_MAX = 100_000
ID_MAX = 128  # ids are at most 64 (the domain says so precisely); past 128 nothing reads them
MAX = {
    "username": 128,
    "password": 1024,
    "identity_token": 8192,
    "page_token": 1024,
    "content_type": 255,
    "file_name": 1024,
    "sha256": 64,
    "value": 4096,  # a customer variable; the configured max_variable_chars applies after this
}
OTHER_MAX = 1024
# C0 controls (NUL included), DEL and C1 controls; free text may keep tabs and line breaks (\n, \r\n).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def limit_for(field: str) -> int:
    if field in FREE_TEXT:
        return FREE_TEXT_MAX
    if field in MAX:
        return MAX[field]
    if field.endswith("_id") or field.endswith("_ids") or field in ("name", "request_id"):
        return ID_MAX
    return OTHER_MAX


def check_request(request: Message) -> None:
    """Refuse with INVALID_ARGUMENT (BAD_CHARACTERS or FIELD_TOO_LONG) and change nothing."""
    _check_message(request, "")


def _check_message(msg: Message, prefix: str) -> None:
    # Only string and message fields are read: ListFields() would also hand back every bytes field, as a
    # copy (a 1 MiB upload chunk, per call).
    for field, is_string, is_map in _plan(msg.DESCRIPTOR):
        path = prefix + field.name
        if is_string:
            value = getattr(msg, field.name)
            if field.is_repeated:
                for item in value:
                    _check_string(field.name, path, item)
            elif value:
                _check_string(field.name, path, value)
        elif is_map:
            value = getattr(msg, field.name)
            if value:
                _check_map(field, path, value)
        elif field.is_repeated:
            for item in getattr(msg, field.name):
                _check_message(item, path + ".")
        elif msg.HasField(field.name):
            _check_message(getattr(msg, field.name), path + ".")


_PLANS: dict[Any, list[tuple[FieldDescriptor, bool, bool]]] = {}


def _plan(descriptor: Any) -> list[tuple[FieldDescriptor, bool, bool]]:
    """A message type's string and message fields: (field, is a string, is a map), once per type."""
    plan = _PLANS.get(descriptor)
    if plan is None:
        plan = []
        for field in descriptor.fields:
            if field.type == FieldDescriptor.TYPE_STRING:
                plan.append((field, True, False))
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                entry = field.message_type
                plan.append((field, False, bool(entry is not None and entry.GetOptions().map_entry)))
        _PLANS[descriptor] = plan
    return plan


def _check_map(field: FieldDescriptor, path: str, value: Any) -> None:
    entry = field.message_type
    assert entry is not None
    key_is_str = entry.fields_by_name["key"].type == FieldDescriptor.TYPE_STRING
    value_field = entry.fields_by_name["value"]
    for k, v in value.items():
        if key_is_str:
            _check_string("name", f"{path} key", k)
        if value_field.type == FieldDescriptor.TYPE_STRING:
            _check_string("value", f"{path} value", v)
        elif value_field.type == FieldDescriptor.TYPE_MESSAGE:
            _check_message(v, f"{path} value.")


def _check_string(name: str, path: str, value: str) -> None:
    limit = limit_for(name)
    if len(value) > limit:
        raise invalid(
            "FIELD_TOO_LONG", f"{path} may have at most {limit} characters; this one has {len(value)}.",
            field=path, limit=limit,
        )
    pattern = _CONTROL_IN_TEXT if name in FREE_TEXT else _CONTROL
    if pattern.search(value):
        allowed = " (only line breaks and tabs are allowed)" if name in FREE_TEXT else ""
        raise invalid("BAD_CHARACTERS", f"{path} contains control characters{allowed}.", field=path)
