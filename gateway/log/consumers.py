"""Consumers: every output that must not be lost reads the log at its own committed offset.

    appender ──events (memory)──▶ Consumer ──batch──▶ sink.deliver ──▶ future: the outputs are done
                                     ▲    (live while it keeps up)              │ in offset order
              log.db ──read back─────┘    (behind: restart, replay, a slow sink) ▼
                                                                   done offset (+ the sink's state for it)
                                                                        │ taken by the appender
                                                                        ▼
                                                          `progress` row, committed with that state

A consumer that keeps up takes the batches the appender hands over and never touches the disk. One that falls
behind (its sink is slower than the log, or after a restart) drops its queue and reads from the log instead, on a
reader thread with its own connection, until it has caught up; then it takes live batches again. So a slow InfluxDB
costs the log disk (bounded by the budget), never the gateway's memory, and never the other consumers' pace.

Progress is in offset order: a batch's offset is done only when it and every batch before it are done. What a sink
must count exactly once (impressions) travels as the result of its batches' futures and is committed in the same
transaction as the offset that covers it, so a replay after a crash counts it again only if it was never committed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable, Protocol, Sequence

from gateway.event import Event, InTransaction
from gateway.log.store import LogStore
from gateway.ops.metrics import Metrics

log = logging.getLogger(__name__)


class Sink(Protocol):
    """One output of the gateway (feeds, InfluxDB, live counts), as a consumer of the log."""

    name: str

    async def deliver(self, events: Sequence[Event]) -> "asyncio.Future[Any] | None":
        """Start the outputs of a batch; wait only while the output's own buffer is full. The future (None: done
        already) resolves when the outputs are done, with what must be committed with the batch's offset."""
        ...

    def state(self, results: list[Any]) -> InTransaction | None:
        """What to write in the progress transaction for the results of the batches it covers."""
        ...


class Reader:
    """Reads the log back for consumers that are behind: its own connection, its own thread."""

    def __init__(self, store: LogStore, executor: Executor) -> None:
        self._store = store
        self._executor = executor

    async def read(self, after: int, limit: int) -> list[Event]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._store.read, after, limit)

    def size_bytes(self) -> int:
        """The log's size on disk (for its budget), seen from this connection: blocking, on the reader's thread."""
        return self._store.size_bytes()

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Any read-only query on the reader's connection (stages that keep state in the log's file)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, self._store.connection, *args)

    def close(self) -> None:
        self._store.close()


