"""The supervisor: builds the event path, starts it in order, and stops it in order under a deadline.

    MQTT (MqttClient) ─▶ sources/mqtt ─┐                                        ┌─▶ fanout/feeds  ─▶ MQTT feeds, alerts
    serial ports ─────▶ sources/serial ┴─▶ log/appender ─▶ log.db (one fsync) ─┼─▶ sinks/influx  ─▶ InfluxDB
                                           (filters score                       ├─▶ fanout/stats  ─▶ events/{id}/stats
                                            before the append)                  └─▶ fanout/homeassistant (when enabled)
                                                                    each a log/consumers.Consumer at its own offset

Start: the log and the graph, the consumers (a consumer behind the log starts reading back at once), the appender,
then the MQTT connection and the serial ports (sources last, so nothing is acknowledged before what is behind it
runs). Stop (SIGTERM/SIGINT): serial ports closed; the log stops taking input (what arrives now is never
acknowledged, so the broker keeps it for our session); what was handed in is committed; the consumers finish what
they were given live (feeds wait for the broker's acknowledgements, InfluxDB is written without pauses); their
progress is committed; the retained status says `offline`; files close. Past 80 % of the deadline the rest is
cancelled: everything acknowledged is in the log, and the next start resumes each consumer at its committed offset
(followers may see some events twice).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import platform
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from devices.profiles import ProfileIndex, load_dir
from gateway import config as config_mod
from gateway.config import Config, InfluxConfig
from gateway.envelope import DEADLETTER_TOPIC
from gateway.event import KIND_TELEMETRY, DeadLetter, FollowRequest, Point, dead, event_ms
from gateway.fanout import engagement
from gateway.fanout.engagement import Engagement
from gateway.fanout.feeds import FeedsSink
from gateway.fanout.graph import Change, FollowerGraph, GraphWriter
from gateway.fanout.ha_discovery import Discovery
from gateway.fanout.homeassistant import HomeAssistantSink
from gateway.fanout.stats import StatsSink
from gateway.filters.stage import Detector, Filters, TextScorer
from gateway.log.appender import Appender
from gateway.log.consumers import Consumer, Reader
from gateway.log.dedup import RecentKeys
from gateway.log.migrate import ENGAGEMENT_AFTER
from gateway.log.storage_thread import StorageThread
from gateway.log.store import LogStore
from gateway.mqtt.client import MqttClient, Settings
from gateway.mqtt.pool import PublishPool
from gateway.mqtt.tls import tls_context
from gateway.ops.health import HealthServer
from gateway.ops.logs import set_level as set_log_level
from gateway.ops.metrics import Metrics
from gateway.ops.prometheus import Exposition
from gateway.ops.static import StaticFiles
from gateway.ops.systemd import Notifier
from gateway.ratelimit import TokenBucket
from gateway.sinks.influx import InfluxSink
from gateway.sinks.influx_writers import InfluxV1Writer, InfluxV2Writer, Writer
from gateway.sinks.upstream import Pacer, Topics, UpstreamSink
from gateway.sources.mqtt import MqttSource

if TYPE_CHECKING:
    from gateway.sources.serial import SerialSources

log = logging.getLogger(__name__)

STATUS_TOPIC = "gateway/status"
UPSTREAM_DRAIN = 5.0  # seconds the upstream link has at shutdown to finish what it sent
TRIM_EVERY = 30.0  # seconds between trims of the log (more often when over its budget)
# What SIGHUP applies besides every `limits.*` setting and the device profiles; the rest needs a restart.
LIVE_SETTINGS = frozenset({"log.level", "anomaly.threshold", "anomaly.episode_start", "anomaly.episode_persist",
                           "anomaly.episode_quiet", "content.mark_threshold", "content.block_threshold"})


def make_writer(cfg: InfluxConfig) -> Writer:
    if cfg.api == "v2":
        return InfluxV2Writer(cfg.url, cfg.org, cfg.database, cfg.token, cfg.timeout)
    user, _, password = cfg.token.partition(":")
    return InfluxV1Writer(cfg.url, cfg.database, cfg.timeout, username=user or None, password=password or None)


def onnxruntime_installed() -> bool:
    """onnxruntime publishes no wheel for 32-bit ARM (pyproject.toml leaves it out there): without it the gateway
    runs with its models off rather than not at all."""
    from gateway.filters.onnx_session import library_path

    return library_path() is not None


def load_detector(cfg: Config) -> Detector | None:
    if not cfg.anomaly.enabled or not onnxruntime_installed():
        return None
    from gateway.filters.anomaly import AnomalyDetector

    a = cfg.anomaly
    return AnomalyDetector(cfg.model_path(), threshold=a.threshold or None, start=a.episode_start or None,
                           persist=a.episode_persist or None, quiet=a.episode_quiet or None, max_series=a.max_series)


def load_content_filter(cfg: Config) -> TextScorer | None:
    if not cfg.content.enabled or not onnxruntime_installed():
        return None
    from gateway.filters.content import ContentClassifier

    return ContentClassifier(cfg.content_model_path(), mark_threshold=cfg.content.mark_threshold or None,
                             block_threshold=cfg.content.block_threshold or None)


def publisher_settings(cfg: Config, i: int) -> Settings:
    """Publish-only connection `i` of the feeds' pool: no subscriptions, no status of its own (the main connection
    speaks for the gateway), and no session to keep: what it has in flight at a reconnect it sends again itself."""
    return dataclasses.replace(mqtt_settings(cfg), client_id=f"{cfg.mqtt.client_id}-out{i}", subscriptions=(),
                               status_topic="", session_expiry=0)


def upstream_settings(cfg: Config) -> Settings:
    """The upstream link's connection: its own client id and persistent session, no subscriptions, its retained
    status on the central broker, every node of `upstream.brokers` to fail over across."""
    u = cfg.upstream
    addresses = [(host, int(port)) for host, _, port in (b.rpartition(":") for b in u.brokers)]
    if u.password and not u.tls:
        log.warning("upstream.password is sent to %s without TLS: set upstream.tls", ", ".join(u.brokers))
    site = upstream_site(cfg)
    return Settings(host=addresses[0][0], port=addresses[0][1], alternates=tuple(addresses[1:]),
                    client_id=u.client_id or f"{cfg.mqtt.client_id}-upstream", protocol=u.protocol,
                    username=u.username, password=u.password, keepalive=u.keepalive,
                    session_expiry=u.session_expiry, tls=tls_context(u, "upstream"),
                    reconnect_min=cfg.mqtt.reconnect_min, reconnect_max=cfg.mqtt.reconnect_max,
                    status_topic=u.status_topic.format(site=site) if u.status_topic else "",
                    send_maximum=u.max_inflight)


def upstream_site(cfg: Config) -> str:
    return cfg.upstream.site or cfg.mqtt.client_id


def mqtt_settings(cfg: Config, dialect_topics: Sequence[str] = ()) -> Settings:
    """The main connection's settings; `dialect_topics` are the device profiles' topic patterns as MQTT filters
    (devices/mapping.py), subscribed beside the gateway's own topics."""
    m = cfg.mqtt
    host, _, port = m.broker.rpartition(":")
    if m.password and not m.tls and host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("mqtt.password is sent to %s without TLS: set mqtt.tls", m.broker)
    return Settings(host=host, port=int(port), client_id=m.client_id, protocol=m.protocol, username=m.username,
                    password=m.password, keepalive=m.keepalive, session_expiry=m.session_expiry,
                    receive_maximum=m.max_inflight, tls=tls_context(m), reconnect_min=m.reconnect_min,
                    reconnect_max=m.reconnect_max, status_topic=STATUS_TOPIC,
                    subscriptions=subscriptions(cfg, dialect_topics))


