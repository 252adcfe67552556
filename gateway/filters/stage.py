"""The filter stage: every model's verdict on a batch, computed before the batch is logged.

    records of one commit ──▶ telemetry: anomaly model (one ONNX run) ──▶ a verdict per record, stored with it
                         └──▶ posts: content model (one run per few texts)

Verdicts are computed before the append and stored in the event's row because a model's answer is not a pure
function of the event: the anomaly model scores a reading against its device's recent history, which starts empty
after a restart. Stored once, the verdict is what every consumer sees, live or reading back, before and after a
crash: the InfluxDB point (whose `anomaly` tag is part of its identity) and the follower's envelope stay identical.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Protocol, Sequence

from gateway.event import KIND_POST, KIND_TELEMETRY, Event, Ingested, Verdict
from gateway.ops.metrics import Metrics

log = logging.getLogger(__name__)

DEVICE_PREFIX = "devices/"  # a reading's source is devices/{id}


class Detector(Protocol):
    def score(self, items: Sequence[tuple[str, Mapping[str, float], int]]) -> list[Verdict]: ...

    def warm(self, items: Sequence[tuple[str, Mapping[str, float], int, float | None]]) -> None: ...


class TextScorer(Protocol):
    def score(self, texts: Sequence[Any]) -> list[Verdict]: ...


def measurements(payload: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in payload.items() if k != "seq" and k != "ts"}


class Profiles(Protocol):
    """What the filters need of the device profiles (devices.profiles.ProfileIndex): a device's, cached per device."""

    def get(self, device_id: str) -> Any: ...


def scored_measurements(profiles: Profiles | None, source: str, payload: Mapping[str, Any]) -> dict[str, float]:
    """The fields of a reading the anomaly model scores: its measurements, less those its device's profile leaves
    alone."""
    fields = measurements(payload)
    if profiles is not None:
        profile = profiles.get(source[len(DEVICE_PREFIX):])
        if profile is not None and profile.unscored:
            for name in profile.unscored & fields.keys():
                del fields[name]
    return fields


class Filters:
    """`profiles`, when given, names per device the fields the anomaly model leaves alone (a profile field's
    `anomaly = false`, by default every field sent as words such as ON/OFF); replaced on SIGHUP."""

    def __init__(self, detector: Detector | None, content: TextScorer | None, metrics: Metrics,
                 profiles: Profiles | None = None) -> None:
        self.detector = detector
        self.content = content
        self.profiles = profiles
        self._metrics = metrics

    def score(self, records: Sequence[Ingested]) -> list[Verdict | None]:
        """One verdict per record (None where no model applies), one model run per kind per batch."""
        out: list[Verdict | None] = [None] * len(records)
        if self.detector is not None:
            at = [i for i, r in enumerate(records) if r.kind == KIND_TELEMETRY]
            if at:
                profiles = self.profiles
                readings = [records[i] for i in at]
                verdicts = self._finite(self.detector.score(
                    [(r.source, scored_measurements(profiles, r.source, r.payload), r.ts_ms) for r in readings]))
                for i, v in zip(at, verdicts):
                    out[i] = v
                flagged = sum(1 for v in verdicts if v is not None and v.flagged)
                self._metrics.inc("filtered", len(at))
                if flagged:
                    self._metrics.inc("anomalies", flagged)
        if self.content is not None:
            at = [i for i, r in enumerate(records) if r.kind == KIND_POST]
            if at:
                verdicts = self._finite(self.content.score([records[i].payload["text"] for i in at]))
                for i, v in zip(at, verdicts):
                    out[i] = v
                self._metrics.inc("filtered", len(at))
        return out

    def warm(self, events: Sequence[Event]) -> int:
        """At start: the telemetry of the log's tail teaches the detector what it knew before the restart (see
        AnomalyDetector.warm). Returns how many readings it learned from."""
        if self.detector is None:
            return 0
        items = [(e.source, scored_measurements(self.profiles, e.source, e.payload), e.ts_ms,
                  e.verdict.score if e.verdict is not None and e.verdict.flagged else None)
                 for e in events if e.kind == KIND_TELEMETRY]
        self.detector.warm(items)
        return len(items)

    def _finite(self, verdicts: list[Verdict]) -> list[Verdict | None]:
        """A score that is not a number is a broken model, not a verdict: the event goes on without one."""
        if all(math.isfinite(v.score) for v in verdicts):
            return verdicts  # type: ignore[return-value]
        bad = sum(1 for v in verdicts if not math.isfinite(v.score))
        self._metrics.inc("filter_errors", bad)
        log.error("a model gave %d non-finite scores; those events are logged without a verdict", bad)
        return [v if math.isfinite(v.score) else None for v in verdicts]