class Consumer:
    def __init__(self, sink: Sink, reader: Reader, log_end: Callable[[], int], committed: int, metrics: Metrics, *,
                 max_live: int = 4096, batch_max: int = 500, accept: Callable[[Event], bool] | None = None,
                 gate: Callable[[], int] | None = None) -> None:
        self.sink = sink
        self.name = sink.name
        self._reader = reader
        self._log_end = log_end
        self._metrics = metrics
        self._max_live = max_live
        self._batch_max = batch_max
        self._accept = accept  # None: every event; otherwise events not accepted only advance the offset
        self._gate = gate  # None: no limit; otherwise deliver nothing beyond gate() (a consumer that trails another)
        self.cursor = committed  # last offset handed to the sink
        self.done = committed  # every batch up to here is done
        self.committed_offset = committed  # durably in `progress`
        self._taken = committed  # the done offset last handed to the appender
        self._results: list[Any] = []  # results of done batches not yet taken
        self._live: deque[tuple[list[Event], int]] = deque()
        self._live_events = 0
        self._behind = committed < log_end()
        self._wake = asyncio.Event()
        self._inflight: deque[list[Any]] = deque()  # [last offset, future | None, result]
        self._closing = False
        self._finished = asyncio.Event()
        self.done_events = 0  # events finished since the start (a count, where offsets may have gaps)
        self.on_committed: Callable[[int], None] | None = None
        self.on_gated: Callable[[], None] | None = None  # waiting for the gate: the gate's owner may hurry

    @property
    def lag(self) -> int:
        """Events appended that this consumer has not finished."""
        return max(0, self._log_end() - self.done)

    @property
    def behind(self) -> bool:
        return self._behind

    # --- fed by the appender ---------------------------------------------------------------------------------------

    def offer(self, events: Sequence[Event]) -> None:
        if self._behind:
            return  # read back from the log once the sink has room
        kept = events if self._accept is None else [e for e in events if self._accept(e)]
        if self._live_events + len(kept) > self._max_live:
            self._fall_behind()
            return
        self._live.append((kept, events[-1].offset))  # type: ignore[arg-type]
        self._live_events += len(kept)
        self._wake.set()

    def _fall_behind(self) -> None:
        self._behind = True
        self._live.clear()
        self._live_events = 0
        self._metrics.inc("consumer_fell_behind")
        log.warning("%s: the output is slower than the log; reading back from the log instead", self.name)
        self._wake.set()

    def take_progress(self) -> tuple[int, InTransaction | None] | None:
        if self.done == self._taken and not self._results:
            return None
        self._taken = self.done
        results, self._results = self._results, []
        return self.done, self.sink.state(results) if results else None

    def committed(self, offset: int) -> None:
        self.committed_offset = offset
        if self.on_committed is not None:
            self.on_committed(offset)

    def gate_moved(self) -> None:
        self._wake.set()

    # --- the loop --------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            self._finished.set()

    async def _run(self) -> None:
        while True:
            item = await self._next()
            if item is None:
                return
            events, last = item
            future = await self.sink.deliver(events) if events else None
            entry: list[Any] = [last, future, len(events)]
            self._inflight.append(entry)
            self.cursor = last
            if future is None:
                self._advance()
            else:
                future.add_done_callback(lambda _f: self._advance())

    async def _next(self) -> tuple[list[Event], int] | None:
        while True:
            limit = self._gate() if self._gate is not None else None
            if self._closing and (self._behind or not self._live):
                return None  # what is left is read back from the log after the restart
            if self._behind:
                if limit is not None and limit <= self.cursor:
                    await self._wait(gated=True)
                    continue
                events = await self._reader.read(self.cursor, self._batch_max)
                if limit is not None:
                    events = [e for e in events if e.offset <= limit]
                if events:
                    last = events[-1].offset
                    kept = events if self._accept is None else [e for e in events if self._accept(e)]
                    return kept, last
                if self.cursor >= self._log_end():
                    self._behind = False  # caught up: from here on the appender's batches are what is new
                    log.info("%s: caught up with the log at offset %d", self.name, self.cursor)
                    continue
                if limit is not None and limit < self._log_end():
                    await self._wait(gated=True)
                continue
            if self._live:
                events, last = self._live[0]
                if last <= self.cursor:  # already read back from the log before switching to live
                    self._live.popleft()
                    self._live_events -= len(events)
                    continue
                if events and limit is not None and last > limit:  # nothing to deliver: no gate to wait for
                    if self._closing:
                        return None  # beyond the gate waits for the next start
                    await self._wait(gated=True)
                    continue
                self._live.popleft()
                self._live_events -= len(events)
                return [e for e in events if e.offset > self.cursor], last
            await self._wait()

    async def _wait(self, gated: bool = False) -> None:
        self._wake.clear()
        if gated and self.on_gated is not None:
            self.on_gated()
        await self._wake.wait()

    def _advance(self) -> None:
        inflight = self._inflight
        while inflight:
            entry = inflight[0]
            future = entry[1]
            if future is not None:
                if not future.done():
                    break
                if future.cancelled():
                    return  # shutting down: this batch was not done
                error = future.exception()
                if error is not None:
                    log.error("%s: a batch failed (%r); it is delivered again from the log", self.name, error)
                    self._restart_from_done()
                    return
                result = future.result()
                if result is not None:
                    self._results.append(result)
            inflight.popleft()
            self.done = entry[0]
            self.done_events += entry[2]

    def _restart_from_done(self) -> None:
        """A sink gave up on a batch: forget what was handed over after the last done offset and read it back."""
        self._inflight.clear()
        self.cursor = self.done
        self._fall_behind()

    async def drain(self) -> None:
        """Shutting down: deliver what was offered live, and wait until it is done (the caller sets the deadline).
        A consumer that is behind stops where it is: the rest is read back from the log after the restart."""
        self._closing = True
        self._wake.set()
        await self._finished.wait()
        pending = [entry[1] for entry in self._inflight if entry[1] is not None and not entry[1].done()]
        if pending:
            await asyncio.wait(pending)
        self._advance()
