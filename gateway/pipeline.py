"""The processing stage: log -> filters -> follower lookup -> fan-out -> metrics outbox -> progress.

    ingest log ──read batch──▶ anomaly model (one ONNX run per batch)
                                   │
                                   ▼
              follower graph ──▶ publish envelopes (QoS 1) to feeds/{follower}/..., alerts/{device}
                                   │
                     commit queue (bounded: max_unacked_batches)
                                   │
              all PUBACKs of the batch ──▶ points into the outbox ──▶ progress committed in the log

Two tasks: the reader/processor runs ahead publishing the next batches while the committer waits for the broker's
acknowledgements of earlier ones, in order. Progress moves only when a batch was fully delivered and its points are
in the outbox, so after a crash the gateway re-processes from the last committed offset: followers may see an event
twice (same `id`), never miss one. If the broker lost our session (unacknowledged publishes are gone), the processor
rewinds to the committed offset and publishes again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

from gateway.config import Config
from gateway.event import KIND_TELEMETRY, Event, Verdict
from gateway.engagement import Engagement, Plan
from gateway.fanout import alert_topic, envelope, feed_topic, notice, notice_topic, quarantine_topic
from gateway.graph import FollowerGraph
from gateway.ingest import Ingestor
from gateway.ingest_log import IngestLog
from gateway.metrics import Metrics
from gateway.mqtt_link import AckBatch, MqttLink, SessionLost
from gateway.outbox import Outbox
from gateway.sinks.lineprotocol import Point, encode
from gateway.user_events import KIND_INTERACTION, KIND_POST

BLOCKED = "blocked"  # the content policy's label for posts that are quarantined instead of delivered

log = logging.getLogger(__name__)


class Detector(Protocol):
    def score(self, items: Sequence[tuple[str, dict[str, float]]]) -> list[Verdict]: ...


class TextScorer(Protocol):
    def score(self, texts: Sequence[str]) -> list[Verdict]: ...


@dataclass(frozen=True, slots=True)
class ProcessedBatch:
    generation: int
    first_offset: int
    last_offset: int
    events: int
    deliveries: int
    alerts: int
    acks: AckBatch
    lines: bytes
    points: int
    started: float
    impressions: dict[str, int]  # event id -> deliveries of it to feeds in this batch
    revenue_micros: dict[str, int]
    changed: set[str]  # event ids whose live stats changed


def measurements(payload: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in payload.items() if k != "seq" and k != "ts"}


def telemetry_point(event: Event, verdict: Verdict | None) -> Point:
    """One point per reading. The timestamp is the reading's millisecond plus the log offset as nanoseconds, so
    two readings of one device in the same millisecond stay two points, and re-writing the same event after a
    crash produces the identical point (InfluxDB overwrites it: idempotent)."""
    fields: list[tuple[str, float | int | bool | str]] = list(measurements(event.payload).items())
    seq = event.payload.get("seq")
    if seq is not None:
        fields.append(("seq", int(seq)))
    anomalous = "false"
    if verdict is not None:
        fields.append(("anomaly_score", verdict.score))
        if verdict.flagged:
            anomalous = "true"
    return Point(
        "telemetry",
        (("anomaly", anomalous), ("device", event.source_id)),
        tuple(fields),
        event.ts_ms * 1_000_000 + event.offset % 1_000_000,
    )


class Pipeline:
    def __init__(self, cfg: Config, ingest_log: IngestLog, storage: Executor, outbox: Outbox,
                 outbox_storage: Executor, graph: FollowerGraph, link: MqttLink, detector: Detector | None,
                 ingestor: Ingestor, metrics: Metrics, content: TextScorer | None = None,
                 engagement: Engagement | None = None,
                 on_changed: Callable[[set[str]], None] | None = None) -> None:
        self._cfg = cfg
        self._log = ingest_log
        self._storage = storage
        self._outbox = outbox
        self._outbox_storage = outbox_storage
        self._graph = graph
        self._link = link
        self._detector = detector
        self._content = content
        self._engagement = engagement
        self._on_changed = on_changed
        self._ingestor = ingestor
        self._metrics = metrics
        self._queue: asyncio.Queue[ProcessedBatch] = asyncio.Queue(cfg.pipeline.max_unacked_batches)
        self._generation = 0
        self._rewind_to: int | None = None
        self._draining = False
        self._verdicts_saved_upto = 0  # events up to here may have verdicts from before a restart
        self.cursor = 0  # last offset handed to fan-out
        self.committed = 0  # last offset whose processing finished
        metrics.gauge("commit_queue", self._queue.qsize)
        metrics.gauge("log_lag", lambda: self.cursor - self.committed)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.committed = self.cursor = await loop.run_in_executor(self._storage, self._log.committed)
        self._verdicts_saved_upto = await loop.run_in_executor(self._storage, self._log.last_offset)
        log.info("pipeline resumes after offset %d", self.cursor)
        committer = asyncio.create_task(self._commit_loop(), name="pipeline-committer")
        try:
            await self._process_loop()
            await self._queue.join()
        finally:
            committer.cancel()

    def drain(self) -> None:
        """Finish what is in the log, then return from run()."""
        self._draining = True
        self._ingestor.appended.set()

    async def _process_loop(self) -> None:
        appended = self._ingestor.appended
        linger = self._cfg.pipeline.linger_ms / 1000
        while True:
            if self._rewind_to is not None:
                self.cursor, self._rewind_to = self._rewind_to, None
            appended.clear()
            events = await self._stored(self._storage, self._log.read, self.cursor, self._cfg.pipeline.batch_max)
            if not events:
                if self._draining and self._ingestor.pending == 0:
                    return
                await appended.wait()
                if linger:
                    await asyncio.sleep(linger)
                continue
            batch = await self._process(events)
            await self._queue.put(batch)
            self.cursor = batch.last_offset

    async def _process(self, events: list[Event]) -> ProcessedBatch:
        started = time.perf_counter()
        verdicts = await self._verdicts(events)
        blocked = {o for o, v in verdicts.items() if v.label == BLOCKED}
        envelopes = {e.offset: envelope(e, (verdicts[e.offset],) if e.offset in verdicts else ())
                     for e in events if e.kind != KIND_INTERACTION}
        social = [e for e in events if e.kind in (KIND_POST, KIND_INTERACTION)]
        plan = Plan()
        if social and self._engagement is not None:
            plan = await self._stored(
                self._storage, self._engagement.apply, social,
                {e.offset: envelopes[e.offset] for e in social if e.kind == KIND_POST}, blocked,
                self._graph.followers)
            if plan.ignored:
                self._metrics.inc("interactions_ignored", plan.ignored)

        await self._link.connected.wait()
        tracker = self._link.tracker
        qos = self._cfg.pipeline.feed_qos
        generation = self._generation
        deliveries = alerts = 0
        impressions: dict[str, int] = {}
        revenue: dict[str, int] = {}
        points: list[Point] = []
        followers = self._graph.followers
        link = self._link
        acks = tracker.open()
        try:
            for event in events:
                kind = event.kind
                if kind == KIND_TELEMETRY:
                    verdict = verdicts.get(event.offset)
                    body = envelopes[event.offset]
                    for follower in followers(event.source):
                        topic = feed_topic(follower, event)
                        if not link.try_publish(topic, body, qos):
                            await link.publish(topic, body, qos)
                    deliveries += len(followers(event.source))
                    if verdict is not None and verdict.flagged:
                        await link.publish(alert_topic(event), body, qos=1)
                        alerts += 1
                    points.append(telemetry_point(event, verdict))
                    continue
                if kind == KIND_POST:
                    author = event.source_id
                    body = envelopes[event.offset]
                    if event.offset in blocked:
                        await link.publish(quarantine_topic(author), body, qos=1)
                        await link.publish(notice_topic(author), notice(event, verdicts[event.offset]), qos=1)
                        self._metrics.inc("quarantined")
                        continue
                    to = set(followers(event.source))
                    reply_author = plan.reply_authors.get(event.offset)
                    if reply_author is not None:
                        to.add(reply_author)
                    to.discard(author)
                    topic_tail = f"{event.source}/{kind}"
                    sponsor = event.payload.get("sponsor")
                elif event.offset in plan.reposts:  # a repost: the original goes to the reposter's followers
                    original, to_list = plan.reposts[event.offset]
                    to, body, event_id = set(to_list), original.envelope, original.event_id
                    topic_tail = f"users/{original.author}/{KIND_POST}"
                    sponsor = original.sponsor
                else:
                    continue  # likes and unlikes are counted, not delivered
                for follower in to:
                    topic = f"feeds/{follower}/{topic_tail}"
                    if not link.try_publish(topic, body, qos):
                        await link.publish(topic, body, qos)
                if to:
                    counted = event.id if kind == KIND_POST else event_id
                    impressions[counted] = impressions.get(counted, 0) + len(to)
                    if sponsor is not None:
                        revenue[counted] = revenue.get(counted, 0) + len(to) * self._cfg.social.micros_per_impression(
                            sponsor)
                    deliveries += len(to)
        finally:
            tracker.seal()
        if alerts:
            self._metrics.inc("anomalies", alerts)
        return ProcessedBatch(generation, events[0].offset, events[-1].offset, len(events), deliveries, alerts,
                              acks, encode(points), len(points), started, impressions, revenue,
                              plan.changed | impressions.keys())

    async def _verdicts(self, events: list[Event]) -> dict[int, Verdict]:
        """The models' verdicts for a batch: computed once, stored before anything is published, and reused when
        the batch is replayed after a crash, so followers and InfluxDB see the same verdict both times."""
        saved: dict[int, str] = {}
        if events[0].offset <= self._verdicts_saved_upto:
            saved = await self._stored(self._storage, self._log.saved_verdicts, events[0].offset,
                                       events[-1].offset)
        fresh = [e for e in events if e.offset not in saved]
        verdicts = {o: Verdict.from_json(v) for o, v in saved.items()}
        if fresh:
            new = self._score(fresh)
            if new:
                await self._stored(self._storage, self._log.save_verdicts,
                                   [(o, v.to_json()) for o, v in new.items()])
                self._verdicts_saved_upto = max(self._verdicts_saved_upto, max(new))
            verdicts.update(new)
        return verdicts

    def _score(self, events: list[Event]) -> dict[int, Verdict]:
        """One model run per model per batch."""
        verdicts: dict[int, Verdict] = {}
        telemetry = [e for e in events if e.kind == KIND_TELEMETRY]
        if self._detector is not None and telemetry:
            scored = self._detector.score([(e.source, measurements(e.payload)) for e in telemetry])
            verdicts.update((e.offset, v) for e, v in zip(telemetry, scored))
            self._metrics.inc("filtered", len(telemetry))
        posts = [e for e in events if e.kind == KIND_POST]
        if self._content is not None and posts:
            scored = self._content.score([e.payload["text"] for e in posts])
            verdicts.update((e.offset, v) for e, v in zip(posts, scored))
            self._metrics.inc("filtered", len(posts))
        return verdicts

    async def _commit_loop(self) -> None:
        """Commit batches in order. Whatever is queued when the committer comes round is committed together:
        one wait for acknowledgements, one outbox write, one progress commit, however many batches that is."""
        while True:
            group = [await self._queue.get()]
            while not self._queue.empty():
                group.append(self._queue.get_nowait())
            try:
                await self._commit_group([b for b in group if b.generation == self._generation])
            finally:
                for _ in group:
                    self._queue.task_done()

    async def _commit_group(self, group: list[ProcessedBatch]) -> None:
        if not group:
            return  # published before a rewind; they will be processed again
        try:
            for batch in group:
                await batch.acks.future
        except SessionLost:
            self._metrics.inc("session_lost")
            log.warning("broker lost our session; re-publishing from offset %d", self.committed)
            self._generation += 1
            self._rewind_to = self.committed
            self._ingestor.appended.set()
            return
        impressions: dict[str, int] = {}
        revenue: dict[str, int] = {}
        changed: set[str] = set()
        for batch in group:
            for key, n in batch.impressions.items():
                impressions[key] = impressions.get(key, 0) + n
            for key, n in batch.revenue_micros.items():
                revenue[key] = revenue.get(key, 0) + n
            changed |= batch.changed
            self._metrics.inc("delivered", batch.deliveries)
            self._metrics.inc("alerts", batch.alerts)
        await self._wait_for_outbox_room()
        points = sum(b.points for b in group)
        if points:
            lines = b"".join(b.lines for b in group)
            await self._stored(self._outbox_storage, self._outbox.put, lines, points)
            self._metrics.inc("points", points)
        also = None
        if impressions:
            also = functools.partial(Engagement.add_impressions, impressions=impressions, revenue_micros=revenue)
        last = group[-1].last_offset
        await self._stored(self._storage, functools.partial(self._log.commit, last, also=also))
        self.committed = last
        if changed and self._on_changed is not None:
            self._on_changed(changed)
        now = time.perf_counter()
        for batch in group:
            self._metrics.inc("committed", batch.events)
            self._metrics.observe_latency((now - batch.started) * 1000)

    async def _stored(self, executor: Executor, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a storage call on its thread; on a storage error (disk full, I/O error) wait and try again rather
        than give up. Every call here is one transaction, so a failed one left nothing behind. Meanwhile the
        pipeline holds, the ingestor's own retries stop acknowledgements, and the sources keep their data."""
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            try:
                return await loop.run_in_executor(executor, fn, *args)
            except (sqlite3.Error, OSError) as exc:
                self._metrics.inc("storage_errors")
                log.error("storage error in the pipeline (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _wait_for_outbox_room(self) -> None:
        warned = False
        while self._outbox.over_budget():
            if not warned:
                log.error("InfluxDB outbox is over its disk budget: holding the pipeline (nothing is dropped)")
                warned = True
            self._metrics.inc("backpressure_waits")
            await asyncio.sleep(0.5)
