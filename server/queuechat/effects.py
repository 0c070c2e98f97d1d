"""The in-process implementation of the domain's effects (domain/tx.py):
the in-memory bus, event-loop timers, metrics and event logs. A cluster
replaces it with one that also tells the other nodes; the domain does not
change."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from .bus import Bus
from .config import Settings
from .observability import logs

WriteFn = Callable[..., Any]


class MetricsSink(Protocol):
    """Where committed writes' counts and observations go (observability.metrics.Metrics)."""

    def count(self, name: str, value: float, labels: dict[str, str]) -> None: ...

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None: ...


class NoMetrics:
    """Metrics are off: counts and observations go nowhere."""

    def count(self, name: str, value: float, labels: dict[str, str]) -> None:
        pass

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        pass


class LocalEffects:
    def __init__(
        self,
        bus: Bus,
        spawn: Callable[..., None],
        *,
        on_queue_changed: Callable[[str], None] = lambda queue_id: None,
        on_session_ended: Callable[[str], None] = lambda session_id: None,
        on_settings_changed: Callable[[Settings], None] = lambda settings: None,
        metrics: MetricsSink | None = None,
    ):
        self.bus = bus
        self.metrics: MetricsSink = metrics or NoMetrics()  # the server sets it when metrics are on
        self._spawn = spawn  # runs a write in the background
        self._on_queue_changed = on_queue_changed
        self._on_session_ended = on_session_ended
        self._on_settings_changed = on_settings_changed
        self._timers: set[asyncio.TimerHandle] = set()

    def publish(self, topic: tuple[str, str], item: object) -> None:
        self.bus.publish(topic, item)

    def schedule(self, when: datetime, fn: WriteFn, args: tuple[Any, ...]) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, (when - datetime.now(UTC)).total_seconds())
        handle: asyncio.TimerHandle

        def fire() -> None:
            self._timers.discard(handle)
            self._spawn(fn, *args)

        handle = loop.call_later(delay, fire)
        self._timers.add(handle)

    def queue_changed(self, queue_id: str) -> None:
        self._on_queue_changed(queue_id)

    def session_ended(self, session_id: str) -> None:
        self._on_session_ended(session_id)

    def settings_changed(self, settings: Settings) -> None:
        self._on_settings_changed(settings)

    def count(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.metrics.count(name, value, labels)

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        self.metrics.observe(name, value, labels)

    def log(self, event: str, fields: dict[str, object]) -> None:
        logs.event(event, fields)

    @property
    def pending_timers(self) -> int:
        return len(self._timers)

    def cancel_timers(self) -> None:
        for h in self._timers:
            h.cancel()
        self._timers.clear()
