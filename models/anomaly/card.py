"""MODEL_CARD.md for the sensor-anomaly model, from the figures train.py computed: the prose lives here, the
arithmetic there, so neither hides the other."""

from __future__ import annotations

import platform
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import sklearn


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def _row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _totals(nab: dict, key: str, names: list[str]) -> dict:
    return {k: sum(nab[n][key][k] for n in names)
            for k in ("windows", "hit", "false_episodes", "false_single", "false_short", "false_values", "outside")}


def _n(x: int) -> str:
    return f"{x:,}"


def _more(d: int, noun: str) -> str:
    """A difference in prose: "one more window", "two fewer windows", "no more windows"."""
    words = {1: "one", 2: "two", 3: "three"}
    n = abs(d)
    return f"{words.get(n, str(n)) if n else 'no'} {'fewer' if d < 0 else 'more'} {noun}{'' if n == 1 else 's'}"


def _times(a: int, b: int) -> str:
    """How many times fewer b is than a, for prose."""
    return f"{a / b:.1f}x" if b else "n/a"


def _eval_section(name: str, title: str, ev: dict, classes: tuple[str, ...]) -> list[str]:
    a, e = ev["any"], ev["events"]
    out = [
        f"### {name}: {title} ({ev['rows']} values, {ev['anomalous_rows']} anomalous)",
        "",
        f"Any anomaly vs normal, per value: precision **{pct(a['precision'])}**, recall **{pct(a['recall'])}**, "
        f"false-positive rate {pct(a['false_positive_rate'])} of normal values.",
        "",
        f"Per event (a reading of all the device's fields, flagged when any field is; what the gateway's verdict "
        f"says): precision **{pct(e['precision'])}**, recall **{pct(e['recall'])}**, false alarms on "
        f"{pct(e['false_alarm_rate'])} of normal events ({e['events']} events, {e['anomalous_events']} anomalous).",
        "",
        _row("type", "values", "precision", "recall", "flagged", "episodes", "episode recall", "delay"),
        _row(*["---"] * 8),
    ]
    for t, m in ev["types"].items():
        delay = "-" if m["median_delay"] is None else f"{m['median_delay']:g}"
        out.append(_row(t, m["rows"], pct(m["precision"]), pct(m["recall"]), pct(m["flagged_any_label"]),
                        m["episodes"], pct(m["episode_recall"]), delay))
    out += ["", "Confusion (rows: truth, columns: the label given; `normal` = not flagged):", "",
            _row("truth \\ said", *classes), _row(*["---"] * (len(classes) + 1))]
    for c, counts in zip(classes, ev["confusion"]):
        out.append(_row(c, *counts))
    return out + [""]


def _guard(train: ModuleType) -> str:
    return (f"One rule overrides the network, the *spike guard* (`is_wild` in `gateway/filters/anomaly_features.py`): "
            f"a value at least {train.GUARD_Z:g} spreads off its field's level and at least {train.GUARD_TAIL:g} "
            "times the field's own 99th percentile of that deviation is a `spike` with P(anomaly) 1.0, whatever the "
            "network says. The network is not monotone in the size of a deviation (it learned from bursty series "
            "that huge values can be routine); a routine burst of a bursty series can be many spreads off but is within "
            "its own 99th percentile, so the guard leaves it to the network.")


