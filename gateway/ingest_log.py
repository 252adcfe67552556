"""The durable ingest log: an append-only SQLite table of events, each with a time-ordered id and an offset.

Why SQLite: WAL mode gives one fsync per transaction, so a group commit of a whole batch costs one fsync, and a
torn last write (power cut) is rolled back by SQLite's own recovery on the next open. The log also keeps:

- `progress`: the offset up to which a consumer (the pipeline) has finished with events. It is committed only after
  fan-out was acknowledged by the broker and the metrics outbox accepted the batch, so a restart resumes exactly
  where processing stopped (events after it are processed again: delivery is at least once).
- `deadletters`: bad input, with the reason, written in the same transaction as the good events around it.

Every method here is blocking and must run on one thread (the gateway's storage thread): SQLite serialises writers
anyway, and one thread owning the connection keeps transactions simple and the event loop free during fsync.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from gateway.event import Event, Ingested

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    offset   INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused, even after trimming
    id       TEXT    NOT NULL,
    source   TEXT    NOT NULL,
    kind     TEXT    NOT NULL,
    ts_ms    INTEGER NOT NULL,
    dedup    TEXT,
    payload  TEXT    NOT NULL,
    logged_ms INTEGER NOT NULL
);
-- A retransmission (same source, same dedup key) is recognised and not logged twice.
CREATE UNIQUE INDEX IF NOT EXISTS events_dedup ON events (source, dedup) WHERE dedup IS NOT NULL;
CREATE TABLE IF NOT EXISTS progress (consumer TEXT PRIMARY KEY, offset INTEGER NOT NULL);
-- The models' verdicts, kept from the first time an event was processed: a replay after a crash must deliver and
-- write exactly what it did before (the anomaly model's history starts empty after a restart, and its verdict
-- is part of the InfluxDB series key, so a new verdict would make a second point).
CREATE TABLE IF NOT EXISTS verdicts (offset INTEGER PRIMARY KEY, verdict TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS deadletters (
    n        INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms    INTEGER NOT NULL,
    origin   TEXT    NOT NULL,   -- topic or serial port the input came from
    reason   TEXT    NOT NULL,   -- stable code, e.g. malformed_json
    message  TEXT    NOT NULL,   -- what exactly was wrong
    payload  BLOB    NOT NULL    -- the first bytes of the input, as received
);
"""

_INSERT = ("INSERT OR IGNORE INTO events (id, source, kind, ts_ms, dedup, payload, logged_ms)"
           " VALUES (?, ?, ?, ?, ?, ?, ?)")

SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
DEADLETTER_PAYLOAD_BYTES = 512
DEADLETTER_KEEP = 10_000


@dataclass(frozen=True, slots=True)
class DeadLetter:
    origin: str
    reason: str
    message: str
    payload: bytes
    ts_ms: int

    def as_dict(self) -> dict[str, object]:
        preview = self.payload[:DEADLETTER_PAYLOAD_BYTES]
        return {
            "origin": self.origin,
            "reason": self.reason,
            "message": self.message,
            "ts": self.ts_ms,
            "payload": preview.decode("utf-8", errors="backslashreplace"),
            "payload_bytes": len(self.payload),
        }


@dataclass(frozen=True, slots=True)
class AppendResult:
    events: list[Event]  # the newly logged events, in order
    duplicates: int  # items that were already in the log (retransmissions)


