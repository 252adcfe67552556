"""`gateway replay`: rescore the events still in the log with another model, publish nothing, compare the verdicts.

    log.db ──read-only, a few thousand offsets per read──▶ events of the model's kind (since TIME)
        ──▶ a fresh detector or classifier, one model run per batch ──▶ the verdict now
        ──▶ beside the verdict stored at the time: flagged by both, then only, now only; per source; episode starts
        ──▶ a report (text or JSON)

The model's metadata says what it scores: an anomaly model (the metadata of models/anomaly/train.py) telemetry, a
content model (models/content/train.py) posts. Thresholds and episode settings come from the configuration, as the
daemon would apply them to this model, so the report shows what swapping the model file would change.

The anomaly detector is stateful: every (device, field) series learns its normal online and is warming for its
first readings. Replay feeds the readings through one fresh detector in log order, as the daemon does, so the first
readings of each series are warming now, while the verdicts at the time had the history from before `--since` (and
started warming again at every restart of the daemon). Those readings are counted apart (`warming_now`).
"""

from __future__ import annotations

import math
import re
import sqlite3
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import orjson

from gateway.config import Config
from gateway.event import KIND_POST, KIND_TELEMETRY, Verdict
from gateway.filters.anomaly import WARMING
from gateway.log import store

# Offsets per read of the log, and at least this many events per model run. A read is one short read transaction;
# a run of the anomaly model costs about the same for one reading as for a hundred.
BATCH = 4096

_AGE = re.compile(r"(\d+)\s*([smhd])")
_AGE_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}

Row = tuple[int, str, int, bytes, bytes | None]  # offset, source, ts_ms, payload, verdict JSON (store.scan)


class ReplayError(Exception):
    """Why a replay cannot run: the message says what to do, the command line shows it without a traceback."""


def parse_since(text: str, now_ms: int) -> int:
    """Milliseconds since the epoch from an age (`30m`, `2h`, `7d`, `90s`: that long before `now_ms`) or an ISO-8601
    date or time (`2026-01-05`, `2026-01-05T14:00`, `2026-01-05T14:00:00Z`; local time unless it names a zone)."""
    age = _AGE.fullmatch(text.strip())
    if age:
        return now_ms - int(age[1]) * _AGE_MS[age[2]]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ReplayError(f"{text!r} is neither an age (30m, 2h, 7d) nor an ISO-8601 time "
                          "(2026-01-05T14:00, 2026-01-05T14:00:00Z)") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return int(when.timestamp() * 1000)


@dataclass
class Model:
    """A model ready to rescore one kind of event, and what the report says about it."""

    path: str
    kind: str  # the event kind it scores: KIND_TELEMETRY or KIND_POST
    name: str
    version: str
    settings: dict[str, Any]  # thresholds and episode length in use, and where each came from
    score: Callable[[Sequence[Row]], list[Verdict]]


def load_model(path: Path, cfg: Config) -> Model:
    """The model at `path` with the configuration's thresholds; ReplayError when it is missing, does not load, or is
    neither an anomaly nor a content model of this gateway."""
    from gateway.filters.onnx_session import open_session

    if not path.is_file():
        raise ReplayError(f"{path}: no such model file")
    try:
        _, meta = open_session(path)
    except Exception as exc:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) share no base but Exception
        raise ReplayError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    try:
        if "features" in meta:
            return _anomaly_model(path, cfg)
        if "normaliser" in meta:
            return _content_model(path, cfg)
    except ValueError as exc:  # the loaders' ModelMetadataError, or a threshold the model cannot take
        raise ReplayError(str(exc)) from None
    raise ReplayError(f"{path}: neither an anomaly model nor a content model (its metadata has neither 'features' "
                      "nor 'normaliser'; train it with models/anomaly/train.py or models/content/train.py)")


def _origin(configured: float | int, field_name: str) -> str:
    return f"config {field_name}" if configured else "model"


def _anomaly_model(path: Path, cfg: Config) -> Model:
    from devices.profiles import ProfileIndex, ProfileError, load_dir
    from gateway.filters.anomaly import AnomalyDetector
    from gateway.filters.stage import scored_measurements

    try:  # the fields the daemon scores: its profiles leave some alone
        profiles = ProfileIndex(load_dir(cfg.profiles_path()))
    except (ProfileError, OSError) as exc:
        raise ReplayError(f"device profiles: {exc}") from None
    a = cfg.anomaly
    detector = AnomalyDetector(path, threshold=a.threshold or None, start=a.episode_start or None,
                               persist=a.episode_persist or None, quiet=a.episode_quiet or None,
                               max_series=a.max_series)

    def score(rows: Sequence[Row]) -> list[Verdict]:
        return detector.score([(source, scored_measurements(profiles, source, orjson.loads(payload)), ts)
                               for _, source, ts, payload, _ in rows])

    settings = {"threshold": detector.threshold, "threshold_from": _origin(a.threshold, "anomaly.threshold"),
                "episode_start": detector.start, "episode_start_from": _origin(a.episode_start, "anomaly.episode_start"),
                "episode_persist": detector.persist,
                "episode_persist_from": _origin(a.episode_persist, "anomaly.episode_persist"),
                "episode_quiet": detector.quiet, "episode_quiet_from": _origin(a.episode_quiet, "anomaly.episode_quiet")}
    return Model(str(path), KIND_TELEMETRY, detector.name, detector.version, settings, score)


