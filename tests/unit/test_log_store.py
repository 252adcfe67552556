"""The log's file: events with their verdicts, consumers' progress, dead letters, trimming, and the old layout."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.event import DeadLetter, Event, Verdict, compact_json
from gateway.log.migrate import ENGAGEMENT_AFTER
from gateway.log.store import CACHE_KIB, DEADLETTER_KEEP, SCHEMA_VERSION, LogStore, SchemaError

NORMAL = Verdict("sensor-anomaly", "1.1.1", 0.01, "normal", False)


def reading(offset: int, source: str = "devices/d-1", verdict: Verdict | None = NORMAL) -> Event:
    payload = {"seq": offset, "ts": 1_764_322_800_000 + offset, "temperature": 20.0 + offset / 10}
    return Event(offset, f"{offset:028x}", source, "telemetry", payload["ts"], payload, compact_json(payload),
                 verdict, verdict.to_json() if verdict else b"")


@pytest.fixture
def store(tmp_path: Path):
    s = LogStore(tmp_path / "log.db", fsync="off")
    yield s
    s.close()


def test_events_read_back_as_they_were_appended_verdicts_included(store):
    events = [reading(1), reading(2, verdict=None), reading(3, "devices/d-2")]
    store.append(events, ["1@1", None, "3@3"])
    assert store.read(0, 10) == events
    assert store.read(1, 1) == [events[1]]
    assert store.read(0, 10, upto=2) == events[:2]
    assert store.last_offset() == 3 and store.first_offset() == 1


def test_a_new_log_has_small_pages_and_knows_its_schema(store):
    db = store.connection
    assert db.execute("PRAGMA page_size").fetchone()[0] == 1024
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_the_log_keeps_a_small_page_cache_on_every_connection(tmp_path: Path):
    """SQLite's default cache (2,000 KiB) would only fill with pages already written (benchmarks/RESULTS.md)."""
    writer = LogStore(tmp_path / "log.db")
    reader = LogStore(tmp_path / "log.db", reader=True)
    for db in (writer.connection, reader.connection):
        assert db.execute("PRAGMA cache_size").fetchone()[0] == -CACHE_KIB
    assert CACHE_KIB <= 256
    writer.close()
    reader.close()


def test_a_log_from_a_newer_gateway_is_refused(tmp_path: Path):
    path = tmp_path / "log.db"
    sqlite3.connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer gateway"):
        LogStore(path)


def test_progress_commits_with_the_events_and_only_moves_forward(store):
    store.append([reading(1), reading(2)], ["a", "b"], progress={"feeds": 2, "influx": 1})
    store.commit_progress({"feeds": 1, "influx": 2})
    assert store.progress() == {"feeds": 2, "influx": 2}


def test_what_runs_in_the_transaction_commits_with_the_events_or_not_at_all(store):
    store.connection.execute("CREATE TABLE counts (n INTEGER)")

    def count(db: sqlite3.Connection) -> int:
        db.execute("INSERT INTO counts VALUES (1)")
        return 7

    def fail(db: sqlite3.Connection) -> None:
        raise RuntimeError("a stage failed")

    assert store.append([reading(1)], [None], in_transaction=[count]) == [7]
    with pytest.raises(RuntimeError):
        store.append([reading(2)], [None], progress={"feeds": 2}, in_transaction=[count, fail])
    assert [e.offset for e in store.read(0, 10)] == [1]
    assert store.connection.execute("SELECT COUNT(*) FROM counts").fetchone()[0] == 1
    assert store.progress() == {}


def test_trimming_stops_at_the_offset_every_consumer_is_done_with_and_offsets_are_never_reused(store):
    store.append([reading(i) for i in range(1, 11)], [None] * 10)
    assert store.trim(upto=4) == 4
    assert store.first_offset() == 5
    assert store.trim(upto=10, older_than_ms=0) == 0  # nothing logged before the epoch
    assert store.trim(upto=10) == 6
    assert store.read(0, 10) == [] and store.last_offset() == 10  # emptied, yet the next event is 11


def test_a_trim_takes_at_most_its_limit_per_call(store):
    store.append([reading(i) for i in range(1, 101)], [None] * 100)
    assert store.trim(upto=100, limit=30) == 30
    assert store.first_offset() == 31


def test_dead_letters_are_kept_newest_first_and_bounded(store):
    letters = [DeadLetter("devices/x/telemetry", "malformed_json", f"#{i}", b"x" * 600, i) for i in range(3)]
    store.append([], [], letters)
    got = store.deadletters(2)
    assert [d.message for d in got] == ["#2", "#1"]
    assert len(got[0].payload) == 512  # the first bytes, enough to see what it was
    store.append([], [], [DeadLetter("o", "r", "m", b"", 0)] * (DEADLETTER_KEEP + 1000))
    assert store.connection.execute("SELECT COUNT(*) FROM deadletters").fetchone()[0] <= DEADLETTER_KEEP + 1


