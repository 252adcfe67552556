"""`firmware-sim chaos`: check a running installation end to end while faults are injected into it.

The command is the fleet and a follower at once:

1. Setup. Device and follower ids carry a random run prefix (`chaos-1a2b3c-`), so runs never mix with each other
   or with real devices. The follower `{prefix}fan` subscribes to its feed with a persistent session and asks the
   gateway to follow every device (`users/{prefix}fan/follows`, the gateway's own MQTT interface), then each
   device publishes probe readings until one of each has come back on the feed: from then on the gateway is known
   to deliver every device to the follower. Probes are not counted.
   Against a broker with accounts (`deploy/mosquitto-production.conf`), `--credentials` gives every client its own
   login (the ids then come from a fixed `--prefix`, since the accounts exist before the run; the dead letters are
   read as `--operator`) and `--cafile` turns on TLS; each device then has a connection of its own, as the broker
   allows one per account.
2. Load and faults. The devices publish telemetry at QoS 1 on the same absolute schedule as `firmware-sim mqtt`
   (readings from `signals.py`, each with a unique (device, seq)), while a scheduler thread injects the chosen
   faults one at a time, at seeded random moments about `--fault-interval` apart, taking turns.
3. Drain and verdict. After the last publish the command waits up to `--drain-timeout` for the remaining PUBACKs
   and deliveries (and, with `--influx-url`, for the readings to appear in InfluxDB), removes its follows and
   sessions, and prints the report (`chaos_report.py`): exit status 0 when nothing the broker acknowledged was lost,
   1 otherwise, 2 for usage errors, 3 when the broker or the gateway could not be reached at the start.

What the run leaves behind: the readings in the gateway's log (trimmed after `storage.retention_hours`) and in
InfluxDB (measurement `telemetry`, devices `chaos-*`).
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import IO, Any

import click

from firmware_sim.chaos_faults import (Context, DeadletterWatcher, DeviceLink, Fault, FaultError, Follower,
                                       GatewayControl, GatewaySignal, Hostile, InfluxOutage, PauseBroker, Peer,
                                       Publisher, Reconnect, RestartBroker, SlowFollower, hostile_ids)
from firmware_sim.chaos_report import (FaultRecord, HostileRecord, InfluxRecord, Key, Report, influx_tally,
                                       must_reach_influx, tally)
from firmware_sim.mqtt_mode import (MAX_UNACKED, BrokerUnreachable, Connection, Pacer, Progress, connect_all,
                                    device_ids, make_fleet, parse_broker, read_credentials)
from firmware_sim.signals import KINDS, DeviceSignal, telemetry_payload

FAULTS = ("hostile", "reconnect", "slow-follower", "kill-gateway", "term-gateway", "pause-broker", "restart-broker",
          "influx-outage")
DEFAULT_FAULTS = ("hostile", "reconnect", "slow-follower")


EXIT_FAILED = 1
EXIT_UNREACHABLE = 3
PROBE_EVERY_S = 1.0


class SetupFailed(click.ClickException):
    exit_code = EXIT_UNREACHABLE


@dataclass(frozen=True)
class ChaosRun:
    """Everything one run needs; the click command only parses and checks it."""

    host: str
    port: int
    devices: int = 10
    rate: float = 100.0
    duration: float = 60.0
    faults: tuple[str, ...] = DEFAULT_FAULTS
    fault_interval: float | None = None  # None: min(10 s, duration / 2)
    seed: int = 1
    kinds: tuple[str, ...] = ("env", "machine", "water")
    connections: int | None = None
    drain_timeout: float = 60.0
    setup_timeout: float = 30.0
    prefix: str | None = None
    gateway_data_dir: Path | None = None
    gateway_restart: str | None = None
    gateway_timeout: float = 60.0
    broker_pid: str | None = None  # a PID, or a pid file read at each injection (the PID changes on restarts)
    broker_restart: str | None = None
    pause_seconds: float = 45.0
    influx_url: str | None = None
    influx_db: str | None = None
    influx_stop: str | None = None
    influx_start: str | None = None
    influx_outage: float = 20.0
    progress: bool = True
    cafile: Path | None = None  # TLS, trusting this CA
    credentials: dict[str, str] | None = None  # account id -> password: every device and the follower log in
    operator: str | None = None  # with credentials: the account that reads gateway/deadletter (hostile)


def follower_id(prefix: str) -> str:
    """The run's follower (an account of its own, with --credentials)."""
    return f"{prefix}fan"