def _content_model(path: Path, cfg: Config) -> Model:
    from gateway.filters.content import ContentClassifier

    c = cfg.content
    classifier = ContentClassifier(path, mark_threshold=c.mark_threshold or None,
                                   block_threshold=c.block_threshold or None)

    def score(rows: Sequence[Row]) -> list[Verdict]:
        return classifier.score([orjson.loads(payload).get("text") for _, _, _, payload, _ in rows])

    settings = {"mark_threshold": classifier.mark_threshold,
                "mark_threshold_from": _origin(c.mark_threshold, "content.mark_threshold"),
                "block_threshold": classifier.block_threshold,
                "block_threshold_from": _origin(c.block_threshold, "content.block_threshold")}
    return Model(str(path), KIND_POST, classifier.name, classifier.version, settings, score)


def open_log(path: Path) -> sqlite3.Connection:
    try:
        return store.open_read_only(path)
    except FileNotFoundError:
        raise ReplayError(f"no log at {path}: has the gateway run with this data folder (--data-dir, "
                          "storage.data_dir)?") from None
    except (OSError, store.SchemaError) as exc:
        raise ReplayError(str(exc)) from None


@dataclass
class Tally:
    """Flagged at the time and now, over some events."""

    events: int = 0
    flagged_then: int = 0
    flagged_now: int = 0
    both: int = 0
    only_then: int = 0
    only_now: int = 0

    def add(self, then: bool, now: bool) -> None:
        self.events += 1
        self.flagged_then += then
        self.flagged_now += now
        self.both += then and now
        self.only_then += then and not now
        self.only_now += now and not then

    @property
    def differences(self) -> int:
        return self.only_then + self.only_now


@dataclass
class Report:
    model: Model
    since_ms: int | None
    first_offset: int = 0
    last_offset: int = 0
    totals: Tally = field(default_factory=Tally)
    sources: dict[str, Tally] = field(default_factory=dict)
    episode_starts: Tally = field(default_factory=Tally)  # `events` here: readings that started one then or now
    no_verdict_then: int = 0  # no model looked at it then (filter disabled, or a broken score): counted unflagged
    no_verdict_now: int = 0  # the new model gave a score that is not a number: counted unflagged, as the daemon would
    label_changed: int = 0  # both have a verdict and the labels differ (a post marked then, blocked now)
    warming_now: int = 0
    warming_flagged_then: int = 0  # of those, flagged at the time: "only then" for want of history, not the model
    models_then: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def add(self, rows: Sequence[Row], verdicts: Sequence[Verdict]) -> None:
        telemetry = self.model.kind == KIND_TELEMETRY
        for (_, source, _, _, then_json), now in zip(rows, verdicts):
            then = orjson.loads(then_json) if then_json else None
            if then is None:
                self.no_verdict_then += 1
            else:
                self.models_then[f"{then['model']} {then['version']}"] += 1
            if not math.isfinite(now.score):
                self.no_verdict_now += 1
                now_flagged = False
            else:
                now_flagged = now.flagged
            then_flagged = bool(then and then["flagged"])
            self.totals.add(then_flagged, now_flagged)
            tally = self.sources.get(source)
            if tally is None:
                tally = self.sources[source] = Tally()
            tally.add(then_flagged, now_flagged)
            if then is not None and then["label"] != now.label:
                self.label_changed += 1
            if telemetry:
                if now.label == WARMING:
                    self.warming_now += 1
                    self.warming_flagged_then += then_flagged
                started_then = then is not None and (then.get("detail") or {}).get("episode") == "start"
                started_now = (now.detail or {}).get("episode") == "start"
                if started_then or started_now:
                    self.episode_starts.add(started_then, started_now)

    def top(self, n: int) -> list[tuple[str, Tally]]:
        """The `n` sources whose verdicts differ most, most first."""
        differing = [(s, t) for s, t in self.sources.items() if t.differences]
        differing.sort(key=lambda st: (-st[1].differences, st[0]))
        return differing[:n]

    def as_dict(self, top: int) -> dict[str, Any]:
        m = self.model
        totals = asdict(self.totals)
        totals.update(no_verdict_then=self.no_verdict_then, no_verdict_now=self.no_verdict_now,
                      label_changed=self.label_changed)
        out: dict[str, Any] = {
            "model": {"path": m.path, "name": m.name, "version": m.version, **m.settings},
            "kind": m.kind,
            "since_ms": self.since_ms,
            "offsets": [self.first_offset, self.last_offset],
            "models_then": dict(self.models_then.most_common()),
            "totals": totals,
            "sources": len(self.sources),
            "sources_differing": sum(1 for t in self.sources.values() if t.differences),
            "top": [{"source": s, **asdict(t)} for s, t in self.top(top)],
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.totals.events / self.seconds) if self.seconds else None,
        }
        if m.kind == KIND_TELEMETRY:
            starts = asdict(self.episode_starts)
            del starts["events"]
            out["episode_starts"] = starts
            out["totals"]["warming_now"] = self.warming_now
            out["totals"]["warming_flagged_then"] = self.warming_flagged_then
        return out


