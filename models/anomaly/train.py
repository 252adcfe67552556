"""Train the sensor-anomaly model and write anomaly.onnx and MODEL_CARD.md next to this script.

    python models/anomaly/train.py            (needs the `train` extra: scikit-learn, onnx)

The model scores one value of one field against that field's own normal, learned online per device
(gateway/filters/anomaly_features.py, the very code the gateway runs). Two sources of data, kept apart:

    simulator   fleets from firmware_sim.signals with every injected anomaly labelled per value, disjoint seeds and
                device ids:
                    train        env + machine devices, dense anomalies,       -> fit the networks
                                 and routine series of real shapes (bursts, plateaus) with anomalies injected
                    validation   env + machine devices, realistic anomaly rate -> choose the threshold
                    test         env + machine devices, realistic anomaly rate -> held-out figures
                    unseen-kind  water devices, fields never used above         -> held-out figures
    NAB tuning  35 real and synthetic series with labelled anomaly windows (../shared/data/sensors/nab-tuning), never
                used to fit: they choose the episode rule (the score that starts an episode at once, how many
                flagged readings in a row start one below it, how many quiet readings end one), and are scored the
                NAB way (windows hit, episodes started outside every window) beside a rolling z-score, per series.
                The threshold and the episode rule are chosen on one half of them and reported on the other, both
                ways, so the per-series figures are those of series the choice never saw.

Every number in the model card is computed below from the exported .onnx file run by onnxruntime (not from the
scikit-learn object), with the gateway's spike guard on top (anomaly_features.is_wild), so the card describes what the
gateway does. Fixed seeds, one BLAS thread and one set of BLAS kernels for the fit (its result changes with either):
a rerun with the same library versions reproduces the file and the card, on any x86-64 machine.
"""

from __future__ import annotations

import argparse
import bisect
import csv
import datetime as dt
import json
import math
import os
import random
import sys
import time
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

# OpenBLAS chooses its kernels by CPU, and the fit follows them: the same data, seeds and library versions give a
# different network with the AVX-512 kernels than with the AVX2 ones. One choice for every machine, made before numpy
# loads OpenBLAS: Haswell's AVX2 kernels run on any x86-64 CPU of the last decade (elsewhere OpenBLAS ignores it).
BLAS_KERNELS = "Haswell"
os.environ.setdefault("OPENBLAS_CORETYPE", BLAS_KERNELS)

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
from scipy.linalg import block_diag
from sklearn.ensemble import VotingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing
sys.path.insert(0, str(REPO / "firmware-sim"))

from firmware_sim.signals import (  # noqa: E402
    ANOMALY_TYPES,
    DAY_MS,
    EPOCH_2026_MS,
    NORMAL,
    DeviceSignal,
)
from gateway.filters.anomaly_features import FEATURE_NAMES, GUARD_TAIL, GUARD_Z, WARMUP, series_features  # noqa: E402

