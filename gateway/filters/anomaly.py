"""The anomaly filter: each field of each device against its own normal, learned online; one ONNX run per batch.

    items (source, fields, ts) ──▶ per (source, field): Series ──▶ features (anomaly_features.observe, O(1))
                                    (bounded, least recently seen evicted)      │ every field of the batch
                                                                                ▼
                                            ONE session.run ──▶ P(each class) per field ──▶ a Verdict per reading
                                                                                              + episodes per device

A reading's score is the highest anomaly probability among its fields; it is flagged at the threshold, labelled
with the most likely anomaly type of that field, and `detail.fields` names every flagged field with its type. A value
far off its series both in spreads and against the series' own 99th percentile of deviation (the spike guard,
anomaly_features.is_wild) is a `spike` with P(anomaly) 1.0 whatever the network says: the network is not monotone
in the size of a spike, and a reading a million spreads off must be flagged. A series is scored from its WARMUP-th
value on; a reading none of whose fields is scored yet is labelled "warming".

A field that has only ever read exactly 0 or 1 is a state (a door contact, a motion sensor, a relay, an ESPHome
binary sensor's ON/OFF), whatever its name: it is not judged. Held for hours it would look stuck to the model, and a
0 would look like a dropout; neither means anything for a state. It keeps its history, so a value other than 0 or 1
makes it a measurement, judged from then on. (A profile can leave other fields alone: `anomaly = false`, applied
before the detector, in gateway/filters/stage.py.)

Alerts are episodes, not readings: per device, after a quiet spell, a flagged reading scoring at least `start`
starts an episode at once (`detail.episode = "start"`); one scoring less starts it only as the `persist`-th flagged
reading in a row, since real series are full of single moderately surprising values while a failing sensor keeps
failing. `quiet` unflagged readings in a row end an episode (`detail.episode = "end"`, on the reading that ended
it). The gateway publishes an alert at each, so a failing sensor raises one alert, not one per reading; every
reading still carries its own verdict (followers, InfluxDB's `anomaly` tag), flagged or not, in an episode or not.

Memory is bounded by `max_series`: a new series beyond it evicts the least recently updated one (which starts over,
warming, if it comes back), so a device inventing field names churns the cache but cannot grow it.

Not thread-safe: one caller at a time (the gateway's filter stage owns one detector).
"""

from __future__ import annotations

import math
from array import array
from collections import OrderedDict
from itertools import chain
from pathlib import Path
from struct import pack as _pack
from typing import Any, Mapping, NamedTuple, Sequence

from gateway.event import Verdict
from gateway.filters.anomaly_features import FEATURE_NAMES, WARMUP, Series, is_wild, observe
from gateway.filters.onnx_session import Tensor, open_session

NORMAL = "normal"
SPIKE = "spike"  # the label of a value the spike guard flags (anomaly_features.is_wild)
WARMING = "warming"
START, END = "start", "end"


class ModelMetadataError(ValueError):
    """The .onnx file lacks the metadata the detector relies on, or was trained on different features."""