def slow_follower_id(prefix: str) -> str:
    """The slow-follower fault's follower (an account of its own, with --credentials)."""
    return f"{prefix}slow"


def accounts(cfg: ChaosRun, prefix: str) -> list[str]:
    """Every id the run logs in with when the broker has accounts."""
    slow = [slow_follower_id(prefix)] if "slow-follower" in cfg.faults else []
    hostile = [*hostile_ids(prefix), *([cfg.operator] if cfg.operator else [])] if "hostile" in cfg.faults else []
    return [*device_ids(prefix, cfg.devices), follower_id(prefix), *slow, *hostile]


def requirement_errors(cfg: ChaosRun) -> list[str]:
    """What the chosen faults need and the command line lacks, one sentence each."""
    out: list[str] = []
    unknown = [f for f in cfg.faults if f not in FAULTS]
    if unknown:
        out.append(f"unknown faults {', '.join(unknown)}; known: {', '.join(FAULTS)}")
    for fault in ("kill-gateway", "term-gateway"):
        if fault in cfg.faults and (cfg.gateway_data_dir is None or not cfg.gateway_restart):
            out.append(f"{fault} needs --gateway-data-dir (where the gateway writes status.json, to find its pid) "
                       f"and --gateway-restart CMD (what brings it back, e.g. 'systemctl restart edge-gateway')")
    if "pause-broker" in cfg.faults and cfg.broker_pid is None:
        out.append("pause-broker needs --broker-pid PID or PIDFILE (e.g. /run/mosquitto/mosquitto.pid)")
    if cfg.broker_pid is not None and not (cfg.broker_pid.isdigit() and int(cfg.broker_pid) > 1) \
            and not Path(cfg.broker_pid).is_file():
        out.append(f"--broker-pid {cfg.broker_pid!r} is neither a PID nor a pid file")
    if "restart-broker" in cfg.faults and not cfg.broker_restart:
        out.append("restart-broker needs --broker-restart CMD (e.g. 'systemctl restart mosquitto')")
    if "influx-outage" in cfg.faults and not (cfg.influx_stop and cfg.influx_start and cfg.influx_url):
        out.append("influx-outage needs --influx-stop CMD, --influx-start CMD, and --influx-url/--influx-db to "
                   "check afterwards that nothing was lost")
    if (cfg.influx_url is None) != (cfg.influx_db is None):
        out.append("--influx-url and --influx-db go together")
    if cfg.prefix is not None and not re.fullmatch(r"[A-Za-z0-9_.\-]{1,40}", cfg.prefix):
        out.append(f"--prefix {cfg.prefix!r}: 1-40 characters of A-Z a-z 0-9 _ . -")
    if cfg.operator is not None and cfg.credentials is None:
        out.append("--operator goes with --credentials")
    if cfg.credentials is not None:
        if "hostile" in cfg.faults and cfg.operator is None:
            out.append("hostile with --credentials needs --operator ID: an account that may read gateway/deadletter "
                       "(`operator` in deploy/mosquitto.acl), to count the dead letters")
        if cfg.prefix is None:
            out.append("--credentials needs --prefix: the accounts exist before the run, so the ids cannot be random")
        else:
            missing = [i for i in accounts(cfg, cfg.prefix) if i not in cfg.credentials]
            if missing:
                out.append(f"--credentials has no password for {', '.join(missing[:5])}"
                           f"{' ...' if len(missing) > 5 else ''} (the accounts the run logs in with)")
        if cfg.connections is not None:
            out.append("--connections does not go with --credentials: each device logs in as itself, one connection "
                       "per account")
    scheduled = [f for f in cfg.faults if f != "slow-follower"]
    if scheduled and cfg.fault_interval is not None and cfg.duration < cfg.fault_interval:
        out.append(f"--duration {cfg.duration:g} is shorter than --fault-interval {cfg.fault_interval:g}: "
                   f"no fault would be injected")
    return out


def fault_interval(cfg: ChaosRun) -> float:
    return cfg.fault_interval if cfg.fault_interval is not None else min(10.0, cfg.duration / 2)


