"""What every fault-injection scenario shares: the simulated fleet, the followers, and the final accounting.

A scenario runs the real gateway against a real broker (and usually a real InfluxDB), puts a steady load on it with
the simulator (`firmware-sim mqtt`, QoS 1), injects its fault, and then asks one question from the outside: did every
event the broker acknowledged to the simulator reach each follower at least once, and InfluxDB exactly once?

The simulator's readings are deterministic: event k of a run goes to device `PREFIX{k % D + 1:04d}` with seq
`k // D + 1`. So from its summary (`sent`, `acknowledged`) the set of events a run published is known exactly; when
every publish was acknowledged (the usual case: the simulator's paho client reconnects and re-sends what was in
flight) that set is exactly what must arrive.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector

Key = tuple[str, int]  # (device id, seq)


def uid(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:6]}"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """A gateway TOML config from {"section": {"key": value}} (numbers, strings, booleans, lists of strings)."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        for key, value in values.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value!r}")
            elif isinstance(value, list):
                lines.append(f"{key} = {json.dumps([str(v) for v in value])}")
            else:
                lines.append(f"{key} = {json.dumps(str(value))}")
    path.write_text("\n".join(lines) + "\n")
    return path


# --- the simulated fleet -----------------------------------------------------------------------------------------

_STARTED: list["SimRun"] = []  # every simulator run started, until kill_leftover_runs()


@dataclass
class Fleet:
    """The simulated devices of one scenario: a unique id prefix, so nothing else on a broker or database mixes in."""

    prefix: str
    devices: int
    runs: list[dict[str, Any]] = field(default_factory=list)  # the simulator's JSON summaries, one per phase

    @property
    def device_ids(self) -> list[str]:
        return [f"{self.prefix}{i + 1:04d}" for i in range(self.devices)]

    def start(self, broker: str, *, rate: float, duration: float | None = None, events: int | None = None,
              seed: int = 1, drain_timeout: float = 30.0, log: Path | None = None) -> "SimRun":
        """Start one simulator run in the background. Runs of one fleet must not overlap; each new run continues
        no sequence (the simulator restarts at seq 1), so a fleet publishes at most once per distinct prefix."""
        assert not self.runs, "a Fleet publishes one run; use another Fleet (prefix) for a second phase"
        argv = [sys.executable, "-m", "firmware_sim.cli", "mqtt", "--broker", broker, "--devices", str(self.devices),
                "--rate", str(rate), "--seed", str(seed), "--device-prefix", self.prefix, "--qos", "1",
                "--drain-timeout", str(drain_timeout), "--no-progress"]
        if duration is not None:
            argv += ["--duration", str(duration)]
        if events is not None:
            argv += ["--events", str(events)]
        err = open(log, "ab") if log is not None else subprocess.DEVNULL
        proc = subprocess.Popen(argv, cwd=servers.REPO, stdout=subprocess.PIPE, stderr=err)
        if log is not None:
            err.close()  # type: ignore[union-attr]
        run = SimRun(self, proc)
        _STARTED.append(run)
        return run

    def expected(self) -> set[Key]:
        """Every event the fleet's runs published (sent), by (device, seq)."""
        keys: set[Key] = set()
        for run in self.runs:
            for k in range(run["sent"]):
                keys.add((f"{self.prefix}{k % self.devices + 1:04d}", k // self.devices + 1))
        return keys

    @property
    def sent(self) -> int:
        return sum(r["sent"] for r in self.runs)

    @property
    def acknowledged(self) -> int:
        return sum(r["acknowledged"] for r in self.runs)


def kill_leftover_runs() -> None:
    """Kill every simulator run still publishing (at the end of a test: see the suite's conftest)."""
    while _STARTED:
        _STARTED.pop().kill()


@dataclass
class SimRun:
    fleet: Fleet
    proc: subprocess.Popen[bytes]

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = 120.0) -> dict[str, Any]:
        out, _ = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.decode().splitlines() if line.startswith("{")]
        assert lines, f"simulator exited with {self.proc.returncode} and printed no summary: {out!r}"
        summary = json.loads(lines[-1])
        self.fleet.runs.append(summary)
        return summary

    def interrupt(self) -> dict[str, Any]:
        """Stop publishing now (SIGINT: the simulator drains its acknowledgements and prints its summary)."""
        self.proc.send_signal(signal.SIGINT)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --- followers ---------------------------------------------------------------------------------------------------


def follow_fleet(gateway: GatewayProcess, follower: str, fleet: Fleet) -> None:
    """Make `follower` follow every device of the fleet (through the CLI, with or without a running daemon)."""
    for device in fleet.device_ids:
        result = gateway.run_cli("follow", follower, f"devices/{device}")
        assert result.returncode == 0, result.stderr


def follower(broker: str, name: str, persistent: bool = True) -> Collector:
    """A subscriber on `feeds/{name}/#`; persistent: a fixed client id and a kept session, so the broker queues its
    deliveries across a broker restart or a pause."""
    if persistent:
        return Collector(broker, f"feeds/{name}/#", client_id=f"sub-{name}", clean_start=False)
    return Collector(broker, f"feeds/{name}/#")


