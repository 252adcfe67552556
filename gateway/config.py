"""Typed gateway configuration.

The dataclasses below are the schema: every field has its default and a description next to it, and
`reference()` renders them as the configuration reference in the README. `parse(text)` validates TOML text apart
from reading any file, and reports every problem at once, each naming the field and the bad value. The daemon
fails closed: a config that does not validate stops it before it touches the broker or the data folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent  # the checkout; for an installed wheel, site-packages
SYSTEM_CONFIG = Path("/etc/edge-gateway/gateway.toml")
CONFIG_ENV = "GATEWAY_CONFIG"
DEV_DATA_DIR = "var/gateway"


def _f(default: Any, doc: str, check: Callable[[Any], str | None] | None = None, secret: bool = False) -> Any:
    meta = {"doc": doc, "check": check, "secret": secret}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def _positive(v: Any) -> str | None:
    return None if v > 0 and math.isfinite(v) else "must be a finite number greater than 0"


def _non_negative(v: Any) -> str | None:
    return None if v >= 0 and math.isfinite(v) else "must be a finite number, 0 or more"


def _unit_interval(v: Any) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be between 0 and 1"


def _host_port(v: Any) -> str | None:
    host, sep, port = str(v).rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdecimal()) or not 0 < int(port) < 65536:
        return "must be HOST:PORT"
    return None


def _http_url(v: Any) -> str | None:
    return None if str(v).startswith(("http://", "https://")) else "must start with http:// or https://"


@dataclass(frozen=True)
class MqttConfig:
    broker: str = _f("127.0.0.1:1883", "Broker address, HOST:PORT.", _host_port)
    client_id: str = _f("edge-gateway", "Client id; with a persistent session the broker keeps unacknowledged "
                        "telemetry for this id while the gateway is down.")
    protocol: str = _f("auto", "MQTT version: '5', '3.1.1', or 'auto' (5, falling back to 3.1.1).",
                       _one_of("auto", "5", "3.1.1"))
    username: str = _f("", "Username, empty for none.")
    password: str = _f("", "Password.", secret=True)
    password_file: str = _f("", "Read the password from this file instead (its first line), so the config holds "
                            "no secret. A bare name is one of systemd's credentials: the unit's "
                            "`LoadCredential=NAME:PATH` puts it in $CREDENTIALS_DIRECTORY, readable by the service "
                            "alone.")
    keepalive: int = _f(30, "Keepalive in seconds.", _positive)
    session_expiry: int = _f(7 * 24 * 3600, "MQTT 5 session expiry in seconds (how long the broker keeps our "
                             "queued telemetry while we are away).", _non_negative)
    telemetry_topic: str = _f("devices/+/telemetry", "Subscription for device telemetry; the `+` level is the "
                              "device id.")
    follows_topic: str = _f("users/+/follows", "Subscription for live follow/unfollow requests.")
    max_inflight: int = _f(2000, "Most received messages waiting for their append (acknowledged only after it): "
                           "the MQTT 5 receive maximum the gateway asks of the broker, and the point where it stops "
                           "reading the socket until the log catches up (mosquitto overruns the receive maximum "
                           "while acknowledgements flow; docs/ARCHITECTURE.md).", _positive)
    publish_connections: int = _f(4, "Connections the feeds are published over, this one included: the broker "
                                  "lets each have its window of unacknowledged publishes (mosquitto: 20); a feed "
                                  "takes the first with its window open and keeps to it while it has publishes "
                                  "unacknowledged there, so each feed keeps its order. 1: this one only, "
                                  "which a broker that makes the username the client id (use_username_as_clientid, "
                                  "as deploy/mosquitto-production.conf) requires: it allows one connection per "
                                  "account.",
                                  _positive)
    reconnect_min: float = _f(0.5, "First reconnect delay in seconds (doubles per failure, jittered).", _positive)
    reconnect_max: float = _f(30.0, "Longest reconnect delay in seconds.", _positive)
    tls: bool = _f(False, "Connect over TLS; the broker's certificate must chain to `ca_file` (or a CA the system "
                   "trusts) and name the host of `broker`.")
    ca_file: str = _f("", "CA certificate(s), PEM, that the broker's certificate must chain to; empty: the "
                      "system's trusted CAs. Needs `tls`.")
    cert_file: str = _f("", "Client certificate, PEM, for a broker that requires one; empty: none. Needs `tls`.")
    key_file: str = _f("", "Private key of `cert_file`, PEM; empty: the key is in `cert_file`.")
    tls_insecure: bool = _f(False, "Do not check that the broker's certificate names the host in `broker` (the "
                            "chain is still verified). Only for a broker reached by an address its certificate "
                            "does not list.")


@dataclass(frozen=True)
class StorageConfig:
    data_dir: str = _f("", "Folder for the log (`log.db`: events, consumers' progress, engagement counts, dead "
                       "letters) and the follower graph (`graph.db`). Empty: systemd's $STATE_DIRECTORY when the "
                       "gateway runs as its unit (/var/lib/edge-gateway), else var/gateway in the current folder.")
    fsync: str = _f("full", "'full': fsync every commit of the log (survives power loss); 'normal': survives a crash "
                    "of the gateway but the last commits may be lost on power loss; 'off': tests only.",
                    _one_of("full", "normal", "off"))
    commit_window_ms: float = _f(4.0, "Under load, a commit of the log waits up to this long after the previous "
                                 "one began, unless its events fill a page sooner: the trade-off between latency "
                                 "on one side and disk wear and CPU on the other (each commit rewrites whole pages, "
                                 "and an SD card wears by what is written; each costs a transaction, a run of each "
                                 "model and wake-ups). An idle gateway commits a lone event at once. 0: commit as "
                                 "soon as the disk allows (benchmarks/RESULTS.md has the measured trade-off).",
                                 _non_negative)
    batch_max: int = _f(256, "Most events in one commit. The models score a commit's events on the event loop, so "
                        "this also bounds how long one batch keeps the loop from everything else.", _positive)
    retention_hours: float = _f(24.0, "Events every consumer is done with are trimmed from the log after this long "
                                "(sooner when the log reaches `max_log_bytes`).", _positive)
    max_log_bytes: int = _f(1 << 30, "Disk budget for the log (its pages in use; the WAL beside it stays near 1 MiB). "
                            "Events are kept until every consumer (feeds, InfluxDB, live counts, the upstream "
                            "link) is done with them; when the log reaches this size with nothing left to trim, the gateway stops "
                            "acknowledging new events and the broker and devices hold them.", _positive)


@dataclass(frozen=True)
class HealthConfig:
    listen: str = _f("127.0.0.1:8787", "Where GET /health, GET /status and the web view (/web/) answer; keep it "
                     "on loopback. Port 0: any free port (shown by `gateway status`). Empty: off.",
                     lambda v: None if v == "" or v.endswith(":0") or _host_port(v) is None
                     else "must be HOST:PORT or empty")


@dataclass(frozen=True)
class LogConfig:
    level: str = _f("info", "Least severe records logged: 'debug', 'info', 'warning' or 'error' (`gateway run "
                    "--log-level` overrides it; SIGHUP applies a new one).", _one_of("debug", "info", "warning", "error"))
    format: str = _f("text", "'text': a line per record; 'json': one JSON object per line (time, level, logger, "
                     "message, exception), for log shippers.", _one_of("text", "json"))


@dataclass(frozen=True)
class LimitsConfig:
    max_payload_bytes: int = _f(16_384, "Largest accepted telemetry payload.", _positive)
    max_fields: int = _f(64, "Most numeric fields in one telemetry message.", _positive)
    deadletter_per_second: float = _f(20.0, "Dead letters published per second at most (all are counted).",
                                      _positive)
    per_source_rate: float = _f(0.0, "Events per second each source (devices/ID, users/ID) may send on average; "
                                "beyond it (and its burst) events are dead-lettered with reason `rate_limited`. "
                                "0: no limit.", _non_negative)
    per_source_burst: float = _f(0.0, "Events a source may send at once before `per_source_rate` applies (token "
                                 "bucket size); 0: twice the rate, at least 1.", _non_negative)


@dataclass(frozen=True)
class AnomalyConfig:
    enabled: bool = _f(True, "Run the ONNX anomaly model on telemetry.")
    model: str = _f("models/anomaly/anomaly.onnx", "Path of the ONNX model (relative to the project).")
    threshold: float = _f(0.0, "Score at or above which an event is flagged anomalous; 0 means the threshold "
                          "chosen at training time and recorded in the model (see models/anomaly/MODEL_CARD.md).",
                          _unit_interval)
    episode_start: float = _f(0.0, "Score at or above which a flagged reading starts a device's anomaly episode "
                              "at once; a lower flagged one starts it only after `episode_persist` in a row. 0 means "
                              "the value recorded in the model.", _unit_interval)
    episode_persist: int = _f(0, "Flagged readings in a row, each scoring under `episode_start`, that start an "
                              "anomaly episode; 0 means the value recorded in the model.", _non_negative)
    episode_quiet: int = _f(0, "Unflagged readings in a row that end a device's anomaly episode (an alert is "
                            "published when an episode starts and when it ends); 0 means the value recorded in the "
                            "model.", _non_negative)
    max_series: int = _f(100_000, "Most (device, field) histories kept; the least recently seen is evicted.",
                         _positive)
    warm_events: int = _f(100_000, "At start, the model learns each series' normal again from this many of the "
                          "newest events in the log (without scoring them), so a restart does not start every "
                          "series' warm-up over; 0: start empty.", _non_negative)


def _cpm_table(v: Any) -> str | None:
    for key, value in v.items():
        if type(value) not in (int, float) or not 0 <= value < 1e12:
            return f"CPM of {key!r} must be a finite number of 0 or more"
    return None


@dataclass(frozen=True)
class ContentConfig:
    enabled: bool = _f(True, "Run the ONNX sensitive-content model on posts.")
    model: str = _f("models/content/content.onnx", "Path of the ONNX model (relative to the project).")
    mark_threshold: float = _f(0.0, "Score at or above which a post is delivered marked `sensitive`; 0 means the "
                               "model's own (models/content/MODEL_CARD.md).", _unit_interval)
    block_threshold: float = _f(0.0, "Score at or above which a post is not delivered but quarantined; 0 means "
                                "the model's own.", _unit_interval)


@dataclass(frozen=True)
class SocialConfig:
    max_post_bytes: int = _f(16_384, "Largest accepted post payload.", _positive)
    stats_interval_ms: float = _f(100.0, "Changed counts are published to events/{id}/stats and written to "
                                  "InfluxDB at most this often (coalesced).", _positive)
    cpm: dict = _f({}, "Revenue per 1,000 impressions of a sponsored post, by advertiser id: "
                   "{ acme = 2.5 }.", _cpm_table)
    default_cpm: float = _f(0.0, "CPM for advertisers not in `cpm`.", _non_negative)

    def micros_per_impression(self, sponsor: str) -> int:
        return round(float(self.cpm.get(sponsor, self.default_cpm)) * 1000)


@dataclass(frozen=True)
class PipelineConfig:
    batch_max: int = _f(500, "Most events a consumer reads back from the log at a time (after a restart, or when "
                        "its output was slower than the log).", _positive)
    feed_qos: int = _f(1, "QoS of deliveries to followers' feeds (1: at least once; 0: at most once).",
                       lambda v: None if v in (0, 1) else "must be 0 or 1")


@dataclass(frozen=True)
class InfluxConfig:
    api: str = _f("v1", "'v1' (InfluxDB 1.x /write), 'v2' (/api/v2/write through influxdb-client), or 'none'.",
                  _one_of("v1", "v2", "none"))
    url: str = _f("http://127.0.0.1:8086", "Database URL.", _http_url)
    database: str = _f("gateway", "v1 database, or v2 bucket.")
    org: str = _f("gateway", "v2 organisation.")
    token: str = _f("", "v2 token (v1: 'user:password' or empty).", secret=True)
    timeout: float = _f(10.0, "HTTP timeout in seconds.", _positive)
    flush_interval: float = _f(0.2, "Once everything waiting was written, seconds to wait before the next write, so "
                               "points go in batches (a backlog goes at once, in requests of up to 5,000 points); "
                               "0: a request per batch of the log.", _non_negative)
    metrics_interval: float = _f(5.0, "Seconds between the gateway's self-metric points.", _positive)


def _topic_prefix(v: Any) -> str | None:
    levels = str(v).split("/")
    if not v or "" in levels or str(v).startswith("$") or any(c in str(v) for c in "+#\0"):
        return "must be one or more topic levels (no wildcards, no empty level, no leading $ or /, no trailing /)"
    return None


@dataclass(frozen=True)
class HomeAssistantConfig:
    enabled: bool = _f(False, "Publish Home Assistant MQTT discovery configs for the devices the gateway sees: a "
                       "sensor per field (unit and device class from the device's profile) and a `problem` binary "
                       "sensor that is on during an anomaly episode, with their states on gateway/ha/{device}/... "
                       "(retained), available while gateway/status says online (README \"Home Assistant\").")
    discovery_prefix: str = _f("homeassistant", "Topic prefix of the discovery configs: Home Assistant's own "
                               "`discovery_prefix` (MQTT integration options); the broker's ACL must let the gateway "
                               "write under it.", _topic_prefix)
    expire_after: int = _f(0, "Seconds without a new state after which Home Assistant shows a device's sensors as "
                           "unavailable (`expire_after` in each sensor's config); set it above the devices' longest "
                           "reporting interval. 0: a silent device's sensors keep their last value.", _non_negative)
    remove_after: float = _f(0.0, "Seconds a device may stay silent, counted while the gateway runs, before it is "
                             "removed from Home Assistant (its configs and states cleared; announced again if it "
                             "sends again), e.g. 604800 for a week. 0: never.", _non_negative)


def _paths(v: Any) -> str | None:
    return None if all(isinstance(p, str) and p for p in v) else "must be a list of non-empty paths or globs"


@dataclass(frozen=True)
class SerialConfig:
    ports: list[str] = _f([], "Serial ports of devices speaking docs/serial-protocol.md: paths (kept open, reopened "
                     "after an unplug) or globs such as '/dev/ttyUSB*' (rescanned for new adapters). Empty: none.",
                     _paths)
    baud: int = _f(115200, "Baud rate of every serial port.", _positive)
    profile: str = _f("", "Profile of devices that did not announce one in HELLO; empty: the profile whose "
                      "`match` fits the device id.")
    rescan_interval: float = _f(2.0, "Seconds between rescans of the port globs.", _positive)
    reopen_min: float = _f(0.2, "First delay before reopening a port that went away (doubles per failure, "
                           "jittered).", _positive)
    reopen_max: float = _f(5.0, "Longest delay between attempts to reopen a port.", _positive)
    max_queued_frames: int = _f(512, "Frames read ahead of the log per port; beyond this the port is not read "
                                "and the device's writes stop (backpressure).", _positive)
    noise_deadletters_per_second: float = _f(1.0, "Undecodable frames stored as dead letters per second and port "
                                             "(all are counted).", _positive)


UPSTREAM_KINDS = ("telemetry", "alerts", "stats")
TOPIC_FIELDS = ("site", "source", "source_kind", "source_id", "kind")


def _brokers(v: Any) -> str | None:
    if not all(isinstance(b, str) and _host_port(b) is None for b in v):
        return "must be a list of HOST:PORT"
    return None


def _kinds(v: Any) -> str | None:
    bad = [k for k in v if k not in UPSTREAM_KINDS]
    return f"unknown kind(s) {bad}; choose among {', '.join(map(repr, UPSTREAM_KINDS))}" if bad else None


def _site(v: Any) -> str | None:
    return None if v == "" or re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", v) else \
        "must be 1-64 characters of A-Z a-z 0-9 _ . - (one topic level), or empty"


def _topic_template(v: Any) -> str | None:
    """A template every event can fill: known fields only, and no wildcard or empty level in what it makes."""
    sample = {"site": "s", "source": "devices/d", "source_kind": "devices", "source_id": "d", "kind": "telemetry"}
    try:
        topic = str(v).format(**sample)
    except (KeyError, IndexError, ValueError) as exc:
        return f"may only use the fields {', '.join('{' + f + '}' for f in TOPIC_FIELDS)} ({exc!r})"
    if "{source}" not in v and "{source_id}" not in v:
        return "must contain {source} (or {source_id}), so each source keeps a topic (and an order) of its own"
    if "{kind}" not in v:
        return "must contain {kind}: telemetry, alert and stats are told apart by it"
    if "+" in topic or "#" in topic or topic.startswith("$") or "//" in topic or topic.startswith("/") \
            or topic.endswith("/"):
        return "must make topics without wildcards (+ #), empty levels or a leading $"
    return None


def _status_topic(v: Any) -> str | None:
    try:
        topic = str(v).format(site="s")
    except (KeyError, IndexError, ValueError):
        return "may only use the field {site}"
    return "must be a topic without wildcards (+ #)" if "+" in topic or "#" in topic else None


@dataclass(frozen=True)
class UpstreamConfig:
    enabled: bool = _f(False, "Forward events to a central MQTT broker over its own connection, as a consumer of "
                       "the log with its own committed offset: a WAN outage of any length within "
                       "`storage.max_log_bytes` loses nothing (README \"Upstream (store-and-forward)\").")
    brokers: list[str] = _f([], "The central broker, HOST:PORT; more than one (the nodes of a cluster): after a "
                            "failed attempt or a lost connection the next is tried, in turn.", _brokers)
    client_id: str = _f("", "Client id upstream (a persistent session); empty: `mqtt.client_id` + '-upstream'.")
    protocol: str = _f("auto", "MQTT version: '5', '3.1.1', or 'auto' (5, falling back to 3.1.1). The event id "
                       "travels as the user property `event-id` over 5, and in the payload always.",
                       _one_of("auto", "5", "3.1.1"))
    username: str = _f("", "Username upstream, empty for none.")
    password: str = _f("", "Password upstream.", secret=True)
    password_file: str = _f("", "Read the upstream password from this file (its first line), or from the systemd "
                            "credential of that name, as `mqtt.password_file`.")
    tls: bool = _f(False, "Connect upstream over TLS (chain and host name verified, TLS 1.2 or later).")
    ca_file: str = _f("", "CA certificate(s), PEM, the central broker's certificate must chain to; empty: the "
                      "system's trusted CAs. Needs `tls`.")
    cert_file: str = _f("", "Client certificate, PEM, for a central broker that requires one. Needs `tls`.")
    key_file: str = _f("", "Private key of `cert_file`, PEM; empty: the key is in `cert_file`.")
    tls_insecure: bool = _f(False, "Do not check that the certificate names the host (the chain is still "
                            "verified).")
    keepalive: int = _f(30, "Keepalive in seconds: a central broker silent for 1.5 of these is taken for gone and "
                        "the link reconnects.", _positive)
    session_expiry: int = _f(7 * 24 * 3600, "MQTT 5 session expiry asked of the central broker, in seconds.",
                             _non_negative)
    site: str = _f("", "This site's name in the topics (`{site}`); empty: `mqtt.client_id`.", _site)
    topic_template: str = _f("sites/{site}/{source}/{kind}", "Topic of each forwarded message. Fields: {site}, "
                             "{source} (devices/ID, users/ID, or events/ID for stats), {source_kind}, {source_id}, "
                             "{kind} (telemetry, alert or stats).", _topic_template)
    status_topic: str = _f("sites/{site}/status", "Retained `online`/`offline` of the link on the central broker "
                           "(`offline` is also the will); empty: none. Field: {site}.", _status_topic)
    kinds: list[str] = _f(["telemetry", "alerts", "stats"], "What is forwarded: 'telemetry' (every reading), "
                          "'alerts' (the readings that start and end an anomaly episode, kind `alert`), 'stats' "
                          "(a post's counts, coalesced as `social.stats_interval_ms`).", _kinds)
    max_events_per_second: float = _f(0.0, "Most messages forwarded per second on average (a returning link "
                                      "catches up at this pace); 0: no cap.", _non_negative)
    max_bytes_per_second: float = _f(0.0, "Most payload bytes forwarded per second on average; 0: no cap.",
                                     _non_negative)
    max_inflight: int = _f(1000, "Most forwarded messages awaiting the central broker's PUBACK (below its own "
                           "receive maximum): bounds memory and what is sent again after a reconnect.", _positive)


@dataclass(frozen=True)
class Config:
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    anomaly: AnomalyConfig = field(default_factory=AnomalyConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    content: ContentConfig = field(default_factory=ContentConfig)
    social: SocialConfig = field(default_factory=SocialConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    influx: InfluxConfig = field(default_factory=InfluxConfig)
    homeassistant: HomeAssistantConfig = field(default_factory=HomeAssistantConfig)
    serial: SerialConfig = field(default_factory=SerialConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    log: LogConfig = field(default_factory=LogConfig)
    profiles_dir: str = _f("devices/profiles", "Folder of device profile TOML files (relative: to the project, or "
                           "to the installed package).")

    def data_dir(self, environ: Mapping[str, str] = os.environ) -> Path:
        """Where the data lives: `storage.data_dir`, else the unit's StateDirectory, else the development folder."""
        if self.storage.data_dir:
            return Path(self.storage.data_dir)
        return Path(environ.get("STATE_DIRECTORY", "").split(":")[0] or DEV_DATA_DIR)

    def data_path(self, name: str) -> Path:
        return self.data_dir() / name

    def model_path(self) -> Path:
        return shipped(self.anomaly.model)

    def content_model_path(self) -> Path:
        return shipped(self.content.model)

    def profiles_path(self) -> Path:
        return shipped(self.profiles_dir)