MODEL_NAME = "sensor-anomaly"
# 2.0.0: online per-series normal (no window), episodes, tuned and scored on NAB. 2.1.0: a small network instead
# of the forest (same features). 2.2.0: a value where its hour of the day usually is teaches the level (daily swings
# are learned); an episode starts at once only on a high score, else on flagged readings in a row. 2.3.0: every value
# teaches a series' rates of zeros and repeats; bursty and plateau-shaped routine series in training; the mean of
# three networks. 2.3.1: the same networks exported as one wider graph (11 nodes instead of skl2onnx's 55).
MODEL_VERSION = "2.3.1"
CLASSES: tuple[str, ...] = (NORMAL, *ANOMALY_TYPES)
# The held-out fleets sample at the previous card's intervals, so their figures compare with it. The training fleet
# also has 5-minute devices: 2000 readings of them span a week, the only way the model sees a learned daily profile.
INTERVALS_MS = (1_000, 5_000, 15_000, 60_000)
TRAIN_INTERVALS_MS = (*INTERVALS_MS, 300_000)
READINGS_PER_DEVICE = 2_000
NAB = REPO.parent / "shared" / "data" / "sensors" / "nab-tuning"
THRESHOLDS = tuple(round(t, 2) for t in np.arange(0.50, 0.99, 0.02))
QUIETS = (12, 24, 48, 96)
# The score that starts an episode at once (a start at the threshold: every flagged reading does) and how many
# flagged readings in a row start one below it.
STARTS = (0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
PERSISTS = (2, 3)


# Routine series in the training fleet (`routine_series`), per kind, with anomalies injected at this rate per value
# (`routine_anomalies`). Of the shapes `routine_series` can make, bursts and plateaus are kept. Held out on NAB, with
# the three networks: bursts and plateaus hit 46 windows of 50 and flagged 1,845 values outside them; all five
# shapes (4 of each) hit 42; bursts, counts, zeros and plateaus hit 48 but flagged 2,848; bursts and plateaus
# without the injected anomalies hit 39.
ROUTINE = ("bursty", "plateaus")
ROUTINE_PER_KIND = 4
ROUTINE_ANOMALY_RATE = 0.004


@dataclass(frozen=True)
class Fleet:
    name: str
    kinds: tuple[str, ...]
    seed: int
    devices: int
    anomaly_rate: float  # episodes started per reading, see firmware_sim.signals
    intervals_ms: tuple[int, ...] = INTERVALS_MS
    # Extra spikes per reading far beyond the simulator's 8-25 sigmas (25-500): a reading hundreds of spreads off its
    # normal must score as a spike whatever else the series does, and the model learns that only from examples.
    wild_spikes: float = 0.0
    # The share of the fields of 5-minute devices that also follow a working day (see `on_schedule`).
    scheduled: float = 0.0
    # Extra series per kind of routine shape (`ROUTINE`): what real counters and meters do every day, normal but
    # for the anomalies `routine_anomalies` injects.
    routine: int = 0


TRAIN = Fleet("train", ("env", "machine"), 1001, 100, 0.03, TRAIN_INTERVALS_MS, wild_spikes=0.002, scheduled=0.5,
              routine=ROUTINE_PER_KIND)
VALIDATION = Fleet("validation", ("env", "machine"), 2002, 30, 0.005)
TEST = Fleet("test", ("env", "machine"), 3003, 40, 0.005)
UNSEEN = Fleet("unseen-kind", ("water",), 4004, 40, 0.005)

# A network of two small hidden layers on the standardised features. Against the forest it replaced (24 trees of
# depth 14, 56,272 nodes: 2.4 MB on disk, ~20 MB resident in onnxruntime and cache-cold at a few readings per run)
# it did better on every held-out fleet (benchmarks/RESULTS.md); 30 epochs, short of sklearn's convergence test.
NETWORK = dict(hidden_layer_sizes=(64, 32), max_iter=30, batch_size=512)
# The model is the mean of the probabilities of networks that differ only in their seed, in one ONNX graph: on NAB,
# held out, it started fewer false episodes than the first network alone (239 against 299) and flagged fewer values
# outside the windows (1,845 against 2,337), hitting as many windows (46 of 50).
SEEDS = (0, 1, 2)
# The same script with SEEDS = (10, 11, 12), for the card: how much windows hit moves with the seeds alone (NAB,
# crossed; all series and real series only).
OTHER_SEEDS = {"seeds": (10, 11, 12),
               "all": {"windows": 50, "hit": 40, "false_episodes": 203, "false_values": 1972},
               "real": {"windows": 44, "hit": 35, "false_episodes": 115, "false_values": 1393}}
# The same script run by OpenBLAS's SkylakeX (AVX-512) kernels instead of BLAS_KERNELS, for the card: how much the
# fit moves with the kernels alone (NAB crossed, all series and real series only; the simulator's test fleet).
OTHER_KERNELS = {"kernels": "SkylakeX",
                 "all": {"windows": 50, "hit": 40, "false_episodes": 193, "false_values": 2369},
                 "real": {"windows": 44, "hit": 35, "false_episodes": 131, "false_values": 1445},
                 "test": {"precision": 0.878, "recall": 0.739}}
# The same script without the spike guard (anomaly_features.is_wild), for the card: what the guard costs (NAB,
# crossed; all series and real series only) and what it does not change (the simulator's test fleet). Of the
# candidates GUARD_Z 15, 20, 50 and GUARD_TAIL 5, 10 on this model, 50/10 added the fewest false values (331) but
# caught no spike of 60 in a young series whose first value inflated its spread (50/5: 394), 20/10 caught 60 but not
# 40 (344), 15/5 caught 40 (642; 2,487 in all), 20/5 no more than 20/10 (639).
UNGUARDED = {"all": {"windows": 50, "hit": 46, "false_episodes": 239, "false_values": 1845},
             "real": {"windows": 44, "hit": 41, "false_episodes": 182, "false_values": 1397},
             "test": {"precision": 0.877, "recall": 0.742}}
# Class weights (n_normal / n_class) ** power: between the raw frequencies (spikes drown) and full balancing
# (normal values flagged everywhere).
CLASS_WEIGHT_POWER = 0.5


@dataclass
class Dataset:
    x: np.ndarray  # (rows, features) float32
    y: np.ndarray  # class index into CLASSES
    episode: np.ndarray  # id of the anomaly episode a row belongs to, -1 for normal rows
    reading: np.ndarray  # which reading (event) of the fleet a row belongs to
    series: int
    episodes: dict[str, int]


SCHEDULE_INTERVAL_MS = 300_000  # devices whose 2000 readings span a week: their daily profile is learned


def on_schedule(values: list[float], labels: list[str], timestamps: list[int], step: float, resolution: float,
                rng: random.Random) -> list[float]:
    """A field that also follows a working day: `step` (10-60 noise sigmas, either sign) added from an hour in the
    morning to an hour in the evening, every day. Real load, traffic and machines switch like this; the simulator's
    daily cycle is a smooth sine, so without these the model never sees a value far off the running level that is
    exactly where this hour of the day usually is, and flags every working day of such a series. Anomalies stay on
    top of it: a stuck sensor holds what it read last, a dropout reads 0.0."""
    on, off = rng.randint(5, 10), rng.randint(16, 21)
    step = round(step / resolution) * resolution
    out: list[float] = []
    for x, label, ts in zip(values, labels, timestamps):
        if label == "stuck" and out:
            y = out[-1]
        elif label == "dropout":
            y = x
        else:
            y = x + step if on <= (ts % DAY_MS) // 3_600_000 < off else x
        out.append(y)
    return out


def routine_series(kind: str, n: int, rng: random.Random) -> list[float]:
    """A normal series of a shape real telemetry has every day and the simulator's sensors do not; all of it is
    normal, so the model learns that these surprises are routine for a series that keeps making them:

        bursty     an idle floor (0.0, or a small repeated value) with bursts of 1-6 values, log-normal in size
                   (disk writes, network bytes, a CPU that is idle between jobs)
        plateaus   a few set levels, each held for 5-200 values (a thermostat, a valve, a mode)

    (Heavy-tailed, Poisson-count and scattered-zero shapes were tried too and did worse: see ROUTINE.)
    """
    out: list[float] = []
    scale = math.exp(rng.uniform(math.log(0.1), math.log(1e6)))
    if kind == "bursty":
        floor = 0.0 if rng.random() < 0.6 else round(scale * rng.uniform(0.001, 0.05), 3)
        p, mu, sigma = rng.uniform(0.02, 0.25), math.log(scale), rng.uniform(0.5, 1.5)
        left = 0
        for _ in range(n):
            if left == 0 and rng.random() < p:
                left = rng.randint(1, 6)
            if left:
                left -= 1
                out.append(round(floor + math.exp(rng.gauss(mu, sigma)), 3))
            else:
                out.append(floor)
    elif kind == "plateaus":
        levels = [round(scale * rng.uniform(0.2, 1.0), 3) for _ in range(rng.randint(2, 5))]
        mean_hold = rng.uniform(5, 200)
        value, left = rng.choice(levels), 0
        for _ in range(n):
            if left == 0:
                value, left = rng.choice(levels), 1 + int(rng.expovariate(1.0 / mean_hold))
            left -= 1
            out.append(value)
    else:
        raise ValueError(kind)
    return out


def routine_anomalies(kind: str, values: list[float], rng: random.Random,
                      rate: float) -> tuple[list[float], list[str]]:
    """Anomalies on top of a routine series, so that what is routine for it does not make everything routine: a
    spike 3-30 times the largest value of the last 200, a level walking away by a factor of 5-20 (drift), a run of
    0.0 longer than the series ever reads (dropout). Only the types that are anomalies for this kind of series: a
    bursty series drifts and (idling at 0.0) reads zeros as a matter of course."""
    types = ["spike", "drift", "dropout"] if kind == "plateaus" else ["spike"]
    if kind == "bursty" and values[0] != 0.0:
        types.append("dropout")
    out, labels = list(values), [NORMAL] * len(values)
    i = 2 * WARMUP
    while i < len(out):
        if rng.random() >= rate:
            i += 1
            continue
        kind_ = rng.choice(types)
        if kind_ == "spike":
            length, top = rng.randint(1, 3), max(abs(v) for v in out[max(0, i - 200):i]) or 1.0
            seg = [round(top * math.exp(rng.uniform(math.log(3), math.log(30))), 3) for _ in range(length)]
        elif kind_ == "drift":
            length, f = rng.randint(20, 100), math.log(rng.uniform(5, 20)) * rng.choice((-1, 1))
            seg = [round(v * math.exp(f * (k + 1) / length), 3) for k, v in enumerate(out[i:i + length])]
        else:  # dropout
            seg = [0.0] * rng.randint(3, 30)
        seg = seg[:len(out) - i]
        out[i:i + len(seg)] = seg
        labels[i:i + len(seg)] = [kind_] * len(seg)
        i += len(seg) + 1  # a normal value between episodes
    return out, labels


def simulate(fleet: Fleet) -> Dataset:
    """Every field of every device as a series, value by value as the gateway sees it. Of a scheduled field
    (`on_schedule`), only the values whose hour of the day has a learned profile are kept: before that a working
    day is a level shift from inside the series, and labelled normal it would teach that level shifts are."""
    rng = random.Random(f"{fleet.name}/{fleet.seed}")
    schedule_rng = random.Random(f"{fleet.name}/{fleet.seed}/schedule")  # apart, so the fleet's draws stay as they were
    known_col = FEATURE_NAMES.index("daily_known")
    xs, ys, eps, reading = [], [], [], []
    next_episode = 0
    episodes = {t: 0 for t in ANOMALY_TYPES}
    series = 0
    for d in range(fleet.devices):
        kind = fleet.kinds[d % len(fleet.kinds)]
        signal = DeviceSignal(f"{fleet.name}-{d:04d}", fleet.seed, kind,
                              start_ms=EPOCH_2026_MS + rng.randrange(86_400_000),
                              interval_ms=rng.choice(fleet.intervals_ms), anomaly_rate=fleet.anomaly_rate)
        readings = []
        for _ in range(READINGS_PER_DEVICE):
            if fleet.wild_spikes and rng.random() < fleet.wild_spikes:
                signal.inject(rng.choice(signal.field_names), "spike", length=rng.randint(1, 3),
                              magnitude=rng.choice((-1, 1)) * math.exp(rng.uniform(math.log(25), math.log(500))))
            readings.append(signal.next())
        for t, n in signal.injected.items():
            episodes[t] += n
        timestamps = [r.ts_ms for r in readings]
        for spec in signal.specs:
            field = spec.name
            series += 1
            labels = [CLASSES.index(r.labels[field]) for r in readings]
            episode = []
            for i, label in enumerate(labels):
                if label != 0 and (i == 0 or labels[i - 1] != label):
                    next_episode += 1
                episode.append(next_episode if label != 0 else -1)
            values = [r.fields[field] for r in readings]
            scheduled = (fleet.scheduled and signal.interval_ms == SCHEDULE_INTERVAL_MS
                         and schedule_rng.random() < fleet.scheduled)
            if scheduled:
                step = schedule_rng.choice((-1, 1)) * signal.sigma(field) * math.exp(
                    schedule_rng.uniform(math.log(10), math.log(60)))
                values = on_schedule(values, [r.labels[field] for r in readings], timestamps, step,
                                     spec.resolution, schedule_rng)
            rows, at = series_features(values, timestamps)
            x, at = np.asarray(rows, dtype=np.float32), np.asarray(at)
            if scheduled:
                keep = x[:, known_col] == 1.0
                x, at = x[keep], at[keep]
            xs.append(x)
            ys.append(np.asarray(labels)[at])
            eps.append(np.asarray(episode)[at])
            reading.append(d * READINGS_PER_DEVICE + at)
    routine_rng = random.Random(f"{fleet.name}/{fleet.seed}/routine")
    for j in range(fleet.routine * len(ROUTINE)):
        start = EPOCH_2026_MS + routine_rng.randrange(86_400_000)
        interval = routine_rng.choice(fleet.intervals_ms)
        timestamps = [start + i * interval for i in range(READINGS_PER_DEVICE)]
        kind = ROUTINE[j % len(ROUTINE)]
        values, names = routine_anomalies(kind, routine_series(kind, READINGS_PER_DEVICE, routine_rng), routine_rng,
                                          ROUTINE_ANOMALY_RATE)
        labels = [CLASSES.index(n) for n in names]
        episode = []
        for i, label in enumerate(labels):
            if label != 0 and (i == 0 or labels[i - 1] != label):
                next_episode += 1
                episodes[names[i]] += 1
            episode.append(next_episode if label != 0 else -1)
        rows, at = series_features(values, timestamps)
        at = np.asarray(at)
        series += 1
        xs.append(np.asarray(rows, dtype=np.float32))
        ys.append(np.asarray(labels)[at])
        eps.append(np.asarray(episode)[at])
        reading.append((fleet.devices + j) * READINGS_PER_DEVICE + at)
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(eps), np.concatenate(reading), series,
                   episodes)


