"""`firmware-sim mqtt`: a fleet of simulated devices publishing telemetry to an MQTT broker.

Every device publishes `devices/{id}/telemetry` (JSON from `signals.telemetry_payload`) at the requested QoS. Events go
round-robin over the devices, so each device publishes at rate / devices. The schedule is absolute: event k is due
`(k + 1) / rate` seconds after the start on the monotonic clock, so late wake-ups are caught up instead of
accumulating drift. A reading's `ts` is its scheduled time (wall clock at the start plus the schedule offset).

Connections: one paho client per device does not scale to thousands of devices (a thread and a socket each), so
devices are multiplexed over `--connections` MQTT connections (default: one per device up to 8). Device i always
uses connection i mod C. With one connection per device the client id is the device id; otherwise it is
`{prefix}sim-{c}of{C}`. Either way the same command line reuses the same client ids, so broker sessions line up
between runs.

Acknowledgements: `on_publish` fires when the broker's PUBACK arrives (QoS 1), which is what the summary's
`acknowledged` counts. At most `MAX_UNACKED` publishes may await their acknowledgement at once; beyond that the
sender waits, so a slow or absent broker cannot make this process buffer without bound.

Exit status: 0 when every publish was acknowledged, 1 when some were not within the drain timeout, 3 when the broker
could not be reached at the start, 2 for usage errors.
"""

from __future__ import annotations

import dataclasses

import json
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import click
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.signals import ANOMALY_TYPES, KINDS, DeviceSignal, Reading, telemetry_payload

MAX_UNACKED = 10_000
MAX_BURST = 500
CONNECT_TIMEOUT_S = 10.0
EXIT_UNACKNOWLEDGED = 1
EXIT_UNREACHABLE = 3


class BrokerUnreachable(click.ClickException):
    exit_code = EXIT_UNREACHABLE


@dataclass(frozen=True)
class MqttRun:
    """Everything one run needs; the click command only parses it."""

    host: str
    port: int
    devices: int
    events: int | None
    rate: float
    duration: float | None = None
    seed: int = 1
    anomaly_rate: float = 0.005
    labels: Path | None = None
    device_prefix: str = "dev-"
    qos: int = 1
    connections: int | None = None
    kinds: tuple[str, ...] = ("env", "machine", "water")
    drain_timeout: float = 15.0
    progress: bool = True
    stamp_field: str | None = None  # adds the publish time (µs since the epoch) as this numeric field
    cafile: Path | None = None  # TLS, trusting this CA
    credentials: dict[str, str] | None = None  # device id -> password: each device logs in as itself

    @property
    def connection_count(self) -> int:
        if self.credentials is not None:
            return self.devices  # an account is one device: a shared connection could not speak for several
        return min(self.devices, self.connections or 8)


@dataclass
class Summary:
    broker: str
    devices: int
    connections: int
    qos: int
    sent: int = 0
    acknowledged: int = 0
    rejected: int = 0
    anomalies_injected: dict[str, int] = field(default_factory=dict)
    anomalous_readings: int = 0
    elapsed_s: float = 0.0
    target_rate: float = 0.0
    achieved_rate: float = 0.0
    disconnects: int = 0
    labels: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "broker": self.broker,
            "devices": self.devices,
            "connections": self.connections,
            "qos": self.qos,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "rejected": self.rejected,
            "unacknowledged": self.sent - self.acknowledged - self.rejected,
            "anomalies_injected": self.anomalies_injected,
            "anomalous_readings": self.anomalous_readings,
            "elapsed_s": round(self.elapsed_s, 3),
            "target_rate": self.target_rate,
            "achieved_rate": round(self.achieved_rate, 1),
            "disconnects": self.disconnects,
            "labels": self.labels,
        }