def shipped(path: str) -> Path:
    """A file the project ships (models, profiles) named relative to the project: in a checkout it is there; an
    installed wheel carries it inside the package (pyproject.toml maps models/ to gateway/models/)."""
    p = Path(path)
    if p.is_absolute():
        return p
    in_checkout = REPO / p
    if in_checkout.exists():
        return in_checkout
    in_package = PACKAGE / p
    return in_package if in_package.exists() else in_checkout


def locate(option: str | None, environ: Mapping[str, str] = os.environ, system: Path = SYSTEM_CONFIG) -> Path | None:
    """The one way every command finds its configuration: `--config`, else $GATEWAY_CONFIG, else the system file
    when it exists (so `gateway status` on a Pi reads what the service reads), else None: the development
    defaults."""
    if option:
        return Path(option)
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV])
    return system if system.is_file() else None


@dataclass(frozen=True)
class ConfigProblem:
    field: str
    value: Any
    message: str

    def __str__(self) -> str:
        shown = "***" if self.value == "***" else repr(self.value)
        name = self.field if self.field.strip() and self.field.isprintable() else repr(self.field)
        return f"{name} = {shown}: {self.message}"


class ConfigError(ValueError):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


# Settings of earlier versions that no longer mean anything: accepted with a warning, so an upgrade does not stop a
# daemon over a tuning knob that went away. (What they tuned: the pipeline between the log and its outputs, and the
# InfluxDB outbox file; both are gone: the log's consumers read it directly, and the log's budget is the one budget.)
REMOVED = {
    "pipeline.linger_ms": "batches go from the log to its consumers in memory, without a linger",
    "pipeline.max_unacked_batches": "the broker's receive maximum bounds what is published and not acknowledged",
    "influx.outbox_max_bytes": "points wait in the log, under storage.max_log_bytes",
}
WARNINGS: list[str] = []  # what the last parse accepted but ignored, for the daemon to log