def test_the_tail_keys_are_the_newest_retransmission_keys_in_log_order(store):
    store.append([reading(i) for i in range(1, 6)], ["k1", None, "k3", "k4", "k5"])
    assert store.tail_keys(3) == [("devices/d-1", "k3"), ("devices/d-1", "k4"), ("devices/d-1", "k5")]


def test_the_size_counts_the_pages_in_use(store):
    empty = store.size_bytes()
    store.append([reading(i) for i in range(1, 200)], [None] * 199)
    assert store.size_bytes() > empty + 199 * 100


# --- the layout before schema 2 -------------------------------------------------------------------------------

V1_SCHEMA = """
CREATE TABLE events (offset INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, source TEXT NOT NULL,
    kind TEXT NOT NULL, ts_ms INTEGER NOT NULL, dedup TEXT, payload TEXT NOT NULL, logged_ms INTEGER NOT NULL);
CREATE UNIQUE INDEX events_dedup ON events (source, dedup) WHERE dedup IS NOT NULL;
CREATE TABLE progress (consumer TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE verdicts (offset INTEGER PRIMARY KEY, verdict TEXT NOT NULL);
CREATE TABLE deadletters (n INTEGER PRIMARY KEY AUTOINCREMENT, ts_ms INTEGER NOT NULL, origin TEXT NOT NULL,
    reason TEXT NOT NULL, message TEXT NOT NULL, payload BLOB NOT NULL);
CREATE TABLE engagement_progress (id INTEGER PRIMARY KEY CHECK (id = 1), offset INTEGER NOT NULL);
"""


def write_v1_log(path: Path) -> None:
    """A log as the gateway before schema 2 left it: 12 events logged, the first 2 trimmed, 8 processed, the
    engagement applied up to 9, a dead letter."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(V1_SCHEMA)
    for i in range(1, 13):
        payload = compact_json({"seq": i, "temperature": 20.5}).decode()
        db.execute("INSERT INTO events (id, source, kind, ts_ms, dedup, payload, logged_ms) VALUES (?,?,?,?,?,?,?)",
                   (f"{i:028x}", "devices/d-1", "telemetry", 1_764_322_800_000 + i, f"{i}@x", payload, 0))
        if i <= 9:
            db.execute("INSERT INTO verdicts VALUES (?, ?)", (i, NORMAL.to_json().decode()))
    db.execute("DELETE FROM events WHERE offset <= 2")
    db.execute("INSERT INTO progress VALUES ('pipeline', 8)")
    db.execute("INSERT INTO engagement_progress VALUES (1, 9)")
    db.execute("INSERT INTO deadletters (ts_ms, origin, reason, message, payload) VALUES (1, 'o', 'r', 'm', x'00')")
    db.close()


def test_a_log_of_the_earlier_layout_is_converted_in_place_keeping_every_event_and_offset(tmp_path: Path):
    path = tmp_path / "log.db"
    write_v1_log(path)
    store = LogStore(path)
    events = store.read(0, 100)
    assert [e.offset for e in events] == list(range(3, 13))
    assert all(e.verdict == NORMAL for e in events[:7]) and all(e.verdict is None for e in events[7:])
    assert events[0].payload == {"seq": 3, "temperature": 20.5} and isinstance(events[0].body, bytes)
    # Feeds and live counts go on where the pipeline was; InfluxDB writes every retained reading again (the same
    # points, so InfluxDB overwrites them), which covers whatever the old outbox had not written yet.
    assert store.progress() == {"feeds": 8, "stats": 8, "influx": 2}
    assert store.meta(ENGAGEMENT_AFTER) == 9
    assert store.last_offset() == 12 and store.tail_keys(1) == [("devices/d-1", "12@x")]
    assert [d.reason for d in store.deadletters()] == ["r"]
    db = store.connection
    assert db.execute("PRAGMA page_size").fetchone()[0] == 1024
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert db.execute("SELECT name FROM sqlite_master WHERE name IN ('verdicts', 'events_dedup')").fetchall() == []
    store.append([reading(13)], ["13@x"])
    store.close()
    assert [e.offset for e in LogStore(path).read(11, 10)] == [12, 13]


def test_trimming_over_the_budget_gives_the_space_back_at_once_wal_included(tmp_path: Path):
    store = LogStore(tmp_path / "log.db", fsync="off")
    store.append([reading(i) for i in range(1, 5001)], [None] * 5000)
    full = store.size_bytes()
    store.trim(upto=5000, shrink=True)
    assert store.size_bytes() < full / 4, "the freed pages no longer count"
    assert (tmp_path / "log.db-wal").stat().st_size == 0, "and the WAL was emptied"
    store.close()
