"""The pipeline takes freshly logged events from memory only when they continue exactly where it stands;
anything else (a gap, a rewind, a commit dropped from the bounded handoff) is read from the log."""

from collections import deque

from gateway.event import Event
from gateway.pipeline import take_contiguous


def chunk(first: int, last: int) -> list[Event]:
    return [Event(o, f"id{o}", "devices/d", "telemetry", 0, {"v": o}) for o in range(first, last + 1)]


def offsets(events: list[Event]) -> list[int]:
    return [e.offset for e in events]


def test_contiguous_commits_are_joined_into_one_batch():
    handoff = deque([chunk(11, 13), chunk(14, 14), chunk(15, 20)])
    assert offsets(take_contiguous(handoff, 10, 1000)) == list(range(11, 21))
    assert not handoff


def test_a_batch_stops_before_the_commit_that_would_pass_the_limit():
    handoff = deque([chunk(1, 4), chunk(5, 8), chunk(9, 12)])
    assert offsets(take_contiguous(handoff, 0, 9)) == list(range(1, 9))
    assert offsets(take_contiguous(handoff, 8, 9)) == list(range(9, 13))


def test_commits_behind_the_cursor_are_dropped():
    handoff = deque([chunk(1, 5), chunk(6, 9), chunk(10, 12)])
    assert offsets(take_contiguous(handoff, 9, 100)) == [10, 11, 12]


def test_a_gap_after_the_cursor_means_read_the_log():
    handoff = deque([chunk(15, 20)])
    assert take_contiguous(handoff, 10, 100) == []
    assert len(handoff) == 1, "kept: once the log read reaches offset 14 it continues from memory"
    assert offsets(take_contiguous(handoff, 14, 100)) == list(range(15, 21))


def test_a_rewind_reads_the_log_again():
    handoff = deque([chunk(31, 40)])
    assert take_contiguous(handoff, 20, 100) == []


def test_a_commit_larger_than_the_limit_is_left_to_the_log_read():
    handoff = deque([chunk(1, 50)])
    assert take_contiguous(handoff, 0, 10) == []