class Chaos:
    def __init__(self, cfg: ChaosRun, err: IO[str]) -> None:
        self.cfg = cfg
        self.err = err
        self.prefix = cfg.prefix or f"chaos-{secrets.token_hex(3)}-"
        self.rng = Random(cfg.seed)
        self.signals: list[DeviceSignal] = make_fleet(self.prefix, cfg.devices, cfg.seed, cfg.rate, cfg.kinds, 0.0)
        self.topics = [f"devices/{s.device_id}/telemetry" for s in self.signals]
        creds = cfg.credentials
        if creds is not None:  # device i publishes on link i (i % n below), logged in as itself
            self.links = [DeviceLink(s.device_id, creds[s.device_id], cfg.cafile) for s in self.signals]
        else:
            n_conn = min(cfg.devices, cfg.connections or 4)
            self.links = [DeviceLink(f"{self.prefix}dev-{c + 1}", cafile=cfg.cafile) for c in range(n_conn)]
        fan = follower_id(self.prefix)
        self.follower = Follower(fan, self.prefix, password=creds[fan] if creds is not None else None,
                                 cafile=cfg.cafile)
        # The hostile fault's clients: who publishes its messages, and who reads the dead letters they cause.
        self.publishers: list[Publisher] = []
        self.watcher: DeadletterWatcher | None = None
        self.hostile: Hostile | None = None
        if "hostile" in cfg.faults:
            if creds is not None:
                assert cfg.operator is not None
                senders = {i: Publisher(i, creds[i], cfg.cafile) for i in hostile_ids(self.prefix)}
                self.hostile = Hostile(self.prefix, senders)
                self.watcher = DeadletterWatcher(cfg.operator, self.prefix, creds[cfg.operator], cfg.cafile)
                self.publishers = list(senders.values())
            else:
                anyone = Publisher(f"{self.prefix}control", cafile=cfg.cafile)
                self.hostile = Hostile(self.prefix, {}, anyone)
                self.watcher = DeadletterWatcher(f"{self.prefix}deadletters", self.prefix, cafile=cfg.cafile)
                self.publishers = [anyone]
        self.slow: SlowFollower | None = None
        if "slow-follower" in cfg.faults:
            slow = slow_follower_id(self.prefix)
            self.slow = SlowFollower(slow, cfg.host, cfg.port, creds[slow] if creds is not None else None,
                                     cfg.cafile)
        self.sources = [f"devices/{s.device_id}" for s in self.signals]
        self.sent_at: dict[Key, float] = {}
        self.acked: set[Key] = set()
        self.refused: set[Key] = set()
        self.abort = threading.Event()
        self.window_over = threading.Event()
        self.t0 = time.monotonic()
        self.records: dict[str, FaultRecord] = {}
        self.faults: list[Fault] = []
        self.problems: list[str] = []
        self.interrupted_at: float | None = None

    # --- output ------------------------------------------------------------------------------------------------

    def say(self, line: str) -> None:
        if self.cfg.progress:
            self.err.write(f"[{time.monotonic() - self.t0:7.1f}s] {line}\n")
            self.err.flush()

    # --- the run -----------------------------------------------------------------------------------------------

    def run(self) -> Report:
        cfg = self.cfg
        started: list[Connection] = []
        follower_up = False
        up: list[Peer] = []
        try:
            self._build_faults()
            try:
                self.follower.start(cfg.host, cfg.port)
                follower_up = True
                for client in (*self.publishers, *([self.watcher] if self.watcher is not None else [])):
                    client.start(cfg.host, cfg.port)
                    up.append(client)
            except OSError as exc:
                raise BrokerUnreachable(f"cannot reach the MQTT broker at {cfg.host}:{cfg.port}: {exc}") from exc
            connect_all(cfg.host, cfg.port, list(self.links), started)
            if not self.follower.subscribed.wait(10):
                raise BrokerUnreachable("the follower's subscription was not acknowledged within 10s")
            if self.watcher is not None and not self.watcher.subscribed.wait(10):
                raise BrokerUnreachable("the dead-letter watcher's subscription was not acknowledged within 10s")
            self._follow(True)
            if self.slow is not None:
                try:
                    self.slow.connect(self.sources)
                except (OSError, FaultError) as exc:
                    raise SetupFailed(f"the slow follower could not follow the devices: {exc}") from exc
            self._probe()
            self.t0 = time.monotonic()
            self.say(f"setup done: {cfg.devices} devices {self.prefix}*, follower {self.follower.follower_id}; "
                     f"publishing at {cfg.rate:g}/s for {cfg.duration:g}s")
            self._load_and_faults()
            self._drain()
            influx = self._check_influx() if cfg.influx_url is not None else None
        finally:
            self.abort.set()
            self._teardown(started, follower_up, up)
        deliveries = self.follower.snapshot()
        records = []
        for name in cfg.faults:
            rec = self.records.get(name, FaultRecord(name))
            if rec.failed:
                self.problems.append(f"{name}: {rec.failed} injection{'s' if rec.failed > 1 else ''} failed "
                                     f"(see its notes)")
            records.append(rec)
        if self.follower.undecodable:
            self.problems.append(f"{self.follower.undecodable} messages on the follower's feed were not envelopes "
                                 f"with a source and a seq")
        hostile = None
        if self.hostile is not None:
            assert self.watcher is not None
            reasons = Counter(self.watcher.snapshot())
            hostile = HostileRecord(self.hostile.sent, sum(reasons.values()), dict(reasons))
        return Report(self.prefix, f"{cfg.host}:{cfg.port}", cfg.devices, cfg.rate, cfg.duration, cfg.drain_timeout,
                      tally(self.sent_at, self.acked, self.refused, deliveries), tuple(records), hostile, influx,
                      tuple(self.problems), self.interrupted_at)

    def _build_faults(self) -> None:
        cfg = self.cfg
        for name in cfg.faults:
            fault: Fault | None = None
            if name == "hostile":
                fault = self.hostile
            elif name == "reconnect":
                fault = Reconnect()
            elif name in ("kill-gateway", "term-gateway"):
                assert cfg.gateway_data_dir is not None and cfg.gateway_restart
                control = GatewayControl(cfg.gateway_data_dir, cfg.gateway_restart, cfg.gateway_timeout)
                try:
                    control.running_pid()  # refuse at the start, not in the middle of the run
                except FaultError as exc:
                    raise SetupFailed(str(exc)) from None
                fault = GatewaySignal(name, signal.SIGKILL if name == "kill-gateway" else signal.SIGTERM, control)
            elif name == "pause-broker":
                assert cfg.broker_pid is not None
                fault = PauseBroker(cfg.broker_pid, cfg.pause_seconds)
            elif name == "restart-broker":
                assert cfg.broker_restart
                fault = RestartBroker(cfg.broker_restart)
            elif name == "influx-outage":
                assert cfg.influx_stop and cfg.influx_start
                fault = InfluxOutage(cfg.influx_stop, cfg.influx_start, cfg.influx_outage)
            if fault is not None:
                self.faults.append(fault)
        if self.slow is not None:
            self.records["slow-follower"] = FaultRecord(
                "slow-follower", 1, 0, (f"{self.slow.follower_id} follows every device with a persistent session "
                                        f"and never reads, for the whole run",))

    def _follow(self, follow: bool) -> None:
        """The run's follower sends its own requests, on `users/{id}/follows` (a broker with accounts allows
        nothing else; the slow follower does the same for itself)."""
        verb = "follow" if follow else "unfollow"
        messages = [(f"users/{self.follower.follower_id}/follows", json.dumps({verb: source}).encode())
                    for source in self.sources]
        acked = self.follower.publish_all(messages, timeout=30.0)
        if acked < len(messages):
            what = f"{len(messages) - acked} of {len(messages)} {verb} requests were not acknowledged by the broker"
            if follow:
                raise SetupFailed(what)
            self.problems.append(what)

    def _probe(self) -> None:
        """Publish a probe reading per device until each has come back on the follower's feed."""
        pending = set(range(len(self.signals)))  # indexes of the devices not confirmed yet
        probes: dict[int, list[Key]] = {i: [] for i in pending}
        deadline = time.monotonic() + self.cfg.setup_timeout
        scratch: set[Key] = set()
        while pending:
            for i in pending:
                reading = self.signals[i].next()
                key = (reading.device_id, reading.seq)
                probes[i].append(key)
                self.links[i % len(self.links)].send(self.topics[i], telemetry_payload(reading), key)
            wake = time.monotonic() + PROBE_EVERY_S
            while pending and time.monotonic() < wake:
                for link in self.links:
                    link.settle(scratch, scratch)
                pending -= {i for i in pending if any(self.follower.delivered(k) for k in probes[i])}
                time.sleep(0.02)
            if pending and time.monotonic() > deadline:
                missing = ", ".join(self.signals[i].device_id for i in list(pending)[:3])
                raise SetupFailed(
                    f"no probe reading of {len(pending)} of {len(self.signals)} devices (e.g. {missing}) reached "
                    f"the follower {self.follower.follower_id} within {self.cfg.setup_timeout:g}s: is the gateway "
                    f"running, connected to this broker, and subscribed to devices/+/telemetry and users/+/follows?")

    def _load_and_faults(self) -> None:
        cfg = self.cfg
        scheduler = threading.Thread(target=self._schedule, name="chaos-faults", daemon=False)
        scheduler.start()
        progress = Progress(cfg.progress, None, self.err)
        pacer = Pacer(cfg.rate, None, cfg.duration, MAX_UNACKED)
        n_dev, n_conn = len(self.signals), len(self.links)
        sent = 0
        try:
            while True:
                now = time.monotonic()
                if pacer.over(now, sent):
                    break
                for link in self.links:
                    link.settle(self.acked, self.refused)
                due = pacer.due(now, sent, sent - sum(link.unanswered for link in self.links))
                while sent < due:
                    i = sent % n_dev
                    reading = self.signals[i].next()
                    key = (reading.device_id, reading.seq)
                    self.sent_at[key] = time.monotonic()
                    self.links[i % n_conn].send(self.topics[i], telemetry_payload(reading), key)
                    sent += 1
                progress.update(now, now - pacer.t0, sent, len(self.acked))
                pacer.nap(sent)
        except KeyboardInterrupt:
            self.err.write("\ninterrupted: no more faults or publishes; draining\n")
            self.interrupted_at = round(time.monotonic() - pacer.t0, 1)
            self.abort.set()
        finally:
            self.window_over.set()
            progress.close()
            scheduler.join()

    def _schedule(self) -> None:
        """Inject the faults in turn (a seeded shuffle), one at a time, about `fault_interval` apart."""
        if not self.faults:
            return
        order = list(self.faults)
        self.rng.shuffle(order)
        ctx = Context(self.cfg.host, self.cfg.port, self.prefix, self.links, self.follower, self.say, self.abort,
                      self.rng)
        k = 0
        interval = fault_interval(self.cfg)
        while not self.window_over.wait(interval * self.rng.uniform(0.5, 1.5)):
            fault = order[k % len(order)]
            k += 1
            rec = self.records.get(fault.name, FaultRecord(fault.name))
            try:
                note = fault.inject(ctx)
                rec = FaultRecord(rec.name, rec.injected + 1, rec.failed, rec.notes + ((note,) if note else ()))
                self.say(f"{fault.name}: {note or 'done'}")
            except Exception as exc:  # noqa: BLE001 - a failed injection is a finding, not a crash
                text = str(exc) if isinstance(exc, (FaultError, OSError)) else repr(exc)
                applied = isinstance(exc, FaultError) and exc.applied
                rec = FaultRecord(rec.name, rec.injected + applied, rec.failed + 1, rec.notes + (f"FAILED: {text}",))
                self.say(f"{fault.name} FAILED: {text}")
            self.records[fault.name] = rec

    def _drain(self) -> None:
        deadline = time.monotonic() + self.cfg.drain_timeout
        self.say(f"publishing done ({len(self.sent_at)} readings); waiting up to {self.cfg.drain_timeout:g}s for "
                 f"acknowledgements and deliveries")
        delivered: set[Key] = set()
        while time.monotonic() < deadline:
            for link in self.links:
                link.settle(self.acked, self.refused)
            todo = (self.acked & self.sent_at.keys()) - delivered  # probes are not waited for
            delivered |= {k for k in todo if self.follower.delivered(k)}
            if todo <= delivered and all(link.unanswered == 0 for link in self.links):
                return
            time.sleep(0.1)

    def _check_influx(self) -> InfluxRecord:
        cfg = self.cfg
        assert cfg.influx_url is not None and cfg.influx_db is not None
        deadline = time.monotonic() + cfg.drain_timeout
        expected = must_reach_influx(self.acked, self.follower.snapshot(), self.sent_at)
        self.say(f"checking InfluxDB {cfg.influx_url} database {cfg.influx_db} for {len(expected)} readings")
        while True:
            try:
                points = influx_points(cfg.influx_url, cfg.influx_db, self.prefix)
            except (OSError, ValueError, RuntimeError) as exc:
                if time.monotonic() > deadline:
                    return InfluxRecord(len(expected), 0, len(expected), 0, str(exc))
                time.sleep(1.0)
                continue
            if expected <= points.keys() or time.monotonic() > deadline:
                if expected <= points.keys():
                    time.sleep(1.0)  # a late re-write of an old batch would show as a duplicate: give it a moment
                    points = influx_points(cfg.influx_url, cfg.influx_db, self.prefix)
                return influx_tally(expected, points)
            time.sleep(1.0)

    def _teardown(self, started: list[Connection], follower_up: bool, up: list[Peer]) -> None:
        for fault in self.faults:
            try:
                fault.close()
            except Exception as exc:  # noqa: BLE001 - the others must still be closed
                self.problems.append(f"closing {fault.name}: {exc!r}")
        if follower_up:
            try:
                self._follow(False)
            except Exception as exc:  # noqa: BLE001
                self.problems.append(f"removing the follows: {exc!r}")
        if self.slow is not None:
            self.slow.close(self.sources)
        for conn in started:
            conn.stop()
        if follower_up:
            self.follower.close()
        for client in up:
            client.close()