def _changes(train: ModuleType, results: dict, crossed_all: dict, crossed_real: dict, zs_all: dict,
             zs_real: dict) -> list[str]:
    """What changed since the last card, and what it cost: the before/after on NAB and the simulator."""
    before, other, ung = train.BEFORE, train.OTHER_SEEDS, train.UNGUARDED
    b_all, b_real = before["all"], before["real"]
    test = results["eval"]["test"]["any"]
    seeds = ", ".join(map(str, train.SEEDS))

    def share(false_values: int, totals: dict) -> str:
        return pct(false_values / totals["outside"])

    def row(name: str, t: dict, totals: dict, bold: bool = False) -> str:
        fv = f"**{_n(t['false_values'])}**" if bold else _n(t["false_values"])
        return _row(name, f"{t['hit']} of {t['windows']}", t["false_episodes"], fv, share(t["false_values"], totals))

    return [
        f"## What changed in {train.MODEL_VERSION}",
        "",
        "2.3.1 is 2.3.0 exported differently: its three networks side by side as one wider graph of 11 nodes "
        "instead of the 55 skl2onnx wrote, which onnxruntime runs in a third of the time on the few rows a commit "
        "holds (benchmarks/RESULTS.md); the fit, the probabilities (to float rounding) and every figure below are "
        "2.3.0's. What 2.3.0 changed:",
        "",
        f"{before['version']} flagged too many readings: users saw it flag 8-10 % of all readings. On the NAB "
        f"series below it flagged {_n(b_all['false_values'])} readings outside every labelled window "
        f"({share(b_all['false_values'], crossed_all)} of them), where the rolling z-score flags "
        f"{_n(zs_all['false_values'])}. Four changes, one retraining:",
        "",
        "- Every value teaches a series' rates of zeros and repeats. Before, only values deemed normal did, so a "
        "series whose zeros or repeats are frequent but scattered (a counter idling at 0.0 between bursts, a "
        "reading that holds a few set levels) never learned that they are routine for it and had each one "
        "flagged. A stuck run or a dropout still stands out by its length.",
        f"- The training fleet adds {train.ROUTINE_PER_KIND * len(train.ROUTINE)} routine series of shapes real "
        "telemetry has and the simulator's sensors do not: "
        f"{train.ROUTINE_PER_KIND} bursty ones (an idle floor, 0.0 or a small repeated value, with bursts of 1-6 "
        f"log-normal values) and {train.ROUTINE_PER_KIND} of plateaus (2-5 set levels, each held for 5-200 "
        f"values), with spikes, drifts and dropouts injected on top ({train.ROUTINE_ANOMALY_RATE:g} episodes per "
        "value), so that what is routine for such a series does not make everything routine.",
        f"- The model is the mean of the probabilities of {len(train.SEEDS)} networks that differ only in their "
        f"seed ({seeds}), one ONNX graph.",
        f"- The spike guard (\"What it does\" above). Without it this model missed huge spikes: after 61 values "
        "of 20.0 +- 0.1 it left a reading of 1e6 unflagged, and in a series that started at 23.0 every spike "
        "from 40 to 1e6 scored lower the larger it was, all under the threshold. It costs, on NAB crossed, "
        f"{_n(crossed_all['false_values'] - ung['all']['false_values'])} false values "
        f"({_n(ung['all']['false_values'])} without it) and "
        f"{crossed_all['false_episodes'] - ung['all']['false_episodes']} false episodes "
        f"({ung['all']['false_episodes']}), with {ung['all']['hit']} windows hit without it; on the real series "
        f"{_n(crossed_real['false_values'] - ung['real']['false_values'])} false values "
        f"({_n(ung['real']['false_values'])}) and {crossed_real['false_episodes'] - ung['real']['false_episodes']} "
        f"false episodes ({ung['real']['false_episodes']}). Without it the simulator's test fleet gave precision "
        f"{pct(ung['test']['precision'])}, recall {pct(ung['test']['recall'])}: there the network already "
        "flagged what the guard catches.",
        "",
        f"The threshold and episode rule are chosen as before (\"Defaults\" below); for this model the choice is "
        f"a threshold of {results['threshold']:.2f} ({before['version']}: {before['threshold']:.2f}).",
        "",
        "Before and after on NAB, with the choice held out (*crossed*, below), beside the z-score baseline; *false "
        "values* are flagged readings outside every window, the per-reading false alarms:",
        "",
        _row("", "windows hit", "false episodes", "false values", "of the readings outside every window"),
        _row(*["---"] * 5),
        row(f"{train.MODEL_VERSION}, all series", crossed_all, crossed_all, bold=True),
        row(f"{before['version']}, all series", b_all, crossed_all),
        row("z-score, all series", zs_all, crossed_all, bold=True),
        row(f"{train.MODEL_VERSION}, real series only", crossed_real, crossed_real, bold=True),
        row(f"{before['version']}, real series only", b_real, crossed_real),
        row("z-score, real series only", zs_real, crossed_real, bold=True),
        "",
        f"Simulator test fleet, any anomaly per value: precision {pct(test['precision'])} ({before['version']}: "
        f"{pct(before['test']['precision'])}), recall {pct(test['recall'])} ({pct(before['test']['recall'])}).",
        "",
        f"The trade-off: {_times(b_all['false_values'], crossed_all['false_values'])} fewer flagged readings "
        f"outside the windows ({_times(b_real['false_values'], crossed_real['false_values'])} on the real series), "
        f"{_times(crossed_all['false_values'], zs_all['false_values'])} the z-score's over all series "
        f"({_n(crossed_all['false_values'])} against "
        f"{_n(zs_all['false_values'])}) and {_times(crossed_real['false_values'], zs_real['false_values'])} "
        f"the z-score's on the real ones ({_n(crossed_real['false_values'])} against {_n(zs_real['false_values'])}); "
        f"{_more(crossed_all['hit'] - b_all['hit'], 'window')} hit "
        f"({_more(crossed_real['hit'] - b_real['hit'], 'window')} on the real series); but "
        f"**more alert episodes** than {before['version']}: {crossed_all['false_episodes']} outside every window "
        f"against {b_all['false_episodes']} ({crossed_real['false_episodes']} against {b_real['false_episodes']} on "
        f"the real series), still fewer than the z-score's {zs_all['false_episodes']} ({zs_real['false_episodes']}). "
        f"{before['version']} flagged {b_all['false_values'] / b_all['false_episodes']:.0f} readings outside the "
        f"windows for each alert it started there, clustered in few episodes; {train.MODEL_VERSION} flags "
        f"{crossed_all['false_values'] / max(crossed_all['false_episodes'], 1):.0f} per alert. The per-reading "
        "verdicts (followers, InfluxDB's `anomaly` tag, dashboards) are far quieter; the alert stream is busier "
        f"({crossed_all['false_episodes'] / b_all['false_episodes']:.1f}x the false episodes over all series, "
        f"{crossed_real['false_episodes'] / b_real['false_episodes']:.1f}x on the real ones).",
        "",
        f"Windows hit depends on the training seeds: three-network means trained with different seeds have hit between "
        f"40 and 46 of the 50 windows. With seeds {', '.join(map(str, other['seeds']))} instead of {seeds}, this "
        f"script hits {other['all']['hit']} of {other['all']['windows']} ({other['real']['hit']} of "
        f"{other['real']['windows']} real), with {other['all']['false_episodes']} false episodes and "
        f"{_n(other['all']['false_values'])} false values ({other['real']['false_episodes']} and "
        f"{_n(other['real']['false_values'])} real; measured without the spike guard). A difference of a few windows between two models is within "
        "that spread; the drop in flagged readings is not.",
        "",
    ]


