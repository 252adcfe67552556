"""Deterministic sensor signals with labelled, injected anomalies. Pure: no I/O, no clock, no global state.

One `DeviceSignal` is one simulated device; `next()` returns its next `Reading`. Everything follows from the fleet
seed and the device id, so the anomaly model's training data (models/anomaly/train.py) and the simulator's live
traffic (`firmware-sim mqtt`) are the same kind of signal, and any stream can be replayed in a test.

A normal reading of a field is

    level + daily cycle + mean-reverting random walk + coupling to another field + white noise

clipped to the sensor's range and quantised to its resolution. The quantisation matters: real sensors repeat values,
and the detector has to tell that apart from a stuck sensor.

Anomalies come in episodes: one field, several consecutive samples, every one of them labelled with the type.

    spike    1-3 samples displaced by 8-25 noise sigmas (one sign per episode, away from the range limit)
    drift    20-60 samples: an offset ramping up to 10-25 sigmas over the first three quarters, easing back over the
             last quarter (a sensor that snapped back would turn the end of a drift into a spike)
    stuck    10-60 samples repeating exactly the last value read before the episode
    dropout  3-30 samples reading exactly 0.0. We chose 0.0 over each sensor's own floor (-127 for a DS18B20, the
             bottom of the range for others) because 0.0 is what most firmware reports when a sensor does not answer,
             and because the gateway's detector has to recognise a dropout on fields whose range it does not know.
    noise    8-30 samples with extra white noise of 5-10 sigmas

"sigma" is the field's white-noise level on that device. Episodes start at `anomaly_rate` per reading (on average one
every 1/anomaly_rate readings of a device), on a field chosen among the fields not already in an episode, with the five
types equally likely.

The clean signal and the anomalies draw from separate random streams, so two devices with the same seed and id
produce identical readings wherever both are labelled normal, whatever their anomaly rates.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from devices.telemetry import RESERVED, Telemetry, encode

NORMAL = "normal"
ANOMALY_TYPES: tuple[str, ...] = ("spike", "drift", "stuck", "dropout", "noise")

# Episode lengths in samples (inclusive bounds) and magnitudes in noise sigmas, per type.
EPISODE_LENGTH: Mapping[str, tuple[int, int]] = {
    "spike": (1, 3),
    "drift": (20, 60),
    "stuck": (10, 60),
    "dropout": (3, 30),
    "noise": (8, 30),
}
EPISODE_MAGNITUDE: Mapping[str, tuple[float, float]] = {
    "spike": (8.0, 25.0),
    "drift": (10.0, 25.0),
    "noise": (5.0, 10.0),
}

DROPOUT_VALUE = 0.0
DAY_MS = 86_400_000
# Default start of simulated time: 2026-01-01T00:00:00Z. Fixed, so a seed alone fixes the readings; a real epoch
# time, because the gateway's codec rejects `ts` values that cannot be milliseconds since 1970.
EPOCH_2026_MS = 1_767_225_600_000
# Mean reversion of the random walk per sample: the walk wanders about 10x its step size.
_WALK_PULL = 0.005


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One numeric field of a device kind. Levels in the field's own unit."""

    name: str
    level: float  # typical level
    spread: float  # devices differ from `level` by up to this much
    daily: float  # amplitude of the 24 h cycle (peaks mid-afternoon)
    walk: float  # step of the mean-reverting random walk, per sample
    noise: float  # white-noise sigma
    resolution: float  # quantisation step
    lo: float = -math.inf  # sensor range
    hi: float = math.inf
    follows: tuple[str, float] | None = None  # (other field, k): adds k * the other field's deviation from its level

    @property
    def decimals(self) -> int:
        return max(0, -math.floor(math.log10(self.resolution) + 1e-9))


