"""Group commit in front of the ingest log.

Sources call `await ingestor.append(item)` (or `dead_letter(...)`) from their message handlers and acknowledge the
message only when that returns. Items join the open batch; one flusher task writes a whole batch in one SQLite
transaction on the storage thread, then resolves the batch's single future, which releases every handler waiting on
it. While one batch is being written the next one fills up, so under load batches grow and the fsync cost per event
shrinks, and at low load a lone event is written at once.

Backpressure: at most `max_pending` items wait in memory; beyond that `append` waits, handlers do not return, and
MQTT/serial acknowledgements stop, so the broker and the devices hold the data. The MQTT source also stops reading
its socket (`room`), because acknowledging nothing is not enough to stop every broker sending. A storage failure is
retried (the items stay pending, nothing is acknowledged) rather than dropped.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from concurrent.futures import Executor
from typing import Callable

from gateway.event import Ingested
from gateway.ingest_log import AppendResult, DeadLetter, IngestLog
from gateway.metrics import Metrics

# What "the disk or the database is failing" looks like: retried, never dropped. Anything else an append raises
# is about the data (a value that cannot be stored) and is dead-lettered instead.
STORAGE_ERRORS = (sqlite3.OperationalError, OSError)

log = logging.getLogger(__name__)


class _Batch:
    __slots__ = ("items", "dead", "future", "sealed", "tokens")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sealed = False  # being written: later items must go to the next batch
        self.items: list[Ingested] = []
        self.tokens: list[object] = []  # acknowledgements to send once the batch is committed (hot path)
        self.dead: list[DeadLetter] = []
        self.future: asyncio.Future[None] = loop.create_future()

    def __len__(self) -> int:
        return len(self.items) + len(self.dead)


class Ingestor:
    def __init__(self, ingest_log: IngestLog, storage: Executor, metrics: Metrics, *, batch_max: int = 1000,
                 max_pending: int = 5000, on_deadletters: Callable[[list[DeadLetter]], None] | None = None,
                 over_budget: Callable[[], bool] | None = None,
                 on_committed: Callable[[list[object]], None] | None = None) -> None:
        self._log = ingest_log
        self._storage = storage
        self._metrics = metrics
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._on_deadletters = on_deadletters
        self._over_budget = over_budget or (lambda: False)
        self._on_committed = on_committed
        self._batches: deque[_Batch] = deque()
        self._pending = 0
        self._wake = asyncio.Event()
        self._room: asyncio.Future[None] | None = None
        self._stalled = False  # the flusher is holding (disk budget, storage errors), not writing
        self.pending_peak = 0  # most items seen waiting when a batch was taken: what memory had to hold
        self.appended = asyncio.Event()  # set after every commit that logged new events; the pipeline waits on it
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._accepting = True

    @property
    def pending(self) -> int:
        return self._pending

    def has_room(self) -> bool:
        """Whether a source should take more input now: fewer than `max_pending` items wait, or the flusher is
        stalled. A stalled flusher makes no room however long a source waits, and the MQTT link must read on then:
        the broker's acknowledgements of our own publishes arrive on the same socket, and the pipeline needs them
        to commit, which is what frees the log's disk budget."""
        return self._pending < self._max_pending or self._stalled

    async def room(self) -> None:
        """Wait until `has_room()`."""
        while not self.has_room():
            await self._room_changed()

    async def _room_changed(self) -> None:
        """Wait for the next change that may have made room (a batch written, the flusher stalling or resuming);
        the waiter checks again for itself."""
        self._metrics.inc("backpressure_waits")
        if self._room is None or self._room.done():
            self._room = asyncio.get_running_loop().create_future()
        await self._room

    def _wake_room_waiters(self) -> None:
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    def _stall(self, stalled: bool) -> None:
        if stalled != self._stalled:
            self._stalled = stalled
            self._wake_room_waiters()  # room() re-checks; append() waiters loop back to waiting

    def start(self) -> None:
        self._task = asyncio.create_task(self._flusher(), name="ingest-flusher")

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None, "start() first"
        return self._task

    async def append(self, item: Ingested) -> None:
        batch = await self._join()
        batch.items.append(item)
        await batch.future

    def submit(self, record: Ingested | DeadLetter, token: object) -> None:
        """Hot path, no waiting: join the open batch; `token` is handed to `on_committed` after the commit.

        Nothing bounds this but the source's own window: for MQTT the broker sends at most its in-flight limit of
        unacknowledged messages, and we acknowledge only after commit.
        """
        if not self._accepting:
            return  # shutting down: never acknowledged, so the broker redelivers it after the restart
        if isinstance(record, DeadLetter):
            self._metrics.inc("deadlettered")
            self._metrics.deadletter_reasons[record.reason] += 1
        self._pending += 1
        if not self._batches or self._batches[-1].sealed or len(self._batches[-1]) >= self._batch_max:
            self._batches.append(_Batch(asyncio.get_running_loop()))
        batch = self._batches[-1]
        if isinstance(record, DeadLetter):
            batch.dead.append(record)
        else:
            batch.items.append(record)
        batch.tokens.append(token)
        self._wake.set()

    async def dead_letter(self, letter: DeadLetter) -> None:
        self._metrics.inc("deadlettered")
        self._metrics.deadletter_reasons[letter.reason] += 1
        batch = await self._join()
        batch.dead.append(letter)
        await batch.future

    async def _join(self) -> _Batch:
        if not self._accepting:
            # Shutting down: this message is not logged, so it must not be acknowledged. Its handler never
            # returns; the broker (or the device) keeps the message and redelivers it after the restart.
            await asyncio.get_running_loop().create_future()
        while self._pending >= self._max_pending:
            await self._room_changed()
        self._pending += 1
        if not self._batches or self._batches[-1].sealed or len(self._batches[-1]) >= self._batch_max:
            self._batches.append(_Batch(asyncio.get_running_loop()))
        self._wake.set()
        return self._batches[-1]

    async def _flusher(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.05
        while True:
            if not self._batches:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            # Let handlers already scheduled in this loop iteration join before the batch is taken.
            await asyncio.sleep(0)
            while self._over_budget():
                self._stall(True)
                self._metrics.inc("backpressure_waits")
                log.error("ingest log disk budget reached: not acknowledging new events until space returns")
                await asyncio.sleep(1.0)
            batch = self._batches[0]
            batch.sealed = True
            if self._pending > self.pending_peak:
                self.pending_peak = self._pending
            try:
                result: AppendResult = await loop.run_in_executor(
                    self._storage, self._log.append, batch.items, batch.dead)
            except STORAGE_ERRORS as exc:  # disk full, I/O error: keep the batch, acknowledge nothing, try again
                self._stall(True)
                self._metrics.inc("storage_errors")
                log.error("ingest log append failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception as exc:  # an item the log cannot store: find it, dead-letter it, keep the rest
                log.error("ingest log refused a batch (%r); storing its items one by one", exc)
                try:
                    result = await loop.run_in_executor(self._storage, self._append_one_by_one, batch)
                except STORAGE_ERRORS as again:
                    self._stall(True)
                    self._metrics.inc("storage_errors")
                    log.error("ingest log append failed (%s); retrying in %.2fs", again, delay)
                    await asyncio.sleep(delay)
                    continue
            delay = 0.05
            self._stall(False)
            self._batches.popleft()
            self._pending -= len(batch)
            if result.events:
                self._metrics.inc("appended", len(result.events))
                self.appended.set()
            if result.duplicates:
                self._metrics.inc("duplicates", result.duplicates)
            if not batch.future.done():
                batch.future.set_result(None)
            if batch.tokens and self._on_committed is not None:
                self._on_committed(batch.tokens)
            if self._pending < self._max_pending:
                self._wake_room_waiters()
            if batch.dead and self._on_deadletters is not None:
                self._on_deadletters(batch.dead)

    def stop_accepting(self) -> None:
        """From now on new items wait forever (unacknowledged); what is already pending is still written."""
        self._accepting = False

    def _append_one_by_one(self, batch: _Batch) -> AppendResult:
        """Storage thread. Each item alone; one that cannot be stored (not a storage failure: a value SQLite or
        JSON cannot hold) becomes a dead letter, so one hostile message cannot stall everything behind it."""
        events, duplicates = [], 0
        refused: list[DeadLetter] = []
        for item in batch.items:
            try:
                one = self._log.append([item])
            except STORAGE_ERRORS:
                raise
            except Exception as exc:
                text = repr(dict(item.payload)).encode("utf-8", errors="backslashreplace")
                refused.append(DeadLetter(item.source, "unstorable", f"the log cannot store this event: {exc}"[:300],
                                          text, item.ts_ms))
                continue
            events.extend(one.events)
            duplicates += one.duplicates
        self._log.append([], [*batch.dead, *refused])
        for letter in refused:
            self._metrics.deadletter_reasons[letter.reason] += 1
        self._metrics.inc("deadlettered", len(refused))
        return AppendResult(events, duplicates)

    async def close(self) -> None:
        """Write everything pending, then stop."""
        self._accepting = False
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
