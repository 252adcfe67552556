"""The outbox keeps every batch until a writer has accepted it, and acts on what the writer's errors say.

A fake writer stands in for InfluxDB here; tests/integration/test_influx_sinks.py drives the same code against
real servers.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from gateway.outbox import Drainer, Outbox
from gateway.sinks.influx import RejectedWriteError, RetryableWriteError, TooLargeError
from gateway.sinks.lineprotocol import count_lines


def batch(tag: str, n: int = 1) -> bytes:
    return b"".join(f"m,b={tag} v={i}i {i}\n".encode() for i in range(n))


class FakeWriter:
    """Records every body it is given; `behave(body)` may raise to play the server."""

    def __init__(self, behave: Callable[[bytes], None] | None = None) -> None:
        self.behave = behave
        self.calls: list[bytes] = []
        self.accepted: list[bytes] = []
        self.times: list[float] = []
        self.called = threading.Event()

    def write(self, body: bytes) -> None:
        self.calls.append(body)
        self.times.append(time.monotonic())
        self.called.set()
        if self.behave is not None:
            self.behave(body)
        self.accepted.append(body)

    def close(self) -> None:
        pass

    def lines(self) -> list[bytes]:
        return [line for body in self.accepted for line in body.splitlines()]


def wait_until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def outbox(tmp_path: Path):
    box = Outbox(tmp_path / "outbox.sqlite", max_bytes=10_000)
    yield box
    box.close()


def run(box: Outbox, writer: FakeWriter, **kw) -> Drainer:
    kw.setdefault("backoff_initial", 0.01)
    kw.setdefault("backoff_max", 0.05)
    drainer = Drainer(box, writer, **kw)
    drainer.start()
    return drainer


# --- the producer's side ---------------------------------------------------------------------------------------


def test_put_appends_one_row_per_batch_and_counts_the_backlog(outbox):
    outbox.put(batch("a", 3), 3)
    outbox.put(batch("b", 2), 2)
    rows, points, nbytes = outbox.backlog()
    assert (rows, points, nbytes) == (2, 5, len(batch("a", 3)) + len(batch("b", 2)))


def test_over_budget_is_a_signal_and_put_never_refuses(tmp_path):
    box = Outbox(tmp_path / "o.sqlite", max_bytes=20)
    body = batch("a")
    assert len(body) < 20 <= 2 * len(body)
    box.put(body, 1)
    assert not box.over_budget()
    box.put(body, 1)
    assert box.over_budget()
    box.put(body, 1)  # still accepted: dropping is the one thing the outbox must not do
    assert box.backlog()[0] == 3


def test_the_file_is_wal_with_the_requested_synchronous_mode(tmp_path):
    Outbox(tmp_path / "n.sqlite", 1000, synchronous="normal").close()
    conn = sqlite3.connect(tmp_path / "n.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError, match="synchronous"):
        Outbox(tmp_path / "x.sqlite", 1000, synchronous="off")


def test_an_empty_body_is_not_stored(outbox):
    outbox.put(b"", 0)
    assert outbox.backlog() == (0, 0, 0)


# --- draining --------------------------------------------------------------------------------------------------


def test_rows_are_coalesced_in_order_and_deleted_once_written(outbox):
    for tag in "abc":
        outbox.put(batch(tag, 2), 2)
    writer = FakeWriter()
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog() == (0, 0, 0))
    drainer.stop(2)
    assert writer.calls == [batch("a", 2) + batch("b", 2) + batch("c", 2)]
    stats = drainer.stats()
    assert (stats.written_rows, stats.written_points, stats.requests) == (3, 6, 1)


def test_coalescing_stops_at_the_line_and_byte_limits_but_always_takes_one_row(outbox):
    outbox.put(batch("a", 3), 3)
    outbox.put(batch("b", 3), 3)
    outbox.put(batch("huge", 50), 50)
    writer = FakeWriter()
    drainer = run(outbox, writer, max_lines=5, max_body_bytes=10_000)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert [count_lines(b) for b in writer.calls] == [3, 3, 50]


def test_an_idle_drainer_wakes_as_soon_as_a_batch_is_put(outbox):
    writer = FakeWriter()
    drainer = run(outbox, writer, idle_poll=60)
    time.sleep(0.05)  # let it go idle
    start = time.monotonic()
    outbox.put(batch("a"), 1)
    assert writer.called.wait(2)
    assert time.monotonic() - start < 1.0
    drainer.stop(2)


def test_retryable_errors_keep_the_rows_and_retry_them_first_in_order(outbox):
    outbox.put(batch("a"), 1)
    outbox.put(batch("b"), 1)
    failures = iter([RetryableWriteError("503", 503), RetryableWriteError("refused")])

    def behave(body: bytes) -> None:
        err = next(failures, None)
        if err is not None:
            raise err

    writer = FakeWriter(behave)
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert writer.calls == [batch("a") + batch("b")] * 3
    stats = drainer.stats()
    assert stats.retried == 2 and stats.last_error == "refused" and stats.backoff_s == 0


def test_the_backoff_honours_retry_after(outbox):
    outbox.put(batch("a"), 1)
    answers = iter([RetryableWriteError("429", 429, retry_after=0.3)])

    def behave(body: bytes) -> None:
        err = next(answers, None)
        if err is not None:
            raise err

    writer = FakeWriter(behave)
    drainer = run(outbox, writer, backoff_initial=0.01, backoff_max=0.02)
    wait_until(lambda: len(writer.accepted) == 1)
    drainer.stop(2)
    assert writer.times[1] - writer.times[0] >= 0.3


def test_backoff_is_exponential_jittered_and_capped():
    drainer = Drainer.__new__(Drainer)
    drainer.backoff_initial, drainer.backoff_max = 0.5, 8.0
    for failures, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (5, 8.0), (40, 8.0)]:
        delays = {drainer.next_backoff(failures, None) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(delays) > 1, "jittered"
    assert drainer.next_backoff(1, 30.0) == 30.0


def test_a_413_splits_the_rows_and_then_a_single_batch_by_lines(outbox):
    outbox.put(batch("a", 4), 4)
    outbox.put(batch("b", 4), 4)

    def behave(body: bytes) -> None:
        if count_lines(body) > 2:
            raise TooLargeError("HTTP 413", 413)

    writer = FakeWriter(behave)
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert sorted(writer.lines()) == sorted((batch("a", 4) + batch("b", 4)).splitlines())
    assert all(count_lines(b) <= 2 for b in writer.accepted)
    assert drainer.stats().splits >= 3 and drainer.stats().written_points == 8


def test_a_single_line_that_is_still_too_large_is_dead_lettered(outbox):
    outbox.put(batch("big"), 1)
    writer = FakeWriter(lambda body: (_ for _ in ()).throw(TooLargeError("HTTP 413", 413)))
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    [dead] = outbox.dead()
    assert dead.status == 413 and "single line" in dead.reason


def test_a_rejected_batch_is_found_by_bisection_and_dead_lettered_with_the_reason(outbox):
    for tag in ["a", "b", "bad", "c", "d"]:
        outbox.put(batch(tag, 2), 2)

    def behave(body: bytes) -> None:
        if b"b=bad" in body:
            raise RejectedWriteError('HTTP 400: partial write: field type conflict', 400, partial=True)

    writer = FakeWriter(behave)
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert not any(b"b=bad" in line for line in writer.lines())
    assert sorted(writer.lines()) == sorted(b"".join(batch(t, 2) for t in "abcd").splitlines())
    [dead] = outbox.dead()
    assert dead.body == batch("bad", 2) and dead.points == 2 and dead.status == 400
    assert "field type conflict" in dead.reason
    stats = drainer.stats()
    assert (stats.dead_rows, stats.dead_points, stats.written_points) == (1, 2, 8)


def test_the_dead_letters_keep_only_the_last_n(outbox):
    for i in range(5):
        outbox.put(batch(f"bad{i}"), 1)
    writer = FakeWriter(lambda body: (_ for _ in ()).throw(RejectedWriteError("HTTP 400: nope", 400)))
    drainer = run(outbox, writer, dead_keep=2)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert [d.body for d in outbox.dead()] == [batch("bad4"), batch("bad3")]
    assert drainer.stats().dead_rows == 5


def test_a_writer_bug_does_not_end_the_drainer(outbox):
    outbox.put(batch("a"), 1)
    calls = iter([ZeroDivisionError("bug")])

    def behave(body: bytes) -> None:
        err = next(calls, None)
        if err is not None:
            raise err

    writer = FakeWriter(behave)
    drainer = run(outbox, writer)
    wait_until(lambda: outbox.backlog()[0] == 0)
    drainer.stop(2)
    assert drainer.stats().retried == 1 and "ZeroDivisionError" in (drainer.stats().last_error or "")


def test_once_the_backlog_is_written_the_next_points_wait_for_the_flush_interval_and_go_together(outbox):
    writer = FakeWriter()
    drainer = run(outbox, writer, flush_interval=0.3)
    outbox.put(batch("a"), 1)
    wait_until(lambda: len(writer.accepted) == 1)
    outbox.put(batch("b"), 1)
    outbox.put(batch("c"), 1)
    wait_until(lambda: len(writer.accepted) == 2)
    drainer.stop(2)
    assert writer.accepted == [batch("a"), batch("b") + batch("c")]
    assert writer.times[1] - writer.times[0] >= 0.25


def test_a_backlog_larger_than_one_request_is_written_without_pauses(outbox):
    for tag in "abcd":
        outbox.put(batch(tag), 1)
    writer = FakeWriter()
    drainer = run(outbox, writer, max_lines=1, flush_interval=5.0)
    wait_until(lambda: len(writer.accepted) == 4, timeout=2.0)
    drainer.stop(2)


def test_flush_writes_what_waits_without_the_pause(outbox):
    writer = FakeWriter()
    drainer = run(outbox, writer, flush_interval=30.0)
    outbox.put(batch("a"), 1)
    wait_until(lambda: len(writer.accepted) == 1)
    outbox.put(batch("b"), 1)  # would wait 30 s for the next request
    start = time.monotonic()
    assert drainer.flush(5)
    assert time.monotonic() - start < 2.0
    drainer.stop(2)
    assert writer.accepted == [batch("a"), batch("b")]


def test_flush_gives_up_at_once_while_writes_fail(outbox):
    outbox.put(batch("a"), 1)
    writer = FakeWriter(lambda body: (_ for _ in ()).throw(RetryableWriteError("down", retry_after=60)))
    drainer = run(outbox, writer)
    assert writer.called.wait(2)
    wait_until(lambda: drainer.stats().retried >= 1)
    start = time.monotonic()
    assert not drainer.flush(5)
    assert time.monotonic() - start < 1.0
    drainer.stop(2)
    assert outbox.backlog()[0] == 1


def test_stop_waits_for_the_write_in_flight_and_keeps_the_rest(outbox):
    outbox.put(batch("a"), 1)
    outbox.put(batch("b"), 1)
    release = threading.Event()
    writer = FakeWriter(lambda body: release.wait(5) and None)
    drainer = run(outbox, writer, max_lines=1)
    assert writer.called.wait(2)
    stopper = threading.Thread(target=drainer.stop, args=(5,))
    stopper.start()
    time.sleep(0.05)
    assert stopper.is_alive(), "stop() waits for the write in flight"
    release.set()
    stopper.join(5)
    assert writer.accepted == [batch("a")]
    assert outbox.backlog()[0] == 1  # b was not started, and stays for the next run


def test_stop_cuts_a_backoff_short(outbox):
    outbox.put(batch("a"), 1)
    writer = FakeWriter(lambda body: (_ for _ in ()).throw(RetryableWriteError("down", retry_after=60)))
    drainer = run(outbox, writer)
    assert writer.called.wait(2)
    start = time.monotonic()
    assert drainer.stop(5)
    assert time.monotonic() - start < 1.0
    assert outbox.backlog()[0] == 1


def test_a_restart_resumes_the_backlog_from_the_file(tmp_path):
    path = tmp_path / "outbox.sqlite"
    first = Outbox(path, max_bytes=10_000)
    down = FakeWriter(lambda body: (_ for _ in ()).throw(RetryableWriteError("down")))
    drainer = run(first, down)
    first.put(batch("a", 2), 2)
    first.put(batch("b", 3), 3)
    wait_until(lambda: len(down.calls) >= 1)
    drainer.stop(2)
    first.close()

    second = Outbox(path, max_bytes=10_000)
    assert second.backlog() == (2, 5, len(batch("a", 2)) + len(batch("b", 3)))
    writer = FakeWriter()
    drainer = run(second, writer)
    wait_until(lambda: second.backlog()[0] == 0)
    drainer.stop(2)
    assert writer.accepted == [batch("a", 2) + batch("b", 3)]
    second.close()
