"""CPython's garbage collector, set for a server that holds thousands of long-lived streams.

A full collection stops the whole process (it holds the GIL) for time that grows with every object the
heap tracks, garbage or not. With 2,000 open streams a node's full passes took 60-190 ms on the bench
machine, and every call in flight waited them out: cross-node messages had p50 6 ms and p99 300-500 ms,
the tail made of those pauses. So, once the server is up:

- `gc.freeze()` moves what start-up built (modules, the grpc server, configuration, caches filled by the
  first calls) to the permanent generation, out of every later pass;
- the young generation is larger (`gc.set_threshold(YOUNG, ...)`, Python's default is 700): a call's
  objects that live across an await (a write waits some milliseconds for the writer thread) die before
  a young collection sees them, instead of being promoted and swelling the old generation, whose
  growth is what triggers full passes.

`QUEUECHAT_GC=default` keeps Python's settings (to compare); `QUEUECHAT_GC=YOUNG[,MIDDLE[,OLD]]` other
thresholds. Every pause of 1 ms or more is counted by
generation for the metric `queuechat_gc_pause_seconds` (docs/operations.md).
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

# Measured in the cross-node benchmark (message p99, four runs each): 2,000: 28-37 ms; 5,000: 19-25 ms;
# 20,000: 22-28 ms (young passes over more garbage at once: pauses of 20-28 ms).
YOUNG = 5_000
MIDDLE = 20
OLD = 20

# Pauses shorter than this are not counted (young collections take some microseconds).
MIN_PAUSE = 0.001
# Upper bounds (seconds) of the pause histogram's buckets, +Inf after them.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Pauses:
    """Collections that paused the process 1 ms or more, by generation: counts per bucket and seconds."""

    def __init__(self) -> None:
        # Per generation: counts per bucket (not cumulative; the last is +Inf) and the seconds they took.
        self.buckets: dict[int, list[int]] = {g: [0] * (len(BUCKETS) + 1) for g in range(3)}
        self.seconds: dict[int, float] = dict.fromkeys(range(3), 0.0)
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        if took < MIN_PAUSE:
            return
        gen = info["generation"]
        self.seconds[gen] += took
        i = 0
        while i < len(BUCKETS) and took > BUCKETS[i]:
            i += 1
        self.buckets[gen][i] += 1


PAUSES = Pauses()
_tuned = False


def watch() -> None:
    """Count the collector's pauses from now on (once per process)."""
    if PAUSES not in gc.callbacks:
        gc.callbacks.append(PAUSES)


def tune() -> bool:
    """Freeze the heap as it is now and enlarge the young generation (once per process; later calls only
    freeze what was built since). False when QUEUECHAT_GC=default asks for Python's own settings;
    QUEUECHAT_GC=YOUNG[,MIDDLE[,OLD]] sets other thresholds (a bad value: these defaults)."""
    global _tuned
    watch()
    setting = os.environ.get("QUEUECHAT_GC", "").strip().lower()
    if setting == "default":
        return False
    gc.collect()  # what start-up left as garbage goes now, not frozen for ever
    gc.freeze()
    if not _tuned:
        gc.set_threshold(*thresholds(setting))
        _tuned = True
    return True


def thresholds(setting: str) -> tuple[int, int, int]:
    chosen = [YOUNG, MIDDLE, OLD]
    try:
        given = [int(part) for part in setting.split(",")] if setting else []
    except ValueError:
        given = []
    if not 1 <= len(given) <= 3 or min(given) < 1:
        given = []
    chosen[: len(given)] = given
    return chosen[0], chosen[1], chosen[2]
