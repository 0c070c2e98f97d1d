"""SQLite's WAL checkpoints on a thread of their own.

Left to itself SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages: the writer
thread then copies the WAL into the database file and syncs it. Measured on the arrival cycle
(bench/cycle.py), that was 1 % of commits at 10-15 ms each, a third of all commit time, while every
write queued behind it waited. So connections here never checkpoint on commit
(`PRAGMA wal_autocheckpoint=0`, set in `make_engine`) and this thread does it, every `interval` seconds,
or sooner once the writer has committed `every` transactions, in two steps:

1. PASSIVE checkpoints while the writer goes on: each copies what the WAL held when it began, and
   neither blocks nor waits for the writer or readers. A pass that took long is followed by another,
   up to four, so that little is left.
2. The tail, with the writer held off (`writer_lock`, which the writer holds around each transaction):
   the pages committed during step 1. Only a checkpoint that has copied every page lets the next write
   start the WAL file over from its beginning; without this step the writer always commits during the
   checkpoint and the file grows without end (measured: 188 MB in 15 s at 700 commits/s).

bench/cycle.py at about 250 chats/s (some 10,000 WAL pages between runs): the first pass 14-146 ms,
the tail 1.3-4.6 ms, mostly its two syncs; a tail after one pass only was 8-12 ms.

SQLite does its work without the GIL.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CheckpointStats:
    runs: int = 0
    seconds: float = 0.0
    # Seconds the tails held the writer off.
    tail_seconds: float = 0.0
    failures: int = 0
    # From the last run's tail: pages in the WAL, and how many of them are now in the database file
    # (fewer when a reader still needed the older pages: the WAL then grows until a later run).
    wal_pages: int = 0
    copied_pages: int = 0


class Checkpointer:
    def __init__(self, path: str, writer_lock: threading.Lock, *, interval: float = 1.0, every: int = 500):
        self.path = path
        self.wal_path = Path(path + "-wal")
        self.writer_lock = writer_lock
        self.interval = interval
        self.every = every
        self.stats = CheckpointStats()
        self._commits = 0  # touched by the writer thread only
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="db-checkpoint", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """Called by the writer after each commit (cheap: a counter, and an Event set now and then)."""
        self._commits += 1
        if self._commits >= self.every:
            self._commits = 0
            self._wake.set()

    def wal_bytes(self) -> int:
        """The WAL file's size: what a backlog of uncopied pages would show as."""
        try:
            return self.wal_path.stat().st_size
        except OSError:
            return 0

    def run_once(self) -> None:
        """Checkpoint now, on the caller's thread (tests)."""
        conn = self._connect()
        try:
            self._checkpoint(conn)
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        t0 = time.perf_counter()
        try:
            # Again while the last pass was long: what came in during it is then all the tail has to copy.
            for _ in range(4):
                t = time.perf_counter()
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                if time.perf_counter() - t < 0.003:
                    break
            t1 = time.perf_counter()
            with self.writer_lock:
                busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            t2 = time.perf_counter()
        except sqlite3.Error:
            self.stats.failures += 1
            log.warning("WAL checkpoint failed; trying again later", exc_info=True)
            return
        st = self.stats
        st.runs += 1
        st.seconds += t2 - t0
        st.tail_seconds += t2 - t1
        if not busy and wal_pages >= 0:  # (busy: another checkpoint ran; -1: not in WAL mode)
            st.wal_pages, st.copied_pages = wal_pages, copied

    def _loop(self) -> None:
        conn: sqlite3.Connection | None = None
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopping:
                break
            try:
                conn = conn or self._connect()
                self._checkpoint(conn)
            except Exception:  # a connection that failed to open: next turn (nothing else checkpoints)
                self.stats.failures += 1
                log.warning("WAL checkpoint could not run; trying again later", exc_info=True)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