def _demo_section(train: ModuleType, results: dict) -> list[str]:
    """The alerts a user of the live demo sees (train.demo_alerts), and what a stricter episode start would change."""
    minutes = train.DEMO_MINUTES
    demo, strict = results["demo"]["shipped"], results["demo"]["strict"]
    nab = results["nab"]
    names = sorted(nab)
    real = [n for n in names if n.startswith("real")]
    shipped_all, shipped_real = _totals(nab, "model", names), _totals(nab, "model", real)
    strict_all, strict_real = _totals(nab, "strict", names), _totals(nab, "strict", real)

    def alerts(d: dict) -> str:
        return (f"{d['true_alerts'] + d['false_alerts']} alerts, {d['false_alerts']} of them false "
                f"({d['false_alerts'] / minutes:.1f} a minute), {d['alerted']} of {d['episodes']} episodes alerted")

    return [
        "### The live demo's alerts",
        "",
        f"`scripts/demo` on its defaults: {train.DEMO_DEVICES} simulated devices of the three kinds, "
        f"{train.DEMO_RATE:g} readings per second in all (each device every "
        f"{train.DEMO_DEVICES * 1000 / train.DEMO_RATE:g} ms), anomaly episodes started at {train.DEMO_ANOMALY_RATE:g} "
        f"per reading, streamed for {minutes} minutes ({demo['readings']:,} readings) through the gateway's "
        f"`AnomalyDetector` with the shipped rule, in batches of 4. It started **{alerts(demo)}**; an alert is true "
        f"within {train.DEMO_NEAR} readings of a labelled anomalous reading of its device, and an episode is alerted "
        "when an alert starts that close to its first reading.",
        "",
        f"An episode started only at a score of {train.STRICT_START} or on {train.STRICT_PERSIST} flagged readings "
        f"in a row (`anomaly.episode_start`, `anomaly.episode_persist`) gives there {alerts(strict)}. On NAB (the "
        f"shipped threshold, quiet {results['quiet']}) it hits {strict_all['hit']} of {shipped_all['windows']} "
        f"windows ({strict_real['hit']} of {shipped_real['windows']} real) with {strict_all['false_episodes']} false "
        f"episodes ({strict_real['false_episodes']} real), against the shipped rule's {shipped_all['hit']} "
        f"({shipped_real['hit']}) and {shipped_all['false_episodes']} ({shipped_real['false_episodes']}). The "
        "default stays the rule chosen above (the most windows hit first); a user who would rather have fewer "
        "alerts sets those two.",
        "",
    ]


