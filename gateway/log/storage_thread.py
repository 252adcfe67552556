"""The log's writer thread: the jobs that write `log.db` and `graph.db` off the event loop, one at a time, in the
order they were handed in, and whether any is queued or running.

The appender commits on the event loop itself while this thread is idle (gateway/log/appender.py). Only the loop
hands jobs in, so "idle" seen from the loop stays true until the loop hands in the next one: the writing connection
is never used by two threads at once, and a batch appended on the loop comes after everything handed in before it
(a follow written to the graph before a reading of the device it follows is logged and delivered).
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class StorageThread(ThreadPoolExecutor):
    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="log-writer")
        self._queued = 0  # handed in and not finished
        self._count_lock = threading.Lock()

    @property
    def idle(self) -> bool:
        return self._queued == 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        def job() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:  # before the future's result is set: whoever sees the result sees the thread idle
                self._finished()

        with self._count_lock:
            self._queued += 1
        try:
            future = super().submit(job)
        except BaseException:
            self._finished()
            raise
        future.add_done_callback(lambda f: self._finished() if f.cancelled() else None)  # never ran
        return future

    def _finished(self) -> None:
        with self._count_lock:
            self._queued -= 1