def deliveries(collector: Collector, prefix: str) -> Counter[Key]:
    """How often each (device, seq) of the fleet reached this follower."""
    got: Counter[Key] = Counter()
    with collector._cond:  # noqa: SLF001 - a consistent snapshot while the network thread appends
        payloads = [p for _, p, _ in collector.messages]
    for payload in payloads:
        envelope = json.loads(payload)
        device = envelope["source"].removeprefix("devices/")
        if device.startswith(prefix):
            got[(device, int(envelope["payload"]["seq"]))] += 1
    return got


# --- InfluxDB ----------------------------------------------------------------------------------------------------


def influx_points(server: servers.Server, db: str, prefix: str) -> Counter[Key]:
    """Points of measurement `telemetry` per (device, seq) for the fleet. Identical points (same series and
    timestamp) are one point in InfluxDB, so a count above 1 is a reading written twice with different timestamps."""
    try:
        result = servers.influxql(server, db, f"SELECT \"seq\" FROM \"telemetry\" WHERE \"device\" =~ /^{prefix}/ "
                                              f"GROUP BY \"device\"")
    except RuntimeError as exc:  # the database does not exist yet
        if "database not found" in str(exc):
            return Counter()
        raise
    got: Counter[Key] = Counter()
    for series in result.get("series", []):
        device = series["tags"]["device"]
        seq_at = series["columns"].index("seq")
        for values in series["values"]:
            got[(device, int(values[seq_at]))] += 1
    return got


# --- the verdict -------------------------------------------------------------------------------------------------


@dataclass
class Accounting:
    scenario: str
    sent: int
    acknowledged: int
    followers: dict[str, Counter[Key]]
    points: Counter[Key] | None
    expected: set[Key]

    def figures(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scenario": self.scenario, "sent": self.sent, "acknowledged": self.acknowledged}
        for name, got in self.followers.items():
            tag = f"[{name}]" if len(self.followers) > 1 else ""
            out[f"delivered_distinct{tag}"] = len(got.keys() & self.expected)
            out[f"duplicates_delivered{tag}"] = sum(got.values()) - len(got)
            out[f"lost{tag}"] = len(self.expected - got.keys())
        if self.points is not None:
            out["points_in_influxdb"] = len(self.points.keys() & self.expected)
            out["points_duplicated"] = sum(n - 1 for n in self.points.values() if n > 1)
            out["points_missing"] = len(self.expected - self.points.keys())
        return out

    def complete(self) -> bool:
        return all(self.expected <= got.keys() for got in self.followers.values()) and (
            self.points is None or self.expected <= self.points.keys())


def account(scenario: str, fleets: Iterable[Fleet], collectors: dict[str, Collector],
            influx: tuple[servers.Server, str] | None, timeout: float = 60.0) -> Accounting:
    """Wait until every sent event reached every follower (and InfluxDB), or the timeout; return the figures and
    print them as one JSON line (`pytest -s` shows it)."""
    fleets = list(fleets)

    def snapshot() -> Accounting:
        expected: set[Key] = set()
        followers: dict[str, Counter[Key]] = {name: Counter() for name in collectors}
        points: Counter[Key] | None = Counter() if influx is not None else None
        for fleet in fleets:
            expected |= fleet.expected()
            for name, c in collectors.items():
                followers[name].update(deliveries(c, fleet.prefix))
            if influx is not None:
                assert points is not None
                points.update(influx_points(influx[0], influx[1], fleet.prefix))
        return Accounting(scenario, sum(f.sent for f in fleets), sum(f.acknowledged for f in fleets), followers,
                          points, expected)

    deadline = time.monotonic() + timeout
    acc = snapshot()
    while not acc.complete() and time.monotonic() < deadline:
        time.sleep(0.5)
        acc = snapshot()
    if acc.complete() and influx is not None:
        time.sleep(1.0)  # a late re-write of an old batch would show up as a duplicate: give it a moment
        acc = snapshot()
    print(json.dumps(acc.figures()))
    return acc


def assert_nothing_acknowledged_was_lost(acc: Accounting) -> None:
    """Every simulator publish was acknowledged by the broker, and each reached every follower and InfluxDB once."""
    figures = acc.figures()
    assert acc.sent > 0
    assert acc.acknowledged == acc.sent, f"the simulator's publishes were not all acknowledged: {figures}"
    for name, got in acc.followers.items():
        missing = sorted(acc.expected - got.keys())
        assert not missing, f"follower {name} never got {len(missing)} events, e.g. {missing[:5]}: {figures}"
    if acc.points is not None:
        missing = sorted(acc.expected - acc.points.keys())
        assert not missing, f"{len(missing)} readings never reached InfluxDB, e.g. {missing[:5]}: {figures}"
        twice = sorted(k for k, n in acc.points.items() if n > 1)
        assert not twice, f"{len(twice)} readings are in InfluxDB more than once, e.g. {twice[:5]}: {figures}"
