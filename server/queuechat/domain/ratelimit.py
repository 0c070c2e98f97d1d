"""Defences against floods: token buckets per client address, identity,
conversation and username, and the back-off after failed logins.

In memory and per process: a refusal costs no database work, which is the
point under a flood. In a cluster each node counts its own callers, so a
limit holds per node; a proxy in front (docs/security.md) is the place for
cluster-wide limits.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from ..config import RateLimits
from ..errors import ChatError, Kind

_MAX_KEYS = 100_000  # per limit: past this, buckets that have refilled are forgotten


class Bucket:
    """At most `count` in any `period` seconds: a burst of up to count, then count/period per second."""

    __slots__ = ("count", "period", "_state")

    def __init__(self, count: float, period: float):
        self.count = float(count)
        self.period = period
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, at)

    def take(self, key: str, cost: float = 1.0, now: float | None = None) -> float:
        """Take cost tokens; 0.0 if allowed, else the seconds until it would be (nothing is taken)."""
        now = time.monotonic() if now is None else now
        rate = self.count / self.period
        tokens, at = self._state.get(key, (self.count, now))
        tokens = min(self.count, tokens + (now - at) * rate)
        cost = min(cost, self.count)  # a cost above the burst could never pass: cap it at a full bucket
        if tokens < cost:
            return (cost - tokens) / rate
        if len(self._state) >= _MAX_KEYS and key not in self._state:
            self._forget_full(now)
        self._state[key] = (tokens - cost, now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        rate = self.count / self.period
        self._state = {k: (t, a) for k, (t, a) in self._state.items() if t + (now - a) * rate < self.count}
        if len(self._state) >= _MAX_KEYS:  # all busy (a wide flood): start over rather than grow
            self._state.clear()


class Backoff:
    """Exponential back-off after consecutive failures of one key (a username from one address)."""

    def __init__(self, free: int, base: float, cap: float):
        self.free, self.base, self.cap = free, base, cap
        self._fails: dict[str, tuple[int, float]] = {}  # key -> (consecutive failures, last failure)

    def wait(self, key: str, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        n, last = self._fails.get(key, (0, 0.0))
        if n < self.free:
            return 0.0
        delay: float = min(self.cap, self.base * 2.0 ** (n - self.free))
        return max(0.0, last + delay - now)

    def failed(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if len(self._fails) >= _MAX_KEYS and key not in self._fails:
            self._fails = {k: v for k, v in self._fails.items() if now - v[1] < self.cap}
            if len(self._fails) >= _MAX_KEYS:
                self._fails.clear()
        n, _ = self._fails.get(key, (0, 0.0))
        self._fails[key] = (n + 1, now)

    def succeeded(self, key: str) -> None:
        self._fails.pop(key, None)


@dataclass(frozen=True, slots=True)
class _Rule:
    name: str  # the limit's setting, also the refusal's metadata and the metric label
    reason: str
    message: str


class Limiter:
    """All the limits of one process. A limit set to 0 (or enabled = false) is off."""

    def __init__(self, cfg: RateLimits, clock: Callable[[], float] = time.monotonic):
        self.cfg = cfg
        self.clock = clock
        self.refusals: Counter[str] = Counter()  # by limit: for the metrics
        minute, hour = 60.0, 3600.0
        self._buckets: dict[str, Bucket] = {}
        for name, period in (
            ("start_chat_per_address", minute),
            ("start_chat_per_identity", minute),
            ("messages_per_conversation", minute),
            ("uploads_per_conversation", minute),
            ("uploads_per_address", minute),
            ("upload_bytes_per_conversation", hour),
            ("upload_bytes_per_address", hour),
            ("login_per_address", minute),
            ("login_per_username", minute),
            ("read_marks_per_conversation", minute),
            ("ratings_per_conversation", minute),
        ):
            count = getattr(cfg, name)
            if cfg.enabled and count > 0:
                self._buckets[name] = Bucket(count, period)
        self.login_backoff = Backoff(cfg.login_free_failures, cfg.login_backoff_base, cfg.login_backoff_max)

    @property
    def enabled(self) -> bool:
        return self.cfg.enabled

    def check(self, limit: str, key: str, reason: str, message: str, cost: float = 1.0) -> None:
        """Take from the named limit's bucket for key, or raise RESOURCE_EXHAUSTED with the wait."""
        bucket = self._buckets.get(limit)
        if bucket is None or not key:
            return
        wait = bucket.take(key, cost, self.clock())
        if wait > 0:
            self.refused(limit, reason, message, wait)

    def refused(self, limit: str, reason: str, message: str, wait: float) -> None:
        self.refusals[limit] += 1
        raise ChatError(Kind.RESOURCE_EXHAUSTED, reason, message, retry_after=wait, limit=limit)

    # --- logins -----------------------------------------------------------------

    def before_login(self, username: str, address: str) -> None:
        wait_a_little = "Too many login attempts {}; wait a little."
        self.check("login_per_address", address, "TOO_MANY_LOGINS", wait_a_little.format("from here"))
        self.check("login_per_username", username, "TOO_MANY_LOGINS", wait_a_little.format("for this user"))
        if self.enabled and self.cfg.login_backoff_base > 0:
            wait = self.login_backoff.wait(f"{username}\0{address}", self.clock())
            if wait > 0:
                message = "Several wrong passwords in a row: wait before trying again."
                self.refused("login_backoff", "LOGIN_BACKOFF", message, wait)

    def login_failed(self, username: str, address: str) -> None:
        if self.enabled:
            self.login_backoff.failed(f"{username}\0{address}", self.clock())

    def login_succeeded(self, username: str, address: str) -> None:
        self.login_backoff.succeeded(f"{username}\0{address}")