def login_client(client_id: str, password: str | None = None, cafile: Path | None = None) -> mqtt.Client:
    """A paho MQTT 5 client. With a password it logs in as `client_id` (the production broker's accounts: the
    username is the identity); with a CA file it connects over TLS."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    if password is not None:
        client.username_pw_set(client_id, password)
    if cafile is not None:
        client.tls_set(ca_certs=str(cafile))
    return client


class Connection:
    """One paho client with its own network thread, counting CONNACKs, PUBACKs and disconnects.

    The counters are written only by this client's network thread and read by the sender: plain ints suffice.
    """

    def __init__(self, client_id: str, qos: int, password: str | None = None, cafile: Path | None = None) -> None:
        self.client_id = client_id
        self.qos = qos
        self.client = login_client(client_id, password, cafile)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect
        self.connected = threading.Event()
        self.refused: str | None = None
        self.acked = 0
        self.rejected = 0
        self.disconnects = 0  # unplanned ones: the broker went away or dropped us
        self._stopping = False

    def start(self, host: str, port: int) -> None:
        self.client.connect(host, port, keepalive=30)  # raises OSError when nothing listens
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes) -> mqtt.MQTTMessageInfo:
        return self.client.publish(topic, payload, qos=self.qos)

    def stop(self) -> None:
        self._stopping = True
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self.refused = str(reason)
        else:
            self.connected.set()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        # MQTT 5 PUBACK reason codes >= 0x80 are refusals (not authorised, quota exceeded, ...).
        if reason.is_failure:
            self.rejected += 1
        else:
            self.acked += 1

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                       properties: Properties | None) -> None:
        if not self._stopping:
            self.disconnects += 1


class Progress:
    """One line on stderr: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, enabled: bool, total: int | None, stream: IO[str]) -> None:
        self.enabled = enabled
        self.total = total
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 0.25 if self.tty else 5.0
        self.last = time.monotonic()

    def update(self, now: float, elapsed: float, sent: int, acked: int, force: bool = False) -> None:
        if not self.enabled or (not force and now - self.last < self.every):
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        rate = sent / elapsed if elapsed > 0 else 0.0
        line = f"sent {sent}{of}  acked {acked}  {rate:,.0f}/s  {elapsed:.1f}s"
        if self.tty:
            self.stream.write("\r" + line.ljust(60))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()


def device_ids(prefix: str, devices: int) -> list[str]:
    """PREFIX0001, PREFIX0002, ...: the ids of a simulated fleet (and the accounts it logs in with)."""
    return [f"{prefix}{i + 1:04d}" for i in range(devices)]


def make_fleet(prefix: str, devices: int, seed: int, rate: float, kinds: tuple[str, ...],
               anomaly_rate: float) -> list[DeviceSignal]:
    """Devices PREFIX0001, PREFIX0002, ..., kinds round-robin, paced for `rate` events/s over the whole fleet
    (events go round-robin over the devices). A reading's `ts` is its scheduled time: the wall clock now plus
    the schedule offset."""
    wall0_ms = int(time.time() * 1000)
    return [
        DeviceSignal(
            device_id,
            seed,
            kinds[i % len(kinds)],
            start_ms=wall0_ms + round((i + 1) * 1000.0 / rate),
            interval_ms=devices * 1000.0 / rate,
            anomaly_rate=anomaly_rate,
        )
        for i, device_id in enumerate(device_ids(prefix, devices))
    ]


class Pacer:
    """The absolute schedule: event k is due `(k + 1) / rate` seconds after the start on the monotonic clock, so
    late wake-ups are caught up instead of accumulating drift; a pass sends at most MAX_BURST, and with
    `max_unacked` never more than that many publishes await their acknowledgement."""

    def __init__(self, rate: float, events: int | None, duration: float | None, max_unacked: int | None) -> None:
        self.rate = rate
        self.events = events
        self.max_unacked = max_unacked
        self.t0 = time.monotonic()
        self.end = self.t0 + duration if duration is not None else None

    def all_sent(self, sent: int) -> bool:
        return self.events is not None and sent >= self.events

    def over(self, now: float, sent: int) -> bool:
        return self.all_sent(sent) or (self.end is not None and now >= self.end)

    def due(self, now: float, sent: int, settled: int) -> int:
        """How many events should have been sent by `now`, given `settled` acknowledged (or refused) so far."""
        due = int((now - self.t0) * self.rate)
        if self.events is not None:
            due = min(due, self.events)
        if self.max_unacked is not None:
            due = min(due, settled + self.max_unacked)
        # A bounded burst, so a sender that fell behind still checks the clock, the deadline and the progress.
        return min(due, sent + MAX_BURST)

    def nap(self, sent: int) -> None:
        wake = self.t0 + (sent + 1) / self.rate
        if self.end is not None:
            wake = min(wake, self.end)
        # Short naps even when behind: the next pass sends everything due by then in one burst.
        time.sleep(min(max(wake - time.monotonic(), 0.0005), 0.1))