# --- NAB --------------------------------------------------------------------------------------------------------


@dataclass
class NabSeries:
    name: str
    timestamps: list[int]
    values: list[float]
    windows: list[tuple[int, int]]
    x: np.ndarray  # features of the scored values
    at: np.ndarray  # index of each scored value

    @property
    def fold(self) -> int:
        """Two halves for choosing on one and reporting on the other: the AWS series, and the rest."""
        return 0 if self.name.startswith("realAWSCloudwatch/") else 1

    def in_window(self, i: int) -> bool:
        t = self.timestamps[i]
        return any(a <= t <= b for a, b in self.windows)


def _ms(text: str) -> int:
    return int(dt.datetime.strptime(text[:19], "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.timezone.utc).timestamp()
               * 1000)


def load_nab() -> list[NabSeries]:
    windows = json.loads((NAB / "windows.json").read_text())
    out = []
    for name in sorted(windows):
        with open(NAB / name, newline="") as f:
            rows = list(csv.DictReader(f))
        ts = [_ms(r["timestamp"]) for r in rows]
        values = [float(r["value"]) for r in rows]
        feats, at = series_features(values, ts)
        out.append(NabSeries(name, ts, values, [(_ms(a), _ms(b)) for a, b in windows[name]],
                             np.asarray(feats, dtype=np.float32), np.asarray(at)))
    return out


@dataclass(frozen=True)
class Rule:
    """What the gateway flags and how it makes episodes of it (gateway/filters/anomaly.py)."""

    threshold: float
    start: float
    persist: int
    quiet: int

    def __str__(self) -> str:
        if self.start <= self.threshold:
            return f"threshold {self.threshold:.2f}, every flagged reading starts an episode, quiet {self.quiet}"
        return (f"threshold {self.threshold:.2f}, start {self.start:g} or {self.persist} in a row, "
                f"quiet {self.quiet}")


def episodes(flagged: list[tuple[int, float]], rule: Rule) -> tuple[list[int], list[int]]:
    """The gateway's episode rule over one device's readings, given the flagged ones as (position, score) in order
    (every other reading counts as unflagged): the positions of flagged readings inside an episode (alerted), and
    of the episode starts."""
    alerted, starts, open_, run, last = [], [], False, 0, -2
    for i, score in flagged:
        if open_ and i - last - 1 >= rule.quiet:
            open_ = False
        if open_:
            alerted.append(i)
        else:
            run = run + 1 if i == last + 1 else 1
            if score >= rule.start or run >= rule.persist:
                open_ = True
                starts.append(i)
                alerted.append(i)
        last = i
    return alerted, starts


def nab_score(s: NabSeries, flagged_at: list[int], alerted_at: list[int], starts_at: list[int]) -> dict:
    """Windows hit (a flagged value inside, in an episode: an alert was raised for it), and alarms outside every
    window: episodes started there (and of those, the ones holding one flagged value, and at most three), flagged
    values there, and how many values there are there."""
    hit = sum(1 for a, b in s.windows if any(a <= s.timestamps[i] <= b for i in alerted_at))
    false_sizes = [bisect.bisect_left(alerted_at, starts_at[k + 1] if k + 1 < len(starts_at) else len(s.values))
                   - bisect.bisect_left(alerted_at, i) for k, i in enumerate(starts_at) if not s.in_window(i)]
    return {"windows": len(s.windows), "hit": hit,
            "false_episodes": len(false_sizes),
            "false_single": sum(1 for n in false_sizes if n == 1),
            "false_short": sum(1 for n in false_sizes if n <= 3),
            "false_values": sum(1 for i in flagged_at if not s.in_window(i)),
            "outside": sum(1 for i in range(len(s.values)) if not s.in_window(i))}


def zscore_baseline(s: NabSeries, window: int = 96, limit: float = 4.0, quiet: int = 12) -> dict:
    """The issue's baseline: the z-score of each value against the previous `window` values, flagged at |z| > 4."""
    ring: deque[float] = deque(maxlen=window)
    flagged = []
    for i, x in enumerate(s.values):
        if len(ring) == window:
            m = sum(ring) / window
            sd = math.sqrt(sum((v - m) ** 2 for v in ring) / (window - 1))
            if (sd > 0 and abs(x - m) / sd > limit) or (sd == 0 and x != m):
                flagged.append(i)
        ring.append(x)
    # The z-score has no confidence: every flag starts an episode, and `quiet` ends it.
    return nab_score(s, flagged, *episodes([(i, 1.0) for i in flagged], Rule(0.5, 0.5, 1, quiet)))


def model_score(s: NabSeries, p_anomaly: np.ndarray, rule: Rule) -> dict:
    rows = np.nonzero(p_anomaly >= rule.threshold)[0]
    flagged = list(zip(s.at[rows].tolist(), p_anomaly[rows].tolist()))
    return nab_score(s, [i for i, _ in flagged], *episodes(flagged, rule))


def rules(sim_ok: set[float]) -> list[Rule]:
    """The rules to choose from: every threshold the simulator allows, each with every quiet length, and either
    every flagged reading starting an episode or only a high one (else a run of flagged readings)."""
    out = []
    for t in sorted(sim_ok):
        for q in QUIETS:
            out.append(Rule(t, t, 1, q))
            out += [Rule(t, s, k, q) for s in STARTS if s > t for k in PERSISTS]
    return out


def choose_on(series: list[NabSeries], proba: dict[str, np.ndarray], sim_ok: set[float]) -> Rule:
    """The flagging and episode rule for a set of NAB series: the most windows hit, then the fewest false
    episodes, among the thresholds whose simulator figures are no worse than the previous model's (then the
    simplest: the lower start, the fewer readings in a row, the shorter quiet)."""
    best = None
    for rule in rules(sim_ok):
        scores = [model_score(s, proba[s.name], rule) for s in series]
        key = (sum(x["hit"] for x in scores), -sum(x["false_episodes"] for x in scores), rule.threshold,
               -rule.start, -rule.persist, -rule.quiet)
        if best is None or key > best[0]:
            best = (key, rule)
    assert best is not None, "no threshold keeps the simulator figures"
    return best[1]


# --- the model --------------------------------------------------------------------------------------------------


def export(model: Pipeline, rule: Rule) -> onnx.ModelProto:
    """The fitted pipeline as one small graph: the scaler, then the networks side by side as one wider network (each
    layer one MatMul whose weights hold every network's block, the hidden layers block-diagonal so no network sees
    another's units), a softmax per network and their mean. skl2onnx's export of the same pipeline runs each network
    as its own chain of nodes plus the vote's bookkeeping (55 nodes against 11): onnxruntime's cost per run is per
    node, and the gateway runs the model on a handful of rows at a time (benchmarks/RESULTS.md)."""
    scaler, vote = model.steps[0][1], model.steps[-1][1]
    nets = vote.estimators_
    if vote.weights is not None or any(n.activation != "relu" or n.out_activation_ != "softmax" for n in nets):
        raise SystemExit("export() builds a soft vote of ReLU networks with softmax outputs, unweighted")
    layers = len(nets[0].coefs_)
    weights = [np.concatenate([n.coefs_[0] for n in nets], axis=1)]  # every network reads the same scaled features
    weights += [block_diag(*[n.coefs_[i] for n in nets]) for i in range(1, layers)]
    biases = [np.concatenate([n.intercepts_[i] for n in nets]) for i in range(layers)]
    f32 = np.float32
    inits = [onnx.numpy_helper.from_array(scaler.mean_.astype(f32), "mean"),
             onnx.numpy_helper.from_array((1.0 / scaler.scale_).astype(f32), "inverse_scale"),
             onnx.numpy_helper.from_array(np.array([-1, len(nets), len(CLASSES)], np.int64), "per_network")]
    node = onnx.helper.make_node
    nodes = [node("Sub", ["features", "mean"], ["centred"]), node("Mul", ["centred", "inverse_scale"], ["h0"])]
    for i, (w, b) in enumerate(zip(weights, biases)):
        inits += [onnx.numpy_helper.from_array(w.astype(f32), f"w{i}"), onnx.numpy_helper.from_array(b.astype(f32), f"b{i}")]
        nodes += [node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]), node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        if i < layers - 1:
            nodes.append(node("Relu", [f"a{i}"], [f"h{i + 1}"]))
    last = f"a{layers - 1}"
    nodes += [node("Reshape", [last, "per_network"], ["logits"]),  # (rows, networks, classes)
              node("Softmax", ["logits"], ["network_probabilities"], axis=-1),
              node("ReduceMean", ["network_probabilities"], ["probabilities"], axes=[1], keepdims=0)]
    n_features = len(FEATURE_NAMES)
    graph = onnx.helper.make_graph(
        nodes, MODEL_NAME,
        [onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, [None, n_features])],
        [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [None, len(CLASSES)])], inits)
    # opset 17: what every onnxruntime >= 1.17 (the gateway's floor) runs
    onnx_model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)],
                                        producer_name="models/anomaly/train.py")
    onnx_model.doc_string = "Per-value sensor anomaly classifier over online per-series features (see MODEL_CARD.md)."
    onnx.helper.set_model_props(onnx_model, {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "classes": ",".join(CLASSES),
        "features": ",".join(FEATURE_NAMES),
        "warmup": str(WARMUP),
        "threshold": f"{rule.threshold:.2f}",
        "episode_start": f"{rule.start:g}",
        "episode_persist": str(rule.persist),
        "episode_quiet": str(rule.quiet),
    })
    onnx.checker.check_model(onnx_model)
    return onnx_model


