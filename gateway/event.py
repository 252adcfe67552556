"""The typed records every stage of the pipeline hands to the next.

Sources produce `Ingested` records (not yet durable); the ingest log turns them into `Event`s by giving each an
offset; filters attach `Verdict`s; fan-out turns an event and its verdicts into an envelope for each follower.
Everything here is immutable so a record can be shared between stages without copies.
"""

from __future__ import annotations

import functools
import json
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping

KIND_TELEMETRY = "telemetry"


@dataclass(frozen=True, slots=True)
class Ingested:
    """A validated event from a source, waiting to be appended to the log.

    `dedup_key` is what identifies a retransmission of the same event from the same source (the device's `seq`);
    None when the source gave nothing to recognise one by, in which case every copy is a new event.
    """

    id: str
    source: str
    kind: str
    ts_ms: int
    payload: Mapping[str, Any]
    dedup_key: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """An event that is durably in the ingest log at `offset`.

    `payload_json` is the payload as the log stores it (compact JSON, no NaN), so fan-out can put it into the
    envelope as it is instead of encoding the payload again; "" when the event did not come from the log.
    """

    offset: int
    id: str
    source: str
    kind: str
    ts_ms: int
    payload: Mapping[str, Any]
    payload_json: str = ""

    @property
    def source_id(self) -> str:
        """The id part of `source` (`dev-0001` for `devices/dev-0001`)."""
        return self.source.partition("/")[2]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What one model said about one event. `flagged` is the policy's decision, `score` the model's output."""

    model: str
    version: str
    score: float
    label: str
    flagged: bool
    detail: Mapping[str, Any] | None = None

    def to_json(self) -> str:
        """`as_dict` as compact JSON. Every event carries a verdict, and most are a plain "normal" without detail:
        those are formatted directly (the same text json.dumps gives), which costs a fraction of building the dict
        and encoding it."""
        score = round(self.score, 6)
        if self.detail or not math.isfinite(score):
            return json.dumps(self.as_dict(), separators=(",", ":"))
        return (f'{{"model":{_json_text(self.model)},"version":{_json_text(self.version)},"score":{score!r},'
                f'"label":{_json_text(self.label)},"flagged":{"true" if self.flagged else "false"}}}')

    @classmethod
    def from_json(cls, text: str) -> "Verdict":
        d = json.loads(text)
        return cls(d["model"], d["version"], d["score"], d["label"], d["flagged"], d.get("detail"))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": self.model,
            "version": self.version,
            "score": round(self.score, 6),
            "label": self.label,
            "flagged": self.flagged,
        }
        if self.detail:
            out["detail"] = dict(self.detail)
        return out


@functools.lru_cache(maxsize=256)
def _json_text(text: str) -> str:
    """A JSON string literal; cached because model names, versions and labels are a handful of values."""
    return json.dumps(text)


_last_ms = 0
_counter = 0
_rng = random.Random()  # seeded from os.urandom once, at import


def new_event_id(now_ms: int | None = None) -> str:
    """A time-ordered unique id: 48-bit milliseconds, a 16-bit per-millisecond counter, 48 random bits.

    Ids sort by creation time within one process (the counter keeps ids of the same millisecond in order), and the
    random tail keeps ids from different gateways or restarts apart. 28 hex characters, lowercase.
    """
    global _last_ms, _counter
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    if ms <= _last_ms:
        # Same millisecond, or the clock stepped back: stay monotonic by borrowing the last millisecond.
        ms = _last_ms
        _counter += 1
        if _counter > 0xFFFF:
            ms += 1
            _counter = 0
    else:
        _counter = 0
    _last_ms = ms
    # The tail tells gateways and restarts apart; it need not be unpredictable, so no syscall per id (os.urandom).
    return f"{ms:012x}{_counter:04x}{_rng.getrandbits(48):012x}"
