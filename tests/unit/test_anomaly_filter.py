"""The gateway's anomaly filter, run against the real committed model (models/anomaly/anomaly.onnx).

The device kind used here, "water" (flow_lpm around 350 L/min, line_pressure_bar around 4, water_temp_c around 12),
was never part of the model's training data (see models/anomaly/MODEL_CARD.md): the filter must work on fields it
has never seen, from their own history.

    python -m tests.unit.test_anomaly_filter      rewrites tests/data/anomaly_features.npz (only with a new model)
"""

from __future__ import annotations

import math
import random
from array import array
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from firmware_sim.signals import ANOMALY_TYPES, DeviceSignal
from devices.profiles import ProfileIndex, parse
from gateway.event import KIND_TELEMETRY, Ingested, Verdict
from gateway.filters.anomaly import AnomalyDetector, ModelMetadataError
from gateway.filters.onnx_session import Tensor
from gateway.filters.stage import Filters
from gateway.ops.metrics import Metrics
from gateway.filters.anomaly_features import (
    DAY_MS,
    FEATURE_NAMES,
    HOLD,
    WARMUP,
    Series,
    is_wild,
    observe,
    series_features,
)
from tests.recording_session import RecordingSession

MODEL = Path(__file__).resolve().parents[2] / "models" / "anomaly" / "anomaly.onnx"
GOLDEN = Path(__file__).resolve().parents[1] / "data" / "anomaly_features.npz"
GOLDEN_EVERY = 4  # a quarter of the rows are kept: enough to catch a changed feature, a quarter of the file
META = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map


@pytest.fixture
def detector() -> AnomalyDetector:
    return AnomalyDetector(MODEL)


def stream(detector: AnomalyDetector, signal: DeviceSignal, n: int, batch: int = 64) -> list[Verdict]:
    out: list[Verdict] = []
    source = f"devices/{signal.device_id}"
    for start in range(0, n, batch):
        readings = [signal.next() for _ in range(min(batch, n - start))]
        out.extend(detector.score([(source, r.fields, r.ts_ms) for r in readings]))
    return out


def episodes(verdicts: list[Verdict]) -> list[str]:
    return [v.detail["episode"] for v in verdicts if v.detail and "episode" in v.detail]


# --- verdicts --------------------------------------------------------------------------------------------------


def test_the_verdict_names_the_model_and_version_from_the_model_metadata(detector):
    verdicts = stream(detector, DeviceSignal("pump-0001", 1, "water"), 40)
    assert {(v.model, v.version) for v in verdicts} == {(META["name"], META["version"])}
    assert (META["name"], META["version"]) == ("sensor-anomaly", "2.3.1")
    assert detector.threshold == float(META["threshold"])
    assert detector.start == float(META["episode_start"])
    assert detector.persist == int(META["episode_persist"])
    assert detector.quiet == int(META["episode_quiet"])


def test_a_new_series_is_warming_until_it_has_enough_history(detector):
    verdicts = stream(detector, DeviceSignal("pump-0001", 1, "water"), WARMUP + 5, batch=7)
    assert [v.label for v in verdicts[:WARMUP]] == ["warming"] * WARMUP
    assert not any(v.flagged or v.score for v in verdicts[:WARMUP])
    assert all(v.label != "warming" for v in verdicts[WARMUP:])


def test_a_clean_stream_is_rarely_flagged_and_raises_few_alerts(detector):
    flagged = total = alerts = 0
    for d in range(3):
        verdicts = stream(detector, DeviceSignal(f"pump-{d:04d}", 7, "water", interval_ms=5000), 1500, batch=256)
        flagged += sum(v.flagged for v in verdicts)
        alerts += episodes(verdicts).count("start")
        total += len(verdicts)
    assert flagged / total < 0.02, f"{flagged} of {total} clean readings flagged"
    assert alerts <= 0.005 * total, f"{alerts} episodes, {flagged} flagged readings"


