"""The ingest log: one transaction per batch, offsets in order, retransmissions recognised, progress durable."""

import sqlite3

from gateway.event import Ingested, new_event_id
from gateway.ingest_log import DeadLetter, IngestLog


def item(seq, source="devices/d1", ts=1764322800000, dedup=True):
    return Ingested(new_event_id(), source, "telemetry", ts + seq, {"seq": seq, "v": float(seq)},
                    f"{seq}@{ts + seq}" if dedup else None)


def test_a_batch_gets_increasing_offsets_and_reads_back(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    result = log.append([item(1), item(2), item(3)])
    assert [e.offset for e in result.events] == [1, 2, 3]
    assert [e.payload["seq"] for e in log.read(after=1, limit=10)] == [2, 3]
    assert log.read(after=3, limit=10) == []


def test_a_retransmission_is_not_logged_twice(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    first = item(1)
    log.append([first])
    again = Ingested(new_event_id(), first.source, first.kind, first.ts_ms, first.payload, first.dedup_key)
    result = log.append([again, item(2)])
    assert result.duplicates == 1
    assert [e.payload["seq"] for e in log.read(0, 10)] == [1, 2]


def test_the_same_seq_from_another_device_or_without_a_key_is_a_new_event(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    log.append([item(1)])
    result = log.append([item(1, source="devices/d2"), item(1, dedup=False), item(1, dedup=False)])
    assert result.duplicates == 0
    assert len(log.read(0, 10)) == 4


def test_progress_survives_reopening_and_never_moves_back(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    log.append([item(i) for i in range(5)])
    log.commit(3)
    log.commit(2)
    log.close()
    log = IngestLog(tmp_path / "log.db")
    assert log.committed() == 3
    assert [e.offset for e in log.read(log.committed(), 10)] == [4, 5]


def test_offsets_are_never_reused_after_trimming(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    log.append([item(i) for i in range(3)])
    log.commit(3)
    assert log.trim(older_than_ms=2**62) == 3
    assert [e.offset for e in log.append([item(10)]).events] == [4]


def test_unprocessed_events_are_never_trimmed(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    log.append([item(i) for i in range(3)])
    log.commit(1)
    assert log.trim(older_than_ms=2**62) == 1
    assert [e.offset for e in log.read(0, 10)] == [2, 3]


def test_dead_letters_are_stored_with_their_reason_in_the_same_transaction(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    bad = DeadLetter("devices/d1/telemetry", "malformed_json", "not JSON", b"\xff{", 1)
    log.append([item(1)], [bad])
    assert log.deadletters() == [bad]
    assert bad.as_dict()["payload"] == "\\xff{"


def test_a_failed_batch_leaves_nothing_behind(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    broken = Ingested("id", "devices/d1", "telemetry", 1, {"v": object()}, None)  # not JSON-serialisable
    try:
        log.append([item(1), broken])
    except TypeError:
        pass
    assert log.read(0, 10) == []
    # Nobody ever saw offset 1, so the next batch takes it.
    assert [(e.offset, e.payload["seq"]) for e in log.append([item(2)]).events] == [(1, 2)]


def test_a_torn_wal_tail_is_recovered_on_open(tmp_path):
    """A power cut mid-write leaves a partial frame at the end of the WAL; SQLite discards it on open."""
    path = tmp_path / "log.db"
    log = IngestLog(path)
    log.append([item(1), item(2)])
    wal = path.with_name("log.db-wal")
    # Simulate the crash: copy the files as a process killed right now would leave them, plus garbage.
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    (crashed / "log.db").write_bytes(path.read_bytes())
    (crashed / "log.db-wal").write_bytes(wal.read_bytes() + b"\x00garbage-from-a-torn-write" * 40)
    log.close()
    reopened = IngestLog(crashed / "log.db")
    assert [e.payload["seq"] for e in reopened.read(0, 10)] == [1, 2]
    assert sqlite3.connect(crashed / "log.db").execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_verdicts_are_kept_from_the_first_processing_and_trimmed_with_their_events(tmp_path):
    log = IngestLog(tmp_path / "log.db")
    log.append([item(i) for i in range(3)])
    log.save_verdicts([(1, '{"v": "first"}'), (2, '{"v": "first"}')])
    log.save_verdicts([(2, '{"v": "replayed"}'), (3, '{"v": "first"}')])  # a replay does not overwrite
    assert log.saved_verdicts(1, 3) == {1: '{"v": "first"}', 2: '{"v": "first"}', 3: '{"v": "first"}'}
    log.commit(2)
    log.trim(older_than_ms=2**62)
    assert log.saved_verdicts(1, 3) == {3: '{"v": "first"}'}
