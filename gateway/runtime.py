"""The supervisor: builds the stages, starts them in order, and shuts them down in order under a deadline.

    MQTT source ─▶ Ingestor (group commit) ─▶ ingest log ─▶ Pipeline ─▶ feeds / alerts (MQTT)
                                                                  └──▶ outbox ─▶ Drainer thread ─▶ InfluxDB

Start: storage, graph, model, outbox drainer, pipeline, then the MQTT connection (sources last, so nothing is
acknowledged before the stages behind it run). Stop (SIGTERM/SIGINT): stop taking messages (disconnect from the
broker: unacknowledged messages stay queued there for our session), flush the ingestor, let the pipeline finish
what is in the log, flush the outbox to the database briefly, close files. If the deadline passes, the rest is
cancelled; everything acknowledged is already in the log, so the next start resumes it (followers may then see
some events twice).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from devices.profiles import ProfileIndex, load_dir
from gateway.config import Config, InfluxConfig
from gateway.fanout import DEADLETTER_TOPIC
from gateway.graph import FollowerGraph
from gateway.health import HealthServer
from gateway.ingest import Ingestor
from gateway.ingest_log import DeadLetter, IngestLog
from gateway.metrics import Metrics
from gateway.mqtt_link import MqttLink
from gateway.outbox import Drainer, Outbox
from gateway.engagement import Engagement
from gateway.pipeline import Detector, Pipeline, TextScorer
from gateway.stats import StatsPublisher
from gateway.sinks.influx import InfluxV1Writer, InfluxV2Writer, Writer
from gateway.sinks.lineprotocol import Point, encode
from gateway.sources.mqtt import MqttSource
from gateway.sources.serial import SerialSettings, SerialSources
from gateway.systemd import Notifier

log = logging.getLogger(__name__)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


def make_writer(cfg: InfluxConfig) -> Writer:
    if cfg.api == "v2":
        return InfluxV2Writer(cfg.url, cfg.org, cfg.database, cfg.token, cfg.timeout)
    user, _, password = cfg.token.partition(":")
    return InfluxV1Writer(cfg.url, cfg.database, cfg.timeout, username=user or None, password=password or None)


def load_detector(cfg: Config) -> Detector | None:
    if not cfg.anomaly.enabled:
        return None
    from gateway.filters.anomaly import AnomalyDetector

    return AnomalyDetector(cfg.model_path(), threshold=cfg.anomaly.threshold or None,
                           max_series=cfg.anomaly.max_series)


def load_content_filter(cfg: Config) -> TextScorer | None:
    if not cfg.content.enabled:
        return None
    from gateway.filters.content import ContentClassifier

    return ContentClassifier(cfg.content_model_path(), mark_threshold=cfg.content.mark_threshold or None,
                             block_threshold=cfg.content.block_threshold or None)


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        data = Path(cfg.storage.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        # One thread owns the ingest log (appends, reads, commits); one the outbox writes; the drainer has its own.
        self.storage = ThreadPoolExecutor(1, thread_name_prefix="ingest-log")
        self.outbox_storage = ThreadPoolExecutor(1, thread_name_prefix="outbox")
        self.log = IngestLog(data / "log.db", cfg.storage.fsync)
        self.graph = FollowerGraph(data / "graph.db")
        self.outbox = Outbox(data / "outbox.db", cfg.influx.outbox_max_bytes,
                             synchronous="normal" if cfg.storage.fsync == "normal" else "full")
        self.drainer: Drainer | None = None
        self.failed = False
        self.health_address: str | None = None
        self.notifier = Notifier()
        if cfg.influx.api != "none":
            self.drainer = Drainer(self.outbox, make_writer(cfg.influx), flush_interval=cfg.influx.flush_interval)
        self.profiles = ProfileIndex(load_dir(cfg.profiles_path()))
        self.detector = load_detector(cfg)
        self.content = load_content_filter(cfg)
        self.engagement = Engagement(self.log.connection)
        self._deadletter_bucket = TokenBucket(cfg.limits.deadletter_per_second, cfg.limits.deadletter_per_second)
        self._log_bytes = 0
        self.ingestor: Ingestor
        self.link: MqttLink
        self.pipeline: Pipeline
        self.serial: SerialSources | None = None

    def _log_over_budget(self) -> bool:
        return self._log_bytes >= self.cfg.storage.max_log_bytes

    def _publish_deadletters(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            if self.link.connected.is_set() and self._deadletter_bucket.take():
                self.link.try_publish(DEADLETTER_TOPIC, json.dumps(letter.as_dict()).encode(), qos=0)
                self.metrics.inc("deadletters_published")
            else:
                self.metrics.inc("deadletters_suppressed")

    def _build(self) -> None:
        cfg = self.cfg
        self.ingestor = Ingestor(self.log, self.storage, self.metrics, batch_max=cfg.storage.batch_max,
                                 max_pending=cfg.mqtt.max_inflight, on_deadletters=self._publish_deadletters,
                                 over_budget=self._log_over_budget,
                                 on_committed=lambda tokens: self.link.puback(tokens))
        source = MqttSource(self.ingestor, self.graph, self.storage, self.profiles, cfg.limits, self.metrics,
                            cfg.social)
        self.link = MqttLink(cfg.mqtt, self.metrics, source.handle,
                             [cfg.mqtt.telemetry_topic, cfg.mqtt.follows_topic, "users/+/posts",
                              "users/+/interactions"], take=source.take, read_gate=self.ingestor)
        link = self.link
        self.stats = StatsPublisher(self.engagement, self.storage,
                                    lambda topic, body: link.publish(topic, body, qos=1, retain=True),
                                    self.outbox.put, self.outbox_storage, cfg.social.stats_interval_ms / 1000,
                                    self.metrics)
        self.pipeline = Pipeline(cfg, self.log, self.storage, self.outbox, self.outbox_storage, self.graph,
                                 self.link, self.detector, self.ingestor, self.metrics, content=self.content,
                                 engagement=self.engagement, on_changed=self.stats.mark)
        m = self.metrics
        m.gauge("ingest_pending", lambda: self.ingestor.pending)
        m.gauge("ingest_pending_peak", lambda: self.ingestor.pending_peak)
        m.gauge("mqtt_in_flight", lambda: self.link.tracker.in_flight)
        m.gauge("mqtt_connected", lambda: float(self.link.connected.is_set()))
        m.gauge("outbox_points", lambda: self.outbox.backlog()[1])
        m.gauge("outbox_bytes", lambda: self.outbox.backlog()[2])
        m.gauge("log_bytes", lambda: self._log_bytes)
        m.gauge("graph_edges", self.graph.edges)
        if cfg.serial.ports:
            sc = cfg.serial
            self.serial = SerialSources(
                sc.ports, self.ingestor, load_dir(cfg.profiles_path()),
                SerialSettings(sc.baud, sc.profile, sc.reopen_min, sc.reopen_max, sc.rescan_interval,
                               sc.max_queued_frames, cfg.limits.max_fields, sc.noise_deadletters_per_second),
                self.metrics)
            serial = self.serial
            m.gauge("serial_connected", lambda: serial.connected())
        if self.drainer is not None:
            drainer = self.drainer
            m.gauge("written", lambda: drainer.stats().written_points)
            m.gauge("retried", lambda: drainer.stats().retried)
            m.gauge("write_dropped", lambda: drainer.stats().dead_points)

    async def run(self, stop: asyncio.Event, deadline: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        self._build()
        self.ingestor.start()
        if self.drainer is not None:
            self.drainer.start()
        pipeline = asyncio.create_task(self.pipeline.run(), name="pipeline")
        housekeeping = asyncio.create_task(self._housekeeping(), name="housekeeping")
        stats = asyncio.create_task(self.stats.run(), name="stats")
        for task in (self.ingestor.task, pipeline, housekeeping, stats):
            task.add_done_callback(functools.partial(self._supervise, stop))
        health = None
        if self.cfg.health.listen:
            health = HealthServer(self.cfg.health.listen, self.status, self._problem)
            try:
                await health.start()
                self.health_address = f"{self.cfg.health.listen.rpartition(':')[0]}:{health.port}"
            except OSError as exc:  # a port in use must not keep the gateway from doing its job
                log.error("health endpoint not started on %s: %s", self.cfg.health.listen, exc)
                health = None
        # Ready once the local stages run: the broker may be down at boot, and the gateway's job then is to keep
        # trying (STATUS says so), not to be killed by systemd's start timeout.
        self.notifier.ready(f"connecting to {self.cfg.mqtt.broker}")
        await self.link.connect()
        if self.serial is not None:  # after the MQTT link, like the MQTT source: the stages behind it are running
            self.serial.start()
        log.info("gateway running: broker %s, data %s, influx %s", self.cfg.mqtt.broker,
                 self.cfg.storage.data_dir, self.cfg.influx.api)
        await stop.wait()
        log.info("shutting down (deadline %.0fs)", deadline)
        self.notifier.stopping()
        try:
            await asyncio.wait_for(self._shutdown(pipeline), deadline * 0.8)
        except (asyncio.TimeoutError, TimeoutError):
            log.error("shutdown deadline passed; cancelling. Everything acknowledged is in the log; events after "
                      "offset %d will be processed again on the next start (duplicates are possible)",
                      self.pipeline.committed)
            pipeline.cancel()
        housekeeping.cancel()
        stats.cancel()
        if health is not None:
            await health.close()
        if self.link.client.is_connected:  # the deadline passed before the orderly disconnect
            await self.link.close()
        await self._write_metrics_point(loop)
        self._write_status()  # the final word: what was appended and committed when we stopped
        if self.drainer is not None:
            budget = max(1.0, deadline * 0.15)
            await loop.run_in_executor(None, self.drainer.flush, budget / 2)  # the points of the last moments too
            await loop.run_in_executor(None, self.drainer.stop, budget / 2)
        self.storage.submit(self.log.close).result()
        self.outbox_storage.submit(self.outbox.close).result()
        self.graph.close()
        self.storage.shutdown()
        self.outbox_storage.shutdown()
        self.notifier.close()

    def _supervise(self, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        """A stage that ends on its own before shutdown is a bug: stop the daemon loudly (exit status 1) so that
        systemd restarts it, instead of running on with a dead stage while the sources keep acknowledging."""
        if task.cancelled() or stop.is_set():
            return
        exc = task.exception()
        log.critical("stage %s stopped unexpectedly (%r); shutting down", task.get_name(), exc, exc_info=exc)
        self.failed = True
        stop.set()

    async def _shutdown(self, pipeline: asyncio.Task[None]) -> None:
        if self.serial is not None:
            await self.serial.close()  # first: no new frames; what is not yet ACKed, the devices resend
        # Stop logging new MQTT messages but stay connected: what is logged still has to be delivered, and the
        # broker keeps every message we have not acknowledged for our session.
        self.ingestor.stop_accepting()
        await self.ingestor.close()
        self.pipeline.drain()
        if not pipeline.done():  # a pipeline that died is reported by _supervise; there is nothing to drain
            await pipeline
        await self.stats.flush(asyncio.get_running_loop())
        await self.link.close()

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        last_metrics = last_trim = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            try:
                self._log_bytes = await loop.run_in_executor(self.storage, self.log.size_bytes)
                await loop.run_in_executor(self.storage, self.graph.refresh_if_changed)
                self._write_status()
                if now - last_metrics >= self.cfg.influx.metrics_interval:
                    last_metrics = now
                    await self._write_metrics_point(loop)
                if now - last_trim >= 60:
                    last_trim = now
                    cutoff = int(time.time() * 1000 - self.cfg.storage.retention_hours * 3_600_000)
                    await loop.run_in_executor(self.storage, self.log.trim, cutoff)
            except (sqlite3.Error, OSError) as exc:  # a full disk: say so, keep going, try again next second
                self.metrics.inc("storage_errors")
                log.error("housekeeping: %s", exc)
            self._notify_systemd()

    def _notify_systemd(self) -> None:
        """Status text every second, and the watchdog keep-alive: sent from here because this loop needs both the
        event loop and the storage thread to make progress, so a hung loop or a hung disk stops the keep-alives and
        systemd restarts the daemon. A broker or database outage does not: restarting cannot cure those."""
        if not self.notifier.enabled:
            return
        problem = self._problem()
        text = f"committed offset {self.pipeline.committed}; " + (problem or "healthy")
        if self.notifier.watchdog_seconds is not None:
            self.notifier.send("WATCHDOG=1", f"STATUS={text}")
        else:
            self.notifier.status(text)

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "broker": self.cfg.mqtt.broker,
            "mqtt_connected": self.link.connected.is_set(),
            "committed_offset": self.pipeline.committed,
            "health_endpoint": self.health_address,
            "healthy": self._problem() is None,
            "problem": self._problem(),
            "metrics": self.metrics.snapshot_counts(),
            "deadletter_reasons": dict(self.metrics.deadletter_reasons),
        }

    def _problem(self) -> str | None:
        """Why the gateway is not healthy, or None."""
        if not self.link.connected.is_set():
            return "not connected to the MQTT broker"
        if self._log_over_budget():
            return "ingest log disk budget reached: not acknowledging new events"
        if self.outbox.over_budget():
            return "InfluxDB outbox over its disk budget: pipeline held"
        return None

    def _write_status(self) -> None:
        """`status.json` in the data folder, replaced atomically every second: what `gateway status` shows."""
        path = Path(self.cfg.storage.data_dir) / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    async def _write_metrics_point(self, loop: asyncio.AbstractEventLoop) -> None:
        snap = self.metrics.snapshot()
        point = Point("gateway", (("gateway", self.cfg.mqtt.client_id),), tuple(sorted(snap.items())),
                      time.time_ns())
        await loop.run_in_executor(self.outbox_storage, self.outbox.put, encode([point]), 1)
        log.debug("metrics %s", snap)


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def run(cfg: Config) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        gateway = Gateway(cfg)
        await gateway.run(stop)
        if gateway.failed:
            raise SystemExit(1)
        # Handlers of messages that arrived during shutdown never returned (so were never acknowledged); the
        # loop cancels them on exit and gmqtt's done-callback would report each cancellation as an error.
        loop.set_exception_handler(_quiet_cancellations)

    asyncio.run(main())