def run(cfg: MqttRun, err: IO[str] = sys.stderr) -> Summary:
    """Connect, publish on schedule, drain acknowledgements, disconnect. Raises BrokerUnreachable."""
    n_conn = cfg.connection_count
    signals = make_fleet(cfg.device_prefix, cfg.devices, cfg.seed, cfg.rate, cfg.kinds, cfg.anomaly_rate)
    topics = [f"devices/{s.device_id}/telemetry" for s in signals]
    if n_conn == cfg.devices:
        client_ids = [s.device_id for s in signals]
    else:
        client_ids = [f"{cfg.device_prefix}sim-{c + 1}of{n_conn}" for c in range(n_conn)]
    creds = cfg.credentials
    conns = [Connection(cid, cfg.qos, creds[cid] if creds is not None else None, cfg.cafile) for cid in client_ids]

    summary = Summary(f"{cfg.host}:{cfg.port}", cfg.devices, n_conn, cfg.qos, target_rate=cfg.rate)
    started: list[Connection] = []
    try:
        connect_all(cfg.host, cfg.port, conns, started)
        labels_out = open(cfg.labels, "w", encoding="utf-8") if cfg.labels is not None else None
        try:
            _publish_all(cfg, signals, topics, conns, labels_out, summary, err)
        finally:
            if labels_out is not None:
                labels_out.close()
        _drain(cfg, conns, summary)
    finally:
        for c in started:
            c.stop()
    summary.acknowledged = sum(c.acked for c in conns)
    summary.rejected = sum(c.rejected for c in conns)
    summary.disconnects = sum(c.disconnects for c in conns)
    injected: Counter[str] = Counter()
    for s in signals:
        injected.update(s.injected)
    summary.anomalies_injected = {t: injected.get(t, 0) for t in ANOMALY_TYPES}
    summary.labels = str(cfg.labels) if cfg.labels is not None else None
    return summary


def connect_all(host: str, port: int, conns: list[Connection], started: list[Connection]) -> None:
    """Connect every client and wait for every CONNACK; `started` collects those to stop. Raises BrokerUnreachable."""
    where = f"{host}:{port}"
    for c in conns:
        try:
            c.start(host, port)
        except OSError as e:
            raise BrokerUnreachable(f"cannot reach the MQTT broker at {where}: {e}") from e
        started.append(c)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    for c in conns:
        while not c.connected.wait(0.05):
            if c.refused is not None:
                raise BrokerUnreachable(f"the MQTT broker at {where} refused client {c.client_id!r}: {c.refused}")
            if time.monotonic() > deadline:
                raise BrokerUnreachable(f"no CONNACK from the MQTT broker at {where} within {CONNECT_TIMEOUT_S:g}s")