def parse(text: str) -> Config:
    """Validate TOML text into a Config; raise ConfigError listing every problem."""
    WARNINGS.clear()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([ConfigProblem("<toml>", None, str(exc))]) from None
    return from_dict(doc)


def from_dict(doc: dict[str, Any]) -> Config:
    problems: list[ConfigProblem] = []
    kwargs: dict[str, Any] = {}
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in doc.items():
        spec = sections.get(key)
        if spec is None:
            problems.append(ConfigProblem(key, value, "unknown setting"))
        elif spec.default_factory is not dataclasses.MISSING:  # a [section] table
            if not isinstance(value, dict):
                problems.append(ConfigProblem(key, value, "must be a table"))
                continue
            kwargs[key] = _section(spec.default_factory, key, value, problems)  # type: ignore[arg-type]
        else:
            checked = _value(spec, key, value, problems)
            if checked is not None:
                kwargs[key] = checked
    if problems:
        raise ConfigError(problems)
    cfg = Config(**kwargs)
    problems = _consistency(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg


def _consistency(cfg: Config) -> list[ConfigProblem]:
    """Settings that are valid alone but not together. Fail closed: TLS files without `tls` would otherwise send
    the password in the clear to someone who believes the link is encrypted."""
    problems = _connection_problems(cfg.mqtt, "mqtt") + _connection_problems(cfg.upstream, "upstream")
    u = cfg.upstream
    if u.enabled and not u.brokers:
        problems.append(ConfigProblem("upstream.brokers", u.brokers, "needs at least one HOST:PORT when "
                                      "upstream.enabled"))
    if cfg.limits.per_source_burst and not cfg.limits.per_source_rate:
        problems.append(ConfigProblem("limits.per_source_burst", cfg.limits.per_source_burst,
                                      "needs limits.per_source_rate"))
    return problems


def _connection_problems(c: MqttConfig | UpstreamConfig, section: str) -> list[ConfigProblem]:
    """A broker connection's password and TLS settings that contradict each other."""
    problems = []
    if c.password and c.password_file:
        problems.append(ConfigProblem(f"{section}.password_file", c.password_file, "set `password` or "
                                      "`password_file`, not both"))
    if not c.tls:
        for name in ("ca_file", "cert_file", "key_file", "tls_insecure"):
            if getattr(c, name):
                problems.append(ConfigProblem(f"{section}.{name}", getattr(c, name), f"needs {section}.tls = true"))
    if c.key_file and not c.cert_file:
        problems.append(ConfigProblem(f"{section}.key_file", c.key_file, f"needs {section}.cert_file"))
    return problems


def with_secrets(cfg: Config, environ: Mapping[str, str] = os.environ) -> Config:
    """`cfg` with `mqtt.password` read from `mqtt.password_file` (when set), and `upstream.password` likewise;
    ConfigError when one cannot be read. Done when the daemon starts, not by `parse`: the file may exist only on
    the machine that runs it."""
    if cfg.mqtt.password_file:
        cfg = dataclasses.replace(cfg, mqtt=dataclasses.replace(
            cfg.mqtt, password=_read_secret("mqtt.password_file", cfg.mqtt.password_file, environ)))
    if cfg.upstream.password_file:
        cfg = dataclasses.replace(cfg, upstream=dataclasses.replace(
            cfg.upstream, password=_read_secret("upstream.password_file", cfg.upstream.password_file, environ)))
    return cfg


def _read_secret(setting: str, name: str, environ: Mapping[str, str]) -> str:
    """The first line of a password file, or of the systemd credential `name` when it is a bare name."""
    path = Path(name)
    if path.name == name:  # a bare name: a systemd credential
        if not environ.get("CREDENTIALS_DIRECTORY"):
            raise ConfigError([ConfigProblem(setting, name, "a bare name is a systemd credential, but "
                                             "$CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit); or "
                                             "give a path")])
        path = Path(environ["CREDENTIALS_DIRECTORY"]) / name
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError([ConfigProblem(setting, str(path), exc.strerror or str(exc))]) from None
    return lines[0] if lines else ""


def tls_files(m: MqttConfig | UpstreamConfig, section: str = "mqtt") -> list[ConfigProblem]:
    """The TLS files that are named but cannot be read (checked when the daemon starts and by check-config,
    not by `parse`: the file may live only on the machine that runs the gateway)."""
    problems = []
    for name in ("ca_file", "cert_file", "key_file"):
        path = getattr(m, name)
        if m.tls and path:
            try:
                with open(path, "rb"):
                    pass
            except OSError as exc:
                problems.append(ConfigProblem(f"{section}.{name}", path, exc.strerror or str(exc)))
    return problems


def _section(cls: type, prefix: str, table: dict[str, Any], problems: list[ConfigProblem]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        spec = fields.get(key)
        if spec is None:
            if f"{prefix}.{key}" in REMOVED:
                WARNINGS.append(f"{prefix}.{key} is ignored: no longer used ({REMOVED[f'{prefix}.{key}']})")
            else:
                problems.append(ConfigProblem(f"{prefix}.{key}", value, "unknown setting"))
            continue
        checked = _value(spec, f"{prefix}.{key}", value, problems)
        if checked is not None:
            kwargs[key] = checked
    return cls(**kwargs)


def _default(spec: dataclasses.Field[Any]) -> Any:
    if spec.default is dataclasses.MISSING and spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    return spec.default


def _value(spec: dataclasses.Field[Any], name: str, value: Any, problems: list[ConfigProblem]) -> Any:
    # A list setting has a default_factory (a mutable default must not be shared), not a default.
    default = _default(spec)
    shown = "***" if spec.metadata.get("secret") else value
    expected = type(default)
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 1e300:
            problems.append(ConfigProblem(name, shown, "is too large"))
            return None
        value, ok = float(value), True
    if not ok:
        problems.append(ConfigProblem(name, shown, f"must be {expected.__name__}, got {type(value).__name__}"))
        return None
    check = spec.metadata.get("check")
    message = check(value) if check else None
    if message:
        problems.append(ConfigProblem(name, shown, message))
        return None
    return value


def load(path: Path) -> Config:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([ConfigProblem("<file>", str(path), exc.strerror or str(exc))]) from None
    return parse(text)


def override(cfg: Config, **changes: dict[str, Any]) -> Config:
    """Apply command-line overrides (section -> {field: value}) through the same validation as the file."""
    doc = as_dict(cfg)
    for section, values in changes.items():
        doc[section].update({k: v for k, v in values.items() if v is not None})
    return from_dict(doc)


def as_dict(cfg: Config, redact: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            section = {}
            for g in dataclasses.fields(value):
                v = getattr(value, g.name)
                section[g.name] = "***" if redact and g.metadata.get("secret") and v else v
            out[f.name] = section
        else:
            out[f.name] = value
    return out


def starter(data_dir: str = "") -> str:
    """A commented configuration file: every setting with its description and default, commented out, so that
    uncommenting a line is the way to change it (`gateway init-config`)."""
    lines = ["# edge-gateway configuration. Every setting is shown with its default, commented out; uncomment a line",
             "# to change it. The reference with the same descriptions: `gateway config-reference`.", ""]
    top: list[str] = []
    for f in dataclasses.fields(Config):
        if f.default_factory is dataclasses.MISSING:
            top += _commented(f, f.name)
    lines += top + [""]
    for f in dataclasses.fields(Config):
        if f.default_factory is dataclasses.MISSING:
            continue
        lines.append(f"[{f.name}]")
        for g in dataclasses.fields(f.default_factory):  # type: ignore[arg-type]
            entry = _commented(g, g.name)
            if f.name == "storage" and g.name == "data_dir" and data_dir:
                entry[-1] = f"{g.name} = {_toml(data_dir)}"
            lines += entry
        lines.append("")
    return "\n".join(lines)


def _commented(spec: dataclasses.Field[Any], name: str) -> list[str]:
    words, out, line = spec.metadata["doc"].split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > 118:
            out.append(line)
            line = "#"
        line += " " + word
    return out + [line, f"# {name} = {_toml(_default(spec))}"]


def _toml(value: Any) -> str:
    """A default value as TOML (the values the schema holds: strings, booleans, numbers, lists and tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string: JSON's escapes are a subset of TOML's
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }" if value else "{}"
    raise TypeError(f"no TOML for {value!r}")


def reference() -> str:
    """The configuration reference (Markdown), generated from the schema."""
    lines = ["| setting | default | description |", "|---|---|---|"]
    for f in dataclasses.fields(Config):
        if f.default_factory is not dataclasses.MISSING:  # a section
            for g in dataclasses.fields(f.default_factory):  # type: ignore[arg-type]
                lines.append(f"| `{f.name}.{g.name}` | `{_default(g)!r}` | {g.metadata['doc']} |")
        else:
            lines.append(f"| `{f.name}` | `{f.default!r}` | {f.metadata['doc']} |")
    return "\n".join(lines)
