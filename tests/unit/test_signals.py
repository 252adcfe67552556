"""The simulator's signal generator: deterministic, realistic enough to train on, and honest about its labels."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devices.telemetry import MIN_TS_MS, Telemetry, decode
from firmware_sim.signals import (
    ANOMALY_TYPES,
    DROPOUT_VALUE,
    EPISODE_LENGTH,
    KINDS,
    NORMAL,
    DeviceSignal,
    Reading,
    telemetry_payload,
)


def readings(signal: DeviceSignal, n: int) -> list[Reading]:
    return [signal.next() for _ in range(n)]


def label_runs(rs: list[Reading], field: str) -> list[tuple[str, int, int]]:
    """(type, first index, length) of every run of one non-normal label on `field`."""
    runs: list[tuple[str, int, int]] = []
    for i, r in enumerate(rs):
        label = r.labels[field]
        if label == NORMAL:
            continue
        if runs and runs[-1][0] == label and runs[-1][1] + runs[-1][2] == i:
            runs[-1] = (label, runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((label, i, 1))
    return runs


def test_the_same_seed_and_device_replay_the_same_readings():
    a = readings(DeviceSignal("dev-0001", 42, "env", 0, 1000, anomaly_rate=0.05), 2000)
    b = readings(DeviceSignal("dev-0001", 42, "env", 0, 1000, anomaly_rate=0.05), 2000)
    assert a == b
    assert any(r.anomalous for r in a)


def test_devices_of_one_fleet_and_fleets_of_one_device_differ():
    base = readings(DeviceSignal("dev-0001", 42, "env"), 50)
    other_device = readings(DeviceSignal("dev-0002", 42, "env"), 50)
    other_seed = readings(DeviceSignal("dev-0001", 43, "env"), 50)
    assert [r.fields for r in base] != [r.fields for r in other_device]
    assert [r.fields for r in base] != [r.fields for r in other_seed]


def test_seq_counts_from_one_and_ts_follows_the_interval():
    rs = readings(DeviceSignal("dev-0001", 1, "machine", start_ms=1_700_000_000_000, interval_ms=2.5), 5)
    assert [r.seq for r in rs] == [1, 2, 3, 4, 5]
    assert [r.ts_ms - 1_700_000_000_000 for r in rs] == [0, 2, 5, 8, 10]  # round((seq - 1) * 2.5), half to even


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_reading_has_every_field_of_its_kind_and_a_label_for_each(kind):
    names = [s.name for s in KINDS[kind]]
    for r in readings(DeviceSignal("d", 3, kind, anomaly_rate=0.1), 500):
        assert list(r.fields) == names
        assert list(r.labels) == names
        assert set(r.labels.values()) <= {NORMAL, *ANOMALY_TYPES}


def test_a_day_is_warmer_in_the_afternoon_and_humidity_moves_against_temperature():
    # 10-minute samples over two simulated days, starting at midnight.
    rs = readings(DeviceSignal("dev-0001", 5, "env", start_ms=0, interval_ms=600_000), 288)
    hour = [(r.ts_ms // 3_600_000) % 24 for r in rs]
    temp = [r.fields["temperature"] for r in rs]
    hum = [r.fields["humidity"] for r in rs]
    afternoon = statistics.mean(t for t, h in zip(temp, hour) if 13 <= h <= 17)
    night = statistics.mean(t for t, h in zip(temp, hour) if 1 <= h <= 5)
    assert afternoon - night > 3.0  # the cycle's amplitude is 3 °C: peak to trough is 6
    assert statistics.correlation(temp, hum) < -0.8


def test_readings_labelled_normal_are_exactly_the_clean_signal():
    """Anomalies draw from their own random stream: they change labelled samples and nothing else."""
    clean = readings(DeviceSignal("dev-0009", 11, "env", anomaly_rate=0.0), 3000)
    dirty = readings(DeviceSignal("dev-0009", 11, "env", anomaly_rate=0.05), 3000)
    changed = {"spike": 0, "dropout": 0, "stuck": 0}
    seen = {"spike": 0, "dropout": 0, "stuck": 0}
    for c, d in zip(clean, dirty):
        for name, label in d.labels.items():
            if label == NORMAL:
                assert d.fields[name] == c.fields[name]
            elif label in changed:
                seen[label] += 1
                changed[label] += d.fields[name] != c.fields[name]
    assert all(seen.values())
    assert changed["spike"] == seen["spike"]
    assert changed["dropout"] == seen["dropout"]
    assert changed["stuck"] > 0.9 * seen["stuck"]  # a stuck value can equal the clean one by chance


def test_injected_spike_stuck_and_dropout_look_like_their_names():
    sig = DeviceSignal("dev-0003", 8, "env", interval_ms=1000)
    twin = DeviceSignal("dev-0003", 8, "env", interval_ms=1000)
    readings(sig, 100), readings(twin, 100)
    sigma = sig.sigma("pressure")

    sig.inject("pressure", "spike", length=2, magnitude=12.0)
    for s, c in zip(readings(sig, 2), readings(twin, 2)):
        assert s.labels == {"temperature": NORMAL, "humidity": NORMAL, "pressure": "spike", "battery": NORMAL}
        assert s.fields["pressure"] - c.fields["pressure"] == pytest.approx(12.0 * sigma, abs=0.1)  # 0.1: resolution

    readings(sig, 20), readings(twin, 20)
    last = sig.next().fields["humidity"]
    twin.next()
    sig.inject("humidity", "stuck", length=15)
    stuck = readings(sig, 16)
    readings(twin, 16)
    assert [r.labels["humidity"] for r in stuck] == ["stuck"] * 15 + [NORMAL]
    assert [r.fields["humidity"] for r in stuck[:15]] == [last] * 15
    assert stuck[15].fields["humidity"] != last

    sig.inject("temperature", "dropout", length=4)
    dropped = readings(sig, 5)
    assert [r.fields["temperature"] for r in dropped[:4]] == [DROPOUT_VALUE] * 4
    assert [r.labels["temperature"] for r in dropped] == ["dropout"] * 4 + [NORMAL]
    assert dropped[4].fields["temperature"] != DROPOUT_VALUE


def test_an_injected_drift_ramps_away_and_eases_back():
    sig = DeviceSignal("dev-0004", 9, "water", interval_ms=1000)
    twin = DeviceSignal("dev-0004", 9, "water", interval_ms=1000)
    readings(sig, 50), readings(twin, 50)
    sig.inject("flow_lpm", "drift", length=40, magnitude=20.0)
    offsets = [s.fields["flow_lpm"] - c.fields["flow_lpm"] for s, c in zip(readings(sig, 41), readings(twin, 41))]
    sigma = sig.sigma("flow_lpm")
    assert offsets[40] == 0.0  # over
    peak = max(range(40), key=lambda i: offsets[i])
    assert peak == 29  # three quarters in
    assert offsets[peak] == pytest.approx(20.0 * sigma, abs=0.1)
    assert all(a <= b + 0.1 for a, b in zip(offsets[:29], offsets[1:30]))
    assert all(a >= b - 0.1 for a, b in zip(offsets[29:39], offsets[30:40]))


def test_an_injected_noise_burst_is_much_noisier_than_the_sensor():
    sig = DeviceSignal("dev-0005", 10, "machine", interval_ms=1000)
    twin = DeviceSignal("dev-0005", 10, "machine", interval_ms=1000)
    readings(sig, 50), readings(twin, 50)
    sig.inject("current_a", "noise", length=30, magnitude=8.0)
    extra = [s.fields["current_a"] - c.fields["current_a"] for s, c in zip(readings(sig, 30), readings(twin, 30))]
    assert statistics.pstdev(extra) > 4.0 * sig.sigma("current_a")


def test_each_anomaly_type_starts_at_the_configured_rate_and_is_labelled_as_injected():
    rate, n = 0.02, 40_000
    sig = DeviceSignal("dev-0007", 21, "env", anomaly_rate=rate)
    rs = readings(sig, n)
    from_labels = {t: 0 for t in ANOMALY_TYPES}
    too_long = 0
    for name in sig.field_names:
        for label, first, length in label_runs(rs, name):
            from_labels[label] += 1
            lo, hi = EPISODE_LENGTH[label]
            if first + length < n:  # the last episode may still be running
                assert lo <= length
            # Back-to-back episodes of one type on one field merge into one run: possible, but rare.
            too_long += length > hi
    assert too_long <= 2
    expected = rate * n / len(ANOMALY_TYPES)  # 160 per type; binomial sd ~ 12.6
    for t in ANOMALY_TYPES:
        assert abs(sig.injected[t] - expected) < 0.25 * expected, (t, sig.injected[t])
        assert sig.injected[t] - 2 <= from_labels[t] <= sig.injected[t], (t, from_labels[t], sig.injected[t])


def test_an_anomaly_rate_of_zero_never_injects():
    sig = DeviceSignal("dev-0008", 1, "machine", anomaly_rate=0.0)
    assert not any(r.anomalous for r in readings(sig, 5000))
    assert sum(sig.injected.values()) == 0


def test_bad_arguments_are_refused_with_the_bad_value_named():
    with pytest.raises(ValueError, match="unknown device kind 'fridge'"):
        DeviceSignal("d", 1, "fridge")
    with pytest.raises(ValueError, match="anomaly_rate"):
        DeviceSignal("d", 1, anomaly_rate=1.5)
    sig = DeviceSignal("d", 1, "env")
    with pytest.raises(ValueError, match="no field 'flow_lpm'"):
        sig.inject("flow_lpm", "spike")
    with pytest.raises(ValueError, match="unknown anomaly type 'glitch'"):
        sig.inject("temperature", "glitch")


def _no_constants(token: str) -> float:
    raise AssertionError(f"payload contains the non-JSON constant {token}")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32), kind=st.sampled_from(sorted(KINDS)), rate=st.floats(0.0, 0.5),
       start=st.integers(MIN_TS_MS, 4_000_000_000_000))
def test_the_payload_is_valid_json_that_the_gateway_accepts(seed, kind, rate, start):
    sig = DeviceSignal("dev-0001", seed, kind, start_ms=start, interval_ms=1000, anomaly_rate=rate)
    for r in readings(sig, 60):
        payload = telemetry_payload(r)
        doc = json.loads(payload, parse_constant=_no_constants)
        assert doc.pop("seq") == r.seq
        assert doc.pop("ts") == r.ts_ms
        assert doc == r.fields
        assert all(isinstance(v, float) and math.isfinite(v) for v in doc.values())
        assert decode(payload) == Telemetry(r.seq, r.ts_ms, r.fields)


def test_the_default_clock_gives_timestamps_the_gateway_accepts():
    r = DeviceSignal("dev-0001", 1).next()
    assert decode(telemetry_payload(r)).ts_ms == r.ts_ms >= MIN_TS_MS


def test_the_payload_is_compact_and_keeps_the_sensor_resolution():
    r = Reading("dev-0001", 7, 1_700_000_000_123, {"temperature": 21.37, "pressure": 1013.2}, {})
    assert telemetry_payload(r) == b'{"seq":7,"ts":1700000000123,"temperature":21.37,"pressure":1013.2}'


def test_a_field_named_like_a_payload_key_is_refused():
    with pytest.raises(ValueError, match="'seq'"):
        telemetry_payload(Reading("d", 1, 0, {"seq": 1.0}, {}))
