"""The arithmetic of a `firmware-sim chaos` run: from what was sent, acknowledged and delivered to the verdict.

Pure: no I/O, no clock. A key is one reading, `(device id, seq)`; every reading of a run has its own key.

    sent           readings published (probes that only checked the follows are not counted)
    acknowledged   readings the broker confirmed with a PUBACK: from then on the installation owns them
    refused        PUBACKs with an MQTT 5 failure reason code (not authorised, quota exceeded, ...)
    unacknowledged sent, neither acknowledged nor refused when the run ended
    delivered      distinct readings that reached the follower
    lost           acknowledged but never delivered within the drain timeout
    duplicates     deliveries beyond the first of a reading (at-least-once allows them)
    relogged       readings delivered under more than one event id: the gateway logged the same reading twice,
                   so its duplicate detection by (device, seq, ts) missed a retransmission
    latency        first delivery minus the first publish of each delivered reading (a reading re-sent after a
                   fault counts from its first attempt, so outages show up in the tail)

The run passes when nothing acknowledged was lost, every publish was answered by the broker and, if InfluxDB was
checked, every reading that must be there is there exactly once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping, Sequence

Key = tuple[str, int]  # (device id, seq)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]) of `values`, None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Delivery:
    at: float  # monotonic seconds, the same clock as the publish times
    event_id: str


@dataclass(frozen=True)
class FaultRecord:
    """What one kind of fault did during the run: how often it was injected, and what the user should know."""

    name: str
    injected: int = 0
    failed: int = 0  # injections that could not be carried out (a restart command failed, ...)
    notes: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {"injected": self.injected, "failed": self.failed, "notes": list(self.notes)}


@dataclass(frozen=True)
class HostileRecord:
    sent: int
    deadletters_seen: int
    reasons_seen: Mapping[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"sent": self.sent, "deadletters_seen": self.deadletters_seen,
                "reasons_seen": dict(sorted(self.reasons_seen.items()))}


@dataclass(frozen=True)
class InfluxRecord:
    expected: int
    present: int
    missing: int
    duplicated: int  # extra points beyond one per reading
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "present": self.present, "missing": self.missing,
                "duplicated": self.duplicated, "error": self.error}


@dataclass(frozen=True)
class Tally:
    sent: int
    acknowledged: int
    refused: int
    unacknowledged: int
    delivered: int
    delivered_unacknowledged: int  # delivered although the PUBACK never came (it was lost on the way back)
    lost: int
    duplicates: int
    relogged: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    lost_examples: tuple[Key, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "refused": self.refused,
            "unacknowledged": self.unacknowledged,
            "delivered": self.delivered,
            "delivered_unacknowledged": self.delivered_unacknowledged,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "relogged": self.relogged,
            "latency_p50_ms": self.latency_p50_ms,
            "latency_p99_ms": self.latency_p99_ms,
            "latency_max_ms": self.latency_max_ms,
            "lost_examples": [f"{d}#{s}" for d, s in self.lost_examples],
        }


def tally(sent_at: Mapping[Key, float], acknowledged: Collection[Key], refused: Collection[Key],
          deliveries: Mapping[Key, Sequence[Delivery]], examples: int = 5) -> Tally:
    """Count a run. Deliveries and acknowledgements of keys that were not sent (probes, other runs) are ignored."""
    acked = {k for k in acknowledged if k in sent_at}
    refused_set = {k for k in refused if k in sent_at} - acked
    delivered = {k for k, ds in deliveries.items() if k in sent_at and ds}
    lost = sorted(acked - delivered)
    duplicates = sum(len(deliveries[k]) - 1 for k in delivered)
    relogged = sum(1 for k in delivered if len({d.event_id for d in deliveries[k]}) > 1)
    latencies = [(min(d.at for d in deliveries[k]) - sent_at[k]) * 1000.0 for k in delivered]

    def ms(q: float) -> float | None:
        value = percentile(latencies, q)
        return None if value is None else round(value, 1)

    return Tally(
        sent=len(sent_at),
        acknowledged=len(acked),
        refused=len(refused_set),
        unacknowledged=len(sent_at) - len(acked) - len(refused_set),
        delivered=len(delivered),
        delivered_unacknowledged=len(delivered - acked),
        lost=len(lost),
        duplicates=duplicates,
        relogged=relogged,
        latency_p50_ms=ms(50),
        latency_p99_ms=ms(99),
        latency_max_ms=ms(100),
        lost_examples=tuple(lost[:examples]),
    )


def influx_tally(must_be_there: Iterable[Key], points: Mapping[Key, int], error: str | None = None) -> InfluxRecord:
    """Points per reading against the readings that must have been written (acknowledged or delivered ones)."""
    expected = set(must_be_there)
    present = {k for k in expected if points.get(k, 0) > 0}
    duplicated = sum(n - 1 for k, n in points.items() if k in expected and n > 1)
    return InfluxRecord(len(expected), len(present), len(expected - present), duplicated, error)


def must_reach_influx(acknowledged: Collection[Key], deliveries: Mapping[Key, Sequence[Delivery]],
                      sent_at: Mapping[Key, float]) -> set[Key]:
    """Every reading the gateway must have written: what the broker acknowledged, and what was delivered anyway."""
    return {k for k in acknowledged if k in sent_at} | {k for k, ds in deliveries.items() if k in sent_at and ds}


@dataclass(frozen=True)
class Report:
    prefix: str
    broker: str
    devices: int
    rate: float
    duration_s: float
    drain_timeout_s: float
    tally: Tally
    faults: tuple[FaultRecord, ...] = ()
    hostile: HostileRecord | None = None
    influx: InfluxRecord | None = None
    problems: tuple[str, ...] = field(default=())  # things that went wrong in the run itself
    interrupted_at: float | None = None  # seconds of load when Ctrl-C (or SIGTERM) stopped the run early

    def failures(self) -> list[str]:
        """Why the run fails, in words; empty when it passes."""
        out: list[str] = []
        t = self.tally
        if t.sent == 0:
            out.append("nothing was sent")
        if t.lost:
            out.append(f"{t.lost} acknowledged readings never reached the follower within "
                       f"{self.drain_timeout_s:g}s after the last publish")
        if t.unacknowledged:
            out.append(f"{t.unacknowledged} publishes were never acknowledged by the broker")
        if t.refused:
            out.append(f"{t.refused} publishes were refused by the broker")
        if self.influx is not None:
            if self.influx.error is not None:
                out.append(f"InfluxDB could not be checked: {self.influx.error}")
            if self.influx.missing:
                out.append(f"{self.influx.missing} readings are missing from InfluxDB")
            if self.influx.duplicated:
                out.append(f"{self.influx.duplicated} extra points in InfluxDB (readings written twice)")
        return out + list(self.problems)

    @property
    def passed(self) -> bool:
        return not self.failures()

    def as_dict(self) -> dict[str, Any]:
        return {
            "result": "pass" if self.passed else "fail",
            "failures": self.failures(),
            "prefix": self.prefix,
            "broker": self.broker,
            "devices": self.devices,
            "rate": self.rate,
            "duration_s": self.duration_s,
            "interrupted_at_s": self.interrupted_at,
            "drain_timeout_s": self.drain_timeout_s,
            **self.tally.as_dict(),
            "faults": {f.name: f.as_dict() for f in self.faults},
            "hostile": self.hostile.as_dict() if self.hostile is not None else None,
            "influx": self.influx.as_dict() if self.influx is not None else None,
        }

    def text(self) -> str:
        t = self.tally
        planned = f"{self.duration_s:g}s"
        if self.interrupted_at is not None:
            planned = f"{self.interrupted_at:.1f}s (interrupted; {self.duration_s:g}s planned)"
        lines = [f"firmware-sim chaos: {self.devices} devices ({self.prefix}*) at {self.rate:g}/s for {planned} "
                 f"against {self.broker}"]
        if self.faults:
            lines.append("faults:")
            for f in self.faults:
                failed = f", {f.failed} failed" if f.failed else ""
                lines.append(f"  {f.name:<15} injected {f.injected}{failed}")
                lines.extend(f"  {'':<15}   {note}" for note in _collapse(f.notes))
        lines += [
            f"sent           {t.sent}",
            f"acknowledged   {t.acknowledged}   (PUBACK from the broker"
            + (f"; {t.refused} refused" if t.refused else "")
            + (f"; {t.unacknowledged} never answered" if t.unacknowledged else "") + ")",
            f"delivered      {t.delivered}   (distinct readings at the follower"
            + (f"; {t.delivered_unacknowledged} of them without a PUBACK" if t.delivered_unacknowledged else "")
            + ")",
            f"lost           {t.lost}   (acknowledged, not delivered within {self.drain_timeout_s:g}s)"
            + (f" e.g. {', '.join(f'{d}#{s}' for d, s in t.lost_examples)}" if t.lost_examples else ""),
            f"duplicated     {t.duplicates}   (extra deliveries; at-least-once allows them"
            + (f"; {t.relogged} readings under two event ids" if t.relogged else "") + ")",
            f"latency        p50 {_ms(t.latency_p50_ms)}  p99 {_ms(t.latency_p99_ms)}  max {_ms(t.latency_max_ms)}",
        ]
        if self.hostile is not None:
            h = self.hostile
            reasons = ", ".join(f"{r} {n}" for r, n in sorted(h.reasons_seen.items())) or "none"
            lines.append(f"dead letters   {h.deadletters_seen} seen of {h.sent} hostile messages sent "
                         f"(QoS 0 and rate-limited by the gateway, so fewer is normal)")
            lines.append(f"               {reasons}")
        if self.influx is not None:
            i = self.influx
            if i.error is not None:
                lines.append(f"influxdb       not checked: {i.error}")
            else:
                lines.append(f"influxdb       {i.present} of {i.expected} readings present, {i.missing} missing, "
                             f"{i.duplicated} duplicated")
        failures = self.failures()
        lines.append("result         " + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
        return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _collapse(notes: Iterable[str]) -> list[str]:
    """Runs of the same note as one line with a count."""
    out: list[tuple[str, int]] = []
    for note in notes:
        if out and out[-1][0] == note:
            out[-1] = (note, out[-1][1] + 1)
        else:
            out.append((note, 1))
    return [note if n == 1 else f"{note} (x{n})" for note, n in out]
