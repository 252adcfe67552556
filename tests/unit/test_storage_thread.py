"""The log's writer thread knows whether it has a job: the appender commits on the loop only while it has none."""

from __future__ import annotations

import threading

import pytest

from gateway.log.storage_thread import StorageThread


def test_it_is_busy_from_the_moment_a_job_is_handed_in_until_that_job_has_finished():
    thread = StorageThread()
    try:
        assert thread.idle
        started, finish = threading.Event(), threading.Event()
        first = thread.submit(lambda: (started.set(), finish.wait(10)))
        second = thread.submit(lambda: "second")
        assert not thread.idle
        assert started.wait(10)
        assert not thread.idle, "the second job waits its turn"
        finish.set()
        assert second.result(10) == "second" and first.done()
        assert thread.idle
    finally:
        thread.shutdown()


def test_a_job_that_fails_counts_as_finished():
    thread = StorageThread()
    try:
        failed = thread.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            failed.result(10)
        assert thread.idle
    finally:
        thread.shutdown()


def test_a_job_refused_after_shutdown_leaves_it_idle():
    thread = StorageThread()
    thread.shutdown()
    with pytest.raises(RuntimeError):
        thread.submit(print)
    assert thread.idle


def test_a_job_cancelled_before_it_ran_counts_as_finished():
    thread = StorageThread()
    started, finish = threading.Event(), threading.Event()
    thread.submit(lambda: (started.set(), finish.wait(10)))
    queued = thread.submit(print)
    assert started.wait(10)
    assert queued.cancel()
    finish.set()
    thread.shutdown(wait=True)
    assert thread.idle