def replay(db: sqlite3.Connection, model: Model, since_ms: int | None = None, *, batch: int = BATCH,
           progress: Callable[[int], None] | None = None, span: tuple[int, int] | None = None) -> Report:
    """Rescore the events of the model's kind between the log's first and last offset (fixed at the start: what is
    appended meanwhile is left out), `ts_ms >= since_ms` when given. `progress(n)` after each read, n offsets on.
    ReplayError when there is nothing to rescore."""
    span = span or store.offset_span(db)
    if span is None:
        raise ReplayError("the log holds no events")
    report = Report(model, since_ms, *span)
    pending: list[Row] = []
    started = time.monotonic()
    after, last = span[0] - 1, span[1]
    while after < last:
        upto = min(after + batch, last)
        pending += store.scan(db, model.kind, after, upto, since_ms)
        if len(pending) >= batch:
            report.add(pending, model.score(pending))
            pending = []
        if progress is not None:
            progress(upto - after)
        after = upto
    if pending:
        report.add(pending, model.score(pending))
    report.seconds = time.monotonic() - started
    if not report.totals.events:
        raise ReplayError(_nothing(db, model.kind, since_ms, span))
    return report


def _nothing(db: sqlite3.Connection, kind: str, since_ms: int | None, span: tuple[int, int]) -> str:
    what = "telemetry readings" if kind == KIND_TELEMETRY else "posts"
    if since_ms is None or not store.scan(db, kind, span[0] - 1, span[1]):
        return f"the log holds no {what}, which is what this model scores"
    return f"the log holds no {what} since {_iso(since_ms)}"


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_report(report: Report, top: int) -> str:
    m, t = report.model, report.totals
    what = "readings" if m.kind == KIND_TELEMETRY else "posts"
    settings = ", ".join(f"{k} {v} ({m.settings[k + '_from']})" for k, v in m.settings.items()
                         if not k.endswith("_from"))
    lines = [
        f"model       {m.name} {m.version} ({m.path}): {settings}",
        f"replayed    {t.events} {what}, offsets {report.first_offset}-{report.last_offset}"
        + (f", since {_iso(report.since_ms)}" if report.since_ms is not None else ""),
        "at the time " + (", ".join(f"{k} ({n})" for k, n in report.models_then.most_common()) or "no verdicts")
        + (f"; {report.no_verdict_then} without a verdict" if report.no_verdict_then and report.models_then else ""),
        f"flagged     then {t.flagged_then}, now {t.flagged_now}: both {t.both}, only then {t.only_then}, "
        f"only now {t.only_now}",
        f"labels      {report.label_changed} changed"
        + (f"; {report.no_verdict_now} scores now not a number (unflagged)" if report.no_verdict_now else ""),
    ]
    if m.kind == KIND_TELEMETRY:
        e = report.episode_starts
        lines += [
            f"episodes    started then {e.flagged_then}, now {e.flagged_now}, on the same reading: both {e.both}, "
            f"only then {e.only_then}, only now {e.only_now}",
            f"warm-up     {report.warming_now} readings warming now ({report.warming_flagged_then} of them flagged "
            "then): replay starts every series from nothing, while at the time each had the history the daemon "
            "had seen",
        ]
    rate = f", {t.events / report.seconds:,.0f} {what}/s" if report.seconds else ""
    lines.append(f"speed       {report.seconds:.2f} s{rate}")
    rows = report.top(top)
    differing = sum(1 for x in report.sources.values() if x.differences)
    if not differing:
        lines.append(f"\nno {'device' if m.kind == KIND_TELEMETRY else 'author'} differs "
                     f"({len(report.sources)} in all)")
    elif rows:
        lines.append(f"\nmost different ({len(rows)} of the {differing} of {len(report.sources)} sources that differ):")
        width = max(len("source"), *(len(s) for s, _ in rows))
        lines.append(f"{'source':<{width}}  {what:>8}  {'then':>6}  {'now':>6}  {'both':>6}  {'only then':>9}"
                     f"  {'only now':>8}")
        for s, x in rows:
            lines.append(f"{s:<{width}}  {x.events:>8}  {x.flagged_then:>6}  {x.flagged_now:>6}  {x.both:>6}"
                         f"  {x.only_then:>9}  {x.only_now:>8}")
    return "\n".join(lines)
