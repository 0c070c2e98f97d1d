"""SQLite's WAL checkpoints on a thread of their own.

Left to itself SQLite checkpoints inside the COMMIT that takes the WAL past 1,000 pages: the writer
thread then copies the WAL into the database file and syncs it. Measured on the arrival cycle
(bench/cycle.py), that was 1 % of commits at 10-15 ms each, a third of all commit time, while every
write queued behind it waited. So connections here never checkpoint on commit
(`PRAGMA wal_autocheckpoint=0`, set in `make_engine`) and this thread runs a PASSIVE checkpoint, which
neither blocks nor waits for the writer or readers, every `interval` seconds, or sooner once the writer
has committed `every` transactions since the last one. SQLite does its work without the GIL.

A PASSIVE checkpoint copies what no reader still needs; the next write after a complete one starts the
WAL from its beginning again, as it did with automatic checkpoints, so the WAL stays about as large
as `every` commits.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(slots=True)
class CheckpointStats:
    runs: int = 0
    seconds: float = 0.0
    failures: int = 0
    # From the last run: pages in the WAL, and how many of them are now in the database file.
    wal_pages: int = 0
    copied_pages: int = 0


class Checkpointer:
    def __init__(self, path: str, *, interval: float = 1.0, every: int = 500):
        self.path = path
        self.interval = interval
        self.every = every
        self.stats = CheckpointStats()
        self._commits = 0  # since the last run; counted by the writer thread only
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

    def run_once(self) -> None:
        """Checkpoint now, on the caller's thread (tests, shutdown)."""
        with self._connect() as conn:
            self._checkpoint(conn)
        conn.close()

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        t0 = time.perf_counter()
        try:
            busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            self.stats.failures += 1
            log.warning("WAL checkpoint failed; trying again later", exc_info=True)
            return
        st = self.stats
        st.runs += 1
        st.seconds += time.perf_counter() - t0
        # -1, -1 when the database is not in WAL mode (nothing to do).
        st.wal_pages, st.copied_pages = max(0, wal_pages), max(0, copied)

    def _loop(self) -> None:
        conn = self._connect()
        try:
            while not self._stopping:
                self._wake.wait(self.interval)
                self._wake.clear()
                if self._stopping:
                    break
                self._checkpoint(conn)
        finally:
            conn.close()

    def close(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()
