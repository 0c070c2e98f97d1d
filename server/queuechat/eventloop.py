"""The event loop `queuechat serve` runs on: uvloop where it is installed, asyncio's own otherwise.

Measured on the 2-core bench machine (arrivals phase, 1,000 chats waiting, 100 agents, same code,
alternating runs): at 300 arrivals/s offer p99 27-37 ms on uvloop against 89-96 ms on asyncio's
loop, at 200/s 10-14 against 20-33 ms; CPU per chat 5-7% lower. `QUEUECHAT_EVENT_LOOP=asyncio`
keeps the standard loop (to compare, or to rule the loop out when chasing a problem).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CHOICES = ("uvloop", "asyncio")


def factory(env: dict[str, str] | os._Environ[str] = os.environ) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory, or None for asyncio's default (asked for, or uvloop not installed)."""
    wanted = env.get("QUEUECHAT_EVENT_LOOP", "uvloop").strip().lower() or "uvloop"
    if wanted not in CHOICES:
        raise ValueError(f"QUEUECHAT_EVENT_LOOP must be one of {', '.join(CHOICES)}, not {wanted!r}")
    if wanted == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # not on this platform (Windows) or not installed: the standard loop serves
        return None
    return uvloop.new_event_loop


def name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=factory()) as runner:
        return runner.run(main)