class IngestLog:
    def __init__(self, path: Path, fsync: str = "full") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._sync = SYNC_MODES[fsync]
        self._db.execute(f"PRAGMA synchronous={self._sync}")
        self._db.executescript(SCHEMA)
        # A dead letter stores the payload as received; keep the table from growing without bound.
        self._deadletters_since_trim = 0

    def close(self) -> None:
        self._db.close()

    def append(self, items: Sequence[Ingested], deadletters: Sequence[DeadLetter] = ()) -> AppendResult:
        """Log a batch in one transaction (one fsync). Returns the new events; retransmissions are skipped."""
        now = int(time.time() * 1000)
        events: list[Event] = []
        duplicates = 0
        db = self._db
        # allow_nan=False: the stored text goes into envelopes as it is, and NaN is not JSON. Sources reject
        # non-finite values; one that slipped through fails here and is dead-lettered by the ingestor.
        rows = [(item.id, item.source, item.kind, item.ts_ms, item.dedup_key,
                 json.dumps(item.payload, separators=(",", ":"), allow_nan=False), now) for item in items]
        db.execute("BEGIN IMMEDIATE")
        try:
            # Fast path: one executemany. Within one transaction AUTOINCREMENT hands out consecutive offsets, so
            # when every row went in, the offsets are the last n. A retransmission in the batch (fewer rows went
            # in) sends us to the slow path, which finds out row by row which ones were new.
            before = db.total_changes
            db.executemany(_INSERT, rows)
            inserted = db.total_changes - before
            if inserted == len(rows):
                last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                first = last - inserted + 1
                events = [Event(first + i, item.id, item.source, item.kind, item.ts_ms, item.payload, row[5])
                          for i, (item, row) in enumerate(zip(items, rows))]
            else:
                db.execute("ROLLBACK")
                db.execute("BEGIN IMMEDIATE")
                for item, row in zip(items, rows):
                    found = db.execute(_INSERT + " RETURNING offset", row).fetchone()
                    if found is None:
                        duplicates += 1
                    else:
                        events.append(Event(found[0], item.id, item.source, item.kind, item.ts_ms, item.payload,
                                            row[5]))
            if deadletters:
                db.executemany(
                    "INSERT INTO deadletters (ts_ms, origin, reason, message, payload) VALUES (?, ?, ?, ?, ?)",
                    [(d.ts_ms, d.origin, d.reason, d.message, d.payload[:DEADLETTER_PAYLOAD_BYTES])
                     for d in deadletters],
                )
                self._deadletters_since_trim += len(deadletters)
                if self._deadletters_since_trim >= 1000:
                    db.execute("DELETE FROM deadletters WHERE n <= (SELECT MAX(n) FROM deadletters) - ?",
                               (DEADLETTER_KEEP,))
                    self._deadletters_since_trim = 0
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise
        return AppendResult(events, duplicates)

    def read(self, after: int, limit: int) -> list[Event]:
        rows = self._db.execute(
            "SELECT offset, id, source, kind, ts_ms, payload FROM events WHERE offset > ? ORDER BY offset LIMIT ?",
            (after, limit),
        ).fetchall()
        return [Event(o, i, s, k, t, json.loads(p), p) for o, i, s, k, t, p in rows]

    def committed(self, consumer: str = "pipeline") -> int:
        row = self._db.execute("SELECT offset FROM progress WHERE consumer = ?", (consumer,)).fetchone()
        return int(row[0]) if row else 0

    @property
    def connection(self) -> sqlite3.Connection:
        """For state that must commit atomically with progress (engagement counts); same thread only."""
        return self._db

    def commit(self, offset: int, consumer: str = "pipeline",
               also: Callable[[sqlite3.Connection], None] | None = None) -> None:
        """Move a consumer's progress; `also` writes what must be counted exactly once in the same transaction.

        Not fsynced even with fsync = "full": losing the last progress commits to a power cut only means those
        events are processed again (delivery is at least once anyway), and `also`'s counts roll back with them.
        Everything the progress stands for was made durable before (the outbox fsyncs its own file).
        """
        db = self._db
        if self._sync != "OFF":
            db.execute("PRAGMA synchronous=NORMAL")
        db.execute("BEGIN IMMEDIATE")
        try:
            if also is not None:
                also(db)
            db.execute(
                "INSERT INTO progress (consumer, offset) VALUES (?, ?) ON CONFLICT (consumer)"
                " DO UPDATE SET offset = excluded.offset WHERE excluded.offset > progress.offset",
                (consumer, offset),
            )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise
        finally:
            if self._sync != "OFF":
                db.execute(f"PRAGMA synchronous={self._sync}")

    def last_offset(self) -> int:
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
        return int(row[0]) if row else 0

    def save_verdicts(self, rows: list[tuple[int, str]]) -> None:
        """Keep the verdicts of a batch before it is published (first time only: a replay keeps the old ones).
        Not fsynced: it only has to survive a crash of the process, which it does once written to the WAL."""
        db = self._db
        if self._sync != "OFF":
            db.execute("PRAGMA synchronous=NORMAL")
        try:
            db.execute("BEGIN IMMEDIATE")
            db.executemany("INSERT OR IGNORE INTO verdicts (offset, verdict) VALUES (?, ?)", rows)
            db.execute("COMMIT")
        finally:
            if self._sync != "OFF":
                db.execute(f"PRAGMA synchronous={self._sync}")

    def saved_verdicts(self, first: int, last: int) -> dict[int, str]:
        return dict(self._db.execute("SELECT offset, verdict FROM verdicts WHERE offset BETWEEN ? AND ?",
                                     (first, last)))

    def trim(self, older_than_ms: int, consumer: str = "pipeline") -> int:
        """Delete processed events logged before `older_than_ms`. Unprocessed events are never trimmed."""
        committed = self.committed(consumer)
        cur = self._db.execute("DELETE FROM events WHERE offset <= ? AND logged_ms < ?", (committed, older_than_ms))
        self._db.execute("DELETE FROM verdicts WHERE offset < (SELECT COALESCE(MIN(offset), ?) FROM events)",
                         (committed + 1,))
        return cur.rowcount

    def size_bytes(self) -> int:
        page_count = self._db.execute("PRAGMA page_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        wal = self.path.with_name(self.path.name + "-wal")
        return int(page_count * page_size) + (wal.stat().st_size if wal.exists() else 0)

    def deadletters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute(
            "SELECT ts_ms, origin, reason, message, payload FROM deadletters ORDER BY n DESC LIMIT ?", (limit,)
        ).fetchall()
        return [DeadLetter(o, r, m, bytes(p), t) for t, o, r, m, p in rows]