# --- InfluxDB 1.x ------------------------------------------------------------------------------------------------


def influx_points(url: str, db: str, prefix: str) -> Counter[Key]:
    """Points of measurement `telemetry` per (device, seq) for the run's devices, through InfluxQL (chunked, so
    a long run does not hit the server's row limit). Identical points are one point in InfluxDB, so a count above 1
    is a reading written twice with different timestamps."""
    q = f'SELECT "seq" FROM "telemetry" WHERE "device" =~ /^{re.escape(prefix)}/ GROUP BY "device"'
    params = urllib.parse.urlencode({"db": db, "q": q, "epoch": "ms", "chunked": "true", "chunk_size": "10000"})
    host = urllib.parse.urlsplit(url).hostname or ""
    # A loopback database is reached directly, whatever proxy the environment names.
    handlers = [urllib.request.ProxyHandler({})] if host in ("localhost", "::1") or host.startswith("127.") else []
    opener = urllib.request.build_opener(*handlers)
    got: Counter[Key] = Counter()
    try:
        with opener.open(f"{url.rstrip('/')}/query?{params}", timeout=30) as resp:
            body = resp.read().decode()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"InfluxDB answered {exc.code}: {exc.read()[:200].decode(errors='replace')}") from None
    for line in body.splitlines():
        if not line.strip():
            continue
        for result in json.loads(line).get("results", []):
            if "error" in result:
                if "database not found" in result["error"]:
                    return got
                raise RuntimeError(f"InfluxQL: {result['error']}")
            for series in result.get("series", []):
                device = series["tags"]["device"]
                at = series["columns"].index("seq")
                for values in series["values"]:
                    if values[at] is not None:
                        got[(device, int(values[at]))] += 1
    return got