def subscriptions(cfg: Config, dialect_topics: Sequence[str] = ()) -> tuple[str, ...]:
    m = cfg.mqtt
    return (m.telemetry_topic, m.follows_topic, "users/+/posts", "users/+/interactions", *dialect_topics)


class Gateway:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.metrics = Metrics()
        data = cfg.data_dir()
        data.mkdir(parents=True, exist_ok=True)
        # The log's writer thread: trims, graph writes and a flood's appends (the loop appends itself at a moderate
        # rate: gateway/log/appender.py); one thread reads the log back for consumers that are behind; InfluxDB has
        # its writer thread.
        self.storage = StorageThread()
        self.reading = ThreadPoolExecutor(1, thread_name_prefix="log-reader")
        self.store = LogStore(data / "log.db", cfg.storage.fsync)
        engagement.create(self.store.connection)
        self.reader = Reader(LogStore(data / "log.db", cfg.storage.fsync, reader=True), self.reading)
        self.graph = FollowerGraph(data / "graph.db")
        self._finish_upgrade(data)
        self.graph_writer = GraphWriter(self.graph, self.storage)
        self._profile_list = load_dir(cfg.profiles_path())
        self.profiles = ProfileIndex(self._profile_list)
        if (cfg.anomaly.enabled or cfg.content.enabled) and not onnxruntime_installed():
            log.warning("onnxruntime is not installed (it has no wheel for this platform, %s): the anomaly and "
                        "content models are off; telemetry and posts pass unscored", platform.machine())
        self.filters = Filters(load_detector(cfg), load_content_filter(cfg), self.metrics, self.profiles)
        self._warm_filters()
        self.failed = False
        self.health_address: str | None = None
        self.notifier = Notifier()
        self._deadletter_bucket = TokenBucket(cfg.limits.deadletter_per_second)
        self._log_bytes = 0
        self._last_metrics_ns = time.time_ns()  # the previous self-metrics point; the start before the first
        self._reasons_written: set[str] = set()
        self.consumers: list[Consumer] = []
        self.influx: InfluxSink | None = None
        self.homeassistant: HomeAssistantSink | None = None
        self._resubscribing: asyncio.Future[None] | None = None
        self.serial: SerialSources | None = None
        self.upstream_client: MqttClient | None = None
        self.upstream: list[Consumer] = []  # the upstream link's consumers (events; stats)
        self._upstream_lag_seconds = 0.0
        self._build()

    # --- wiring ----------------------------------------------------------------------------------------------------

    def _warm_filters(self) -> None:
        """Before anything new arrives: the detector learns from the newest events of the log."""
        limit = self.cfg.anomaly.warm_events
        if self.filters.detector is None or limit == 0:
            return
        started = time.monotonic()
        last = self.store.last_offset()
        after = max(0, last - limit)
        readings = 0
        while after < last:
            events = self.store.read(after, min(10_000, last - after))
            if not events:
                break
            readings += self.filters.warm(events)
            after = events[-1].offset
        if readings:
            log.info("anomaly filter: learned from the %d newest readings in the log in %.1f s", readings,
                     time.monotonic() - started)

    def _finish_upgrade(self, data: Path) -> None:
        """What converting a log of the earlier layout (gateway/log/migrate.py) leaves to do with the rest of the
        gateway at hand: posts and interactions the old pipeline had not applied yet, and an old outbox file."""
        after = self.store.meta(ENGAGEMENT_AFTER)
        if after is not None:
            pending = [e for e in self.store.read(after, 10_000_000) if engagement.is_social(e)]
            hook = Engagement(self.graph.followers).hook(pending)
            self.store.commit_progress({}, [hook] if hook is not None else [])
            self.store.connection.execute("DELETE FROM meta WHERE key = ?", (ENGAGEMENT_AFTER,))
            log.info("upgrade: applied %d posts and interactions logged before the upgrade", len(pending))
        self._legacy_outbox = data / "outbox.db" if (data / "outbox.db").exists() else None

    async def _drain_legacy_outbox(self) -> None:
        """Points the earlier gateway's outbox still held (for events no longer in the log, say): written once,
        then the file is renamed so it is never written twice."""
        path = self._legacy_outbox
        if path is None:
            return
        if self.influx is None:
            log.warning("%s holds points of an earlier version; they stay there (influx.api is none)", path)
            return
        db = sqlite3.connect(path)
        rows = db.execute("SELECT body, points FROM batches ORDER BY id").fetchall()
        db.close()
        if rows:
            await asyncio.gather(*(self.influx.put(bytes(body), int(points)) for body, points in rows))
        path.rename(path.with_name("outbox.db.written"))
        log.info("upgrade: wrote the %d batches left in the old outbox; renamed it to outbox.db.written", len(rows))

    def _build(self) -> None:
        cfg, m = self.cfg, self.metrics
        keys = RecentKeys(recent=4 * cfg.mqtt.max_inflight)
        for source, key in self.store.tail_keys(4 * cfg.mqtt.max_inflight):
            keys.add(source, key)
        self.appender = Appender(
            self.store, self.storage, m, next_offset=self.store.last_offset() + 1, keys=keys,
            commit_window=cfg.storage.commit_window_ms / 1000, batch_max=cfg.storage.batch_max,
            max_pending=cfg.mqtt.max_inflight, score=self.filters.score, hook=Engagement(self.graph.followers).hook,
            over_budget=self._log_over_budget, on_deadletters=self._publish_deadletters)
        self.source = MqttSource(self.appender, self._follow, self.profiles, cfg.limits, m, cfg.social)
        self.client = MqttClient(mqtt_settings(cfg, self.profiles.router.subscriptions), self.source.take)
        self.source.attach(self.client)
        # The feeds also go over publish-only connections: one window per connection (gateway/mqtt/pool.py).
        self.publishers = [MqttClient(publisher_settings(cfg, i), lambda messages, connection_no: None)
                           for i in range(1, cfg.mqtt.publish_connections)]
        for publisher in self.publishers:
            publisher.hold_reads = self.appender.hold_reads
        self.pool = PublishPool([*self.publishers, self.client])

        committed = self.store.progress()
        log_end = lambda: self.appender.last_offset  # noqa: E731 - read on every catch-up check

        def consumer(sink: Any, start: int = 0, **kw: Any) -> Consumer:
            c = Consumer(sink, self.reader, log_end, committed.get(sink.name, start), m,
                         batch_max=cfg.pipeline.batch_max, **kw)
            self.appender.listen(c.offer)
            self.appender.track(c)
            self.consumers.append(c)
            return c

        reader = self.reader
        self.feeds = consumer(FeedsSink(self.pool, self.graph.followers,
                                        lambda events: reader.run(engagement.plan, events), m,
                                        qos=cfg.pipeline.feed_qos,
                                        micros_per_impression=cfg.social.micros_per_impression))
        put_points = None
        if cfg.influx.api != "none":
            self.influx = InfluxSink(make_writer(cfg.influx), m, flush_interval=cfg.influx.flush_interval,
                                     on_rejected=self._influx_rejected)
            self.influx_consumer = consumer(self.influx)
            put_points = self.influx.put_points
        self.stats = consumer(
            StatsSink(self.client, lambda ids: reader.run(engagement.counts, ids), put_points or (lambda p: True),
                      cfg.social.stats_interval_ms / 1000, m),
            accept=engagement.is_social, gate=lambda: self.feeds.committed_offset)
        self.stats.on_gated = self.appender.request_progress
        if cfg.homeassistant.enabled:
            detector = self.filters.detector
            ha = cfg.homeassistant
            self.homeassistant = HomeAssistantSink(
                self.client, Discovery(ha.discovery_prefix, cfg.mqtt.client_id, STATUS_TOPIC, _version(),
                                       ha.expire_after),
                self.profiles, getattr(detector, "in_episode", None), m, remove_after=ha.remove_after,
                known_file=cfg.data_dir() / "homeassistant.json")
            # Switched on for the first time: from the end of the log. Home Assistant wants the latest values, and
            # reading a day of history back on a Pi to get them would cost minutes of a core; each device appears
            # with its next reading.
            consumer(self.homeassistant, start=self.store.last_offset(), accept=_is_telemetry)
        if cfg.upstream.enabled:
            self._build_upstream(consumer, committed)
        behind_feeds = [c for c in self.consumers if c is self.stats or c.name == "upstream_stats"]
        self.feeds.on_committed = lambda _offset: [c.gate_moved() for c in behind_feeds]

        if cfg.serial.ports:
            # Imported only here: pyserial and the frame codec are 0.7 MB of memory a gateway without ports skips.
            from gateway.sources.serial import SerialSettings, SerialSources

            sc = cfg.serial
            self.serial = SerialSources(
                sc.ports, self.appender, self._profile_list,
                SerialSettings(sc.baud, sc.profile, sc.reopen_min, sc.reopen_max, sc.rescan_interval,
                               sc.max_queued_frames, cfg.limits.max_fields, sc.noise_deadletters_per_second), m)
            serial = self.serial
            m.gauge("serial_connected", lambda: serial.connected())

        client, appender = self.client, self.appender
        _connection_gauges(m, "mqtt", client)
        m.gauge("mqtt_connect_failures", lambda: client.stats.connect_failures)
        m.gauge("mqtt_in_flight", lambda: self.pool.in_flight)
        m.gauge("log_pending", lambda: appender.pending)
        m.gauge("log_pending_peak", lambda: appender.pending_peak)
        m.gauge("log_bytes", lambda: self._log_bytes)
        m.gauge("log_budget_used", lambda: self._log_bytes / cfg.storage.max_log_bytes)
        m.gauge("log_offset", lambda: appender.last_offset)
        m.gauge("committed", lambda: self.feeds.done_events)
        m.gauge("graph_edges", self.graph.edges)
        for c in self.consumers:
            m.gauge(f"{c.name}_lag", functools.partial(lambda c: c.lag, c))
        m.gauge("log_lag", lambda: max(c.lag for c in self.consumers))
        if self.influx is not None:
            influx = self.influx
            m.gauge("written", lambda: influx.stats().written)
            m.gauge("retried", lambda: influx.stats().retried)
            m.gauge("write_dropped", lambda: influx.stats().dropped)
            m.gauge("influx_buffered", lambda: influx.stats().buffered)

    def _build_upstream(self, consumer: Any, committed: dict[str, int]) -> None:
        """The upstream link (gateway/sinks/upstream.py): a connection of its own and one or two consumers."""
        cfg, m, u = self.cfg, self.metrics, self.cfg.upstream
        names = ["upstream"] + (["upstream_stats"] if "stats" in u.kinds else [])
        new = {name: self.store.last_offset() for name in names if name not in committed}
        if new:
            # Enabled for the first time: from what is appended from now on, not the whole retained log over a
            # mobile uplink. Recorded at once, so a crash before the first acknowledgement does not move the start.
            self.store.commit_progress(new)
            committed.update(new)
            log.info("upstream: first start; forwarding from log offset %d on", max(new.values()))
        client = self.upstream_client = MqttClient(upstream_settings(cfg), lambda messages, connection_no: None,
                                                   queue_limit=1024)
        topics = Topics(u.topic_template, upstream_site(cfg))
        pacer = Pacer(u.max_events_per_second, u.max_bytes_per_second) if (
            u.max_events_per_second or u.max_bytes_per_second) else None
        sink = UpstreamSink(client, topics, u.kinds, m, pacer)
        self.upstream.append(consumer(sink))
        if "stats" in u.kinds:
            reader = self.reader
            stats = consumer(StatsSink(client, lambda ids: reader.run(engagement.counts, ids), lambda p: True,
                                       cfg.social.stats_interval_ms / 1000, m, name="upstream_stats",
                                       topic=topics.stats, counter="upstream_stats_published"),
                             accept=engagement.is_social, gate=lambda: self.feeds.committed_offset)
            stats.on_gated = self.appender.request_progress
            self.upstream.append(stats)
        _connection_gauges(m, "upstream", client)
        m.gauge("upstream_refused", lambda: client.stats.refused)
        m.gauge("upstream_in_flight", lambda: client.in_flight)
        m.gauge("upstream_paced_seconds", lambda: sink.paced_seconds)
        m.gauge("upstream_lag_seconds", lambda: self._upstream_lag_seconds)

    async def _measure_upstream_lag(self) -> None:
        """Seconds behind: the age of the oldest event an upstream consumer has not finished (its append time is
        in its id), read from the log: a lag of hours has long left memory."""
        oldest: int | None = None
        for c in self.upstream:
            if c.lag > 0:
                events = await self.reader.read(c.done, 1)
                if events:
                    ms = event_ms(events[0].id)
                    oldest = ms if oldest is None else min(oldest, ms)
        self._upstream_lag_seconds = 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    # --- reload (SIGHUP) -------------------------------------------------------------------------------------------

    def reload(self, new: Config) -> tuple[list[str], list[str]]:
        """Apply what can change while events flow: the log level, the models' thresholds, the limits and the
        device profiles, each from the next batch on. Returns the settings applied and the changed ones that need
        a restart (they stay as they were)."""
        old, now = _settings(self.cfg), _settings(new)
        changed = {name for name, value in now.items() if old[name] != value}
        live = {s for s in changed if s.split(".")[0] == "limits" or s in LIVE_SETTINGS}
        # Everything that can fail is worked out before anything is applied: a bad reload changes nothing.
        profiles = load_dir(new.profiles_path())
        thresholds = self._thresholds(new)
        applied = sorted(live)
        if profiles != self._profile_list:
            applied.append(f"device profiles ({', '.join(p.name for p in profiles) or 'none'})")
        set_log_level(new.log.level)
        for model, values in thresholds:
            for name, value in values.items():
                setattr(model, name, value)
        profiles_changed = profiles != self._profile_list
        self._profile_list = profiles
        self.profiles = ProfileIndex(profiles)
        self.source.reconfigure(self.profiles, new.limits)
        self.filters.profiles = self.profiles
        if self.homeassistant is not None and profiles_changed:
            self.homeassistant.reprofile(self.profiles)
        if self.serial is not None:
            self.serial.reconfigure(profiles, new.limits.max_fields)
        if new.limits.deadletter_per_second != self.cfg.limits.deadletter_per_second:
            self._deadletter_bucket = TokenBucket(new.limits.deadletter_per_second)
        restart = sorted(changed - live - {"profiles_dir"})
        # A dialect's profile added or removed: its topics are subscribed to (or dropped) on the live connection.
        wanted = subscriptions(self.cfg, self.profiles.router.subscriptions)
        held = self.client.settings.subscriptions
        if set(wanted) != set(held):
            added = [t for t in wanted if t not in held]
            dropped = [t for t in held if t not in wanted]
            applied.append("subscriptions (" + ", ".join([*(f"+{t}" for t in added), *(f"-{t}" for t in dropped)])
                           + ")")
            self._resubscribing = asyncio.ensure_future(self._resubscribe(wanted, self._resubscribing))
        # The live settings take the new values; the others keep what this process runs with.
        a = new.anomaly
        self.cfg = dataclasses.replace(self.cfg, log=new.log, limits=new.limits, anomaly=dataclasses.replace(
            self.cfg.anomaly, threshold=a.threshold, episode_start=a.episode_start,
            episode_persist=a.episode_persist, episode_quiet=a.episode_quiet),
            content=dataclasses.replace(self.cfg.content, mark_threshold=new.content.mark_threshold,
                                        block_threshold=new.content.block_threshold), profiles_dir=new.profiles_dir)
        return applied, restart

    async def _resubscribe(self, wanted: tuple[str, ...], previous: asyncio.Future[None] | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])  # one change after the other, in the order of the SIGHUPs
        await self.client.resubscribe(wanted)  # a refusal (the broker's ACL) is logged by the client

    def _thresholds(self, cfg: Config) -> list[tuple[Any, dict[str, float | int]]]:
        """Each loaded model's thresholds under `cfg`: 0 in the config means the model's own value, as its
        training script recorded it (the models keep those as `defaults`)."""
        out: list[tuple[Any, dict[str, float | int]]] = []
        detector: Any = self.filters.detector
        content: Any = self.filters.content
        if detector is not None:
            a, own = cfg.anomaly, detector.defaults
            out.append((detector, {"threshold": a.threshold or own.threshold, "start": a.episode_start or own.start,
                                   "persist": a.episode_persist or own.persist,
                                   "quiet": a.episode_quiet or own.quiet}))
        if content is not None:
            own_mark, own_block = content.defaults
            mark = cfg.content.mark_threshold or own_mark
            block = cfg.content.block_threshold or own_block
            if mark > block:
                raise ValueError(f"content.mark_threshold {mark} is above content.block_threshold {block}")
            out.append((content, {"mark_threshold": mark, "block_threshold": block}))
        return out

    async def _follow(self, requests: list[FollowRequest]) -> None:
        await self.graph_writer.submit([Change(r.action, r.follower, r.source) for r in requests])

    def _log_over_budget(self) -> bool:
        return self._log_bytes >= self.cfg.storage.max_log_bytes

    def _publish_deadletters(self, letters: list[DeadLetter]) -> None:
        for letter in letters:
            if self.client.connected.is_set() and self._deadletter_bucket.take():
                self.client.publish(DEADLETTER_TOPIC.encode(), json.dumps(letter.as_dict()).encode(), qos=0)
                self.metrics.inc("deadletters_published")
            else:
                self.metrics.inc("deadletters_suppressed")

    def _influx_rejected(self, body: bytes, points: int, reason: str) -> None:
        """InfluxDB refused points for what they are: kept as a dead letter, like any other bad input."""
        self.appender.submit([dead(f"influx:{self.cfg.influx.database}", "influx_rejected",
                                   f"{points} points: {reason}"[:300], body)])

    # --- running ---------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, deadline: float = 20.0) -> None:
        if self.influx is not None:
            self.influx.start()
        tasks = [asyncio.create_task(c.run(), name=f"consumer {c.name}") for c in self.consumers]
        self.appender.start()
        tasks.append(self.appender.task)
        tasks.append(asyncio.create_task(self._housekeeping(), name="housekeeping"))
        if self.homeassistant is not None and self.cfg.homeassistant.remove_after > 0:
            tasks.append(asyncio.create_task(self.homeassistant.run_removal(), name="homeassistant removal"))
        for task in tasks:
            task.add_done_callback(functools.partial(self._supervise, stop))
        upgrade = asyncio.create_task(self._drain_legacy_outbox(), name="upgrade: old outbox")
        upgrade.add_done_callback(lambda t: t.cancelled() or t.exception() is None or log.error(
            "upgrade: the old outbox could not be written (%r); it stays for the next start", t.exception()))
        tasks.append(upgrade)
        health = None
        if self.cfg.health.listen:
            exposition = Exposition(self.metrics, self.cfg.mqtt.client_id)
            health = HealthServer(self.cfg.health.listen, self.status, self._problem,
                                  metrics=(exposition.render, exposition.content_type), static=StaticFiles())
            try:
                await health.start()
                self.health_address = f"{self.cfg.health.listen.rpartition(':')[0]}:{health.port}"
            except OSError as exc:  # a port in use must not keep the gateway from doing its job
                log.error("health endpoint not started on %s: %s", self.cfg.health.listen, exc)
                health = None
        # Ready once the local stages run: the broker may be down at boot, and the gateway's job then is to keep
        # trying (STATUS says so), not to be killed by systemd's start timeout.
        self.notifier.ready(f"connecting to {self.cfg.mqtt.broker}")
        link = asyncio.create_task(self.client.run(), name="mqtt")
        links = [asyncio.create_task(p.run(), name=f"mqtt publisher {p.settings.client_id}") for p in self.publishers]
        upstream_link = None
        if self.upstream_client is not None:
            upstream_link = asyncio.create_task(self.upstream_client.run(), name="mqtt upstream")
        if self.serial is not None:
            self.serial.start()
        log.info("gateway running: broker %s, data %s, influx %s, log at offset %d", self.cfg.mqtt.broker,
                 self.cfg.data_dir(), self.cfg.influx.api, self.appender.last_offset)
        await stop.wait()
        log.info("shutting down (deadline %.0fs)", deadline)
        self.notifier.stopping()
        try:
            await asyncio.wait_for(self._shutdown(), deadline * 0.8)
        except (asyncio.TimeoutError, TimeoutError):
            log.error("shutdown deadline passed; cancelling. Everything acknowledged is in the log; each output "
                      "resumes at its committed offset on the next start (duplicates are possible)")
        for task in tasks:
            task.cancel()
        if health is not None:
            await health.close()
        if not link.done():
            await self.client.close(timeout=max(1.0, deadline * 0.1))
            link.cancel()
        for publisher, task in zip(self.publishers, links):
            if not task.done():
                await publisher.close(timeout=max(1.0, deadline * 0.1))
                task.cancel()
        if upstream_link is not None and self.upstream_client is not None and not upstream_link.done():
            await self.upstream_client.close(timeout=max(1.0, deadline * 0.1))
            upstream_link.cancel()
        self._write_status()  # the final word: what was appended and committed when we stopped
        if self.homeassistant is not None:
            self.homeassistant.save_now()
        if self.influx is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.influx.stop, 2.0)
        self.storage.submit(self.store.close).result()
        self.reading.submit(self.reader.close).result()
        self.graph.close()
        self.storage.shutdown()
        self.reading.shutdown()
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

    async def _shutdown(self) -> None:
        if self.serial is not None:
            await self.serial.close()  # first: no new frames; what is not yet ACKed, the devices resend
        # The log stops taking input but the connection stays: what is logged still has to be delivered, and the
        # broker keeps every message we have not acknowledged for our session.
        self.appender.stop_accepting()
        await self.appender.close()
        if self.influx is not None:
            self.influx.hurry()
        await asyncio.gather(*(c.drain() for c in self.consumers if c not in self.upstream),
                             *(self._drain_upstream(c) for c in self.upstream))
        await self.appender.commit_progress()
        self._write_metrics_point()  # the last word of the self-metrics: what was done when we stopped
        if self.influx is not None:
            await self.influx.flush(timeout=2.0)
        await asyncio.gather(self.client.close(), *(p.close() for p in self.publishers),
                             *([self.upstream_client.close()] if self.upstream_client is not None else []))

    async def _drain_upstream(self, consumer: Consumer) -> None:
        """The WAN may be down at shutdown: the upstream link gets a few seconds to have what it sent acknowledged,
        not the whole deadline. What is not acknowledged stays in the log, past the committed offset, for the next
        start."""
        try:
            await asyncio.wait_for(consumer.drain(), UPSTREAM_DRAIN)
        except (asyncio.TimeoutError, TimeoutError):
            log.info("%s: not all acknowledged by the central broker within %.0fs; the rest is forwarded after the "
                     "restart (duplicates possible)", consumer.name, UPSTREAM_DRAIN)

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        last_metrics = last_trim = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            try:
                self._write_status()
                # On the reader's thread: the writer's may be busy with a slow disk, and the budget must be known.
                self._log_bytes = await loop.run_in_executor(self.reading, self.reader.size_bytes)
                await loop.run_in_executor(self.storage, self.graph.refresh_if_changed)
                if self.upstream:
                    await self._measure_upstream_lag()
                if now - last_metrics >= self.cfg.influx.metrics_interval:
                    last_metrics = now
                    self._write_metrics_point()
                if now - last_trim >= TRIM_EVERY or self._log_over_budget():
                    last_trim = now
                    await self._trim(loop)
            except (sqlite3.Error, OSError) as exc:  # a full disk: say so, keep going, try again next second
                self.metrics.inc("storage_errors")
                log.error("housekeeping: %s", exc)
            self._notify_systemd()

    async def _trim(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the log back to the slowest consumer; within that, `retention_hours`, or less when over budget."""
        upto = min(c.committed_offset for c in self.consumers)
        over = self._log_over_budget()
        cutoff = None if over else int(time.time() * 1000 - self.cfg.storage.retention_hours * 3_600_000)
        gone = await loop.run_in_executor(self.storage, functools.partial(self.store.trim, upto, cutoff,
                                                                          shrink=over))
        if gone:
            log.debug("trimmed %d events up to offset %d", gone, upto)

    def _notify_systemd(self) -> None:
        """Status text every second, and the watchdog keep-alive: sent from here because this loop needs both the
        event loop and the log's thread to make progress, so a hung loop or a hung disk stops the keep-alives and
        systemd restarts the daemon. A broker or database outage does not: restarting cannot cure those."""
        if not self.notifier.enabled:
            return
        problem = self._problem()
        text = f"log offset {self.appender.last_offset}; " + (problem or "healthy")
        if self.notifier.watchdog_seconds is not None:
            self.notifier.send("WATCHDOG=1", f"STATUS={text}")
        else:
            self.notifier.status(text)

    def status(self) -> dict[str, object]:
        return {
            "pid": os.getpid(),
            "time": time.time(),
            "broker": self.cfg.mqtt.broker,
            "mqtt_connected": self.client.connected.is_set(),
            "log_offset": self.appender.last_offset,
            "consumers": {c.name: {"done": c.done, "committed": c.committed_offset, "lag": c.lag,
                                   "reading_back": c.behind} for c in self.consumers},
            "health_endpoint": self.health_address,
            "upstream": self._upstream_status(),
            "healthy": self._problem() is None,
            "problem": self._problem(),
            "metrics": self.metrics.snapshot_counts(),
            "deadletter_reasons": dict(self.metrics.deadletter_reasons),
        }

    def _upstream_status(self) -> dict[str, object] | None:
        """The link in `gateway status` and /status; None when it is off. A WAN outage is not a problem of the
        gateway's health (the log holds the events), so it shows here and in the metrics, not in /health."""
        client = self.upstream_client
        if client is None:
            return None
        return {"broker": client.address, "connected": client.connected.is_set(), "lag": self.upstream[0].lag,
                "lag_seconds": round(self._upstream_lag_seconds, 3),
                "stats_lag": self.upstream[1].lag if len(self.upstream) > 1 else 0,
                "forwarded": self.metrics.get("upstream_forwarded"), "in_flight": client.in_flight,
                "connects": client.stats.connects, "last_error": client.stats.last_error}

    def _problem(self) -> str | None:
        """Why the gateway is not healthy, or None."""
        if not self.client.connected.is_set():
            return "not connected to the MQTT broker"
        if self._log_over_budget():
            return "log disk budget reached: not acknowledging new events"
        return None

    def _write_status(self) -> None:
        """`status.json` in the data folder, replaced atomically every second: what `gateway status` shows."""
        path = self.cfg.data_dir() / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.status(), indent=1, sort_keys=True))
        os.replace(tmp, path)

    def _write_metrics_point(self) -> None:
        """The self-metrics as InfluxDB points: measurement `gateway` (every counter and gauge a field), and
        `deadletters` (tag `reason`, field `count`: dead letters since the start, one point per reason seen).

        A reason seen for the first time also gets a 0 at the previous point's time (the start, for the first
        point), which is what its count was then: without it a query of the increase per interval
        (non_negative_difference) would have no earlier value and miss a reason's first dead letters, the ones
        that matter most."""
        if self.influx is None:
            return
        snap = self.metrics.snapshot()
        now = time.time_ns()
        gw = ("gateway", self.cfg.mqtt.client_id)
        points = [Point("gateway", (gw,), tuple(sorted(snap.items())), now)]
        for reason, n in sorted(self.metrics.deadletter_reasons.items()):
            tags = (gw, ("reason", reason))
            if reason not in self._reasons_written:
                self._reasons_written.add(reason)
                points.append(Point("deadletters", tags, (("count", 0),), self._last_metrics_ns))
            points.append(Point("deadletters", tags, (("count", n),), now))
        self._last_metrics_ns = now
        self.influx.put_points(points)


