"""Group commit: handlers return only after their event is in the log; batches share one transaction."""

import asyncio
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gateway.event import Ingested, new_event_id
from gateway.ingest import Ingestor
from gateway.ingest_log import DeadLetter, IngestLog
from gateway.metrics import Metrics


def item(seq):
    return Ingested(new_event_id(), "devices/d1", "telemetry", 1764322800000 + seq, {"seq": seq, "v": 1.0},
                    str(seq))


class CountingLog(IngestLog):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.transactions = []

    def append(self, items, deadletters=()):
        self.transactions.append(len(items) + len(deadletters))
        return super().append(items, deadletters)


def run(coro):
    return asyncio.run(coro)


def test_concurrent_appends_share_transactions_and_all_land(tmp_path):
    async def scenario():
        log = CountingLog(tmp_path / "log.db")
        ingestor = Ingestor(log, ThreadPoolExecutor(1), Metrics(), batch_max=100)
        ingestor.start()
        await asyncio.gather(*(ingestor.append(item(i)) for i in range(500)))
        await ingestor.close()
        return log

    log = run(scenario())
    assert len(log.read(0, 1000)) == 500
    assert sum(log.transactions) == 500
    assert len(log.transactions) <= 10  # 500 handlers in a burst need a handful of commits, not 500
    assert max(log.transactions) <= 100


def test_an_append_returns_only_after_the_commit(tmp_path):
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        ingestor = Ingestor(log, ThreadPoolExecutor(1), Metrics())
        ingestor.start()
        await ingestor.append(item(1))
        # A fresh connection (another process, in effect) sees the event as soon as append returned.
        seen = sqlite3.connect(tmp_path / "log.db").execute("SELECT COUNT(*) FROM events").fetchone()[0]
        await ingestor.close()
        return seen

    assert run(scenario()) == 1


def test_a_storage_failure_is_retried_and_nothing_returns_early(tmp_path):
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        metrics = Metrics()
        ingestor = Ingestor(log, ThreadPoolExecutor(1), metrics)
        locker = sqlite3.connect(tmp_path / "log.db", isolation_level=None, timeout=0)
        locker.execute("BEGIN EXCLUSIVE")  # another writer holds the database: appends fail with "locked"
        log._db.execute("PRAGMA busy_timeout=10")
        ingestor.start()
        waiting = asyncio.create_task(ingestor.append(item(1)))
        await asyncio.sleep(0.4)
        assert not waiting.done()
        assert metrics.get("storage_errors") >= 1
        locker.execute("ROLLBACK")
        await asyncio.wait_for(waiting, 10)
        await ingestor.close()
        return log

    log = run(scenario())
    assert [e.payload["seq"] for e in log.read(0, 10)] == [1]


def test_appends_wait_when_too_many_are_pending(tmp_path):
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        metrics = Metrics()
        storage = ThreadPoolExecutor(1)
        ingestor = Ingestor(log, storage, metrics, batch_max=10, max_pending=10)
        gate = asyncio.get_running_loop().run_in_executor(storage, time.sleep, 0.3)
        ingestor.start()
        tasks = [asyncio.create_task(ingestor.append(item(i))) for i in range(25)]
        await asyncio.sleep(0.1)
        assert ingestor.pending == 10  # the other 15 handlers wait before joining a batch
        await gate
        await asyncio.gather(*tasks)
        await ingestor.close()
        return log, metrics

    log, metrics = run(scenario())
    assert len(log.read(0, 100)) == 25
    assert metrics.get("backpressure_waits") >= 15


def test_a_full_ingestor_has_no_room_until_its_batch_is_written(tmp_path):
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        storage = ThreadPoolExecutor(1)
        ingestor = Ingestor(log, storage, Metrics(), batch_max=100, max_pending=10)
        busy = asyncio.get_running_loop().run_in_executor(storage, time.sleep, 0.3)
        ingestor.start()
        for i in range(10):
            ingestor.submit(item(i), i)
        room = asyncio.create_task(ingestor.room())
        await asyncio.sleep(0.1)
        full = (ingestor.has_room(), room.done())
        await busy
        await asyncio.wait_for(room, 5)
        await ingestor.close()
        return full, ingestor.pending_peak

    (has_room, room_done), peak = run(scenario())
    assert (has_room, room_done) == (False, False)
    assert peak == 10


def test_a_stalled_ingestor_lets_sources_read_on(tmp_path):
    """Over the disk budget the flusher makes no room however long a source waits; the MQTT link must read on,
    or the broker's acknowledgements of the pipeline's publishes (what lets the log shrink) never arrive."""
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        over = True
        ingestor = Ingestor(log, ThreadPoolExecutor(1), Metrics(), max_pending=5, over_budget=lambda: over)
        ingestor.start()
        for i in range(5):
            ingestor.submit(item(i), i)
        await asyncio.wait_for(ingestor.room(), 5)  # returns although 5 are still pending
        stalled = (ingestor.pending, ingestor.has_room())
        over = False
        while ingestor.pending:
            await asyncio.sleep(0.05)
        await ingestor.close()
        return stalled

    assert run(scenario()) == (5, True)


def test_dead_letters_are_logged_counted_and_handed_on(tmp_path):
    handed = []

    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        metrics = Metrics()
        ingestor = Ingestor(log, ThreadPoolExecutor(1), metrics, on_deadletters=handed.extend)
        ingestor.start()
        bad = DeadLetter("devices/d1/telemetry", "malformed_json", "not JSON", b"{", 1)
        await asyncio.gather(ingestor.dead_letter(bad), ingestor.append(item(1)))
        await ingestor.close()
        return log, metrics

    log, metrics = run(scenario())
    assert [d.reason for d in log.deadletters()] == ["malformed_json"]
    assert [d.reason for d in handed] == ["malformed_json"]
    assert metrics.get("deadlettered") == 1 and metrics.deadletter_reasons["malformed_json"] == 1
    assert len(log.read(0, 10)) == 1


def test_unknown_metric_names_are_a_programming_error():
    with pytest.raises(KeyError):
        Metrics().inc("recieved")


def test_an_item_the_log_cannot_store_is_dead_lettered_and_the_rest_of_its_batch_goes_through(tmp_path):
    async def scenario():
        log = IngestLog(tmp_path / "log.db")
        metrics = Metrics()
        ingestor = Ingestor(log, ThreadPoolExecutor(1), metrics)
        ingestor.start()
        unstorable = Ingested(new_event_id(), "users/u1", "post", 1, {"text": "hi"}, "n:\ud800")  # lone surrogate
        await asyncio.wait_for(asyncio.gather(ingestor.append(item(1)), ingestor.append(unstorable),
                                              ingestor.append(item(2))), 10)
        await ingestor.close()
        return log, metrics

    log, metrics = run(scenario())
    assert [e.payload["seq"] for e in log.read(0, 10)] == [1, 2]
    assert [d.reason for d in log.deadletters()] == ["unstorable"]
    assert metrics.deadletter_reasons["unstorable"] == 1