# --- the command -------------------------------------------------------------------------------------------------


def _interrupt_on_term(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM stops like Ctrl-C: a paused broker is resumed, the report still printed


@click.command("chaos")
@click.option("--broker", default="127.0.0.1:1883", show_default=True, help="The MQTT broker, HOST:PORT.")
@click.option("--devices", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=100.0, show_default=True,
              help="Readings per second, across all devices.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=60.0, show_default=True,
              help="Seconds of load (the drain comes on top).")
@click.option("--faults", default=",".join(DEFAULT_FAULTS), show_default=True,
              help=f"Comma-separated, any of: {', '.join(FAULTS)}; '' for none.")
@click.option("--fault-interval", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Mean seconds between injections (each 0.5-1.5 times this, seeded); faults take turns "
                   "[default: 10, or half the duration when shorter].")
@click.option("--seed", type=int, default=1, show_default=True, help="Seeds the readings and the fault schedule.")
@click.option("--kinds", default="env,machine,water", show_default=True,
              help=f"Device kinds, round-robin (known: {', '.join(KINDS)}).")
@click.option("--connections", type=click.IntRange(min=1), default=None,
              help="MQTT connections the devices share [default: one per device, at most 4].")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="After the last publish, how long deliveries may take before a reading counts as lost.")
@click.option("--setup-timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long the gateway may take to deliver the first probe reading of every device.")
@click.option("--prefix", default=None, help="Device id prefix [default: chaos-XXXXXX-, random].")
@click.option("--gateway-data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The gateway's data folder (its status.json names its pid); for kill-gateway, term-gateway.")
@click.option("--gateway-restart", metavar="CMD", default=None,
              help="Shell command that starts the gateway again, e.g. 'systemctl restart edge-gateway' "
                   "('true' if systemd's Restart= brings it back by itself).")
