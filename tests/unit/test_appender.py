"""The log's group commit: acknowledged means logged; batches grow with load; duplicates, bad records, a failing
disk and a full budget each cost what they should and nothing more."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence


from gateway.event import DeadLetter, Event, Ingested, Verdict, compact_json
from gateway.log.appender import Appender
from gateway.log.dedup import RecentKeys
from gateway.log.storage_thread import StorageThread
from gateway.log.store import LogStore
from gateway.ops.metrics import Metrics
from tests.waiting import until


def reading(device: str = "d-1", seq: int | None = 1, temperature: float = 20.0) -> Ingested:
    payload: dict[str, Any] = {"temperature": temperature} if seq is None else {"seq": seq, "temperature": temperature}
    return Ingested(f"devices/{device}", "telemetry", 1_764_322_800_000, payload, compact_json(payload),
                    None if seq is None else f"{seq}@1764322800000")


class CountingStore(LogStore):
    """The real store, counting its commits and able to fail the next ones."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, fsync="off")
        self.commits = 0
        self.committed_on: list[threading.Thread] = []
        self.fail_next: list[BaseException] = []
        self.reject: Callable[[Event], bool] = lambda e: False

    def append(self, events: Sequence[Event], *args: Any, **kw: Any) -> list[object]:
        if self.fail_next:
            raise self.fail_next.pop(0)
        if any(self.reject(e) for e in events):
            raise ValueError("a value the log cannot store")
        self.commits += 1
        self.committed_on.append(threading.current_thread())
        return super().append(events, *args, **kw)


class Harness:
    def __init__(self, tmp: Path, **options: Any) -> None:
        self.store = CountingStore(tmp / "log.db")
        self.reader = LogStore(tmp / "log.db", reader=True)
        self.storage = StorageThread()
        self.metrics = Metrics()
        self.seen: list[list[Event]] = []
        self.dead: list[DeadLetter] = []
        options.setdefault("commit_window", 0.0)
        self.appender = Appender(self.store, self.storage, self.metrics, next_offset=1, keys=RecentKeys(),
                                 on_deadletters=self.dead.extend, **options)
        self.appender.listen(lambda events: self.seen.append(list(events)))

    def logged(self) -> list[Event]:
        return self.reader.read(0, 10_000)

    async def submit(self, records: list[Any]) -> list[Event]:
        """Hand in one group; return once it is committed (its done() ran), with what the log held then."""
        done: asyncio.Future[list[Event]] = asyncio.get_running_loop().create_future()
        self.appender.submit(records, lambda: done.set_result(self.logged()))
        return await asyncio.wait_for(done, 10)


def run(tmp: Path, scenario: Callable[[Harness], Any], **options: Any) -> Harness:
    async def main() -> None:
        h = Harness(tmp, **options)
        h.appender.start()
        try:
            await scenario(h)
        finally:
            await h.appender.close()
            h.storage.shutdown()
        harness.append(h)

    harness: list[Harness] = []
    asyncio.run(main())
    return harness[0]


def test_done_runs_only_once_the_records_are_in_the_log(tmp_path):
    async def scenario(h: Harness) -> None:
        done = asyncio.get_running_loop().create_future()
        h.appender.submit([reading(seq=1), reading(seq=2)], lambda: done.set_result(h.logged()))
        logged_when_done = await asyncio.wait_for(done, 10)
        assert [e.payload["seq"] for e in logged_when_done] == [1, 2]
        assert [e.offset for e in logged_when_done] == [1, 2]

    h = run(tmp_path, scenario)
    assert [[e.offset for e in batch] for batch in h.seen] == [[1, 2]]
    assert h.metrics.get("appended") == 2


