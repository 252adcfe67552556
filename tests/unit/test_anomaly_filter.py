"""The gateway's anomaly filter, run against the real committed model (models/anomaly/anomaly.onnx).

The device kind used here, "water" (flow_lpm around 350 L/min, line_pressure_bar around 4, water_temp_c around 12),
was never part of the model's training data (see models/anomaly/MODEL_CARD.md): the filter must work on fields it
has never seen, from their own history.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest

from firmware_sim.signals import ANOMALY_TYPES, DeviceSignal
from gateway.event import Verdict
from gateway.filters.anomaly import AnomalyDetector, ModelMetadataError
from gateway.filters.anomaly_features import FEATURE_NAMES, MIN_HISTORY, WINDOW, series_features, window_features
from tests.recording_session import RecordingSession

MODEL = Path(__file__).resolve().parents[2] / "models" / "anomaly" / "anomaly.onnx"


@pytest.fixture
def detector() -> AnomalyDetector:
    return AnomalyDetector(MODEL)


def stream(detector: AnomalyDetector, signal: DeviceSignal, n: int, batch: int = 64) -> list[Verdict]:
    out: list[Verdict] = []
    source = f"devices/{signal.device_id}"
    for start in range(0, n, batch):
        out.extend(detector.score([(source, signal.next().fields) for _ in range(min(batch, n - start))]))
    return out


def test_the_verdict_names_the_model_and_version_from_the_model_metadata(detector):
    meta = ort.InferenceSession(str(MODEL), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
    verdicts = stream(detector, DeviceSignal("pump-0001", 1, "water"), 20)
    assert {(v.model, v.version) for v in verdicts} == {(meta["name"], meta["version"])}
    assert (meta["name"], meta["version"]) == ("sensor-anomaly", "1.1.1")
    assert detector.threshold == float(meta["threshold"])


def test_a_new_series_is_warming_until_it_has_enough_history(detector):
    verdicts = stream(detector, DeviceSignal("pump-0001", 1, "water"), MIN_HISTORY + 5, batch=7)
    assert [v.label for v in verdicts[: MIN_HISTORY - 1]] == ["warming"] * (MIN_HISTORY - 1)
    assert not any(v.flagged or v.score for v in verdicts[: MIN_HISTORY - 1])
    assert all(v.label != "warming" for v in verdicts[MIN_HISTORY - 1:])


def test_a_clean_stream_is_rarely_flagged(detector):
    flagged = total = 0
    for d in range(3):
        verdicts = stream(detector, DeviceSignal(f"pump-{d:04d}", 7, "water", interval_ms=5000), 1500, batch=256)
        flagged += sum(v.flagged for v in verdicts)
        total += len(verdicts)
    assert flagged / total < 0.02, f"{flagged} of {total} clean events flagged"


@pytest.mark.parametrize(
    ("anomaly", "length", "magnitude"),
    [("spike", 1, 12.0), ("stuck", 30, None), ("drift", 40, 20.0), ("dropout", 5, None), ("noise", 20, 8.0)],
)
def test_an_injected_anomaly_on_an_unseen_field_is_flagged_with_its_type(detector, anomaly, length, magnitude):
    signal = DeviceSignal("pump-0042", 3, "water", interval_ms=5000)
    before = stream(detector, signal, 300)
    assert not any(v.flagged for v in before[-50:]), "the lead-in must be quiet for this test to mean anything"

    signal.inject("flow_lpm", anomaly, length=length, magnitude=magnitude)
    during = stream(detector, signal, length, batch=length)

    hits = [v for v in during if v.flagged and v.detail and v.detail["fields"].get("flow_lpm") == anomaly]
    assert hits, [v.as_dict() for v in during]
    assert all(v.label == anomaly for v in hits if v.detail == {"fields": {"flow_lpm": anomaly}})
    assert max(v.score for v in during) >= detector.threshold


def test_a_flagged_verdict_lists_only_the_flagged_fields(detector):
    signal = DeviceSignal("pump-0050", 4, "water", interval_ms=5000)
    stream(detector, signal, 200)
    signal.inject("line_pressure_bar", "dropout", length=3)
    v = detector.score([("devices/pump-0050", signal.next().fields)])[0]
    assert v.flagged and v.label == "dropout"
    assert v.detail == {"fields": {"line_pressure_bar": "dropout"}}
    assert v.as_dict()["detail"] == {"fields": {"line_pressure_bar": "dropout"}}


def test_one_onnx_run_per_score_call(detector):
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    signals = [DeviceSignal(f"pump-{i:04d}", 5, "water") for i in range(40)]
    for _ in range(6):
        detector.score([(f"devices/{s.device_id}", s.next().fields) for k in range(256) for s in [signals[k % 40]]])
    # The first batch gives each device 6 or 7 values: all warming, nothing to run. Then one run per batch.
    assert recorder.runs == 5
    # A burst from one device, long enough that its ring wraps within the batch, is still one run.
    detector.score([("devices/pump-0000", signals[0].next().fields) for _ in range(3 * WINDOW)])
    assert recorder.runs == 6
    assert recorder.feeds[-1].shape == (3 * WINDOW * 3, len(FEATURE_NAMES))  # every field of every event


def test_a_batch_scores_exactly_like_the_same_events_one_by_one():
    batched, single = AnomalyDetector(MODEL), AnomalyDetector(MODEL)
    a = DeviceSignal("pump-0001", 9, "water", anomaly_rate=0.02)
    b = DeviceSignal("pump-0002", 9, "water", anomaly_rate=0.02)
    # Interleaved devices, and bursts of one device longer than a window, across the warm-up boundary.
    items = [("devices/pump-0001", a.next().fields) for _ in range(5)]
    items += [(f"devices/pump-000{1 + i % 2}", (a if i % 2 == 0 else b).next().fields) for i in range(200)]
    items += [("devices/pump-0002", b.next().fields) for _ in range(2 * WINDOW + 7)]
    in_batches: list[Verdict] = []
    for start in range(0, len(items), 150):
        in_batches.extend(batched.score(items[start:start + 150]))
    one_by_one = [single.score([item])[0] for item in items]
    assert [v.label for v in in_batches] == [v.label for v in one_by_one]
    assert [v.flagged for v in in_batches] == [v.flagged for v in one_by_one]
    np.testing.assert_allclose([v.score for v in in_batches], [v.score for v in one_by_one], atol=1e-6)


def test_the_detector_computes_the_features_the_training_script_computed(detector):
    """Ring windows cut on the hot path equal the windows `series_features` slides over a recorded series."""
    signal = DeviceSignal("pump-0003", 2, "water", anomaly_rate=0.05)
    values = np.array([signal.next().fields["flow_lpm"] for _ in range(150)])
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    for start in range(0, len(values), 13):
        detector.score([("devices/pump-0003", {"flow_lpm": float(x)}) for x in values[start:start + 13]])
    np.testing.assert_array_equal(np.concatenate(recorder.feeds), series_features(values))


def test_the_series_cap_evicts_the_least_recently_updated_series():
    detector = AnomalyDetector(MODEL, max_series=8)
    for i in range(5):
        detector.score([(f"devices/d{i}", {"a": 1.0, "b": 2.0})])
    assert detector.tracked == 8
    assert detector.evicted == 2  # d0's two fields went first
    # d0 is back with no history: warming again; d4 kept its single value and is warming too, but stays tracked.
    v = detector.score([("devices/d0", {"a": 1.0})])[0]
    assert v.label == "warming"
    assert detector.tracked == 8


def test_a_device_inventing_field_names_cannot_grow_the_cache():
    detector = AnomalyDetector(MODEL, max_series=100)
    honest = DeviceSignal("pump-0001", 1, "water")
    for i in range(50):
        hostile = {f"f{i}_{j}": float(j) for j in range(40)}
        verdicts = detector.score([("devices/evil", hostile), ("devices/pump-0001", honest.next().fields)])
        assert len(verdicts) == 2
    assert verdicts[1].label != "warming"  # the honest device kept its history throughout
    assert detector.tracked == 100
    assert detector.evicted == 50 * 40 + 3 - 100


def test_values_that_are_not_finite_numbers_are_skipped_without_crashing(detector):
    signal = DeviceSignal("pump-0001", 1, "water")
    stream(detector, signal, 30)
    tracked = detector.tracked
    odd: dict[str, Any] = {"flow_lpm": math.nan, "line_pressure_bar": math.inf, "water_temp_c": "warm",
                           "extra": None, "neg": -math.inf}
    verdicts = detector.score([("devices/pump-0001", odd), ("devices/pump-0001", signal.next().fields)])
    assert verdicts[0] == Verdict("sensor-anomaly", "1.1.1", 0.0, "normal", False)
    assert verdicts[1].label != "warming"
    assert detector.tracked == tracked
    # Huge but finite values reach the model as bounded features instead of NaNs.
    huge = detector.score([("devices/pump-0001", {"flow_lpm": 1.7e308, "line_pressure_bar": -1.7e308})])[0]
    assert 0.0 <= huge.score <= 1.0


def test_an_empty_batch_runs_nothing(detector):
    recorder = RecordingSession(detector.session)
    detector.session = recorder
    assert detector.score([]) == []
    assert recorder.runs == 0


def test_a_model_trained_on_other_features_is_refused(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = onnx.load(str(MODEL))
    props = {p.key: p.value for p in model.metadata_props}
    props["features"] = ",".join(reversed(FEATURE_NAMES))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelMetadataError, match="retrain"):
        AnomalyDetector(path)


def test_window_features_ignore_the_unit_and_the_level_apart_from_zero():
    """Rescaling a series changes no feature, shifting it only those about exact zeros: that transfers to new fields."""
    rng = np.random.default_rng(0)
    shape = 20.0 + np.cumsum(rng.normal(size=WINDOW)) + rng.normal(size=WINDOW)
    shape[-1] += 9.0
    base = window_features(shape[None, :])[0]
    scaled = window_features(40.0 * shape[None, :])[0]
    shifted = window_features(330.0 + shape[None, :])[0]
    np.testing.assert_allclose(scaled, base, rtol=1e-4, atol=1e-4)
    level_free = [i for i, name in enumerate(FEATURE_NAMES) if "zero" not in name]
    np.testing.assert_allclose(shifted[level_free], base[level_free], rtol=1e-4, atol=1e-4)
    assert shifted[FEATURE_NAMES.index("zero_distance")] > base[FEATURE_NAMES.index("zero_distance")]


def test_every_anomaly_type_is_a_model_class(detector):
    assert set(detector.classes) == {"normal", *ANOMALY_TYPES}


def test_the_features_are_the_ones_the_committed_model_was_trained_on():
    """tests/data/anomaly_features.npz holds windows of every kind (noisy, quantised, stuck, dropped out, drifting,
    spiking; lengths 12 to 48) with their features as computed when the committed model was trained. A faster
    rewrite of the features must reproduce them; a change in meaning must come with a retrained model and a new
    file. (Compared to float32 rounding, not bit for bit: libm's log1p may differ in the last bit elsewhere.)"""
    golden = np.load(Path(__file__).resolve().parents[1] / "data" / "anomaly_features.npz")
    lengths = sorted(int(k.split("_")[1]) for k in golden.files if k.startswith("windows_"))
    assert lengths[0] == MIN_HISTORY and lengths[-1] == WINDOW
    for n in lengths:
        np.testing.assert_allclose(window_features(golden[f"windows_{n}"]), golden[f"features_{n}"], rtol=1e-6,
                                   atol=1e-6, err_msg=f"windows of length {n}")
