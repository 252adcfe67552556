"""Opening a log written by an earlier gateway: the layout before schema version 2, converted in place.

Before version 2 (PRAGMA user_version 0) the file held `events` (offsets from AUTOINCREMENT, the payload as text, a
unique index on (source, dedup)), the verdicts in a table of their own, one `progress` row for the pipeline, and the
engagement's own offset; InfluxDB points waited in a second file, `outbox.db`. The conversion, in one transaction:

- events keep their offsets, ids and payloads; each takes its verdict into its row; the file is then rewritten with
  the log's page size (VACUUM, by the store);
- every consumer starts where the pipeline was: feeds and live counts at its offset. InfluxDB starts at the oldest
  event still in the log, so every retained reading is written again: the points are identical (same series, same
  timestamp), so InfluxDB overwrites them, and whatever the outbox had not written yet is written. The outbox's own
  file is left for the runtime to drain (`legacy_outbox`), for the points of events no longer in the log;
- posts and interactions the old pipeline had not applied yet (after the engagement's offset) are reported through
  `engagement_after`, for the runtime to apply once the follower graph is open.

Idempotent only as a whole: it runs once, inside its transaction, and sets the version when done.
"""

from __future__ import annotations

import sqlite3

ENGAGEMENT_AFTER = "migrated_engagement_after"  # meta key: social events after this offset still to be applied


def from_v1(db: sqlite3.Connection) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        last = db.execute("SELECT COALESCE(MAX(seq), 0) FROM sqlite_sequence WHERE name = 'events'").fetchone()[0]
        pipeline = db.execute("SELECT COALESCE(MAX(offset), 0) FROM progress WHERE consumer = 'pipeline'"
                              ).fetchone()[0]
        has_engagement = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'engagement_progress'").fetchone()
        applied = 0
        if has_engagement:
            applied = db.execute("SELECT COALESCE(MAX(offset), 0) FROM engagement_progress").fetchone()[0]
        db.execute("DROP INDEX IF EXISTS events_dedup")
        db.execute("ALTER TABLE events RENAME TO events_v1")
        db.execute("""CREATE TABLE events (
            offset INTEGER PRIMARY KEY, id TEXT NOT NULL, source TEXT NOT NULL, kind TEXT NOT NULL,
            ts_ms INTEGER NOT NULL, dedup TEXT, payload BLOB NOT NULL, verdict BLOB, logged_ms INTEGER NOT NULL)""")
        db.execute("""INSERT INTO events SELECT e.offset, e.id, e.source, e.kind, e.ts_ms, e.dedup,
                      CAST(e.payload AS BLOB), CAST(v.verdict AS BLOB), e.logged_ms
                      FROM events_v1 e LEFT JOIN verdicts v ON v.offset = e.offset""")
        first = db.execute("SELECT MIN(offset) FROM events").fetchone()[0]
        db.execute("DROP TABLE events_v1")
        db.execute("DROP TABLE verdicts")
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL)")
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('offset_floor', ?)", (last,))
        db.execute("DELETE FROM progress WHERE consumer = 'pipeline'")
        influx_from = pipeline if first is None else min(pipeline, first - 1)
        db.executemany("INSERT OR REPLACE INTO progress (consumer, offset) VALUES (?, ?)",
                       [("feeds", pipeline), ("stats", pipeline), ("influx", influx_from)])
        if has_engagement:
            db.execute("DROP TABLE engagement_progress")
            if applied < last:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (ENGAGEMENT_AFTER, applied))
        db.execute("DELETE FROM sqlite_sequence WHERE name = 'events'")
        db.execute("PRAGMA user_version = 2")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