class AnomalyDetector:
    """Scores micro-batches of telemetry against the committed sensor-anomaly model.

    `threshold`, `start`, `persist` and `quiet` default to what the training script chose and recorded in the
    model's metadata; a `start` below the threshold counts as the threshold (every flagged reading starts one).
    `session` is the onnxruntime session; it may be wrapped (for instance to count runs) but must keep `run`.
    """

    def __init__(self, model_path: str | Path, *, threshold: float | None = None, start: float | None = None,
                 persist: int | None = None, quiet: int | None = None, max_series: int = 100_000,
                 intra_op_threads: int = 1) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self.session: Any
        self.session, meta = open_session(model_path, intra_op_threads)
        self.name, self.version, self.classes, defaults = _read_metadata(meta, model_path)
        self.defaults = defaults  # what 0 in the config means (a reload applies thresholds again)
        self.threshold = defaults.threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be within (0, 1], got {self.threshold}")
        self.start = defaults.start if start is None else float(start)
        if not 0.0 < self.start <= 1.0:
            raise ValueError(f"start must be within (0, 1], got {self.start}")
        self.persist = defaults.persist if persist is None else int(persist)
        if self.persist < 1:
            raise ValueError(f"persist must be at least 1, got {self.persist}")
        self.quiet = defaults.quiet if quiet is None else int(quiet)
        if self.quiet < 1:
            raise ValueError(f"quiet must be at least 1, got {self.quiet}")
        self._input = self.session.inputs[0]
        if "probabilities" not in self.session.outputs:
            raise ModelMetadataError(f"{model_path}: no 'probabilities' output (export with zipmap disabled)")
        self._normal = self.classes.index(NORMAL)
        if SPIKE not in self.classes:
            raise ModelMetadataError(f"{model_path}: classes {self.classes} lack {SPIKE!r} (the spike guard's label)")
        self._spike = self.classes.index(SPIKE)
        self.max_series = max_series
        self._series: OrderedDict[tuple[str, str], Series] = OrderedDict()
        # source -> [readings so far, open]: open, the unflagged readings in a row since the last flagged one;
        # not open yet, the flagged readings in a row (scoring under `start`) that have not started an episode.
        self._episodes: OrderedDict[str, list[int]] = OrderedDict()
        self.evicted = 0

    @property
    def tracked(self) -> int:
        """How many (source, field) series have history right now."""
        return len(self._series)

    def score(self, items: Sequence[tuple[str, Mapping[str, float], int]]) -> list[Verdict]:
        """One verdict per (source, fields, ts_ms) item, in order; each field joins its series' history."""
        rows: list[tuple[float, ...]] = []
        row_item: list[int] = []
        row_field: list[str] = []
        warming = [False] * len(items)
        series_of = self._series_of
        for i, (source, fields, ts_ms) in enumerate(items):
            for name, value in _values(fields):
                s = series_of(source, name)
                f = observe(s, value, ts_ms)
                if s.binary:  # a state, not a measurement: see the module's docstring
                    continue
                if f is None:
                    warming[i] = True
                else:
                    rows.append(f)
                    row_item.append(i)
                    row_field.append(name)
        best = [-1.0] * len(items)
        best_row = [-1] * len(items)
        flagged_fields: dict[int, dict[str, str]] = {}
        if rows:
            # float32 as the model takes them, packed in one call (a third of what converting row by row costs)
            features = array("f")
            features.frombytes(_pack(f"{len(rows) * len(rows[0])}f", *chain.from_iterable(rows)))
            proba = self.session.run(["probabilities"], {self._input: Tensor(features, (len(rows), len(rows[0])))})[0]
            width = proba.shape[1]
            # P(anomaly) = 1 - P(normal), in float32 as the training script computes it (numpy), so that a score on
            # the threshold falls the same way.
            p_anomaly = array("f", [1.0 - p for p in proba.data[self._normal::width]]).tolist()
            wild = set()
            for r, f in enumerate(rows):  # the spike guard, as in training: far beyond anything the series has shown
                if is_wild(f):
                    p_anomaly[r] = 1.0
                    wild.add(r)
            threshold, classes = self.threshold, self.classes
            for r, p in enumerate(p_anomaly):
                i = row_item[r]
                if p > best[i]:
                    best[i] = p
                    best_row[i] = r
                if p >= threshold:  # the kind only of what is flagged: a verdict under the threshold is "normal"
                    kind = self._spike if r in wild else self._kind(proba.data, r, width)
                    flagged_fields.setdefault(i, {})[row_field[r]] = classes[kind]
        verdicts = []
        for i in range(len(items)):
            fields = flagged_fields.get(i)
            kind = fields[row_field[best_row[i]]] if fields is not None else ""
            verdicts.append(self._verdict(items[i][0], best[i], kind, warming[i], fields))
        return verdicts

    def _kind(self, proba: array, row: int, width: int) -> int:
        """The most likely anomaly class of a row of the flat class probabilities."""
        p = proba[row * width:(row + 1) * width].tolist()
        p[self._normal] = -1.0
        return p.index(max(p))

    def warm(self, items: Sequence[tuple[str, Mapping[str, float], int, float | None]]) -> None:
        """Learn from readings scored before a restart, without scoring them again: every field's statistics and
        every device's episode continue from where they were, instead of warming up again (and a device in the
        middle of an episode does not raise a second alert for it). Items are (source, fields, ts_ms, the
        reading's score if it was flagged at the time, else None), oldest first."""
        for source, fields, ts_ms, flagged in items:
            for name, value in _values(fields):
                observe(self._series_of(source, name), value, ts_ms)
            self._episode(source, flagged)

    def _series_of(self, source: str, name: str) -> Series:
        key = (source, name)
        series = self._series
        s = series.get(key)
        if s is None:
            if len(series) >= self.max_series:
                series.popitem(last=False)
                self.evicted += 1
            s = series[key] = Series()
        else:
            series.move_to_end(key)
        return s

    def _verdict(self, source: str, score: float, kind: str, warming: bool,
                 fields: dict[str, str] | None) -> Verdict:
        episode = self._episode(source, score if fields is not None else None)
        if score < 0:
            return Verdict(self.name, self.version, 0.0, WARMING if warming else NORMAL, False,
                           {"episode": episode} if episode else None)
        score = round(score, 6)
        if fields is not None:
            detail: dict[str, Any] = {"fields": fields}
            if episode:
                detail["episode"] = episode
            return Verdict(self.name, self.version, score, kind, True, detail)
        return Verdict(self.name, self.version, score, NORMAL, False, {"episode": episode} if episode else None)

    def _episode(self, source: str, flagged: float | None) -> str | None:
        """Given the score of a device's reading when it is flagged (None when not): "start" on the reading that
        opens an episode after a quiet spell (one scoring at least `start`, or the `persist`-th flagged one in a
        row), "end" on the reading that completes `quiet` unflagged ones in a row, else None."""
        episodes = self._episodes
        state = episodes.get(source)
        if flagged is not None:
            if state is None:
                if len(episodes) >= self.max_series:
                    episodes.popitem(last=False)
                state = episodes[source] = [0, 0]
            else:
                episodes.move_to_end(source)
            if state[1]:
                state[0] = 0
                return None
            state[0] += 1
            if flagged >= self.start or state[0] >= self.persist:
                state[0], state[1] = 0, 1
                return START
            return None
        if state is None:
            return None
        if not state[1]:  # a flagged run that did not last: forgotten
            del episodes[source]
            return None
        state[0] += 1
        if state[0] >= self.quiet:
            del episodes[source]
            return END
        return None

    def in_episode(self, source: str) -> bool:
        state = self._episodes.get(source)
        return state is not None and state[1] == 1


