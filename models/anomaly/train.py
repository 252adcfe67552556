"""Train the sensor-anomaly model and write anomaly.onnx and MODEL_CARD.md next to this script.

    python models/anomaly/train.py            (needs the `train` extra: scikit-learn, skl2onnx, onnx)

Data: simulated fleets from firmware_sim.signals, turned into features by gateway.filters.anomaly_features, the very
code the gateway runs. Four fleets with disjoint seeds and device ids:

    train        env + machine devices, dense anomalies        -> fit the forest
    validation   env + machine devices, realistic anomaly rate -> choose the default threshold
    test         env + machine devices, realistic anomaly rate -> held-out metrics
    unseen-kind  water devices (flow_lpm, line_pressure_bar, water_temp_c) never used above -> generalisation

Every number in the model card is computed below from the exported .onnx file run by onnxruntime (not from the
scikit-learn object), so the card describes what the gateway actually loads. Fixed seeds: a rerun with the same
library versions reproduces the file and the card.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import sklearn
import skl2onnx
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import RandomForestClassifier

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout without installing

from firmware_sim.signals import (  # noqa: E402
    ANOMALY_TYPES,
    EPISODE_LENGTH,
    EPISODE_MAGNITUDE,
    EPOCH_2026_MS,
    KINDS,
    NORMAL,
    DeviceSignal,
)
from gateway.filters.anomaly_features import FEATURE_NAMES, MIN_HISTORY, WINDOW, series_features  # noqa: E402

MODEL_NAME = "sensor-anomaly"
# 1.1.1: the 1.1.0 forest, exported without zero class weights (same probabilities, 3.3 MB less when loaded).
MODEL_VERSION = "1.1.1"
CLASSES: tuple[str, ...] = (NORMAL, *ANOMALY_TYPES)
INTERVALS_MS = (1_000, 5_000, 15_000, 60_000)
READINGS_PER_DEVICE = 2_000


@dataclass(frozen=True)
class Fleet:
    name: str
    kinds: tuple[str, ...]
    seed: int
    devices: int
    anomaly_rate: float  # episodes started per reading, see firmware_sim.signals


TRAIN = Fleet("train", ("env", "machine"), 1001, 100, 0.03)
VALIDATION = Fleet("validation", ("env", "machine"), 2002, 30, 0.005)
TEST = Fleet("test", ("env", "machine"), 3003, 40, 0.005)
UNSEEN = Fleet("unseen-kind", ("water",), 4004, 40, 0.005)

# 12 trees: 24 (version 1.0.0) scored 86.4 / 71.4 % precision / recall on the test fleet, 12 score 85.1 / 71.5 %, at
# half the memory onnxruntime holds for the model (28 -> 14 MB when loaded) and about half the time per run. Depth
# 10 lost drift recall (46 -> 38 %); depth 14 gained recall but kept 23 MB.
FOREST = dict(n_estimators=12, max_depth=12, min_samples_leaf=40, random_state=0, n_jobs=2)
# Anomalies are rare and spikes last 1-3 samples: weight each class by sqrt(n_normal / n_class), a middle way between
# the raw frequencies (spikes drown) and full balancing (normal samples flagged everywhere).
CLASS_WEIGHT_POWER = 0.5


@dataclass
class Dataset:
    x: np.ndarray  # (rows, features) float32
    y: np.ndarray  # class index into CLASSES
    episode: np.ndarray  # id of the anomaly episode a row belongs to, -1 for normal rows
    since_anomaly: np.ndarray  # samples since the series last had an anomalous sample (large if never)
    reading: np.ndarray  # which reading (event) of the fleet a row belongs to
    series: int
    readings: int
    episodes: dict[str, int]


def simulate(fleet: Fleet) -> Dataset:
    """Every field of every device as a series; rows from the MIN_HISTORY-th sample on (earlier ones are warming)."""
    rng = random.Random(f"{fleet.name}/{fleet.seed}")
    xs, ys, eps, since, reading = [], [], [], [], []
    next_episode = 0
    episodes = {t: 0 for t in ANOMALY_TYPES}
    series = 0
    for d in range(fleet.devices):
        kind = fleet.kinds[d % len(fleet.kinds)]
        signal = DeviceSignal(f"{fleet.name}-{d:04d}", fleet.seed, kind,
                              start_ms=EPOCH_2026_MS + rng.randrange(86_400_000),
                              interval_ms=rng.choice(INTERVALS_MS), anomaly_rate=fleet.anomaly_rate)
        readings = [signal.next() for _ in range(READINGS_PER_DEVICE)]
        for t, n in signal.injected.items():
            episodes[t] += n
        for field in signal.field_names:
            series += 1
            values = np.array([r.fields[field] for r in readings])
            labels = np.array([CLASSES.index(r.labels[field]) for r in readings])
            episode = np.full(len(labels), -1)
            gap = np.empty(len(labels))
            last_anomaly = -10**9
            for i, label in enumerate(labels):
                if label != 0:
                    if i == 0 or labels[i - 1] != label:
                        next_episode += 1
                    episode[i] = next_episode
                    last_anomaly = i
                gap[i] = i - last_anomaly
            xs.append(series_features(values))
            keep = slice(MIN_HISTORY - 1, None)
            ys.append(labels[keep])
            eps.append(episode[keep])
            since.append(gap[keep])
            reading.append(d * READINGS_PER_DEVICE + np.arange(len(labels))[keep])
    return Dataset(np.concatenate(xs), np.concatenate(ys), np.concatenate(eps), np.concatenate(since),
                   np.concatenate(reading), series, fleet.devices * READINGS_PER_DEVICE, episodes)


def export(forest: RandomForestClassifier, threshold: float) -> onnx.ModelProto:
    model = convert_sklearn(
        forest,
        name=MODEL_NAME,  # the graph name; skl2onnx would pick a random one and break reproducibility
        initial_types=[("features", FloatTensorType([None, len(FEATURE_NAMES)]))],
        options={id(forest): {"zipmap": False}},  # plain probability tensor, no list of dicts
        # Opsets every onnxruntime >= 1.17 (the gateway's floor) runs.
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    slim(model)
    model.doc_string = "Per-sample sensor anomaly classifier over scale-free window features (see MODEL_CARD.md)."
    onnx.helper.set_model_props(model, {
        "name": MODEL_NAME,
        "version": MODEL_VERSION,
        "classes": ",".join(CLASSES),
        "features": ",".join(FEATURE_NAMES),
        "window": str(WINDOW),
        "min_history": str(MIN_HISTORY),
        "threshold": f"{threshold:.2f}",
    })
    onnx.checker.check_model(model)
    return model


def slim(model: onnx.ModelProto) -> None:
    """Drop what inference never reads from the tree ensemble, in place: the leaves' zero class weights (skl2onnx
    writes one weight per class per leaf; a missing one counts as zero) and the optional per-node lists left at
    their defaults. onnxruntime holds 3.3 MB less for the model (23.2 -> 19.9 MB) and gives the same probabilities."""
    (node,) = [n for n in model.graph.node if n.op_type == "TreeEnsembleClassifier"]
    attrs = {a.name: a for a in node.attribute}
    weights = np.asarray(attrs["class_weights"].floats)
    kept = np.flatnonzero(weights != 0)
    for name in ("class_ids", "class_nodeids", "class_treeids"):
        values = np.asarray(attrs[name].ints)[kept].tolist()
        del attrs[name].ints[:]
        attrs[name].ints.extend(values)
    del attrs["class_weights"].floats[:]
    attrs["class_weights"].floats.extend(weights[kept].tolist())
    node.attribute.remove(attrs["nodes_hitrates"])  # only ever read by tools that rebuild trees, not by inference
    if not any(attrs["nodes_missing_value_tracks_true"].ints):  # all false is the default
        node.attribute.remove(attrs["nodes_missing_value_tracks_true"])


def probabilities(session: ort.InferenceSession, x: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(["probabilities"], {"features": x})[0])


def evaluate(proba: np.ndarray, data: Dataset, threshold: float) -> dict:
    """Sample- and episode-level metrics at `threshold` on P(any anomaly) = 1 - P(normal)."""
    p_anomaly = 1.0 - proba[:, 0]
    flagged = p_anomaly >= threshold
    predicted = np.where(flagged, 1 + np.argmax(proba[:, 1:], axis=1), 0)
    truth = data.y
    anomalous = truth != 0

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    out: dict = {
        "rows": int(len(truth)),
        "anomalous_rows": int(anomalous.sum()),
        "any": {
            "precision": ratio(int((flagged & anomalous).sum()), int(flagged.sum())),
            "recall": ratio(int((flagged & anomalous).sum()), int(anomalous.sum())),
            "false_positive_rate": ratio(int((flagged & ~anomalous).sum()), int((~anomalous).sum())),
            # False alarms within one window after an anomaly: the anomaly's values still sit in the history.
            "false_positives_in_aftermath": ratio(
                int((flagged & ~anomalous & (data.since_anomaly <= WINDOW)).sum()), int((flagged & ~anomalous).sum())),
        },
        "types": {},
    }
    # Rows: true class; columns: what the model said at the threshold ("normal" when not flagged).
    out["confusion"] = [[int(((truth == i) & (predicted == j)).sum()) for j in range(len(CLASSES))]
                        for i in range(len(CLASSES))]
    # Per event, as the gateway flags them: an event is flagged when any of its fields is, anomalous when any is.
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
        # Delay: samples from an episode's start to its first flagged sample, over detected episodes.
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


def choose_threshold(proba: np.ndarray, data: Dataset) -> tuple[float, list[dict]]:
    """The threshold with the best F1 for "any anomaly" on the validation fleet, on a 0.05 grid."""
    sweep = []
    for t in np.round(np.arange(0.30, 0.96, 0.05), 2):
        m = evaluate(proba, data, float(t))["any"]
        p, r = m["precision"] or 0.0, m["recall"] or 0.0
        sweep.append({"threshold": float(t), "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0,
                      "false_positive_rate": m["false_positive_rate"]})
    best = max(sweep, key=lambda s: (s["f1"], -s["threshold"]))
    return best["threshold"], sweep


def parity_check(model_path: Path, fleet: Fleet, proba: np.ndarray, data: Dataset) -> int:
    """Stream one device of `fleet` through the gateway's AnomalyDetector and compare with the offline scores.

    Guards against training/serving skew: the same features and the same model must give the same probabilities
    whether computed over a recorded series or one micro-batch at a time from the detector's rings.
    """
    from gateway.filters.anomaly import AnomalyDetector

    rng = random.Random(f"{fleet.name}/{fleet.seed}")
    signal = DeviceSignal(f"{fleet.name}-0000", fleet.seed, fleet.kinds[0],
                          start_ms=EPOCH_2026_MS + rng.randrange(86_400_000),
                          interval_ms=rng.choice(INTERVALS_MS), anomaly_rate=fleet.anomaly_rate)
    readings = [signal.next() for _ in range(READINGS_PER_DEVICE)]
    detector = AnomalyDetector(model_path, threshold=0.5)
    online: list[float] = []
    for start in range(0, len(readings), 97):  # an odd batch size, so batches straddle the warm-up boundary
        batch = readings[start:start + 97]
        verdicts = detector.score([("devices/parity", r.fields) for r in batch])
        online.extend(v.score for v in verdicts)
    # Offline: the device's rows come first in `data`, one block of (readings - MIN_HISTORY + 1) rows per field.
    per_field = READINGS_PER_DEVICE - MIN_HISTORY + 1
    fields = len(signal.field_names)
    offline = (1.0 - proba[: per_field * fields, 0]).reshape(fields, per_field).max(axis=0)
    diff = np.abs(np.asarray(online[MIN_HISTORY - 1:]) - offline)
    if diff.max() > 1e-5:
        raise SystemExit(f"parity check failed: detector and offline scores differ by up to {diff.max():.3g}")
    return len(offline)


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def write_card(path: Path, r: dict) -> None:
    lines: list[str] = []
    add = lines.append
    add(f"# Model card: {MODEL_NAME} {MODEL_VERSION}")
    add("")
    add("_Written by `models/anomaly/train.py`; every number below is that script's output. Do not edit by hand._")
    add("")
    add("## What it detects")
    add("")
    add("Anomalies in any numeric telemetry field of any device, one sample at a time, from the field's own recent "
        "history. Per sample it gives the probability of each class: `normal`, "
        + ", ".join(f"`{t}`" for t in ANOMALY_TYPES) + ":")
    add("")
    add("| type | what the sensor does | length (samples) |")
    add("|---|---|---|")
    meaning = {
        "spike": "jumps by {m} noise sigmas, then comes back",
        "drift": "walks away from normal, up to {m} sigmas, and eases back",
        "stuck": "repeats exactly the last value it read",
        "dropout": "reads exactly 0.0 (the firmware's value for a silent sensor)",
        "noise": "gets {m} sigmas of extra noise",
    }
    for t in ANOMALY_TYPES:
        lo, hi = EPISODE_MAGNITUDE.get(t, (0, 0))
        add(f"| `{t}` | {meaning[t].format(m=f'{lo:g}-{hi:g}')} | {EPISODE_LENGTH[t][0]}-{EPISODE_LENGTH[t][1]} |")
    add("")
    add("The gateway (`gateway/filters/anomaly.py`) keeps a ring of the last "
        f"{WINDOW} values of every (device, field) series, scores a field from its {MIN_HISTORY}th value on "
        "(\"warming\" before), takes an event's score as the highest anomaly probability among its fields, and "
        "flags the event when that score reaches the threshold. The verdict's label is the most likely anomaly type "
        "of the highest-scoring field; `detail.fields` lists every flagged field with its type.")
    add("")
    add("## Default threshold")
    add("")
    add(f"**{r['threshold']:.2f}** on P(anomaly) = 1 - P(normal), the best F1 for \"any anomaly\" on the validation "
        "fleet (grid 0.30-0.95, step 0.05). It is stored in the model's metadata; the gateway's config can override "
        "it. The validation sweep:")
    add("")
    add("| threshold | precision | recall | F1 | false-positive rate |")
    add("|---|---|---|---|---|")
    for s in r["sweep"]:
        add(f"| {s['threshold']:.2f} | {pct(s['precision'])} | {pct(s['recall'])} | {s['f1']:.3f} | "
            f"{100 * s['false_positive_rate']:.2f} % |")
    add("")
    add("## Training data")
    add("")
    add("All data comes from the simulator's signal generator (`firmware-sim/firmware_sim/signals.py`): per field a "
        "level, a 24 h cycle, a mean-reverting random walk, coupling between fields (humidity falls as temperature "
        "rises; a motor's temperature, vibration and slip follow its current), white noise, and the sensor's range "
        "and resolution. Each device draws its own levels, noise and daily phase; its sample interval is one of "
        + ", ".join(f"{ms // 1000} s" for ms in INTERVALS_MS)
        + f". Every device yields {READINGS_PER_DEVICE} readings.")
    add("")
    add("| fleet | role | device kinds | seed | devices | series | episodes started per reading |")
    add("|---|---|---|---|---|---|---|")
    for f in (TRAIN, VALIDATION, TEST, UNSEEN):
        add(f"| {f.name} | {r['roles'][f.name]} | {', '.join(f.kinds)} | {f.seed} | {f.devices} | "
            f"{r['fleets'][f.name]['series']} | {f.anomaly_rate} |")
    add("")
    add("Fields: " + "; ".join(f"{k}: " + ", ".join(s.name for s in KINDS[k]) for k in KINDS) + ".")
    add("")
    add("Training rows (samples after warm-up) and episodes per class:")
    add("")
    add("| class | rows | episodes |")
    add("|---|---|---|")
    tr = r["fleets"]["train"]
    for c in CLASSES:
        add(f"| {c} | {tr['rows_per_class'][c]} | {tr['episodes'].get(c, '-')} |")
    add("")
    add("## Features")
    add("")
    add(f"{len(FEATURE_NAMES)} scale-free features of the newest value against its series' window "
        f"(`gateway/filters/anomaly_features.py`, shared by this script and the gateway): "
        + ", ".join(f"`{n}`" for n in FEATURE_NAMES)
        + ". Deviations are measured in the series' own noise (from its sample-to-sample steps) or spread (MAD); "
        "repeats against its own repeat rate; zeros against its own level. No raw value, unit or field name reaches "
        "the model, which is why it transfers to fields it never saw.")
    add("")
    add("## Model")
    add("")
    add(f"scikit-learn RandomForestClassifier ({', '.join(f'{k}={v}' for k, v in FOREST.items() if k != 'n_jobs')}), "
        f"class weights sqrt(n_normal / n_class); exported with skl2onnx, zipmap disabled (outputs `label` and a "
        f"`probabilities` tensor, columns in the order of metadata `classes`), then the leaves' zero class weights "
        f"and the node lists inference never reads dropped (same probabilities, less memory in onnxruntime). File "
        f"size {r['size_mb']:.2f} MB. "
        f"ONNX metadata_props: name, version, classes, features, window, min_history, threshold.")
    add("")
    add("## Held-out evaluation")
    add("")
    add(f"At the default threshold {r['threshold']:.2f}, on fleets whose seeds and devices were not used for "
        "training or for choosing the threshold. Per sample: *precision* = of the samples flagged with this type, the "
        "share truly of this type; *recall* = of the samples of this type, the share flagged with this type; "
        "*flagged* = the share flagged at all (any type). Per episode: *episode recall* = share of episodes with at "
        "least one flagged sample; *delay* = median samples from the episode's start to its first flagged sample.")
    for name in ("test", "unseen-kind"):
        m = r["eval"][name]
        f = TEST if name == "test" else UNSEEN
        add("")
        add(f"### {name}: {', '.join(f.kinds)} devices ({m['rows']} samples, {m['anomalous_rows']} anomalous)")
        add("")
        a = m["any"]
        add(f"Any anomaly vs normal: precision **{pct(a['precision'])}**, recall **{pct(a['recall'])}**, "
            f"false-positive rate {100 * a['false_positive_rate']:.2f} % of normal samples "
            f"({pct(a['false_positives_in_aftermath'])} of false positives fall within {WINDOW} samples after an "
            "anomaly).")
        add("")
        e = m["events"]
        add(f"Per event (a reading of all the device's fields, flagged when any field is; what the gateway's verdict "
            f"says): precision **{pct(e['precision'])}**, recall **{pct(e['recall'])}**, false alarms on "
            f"{100 * e['false_alarm_rate']:.2f} % of normal events ({e['events']} events, {e['anomalous_events']} "
            "anomalous).")
        add("")
        add("| type | samples | precision | recall | flagged | episodes | episode recall | delay |")
        add("|---|---|---|---|---|---|---|---|")
        for t in ANOMALY_TYPES:
            s = m["types"][t]
            delay = "n/a" if s["median_delay"] is None else f"{s['median_delay']:g}"
            add(f"| {t} | {s['rows']} | {pct(s['precision'])} | {pct(s['recall'])} | {pct(s['flagged_any_label'])} | "
                f"{s['episodes']} | {pct(s['episode_recall'])} | {delay} |")
        add("")
        add("Confusion at the default threshold (rows: truth, columns: the label given; `normal` = not flagged):")
        add("")
        add("| truth \\ said | " + " | ".join(CLASSES) + " |")
        add("|---" * (len(CLASSES) + 1) + "|")
        for c, row in zip(CLASSES, m["confusion"]):
            add(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    add("")
    add(f"Parity: one unseen-kind device streamed through the gateway's `AnomalyDetector` in micro-batches gave the "
        f"same scores as the offline evaluation on all {r['parity_rows']} scored samples.")
    add("")
    add("## Known limits")
    add("")
    add("- Trained and evaluated on simulated signals only. Real sensors have failure shapes the simulator lacks "
        "(saturation at a range limit, periodic interference, step changes from maintenance, gaps in time); "
        "expect lower precision on a real fleet until it is evaluated there.")
    add("- Precision depends on how rare anomalies are. The held-out fleets start an episode every "
        f"{1 / TEST.anomaly_rate:.0f} readings per device; rarer anomalies mean a larger share of false alarms at the "
        "same false-positive rate.")
    add("- Early samples of a drift look like normal slow movement: drifts are caught late (see the delay) and "
        "their first samples count as misses. A drift no faster than the field's normal slow movement (its daily "
        "cycle at long sample intervals) cannot be told apart from it; the simulated drifts are mostly faster.")
    aftermath = [pct(r["eval"][n]["any"]["false_positives_in_aftermath"]) for n in ("test", "unseen-kind")]
    add(f"- After an anomaly its values stay in the window for up to {WINDOW} samples and disturb the statistics "
        f"that later samples are judged by: {aftermath[0]} (test) and {aftermath[1]} (unseen-kind) of the false "
        "alarms fall in that aftermath.")
    col = [row[CLASSES.index("spike")] for row in r["eval"]["test"]["confusion"]]
    wrong = sum(col) - col[CLASSES.index("spike")]
    if wrong:
        worst = max((c for c in CLASSES if c != "spike"), key=lambda c: col[CLASSES.index(c)])
        add(f"- Spike has the lowest precision: on the test fleet {wrong} samples were wrongly labelled spike, "
            f"{col[CLASSES.index(worst)]} of them truly `{worst}` (see the confusion tables). Short bursts and "
            "spikes of 2-3 samples look alike.")
    add("- A field whose normal value is exactly 0, or that legitimately repeats one value for long stretches "
        "(counters, flags, set-points), looks like dropout or stuck until its own history shows that is normal; "
        "during warm-up and after an eviction from the series cache it has no such history.")
    add("- Time is counted in samples, not seconds: a device that changes its sample interval changes what a "
        "\"fast\" change means.")
    add(f"- Needs {MIN_HISTORY} samples per field before it scores anything.")
    add("")
    add("## How to retrain")
    add("")
    add("```")
    add("pip install -e '.[train]'")
    add("python models/anomaly/train.py")
    add("git add models/anomaly/anomaly.onnx models/anomaly/MODEL_CARD.md")
    add("```")
    add("")
    add("Change the features in `gateway/filters/anomaly_features.py` or the signals in "
        "`firmware-sim/firmware_sim/signals.py`, rerun, and bump `MODEL_VERSION` in the script. The gateway refuses "
        "a model whose recorded features, window or warm-up differ from its own code. The run is deterministic for "
        f"fixed library versions; this card was produced with Python {platform.python_version()}, "
        f"scikit-learn {sklearn.__version__}, skl2onnx {skl2onnx.__version__}, onnx {onnx.__version__}, "
        f"onnxruntime {ort.__version__}, numpy {np.__version__}.")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=HERE, help="where to write anomaly.onnx and MODEL_CARD.md")
    args = parser.parse_args(argv)
    started = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    fleets = {}
    for fleet in (TRAIN, VALIDATION, TEST, UNSEEN):
        fleets[fleet.name] = simulate(fleet)
        log(f"simulated {fleet.name}: {fleets[fleet.name].x.shape[0]} rows")

    train = fleets["train"]
    counts = np.bincount(train.y, minlength=len(CLASSES))
    if (counts == 0).any():
        raise SystemExit(f"every class needs training rows, got {dict(zip(CLASSES, counts.tolist()))}")
    weights = (counts[0] / counts) ** CLASS_WEIGHT_POWER
    forest = RandomForestClassifier(**FOREST)
    forest.fit(train.x, train.y, sample_weight=weights[train.y])
    log("trained the forest")

    # Choose the threshold with the exported model itself, then export again with the threshold in its metadata.
    session = ort.InferenceSession(export(forest, 0.5).SerializeToString(), providers=["CPUExecutionProvider"])
    threshold, sweep = choose_threshold(probabilities(session, fleets["validation"].x), fleets["validation"])
    model = export(forest, threshold)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model_path = args.out_dir / "anomaly.onnx"
    model_path.write_bytes(model.SerializeToString())
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.2f} MB), threshold {threshold:.2f}")

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    results: dict = {"eval": {}}
    unseen_proba = None
    for name in ("test", "unseen-kind"):
        proba = probabilities(session, fleets[name].x)
        results["eval"][name] = evaluate(proba, fleets[name], threshold)
        if name == "unseen-kind":
            unseen_proba = proba
    assert unseen_proba is not None
    results["parity_rows"] = parity_check(model_path, UNSEEN, unseen_proba, fleets["unseen-kind"])
    log("evaluated")

    results.update(
        threshold=threshold,
        sweep=sweep,
        size_mb=model_path.stat().st_size / 1e6,
        roles={"train": "fit", "validation": "threshold", "test": "held-out", "unseen-kind": "held-out, unseen fields"},
        fleets={
            name: {
                "series": d.series,
                "rows": int(len(d.y)),
                "rows_per_class": {c: int((d.y == i).sum()) for i, c in enumerate(CLASSES)},
                "episodes": d.episodes,
            }
            for name, d in fleets.items()
        },
    )
    write_card(args.out_dir / "MODEL_CARD.md", results)
    log(f"wrote {args.out_dir / 'MODEL_CARD.md'}")
    summary = {k: results[k] for k in ("threshold", "size_mb", "eval", "parity_rows")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