@pytest.mark.parametrize(
    ("anomaly", "length", "magnitude"),
    [("spike", 1, 12.0), ("stuck", 30, None), ("drift", 40, 20.0), ("dropout", 5, None), ("noise", 20, 8.0)],
)
def test_an_injected_anomaly_on_an_unseen_field_is_flagged_with_its_type(detector, anomaly, length, magnitude):
    signal = DeviceSignal("pump-0042", 3, "water", interval_ms=5000)
    before = stream(detector, signal, 300)
    assert not any(v.flagged for v in before[-100:]), "the lead-in must be quiet for this test to mean anything"

    signal.inject("flow_lpm", anomaly, length=length, magnitude=magnitude)
    during = stream(detector, signal, length, batch=length)

    hits = [v for v in during if v.flagged and v.detail["fields"].get("flow_lpm") == anomaly]
    assert hits, [v.as_dict() for v in during]
    assert all(v.label == anomaly for v in hits if v.detail["fields"] == {"flow_lpm": anomaly})
    assert max(v.score for v in during) >= detector.threshold


@pytest.mark.parametrize("spread", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("spreads_off", [30, 100, 1000])
def test_a_reading_far_off_its_series_normal_is_flagged_as_a_spike(spread, spreads_off):
    """However far: a model knows what its training data showed it, and that must reach this far."""
    detector = AnomalyDetector(MODEL)
    rng = random.Random(f"{spread}/{spreads_off}")
    values = [round(20.0 + rng.gauss(0, spread), 2) for _ in range(200)] + [20.0 + spreads_off * spread]
    verdicts = detector.score([("devices/x", {"temperature": v, "humidity": 40.0 + rng.gauss(0, 1)}, 60_000 * i)
                               for i, v in enumerate(values)])
    assert verdicts[-1].flagged and verdicts[-1].detail["fields"] == {"temperature": "spike"}


def _spiked(spike: float, first: float | None) -> Verdict:
    """61 values of 20.0 +- 0.1 (the first of them `first` instead, if given), 1 s apart, then `spike`."""
    detector = AnomalyDetector(MODEL)
    rng = random.Random(0)
    values = [round(20.0 + rng.gauss(0, 0.1), 2) for _ in range(61)]
    if first is not None:
        values = [first] + values[:60]
    values.append(spike)
    return detector.score([("devices/x", {"temperature": v}, 1_000 * i) for i, v in enumerate(values)])[-1]


def test_a_huge_spike_in_a_young_series_that_started_far_off_is_flagged():
    """A first reading 30 spreads off what follows, then a calm series, then a reading 1000 spreads off, 36 values
    after warm-up: the running spread is still inflated by the start, and the network alone scores it under the
    threshold (it is not monotone in the size of a spike); the spike guard flags it."""
    verdict = _spiked(120.0, first=23.0)
    assert verdict.flagged and verdict.label == "spike" and verdict.score == 1.0


def test_a_reading_a_million_degrees_off_a_calm_series_is_flagged():
    verdict = _spiked(1e6, first=None)
    assert verdict.flagged and verdict.detail["fields"] == {"temperature": "spike"}


@pytest.mark.parametrize("first", [None, 23.0])
def test_every_spike_from_40_on_is_flagged_however_large(first):
    """Monotone in the size of a spike: once one is flagged, a larger one is too."""
    verdicts = {spike: _spiked(spike, first) for spike in (40.0, 60.0, 120.0, 1000.0, 1e6)}
    assert all(v.flagged and v.label == "spike" for v in verdicts.values()), {k: v.score for k, v in verdicts.items()}


def test_the_spike_guard_leaves_a_routine_burst_of_a_bursty_series_to_the_network():
    """A counter idle at 0.0 with log-normal bursts: a burst the size of its own bursts is not the guard's, a value
    far beyond anything it has shown is (and now and then a burst of its heavy tail)."""
    rng = random.Random(3)
    values, left = [], 0
    for _ in range(2000):
        if left == 0 and rng.random() < 0.1:
            left = rng.randint(1, 6)
        if left:
            left -= 1
            values.append(round(math.exp(rng.gauss(math.log(500.0), 1.0)), 3))
        else:
            values.append(0.0)
    ts = [60_000 * i for i in range(len(values) + 1)]
    rows, at = series_features(values, ts[:-1])
    late = [r for r, i in zip(rows, at) if i >= 1000 and values[i] != 0.0]
    assert sum(map(is_wild, late)) <= 0.01 * len(late)
    bursts = sorted(v for v in values if v)
    typical = bursts[len(bursts) * 9 // 10]
    assert not is_wild(series_features(values + [typical], ts)[0][-1])
    assert is_wild(series_features(values + [1e9], ts)[0][-1])


def test_a_flagged_verdict_lists_only_the_flagged_fields(detector):
    signal = DeviceSignal("pump-0050", 4, "water", interval_ms=5000)
    stream(detector, signal, 200)
    signal.inject("line_pressure_bar", "dropout", length=3)
    r = signal.next()
    v = detector.score([("devices/pump-0050", r.fields, r.ts_ms)])[0]
    assert v.flagged and v.label == "dropout"
    assert v.detail == {"fields": {"line_pressure_bar": "dropout"}, "episode": "start"}
    assert v.as_dict()["detail"] == v.detail


# --- episodes --------------------------------------------------------------------------------------------------


def test_an_anomaly_is_one_episode_with_a_start_and_an_end(detector):
    signal = DeviceSignal("pump-0060", 4, "water", interval_ms=5000)
    stream(detector, signal, 300)
    signal.inject("flow_lpm", "stuck", length=40)
    verdicts = stream(detector, signal, 40 + detector.quiet + 10, batch=16)
    marks = [(i, v.detail["episode"]) for i, v in enumerate(verdicts) if v.detail and "episode" in v.detail]
    assert [m for _, m in marks] == ["start", "end"], marks
    (start, _), (end, _) = marks
    assert verdicts[start].flagged
    # The end falls on the reading that completed `quiet` unflagged ones in a row, none flagged in between.
    assert not any(v.flagged for v in verdicts[end - detector.quiet + 1:end + 1])
    assert verdicts[end - detector.quiet].flagged


def test_flagged_readings_inside_an_episode_raise_no_new_alert():
    detector = AnomalyDetector(MODEL, quiet=5)
    signal = DeviceSignal("pump-0061", 4, "water", interval_ms=5000)
    stream(detector, signal, 300)
    for _ in range(3):  # spikes closer together than `quiet`: one episode
        signal.inject("flow_lpm", "spike", length=1, magnitude=20.0)
        verdicts = stream(detector, signal, 3, batch=3)
        assert verdicts[0].flagged
        assert detector.in_episode("devices/pump-0061")
    assert episodes(verdicts) == []
    rest = stream(detector, signal, 30, batch=30)
    assert episodes(rest) == ["end"]
    assert not detector.in_episode("devices/pump-0061")


def test_episodes_are_kept_per_device():
    detector = AnomalyDetector(MODEL, quiet=4)
    a, b = DeviceSignal("pump-0070", 4, "water", interval_ms=5000), DeviceSignal("pump-0071", 5, "water",
                                                                               interval_ms=5000)
    for _ in range(300):
        ra, rb = a.next(), b.next()
        detector.score([("devices/a", ra.fields, ra.ts_ms), ("devices/b", rb.fields, rb.ts_ms)])
    a.inject("flow_lpm", "dropout", length=3)
    ra, rb = a.next(), b.next()
    va, vb = detector.score([("devices/a", ra.fields, ra.ts_ms), ("devices/b", rb.fields, rb.ts_ms)])
    assert va.detail["episode"] == "start" and not vb.flagged
    assert detector.in_episode("devices/a") and not detector.in_episode("devices/b")


def test_a_detector_warmed_from_the_log_scores_on_as_if_there_had_been_no_restart():
    """After a restart the gateway warms the detector with the log's newest readings and their verdicts at the
    time: no series warms up again, and an episode in progress goes on without a second alert."""
    signal = DeviceSignal("pump-0080", 6, "water", interval_ms=5000)
    history = [signal.next() for _ in range(300)]
    signal.inject("flow_lpm", "stuck", length=40)
    history += [signal.next() for _ in range(20)]  # the restart comes in the middle of the anomaly
    after = [signal.next() for _ in range(int(META["episode_quiet"]) + 60)]  # the rest of it, and its end
    items = [("devices/pump-0080", r.fields, r.ts_ms) for r in history + after]

    running = AnomalyDetector(MODEL)
    before = running.score(items[:len(history)])
    assert before[-1].flagged and running.in_episode("devices/pump-0080")
    expected = running.score(items[len(history):])

    restarted = AnomalyDetector(MODEL)
    restarted.warm([(*item, v.score if v.flagged else None) for item, v in zip(items, before)])
    assert restarted.in_episode("devices/pump-0080") and restarted.tracked == running.tracked
    got = restarted.score(items[len(history):])
    assert [v.as_dict() for v in got] == [v.as_dict() for v in expected]
    assert episodes(got) == ["end"], "the episode started before the restart: it ends, it does not start again"

    cold = AnomalyDetector(MODEL).score(items[len(history):])
    assert cold[0].label == "warming"  # what the warm start spares


def test_the_episode_rule_can_be_overridden_and_is_checked():
    d = AnomalyDetector(MODEL, threshold=0.8, start=0.9, persist=4, quiet=3)
    assert (d.threshold, d.start, d.persist, d.quiet) == (0.8, 0.9, 4, 3)
    with pytest.raises(ValueError, match="quiet"):
        AnomalyDetector(MODEL, quiet=0)
    with pytest.raises(ValueError, match="threshold"):
        AnomalyDetector(MODEL, threshold=1.5)
    with pytest.raises(ValueError, match="start"):
        AnomalyDetector(MODEL, start=0.0)
    with pytest.raises(ValueError, match="start"):
        AnomalyDetector(MODEL, start=1.01)
    with pytest.raises(ValueError, match="persist"):
        AnomalyDetector(MODEL, persist=0)


class ScriptedSession:
    """Stands in for the model: every row of the next run gets P(anomaly) from `script`, as a spike."""

    def __init__(self, inner: Any, classes: list[str]) -> None:
        self.inner = inner
        self.classes = classes
        self.script: list[float] = []

    def run(self, output_names: Any, feed: dict[str, Tensor]) -> list[Tensor]:
        rows = next(iter(feed.values())).shape[0]
        p = self.script.pop(0)
        row = [0.0] * len(self.classes)
        row[self.classes.index("normal")] = 1.0 - p
        row[self.classes.index("spike")] = p
        return [Tensor(array("f", row * rows), (rows, len(self.classes)))]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def scripted(scores: list[float], **rule: Any) -> list[Verdict]:
    """The verdicts of one single-field device whose readings score `scores`, one reading per call, once warm."""
    detector = AnomalyDetector(MODEL, **rule)
    for i in range(WARMUP):
        detector.score([("devices/s", {"v": float(i % 3)}, i)])
    session = detector.session = ScriptedSession(detector.session, detector.classes)
    out = []
    for i, p in enumerate(scores):
        session.script.append(p)
        out.extend(detector.score([("devices/s", {"v": float(i % 3)}, WARMUP + i)]))
    return out


def marks(verdicts: list[Verdict]) -> list[tuple[int, str]]:
    return [(i, v.detail["episode"]) for i, v in enumerate(verdicts) if v.detail and "episode" in v.detail]


RULE = {"threshold": 0.9, "start": 0.99, "persist": 2, "quiet": 3}


def test_a_single_moderately_high_score_does_not_start_an_episode_two_in_a_row_do():
    verdicts = scripted([0.1, 0.95, 0.1, 0.1, 0.95, 0.96, 0.1, 0.1, 0.1], **RULE)
    assert [v.flagged for v in verdicts] == [False, True, False, False, True, True, False, False, False]
    assert marks(verdicts) == [(5, "start"), (8, "end")]


def test_a_very_high_score_starts_an_episode_at_once():
    verdicts = scripted([0.1, 0.995, 0.1, 0.1, 0.1], **RULE)
    assert marks(verdicts) == [(1, "start"), (4, "end")]


def test_inside_an_episode_any_flagged_reading_keeps_it_open():
    verdicts = scripted([0.995, 0.1, 0.1, 0.92, 0.1, 0.1, 0.1], **RULE)
    assert marks(verdicts) == [(0, "start"), (6, "end")]


def test_a_run_of_moderate_scores_must_be_unbroken_and_as_long_as_persist():
    verdicts = scripted([0.95, 0.1, 0.95, 0.1, 0.95, 0.95, 0.94, 0.1], **(RULE | {"persist": 3}))
    assert marks(verdicts) == [(6, "start")]


def test_a_start_at_or_under_the_threshold_lets_every_flagged_reading_start_an_episode():
    verdicts = scripted([0.1, 0.91, 0.1, 0.1, 0.1], **(RULE | {"start": 0.5}))
    assert marks(verdicts) == [(1, "start"), (4, "end")]


def test_a_moderate_run_in_progress_survives_a_restart():
    """The log holds the score of each flagged reading: warmed, the detector continues a run of moderately high
    scores as if there had been no restart."""
    detector = AnomalyDetector(MODEL, **RULE)
    items = [("devices/s", {"v": float(i % 3)}, i) for i in range(WARMUP + 2)]
    detector.warm([(*item, None) for item in items[:-1]] + [(*items[-1], 0.95)])
    assert not detector.in_episode("devices/s")
    detector.session = ScriptedSession(detector.session, detector.classes)
    detector.session.script.append(0.95)
    v = detector.score([("devices/s", {"v": 1.0}, WARMUP + 2)])[0]
    assert v.flagged and v.detail["episode"] == "start" and detector.in_episode("devices/s")


# --- batching and the series cache ------------------------------------------------------------------------------


def test_one_onnx_run_per_score_call(detector):
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    signals = [DeviceSignal(f"pump-{i:04d}", 5, "water") for i in range(40)]

    def batch(n: int) -> list[tuple[str, dict, int]]:
        out = []
        for k in range(n):
            s = signals[k % 40]
            r = s.next()
            out.append((f"devices/{s.device_id}", r.fields, r.ts_ms))
        return out

    detector.score(batch(WARMUP * 40))  # every series warms up: nothing to run
    assert recorder.runs == 0
    for _ in range(5):
        detector.score(batch(256))
    assert recorder.runs == 5
    detector.score(batch(3) * 100)  # the same few devices many times over: still one run, every field of every item
    assert recorder.runs == 6
    assert recorder.feeds[-1].shape == (300 * 3, len(FEATURE_NAMES))


def test_a_batch_scores_exactly_like_the_same_readings_one_by_one():
    batched, single = AnomalyDetector(MODEL, quiet=6), AnomalyDetector(MODEL, quiet=6)
    a = DeviceSignal("pump-0001", 9, "water", anomaly_rate=0.02)
    b = DeviceSignal("pump-0002", 9, "water", anomaly_rate=0.02)

    def item(source: str, s: DeviceSignal) -> tuple[str, dict, int]:
        r = s.next()
        return source, r.fields, r.ts_ms

    # Interleaved devices, and long bursts of one device, across the warm-up boundary.
    items = [item("devices/pump-0001", a) for _ in range(5)]
    items += [item(f"devices/pump-000{1 + i % 2}", a if i % 2 == 0 else b) for i in range(200)]
    items += [item("devices/pump-0002", b) for _ in range(400)]
    in_batches: list[Verdict] = []
    for start in range(0, len(items), 150):
        in_batches.extend(batched.score(items[start:start + 150]))
    one_by_one = [single.score([it])[0] for it in items]
    assert [(v.label, v.flagged, v.detail) for v in in_batches] == [(v.label, v.flagged, v.detail) for v in one_by_one]
    np.testing.assert_allclose([v.score for v in in_batches], [v.score for v in one_by_one], atol=1e-6)
    assert sum(v.flagged for v in one_by_one) > 10, "the stream must hold anomalies for this test to mean anything"


def test_the_detector_computes_the_features_the_training_script_computed(detector):
    """Series fed one batch at a time on the hot path give the features `series_features` gives a recorded series."""
    signal = DeviceSignal("pump-0003", 2, "water", anomaly_rate=0.05)
    readings = [signal.next() for _ in range(300)]
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    for start in range(0, len(readings), 13):
        detector.score([("devices/pump-0003", {"flow_lpm": r.fields["flow_lpm"]}, r.ts_ms)
                        for r in readings[start:start + 13]])
    rows, _ = series_features([r.fields["flow_lpm"] for r in readings], [r.ts_ms for r in readings])
    np.testing.assert_array_equal(np.concatenate(recorder.feeds), np.asarray(rows, dtype=np.float32))


def test_the_series_cap_evicts_the_least_recently_updated_series():
    detector = AnomalyDetector(MODEL, max_series=8)
    for i in range(5):
        detector.score([(f"devices/d{i}", {"a": 5.0, "b": 2.0}, 0)])
    assert detector.tracked == 8
    assert detector.evicted == 2  # d0's two fields went first
    # d0 is back with no history: warming again.
    v = detector.score([("devices/d0", {"a": 5.0}, 1000)])[0]
    assert v.label == "warming"
    assert detector.tracked == 8


def test_a_device_inventing_field_names_cannot_grow_the_cache():
    detector = AnomalyDetector(MODEL, max_series=100)
    honest = DeviceSignal("pump-0001", 1, "water")
    for i in range(50):
        hostile = {f"f{i}_{j}": float(j) for j in range(40)}
        r = honest.next()
        verdicts = detector.score([("devices/evil", hostile, r.ts_ms), ("devices/pump-0001", r.fields, r.ts_ms)])
        assert len(verdicts) == 2
    assert verdicts[1].label != "warming"  # the honest device kept its history throughout
    assert detector.tracked == 100
    assert detector.evicted == 50 * 40 + 3 - 100


def test_values_that_are_not_finite_numbers_are_skipped_without_crashing(detector):
    signal = DeviceSignal("pump-0001", 1, "water")
    stream(detector, signal, 40)
    tracked = detector.tracked
    odd: dict[str, Any] = {"flow_lpm": math.nan, "line_pressure_bar": math.inf, "water_temp_c": "warm",
                           "extra": None, "neg": -math.inf}
    r = signal.next()
    verdicts = detector.score([("devices/pump-0001", odd, r.ts_ms), ("devices/pump-0001", r.fields, r.ts_ms)])
    assert verdicts[0] == Verdict("sensor-anomaly", META["version"], 0.0, "normal", False)
    assert verdicts[1].label != "warming"
    assert detector.tracked == tracked
    # Huge but finite values reach the model as bounded features instead of NaNs.
    huge = detector.score([("devices/pump-0001", {"flow_lpm": 1.7e308, "line_pressure_bar": -1.7e308}, r.ts_ms)])[0]
    assert 0.0 <= huge.score <= 1.0


def test_an_empty_batch_runs_nothing(detector):
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    assert detector.score([]) == []
    assert recorder.runs == 0


# --- the model file ---------------------------------------------------------------------------------------------


def test_every_anomaly_type_is_a_model_class(detector):
    assert set(detector.classes) == {"normal", *ANOMALY_TYPES}


@pytest.mark.parametrize(("key", "value", "match"), [
    ("features", ",".join(reversed(FEATURE_NAMES)), "retrain"),
    ("warmup", str(WARMUP + 1), "warm-up"),
    ("episode_quiet", None, "episode_quiet"),
    ("episode_start", None, "episode_start"),
    ("episode_persist", None, "episode_persist"),
    ("episode_persist", "two", "must be numbers"),
    ("threshold", "high", "must be numbers"),
])
def test_a_model_trained_otherwise_is_refused(tmp_path, key, value, match):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(MODEL))
    props = {p.key: p.value for p in model.metadata_props}
    if value is None:
        del props[key]
    else:
        props[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelMetadataError, match=match):
        AnomalyDetector(path)


# --- the features -----------------------------------------------------------------------------------------------


def _features(values: list[float], step_ms: int = 60_000) -> np.ndarray:
    rows, _ = series_features(values, [i * step_ms for i in range(len(values))])
    return np.asarray(rows)


def test_the_features_ignore_the_unit_and_the_level_apart_from_zero():
    """Rescaling a series changes no feature, shifting it only those about exact zeros: that transfers to new fields."""
    rng = np.random.default_rng(0)
    shape = 20.0 + np.cumsum(rng.normal(size=200)) * 0.3 + rng.normal(size=200)
    shape[150] += 9.0
    base = _features(shape.tolist())
    scaled = _features((40.0 * shape).tolist())
    shifted = _features((330.0 + shape).tolist())
    np.testing.assert_allclose(scaled, base, rtol=1e-6, atol=1e-6)
    level_free = [i for i, name in enumerate(FEATURE_NAMES) if name != "zero_distance"]
    np.testing.assert_allclose(shifted[:, level_free], base[:, level_free], rtol=1e-6, atol=1e-6)
    assert (shifted[:, FEATURE_NAMES.index("zero_distance")] > base[:, FEATURE_NAMES.index("zero_distance")]).all()


def test_an_anomaly_does_not_teach_the_series_its_normal():
    """A long run far off the level keeps looking anomalous: suspect values do not update the statistics."""
    rng = random.Random(1)
    values = [10.0 + rng.gauss(0, 0.1) for _ in range(200)] + [20.0 + rng.gauss(0, 0.1) for _ in range(HOLD - 8)]
    z = _features(values)[:, FEATURE_NAMES.index("z_level")]
    assert (z[-(HOLD - 8):] > 3.0).all()  # signed log of z: z beyond e^3 - 1, about 19 spreads, to the end


def test_a_change_held_long_enough_becomes_the_new_normal():
    rng = random.Random(2)
    values = [10.0 + rng.gauss(0, 0.1) for _ in range(200)] + [20.0 + rng.gauss(0, 0.1) for _ in range(6 * HOLD)]
    z = _features(values)[:, FEATURE_NAMES.index("z_level")]
    assert abs(z[-1]) < 1.5


def test_the_daily_profile_is_learned_from_the_second_day_on():
    s = Series()
    known = []
    for i in range(3 * 288):  # three days of 5-minute values following the clock
        hour = (i // 12) % 24
        f = observe(s, 10.0 + (5.0 if 8 <= hour < 18 else 0.0), i * 300_000)
        if f is not None:
            known.append(f[FEATURE_NAMES.index("daily_known")])
    first_day = 288 - WARMUP
    assert not any(known[:first_day])
    assert known[-1] == 1.0
    assert s.daily is not None and len(s.daily) == 72
    assert DAY_MS == 288 * 300_000


def test_the_features_are_the_ones_the_committed_model_was_trained_on():
    """tests/data/anomaly_features.npz holds series of every kind (noisy, quantised, stuck, dropped out, drifting,
    spiking, flat, following the clock) with their features as computed when the committed model was trained. A
    faster rewrite of the features must reproduce them; a change in meaning must come with a retrained model and a
    new file. (Compared to float32 rounding, not bit for bit: libm's log1p may differ in the last bit elsewhere.)"""
    golden = np.load(GOLDEN)
    assert str(golden["model_version"]) == META["version"]
    for name in (k[len("values_"):] for k in golden.files if k.startswith("values_")):
        rows, _ = series_features(golden[f"values_{name}"].tolist(), golden[f"ts_{name}"].tolist())
        np.testing.assert_allclose(np.asarray(rows[::GOLDEN_EVERY], dtype=np.float32), golden[f"features_{name}"],
                                   rtol=1e-6, atol=1e-6, err_msg=name)


def _golden_series() -> dict[str, tuple[list[float], list[int]]]:
    rng = random.Random(15)
    minutes = [i * 60_000 for i in range(600)]
    noisy = [20.0 + rng.gauss(0, 0.5) for _ in minutes]
    series = {
        "noisy": noisy,
        "quantised": [round(v, 0) for v in noisy],
        "stuck": noisy[:300] + [noisy[299]] * 60 + noisy[360:],
        "dropout": noisy[:300] + [0.0] * 20 + noisy[320:],
        "drift": noisy[:300] + [v + 0.1 * i for i, v in enumerate(noisy[300:400])] + noisy[400:],
        "spike": noisy[:300] + [noisy[300] + 15.0] + noisy[301:],
        "flat": [3.0] * 600,
    }
    out = {k: (v, minutes) for k, v in series.items()}
    five = [i * 300_000 for i in range(3 * 288)]
    out["daily"] = ([10.0 + 5.0 * math.sin(2 * math.pi * t / DAY_MS) + rng.gauss(0, 0.2) for t in five], five)
    return out


def write_golden() -> None:
    arrays: dict[str, Any] = {"model_version": np.asarray(META["version"])}
    for name, (values, ts) in _golden_series().items():
        rows, _ = series_features(values, ts)
        arrays |= {f"values_{name}": np.asarray(values), f"ts_{name}": np.asarray(ts, dtype=np.int64),
                   f"features_{name}": np.asarray(rows[::GOLDEN_EVERY], dtype=np.float32)}
    np.savez_compressed(GOLDEN, **arrays)
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    write_golden()


FAN = parse('name = "fan"\nmatch = ["fan-*"]\n[fields.temperature]\n[fields.speed]\n'
            'values = { OFF = 0, LOW = 1, HIGH = 2 }\n')


def held_state(device: str, field: str, levels: tuple[float, ...], n: int) -> list[Ingested]:
    """A calm temperature, and a state that holds for long stretches and changes now and then, as a front door or a
    fan's speed does."""
    rng = random.Random(4)
    state, out = levels[0], []
    for i in range(n):
        if rng.random() < 0.02:
            state = rng.choice([level for level in levels if level != state])
        payload = {"temperature": 21.0 + rng.gauss(0, 0.1), field: state}
        out.append(Ingested(f"devices/{device}", KIND_TELEMETRY, 1_767_225_600_000 + i * 60_000, payload, b"{}"))
    return out


def scored_in_tens(filters: Filters, readings: list[Ingested]) -> list[Any]:
    return [v for i in range(0, len(readings), 10) for v in filters.score(readings[i:i + 10])]


def test_a_state_the_profile_leaves_alone_is_never_judged_while_the_device_s_measurements_are():
    readings = held_state("fan-1", "speed", (0.0, 1.0, 2.0), 1500)
    with_profile = Filters(AnomalyDetector(MODEL), None, Metrics(), ProfileIndex([FAN]))
    without = Filters(AnomalyDetector(MODEL), None, Metrics())
    kept = scored_in_tens(with_profile, readings)
    judged = scored_in_tens(without, readings)
    assert sum(v.flagged for v in judged) > 50, "a long-held state looks stuck to the model: the reason for the rule"
    assert not any(v.flagged and "speed" in v.detail["fields"] for v in kept)
    assert sum(v.flagged for v in kept) <= 3
    assert with_profile.detector.tracked == 1, "only the temperature has a series"
    # A spike of the measurement is still flagged.
    spike = Ingested("devices/fan-1", KIND_TELEMETRY, 1_767_225_600_000 + 1500 * 60_000,
                     {"temperature": 80.0, "speed": 0.0}, b"{}")
    verdict = with_profile.score([spike])[0]
    assert verdict.flagged and verdict.detail["fields"] == {"temperature": "spike"}


def test_a_field_that_only_ever_reads_0_or_1_is_a_state_never_judged_whatever_its_name():
    """An ESPHome binary sensor or a plain device's door flag: no profile names it, its values say what it is."""
    door = Filters(AnomalyDetector(MODEL), None, Metrics())
    verdicts = scored_in_tens(door, held_state("door-1", "contact", (0.0, 1.0), 1500))
    assert not any(v.flagged and "contact" in v.detail["fields"] for v in verdicts)
    assert sum(v.flagged for v in verdicts) <= 3
    # The same series on two other levels is a measurement, and held that long it looks stuck.
    levels = Filters(AnomalyDetector(MODEL), None, Metrics())
    verdicts = scored_in_tens(levels, held_state("door-2", "contact", (2.0, 3.0), 1500))
    assert sum(1 for v in verdicts if v.flagged and "contact" in v.detail["fields"]) > 50
    # A reading of the state alone is normal from the first one on (there is nothing to warm up).
    fresh = AnomalyDetector(MODEL)
    assert fresh.score([("devices/door-3", {"contact": 1.0}, 0)])[0].label == "normal"


def test_a_0_or_1_field_that_reads_anything_else_is_judged_from_then_on():
    detector = AnomalyDetector(MODEL)
    history = held_state("door-1", "contact", (0.0, 1.0), 300)
    detector.score([(r.source, r.payload, r.ts_ms) for r in history])
    verdict = detector.score([("devices/door-1", {"temperature": 21.0, "contact": 80.0}, history[-1].ts_ms + 60_000)])[0]
    assert verdict.flagged and verdict.detail["fields"] == {"contact": "spike"}
    assert detector.tracked == 2, "the state kept its history all along"
