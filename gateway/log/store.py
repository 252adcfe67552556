"""The log's file: one SQLite database, `log.db`, the gateway's one durable store.

    events       every accepted input, once, with its verdict: offset, id, source, kind, time, payload, verdict
    progress     per consumer (feeds, influx, ...), the offset up to which its outputs are done
    deadletters  rejected input with the reason, kept for operators (the newest DEADLETTER_KEEP)
    meta         `offset_floor`: offsets up to here were given out, so none is reused after the log was emptied
    + the tables of stages whose state must commit atomically with the events or with a consumer's progress
      (gateway/fanout/engagement.py)

Why SQLite and how it is written (the numbers are in benchmarks/RESULTS.md):

- WAL mode: a commit appends the changed pages to `log.db-wal` and fsyncs it once; a torn last write (power cut)
  fails the WAL frame checksum and is rolled back on the next open.
- A batch is one transaction: one fsync for the events, the dead letters and whatever consumer progress is due.
- 1 KiB pages. A commit rewrites every page it touched in full, so the page is what a commit of one small event costs
  the disk: 1 KiB pages write a fifth of the bytes 4 KiB ones do per commit (measured 5.6 KB against 8.6 KB per
  single-event commit, counting the kernel's 4 KiB page writes), and an SD card wears by what it is written.
- No secondary index: each index is one more page per commit (an index on (source, dedup) made a one-event commit
  cost 14 KB). Retransmissions are recognised in memory (gateway/log/dedup.py), rebuilt from the log's tail at start.
- Offsets are assigned by the appender (INTEGER PRIMARY KEY, no AUTOINCREMENT, whose counter table is one more page
  per commit); `meta` keeps them from going back when everything was trimmed.

Every method is blocking. One thread owns a `LogStore` (the writer); readers open their own `LogStore` connection
(`reader=True`), which WAL lets run beside the writer. Tools beside a running daemon (`gateway replay`) use
`open_read_only` and `scan`, which cannot write at all.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import orjson

from gateway.event import DEADLETTER_PAYLOAD_BYTES, DeadLetter, Event, InTransaction, Verdict

SCHEMA_VERSION = 2  # PRAGMA user_version; 0 is the layout before it (events + verdicts, AUTOINCREMENT)
PAGE_SIZE = 1024

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    offset    INTEGER PRIMARY KEY,  -- assigned by the appender, never reused
    id        TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    ts_ms     INTEGER NOT NULL,
    dedup     TEXT,                 -- what recognises a retransmission (see gateway/log/dedup.py)
    payload   BLOB    NOT NULL,     -- compact JSON, as followers receive it
    verdict   BLOB,                 -- the filter's verdict as JSON, NULL when no model looked at it
    logged_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS progress (consumer TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS deadletters (
    n        INTEGER PRIMARY KEY,
    ts_ms    INTEGER NOT NULL,
    origin   TEXT    NOT NULL,   -- topic or serial port the input came from
    reason   TEXT    NOT NULL,   -- stable code, e.g. malformed_json
    message  TEXT    NOT NULL,   -- what exactly was wrong
    payload  BLOB    NOT NULL    -- the first bytes of the input, as received
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""

_INSERT = "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
_SET_PROGRESS = ("INSERT INTO progress (consumer, offset) VALUES (?, ?) ON CONFLICT (consumer)"
                 " DO UPDATE SET offset = excluded.offset WHERE excluded.offset > progress.offset")

SYNC_MODES = {"full": "FULL", "normal": "NORMAL", "off": "OFF"}
# After a checkpoint SQLite reuses the WAL from its start but keeps the file's size; this caps what it keeps, so the
# WAL (which the disk budget counts) does not stay at the largest it ever was.
WAL_KEEP_BYTES = 1 << 20
# SQLite's page cache, per connection (its default is 2,000 KiB). Appends touch the few pages at the end of the
# table, and a consumer that has fallen behind reads each page once, from the OS's cache (no slower: see
# benchmarks/RESULTS.md); a cache of the default size only fills with pages already written, in peak memory.
CACHE_KIB = 256
DEADLETTER_KEEP = 10_000

class SchemaError(Exception):
    """The file was written by a newer gateway, or is not a log at all."""


class LogStore:
    def __init__(self, path: Path, fsync: str = "full", *, reader: bool = False) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not path.exists()
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per batch.
        # A short busy timeout: a writer that cannot get the lock (another process holds it) raises, and the
        # appender retries with backoff, instead of holding the log's thread for long.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=1.0)
        db = self._db
        if fresh and not reader:
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only takes effect before the first table exists
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={SYNC_MODES[fsync]}")
        db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        if reader:
            return
        db.execute(f"PRAGMA journal_size_limit={WAL_KEEP_BYTES}")
        version = _schema_version(db, path)
        if version == 0 and _has_table(db, "verdicts"):
            from gateway.log.migrate import from_v1

            from_v1(db)
            # The old file has 4 KiB pages; rewrite it with the log's own (only VACUUM can, outside WAL mode).
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute(f"PRAGMA page_size={PAGE_SIZE}")
            db.execute("VACUUM")
            db.execute("PRAGMA journal_mode=WAL")
        db.executescript(SCHEMA)
        if version != SCHEMA_VERSION:
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._deadletters_since_trim = 0

    @property
    def connection(self) -> sqlite3.Connection:
        """For stages whose state lives in this file; same thread only."""
        return self._db

    def close(self) -> None:
        self._db.close()

    # --- the writer ------------------------------------------------------------------------------------------------

    def append(self, events: Sequence[Event], dedups: Sequence[str | None] = (),
               deadletters: Sequence[DeadLetter] = (),
               progress: Mapping[str, int] | None = None,
               in_transaction: Sequence[InTransaction] = ()) -> list[object]:
        """Store a batch in one transaction: one fsync. `dedups` are the events' retransmission keys, in order.
        Also in it: consumers' `progress` that is due, and the
        `in_transaction` callables (state that must commit exactly with these events). Returns what each of those
        returned. Rolls back entirely on any error."""
        db = self._db
        now = int(time.time() * 1000)
        db.execute("BEGIN IMMEDIATE")
        try:
            if events:
                db.executemany(_INSERT, [(e.offset, e.id, e.source, e.kind, e.ts_ms, d, e.body,
                                          e.verdict_json or None, now) for e, d in zip(events, dedups)])
            if deadletters:
                self._store_deadletters(deadletters)
            results = [fn(db) for fn in in_transaction]
            if progress:
                db.executemany(_SET_PROGRESS, progress.items())
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back already (disk full)
                db.execute("ROLLBACK")
            raise
        return results

    def commit_progress(self, progress: Mapping[str, int], in_transaction: Sequence[InTransaction] = ()) -> None:
        """Consumers' progress (and the state that moves with it) when no append is due to carry it."""
        self.append((), (), (), progress, in_transaction)

    def _store_deadletters(self, letters: Sequence[DeadLetter]) -> None:
        db = self._db
        db.executemany("INSERT INTO deadletters (ts_ms, origin, reason, message, payload) VALUES (?, ?, ?, ?, ?)",
                       [(d.ts_ms, d.origin, d.reason, d.message, d.payload[:DEADLETTER_PAYLOAD_BYTES])
                        for d in letters])
        self._deadletters_since_trim += len(letters)
        if self._deadletters_since_trim >= 1000:
            db.execute("DELETE FROM deadletters WHERE n <= (SELECT MAX(n) FROM deadletters) - ?", (DEADLETTER_KEEP,))
            self._deadletters_since_trim = 0

    def trim(self, upto: int, older_than_ms: int | None = None, limit: int = 50_000, shrink: bool = False) -> int:
        """Delete events up to offset `upto` (what every consumer is done with), only those logged before
        `older_than_ms` when given. At most `limit` rows per call, so a large trim does not hold the writer long.
        `shrink`: then checkpoint and truncate the WAL, so the space shows at once (over the disk budget). Returns
        how many went."""
        db = self._db
        cond, args = "offset <= ?", [upto]
        if older_than_ms is not None:
            cond += " AND logged_ms < ?"
            args.append(older_than_ms)
        db.execute("BEGIN IMMEDIATE")
        try:
            last = db.execute(f"SELECT MAX(offset) FROM (SELECT offset FROM events WHERE {cond} ORDER BY offset "
                              "LIMIT ?)", (*args, limit)).fetchone()[0]
            if last is None:
                db.execute("ROLLBACK")
                if shrink:
                    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                return 0
            gone = db.execute("DELETE FROM events WHERE offset <= ?", (last,)).rowcount
            db.execute("INSERT INTO meta (key, value) VALUES ('offset_floor', ?) ON CONFLICT (key)"
                       " DO UPDATE SET value = MAX(value, excluded.value)", (last,))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        if shrink:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return int(gone)

    # --- reading (any connection) ----------------------------------------------------------------------------------

    def read(self, after: int, limit: int, upto: int | None = None) -> list[Event]:
        """Events after offset `after`, in order, at most `limit` (and none beyond `upto`)."""
        if upto is None:
            rows = self._db.execute("SELECT offset, id, source, kind, ts_ms, payload, verdict FROM events"
                                    " WHERE offset > ? ORDER BY offset LIMIT ?", (after, limit)).fetchall()
        else:
            rows = self._db.execute("SELECT offset, id, source, kind, ts_ms, payload, verdict FROM events"
                                    " WHERE offset > ? AND offset <= ? ORDER BY offset LIMIT ?",
                                    (after, upto, limit)).fetchall()
        return [Event(o, i, s, k, t, orjson.loads(p), p, None if v is None else Verdict.from_json(v), v or b"")
                for o, i, s, k, t, p, v in rows]

    def tail_keys(self, limit: int) -> list[tuple[str, str]]:
        """(source, dedup) of the newest `limit` events that have a dedup key, oldest first."""
        rows = self._db.execute("SELECT source, dedup FROM events WHERE dedup IS NOT NULL ORDER BY offset DESC"
                                " LIMIT ?", (limit,)).fetchall()
        rows.reverse()
        return rows

    def progress(self) -> dict[str, int]:
        return {c: int(o) for c, o in self._db.execute("SELECT consumer, offset FROM progress")}

    def last_offset(self) -> int:
        """The highest offset ever given out: the last event, or what was trimmed, or what a consumer reached."""
        row = self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(offset) FROM events), 0),"
            " COALESCE((SELECT value FROM meta WHERE key = 'offset_floor'), 0),"
            " COALESCE((SELECT MAX(offset) FROM progress), 0))").fetchone()
        return int(row[0])

    def meta(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def first_offset(self) -> int | None:
        row = self._db.execute("SELECT MIN(offset) FROM events").fetchone()
        return None if row[0] is None else int(row[0])

    def size_bytes(self) -> int:
        """The pages in use: what the disk budget counts. Free pages are reused before the file grows, so they are
        room, not use; the WAL is not counted either: it is kept near WAL_KEEP_BYTES, and counting it made the
        budget flap (a checkpoint empties it, and acknowledgements would start and stop with it)."""
        page_count = self._db.execute("PRAGMA page_count").fetchone()[0]
        page_size = self._db.execute("PRAGMA page_size").fetchone()[0]
        free = self._db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((page_count - free) * page_size)

    def deadletters(self, limit: int = 100) -> list[DeadLetter]:
        rows = self._db.execute(
            "SELECT ts_ms, origin, reason, message, payload FROM deadletters ORDER BY n DESC LIMIT ?", (limit,)
        ).fetchall()
        return [DeadLetter(o, r, m, bytes(p), t) for t, o, r, m, p in rows]

    def run(self, fn: Callable[[sqlite3.Connection], object]) -> object:
        """Run a read-only query function on this connection (for stages that keep state in this file)."""
        return fn(self._db)


def _schema_version(db: sqlite3.Connection, path: Path) -> int:
    """The file's schema version; SchemaError when a newer gateway wrote it (its layout is not ours to read)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise SchemaError(f"{path} was written by a newer gateway (schema {version}, this one knows "
                          f"{SCHEMA_VERSION}); upgrade the gateway or restore a backup")
    return version


def _has_table(db: sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


# --- read-only access, for tools run beside the daemon ----------------------------------------------------------------


def open_read_only(path: Path) -> sqlite3.Connection:
    """A connection to the log at `path` that cannot write (SQLite `mode=ro`), for tools that must not disturb a
    running daemon. FileNotFoundError when there is no log, PermissionError when opening it would lock the daemon
    out (below), SchemaError when the file is not a log this gateway can read."""
    if not path.is_file():
        raise FileNotFoundError(f"no log at {path}")
    # Even a read-only connection creates the WAL's side files (-wal, -shm) when no writer has them open, and leaves
    # them; created by another user (root, typically) they would keep the daemon from writing its own log.
    side_files = all(Path(f"{path}{suffix}").exists() for suffix in ("-wal", "-shm"))
    if not side_files and path.stat().st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {path.stat().st_uid}: run this as that user (sudo -u ...), so "
                              "the files SQLite creates beside the log belong to the daemon")
    # A short busy timeout: a WAL reader waits only in rare moments (a writer recovering the WAL), never for long.
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                         check_same_thread=False, timeout=5.0)
    try:
        version = _schema_version(db, path)
        if version == 0 and _has_table(db, "verdicts"):
            raise SchemaError(f"{path} has the layout of an earlier gateway; start the gateway once to convert it")
        if not _has_table(db, "events"):
            raise SchemaError(f"{path} is not a gateway log (no events table)")
    except sqlite3.DatabaseError as exc:
        db.close()
        raise SchemaError(f"{path} is not a gateway log ({exc})") from None
    except SchemaError:
        db.close()
        raise
    return db


def offset_span(db: sqlite3.Connection) -> tuple[int, int] | None:
    """The first and last offsets of the events in the log, None when it holds none."""
    first, last = db.execute("SELECT MIN(offset), MAX(offset) FROM events").fetchone()
    return None if first is None else (int(first), int(last))


def scan(db: sqlite3.Connection, kind: str, after: int, upto: int,
         since_ms: int | None = None) -> list[tuple[int, str, int, bytes, bytes | None]]:
    """(offset, source, ts_ms, payload, verdict JSON) of the events of `kind` with offsets in (after, upto], in order,
    only those with `ts_ms >= since_ms` when given. A caller reading a whole log keeps the span small: each call is
    one read transaction, and the writer's checkpoints cannot move past a reader's snapshot while it lasts."""
    sql = "SELECT offset, source, ts_ms, payload, verdict FROM events WHERE offset > ? AND offset <= ? AND kind = ?"
    args: list[object] = [after, upto, kind]
    if since_ms is not None:
        sql += " AND ts_ms >= ?"
        args.append(since_ms)
    return db.execute(sql + " ORDER BY offset", args).fetchall()
