"""`gateway replay`: a log written with the real LogStore, verdicts given at the time by the real committed models,
rescored through the command line with those models and with copies whose metadata differs in a known way."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from firmware_sim.signals import DeviceSignal
from gateway.cli import main
from gateway.config import Config
from gateway.event import Event, Verdict, compact_json
from gateway.filters.anomaly import AnomalyDetector
from gateway.filters.anomaly_features import WARMUP
from gateway.filters.content import ContentClassifier
from gateway.log.store import LogStore
from gateway.ops import replay as rp

REPO = Path(__file__).resolve().parents[2]
ANOMALY = REPO / "models" / "anomaly" / "anomaly.onnx"
CONTENT = REPO / "models" / "content" / "content.onnx"

START_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z: long before any test runs, so `--since 1d` selects nothing
DEVICES = [f"dev-{i}" for i in range(6)]
READINGS = 300  # per device, one a second
TEXTS = [
    "The weather is lovely today, we are going for a walk in the park.",
    "shut up you fucking moron",
    "Thanks for the update, the sensor readings look normal again.",
    "what a dumb post, nobody cares about your crap",
    "you are a worthless stupid idiot and everyone hates you",
    "Could you send me the meeting notes before tomorrow afternoon?",
    "this is a stupid idea",
    "go kill yourself you piece of shit",
    "I hate mondays",
    "The quarterly report shows energy use down by twelve percent.",
]
AUTHORS = ["alice", "bob", "carol"]


def event(offset: int, source: str, kind: str, ts_ms: int, payload: dict, verdict: Verdict | None) -> Event:
    return Event(offset, f"{offset:028x}", source, kind, ts_ms, payload, compact_json(payload), verdict,
                 verdict.to_json() if verdict else b"")


def write_log(path: Path) -> None:
    """Interleaved telemetry of DEVICES (with anomalies) and posts, scored as the daemon scores them: readings in
    arrival order through one detector, a batch per append; plus interactions, which no model scores."""
    store = LogStore(path, fsync="off")
    detector = AnomalyDetector(ANOMALY)
    classifier = ContentClassifier(CONTENT)
    signals = [DeviceSignal(d, 3, "env", start_ms=START_MS, anomaly_rate=0.01) for d in DEVICES]
    offset = 0
    for step in range(0, READINGS, 10):
        readings = [s.next() for _ in range(10) for s in signals]
        verdicts = detector.score([(f"devices/{r.device_id}", r.fields, r.ts_ms) for r in readings])
        batch = []
        for r, v in zip(readings, verdicts):
            offset += 1
            batch.append(event(offset, f"devices/{r.device_id}", "telemetry", r.ts_ms,
                               {"seq": r.seq, "ts": r.ts_ms, **r.fields}, v))
        text = TEXTS[step // 10 % len(TEXTS)]
        (v,) = classifier.score([text])
        offset += 1
        batch.append(event(offset, f"users/{AUTHORS[step // 10 % 3]}", "post", readings[-1].ts_ms, {"text": text}, v))
        offset += 1
        batch.append(event(offset, "users/alice", "interaction", readings[-1].ts_ms,
                           {"like": f"{offset - 1:028x}"}, None))
        store.append(batch, [None] * len(batch))
    store.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("replay")
    write_log(d / "log.db")
    return d


@pytest.fixture(scope="module")
def stored(data_dir: Path) -> list[Event]:
    store = LogStore(data_dir / "log.db", reader=True)
    events = store.read(0, 1_000_000)
    store.close()
    return events


def with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    """A copy of the model at `src` whose metadata entries are changed (None: removed)."""
    model = onnx.load(str(src))
    props = {p.key: p.value for p in model.metadata_props}
    for key, value in changes.items():
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(dst))
    return dst


def replay(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["replay", *map(str, args)])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def replay_json(*args: str | Path) -> dict:
    code, out = replay(*args, "--json")
    assert code == 0, out
    return json.loads(out)


def of_kind(events: list[Event], kind: str) -> list[Event]:
    return [e for e in events if e.kind == kind]


# --- the same model finds what was found at the time ---------------------------------------------------------------


def test_the_same_anomaly_model_over_the_whole_log_gives_every_verdict_it_gave_at_the_time(data_dir, stored):
    readings = of_kind(stored, "telemetry")
    flagged = sum(e.verdict.flagged for e in readings)
    starts = sum(bool(e.verdict.detail and e.verdict.detail.get("episode") == "start") for e in readings)
    assert flagged > 20 and starts > 2  # the log has anomalies to agree on

    report = replay_json("--model", ANOMALY, "--data-dir", data_dir)
    assert report["kind"] == "telemetry"
    assert report["model"]["name"] == "sensor-anomaly" and report["model"]["threshold_from"] == "model"
    assert report["totals"] == {"events": len(readings), "flagged_then": flagged, "flagged_now": flagged,
                                "both": flagged, "only_then": 0, "only_now": 0, "no_verdict_then": 0,
                                "no_verdict_now": 0, "label_changed": 0, "warming_now": len(DEVICES) * WARMUP,
                                "warming_flagged_then": 0}
    assert report["episode_starts"] == {"flagged_then": starts, "flagged_now": starts, "both": starts,
                                        "only_then": 0, "only_now": 0}
    assert report["models_then"] == {f"sensor-anomaly {AnomalyDetector(ANOMALY).version}": len(readings)}
    assert report["sources"] == len(DEVICES) and report["sources_differing"] == 0 and report["top"] == []


def test_the_same_content_model_finds_no_difference(data_dir, stored):
    posts = of_kind(stored, "post")
    flagged = sum(e.verdict.flagged for e in posts)
    assert 0 < flagged < len(posts)

    report = replay_json("--model", CONTENT, "--data-dir", data_dir)
    assert report["kind"] == "post"
    assert report["totals"]["events"] == len(posts)
    assert (report["totals"]["flagged_then"], report["totals"]["flagged_now"]) == (flagged, flagged)
    assert report["totals"]["only_then"] == report["totals"]["only_now"] == report["totals"]["label_changed"] == 0
    assert report["sources"] == len(AUTHORS)
    assert "episode_starts" not in report and "warming_now" not in report["totals"]


# --- a changed model: the differences are the ones its change predicts -------------------------------------------


def test_a_lower_anomaly_threshold_also_flags_exactly_the_readings_that_scored_between_the_two(data_dir, stored,
                                                                                               tmp_path):
    model = with_metadata(ANOMALY, tmp_path / "lower.onnx", threshold="0.5", version="2.0.0-lower")
    readings = of_kind(stored, "telemetry")
    between = [e for e in readings if 0.5 <= e.verdict.score and not e.verdict.flagged]
    assert between  # else the test could not fail

    report = replay_json("--model", model, "--data-dir", data_dir, "--top", "3")
    t = report["totals"]
    assert report["model"]["version"] == "2.0.0-lower" and report["model"]["threshold"] == 0.5
    assert (t["only_then"], t["only_now"]) == (0, len(between))
    assert t["flagged_now"] == t["flagged_then"] + len(between)
    per_device = {d: sum(e.source == f"devices/{d}" for e in between) for d in DEVICES}
    expected = sorted(((-n, f"devices/{d}") for d, n in per_device.items() if n))[:3]
    assert [(-x["only_now"], x["source"]) for x in report["top"]] == expected
    assert report["sources_differing"] == sum(1 for n in per_device.values() if n)


def test_the_configured_threshold_applies_to_the_new_model_as_in_the_daemon(data_dir, stored, tmp_path):
    config = tmp_path / "gateway.toml"
    config.write_text(f'[storage]\ndata_dir = "{data_dir}"\n[anomaly]\nthreshold = 0.5\n')
    between = [e for e in of_kind(stored, "telemetry") if 0.5 <= e.verdict.score and not e.verdict.flagged]

    report = replay_json("--model", ANOMALY, "--config", config)
    assert report["model"]["threshold"] == 0.5
    assert report["model"]["threshold_from"] == "config anomaly.threshold"
    assert report["totals"]["only_now"] == len(between) and report["totals"]["only_then"] == 0


@pytest.mark.parametrize("direction", ["down", "up"])
def test_content_thresholds_moved_flag_exactly_the_posts_between_old_and_new(data_dir, stored, tmp_path, direction):
    posts = of_kind(stored, "post")
    mark = ContentClassifier(CONTENT).mark_threshold
    below = sorted({e.verdict.score for e in posts if e.verdict.score < mark})
    above = sorted({e.verdict.score for e in posts if e.verdict.score >= mark})
    assert len(below) >= 2 and len(above) >= 2  # the log has posts on both sides, at several scores
    # New thresholds halfway between two stored scores: stored scores are rounded, and a threshold on one of them
    # would leave the posts at it to the rounding.
    if direction == "down":  # the clean posts above the lowest one are flagged by the new model only
        new_mark = (below[0] + below[1]) / 2
        changes = {"mark_threshold": repr(new_mark)}
    else:  # the flagged posts at the lowest flagged score were flagged at the time only
        new_mark = (above[0] + above[1]) / 2
        changes = {"mark_threshold": repr(new_mark),
                   "block_threshold": repr(max(new_mark, ContentClassifier(CONTENT).block_threshold))}
    model = with_metadata(CONTENT, tmp_path / "moved.onnx", **changes)
    now_flagged = [e for e in posts if e.verdict.score >= new_mark]
    only_now = [e for e in now_flagged if not e.verdict.flagged]
    only_then = [e for e in posts if e.verdict.flagged and e.verdict.score < new_mark]
    assert only_now or only_then

    t = replay_json("--model", model, "--data-dir", data_dir)["totals"]
    assert (t["only_then"], t["only_now"]) == (len(only_then), len(only_now))
    assert t["label_changed"] >= len(only_then) + len(only_now)


# --- which events ----------------------------------------------------------------------------------------------


def test_since_an_iso_time_rescores_the_readings_from_then_on_and_each_series_warms_up_again(data_dir, stored):
    since_ms = START_MS + 200_000
    expected = [e for e in of_kind(stored, "telemetry") if e.ts_ms >= since_ms]
    assert 0 < len(expected) < len(of_kind(stored, "telemetry"))

    warming = [e for d in DEVICES for e in [x for x in expected if x.source == f"devices/{d}"][:WARMUP]]
    assert any(e.verdict.flagged for e in warming)  # at the time they had history, and some were anomalous

    report = replay_json("--model", ANOMALY, "--data-dir", data_dir, "--since", "2025-01-01T00:03:20Z")
    assert report["since_ms"] == since_ms
    assert report["totals"]["events"] == len(expected)
    assert report["totals"]["warming_now"] == len(warming) == len(DEVICES) * WARMUP
    assert report["totals"]["warming_flagged_then"] == sum(e.verdict.flagged for e in warming)
    assert report["totals"]["only_then"] >= report["totals"]["warming_flagged_then"]


def test_the_text_report_states_totals_warm_up_and_the_devices_that_differ_most(data_dir, tmp_path):
    model = with_metadata(ANOMALY, tmp_path / "lower.onnx", threshold="0.5")
    report = replay_json("--model", model, "--data-dir", data_dir, "--top", "2")
    code, out = replay("--model", model, "--data-dir", data_dir, "--top", "2")
    assert code == 0, out
    t = report["totals"]
    assert (f"flagged     then {t['flagged_then']}, now {t['flagged_now']}: both {t['both']}, only then 0, "
            f"only now {t['only_now']}") in out
    assert f"warm-up     {len(DEVICES) * WARMUP} readings warming now" in out
    assert f"most different (2 of the {report['sources_differing']} of {len(DEVICES)} sources that differ)" in out
    first = report["top"][0]
    assert any(line.split() == [first["source"], str(first["events"]), str(first["flagged_then"]),
                                str(first["flagged_now"]), str(first["both"]), "0", str(first["only_now"])]
               for line in out.splitlines())
    assert "readings/s" in out


def test_a_post_without_a_verdict_at_the_time_counts_as_unflagged_then(tmp_path):
    store = LogStore(tmp_path / "log.db", fsync="off")
    store.append([event(1, "users/alice", "post", START_MS, {"text": "shut up you fucking moron"}, None)], [None])
    store.close()
    t = replay_json("--model", CONTENT, "--data-dir", tmp_path)["totals"]
    assert (t["events"], t["no_verdict_then"], t["only_now"], t["label_changed"]) == (1, 1, 1, 0)


def test_the_verdicts_do_not_depend_on_how_the_log_is_read_in_batches(data_dir):
    model = rp.load_model(ANOMALY, Config())
    db = rp.open_log(data_dir / "log.db")
    steps: list[int] = []
    small = rp.replay(db, model, batch=7, progress=steps.append).as_dict(top=100)
    large = rp.replay(db, rp.load_model(ANOMALY, Config()), batch=100_000).as_dict(top=100)
    db.close()
    for report in (small, large):
        del report["seconds"], report["events_per_second"]
    assert small == large
    assert sum(steps) == small["offsets"][1] - small["offsets"][0] + 1 and len(steps) > 100


@pytest.mark.parametrize(("text", "expected_ms"), [
    ("30m", 10_000_000 - 1_800_000),
    ("2h", 10_000_000 - 7_200_000),
    ("90s", 10_000_000 - 90_000),
    ("7d", 1_000_000_000 - 7 * 86_400_000),
    ("2025-01-01T00:00:00Z", START_MS),
    ("2025-01-01T01:00:00+01:00", START_MS),
])
def test_since_takes_an_age_or_an_iso_time(text, expected_ms):
    now = 1_000_000_000 if text == "7d" else 10_000_000
    assert rp.parse_since(text, now) == expected_ms


def test_since_an_iso_time_without_a_zone_is_local_time():
    from datetime import datetime

    assert rp.parse_since("2025-06-01T12:00", 0) == int(datetime(2025, 6, 1, 12).timestamp() * 1000)


# --- beside the running daemon -----------------------------------------------------------------------------------


def test_replay_reads_while_the_writer_holds_its_lock_and_sees_only_what_is_committed(tmp_path, data_dir, stored):
    shutil.copy(data_dir / "log.db", tmp_path / "log.db")
    writer = LogStore(tmp_path / "log.db", fsync="full")
    db = writer.connection
    db.execute("BEGIN IMMEDIATE")  # what the appender holds during a commit
    db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?, NULL, ?, NULL, 0)",
               (10**6, "x" * 28, "devices/late", "telemetry", START_MS, b'{"t":1}'))
    try:
        report = replay_json("--model", ANOMALY, "--data-dir", tmp_path)
        assert report["totals"]["events"] == len(of_kind(stored, "telemetry"))
        assert report["offsets"][1] == stored[-1].offset
    finally:
        db.execute("COMMIT")  # the writer was never blocked from committing
    writer.append([event(10**6 + 1, "devices/late", "telemetry", START_MS, {"t": 2}, None)], [None])
    writer.close()


def test_replay_runs_while_the_writer_keeps_appending_and_leaves_out_what_came_after_it_started(tmp_path, data_dir,
                                                                                                stored):
    import threading

    shutil.copy(data_dir / "log.db", tmp_path / "log.db")
    writer = LogStore(tmp_path / "log.db", fsync="full")
    stop = threading.Event()
    appended = [0]

    def keep_appending() -> None:
        offset = stored[-1].offset
        while not stop.is_set():
            batch = [event(offset + i, "devices/late", "telemetry", START_MS, {"t": float(i)}, None)
                     for i in range(1, 51)]
            writer.append(batch, [None] * len(batch))  # raises if replay ever held the write lock past 1 s
            offset += 50
            appended[0] += 1
            stop.wait(0.005)  # a daemon commits in bursts, not in a tight loop

    thread = threading.Thread(target=keep_appending)
    thread.start()
    try:
        report = replay_json("--model", ANOMALY, "--data-dir", tmp_path)
    finally:
        stop.set()
        thread.join()
        writer.close()
    assert appended[0] > 0
    assert report["offsets"][1] >= stored[-1].offset
    assert report["totals"]["events"] == len(of_kind(stored, "telemetry")) + report["offsets"][1] - stored[-1].offset
    assert report["totals"]["only_then"] == 0  # the readings it had at the start, same verdicts


def test_replay_changes_nothing_in_the_log(tmp_path, data_dir):
    shutil.copy(data_dir / "log.db", tmp_path / "log.db")
    before = hashlib.sha256((tmp_path / "log.db").read_bytes()).hexdigest()
    assert replay("--model", ANOMALY, "--data-dir", tmp_path)[0] == 0
    assert hashlib.sha256((tmp_path / "log.db").read_bytes()).hexdigest() == before
    wal = tmp_path / "log.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the log to another user")
def test_replay_as_another_user_than_the_logs_owner_refuses_rather_than_lock_the_daemon_out(tmp_path, data_dir):
    shutil.copy(data_dir / "log.db", tmp_path / "log.db")
    os.chown(tmp_path / "log.db", 4242, 4242)
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1
    assert "belongs to uid 4242: run this as that user" in out
    assert not (tmp_path / "log.db-shm").exists()


# --- errors: a message, a non-zero status, no traceback ----------------------------------------------------------


def test_no_log_in_the_data_folder(tmp_path):
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1
    assert f"no log at {tmp_path / 'log.db'}" in out
    assert not (tmp_path / "log.db").exists()


def test_a_file_that_is_not_a_log(tmp_path):
    (tmp_path / "log.db").write_bytes(b"not a database at all" * 100)
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1 and "is not a gateway log" in out


def test_a_log_of_a_newer_gateway(tmp_path, data_dir):
    shutil.copy(data_dir / "log.db", tmp_path / "log.db")
    with sqlite3.connect(tmp_path / "log.db") as db:
        db.execute("PRAGMA user_version=99")
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1 and "written by a newer gateway" in out


def test_a_log_of_the_earlier_layout_is_left_for_the_gateway_to_convert(tmp_path):
    from tests.unit.test_log_store import write_v1_log

    write_v1_log(tmp_path / "log.db")
    before = (tmp_path / "log.db").read_bytes()
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1 and "start the gateway once to convert it" in out
    assert (tmp_path / "log.db").read_bytes() == before


def test_an_empty_log(tmp_path):
    LogStore(tmp_path / "log.db").close()
    code, out = replay("--model", ANOMALY, "--data-dir", tmp_path)
    assert code == 1 and "the log holds no events" in out


def test_a_range_with_no_events(data_dir):
    code, out = replay("--model", ANOMALY, "--data-dir", data_dir, "--since", "1d")
    assert code == 1 and "the log holds no telemetry readings since 20" in out


def test_a_model_for_a_kind_the_log_does_not_hold(tmp_path):
    store = LogStore(tmp_path / "log.db", fsync="off")
    store.append([event(1, "devices/d", "telemetry", START_MS, {"t": 1.0}, None)], [None])
    store.close()
    code, out = replay("--model", CONTENT, "--data-dir", tmp_path)
    assert code == 1 and "the log holds no posts, which is what this model scores" in out


def test_a_model_file_that_does_not_exist(data_dir, tmp_path):
    code, out = replay("--model", tmp_path / "nope.onnx", "--data-dir", data_dir)
    assert code == 1 and f"{tmp_path / 'nope.onnx'}: no such model file" in out


def test_a_model_file_that_does_not_load(data_dir, tmp_path):
    (tmp_path / "junk.onnx").write_bytes(os.urandom(2000))
    code, out = replay("--model", tmp_path / "junk.onnx", "--data-dir", data_dir)
    assert code == 1 and "onnxruntime cannot load it" in out


def test_a_model_that_is_neither_kind(data_dir, tmp_path):
    model = with_metadata(ANOMALY, tmp_path / "bare.onnx", features=None)
    code, out = replay("--model", model, "--data-dir", data_dir)
    assert code == 1 and "neither an anomaly model nor a content model" in out


def test_an_anomaly_model_trained_on_other_features(data_dir, tmp_path):
    model = with_metadata(ANOMALY, tmp_path / "other.onnx", features="a,b,c")
    code, out = replay("--model", model, "--data-dir", data_dir)
    assert code == 1 and "trained on features ['a', 'b', 'c']" in out


def test_a_since_that_is_not_a_time(data_dir):
    code, out = replay("--model", ANOMALY, "--data-dir", data_dir, "--since", "yesterday")
    assert code == 2 and "'yesterday' is neither an age (30m, 2h, 7d) nor an ISO-8601 time" in out


def test_a_config_that_does_not_parse(tmp_path):
    (tmp_path / "gateway.toml").write_text("[anomaly]\nthreshold = 7\n")
    code, out = replay("--model", ANOMALY, "--config", tmp_path / "gateway.toml")
    assert code == 2 and "anomaly.threshold = 7" in out


def test_replay_leaves_alone_the_fields_the_profiles_leave_alone(tmp_path):
    """Rescoring must see a reading as the daemon did: a state its device's profile keeps from the anomaly model
    (here a fan's speed, sent as words) is not scored now either."""
    from devices.profiles import ProfileIndex, load_dir
    from gateway.event import KIND_TELEMETRY, Ingested
    from gateway.filters.stage import Filters
    from gateway.ops.metrics import Metrics

    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "fan.toml").write_text('name = "fan"\nmatch = ["fan-*"]\n[fields.temperature]\n'
                                       '[fields.speed]\nvalues = { OFF = 0, LOW = 1, HIGH = 2 }\n')
    config = tmp_path / "gateway.toml"
    config.write_text(f'profiles_dir = "{profiles}"\n')
    filters = Filters(AnomalyDetector(ANOMALY), None, Metrics(), ProfileIndex(load_dir(profiles)))
    store = LogStore(tmp_path / "log.db", fsync="off")
    speed, rng, offset = 0.0, __import__("random").Random(4), 0
    for step in range(0, 1200, 10):
        records = []
        for i in range(step, step + 10):
            speed = rng.choice([s for s in (0.0, 1.0, 2.0) if s != speed]) if rng.random() < 0.02 else speed
            records.append(Ingested("devices/fan-1", KIND_TELEMETRY, START_MS + i * 60_000,
                                    {"temperature": 21.0 + rng.gauss(0, 0.1), "speed": speed}, b""))
        batch = []
        for r, v in zip(records, filters.score(records)):
            offset += 1
            batch.append(event(offset, r.source, r.kind, r.ts_ms, r.payload, v))
        store.append(batch, [None] * len(batch))
    store.close()

    same = replay_json("--model", ANOMALY, "--data-dir", tmp_path, "--config", config)["totals"]
    assert same["only_now"] == 0 and same["only_then"] == 0
    blind = replay_json("--model", ANOMALY, "--data-dir", tmp_path)["totals"]  # the shipped profiles: no fan
    assert blind["only_now"] > 50, "without the profile the held speed looks stuck: the test can tell"


def test_a_profile_that_cannot_be_read_stops_an_anomaly_replay_with_the_reason(tmp_path, data_dir):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "broken.toml").write_text('name = "broken"\nmatch = ["x-*"]\n[fields.a]\nanomaly = "no"\n')
    config = tmp_path / "gateway.toml"
    config.write_text(f'profiles_dir = "{profiles}"\n')
    code, out = replay("--model", ANOMALY, "--data-dir", data_dir, "--config", config)
    assert code == 1
    assert "device profiles:" in out and "fields.a.anomaly must be true or false" in out