def _connection_gauges(m: Metrics, prefix: str, client: MqttClient) -> None:
    """`{prefix}_connected`, `_connects`, `_disconnects` and `_resent` of one broker connection."""
    m.gauge(f"{prefix}_connected", lambda: float(client.connected.is_set()))
    m.gauge(f"{prefix}_connects", lambda: client.stats.connects)
    m.gauge(f"{prefix}_disconnects", lambda: client.stats.disconnects)
    m.gauge(f"{prefix}_resent", lambda: client.stats.resent)


def _is_telemetry(event: Any) -> bool:
    return bool(event.kind == KIND_TELEMETRY)


def _version() -> str:
    import importlib.metadata  # only with Home Assistant on: it brings zipfile, email and more, 0.8 MB

    try:
        return importlib.metadata.version("edge-gateway")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return ""


def _settings(cfg: Config) -> dict[str, Any]:
    """Every setting by its dotted name (as in the config reference)."""
    out: dict[str, Any] = {}
    for section, values in config_mod.as_dict(cfg).items():
        if isinstance(values, dict):
            out.update({f"{section}.{name}": value for name, value in values.items()})
        else:
            out[section] = values
    return out


def reload_signal(gateway: Gateway, path: Path | None, overrides: dict[str, dict[str, Any]]) -> None:
    """SIGHUP: read the config file again and apply what can change live; a file that does not validate changes
    nothing. Command-line overrides still win over the file."""
    if path is None:
        log.warning("SIGHUP: no config file to reload (started on the development defaults)")
        return
    try:
        new = config_mod.with_secrets(config_mod.override(config_mod.load(path), **overrides))
        applied, restart = gateway.reload(new)
    except ValueError as exc:  # ConfigError, ProfileError, thresholds that do not go together
        log.error("SIGHUP: %s not reloaded, nothing changed: %s", path, exc)
        return
    log.info("SIGHUP: reloaded %s: %s", path, ", ".join(applied) if applied else "nothing changed")
    if restart:
        log.warning("SIGHUP: these changed but take effect only after a restart: %s", ", ".join(restart))


def _quiet_cancellations(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    if isinstance(context.get("exception"), asyncio.CancelledError):
        return
    loop.default_exception_handler(context)


def run(cfg: Config, config_path: Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> None:
    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.set_exception_handler(_quiet_cancellations)
        gateway = Gateway(cfg)
        loop.add_signal_handler(signal.SIGHUP, reload_signal, gateway, config_path, overrides or {})
        await gateway.run(stop)
        if gateway.failed:
            raise SystemExit(1)

    asyncio.run(main())


__all__: Sequence[str] = ["Gateway", "run"]