def probabilities(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    """The class probabilities the gateway acts on: the network's, then the spike guard's (a row it catches is a
    spike, P(anomaly) 1.0), as gateway/filters/anomaly.py applies it."""
    return guarded(np.asarray(session.run(["probabilities"], {"features": x})[0]), x)


def guarded(proba: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`proba` with the rows whose features `x` the spike guard catches (anomaly_features.is_wild, vectorised) set to
    certainly a spike."""
    wild = wild_rows(x)
    if wild.any():
        proba = proba.copy()
        proba[wild] = 0.0
        proba[wild, CLASSES.index("spike")] = 1.0
    return proba


def wild_rows(x: np.ndarray) -> np.ndarray:
    """anomaly_features.is_wild over the rows of a feature matrix."""
    z, tail = x[:, FEATURE_NAMES.index("z_level")].astype(np.float64), x[:, FEATURE_NAMES.index("level_tail")]
    return ((np.abs(z) >= math.log1p(GUARD_Z)) & (tail.astype(np.float64) >= math.log1p(GUARD_TAIL))
            & (x[:, FEATURE_NAMES.index("is_zero")] == 0.0))


def ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def evaluate(proba: np.ndarray, data: Dataset, threshold: float) -> dict:
    """Value- and episode-level metrics at `threshold` on P(any anomaly) = 1 - P(normal)."""
    flagged = 1.0 - proba[:, 0] >= threshold
    predicted = np.where(flagged, 1 + np.argmax(proba[:, 1:], axis=1), 0)
    truth = data.y
    anomalous = truth != 0
    out: dict = {
        "rows": int(len(truth)),
        "anomalous_rows": int(anomalous.sum()),
        "any": {
            "precision": ratio(int((flagged & anomalous).sum()), int(flagged.sum())),
            "recall": ratio(int((flagged & anomalous).sum()), int(anomalous.sum())),
            "false_positive_rate": ratio(int((flagged & ~anomalous).sum()), int((~anomalous).sum())),
        },
        "types": {},
    }
    out["confusion"] = [[int(((truth == i) & (predicted == j)).sum()) for j in range(len(CLASSES))]
                        for i in range(len(CLASSES))]
    event_flagged = np.bincount(data.reading, weights=flagged) > 0
    event_anomalous = np.bincount(data.reading, weights=anomalous) > 0
    scored = np.bincount(data.reading) > 0
    event_flagged, event_anomalous = event_flagged[scored], event_anomalous[scored]
    out["events"] = {
        "events": int(scored.sum()),
        "anomalous_events": int(event_anomalous.sum()),
        "precision": ratio(int((event_flagged & event_anomalous).sum()), int(event_flagged.sum())),
        "recall": ratio(int((event_flagged & event_anomalous).sum()), int(event_anomalous.sum())),
        "false_alarm_rate": ratio(int((event_flagged & ~event_anomalous).sum()), int((~event_anomalous).sum())),
    }
    for c, name in enumerate(CLASSES[1:], start=1):
        is_c = truth == c
        said_c = predicted == c
        ids = np.unique(data.episode[is_c])
        hit_ids = np.unique(data.episode[is_c & flagged])
        delays = []
        for e in hit_ids:
            rows = np.nonzero(data.episode == e)[0]
            delays.append(int(np.argmax(flagged[rows])))
        out["types"][name] = {
            "rows": int(is_c.sum()),
            "precision": ratio(int((is_c & said_c).sum()), int(said_c.sum())),
            "recall": ratio(int((is_c & said_c).sum()), int(is_c.sum())),
            "flagged_any_label": ratio(int((is_c & flagged).sum()), int(is_c.sum())),
            "episodes": int(len(ids)),
            "episode_recall": ratio(int(len(hit_ids)), int(len(ids))),
            "median_delay": float(np.median(delays)) if delays else None,
        }
    return out


# The previous model's card (sensor-anomaly 1.1.1, test fleet, any anomaly, per value): 85.1 % precision, 71.5 %
# recall. Issue 15 asks for no worse on the simulator.
PREVIOUS = {"precision": 0.851, "recall": 0.715}
# The last card's figures (sensor-anomaly 2.2.0), for the card's before/after: NAB crossed (all series, real series
# only) and the simulator's test fleet at its threshold (0.94).
BEFORE = {"version": "2.2.0", "threshold": 0.94,
          "all": {"windows": 50, "hit": 45, "false_episodes": 174, "false_values": 19638},
          "real": {"windows": 44, "hit": 40, "false_episodes": 99, "false_values": 10654},
          "test": {"precision": 0.896, "recall": 0.730}}


def sim_sweep(proba: np.ndarray, data: Dataset) -> list[dict]:
    out = []
    for t in THRESHOLDS:
        a = evaluate(proba, data, t)["any"]
        p, r = a["precision"] or 0.0, a["recall"] or 0.0
        out.append({"threshold": t, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                    "false_positive_rate": a["false_positive_rate"]})
    return out


def parity_check(model_path: Path, fleet: Fleet, proba: np.ndarray, data: Dataset) -> int:
    """One device of `fleet` streamed through the gateway's AnomalyDetector in micro-batches must give the offline
    scores: the same features and model, online or over a recorded series (training/serving skew)."""
    from gateway.filters.anomaly import AnomalyDetector

    rng = random.Random(f"{fleet.name}/{fleet.seed}")
    signal = DeviceSignal(f"{fleet.name}-0000", fleet.seed, fleet.kinds[0],
                          start_ms=EPOCH_2026_MS + rng.randrange(86_400_000),
                          interval_ms=rng.choice(fleet.intervals_ms), anomaly_rate=fleet.anomaly_rate)
    readings = [signal.next() for _ in range(READINGS_PER_DEVICE)]
    detector = AnomalyDetector(model_path, threshold=0.5)
    online: list[float] = []
    for start in range(0, len(readings), 97):  # an odd batch size, so batches straddle the warm-up boundary
        batch = readings[start:start + 97]
        online.extend(v.score for v in detector.score([("devices/parity", r.fields, r.ts_ms) for r in batch]))
    per_field = READINGS_PER_DEVICE - WARMUP
    fields = len(signal.field_names)
    offline = (1.0 - proba[: per_field * fields, 0]).reshape(fields, per_field).max(axis=0)
    diff = np.abs(np.asarray(online[WARMUP:]) - np.round(offline, 6))
    if diff.max() > 2e-6:
        raise SystemExit(f"parity check failed: detector and offline scores differ by up to {diff.max():.3g}")
    return len(offline)


# The live demo's fleet (scripts/demo on its defaults): 5 devices of the three kinds, 200 readings per second in all
# (each device every 25 ms), anomaly episodes started at 0.0005 per reading, for DEMO_MINUTES.
DEMO_DEVICES, DEMO_RATE, DEMO_ANOMALY_RATE, DEMO_MINUTES = 5, 200.0, 0.0005, 10
DEMO_NEAR = 10  # readings of its device: an alert this close to a labelled anomalous reading is a true one
# A stricter episode start, for the card: what it would spare the demo, and what it costs on NAB.
STRICT_START, STRICT_PERSIST = 0.95, 3


def demo_alerts(model_path: Path, start: float | None = None, persist: int | None = None) -> dict:
    """What a user of the demo sees: the simulator's fleet as scripts/demo runs it, streamed through the gateway's
    AnomalyDetector (the shipped rule, unless `start` and `persist` say otherwise) in batches of 4 readings, as the
    log's commits bring them at that rate; the alerts it starts, how many are near a labelled anomaly of their
    device, and how many labelled episodes got one."""
    from gateway.filters.anomaly import AnomalyDetector

    kinds = ("env", "machine", "water")
    interval = DEMO_DEVICES * 1000.0 / DEMO_RATE
    signals = [DeviceSignal(f"dev-{i + 1:04d}", 1, kinds[i % len(kinds)], start_ms=EPOCH_2026_MS + round(i * interval),
                            interval_ms=interval, anomaly_rate=DEMO_ANOMALY_RATE) for i in range(DEMO_DEVICES)]
    detector = AnomalyDetector(model_path, start=start, persist=persist)
    anomalous: list[list[bool]] = [[] for _ in signals]
    starts: list[list[int]] = [[] for _ in signals]
    total = int(DEMO_RATE * 60 * DEMO_MINUTES)
    for first in range(0, total, 4):
        batch = [(k % DEMO_DEVICES, signals[k % DEMO_DEVICES].next()) for k in range(first, min(first + 4, total))]
        verdicts = detector.score([(f"devices/{signals[d].device_id}", r.fields, r.ts_ms) for d, r in batch])
        for (d, r), v in zip(batch, verdicts):
            if v.detail is not None and v.detail.get("episode") == "start":
                starts[d].append(len(anomalous[d]))
            anomalous[d].append(r.anomalous)
    true_alerts = false_alerts = episodes = alerted = 0
    for marks, at in zip(anomalous, starts):
        for i in at:
            near = any(marks[max(0, i - DEMO_NEAR):i + DEMO_NEAR + 1])
            true_alerts += near
            false_alerts += not near
        runs = [i for i, m in enumerate(marks) if m and (i == 0 or not marks[i - 1])]
        episodes += len(runs)
        alerted += sum(1 for i in runs if any(i - DEMO_NEAR <= a <= i + DEMO_NEAR for a in at))
    return {"readings": total, "true_alerts": true_alerts, "false_alerts": false_alerts, "episodes": episodes,
            "alerted": alerted}


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write anomaly.onnx and MODEL_CARD.md")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    kernels = blas_kernels()
    if kernels != {BLAS_KERNELS}:
        log(f"OpenBLAS runs the {', '.join(sorted(kernels))} kernels, not {BLAS_KERNELS}'s: the fit and the card's "
            "figures will differ from the committed ones")
    fleets = {}
    for fleet in (TRAIN, VALIDATION, TEST, UNSEEN):
        fleets[fleet.name] = simulate(fleet)
        log(f"simulated {fleet.name}: {fleets[fleet.name].x.shape[0]} rows")
    nab = load_nab()
    log(f"NAB: {len(nab)} series, {sum(len(s.values) for s in nab)} values")

    train = fleets["train"]
    counts = np.bincount(train.y, minlength=len(CLASSES))
    if (counts == 0).any():
        raise SystemExit(f"every class needs training rows, got {dict(zip(CLASSES, counts.tolist()))}")
    weights = (counts[0] / counts) ** CLASS_WEIGHT_POWER
    network = make_pipeline(StandardScaler(), VotingClassifier(
        [(f"mlp{seed}", MLPClassifier(**NETWORK, random_state=seed)) for seed in SEEDS], voting="soft",
        flatten_transform=False))  # soft: the mean of the networks' probabilities, exported as one graph
    # One BLAS thread: the fitted networks (and the windows they hit) change with the BLAS thread count.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # the epochs are a choice (NETWORK), not a failure
        network.fit(train.x, train.y, votingclassifier__sample_weight=weights[train.y])
    log("trained the network")

    session = ort.InferenceSession(export(network, Rule(0.5, 0.5, 1, 12)).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    sample = fleets["validation"].x[:50_000]
    drift = np.abs(session.run(["probabilities"], {"features": sample})[0] - network.predict_proba(sample)).max()
    if drift > 1e-4:  # export() builds the graph by hand: it must compute what the fitted pipeline does
        raise SystemExit(f"the exported graph's probabilities differ from the pipeline's by up to {drift:.2g}")
    log(f"exported graph matches the pipeline (max difference {drift:.1g})")
    sweep = sim_sweep(probabilities(session, fleets["validation"].x), fleets["validation"])
    # Thresholds at which the validation fleet is at least as good as the previous model's test figures.
    sim_ok = {s["threshold"] for s in sweep
              if s["precision"] >= PREVIOUS["precision"] and s["recall"] >= PREVIOUS["recall"]}
    if not sim_ok:  # then the best F1 alone; the card says so
        sim_ok = {max(sweep, key=lambda s: (s["f1"], -s["threshold"]))["threshold"]}
    nab_proba = {s.name: 1.0 - probabilities(session, s.x)[:, 0] for s in nab}
    folds = [[s for s in nab if s.fold == k] for k in (0, 1)]
    crossed = {}
    for k in (0, 1):
        chosen = choose_on(folds[1 - k], nab_proba, sim_ok)
        crossed[k] = {"rule": chosen, "series": {s.name: model_score(s, nab_proba[s.name], chosen) for s in folds[k]}}
        log(f"chose on fold {1 - k} for fold {k}: {chosen}")
    rule = choose_on(nab, nab_proba, sim_ok)
    threshold, quiet = rule.threshold, rule.quiet
    log(f"chose {rule}")

    model = export(network, rule)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "anomaly.onnx"
    model_path.write_bytes(model.SerializeToString())
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.2f} MB)")

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    results: dict = {"eval": {}}
    for name in ("test", "unseen-kind"):
        proba = probabilities(session, fleets[name].x)
        results["eval"][name] = evaluate(proba, fleets[name], threshold)
        if name == "unseen-kind":
            results["parity_rows"] = parity_check(model_path, UNSEEN, proba, fleets[name])
    strict = Rule(threshold, STRICT_START, STRICT_PERSIST, quiet)
    results["demo"] = {"shipped": demo_alerts(model_path),
                       "strict": demo_alerts(model_path, STRICT_START, STRICT_PERSIST)}
    log(f"demo: {results['demo']['shipped']}, with a start of {STRICT_START} or {STRICT_PERSIST} in a row: "
        f"{results['demo']['strict']}")
    results["nab"] = {s.name: {"model": model_score(s, nab_proba[s.name], rule),
                               "crossed": crossed[s.fold]["series"][s.name],
                               "strict": model_score(s, nab_proba[s.name], strict),
                               "zscore": zscore_baseline(s, quiet=quiet), "values": len(s.values)}
                      for s in nab}
    results.update(threshold=threshold, quiet=quiet, rule=rule, crossed={k: v["rule"] for k, v in crossed.items()},
                   sweep=sweep, size_mb=model_path.stat().st_size / 1e6,
                   fleets={name: {"series": d.series, "rows": int(len(d.y)),
                                  "rows_per_class": {c: int((d.y == i).sum()) for i, c in enumerate(CLASSES)},
                                  "episodes": d.episodes} for name, d in fleets.items()})
    log("evaluated")
    from models.anomaly.card import write_card  # noqa: E402  (the card's prose lives apart from the arithmetic)

    write_card(args.out_dir / "MODEL_CARD.md", results, sys.modules[__name__])
    log(f"wrote {args.out_dir / 'MODEL_CARD.md'}")
    print(json.dumps({k: results[k] for k in ("threshold", "quiet", "size_mb")} | {
        "rule": str(rule), "crossed": {k: str(v) for k, v in results["crossed"].items()},
        "test": results["eval"]["test"]["any"], "unseen": results["eval"]["unseen-kind"]["any"],
        "nab_model": _totals(results["nab"], "model"), "nab_crossed": _totals(results["nab"], "crossed"),
        "nab_zscore": _totals(results["nab"], "zscore")}, indent=2))
    return 0


def blas_kernels() -> set[str]:
    """The kernels each OpenBLAS loaded in this process runs (numpy's and scipy's each bring one)."""
    return {str(i.get("architecture")) for i in threadpool_info() if i["internal_api"] == "openblas"}


def _totals(nab: dict, key: str) -> dict:
    return {k: sum(v[key][k] for v in nab.values()) for k in ("windows", "hit", "false_episodes", "false_values")}


if __name__ == "__main__":
    raise SystemExit(main())