def _values(fields: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The fields a series can learn from: numbers, finite (the gateway rejects the others before us; one would
    poison the statistics)."""
    out = []
    for name, raw in fields.items():
        try:
            value = float(raw)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            out.append((name, value))
    return out


class Defaults(NamedTuple):
    """The flagging and episode rule the training script chose, from the model's metadata."""

    threshold: float
    start: float
    persist: int
    quiet: int


_REQUIRED = ("name", "version", "classes", "features", "warmup", "threshold", "episode_start", "episode_persist",
             "episode_quiet")


def _read_metadata(meta: Mapping[str, str], path: str | Path) -> tuple[str, str, list[str], Defaults]:
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise ModelMetadataError(f"{path}: metadata_props lacks {', '.join(missing)}; retrain with "
                                 "models/anomaly/train.py")
    features = meta["features"].split(",")
    if tuple(features) != FEATURE_NAMES:
        raise ModelMetadataError(f"{path}: trained on features {features}, this gateway computes "
                                 f"{list(FEATURE_NAMES)}; retrain with models/anomaly/train.py")
    if int(meta["warmup"]) != WARMUP:
        raise ModelMetadataError(f"{path}: trained with warm-up {meta['warmup']}, this gateway uses {WARMUP}")
    classes = meta["classes"].split(",")
    if NORMAL not in classes or len(classes) < 2:
        raise ModelMetadataError(f"{path}: classes {classes} must include {NORMAL!r} and at least one anomaly")
    try:
        defaults = Defaults(float(meta["threshold"]), float(meta["episode_start"]), int(meta["episode_persist"]),
                            int(meta["episode_quiet"]))
    except ValueError:
        raise ModelMetadataError(f"{path}: threshold {meta['threshold']!r}, episode_start {meta['episode_start']!r}, "
                                 f"episode_persist {meta['episode_persist']!r} and episode_quiet "
                                 f"{meta['episode_quiet']!r} must be numbers") from None
    return meta["name"], meta["version"], classes, defaults