# Device kinds. "env" matches the gateway's built-in profile devices/profiles/env-sensor.toml (names and ranges).
# "env" and "machine" train the anomaly model; "water" is held out to show that the model works on
# fields it has never seen (its levels are an order of magnitude or more away from the training fields).
KINDS: Mapping[str, tuple[FieldSpec, ...]] = {
    "env": (
        FieldSpec("temperature", 21.0, 3.0, 3.0, 0.02, 0.08, 0.01, -40.0, 85.0),
        # Relative humidity falls as the same air warms up: anti-correlated with temperature.
        FieldSpec("humidity", 48.0, 8.0, 0.0, 0.05, 0.4, 0.1, 0.0, 100.0, follows=("temperature", -2.5)),
        FieldSpec("pressure", 1013.0, 8.0, 0.6, 0.05, 0.12, 0.1, 300.0, 1100.0),
        FieldSpec("battery", 3.9, 0.15, 0.01, 0.0005, 0.004, 0.001, 0.0, 4.3),
    ),
    "machine": (
        FieldSpec("current_a", 12.0, 3.0, 3.0, 0.05, 0.15, 0.01, 0.0),
        # A loaded motor runs hotter, shakes more and slips more.
        FieldSpec("motor_temp", 55.0, 5.0, 0.0, 0.02, 0.1, 0.1, -40.0, 200.0, follows=("current_a", 1.2)),
        FieldSpec("vibration", 2.5, 0.8, 0.0, 0.005, 0.12, 0.01, 0.0, follows=("current_a", 0.08)),
        FieldSpec("rpm", 1480.0, 15.0, 0.0, 0.1, 0.7, 1.0, 0.0, follows=("current_a", -1.5)),
    ),
    "water": (
        FieldSpec("flow_lpm", 350.0, 60.0, 80.0, 0.5, 4.0, 0.1, 0.0),
        FieldSpec("line_pressure_bar", 4.2, 0.4, 0.0, 0.002, 0.02, 0.01, 0.0, follows=("flow_lpm", -0.003)),
        FieldSpec("water_temp_c", 12.0, 3.0, 0.4, 0.005, 0.05, 0.01, -10.0, 60.0),
    ),
}


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample of a device: what it publishes (`fields`) and the ground truth (`labels`, one per field).

    `seq` counts from 1 per device. `labels[field]` is "normal" or one of `ANOMALY_TYPES`. Treat the dicts as
    read-only.
    """

    device_id: str
    seq: int
    ts_ms: int
    fields: dict[str, float]
    labels: dict[str, str]

    @property
    def anomalous(self) -> bool:
        return any(label != NORMAL for label in self.labels.values())


@dataclass(slots=True)
class _Episode:
    kind: str
    remaining: int
    length: int
    magnitude: float  # in sigmas, signed
    held: float  # the value a stuck sensor repeats


class DeviceSignal:
    """The readings of one simulated device, one `next()` at a time.

    `interval_ms` may be fractional (a simulator pacing many devices at a high total rate); `ts_ms` is
    `start_ms + round((seq - 1) * interval_ms)`.
    """

    def __init__(
        self,
        device_id: str,
        seed: int,
        kind: str = "env",
        start_ms: int = EPOCH_2026_MS,
        interval_ms: float = 1000.0,
        anomaly_rate: float = 0.0,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(KINDS)}")
        if not 0.0 <= anomaly_rate <= 1.0:
            raise ValueError(f"anomaly_rate must be within [0, 1], got {anomaly_rate!r}")
        if not interval_ms > 0:
            raise ValueError(f"interval_ms must be positive, got {interval_ms!r}")
        self.device_id = device_id
        self.kind = kind
        self.start_ms = start_ms
        self.interval_ms = float(interval_ms)
        self.anomaly_rate = anomaly_rate
        self.specs: tuple[FieldSpec, ...] = KINDS[kind]
        self._decimals = {s.name: s.decimals for s in self.specs}
        # Episodes started so far, by type (random and injected alike).
        self.injected: Counter[str] = Counter()

        # String seeds hash deterministically (random.seed version 2), so every device of a fleet seed differs.
        self._rng = random.Random(f"{seed}/{device_id}/signal")
        self._arng = random.Random(f"{seed}/{device_id}/anomaly")
        rng = self._rng
        self._level = {s.name: s.level + rng.uniform(-s.spread, s.spread) for s in self.specs}
        self._sigma = {s.name: s.noise * math.exp(rng.uniform(-0.4, 0.4)) for s in self.specs}
        self._phase = rng.uniform(-1.0, 1.0) / 24.0  # up to an hour either way of the fleet's daily peak
        self._walk = {s.name: 0.0 for s in self.specs}
        self._last = {s.name: self._level[s.name] for s in self.specs}
        self._episodes: dict[str, _Episode] = {}
        self._pending: list[tuple[str, str, int | None, float | None]] = []
        self._seq = 0

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.specs)

    def sigma(self, field: str) -> float:
        """The field's white-noise sigma on this device: the unit of anomaly magnitudes."""
        return self._sigma[field]

    def inject(self, field: str, anomaly: str, length: int | None = None, magnitude: float | None = None) -> None:
        """Start an episode of `anomaly` on `field` with the next reading, replacing any episode running there.

        `length` in samples and `magnitude` in sigmas (spike, drift, noise) default to random draws from the
        type's usual range. Used by tests and by fault-injection modes that need an anomaly at a known place.
        """
        if field not in self._sigma:
            raise ValueError(f"device kind {self.kind!r} has no field {field!r}")
        if anomaly not in ANOMALY_TYPES:
            raise ValueError(f"unknown anomaly type {anomaly!r}; known: {', '.join(ANOMALY_TYPES)}")
        if length is not None and length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self._pending.append((field, anomaly, length, magnitude))

    def next(self) -> Reading:
        self._seq += 1
        seq = self._seq
        ts_ms = self.start_ms + round((seq - 1) * self.interval_ms)
        self._schedule()

        rng = self._rng
        hours = (ts_ms % DAY_MS) / 3_600_000.0
        daily = math.sin(2.0 * math.pi * ((hours - 9.0) / 24.0 - self._phase))  # peaks at 15:00
        deviation: dict[str, float] = {}
        fields: dict[str, float] = {}
        labels: dict[str, str] = {}
        for spec in self.specs:
            name = spec.name
            walk = self._walk[name] * (1.0 - _WALK_PULL) + spec.walk * rng.gauss(0.0, 1.0)
            self._walk[name] = walk
            dev = spec.daily * daily + walk
            if spec.follows is not None:
                other, k = spec.follows
                dev += k * deviation[other]
            deviation[name] = dev
            sigma = self._sigma[name]
            value = self._level[name] + dev + sigma * rng.gauss(0.0, 1.0)

            episode = self._episodes.get(name)
            if episode is None:
                labels[name] = NORMAL
            else:
                labels[name] = episode.kind
                value = self._apply(episode, value, sigma, spec)
                episode.remaining -= 1
                if episode.remaining == 0:
                    del self._episodes[name]

            if labels[name] == "dropout":
                value = DROPOUT_VALUE
            elif labels[name] == "stuck":
                value = episode.held  # type: ignore[union-attr]  # set whenever the label is "stuck"
            else:
                value = round(min(max(value, spec.lo), spec.hi) / spec.resolution) * spec.resolution
                value = round(value, self._decimals[name])  # drop the binary tail: 21.37, not 21.370000000000001
            fields[name] = value
            self._last[name] = value
        return Reading(self.device_id, seq, ts_ms, fields, labels)

    def _schedule(self) -> None:
        """Start this reading's episodes: the injected ones, then at most one random one."""
        for name, kind, length, magnitude in self._pending:
            self._start(name, kind, length, magnitude)
        self._pending.clear()
        # Draw the same numbers whether or not an episode starts, so the anomaly stream stays aligned with seq.
        start = self._arng.random() < self.anomaly_rate
        kind = ANOMALY_TYPES[self._arng.randrange(len(ANOMALY_TYPES))]
        pick = self._arng.random()
        if start:
            idle = [s.name for s in self.specs if s.name not in self._episodes]
            if idle:
                self._start(idle[int(pick * len(idle))], kind, None, None)

    def _start(self, name: str, kind: str, length: int | None, magnitude: float | None) -> None:
        arng = self._arng
        lo, hi = EPISODE_LENGTH[kind]
        n = length if length is not None else arng.randint(lo, hi)
        if magnitude is None:
            mlo, mhi = EPISODE_MAGNITUDE.get(kind, (0.0, 0.0))
            magnitude = arng.uniform(mlo, mhi) * (1.0 if arng.random() < 0.5 else -1.0)
        self._episodes[name] = _Episode(kind, n, n, magnitude, self._last[name])
        self.injected[kind] += 1

    def _apply(self, episode: _Episode, value: float, sigma: float, spec: FieldSpec) -> float:
        if episode.kind == "spike":
            spiked = value + episode.magnitude * sigma
            if not spec.lo <= spiked <= spec.hi:
                # Clipped at the range limit a spike would read as a dropout (0.0) or a flat top: go the other way.
                spiked = value - episode.magnitude * sigma
            return spiked
        if episode.kind == "drift":
            u = (episode.length - episode.remaining + 1) / episode.length  # (0, 1]
            ramp = u / 0.75 if u <= 0.75 else (1.0 - u) / 0.25
            return value + episode.magnitude * sigma * ramp
        if episode.kind == "noise":
            return value + abs(episode.magnitude) * sigma * self._arng.gauss(0.0, 1.0)
        return value  # stuck and dropout replace the value in next()


def telemetry_payload(r: Reading) -> bytes:
    """The JSON a device publishes: `{"seq": n, "ts": ms, "<field>": value, ...}`, compact UTF-8.

    Encoded by the gateway's own codec (devices/telemetry.py), so the simulator cannot drift from what the gateway
    accepts. Values are already quantised to the sensor's resolution, so they print short (21.37, 1013.2).
    """
    for name in r.fields:
        if name in RESERVED:
            raise ValueError(f"field name {name!r} collides with a payload key")
    return encode(Telemetry(r.seq, r.ts_ms, r.fields))
