"""The durable outbox between the pipeline and InfluxDB: an SQLite file of encoded batches and the thread that
drains it.

    pipeline (DB thread)                    outbox.sqlite (WAL)                  Drainer thread
    encode(points) -> Outbox.put(body) ──▶  batches: id, body, points, bytes ──▶ oldest rows, coalesced
           ▲                                dead:    the last N rejected rows      into one body (<= 5,000
           └── over_budget(): backpressure                                         lines / 1 MiB) -> writer
                                                                                   delete only after success

Delivery is at least once. A row is deleted only after the server accepted it, so a kill -9 at any moment loses
nothing: a batch whose write succeeded but whose DELETE did not commit is sent again after the restart. InfluxDB
stores a point under (measurement, tag set, field, timestamp), so the re-sent copy overwrites the first and the
database ends up as if it had been written once. (victoria-metrics keeps both copies unless it runs with
-dedup.minScrapeInterval.)

Failures are decided by the writer's error type (gateway/sinks/influx.py):
  * retryable: the rows stay; wait a jittered, capped exponential backoff, at least the server's Retry-After;
  * too large (413): send the rows in halves, and a single batch in halves of its lines, down to one line;
  * rejected (400/422): find the bad batch by bisecting, move it to `dead` with the server's reason; the rest go.

The budget is a signal, not a limit: `put` never refuses a batch (that would drop data); the pipeline checks
`over_budget()` and slows its intake while InfluxDB is away, instead of filling the disk.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gateway.sinks.influx import RejectedWriteError, RetryableWriteError, TooLargeError, Writer
from gateway.sinks.lineprotocol import count_lines, split_lines

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    body BLOB NOT NULL,
    points INTEGER NOT NULL,
    bytes INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS dead (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id INTEGER NOT NULL,
    body BLOB NOT NULL,
    points INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    died_ns INTEGER NOT NULL,
    status INTEGER,
    reason TEXT NOT NULL
);
"""

_SYNCHRONOUS = {"full": "FULL", "normal": "NORMAL"}


def _connect(path: Path, synchronous: str) -> sqlite3.Connection:
    # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE), so a writer takes the lock up front
    # instead of upgrading a read lock and failing with "database is locked" against the other connection.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: a put() that returned survives power loss. NORMAL (in WAL mode): survives a process crash, but the
    # last commits can roll back on power loss; fewer fsyncs for a flash card that wears.
    conn.execute(f"PRAGMA synchronous={_SYNCHRONOUS[synchronous]}")
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


@dataclass(frozen=True, slots=True)
class DeadBatch:
    id: int
    batch_id: int
    body: bytes
    points: int
    status: int | None
    reason: str
    died_ns: int