def write_card(path: Path, results: dict, train: ModuleType) -> None:
    threshold, quiet, rule = results["threshold"], results["quiet"], results["rule"]
    fleets = results["fleets"]
    nab = results["nab"]
    names = sorted(nab)
    kern = train.OTHER_KERNELS  # the same run by other BLAS kernels: "How to retrain"
    real = [n for n in names if n.startswith("real")]
    model_all, zs_all = _totals(nab, "model", names), _totals(nab, "zscore", names)
    crossed_all = _totals(nab, "crossed", names)
    crossed_real, zs_real = _totals(nab, "crossed", real), _totals(nab, "zscore", real)
    c0, c1 = results["crossed"][0], results["crossed"][1]

    lines = [
        f"# Model card: {train.MODEL_NAME} {train.MODEL_VERSION}",
        "",
        "_Written by `models/anomaly/train.py` (prose in `models/anomaly/card.py`); every number below is that "
        "script's output. Do not edit by hand._",
        "",
        "## What it does",
        "",
        "Flags anomalies in any numeric telemetry field of any device, value by value, against **that field's own "
        "normal, learned online** from its own history (`gateway/filters/anomaly_features.py`): a slow and a fast "
        "running level, spread and noise, how often the field repeats a value or reads 0.0, its own 99th "
        "percentiles of deviation and step, and a profile per hour of the day once its timestamps span two days. "
        "A value that looks anomalous does not move the running level, spread and noise, so an anomaly is judged "
        "against the history before it, unless it is where its hour of the day usually is (a working day's load is "
        "learned, not alarmed on every day); every value, anomalous or not, counts in how often the field repeats "
        "or reads 0.0, so a counter that idles at 0.0 between bursts learns that its zeros are routine. "
        f"{train.WARMUP} values warm a series up before it is scored. No raw value, unit or field name "
        "reaches the model, which is why it scores fields it never saw.",
        "",
        "Per value it gives the probability of each class: `" + "`, `".join(train.CLASSES) + "`. The gateway "
        "(`gateway/filters/anomaly.py`) takes a reading's score as the highest anomaly probability among its "
        "fields and flags it at the threshold. " + _guard(train) + " **Alerts are episodes**: per device, after a quiet spell, a flagged "
        + (f"reading scoring at least {rule.start:g} starts one at once, a lower one only as the {rule.persist}"
           f"{'nd' if rule.persist == 2 else 'rd' if rule.persist == 3 else 'th'} flagged reading in a row (real "
           "series are full of single moderately surprising values; a failing sensor keeps failing); "
           if rule.start > threshold else "reading starts one; ")
        + f"{quiet} unflagged readings in a row end it; the gateway publishes one alert at each, not one per "
        "reading.",
        "",
    ]
    lines += _changes(train, results, crossed_all, crossed_real, zs_all, zs_real)
    lines += [
        "## Defaults",
        "",
        f"Threshold **{threshold:.2f}** on P(anomaly) = 1 - P(normal); "
        + (f"an episode starts at once at a score of **{rule.start:g}**, else on **{rule.persist}** flagged readings "
           "in a row; " if rule.start > threshold else "**every flagged reading** may start an episode; ")
        + f"**{quiet}** quiet readings end it. All four are stored in the model's metadata (`threshold`, `episode_start`, `episode_persist`, "
        "`episode_quiet`; the gateway's config can override them). Chosen on the NAB tuning set among "
        f"{len(train.QUIETS)} quiet lengths ({', '.join(map(str, train.QUIETS))}), starts at once on every flagged "
        f"reading or only from {', '.join(f'{s:g}' for s in train.STARTS)} (else {' or '.join(map(str, train.PERSISTS))} "
        "in a row): the most windows hit, then the fewest episodes started outside every window, among the "
        "thresholds at which the simulator's validation fleet is at least as good as the previous model "
        f"(1.1.1: precision {pct(train.PREVIOUS['precision'])}, recall {pct(train.PREVIOUS['recall'])} on its test "
        "fleet). The simulator validation sweep:",
        "",
        _row("threshold", "precision", "recall", "F1", "false-positive rate"),
        _row(*["---"] * 5),
    ]
    for s in results["sweep"]:
        if round(s["threshold"] * 100) % 4 == 2 and s["threshold"] != threshold:
            continue  # every other row keeps the table short; the chosen one is always shown
        mark = " **(chosen)**" if s["threshold"] == threshold else ""
        lines.append(_row(f"{s['threshold']:.2f}{mark}", pct(s["precision"]), pct(s["recall"]), f"{s['f1']:.3f}",
                          f"{100 * s['false_positive_rate']:.2f} %"))

    lines += [
        "",
        "## Real series: the NAB tuning set",
        "",
        f"{len(names)} series with labelled anomaly windows from the Numenta Anomaly Benchmark "
        "(`../shared/data/sensors/nab-tuning/`, MIT licence, Numenta): AWS CloudWatch server metrics, road "
        "traffic, and artificial series with and without anomalies. None of them is used to fit the model; they "
        "only choose the threshold and the episode rule. Scored the NAB way: a window is *hit* when a value inside "
        "it is flagged within an episode (an alert was raised for it); *false episodes* are alerts (episode "
        "starts) outside every window; *false values* are flagged values outside every window.",
        "",
        "So that the per-series figures are those of series the choice never saw, the choice is made twice: on the "
        f"non-AWS series and scored on the AWS ones ({c0}), and the other way round ({c1}). The *crossed* columns "
        f"below are those held-out figures; the shipped defaults ({rule}) are chosen on all series (the *shipped* "
        "columns, not held out). The baseline is a rolling z-score (the previous 96 values, flagged at |z| > 4), "
        f"as episodes with the same quiet length ({quiet}); having no confidence to tell a high score from a low "
        "one, every flagged value of it may start one.",
        "",
        _row("", "windows", "hit", "false episodes", "false values"),
        _row(*["---"] * 5),
        _row("model, crossed (held out)", crossed_all["windows"], crossed_all["hit"],
             crossed_all["false_episodes"], crossed_all["false_values"]),
        _row("model, shipped defaults", model_all["windows"], model_all["hit"], model_all["false_episodes"],
             model_all["false_values"]),
        _row("z-score baseline", zs_all["windows"], zs_all["hit"], zs_all["false_episodes"],
             zs_all["false_values"]),
        _row("real series only: model, crossed", crossed_real["windows"], crossed_real["hit"],
             crossed_real["false_episodes"], crossed_real["false_values"]),
        _row("real series only: z-score", zs_real["windows"], zs_real["hit"], zs_real["false_episodes"],
             zs_real["false_values"]),
        "",
        "Per series (crossed model vs z-score; windows hit / false episodes / false values):",
        "",
        _row("series", "values", "windows", "model hit", "model false ep.", "model false val.", "z hit",
             "z false ep.", "z false val."),
        _row(*["---"] * 9),
    ]
    for n in names:
        m, z = nab[n]["crossed"], nab[n]["zscore"]
        lines.append(_row(f"`{n}`", nab[n]["values"], m["windows"], m["hit"], m["false_episodes"],
                          m["false_values"], z["hit"], z["false_episodes"], z["false_values"]))
    missed = [n for n in names if nab[n]["crossed"]["hit"] < nab[n]["crossed"]["windows"]]

    lines += [
        "",
        "## Simulator",
        "",
        "Fleets from the simulator's signal generator (`firmware-sim/firmware_sim/signals.py`): per field a level, "
        "a 24 h cycle, a mean-reverting random walk, coupling between fields, white noise and the sensor's range "
        "and resolution; each device draws its own levels, noise, phase and a sample interval of "
        f"{', '.join(f'{i // 1000} s' for i in train.INTERVALS_MS)} (the training fleet also 5 min, so that its "
        f"devices span days and the model learns what a known daily profile means; half the fields of those also "
        "switch by a working day, 10-60 noise sigmas from a morning hour to an evening hour, kept from the hour "
        "their profile is known); "
        f"{train.READINGS_PER_DEVICE} readings per device. The training fleet also has "
        f"{train.ROUTINE_PER_KIND * len(train.ROUTINE)} routine series of {train.READINGS_PER_DEVICE} values "
        f"({', '.join(train.ROUTINE)}: `routine_series` in the script) with their own injected anomalies "
        "(`routine_anomalies`). Injected anomalies are labelled per value.",
        "",
        _row("fleet", "role", "device kinds", "seed", "devices", "series", "episodes started per reading"),
        _row(*["---"] * 7),
    ]
    for f, role in ((train.TRAIN, "fit"), (train.VALIDATION, "threshold floor"), (train.TEST, "held-out"),
                    (train.UNSEEN, "held-out, unseen fields")):
        lines.append(_row(f.name, role, ", ".join(f.kinds), f.seed, f.devices, fleets[f.name]["series"],
                          f.anomaly_rate))
    lines += ["", "Training rows (values after warm-up) and episodes per class:", "",
              _row("class", "rows", "episodes"), _row("---", "---", "---")]
    tr = fleets["train"]
    for c in train.CLASSES:
        lines.append(_row(c, tr["rows_per_class"][c], tr["episodes"].get(c, "-")))
    lines += ["", f"### Held-out, at the shipped threshold {threshold:.2f}", "",
              "*precision* / *recall* per type: of the values given / truly of this type; *flagged*: the share "
              "flagged at all; *episode recall*: episodes with at least one flagged value; *delay*: median values "
              "from an episode's start to its first flagged value.", ""]
    lines += _eval_section("test", "env, machine devices", results["eval"]["test"], train.CLASSES)
    lines += _eval_section("unseen-kind", "water devices, fields never trained on", results["eval"]["unseen-kind"],
                           train.CLASSES)
    lines += [
        f"Parity: one unseen-kind device streamed through the gateway's `AnomalyDetector` in micro-batches gave "
        f"the offline scores on all {results['parity_rows']} scored readings.",
        "",
        *_demo_section(train, results),
        "## Model",
        "",
        f"{len(train.FEATURE_NAMES)} scale-free features: " + ", ".join(f"`{n}`" for n in train.FEATURE_NAMES)
        + " (defined and explained in `gateway/filters/anomaly_features.py`). scikit-learn StandardScaler, then the "
        f"mean of the class probabilities of {len(train.SEEDS)} MLPClassifiers ("
        + ", ".join(f"{k}={v}" for k, v in train.NETWORK.items())
        + f", random_state={' / '.join(map(str, train.SEEDS))}; ReLU, Adam; a soft-voting VotingClassifier), class "
        "weights (n_normal / n_class)^0.5; exported by the script as one graph of 11 nodes: the networks side by side "
        "as one wider network (each layer one MatMul, the hidden layers block-diagonal), a softmax per network and "
        "their mean, the `probabilities` tensor (columns in the order of metadata `classes`). "
        f"Then the spike guard, in the gateway's code, not in the graph: |`z_level`| >= log1p({train.GUARD_Z:g}) "
        f"and `level_tail` >= log1p({train.GUARD_TAIL:g}) make a value a `spike` with P(anomaly) 1.0 (every "
        "figure on this card includes it). "
        f"File size {results['size_mb'] * 1000:.0f} kB. ONNX metadata_props: name, "
        "version, classes, features, warmup, threshold, episode_start, episode_persist, episode_quiet.",
        "",
        "## Known limits",
        "",
        f"- Against issue 15's target on held-out real series (every window hit, false alarms at most a third of "
        f"the z-score baseline's): not met. On the real NAB series, crossed: {crossed_real['hit']} of "
        f"{crossed_real['windows']} windows hit (z-score {zs_real['hit']}), {crossed_real['false_episodes']} false "
        f"episodes (z-score, as episodes by the same rule, {zs_real['false_episodes']}), "
        f"{_n(crossed_real['false_values'])} false values (z-score {_n(zs_real['false_values'])}).",
        "- On the NAB series the labelled windows are wide (about a tenth of a series) and mark where a human saw "
        "something worth knowing, not which values are wrong; some are level shifts or changed daily shapes that "
        "look like a new normal from inside the series."
        + (f" Windows missed with the held-out choice: {', '.join(f'`{n}`' for n in missed)}." if missed else ""),
        "- Real series carry more routine surprises than the simulator (restarts, load changes, bursts), and most "
        f"false episodes are short: of the {crossed_all['false_episodes']} above (crossed), "
        f"{crossed_all['false_single']} hold a single flagged reading and {crossed_all['false_short']} at most three. "
        "Raising the threshold in the config trades windows hit for fewer alerts.",
        "- A series that changes its normal for good (a sensor moved) is alarmed on until it has held the new "
        "level for 128 values; then it is learned.",
        "- Early values of a drift look like normal slow movement: drifts are caught late (see the delay).",
        "- The network alone is not monotone in the size of a spike: in a series whose first value is far off "
        "what follows (a device that starts with a stale reading) the spread is inflated for a while after "
        "warm-up, and the network scores a larger spike lower. The spike guard flags every spike beyond "
        f"{train.GUARD_Z:g} spreads and {train.GUARD_TAIL:g} times the series' own 99th percentile of deviation; "
        "a spike short of that in such a series is the network's alone and can be missed while a smaller one is "
        "flagged.",
        "- A heavy-tailed series (log-normal bursts) now and then has a burst several times its own 99th "
        "percentile of deviation: the spike guard flags it as a spike whatever the network says.",
        "- A young series (its first few dozen values after warm-up) has young statistics: its own noise is "
        "sometimes flagged as `noise` then, one early episode per series rather than a steady rate.",
        "- The daily profile needs two days of a series' own timestamps; before that, daily swings count against "
        "the running level only.",
        "- Time is counted in values, not seconds, except for the hour of the day: a device that changes its "
        "sample interval changes what a \"fast\" change means.",
        "- After an eviction from the series cache (`max_series`) a series starts over, warming.",
        "",
        "## How to retrain",
        "",
        "```",
        "pip install -e '.[train]'",
        "python models/anomaly/train.py",
        "git add models/anomaly/anomaly.onnx models/anomaly/MODEL_CARD.md",
        "```",
        "",
        "Change the features in `gateway/filters/anomaly_features.py` or the signals in "
        "`firmware-sim/firmware_sim/signals.py`, rerun, and bump `MODEL_VERSION` in the script. The gateway "
        "refuses a model whose recorded features or warm-up differ from its own code. The script fits on one BLAS "
        "thread (threadpoolctl's `threadpool_limits(1)` around the fit) with OpenBLAS's "
        f"{train.BLAS_KERNELS} kernels whatever the CPU (`OPENBLAS_CORETYPE`, set before numpy loads): the fitted "
        "networks change with the thread count and with the kernels, and so do the windows they hit. Run by the "
        f"{kern['kernels']} (AVX-512) kernels OpenBLAS picks on a CPU that has them, the same script hits "
        f"{kern['all']['hit']} of {kern['all']['windows']} windows crossed ({kern['real']['hit']} of "
        f"{kern['real']['windows']} real) with {kern['all']['false_episodes']} false episodes and "
        f"{kern['all']['false_values']:,} false values, and the simulator's test fleet gives precision "
        f"{pct(kern['test']['precision'])}, recall {pct(kern['test']['recall'])}. So the run is deterministic for "
        f"fixed library versions; this card was produced with Python {platform.python_version()}, scikit-learn "
        f"{sklearn.__version__}, onnx {onnx.__version__}, onnxruntime {ort.__version__}, numpy {np.__version__}, "
        f"OpenBLAS kernels {', '.join(sorted(train.blas_kernels()))}.",
        "",
    ]
    path.write_text("\n".join(lines))