def test_the_loop_commits_itself_while_the_storage_thread_is_idle_and_otherwise_queues_behind_it(tmp_path):
    """No thread hand-off per batch at a moderate rate: the event loop runs the transaction. While the storage
    thread has a job (a trim, a follow written to the graph) the batch goes after it, there: the log's connection is
    one thread's at a time, and what was handed in first is written first. Nothing is acknowledged before it is in."""
    async def scenario(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        await h.submit([reading(seq=1)])
        assert h.store.committed_on == [threading.current_thread()]

        inside, finish = threading.Event(), threading.Event()
        order: list[str] = []

        def earlier_job() -> None:
            inside.set()
            assert finish.wait(10)
            order.append("earlier job")

        busy = loop.run_in_executor(h.storage, earlier_job)
        assert await loop.run_in_executor(None, inside.wait, 10)
        acknowledged = asyncio.ensure_future(h.submit([reading(seq=2)]))
        await asyncio.sleep(0.2)
        assert not acknowledged.done(), "acknowledged before it was logged"
        finish.set()
        logged_when_acknowledged = await asyncio.wait_for(acknowledged, 10)
        order.append("acknowledged")
        await busy
        assert order == ["earlier job", "acknowledged"]
        assert [e.payload["seq"] for e in logged_when_acknowledged] == [1, 2]
        assert h.store.committed_on[-1] is not threading.current_thread(), "it waited on the storage thread"
        assert h.storage.idle

    run(tmp_path, scenario)


def test_groups_handed_in_close_together_share_a_commit(tmp_path):
    async def scenario(h: Harness) -> None:
        first = asyncio.ensure_future(h.submit([reading(seq=0)]))
        await asyncio.sleep(0)  # the first group is in; the appender seals on a later pass of the loop
        rest = [asyncio.ensure_future(h.submit([reading(seq=i)])) for i in range(1, 51)]
        await asyncio.gather(first, *rest)
        assert h.store.commits <= 3, f"{h.store.commits} commits for 51 groups"

    h = run(tmp_path, scenario)
    assert [e.payload["seq"] for e in h.logged()] == list(range(51))


def test_a_read_larger_than_a_batch_is_committed_in_parts_and_acknowledged_after_the_last(tmp_path):
    async def scenario(h: Harness) -> None:
        logged_when_acknowledged = await h.submit([reading(seq=i) for i in range(600)])
        assert len(logged_when_acknowledged) == 600, "done() waits for the last part"

    h = run(tmp_path, scenario, batch_max=256)
    assert [len(batch) for batch in h.seen] == [256, 256, 88]
    assert [e.payload["seq"] for e in h.logged()] == list(range(600))
    assert h.store.commits == 3


def test_under_load_a_commit_waits_for_the_window_unless_a_page_fills_and_an_idle_log_commits_at_once(tmp_path):
    async def scenario(h: Harness) -> None:
        started = time.monotonic()
        await h.submit([reading(seq=1)])
        assert time.monotonic() - started < 0.5, "idle: no linger"
        second = asyncio.ensure_future(h.submit([reading(seq=2)]))
        await asyncio.sleep(0.3)
        assert not second.done(), "a commit began less than the window ago: this one waits"
        await asyncio.wait_for(second, 5)
        started = time.monotonic()
        await h.submit([reading(seq=i) for i in range(3, 40)])  # well over a page of records
        assert time.monotonic() - started < 0.5, "a full page goes at once"

    run(tmp_path, scenario, commit_window=1.0)


def test_a_source_holds_its_reads_through_the_window_and_what_it_reads_then_joins_that_commit(tmp_path):
    """One read per commit window instead of one per message: the appender tells a source to stop reading while it
    waits out the window, and lets it read again just before the seal."""
    async def scenario(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        device, gateway_end = socket.socketpair()
        gateway_end.setblocking(False)
        joined = loop.create_future()

        def readable() -> None:  # what the MQTT source does with a read: hand its records in
            loop.remove_reader(gateway_end)
            seqs = [int(s) for s in gateway_end.recv(100).split()]
            h.appender.submit([reading(seq=s) for s in seqs], lambda: joined.set_result(None))

        assert not h.appender.hold_reads(lambda: None), "idle: read on, the next record commits at once"
        await h.submit([reading(seq=1)])
        second = asyncio.ensure_future(h.submit([reading(seq=2)]))
        await asyncio.sleep(0.05)
        assert h.appender.hold_reads(lambda: loop.add_reader(gateway_end, readable)), "inside the window: hold"
        device.sendall(b"3 4")  # arrives while the source is not reading
        await asyncio.wait_for(asyncio.gather(second, joined), 5)
        assert [[e.payload["seq"] for e in batch] for batch in h.seen] == [[1], [2, 3, 4]]
        device.close()
        gateway_end.close()

    h = run(tmp_path, scenario, commit_window=0.3)
    assert h.store.commits == 2


def test_a_retransmission_is_acknowledged_but_logged_once(tmp_path):
    async def scenario(h: Harness) -> None:
        await h.submit([reading(seq=1), reading(seq=1), reading(seq=2)])  # twice within a group
        await h.submit([reading(seq=2), reading("d-2", seq=2), reading(seq=None), reading(seq=None)])

    h = run(tmp_path, scenario)
    assert [(e.source, e.payload.get("seq")) for e in h.logged()] == [
        ("devices/d-1", 1), ("devices/d-1", 2), ("devices/d-2", 2), ("devices/d-1", None), ("devices/d-1", None)]
    assert h.metrics.get("duplicates") == 2


def test_dead_letters_are_stored_counted_and_handed_on_and_their_group_acknowledged(tmp_path):
    letter = DeadLetter("devices/x/telemetry", "malformed_json", "not JSON", b"{", 1)

    async def scenario(h: Harness) -> None:
        await h.submit([letter, reading(seq=1)])

    h = run(tmp_path, scenario)
    assert h.dead == [letter] and h.store.deadletters() == [letter]
    assert h.metrics.get("deadlettered") == 1 and h.metrics.deadletter_reasons["malformed_json"] == 1


def test_verdicts_are_computed_before_the_append_and_stored_with_each_event(tmp_path):
    def score(records: Sequence[Ingested]) -> list[Verdict | None]:
        return [Verdict("m", "1", r.payload["temperature"] / 100, "hot", True) if r.payload["temperature"] > 50
                else None for r in records]

    async def scenario(h: Harness) -> None:
        await h.submit([reading(seq=1, temperature=20.0), reading(seq=2, temperature=90.0)])

    h = run(tmp_path, scenario, score=score)
    cold, hot = h.logged()
    assert cold.verdict is None and hot.verdict == Verdict("m", "1", 0.9, "hot", True)
    assert h.seen[0] == [cold, hot], "consumers get exactly what a reader of the log gets"


def test_a_model_that_fails_costs_its_verdicts_never_the_events(tmp_path):
    def broken(records: Sequence[Ingested]) -> list[Verdict | None]:
        raise RuntimeError("onnxruntime fell over")

    async def scenario(h: Harness) -> None:
        await h.submit([reading(seq=1)])

    h = run(tmp_path, scenario, score=broken)
    assert [e.verdict for e in h.logged()] == [None]
    assert h.metrics.get("filter_errors") == 1


def test_a_failing_disk_holds_everything_until_it_works_again_and_loses_nothing(tmp_path):
    async def scenario(h: Harness) -> None:
        h.store.fail_next = [sqlite3.OperationalError("disk I/O error"), OSError(28, "No space left on device")]
        await h.submit([reading(seq=1)])
        assert h.metrics.get("storage_errors") == 2

    h = run(tmp_path, scenario)
    assert [e.offset for e in h.logged()] == [1]


def test_a_record_the_log_cannot_store_becomes_a_dead_letter_and_the_rest_are_stored(tmp_path):
    async def scenario(h: Harness) -> None:
        h.store.reject = lambda e: e.payload.get("seq") == 2
        await h.submit([reading(seq=1), reading(seq=2), reading(seq=3)])

    h = run(tmp_path, scenario)
    assert [e.payload["seq"] for e in h.logged()] == [1, 3]
    assert [d.reason for d in h.dead] == ["unstorable"]


def test_a_failing_disk_while_records_are_stored_one_by_one_is_waited_out_not_taken_for_bad_data(tmp_path):
    async def scenario(h: Harness) -> None:
        def reject(e: Event) -> bool:
            if e.payload.get("seq") != 2:
                return False
            if not h.metrics.get("storage_errors") and not h.store.fail_next:
                h.store.fail_next = [OSError(28, "No space left on device")]  # the next append: seq 1 on its own
            return True

        h.store.reject = reject
        await h.submit([reading(seq=1), reading(seq=2), reading(seq=3)])
        assert h.metrics.get("storage_errors") == 1

    h = run(tmp_path, scenario)
    assert [e.payload["seq"] for e in h.logged()] == [1, 3]
    assert [d.reason for d in h.dead] == ["unstorable"]


def test_over_the_disk_budget_nothing_is_acknowledged_until_there_is_room(tmp_path):
    over = [True]

    async def scenario(h: Harness) -> None:
        pending = asyncio.ensure_future(h.submit([reading(seq=1)]))
        await until(lambda: h.appender.stalled)
        assert not pending.done() and h.appender.has_room()
        over[0] = False
        await asyncio.wait_for(pending, 5)
        assert not h.appender.stalled

    h = run(tmp_path, scenario, over_budget=lambda: over[0])
    assert h.metrics.get("backpressure_waits") >= 1


def test_sources_are_told_to_wait_while_max_pending_records_wait(tmp_path):
    async def scenario(h: Harness) -> None:
        h.appender.submit([reading(seq=i) for i in range(5)])
        assert not h.appender.has_room()
        await asyncio.wait_for(h.appender.room(), 5)
        assert h.appender.pending == 0

    run(tmp_path, scenario, max_pending=5)


class Tracked:
    """A consumer as the appender sees it: its done offset, and state to write with it."""

    name = "feeds"

    def __init__(self) -> None:
        self.done = 0
        self.taken: list[int] = []
        self.committed_offsets: list[int] = []

    def take_progress(self) -> tuple[int, Any] | None:
        if self.taken and self.taken[-1] == self.done:
            return None
        self.taken.append(self.done)
        return self.done, lambda db: db.execute("INSERT INTO counted VALUES (?)", (self.done,))

    def committed(self, offset: int) -> None:
        self.committed_offsets.append(offset)


def test_consumers_progress_rides_with_an_append_or_commits_alone_when_the_log_is_idle(tmp_path):
    consumer = Tracked()

    async def scenario(h: Harness) -> None:
        h.store.connection.execute("CREATE TABLE counted (upto INTEGER)")
        h.appender.track(consumer)
        await h.submit([reading(seq=1)])
        consumer.done = 1
        await until(lambda: consumer.committed_offsets != [])  # nothing appended: a commit of its own
        assert consumer.committed_offsets == [1]
        assert h.reader.progress() == {"feeds": 1}
        consumer.done = 1  # nothing new: nothing to commit
        await asyncio.sleep(0.3)
        assert consumer.committed_offsets == [1]

    h = run(tmp_path, scenario, progress_interval=0.1)
    assert [r[0] for r in h.reader.connection.execute("SELECT upto FROM counted")] == [1]


def test_after_stop_accepting_nothing_new_is_logged_or_acknowledged_and_close_commits_what_was_handed_in(tmp_path):
    acked: list[str] = []

    async def scenario(h: Harness) -> None:
        h.appender.submit([reading(seq=1)], lambda: acked.append("before"))
        h.appender.stop_accepting()
        h.appender.submit([reading(seq=2)], lambda: acked.append("after"))

    h = run(tmp_path, scenario, commit_window=5.0)  # close() does not wait for the window
    assert acked == ["before"] and [e.payload["seq"] for e in h.logged()] == [1]


def test_one_broken_listener_does_not_keep_the_others_from_their_events(tmp_path):
    def broken(events: Sequence[Event]) -> None:
        raise RuntimeError("a consumer bug")

    async def scenario(h: Harness) -> None:
        h.appender._listeners.insert(0, broken)
        await h.submit([reading(seq=1)])

    h = run(tmp_path, scenario)
    assert [[e.offset for e in b] for b in h.seen] == [[1]]


def test_state_that_must_commit_with_the_events_rolls_back_with_them(tmp_path):
    calls: list[int] = []

    def hook(events: Sequence[Event]) -> Any:
        def apply(db: sqlite3.Connection) -> None:
            calls.append(len(events))
            db.execute("INSERT INTO applied VALUES (?)", (events[-1].offset,))
        return apply

    async def scenario(h: Harness) -> None:
        h.store.connection.execute("CREATE TABLE applied (upto INTEGER)")
        h.store.fail_next = [sqlite3.OperationalError("database is locked")]
        await h.submit([reading(seq=1), reading(seq=2)])

    h = run(tmp_path, scenario, hook=hook)
    assert [r[0] for r in h.reader.connection.execute("SELECT upto FROM applied")] == [2]