class Outbox:
    """The producer's side: append batches, know the backlog. Thread-safe (one lock around one connection)."""

    def __init__(self, path: Path, max_bytes: int, synchronous: str = "full") -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"outbox synchronous must be 'full' or 'normal', got {synchronous!r}")
        if max_bytes <= 0:
            raise ValueError(f"outbox max_bytes must be positive, got {max_bytes!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.synchronous = synchronous
        self._lock = threading.Lock()
        self._conn = _connect(self.path, synchronous)
        self._conn.executescript(_SCHEMA)
        # The backlog is counted in memory (over_budget() is on the hot path), seeded from the file so a restart
        # knows what is still waiting; the drainer reports what it removes.
        rows, points, nbytes = self._conn.execute(
            "SELECT count(*), coalesce(sum(points), 0), coalesce(sum(bytes), 0) FROM batches").fetchone()
        self._rows, self._points, self._bytes = int(rows), int(points), int(nbytes)
        # Set on every put so an idle drainer starts at once instead of at its next poll.
        self.wakeup = threading.Event()

    def put(self, body: bytes, points: int) -> None:
        """Append one batch (many points) in one transaction. Never refuses: see over_budget()."""
        if not body:
            return
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.execute("INSERT INTO batches (body, points, bytes, created_ns) VALUES (?, ?, ?, ?)",
                                   (body, points, len(body), time.time_ns()))
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._conn.execute("ROLLBACK")
                raise
            self._rows += 1
            self._points += points
            self._bytes += len(body)
        self.wakeup.set()

    def over_budget(self) -> bool:
        return self._bytes >= self.max_bytes

    def backlog(self) -> tuple[int, int, int]:
        """(rows, points, bytes) waiting to be written."""
        with self._lock:
            return self._rows, self._points, self._bytes

    def dead(self, limit: int = 100) -> list[DeadBatch]:
        """The most recent dead-lettered batches, newest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id, batch_id, body, points, status, reason, died_ns FROM dead ORDER BY id DESC LIMIT ?",
                (limit,)).fetchall()
        return [DeadBatch(int(r[0]), int(r[1]), bytes(r[2]), int(r[3]), r[4], str(r[5]), int(r[6])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _removed(self, rows: int, points: int, nbytes: int) -> None:
        with self._lock:
            self._rows -= rows
            self._points -= points
            self._bytes -= nbytes


@dataclass(frozen=True, slots=True)
class _Row:
    id: int
    body: bytes
    points: int
    created_ns: int


@dataclass(frozen=True, slots=True)
class DrainStats:
    """A snapshot for the gateway's self-metrics. Counts are since the drainer started."""

    written_points: int      # points in batches the server accepted
    written_rows: int        # outbox rows delivered
    requests: int            # successful HTTP writes (a coalesced body is one)
    retried: int             # retryable failures (each followed by a backoff)
    splits: int              # bodies cut in half after a 413
    dead_rows: int           # rows moved to the dead letters
    dead_points: int
    last_error: str | None
    last_error_ns: int | None
    backoff_s: float         # the wait in force now (0 when healthy)
    backlog_rows: int
    backlog_points: int
    backlog_bytes: int


class _Stopping(Exception):
    """Raised inside a delivery to leave the remaining rows for the next start."""


class Drainer:
    """The thread that empties the outbox into a Writer. Owns its own connection to the outbox file."""

    def __init__(self, outbox: Outbox, writer: Writer, *, max_lines: int = 5000, max_body_bytes: int = 1 << 20,
                 dead_keep: int = 1000, backoff_initial: float = 0.5, backoff_max: float = 60.0,
                 idle_poll: float = 1.0, flush_interval: float = 0.0, name: str = "outbox-drainer") -> None:
        self.outbox = outbox
        self.writer = writer
        self.max_lines = max_lines
        self.max_body_bytes = max_body_bytes
        self.dead_keep = dead_keep
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.idle_poll = idle_poll
        # Once the backlog is written, wait this long before the next request, so points travel in batches: at a
        # steady 2,000 events/s the pipeline commits a few hundred times a second, and one request per commit
        # cost InfluxDB and the gateway more than the writes themselves (p50 latency 11.4 -> 7.7 ms at 0.2 s).
        self.flush_interval = flush_interval
        self._hurry = threading.Event()  # flush() or stop(): no more pauses
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._conn: sqlite3.Connection | None = None
        self._stats_lock = threading.Lock()
        self._written_points = self._written_rows = self._requests = 0
        self._retried = self._splits = self._dead_rows = self._dead_points = 0
        self._last_error: str | None = None
        self._last_error_ns: int | None = None
        self._backoff = 0.0
        self._failures = 0  # consecutive retryable failures: the backoff exponent

    # --- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def flush(self, timeout: float) -> bool:
        """Write what the outbox holds without the pauses between requests. True when it is empty within
        `timeout`; False at once while writes are failing (the outbox keeps the points for later)."""
        self._hurry.set()
        self.outbox.wakeup.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.outbox.backlog()[0] == 0:
                return True
            with self._stats_lock:
                if self._failures:
                    return False
            time.sleep(0.02)
        return self.outbox.backlog()[0] == 0

    def stop(self, timeout: float | None = None) -> bool:
        """Finish the write in flight, then stop. True when the thread ended within `timeout`."""
        self._hurry.set()
        self._stop.set()
        self.outbox.wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def stats(self) -> DrainStats:
        rows, points, nbytes = self.outbox.backlog()
        with self._stats_lock:
            return DrainStats(self._written_points, self._written_rows, self._requests, self._retried,
                              self._splits, self._dead_rows, self._dead_points, self._last_error,
                              self._last_error_ns, self._backoff, rows, points, nbytes)

    # --- the loop ----------------------------------------------------------------------------------------------

    def _run(self) -> None:
        self._conn = _connect(self.outbox.path, self.outbox.synchronous)
        try:
            while not self._stop.is_set():
                # Clear before looking, so a put() that lands between the look and the wait is not missed.
                self.outbox.wakeup.clear()
                try:
                    rows, more = self._take()
                    if not rows:
                        self.outbox.wakeup.wait(self.idle_poll)
                        continue
                    started = time.monotonic()
                    self._deliver(rows)
                    self._healthy()
                    if self.flush_interval and not more:
                        # That was the whole backlog: let the next points gather before the next request.
                        self._hurry.wait(self.flush_interval - (time.monotonic() - started))
                except _Stopping:
                    break
                except RetryableWriteError as exc:
                    self._back_off(str(exc), exc.retry_after)
                except sqlite3.Error as exc:
                    log.error("outbox database error: %s", exc)
                    self._back_off(f"outbox database error: {exc}", None)
                except Exception as exc:  # a bug in a writer must not end the thread that keeps the data moving
                    log.exception("unexpected error while draining the outbox")
                    self._back_off(f"unexpected {type(exc).__name__}: {exc}", None)
        finally:
            self._conn.close()

    def _take(self) -> tuple[list[_Row], bool]:
        """The oldest rows that fit in one request (always at least one, however large), and whether rows were
        left because one request could not hold them."""
        assert self._conn is not None
        picked: list[tuple[int, int]] = []
        lines = nbytes = 0
        more = False
        # One row more than a request can hold, to know whether rows are left.
        for row_id, points, size in self._conn.execute(
                "SELECT id, points, bytes FROM batches ORDER BY id LIMIT ?", (max(1, self.max_lines) + 1,)):
            if picked and (lines + points > self.max_lines or nbytes + size > self.max_body_bytes):
                more = True
                break
            picked.append((row_id, points))
            lines += points
            nbytes += size
        if not picked:
            return [], False
        ids = [row_id for row_id, _ in picked]
        marks = ",".join("?" * len(ids))
        got = {r[0]: r for r in self._conn.execute(
            f"SELECT id, body, points, created_ns FROM batches WHERE id IN ({marks})", ids)}
        return [_Row(int(got[i][0]), bytes(got[i][1]), int(got[i][2]), int(got[i][3])) for i in ids if i in got], more

    def _deliver(self, rows: Sequence[_Row]) -> None:
        """Write rows, splitting on 413 and bisecting on rejection; RetryableWriteError leaves what is left."""
        if self._stop.is_set():
            # Checked before each request, so stop() waits for the write in flight and no more.
            raise _Stopping
        if len(rows) == 1:
            reason = self._write_single(rows[0].body)
            if reason is None:
                self._done(rows)
            else:
                self._bury(rows[0], *reason)
            return
        try:
            self.writer.write(b"".join(r.body for r in rows))
        except (TooLargeError, RejectedWriteError) as exc:
            # Either way smaller requests tell us more: a 413 goes away, a rejection is narrowed to its batch.
            if isinstance(exc, TooLargeError):
                self._count(splits=1)
            half = len(rows) // 2
            self._deliver(rows[:half])
            self._deliver(rows[half:])
            return
        self._count(requests=1)
        self._done(rows)

    def _write_single(self, body: bytes) -> tuple[int | None, str] | None:
        """Write one row's body, halving it by lines on 413. None when all of it was stored, else why not."""
        try:
            self.writer.write(body)
        except TooLargeError as exc:
            if count_lines(body) <= 1:
                return exc.status, f"a single line is too large for the server: {exc}"
            self._count(splits=1)
            first, second = split_lines(body)
            why_first = self._write_single(first)
            if self._stop.is_set():
                raise _Stopping from None
            why_second = self._write_single(second)
            # If one half went in and the other was rejected, the whole row goes to the dead letters anyway; the
            # stored half is overwritten harmlessly if an operator replays it.
            return why_first or why_second
        except RejectedWriteError as exc:
            return exc.status, str(exc)
        self._count(requests=1)
        return None

    # --- bookkeeping -------------------------------------------------------------------------------------------

    def _done(self, rows: Sequence[_Row]) -> None:
        assert self._conn is not None
        ids = [r.id for r in rows]
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(f"DELETE FROM batches WHERE id IN ({','.join('?' * len(ids))})", ids)
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (disk full)
                self._conn.execute("ROLLBACK")
            raise
        points = sum(r.points for r in rows)
        self.outbox._removed(len(rows), points, sum(len(r.body) for r in rows))
        self._count(written_rows=len(rows), written_points=points)

    def _bury(self, row: _Row, status: int | None, reason: str) -> None:
        assert self._conn is not None
        log.warning("outbox batch %d (%d points) dead-lettered: %s", row.id, row.points, reason)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(
                "INSERT INTO dead (batch_id, body, points, created_ns, died_ns, status, reason)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (row.id, row.body, row.points, row.created_ns, time.time_ns(), status, reason))
            self._conn.execute("DELETE FROM batches WHERE id = ?", (row.id,))
            # Bounded: the dead letters are for looking at, not a second backlog.
            self._conn.execute("DELETE FROM dead WHERE id <= (SELECT max(id) FROM dead) - ?", (self.dead_keep,))
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:  # SQLite may have rolled back already (disk full)
                self._conn.execute("ROLLBACK")
            raise
        self.outbox._removed(1, row.points, len(row.body))
        with self._stats_lock:
            self._dead_rows += 1
            self._dead_points += row.points
            self._last_error = reason
            self._last_error_ns = time.time_ns()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, n in deltas.items():
                setattr(self, f"_{name}", getattr(self, f"_{name}") + n)

    def _healthy(self) -> None:
        with self._stats_lock:
            self._failures = 0
            self._backoff = 0.0

    def next_backoff(self, failures: int, retry_after: float | None) -> float:
        """Full-jitter exponential backoff, capped, never shorter than what the server asked for."""
        ceiling = min(self.backoff_max, self.backoff_initial * 2 ** min(failures - 1, 30))
        # Half fixed, half random: spreads gateways that lost the same server apart without ever retrying at once.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        return max(delay, retry_after or 0.0)

    def _back_off(self, error: str, retry_after: float | None) -> None:
        with self._stats_lock:
            self._failures += 1
            self._retried += 1
            self._last_error = error
            self._last_error_ns = time.time_ns()
            self._backoff = self.next_backoff(self._failures, retry_after)
            delay = self._backoff
        log.warning("outbox write failed, retrying in %.2fs: %s", delay, error)
        # Only stop() cuts a backoff short; new rows do not (they would hammer a server that asked us to wait).
        self._stop.wait(delay)