def _publish_all(cfg: MqttRun, signals: list[DeviceSignal], topics: list[str], conns: list[Connection],
                 labels_out: IO[str] | None, summary: Summary, err: IO[str]) -> None:
    n_dev = len(signals)
    n_conn = len(conns)
    total = cfg.events
    progress = Progress(cfg.progress, total, err)
    # Back-pressure: never more than MAX_UNACKED publishes waiting for their PUBACK.
    pacer = Pacer(cfg.rate, total, cfg.duration, MAX_UNACKED if cfg.qos > 0 else None)
    t0 = pacer.t0
    sent = 0
    anomalous = 0
    try:
        while True:
            now = time.monotonic()
            if pacer.over(now, sent):
                break
            acked = sum(c.acked + c.rejected for c in conns)
            due = pacer.due(now, sent, acked)
            while sent < due:
                i = sent % n_dev
                reading = signals[i].next()
                if cfg.stamp_field is None:
                    payload = telemetry_payload(reading)
                else:
                    # Stamped at the moment of publishing, not the reading's schedule, so a subscriber's
                    # receive time minus it is the end-to-end latency (same machine, same clock).
                    payload = telemetry_payload(dataclasses.replace(
                        reading, fields={**reading.fields, cfg.stamp_field: float(time.time_ns() // 1000)}))
                conns[i % n_conn].publish(topics[i], payload)
                if reading.anomalous:
                    anomalous += 1
                if labels_out is not None:
                    labels_out.write(_label_line(reading))
                sent += 1
            progress.update(now, now - t0, sent, acked)
            if pacer.all_sent(sent):
                break
            pacer.nap(sent)
    except KeyboardInterrupt:
        err.write("\ninterrupted: stopping, waiting for acknowledgements\n")
    elapsed = time.monotonic() - t0
    progress.update(time.monotonic(), elapsed, sent, sum(c.acked for c in conns), force=True)
    progress.close()
    summary.sent = sent
    summary.anomalous_readings = anomalous
    summary.elapsed_s = elapsed
    summary.achieved_rate = sent / elapsed if elapsed > 0 else 0.0


def _drain(cfg: MqttRun, conns: list[Connection], summary: Summary) -> None:
    if cfg.qos == 0:
        return
    deadline = time.monotonic() + cfg.drain_timeout
    while time.monotonic() < deadline:
        if sum(c.acked + c.rejected for c in conns) >= summary.sent:
            return
        time.sleep(0.01)


def _label_line(r: Reading) -> str:
    return json.dumps({"device": r.device_id, "seq": r.seq, "ts": r.ts_ms, "labels": r.labels},
                      separators=(",", ":")) + "\n"


def read_credentials(path: Path) -> dict[str, str]:
    """`ID PASSWORD` per line; blank lines and lines starting with '#' are skipped."""
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = [] if line.lstrip().startswith("#") else line.split()
        if not fields:
            continue
        if len(fields) != 2:
            raise click.BadParameter(f"{path}, line {number}: expected 'ID PASSWORD'", param_hint="--credentials")
        out[fields[0]] = fields[1]
    return out


def parse_broker(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}", param_hint="--broker")
    return host, int(port)


@click.command("mqtt")
@click.option("--broker", default="127.0.0.1:1883", show_default=True, help="The MQTT broker, HOST:PORT.")
@click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of simulated devices.")
@click.option("--events", type=click.IntRange(min=0), default=None,
              help="Total events to publish, across all devices.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Total events per second, across all devices.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop after this many seconds (whichever comes first with --events).")
@click.option("--seed", type=int, default=1, show_default=True, help="Fleet seed: same seed, same readings.")
@click.option("--anomaly-rate", type=click.FloatRange(0.0, 1.0), default=0.005, show_default=True,
              help="Anomaly episodes started per reading of a device.")
@click.option("--labels", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the ground truth here: one JSON line per reading (device, seq, ts, labels).")
@click.option("--device-prefix", default="dev-", show_default=True, help="Device ids are PREFIX0001, PREFIX0002, ...")
@click.option("--qos", type=click.IntRange(0, 2), default=1, show_default=True)
@click.option("--connections", type=click.IntRange(min=1), default=None,
              help="MQTT connections to multiplex the devices over [default: one per device, at most 8].")
@click.option("--kinds", default="env,machine,water", show_default=True,
              help=f"Device kinds, assigned round-robin (known: {', '.join(KINDS)}).")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Seconds to wait for outstanding acknowledgements after the last publish.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress line on stderr.")
@click.option("--stamp-field", default=None, metavar="NAME",
              help="Add the publish time (µs since the epoch) as numeric field NAME, for latency measurements.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Connect over TLS, trusting this CA certificate (deploy/make-certs makes one).")
@click.option("--credentials", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="'DEVICE_ID PASSWORD' per line (as `gateway credentials add` printed them): each device connects "
                   "as its own account, as the production broker requires.")
def mqtt_command(broker: str, devices: int, events: int | None, rate: float, duration: float | None, seed: int,
                 anomaly_rate: float, labels: Path | None, device_prefix: str, qos: int, connections: int | None,
                 kinds: str, drain_timeout: float, progress: bool, stamp_field: str | None, cafile: Path | None,
                 credentials: Path | None) -> None:
    """Publish simulated telemetry to devices/{id}/telemetry and print a JSON summary on stdout."""
    host, port = parse_broker(broker)
    passwords = read_credentials(credentials) if credentials is not None else None
    if passwords is not None:
        missing = [d for d in device_ids(device_prefix, devices) if d not in passwords]
        if missing:
            raise click.BadParameter(f"no password for {', '.join(missing[:5])}"
                                     f"{' ...' if len(missing) > 5 else ''}", param_hint="--credentials")
    if events is None and duration is None:
        raise click.UsageError("give --events, --duration, or both")
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    unknown = [k for k in kind_list if k not in KINDS]
    if not kind_list or unknown:
        raise click.BadParameter(f"unknown kinds {unknown or kinds!r}; known: {', '.join(KINDS)}",
                                 param_hint="--kinds")
    cfg = MqttRun(host, port, devices, events, rate, duration, seed, anomaly_rate, labels, device_prefix, qos,
                  connections, kind_list, drain_timeout, progress, stamp_field, cafile, passwords)
    summary = run(cfg)
    click.echo(json.dumps(summary.as_dict()))
    if qos > 0 and summary.acknowledged < summary.sent:
        click.echo(f"firmware-sim: {summary.sent - summary.acknowledged} of {summary.sent} publishes were not "
                   f"acknowledged by the broker", err=True)
        sys.exit(EXIT_UNACKNOWLEDGED)
