"""A consumer of the log: batches from memory while its output keeps up, the log read back when it does not, and
its offset done strictly in order, whatever order its outputs finish in."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from gateway.event import Event, compact_json
from gateway.log.consumers import Consumer, Reader
from gateway.log.store import LogStore
from gateway.ops.metrics import Metrics
from tests.waiting import until


def reading(offset: int, kind: str = "telemetry") -> Event:
    payload = {"seq": offset}
    return Event(offset, f"{offset:028x}", "devices/d-1", kind, 1, payload, compact_json(payload), None)


class Output:
    """A sink whose batches finish when the test says so (or at once, with `auto`)."""

    name = "out"

    def __init__(self, auto: bool = True) -> None:
        self.auto = auto
        self.batches: list[list[int]] = []
        self.futures: list[asyncio.Future[Any]] = []
        self.room = asyncio.Event()
        self.room.set()

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any]:
        await self.room.wait()
        self.batches.append([e.offset for e in events])
        future = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        if self.auto:
            future.set_result(len(events))
        return future

    def state(self, results: list[Any]) -> Any:
        return ("state", sum(results))

    @property
    def delivered(self) -> list[int]:
        return [o for b in self.batches for o in b]


class Log:
    """A real log file, a reader for it, and the end offset as the appender would announce it."""

    def __init__(self, tmp: Path) -> None:
        self.store = LogStore(tmp / "log.db", fsync="off")
        self.executor = ThreadPoolExecutor(1)
        self.reader = Reader(LogStore(tmp / "log.db", reader=True), self.executor)
        self.end = 0

    def append(self, offsets: range) -> list[Event]:
        events = [reading(o) for o in offsets]
        self.store.append(events, [None] * len(events))
        self.end = events[-1].offset
        return events

    def consumer(self, out: Output, committed: int = 0, **kw: Any) -> Consumer:
        return Consumer(out, self.reader, lambda: self.end, committed, Metrics(), **kw)


def scenario(tmp: Path, body: Callable[[Log], Any]) -> None:
    async def main() -> None:
        log = Log(tmp)
        try:
            await body(log)
        finally:
            log.executor.shutdown()

    asyncio.run(main())


def test_a_consumer_that_keeps_up_takes_batches_from_memory_and_is_done_in_order(tmp_path):
    async def body(log: Log) -> None:
        out = Output(auto=False)
        c = log.consumer(out)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 4)))
        c.offer(log.append(range(4, 6)))
        await until(lambda: len(out.batches) == 2, "both batches delivered")
        assert out.batches == [[1, 2, 3], [4, 5]]
        out.futures[1].set_result(2)  # the second batch finishes first
        await asyncio.sleep(0.05)
        assert c.done == 0, "a batch is done only when every batch before it is"
        out.futures[0].set_result(3)
        await until(lambda: c.done == 5, "done in order")
        assert c.take_progress() == (5, ("state", 5))
        assert c.take_progress() is None  # nothing new since
        task.cancel()

    scenario(tmp_path, body)


def test_a_consumer_behind_the_log_at_start_reads_back_from_its_offset_then_goes_live(tmp_path):
    async def body(log: Log) -> None:
        log.append(range(1, 1001))
        out = Output()
        c = log.consumer(out, committed=400, batch_max=250)
        assert c.behind
        task = asyncio.create_task(c.run())
        await until(lambda: c.done == 1000, "caught up")
        assert not c.behind and out.delivered == list(range(401, 1001))
        c.offer(log.append(range(1001, 1003)))  # from memory now
        await until(lambda: c.done == 1002, "the live batch")
        assert out.batches[-1] == [1001, 1002]
        task.cancel()

    scenario(tmp_path, body)


def test_a_consumer_whose_output_is_slow_drops_its_queue_and_reads_back_without_losing_or_repeating(tmp_path):
    async def body(log: Log) -> None:
        out = Output()
        out.room.clear()  # the output cannot take anything for now
        c = log.consumer(out, max_live=10)
        task = asyncio.create_task(c.run())
        for start in range(1, 60, 6):
            c.offer(log.append(range(start, start + 6)))
            await asyncio.sleep(0)
        assert c.behind, "more than max_live events waited: the consumer reads the log instead"
        out.room.set()
        await until(lambda: c.done == log.end, "caught up")
        assert out.delivered == list(range(1, log.end + 1))
        task.cancel()

    scenario(tmp_path, body)


def test_a_batch_whose_output_failed_is_delivered_again_from_the_log(tmp_path):
    async def body(log: Log) -> None:
        out = Output(auto=False)
        c = log.consumer(out)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 4)))
        await until(lambda: out.futures, "delivered")
        out.futures[0].set_exception(ConnectionError("the output gave up"))
        out.auto = True
        await until(lambda: c.done == 3, "delivered again")
        assert out.batches == [[1, 2, 3], [1, 2, 3]]
        task.cancel()

    scenario(tmp_path, body)


def test_a_gated_consumer_never_delivers_past_its_gate(tmp_path):
    async def body(log: Log) -> None:
        gate = [2]
        asked: list[int] = []
        out = Output()
        c = log.consumer(out, gate=lambda: gate[0])
        c.on_gated = lambda: asked.append(1)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 3)))
        c.offer(log.append(range(3, 5)))
        await until(lambda: c.done == 2, "up to the gate")
        await asyncio.sleep(0.05)
        assert out.delivered == [1, 2] and asked, "it waits, and asks the gate's owner to hurry"
        gate[0] = 4
        c.gate_moved()
        await until(lambda: c.done == 4, "past the old gate")
        task.cancel()

    scenario(tmp_path, body)


def test_events_a_consumer_does_not_want_still_move_its_offset(tmp_path):
    async def body(log: Log) -> None:
        out = Output()
        c = log.consumer(out, accept=lambda e: e.offset % 2 == 0)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 6)))
        c.offer(log.append(range(7, 8)))
        await until(lambda: c.done == 7, "done")
        assert out.delivered == [2, 4]
        task.cancel()

    scenario(tmp_path, body)


def test_draining_delivers_what_was_offered_and_waits_for_it(tmp_path):
    async def body(log: Log) -> None:
        out = Output(auto=False)
        c = log.consumer(out)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 3)))
        drained = asyncio.ensure_future(c.drain())
        await until(lambda: out.futures, "delivered")
        await asyncio.sleep(0.05)
        assert not drained.done(), "the output has not finished yet"
        out.futures[0].set_result(2)
        await asyncio.wait_for(drained, 5)
        assert c.done == 2 and task.done()

    scenario(tmp_path, body)


def test_a_gated_consumer_drains_at_once_without_waiting_for_its_gate(tmp_path):
    async def body(log: Log) -> None:
        out = Output()
        c = log.consumer(out, gate=lambda: 0, accept=lambda e: e.offset == 2)
        task = asyncio.create_task(c.run())
        c.offer(log.append(range(1, 2)))  # nothing it wants: no gate to wait for
        await until(lambda: c.done == 1, "the unwanted batch passes the gate")
        c.offer(log.append(range(2, 3)))  # wanted, beyond the gate, which will not move: the shutdown comes
        await asyncio.wait_for(c.drain(), 5)
        assert out.delivered == [] and c.done == 1 and task.done()

    scenario(tmp_path, body)
