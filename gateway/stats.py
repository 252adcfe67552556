"""Live engagement responses: retained `events/{event_id}/stats` for end users, points for the dashboards.

The committer marks event ids whose counts changed; every `social.stats_interval_ms` the changed ones are read in
one query and published, so a burst of likes on one post becomes one update per interval (coalesced), and a change
is visible within the interval plus one commit. Points: measurement `engagement` (tags event, author; fields
likes, reposts, replies, impressions) and `revenue` (tags advertiser, event, author; field revenue), as snapshots
of the running totals at the time of writing.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from concurrent.futures import Executor
from typing import Awaitable, Callable

from gateway.engagement import Counts, Engagement, stats_payload
from gateway.fanout import stats_topic
from gateway.metrics import Metrics
from gateway.sinks.lineprotocol import Point, encode

log = logging.getLogger(__name__)


def points(counts: list[Counts], ts_ns: int) -> list[Point]:
    out: list[Point] = []
    for c in counts:
        out.append(Point("engagement", (("author", c.author), ("event", c.event_id)),
                         (("likes", c.likes), ("reposts", c.reposts), ("replies", c.replies),
                          ("impressions", c.impressions)), ts_ns))
        if c.sponsor is not None:
            out.append(Point("revenue", (("advertiser", c.sponsor), ("author", c.author), ("event", c.event_id)),
                             (("revenue", c.revenue_micros / 1e6), ("impressions", c.impressions)), ts_ns))
    return out


class StatsPublisher:
    def __init__(self, engagement: Engagement, storage: Executor, publish: Callable[[str, bytes], Awaitable[None]],
                 to_outbox: Callable[[bytes, int], None], outbox_storage: Executor, interval: float,
                 metrics: Metrics) -> None:
        self._engagement = engagement
        self._storage = storage
        self._publish = publish
        self._to_outbox = to_outbox
        self._outbox_storage = outbox_storage
        self._interval = interval
        self._metrics = metrics
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()

    def mark(self, event_ids: set[str]) -> None:
        self._dirty |= event_ids
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush(loop)
            await asyncio.sleep(self._interval)  # coalesce whatever changes meanwhile into the next update

    async def flush(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._dirty:
            return
        ids, self._dirty = self._dirty, set()
        try:
            counts = await loop.run_in_executor(self._storage, self._engagement.counts, ids)
        except (sqlite3.Error, OSError) as exc:
            self._dirty |= ids  # try again next interval
            self._metrics.inc("storage_errors")
            log.error("stats: %s", exc)
            return
        for c in counts:
            await self._publish(stats_topic(c.event_id), stats_payload(c))
        self._metrics.inc("stats_published", len(counts))
        pts = points(counts, time.time_ns())
        if pts:
            try:
                await loop.run_in_executor(self._outbox_storage, self._to_outbox, encode(pts), len(pts))
            except (sqlite3.Error, OSError) as exc:  # the live topics went out; these snapshots are skipped
                self._metrics.inc("storage_errors")
                log.error("stats points not stored: %s", exc)
