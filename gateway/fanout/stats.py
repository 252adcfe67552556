"""The live counts consumer: retained `events/{id}/stats` for subscribers, snapshots for the dashboards.

It reads the log's posts and interactions behind the feeds consumer (its gate is the feeds offset committed to
disk), so the impressions of every delivery before it are already counted when it reads the counts. Every
`interval` the posts touched since the last update are read in one query and published, so a burst of likes on one
post becomes one update per interval. A batch is done when its updates were acknowledged by the broker; after a
crash the batches after its committed offset are read back and their posts published again (the same totals), so
the last word on every post reaches subscribers, whatever moment the gateway died.

Snapshots (measurement `engagement`: tags event, author; fields likes, reposts, replies, impressions; and `revenue`:
tags advertiser, event, author; fields revenue, impressions) carry the running totals at the time of writing. A new
post's first snapshot comes with a point of zeros at the time it was logged (the time in its id): true then, and
the baseline that lets a dashboard sum each post's increases per interval (InfluxQL `difference`) without losing
what happened before its first snapshot. Written again on a replay, it is the same point.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol, Sequence

from gateway.envelope import stats_topic
from gateway.event import KIND_POST, Event, InTransaction, Point, event_ms
from gateway.fanout.engagement import Counts, stats_payload, touched
from gateway.ops.metrics import Metrics

log = logging.getLogger(__name__)


class Publisher(Protocol):
    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Any = None) -> bool: ...

    async def room(self) -> None: ...


def points(counts: Sequence[Counts], ts_ns: int, born_ns: Mapping[str, int] | None = None) -> list[Point]:
    """Snapshots of `counts` at `ts_ns`, and zeros at `born_ns[event_id]` for the posts that are new."""
    out: list[Point] = []
    for c in counts:
        born = born_ns.get(c.event_id) if born_ns else None
        if born is not None:
            out.append(Point("engagement", (("author", c.author), ("event", c.event_id)),
                             (("likes", 0), ("reposts", 0), ("replies", 0), ("impressions", 0)), born))
            if c.sponsor is not None:
                out.append(Point("revenue", (("advertiser", c.sponsor), ("author", c.author),
                                             ("event", c.event_id)), (("revenue", 0.0), ("impressions", 0)), born))
        out.append(Point("engagement", (("author", c.author), ("event", c.event_id)),
                         (("likes", c.likes), ("reposts", c.reposts), ("replies", c.replies),
                          ("impressions", c.impressions)), ts_ns))
        if c.sponsor is not None:
            out.append(Point("revenue", (("advertiser", c.sponsor), ("author", c.author), ("event", c.event_id)),
                             (("revenue", c.revenue_micros / 1e6), ("impressions", c.impressions)), ts_ns))
    return out


class _Acks:
    __slots__ = ("pending", "done")

    def __init__(self, done: asyncio.Future[Any]) -> None:
        self.pending = 0
        self.done = done

    def acked(self) -> None:
        self.pending -= 1
        if self.pending == 0 and not self.done.done():
            self.done.set_result(None)


class StatsSink:

    def __init__(self, publisher: Publisher, read_counts: Callable[[set[str]], Awaitable[list[Counts]]],
                 put_points: Callable[[Sequence[Point]], bool], interval: float, metrics: Metrics, *,
                 name: str = "stats", topic: Callable[[str], bytes] = stats_topic,
                 counter: str = "stats_published") -> None:
        """`name`, `topic` and `counter` differ for the upstream link's copy (gateway/sinks/upstream.py): the same
        counts, to the central broker, at its own offset."""
        self.name = name
        self._topic = topic
        self._counter = counter
        self._publisher = publisher
        self._read_counts = read_counts
        self._put_points = put_points
        self._interval = interval
        self._metrics = metrics
        self._dirty: set[str] = set()
        self._born: dict[str, int] = {}  # new posts among the dirty: their log time (ns), for the zero snapshot
        self._next: asyncio.Future[Any] | None = None  # the update that will carry what is dirty now
        self._last = 0.0

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any] | None:
        ids = touched(events)
        if not ids:
            return None
        self._dirty |= ids
        for e in events:
            if e.kind == KIND_POST:
                self._born[e.id] = event_ms(e.id) * 1_000_000
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            asyncio.ensure_future(self._update(self._next))
        return self._next

    def state(self, results: list[Any]) -> InTransaction | None:
        return None

    async def _update(self, done: asyncio.Future[Any]) -> None:
        wait = self._interval - (time.monotonic() - self._last)
        if wait > 0:
            await asyncio.sleep(wait)  # coalesce whatever changes meanwhile into this update
        ids, self._dirty, self._next = self._dirty, set(), None
        born, self._born = self._born, {}
        self._last = time.monotonic()
        try:
            counts = await self._read_counts(ids)
        except Exception as exc:  # the consumer reads these events again from the log
            done.set_exception(exc)
            return
        acks = _Acks(done)
        for c in counts:
            acks.pending += 1
            topic, body = self._topic(c.event_id), stats_payload(c)
            while not self._publisher.publish(topic, body, 1, True, acks):
                await self._publisher.room()
        self._metrics.inc(self._counter, len(counts))
        pts = points(counts, time.time_ns(), born)
        if pts:
            self._put_points(pts)
        if acks.pending == 0 and not done.done():
            done.set_result(None)