@click.option("--gateway-timeout", type=click.FloatRange(min=0), default=60.0, show_default=True,
              help="How long the gateway may take to be back and connected after the restart command.")
@click.option("--broker-pid", metavar="PID|PIDFILE", default=None,
              help="The broker's pid, or its pid file (read at each injection), for pause-broker.")
@click.option("--pause-seconds", type=click.FloatRange(min=0), default=45.0, show_default=True,
              help="How long pause-broker freezes the broker; make it longer than the gateway's mqtt.keepalive.")
@click.option("--broker-restart", metavar="CMD", default=None,
              help="Shell command that restarts the broker, for restart-broker (e.g. 'systemctl restart mosquitto').")
@click.option("--influx-url", default=None, help="InfluxDB 1.x URL: check every reading is there exactly once.")
@click.option("--influx-db", default=None, help="The gateway's InfluxDB database (influx.database).")
@click.option("--influx-stop", metavar="CMD", default=None, help="Shell command that stops InfluxDB (influx-outage).")
@click.option("--influx-start", metavar="CMD", default=None, help="Shell command that starts it again.")
@click.option("--influx-outage", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Seconds InfluxDB stays stopped per influx-outage.")
@click.option("--cafile", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Connect over TLS, trusting this CA certificate (deploy/make-certs makes one).")
@click.option("--credentials", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="'ID PASSWORD' per line (as `gateway credentials add` printed them) for PREFIX0001..., "
                   "PREFIXfan, and with their faults PREFIXslow, PREFIXbad, PREFIXtroll and the --operator: every "
                   "client logs in as itself, as the production broker requires. Needs --prefix.")
@click.option("--operator", metavar="ID", default=None,
              help="With --credentials and hostile: the account that reads gateway/deadletter (an operator "
                   "account in the broker's ACL); its other connection, if any, is replaced for the run.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of text.")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Progress and fault lines on stderr.")
def chaos_command(broker: str, devices: int, rate: float, duration: float, faults: str,
                  fault_interval: float | None,
                  seed: int, kinds: str, connections: int | None, drain_timeout: float, setup_timeout: float,
                  prefix: str | None, gateway_data_dir: Path | None, gateway_restart: str | None,
                  gateway_timeout: float, broker_pid: str | None, pause_seconds: float, broker_restart: str | None,
                  influx_url: str | None, influx_db: str | None, influx_stop: str | None, influx_start: str | None,
                  influx_outage: float, cafile: Path | None, credentials: Path | None, operator: str | None,
                  as_json: bool, progress: bool) -> None:
    """Check a running installation: publish readings as a fleet, follow them through the gateway, inject
    faults, and report what was lost or duplicated. Exit status 0 when nothing acknowledged was lost."""
    host, port = parse_broker(broker)
    kind_list = tuple(k.strip() for k in kinds.split(",") if k.strip())
    if not kind_list or any(k not in KINDS for k in kind_list):
        raise click.BadParameter(f"known kinds: {', '.join(KINDS)}", param_hint="--kinds")
    fault_list = tuple(dict.fromkeys(f.strip() for f in faults.split(",") if f.strip()))
    cfg = ChaosRun(host, port, devices, rate, duration, fault_list, fault_interval, seed, kind_list, connections,
                   drain_timeout, setup_timeout, prefix, gateway_data_dir, gateway_restart, gateway_timeout,
                   broker_pid, broker_restart, pause_seconds, influx_url, influx_db, influx_stop, influx_start,
                   influx_outage, progress, cafile,
                   read_credentials(credentials) if credentials is not None else None, operator)
    problems = requirement_errors(cfg)
    if problems:
        raise click.UsageError("\n".join(problems))
    previous = signal.signal(signal.SIGTERM, _interrupt_on_term)
    try:
        report = Chaos(cfg, sys.stderr).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo(json.dumps(report.as_dict()) if as_json else report.text())
    sys.stdout.flush()
    if not report.passed:
        sys.exit(EXIT_FAILED)

