"""Group commit: what sources hand in is recognised, scored, given offsets and appended in one transaction.

    sources ─submit(records, done)─▶ pending groups ─▶ seal: duplicates out, filters score, ids and offsets
                                                          │ on the event loop; on the storage thread in a flood
                                                          ▼ or behind its jobs (gateway/log/storage_thread.py)
                                      LogStore.append: events + dead letters + due progress, one fsync
                                                          │
                                                          ▼
                                      done() of every group (PUBACKs, serial ACKs), then the new events to
                                      every live consumer, from memory

At most `batch_max` records go into one commit: a larger read (a flood's socket read can hold thousands of
messages) is committed in parts, and its done() runs after the last. The batch bounds how long the filters keep the
loop and how much of a flood is in memory at once.

When to commit. A commit rewrites whole pages, so a commit of one small event costs the disk as much as one of
several: under load, a commit waits until the pending records fill a page (`page_bytes`) or until
`commit_window` seconds have passed since the previous commit began, whichever is first. An idle gateway commits a
lone event at once (the previous commit is long past), and a flood commits as fast as the disk allows (a page fills
while the previous commit runs). The window is the one setting of the trade-off between latency on one side and
disk wear and CPU per event on the other (storage.commit_window_ms; measured in benchmarks/RESULTS.md).

Backpressure. Nothing is acknowledged before its commit, so a source holds at most its own window of records here;
`has_room()` turns false at `max_pending` and the MQTT source then stops reading its socket. Over the disk budget
the appender holds (stalls) instead of committing: acknowledgements stop, the broker and the devices keep the data.
A storage error (disk full, I/O error) is retried with backoff, the batch kept as it was: nothing is acknowledged
meanwhile and nothing is dropped. A record the log cannot store (not a storage error: a value SQLite refuses)
becomes a dead letter, found by storing the batch one record at a time.

Consumers' progress rides along: every `progress_interval` the offsets the consumers have finished (and the state
that must move with them, e.g. impression counts) go into the next append's transaction, or into one of their own
when nothing is being appended. Losing the newest progress to a crash only replays those events; state written with
it rolls back with it, so it is never counted twice.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import deque
from typing import Callable, Protocol, Sequence

from gateway.backoff import Backoff
from gateway.event import DeadLetter, Event, Ingested, InTransaction, Verdict, new_event_id
from gateway.log.dedup import RecentKeys
from gateway.log.storage_thread import StorageThread
from gateway.log.store import LogStore
from gateway.ops.metrics import Metrics

# What "the disk or the database is failing" looks like: retried, never dropped. Anything else an append raises is
# about the data and is dead-lettered instead.
STORAGE_ERRORS = (sqlite3.OperationalError, OSError)

log = logging.getLogger(__name__)

Done = Callable[[], None]
Scorer = Callable[[Sequence[Ingested]], Sequence["Verdict | None"]]
Hook = Callable[[Sequence[Event]], "InTransaction | None"]
Listener = Callable[[Sequence[Event]], None]


class ProgressSource(Protocol):
    """A consumer, as the appender sees it: what it has finished, and the state that must commit with that."""

    name: str

    def take_progress(self) -> tuple[int, InTransaction | None] | None: ...

    def committed(self, offset: int) -> None: ...


class _Group:
    __slots__ = ("records", "done", "size")

    def __init__(self, records: Sequence[Ingested | DeadLetter], done: Done | None) -> None:
        self.records = records
        self.done = done
        self.size = _size(records)

    def split(self, n: int) -> _Group:
        """Take the first `n` records off as a group of their own. `done` stays with the rest: commits go in order,
        so it runs once the last of the records is logged."""
        head = _Group(self.records[:n], None)
        self.records = self.records[n:]
        self.size -= head.size
        return head


def _size(records: Sequence[Ingested | DeadLetter]) -> int:
    """About what the records take in the log, to tell when they fill a page."""
    size = 0
    for r in records:
        size += len(r.body) + 128 if type(r) is Ingested else 256  # type: ignore[union-attr]
    return size


class _Sealed:
    """A batch ready for its transaction; kept as it is across retries."""

    __slots__ = ("groups", "events", "dedups", "dead", "duplicates", "progress", "state", "hooks", "consumers")

    def __init__(self) -> None:
        self.groups: list[_Group] = []
        self.events: list[Event] = []
        self.dedups: list[str | None] = []
        self.dead: list[DeadLetter] = []
        self.duplicates = 0
        self.progress: dict[str, int] = {}
        self.state: list[InTransaction] = []
        self.hooks: list[InTransaction] = []
        self.consumers: list[ProgressSource] = []


class Appender:
    def __init__(self, store: LogStore, storage: StorageThread, metrics: Metrics, *, next_offset: int,
                 keys: RecentKeys, commit_window: float = 0.004, page_bytes: int = 1024, batch_max: int = 256,
                 max_pending: int = 2000, progress_interval: float = 1.0, score: Scorer | None = None,
                 hook: Hook | None = None, over_budget: Callable[[], bool] | None = None,
                 on_deadletters: Callable[[list[DeadLetter]], None] | None = None) -> None:
        self._store = store
        self._storage = storage
        self._metrics = metrics
        self._next_offset = next_offset
        self._keys = keys
        self._window = commit_window
        self._page_bytes = page_bytes
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._progress_interval = progress_interval
        self._score = score
        self._hook = hook
        self._over_budget = over_budget or (lambda: False)
        self._on_deadletters = on_deadletters
        self._listeners: list[Listener] = []
        self._consumers: list[ProgressSource] = []
        self._groups: deque[_Group] = deque()
        self._pending = 0  # records waiting (not yet committed)
        self._pending_bytes = 0
        self.pending_peak = 0
        # What the flusher awaits between commits: settled by its timer, by news while it is idle, or by a full page
        # (or closing) while it waits out the commit window. One future and one timer per wait: asyncio.wait_for
        # around an Event costs a task, its cancellation and two more loop passes per commit.
        self._waiter: asyncio.Future[None] | None = None
        self._room: asyncio.Future[None] | None = None
        self._stalled = False
        self._accepting = True
        self._closing = False
        self._progress_urgent = False
        self._last_commit = 0.0
        self._holding = False  # waiting out the commit window with a partial page
        self._held_reads: list[Callable[[], None]] = []
        self._last_progress = time.monotonic()
        self.last_offset = next_offset - 1  # the newest offset committed and handed to the listeners
        self._task: asyncio.Task[None] | None = None
        self._backoff = Backoff(0.05, 5.0)

    # --- wiring ----------------------------------------------------------------------------------------------------

    def listen(self, listener: Listener) -> None:
        """`listener(events)` gets every committed batch's events, in offset order, on the event loop."""
        self._listeners.append(listener)

    def track(self, consumer: ProgressSource) -> None:
        self._consumers.append(consumer)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="log appender")

    @property
    def task(self) -> asyncio.Task[None]:
        assert self._task is not None, "start() first"
        return self._task

    # --- the sources' side -----------------------------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def stalled(self) -> bool:
        return self._stalled

    def has_room(self) -> bool:
        """Whether sources should read on: fewer than `max_pending` records wait, or the appender is stalled (then
        waiting makes no room, and the MQTT source must read on: the broker's acknowledgements of our own publishes
        arrive on the same socket, and they are what lets consumers finish and the log be trimmed)."""
        return self._pending < self._max_pending or self._stalled

    async def room(self) -> None:
        while not self.has_room():
            self._metrics.inc("backpressure_waits")
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def submit(self, records: Sequence[Ingested | DeadLetter], done: Done | None = None) -> None:
        """Hand in the records of one read (a socket read, a serial batch); `done()` runs once all are committed.
        Never waits: the caller bounds itself with `has_room()`. After `stop_accepting()` records are ignored and
        `done` never runs (so nothing is acknowledged that was not logged)."""
        if not self._accepting or not records:
            return
        group = _Group(records, done)
        self._groups.append(group)
        self._pending += len(records)
        self._pending_bytes += group.size
        self._signal(self._pending_bytes >= self._page_bytes)

    def hold_reads(self, resume: Callable[[], None]) -> bool:
        """For a source that has just handed in records (or a publish-only connection that has just written the
        feeds' publishes, whose PUBACKs can wait): whether to stop reading until the next seal. True while
        the appender waits out its commit window with a partial page; `resume()` then runs when the window closes,
        just before the seal, so what arrived meanwhile joins it. Records read earlier would only wait here, and
        one read per window instead of one per message is what makes a moderate rate cheap. False when the
        appender seals at once or a commit is in flight (then reading on fills the next batch)."""
        if not self._holding:
            return False
        self._held_reads.append(resume)
        return True

    def stop_accepting(self) -> None:
        self._accepting = False

    def request_progress(self) -> None:
        """Commit consumers' progress soon (a stage waits to see it durable), not at the next interval."""
        self._progress_urgent = True
        self._signal(False)

    # --- the flusher -----------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._groups:
                if self._closing:
                    return
                if self._progress_due():
                    sealed = self._seal([])
                    if sealed.progress:
                        await self._commit(loop, sealed)
                    continue
                timeout = None
                if self._consumers:
                    timeout = max(0.0, self._progress_interval - (time.monotonic() - self._last_progress))
                    if self._progress_urgent:
                        timeout = min(timeout, 0.05)
                await self._sleep(timeout)
                continue
            wait = self._window - (time.monotonic() - self._last_commit)
            if wait > 0 and self._pending_bytes < self._page_bytes and not self._closing:
                self._holding = True
                try:
                    await self._sleep(wait)
                finally:
                    self._holding = False
                    held = self._resume_held()
                if held:  # their sockets are registered again now; a ready one's callback runs on the next pass,
                    await asyncio.sleep(0)  # and this task's second pass comes after it: what they read joins
                    await asyncio.sleep(0)
            else:
                await asyncio.sleep(0)  # let handlers of this loop pass join the batch
            if self._over_budget():
                await self._hold_for_budget()
                continue
            groups = []
            count = 0
            while self._groups and count < self._batch_max:
                room = self._batch_max - count
                if len(self._groups[0].records) > room:  # one socket read can hold a flood's thousands of messages
                    groups.append(self._groups[0].split(room))
                    break
                group = self._groups.popleft()
                groups.append(group)
                count += len(group.records)
            if self._pending > self.pending_peak:
                self.pending_peak = self._pending
            sealed = self._seal(groups)
            await self._commit(loop, sealed, on_loop=not self._groups)

    async def _sleep(self, seconds: float | None) -> None:
        """Until `seconds` have passed (None: no limit) or `_signal` settles the wait."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = None if seconds is None else loop.call_later(seconds, _settle, waiter)
        try:
            await waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter = None

    def _signal(self, full: bool) -> None:
        """Wake the flusher: on any news while it is idle; while it waits out the commit window, only when the
        pending records fill a page (`full`) or the appender closes."""
        waiter = self._waiter
        if waiter is not None and not waiter.done() and (full or not self._holding):
            waiter.set_result(None)

    def _resume_held(self) -> bool:
        resumes, self._held_reads = self._held_reads, []
        for resume in resumes:
            resume()
        return bool(resumes)

    async def _hold_for_budget(self) -> None:
        self._stall(True)
        self._metrics.inc("backpressure_waits")
        log.error("log disk budget reached: not acknowledging new events until consumers catch up and space returns")
        while self._over_budget() and not self._closing:
            if self._progress_due():
                sealed = self._seal([])
                if sealed.progress:  # progress lets the log be trimmed
                    await self._commit(asyncio.get_running_loop(), sealed)
            await asyncio.sleep(0.5)
        self._stall(False)

    def _progress_due(self) -> bool:
        if not self._consumers:
            return False
        elapsed = time.monotonic() - self._last_progress
        return elapsed >= self._progress_interval or (self._progress_urgent and elapsed >= 0.05) or self._closing

    def _seal(self, groups: list[_Group]) -> _Sealed:
        sealed = _Sealed()
        sealed.groups = groups
        keys = self._keys
        fresh: list[Ingested] = []
        in_batch: set[tuple[str, str]] = set()
        for group in groups:
            for record in group.records:
                if type(record) is DeadLetter:
                    sealed.dead.append(record)
                    continue
                key = record.dedup  # type: ignore[union-attr]
                if key is not None:
                    source = record.source  # type: ignore[union-attr]
                    if keys.seen(source, key) or (source, key) in in_batch:
                        sealed.duplicates += 1
                        continue
                    in_batch.add((source, key))
                fresh.append(record)  # type: ignore[arg-type]
        if fresh:
            verdicts = self._verdicts(fresh)
            now_ms = int(time.time() * 1000)
            offset = self._next_offset
            events = sealed.events
            dedups = sealed.dedups
            for r, v in zip(fresh, verdicts):
                events.append(Event(offset, new_event_id(now_ms), r.source, r.kind, r.ts_ms, r.payload, r.body, v,
                                    v.to_json() if v is not None else b""))
                dedups.append(r.dedup)
                offset += 1
            if self._hook is not None:
                hook = self._hook(events)
                if hook is not None:
                    sealed.hooks.append(hook)
        if self._progress_due():
            self._take_progress(sealed)
            self._last_progress = time.monotonic()
            self._progress_urgent = False
        return sealed

    def _take_progress(self, sealed: _Sealed) -> None:
        """Every consumer's progress since the last commit (and its state to save with it) rides along with `sealed`."""
        for consumer in self._consumers:
            taken = consumer.take_progress()
            if taken is not None:
                sealed.progress[consumer.name] = taken[0]
                if taken[1] is not None:
                    sealed.state.append(taken[1])
                sealed.consumers.append(consumer)

    def _verdicts(self, records: list[Ingested]) -> Sequence[Verdict | None]:
        if self._score is None:
            return [None] * len(records)
        try:
            return self._score(records)
        except Exception:  # a model that fails must cost its verdicts, never the events
            self._metrics.inc("filter_errors")
            log.exception("filters failed on a batch of %d; logging it without verdicts", len(records))
            return [None] * len(records)

    async def _commit(self, loop: asyncio.AbstractEventLoop, sealed: _Sealed, on_loop: bool = True) -> None:
        self._last_commit = time.monotonic()
        try:
            await self._write_until_stored(loop, sealed, on_loop)
        except Exception as exc:  # a record the log cannot store: find it, dead-letter it, keep the rest
            log.error("the log refused a batch (%r); storing its records one by one", exc)
            await self._store_one_by_one(loop, sealed)
        self._backoff.reset()
        self._stall(False)
        self._metrics.inc("log_commits")
        self._committed(sealed)

    async def _write(self, loop: asyncio.AbstractEventLoop, sealed: _Sealed, on_loop: bool = True) -> None:
        """The batch's transaction. `on_loop` (nothing else waits to be sealed) and the storage thread idle: here.
        The loop would idle through the fsync anyway, and a commit here costs no hand-off: no thread to wake, no
        GIL passed back and forth while SQLite runs, no wake-up of the loop when it is done (benchmarks/RESULTS.md
        has what that saves at a moderate rate). Otherwise on the storage thread: in a flood the loop reads and
        parses what arrives, and the consumers deliver, while the disk syncs; and after what that thread already
        has (a trim, a follow written to the graph)."""
        args = (sealed.events, sealed.dedups, sealed.dead, sealed.progress, [*sealed.hooks, *sealed.state])
        if on_loop and self._storage.idle:
            self._store.append(*args)
        else:
            await loop.run_in_executor(self._storage, lambda: self._store.append(*args))

    async def _write_until_stored(self, loop: asyncio.AbstractEventLoop, sealed: _Sealed, on_loop: bool = True) -> None:
        """`_write`, retried with backoff while the disk or the database fails (disk full, I/O error): the batch is
        kept as it is and nothing is acknowledged meanwhile. Anything else the append raises is about the data."""
        while True:
            try:
                await self._write(loop, sealed, on_loop)
                return
            except STORAGE_ERRORS as exc:
                self._stall(True)
                self._metrics.inc("storage_errors")
                delay = self._backoff.next_delay()
                log.error("log append failed (%s); retrying in %.2fs", exc, delay)
                await asyncio.sleep(delay)

    async def _store_one_by_one(self, loop: asyncio.AbstractEventLoop, sealed: _Sealed) -> None:
        kept: list[Event] = []
        kept_dedups: list[str | None] = []
        for event, dedup in zip(sealed.events, sealed.dedups):
            one = _Sealed()
            one.events, one.dedups = [event], [dedup]
            one.hooks = [h for h in [self._hook([event]) if self._hook is not None else None] if h is not None]
            try:
                await self._write_until_stored(loop, one)
            except Exception as exc:
                sealed.dead.append(DeadLetter(event.source, "unstorable",
                                              f"the log cannot store this event: {exc}"[:300], event.body,
                                              event.ts_ms))
                continue
            kept.append(event)
            kept_dedups.append(dedup)
        sealed.events, sealed.dedups, sealed.hooks = kept, kept_dedups, []
        rest = _Sealed()
        rest.dead, rest.progress, rest.state = sealed.dead, sealed.progress, sealed.state
        await self._write_until_stored(loop, rest)

    def _committed(self, sealed: _Sealed) -> None:
        """Back on the loop after the commit: acknowledge, remember the keys, hand the events on."""
        n_records = sum(len(g.records) for g in sealed.groups)
        self._pending -= n_records
        self._pending_bytes -= sum(g.size for g in sealed.groups)
        events = sealed.events
        if events:
            keys = self._keys
            for event, dedup in zip(events, sealed.dedups):
                if dedup is not None:
                    keys.add(event.source, dedup)
            self._next_offset = events[-1].offset + 1
            self.last_offset = events[-1].offset
            self._metrics.inc("appended", len(events))
        if sealed.duplicates:
            self._metrics.inc("duplicates", sealed.duplicates)
        if sealed.dead:
            self._metrics.inc("deadlettered", len(sealed.dead))
            reasons = self._metrics.deadletter_reasons
            for letter in sealed.dead:
                reasons[letter.reason] += 1
        for group in sealed.groups:
            if group.done is not None:
                group.done()
        if self._room is not None and not self._room.done() and self.has_room():
            self._room.set_result(None)
        if events:
            for listener in self._listeners:
                try:
                    listener(events)
                except Exception:  # one broken consumer must not stop the log; it catches up from the log later
                    log.exception("a consumer failed to take a batch")
        for consumer in sealed.consumers:
            consumer.committed(sealed.progress[consumer.name])
        if sealed.dead and self._on_deadletters is not None:
            self._on_deadletters(sealed.dead)

    def _stall(self, stalled: bool) -> None:
        if stalled != self._stalled:
            self._stalled = stalled
            if self._room is not None and not self._room.done():
                self._room.set_result(None)  # room() re-checks

    async def close(self) -> None:
        """Commit everything pending, then one last progress commit, then stop."""
        self._accepting = False
        self._closing = True
        self._signal(True)
        if self._task is not None:
            await self._task

    async def commit_progress(self) -> None:
        """Commit every consumer's progress now (at shutdown, after the consumers drained)."""
        sealed = _Sealed()
        self._take_progress(sealed)
        if sealed.progress:
            await self._commit(asyncio.get_running_loop(), sealed)


def _settle(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
