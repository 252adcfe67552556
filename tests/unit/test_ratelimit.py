"""Per-source rate limits: the token bucket itself, and the MQTT source dead-lettering what is over the limit."""

from __future__ import annotations

import asyncio
import json

import pytest

from devices import profiles
from gateway import config
from gateway.event import Ingested
from gateway.ingest_log import DeadLetter
from gateway.metrics import Metrics
from gateway.ratelimit import TokenBuckets
from gateway.sources.mqtt import MqttSource


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_passes_then_the_rate_holds() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=10, burst=5, clock=clock)
    assert [limiter.allow("a") for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.1  # one token back
    assert [limiter.allow("a") for _ in range(2)] == [True, False]
    clock.now += 0.25  # two and a half tokens back
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_a_steady_source_at_the_rate_is_never_refused_and_one_above_it_is_held_to_it() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=100, burst=10, clock=clock)
    allowed = 0
    for _ in range(1000):  # 10 s at exactly 100/s
        clock.now += 0.01
        allowed += limiter.allow("steady")
    assert allowed == 1000
    allowed = 0
    for _ in range(3000):  # 10 s at 300/s: the rate, plus the burst once
        clock.now += 1 / 300
        allowed += limiter.allow("flood")
    assert 1000 <= allowed <= 1000 + 10 + 1


def test_sources_are_independent_and_idle_ones_refill_only_to_the_burst() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=1, burst=2, clock=clock)
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]
    assert limiter.allow("b")  # a's flood costs b nothing
    clock.now += 3600  # an hour idle earns the burst, not 3,600 tokens
    assert [limiter.allow("a") for _ in range(3)] == [True, True, False]


def test_the_default_burst_is_twice_the_rate_and_at_least_one() -> None:
    assert TokenBuckets(rate=50).burst == 100
    assert TokenBuckets(rate=0.1).burst == 1
    assert TokenBuckets(rate=50, burst=7).burst == 7
    with pytest.raises(ValueError):
        TokenBuckets(rate=0)


def test_idle_sources_are_forgotten_so_memory_follows_the_active_ones() -> None:
    clock = Clock()
    limiter = TokenBuckets(rate=10, burst=10, clock=clock, max_keys=100)
    for i in range(100):
        limiter.allow(f"old{i}")
    clock.now += 1.0  # burst / rate: every old bucket is full again
    for i in range(50):
        limiter.allow(f"new{i}")
    assert len(limiter) == 50
    # Sources active at the same time are all kept (forgetting them would hand out fresh bursts).
    for i in range(300):
        limiter.allow(f"busy{i}")
    assert len(limiter) == 350


class SubmitRecorder:
    def __init__(self) -> None:
        self.submitted: list[tuple[Ingested | DeadLetter, object]] = []
        self.dead: list[DeadLetter] = []

    def submit(self, record: Ingested | DeadLetter, token: object) -> None:
        self.submitted.append((record, token))

    async def dead_letter(self, letter: DeadLetter) -> None:
        self.dead.append(letter)


def _source(limits: config.LimitsConfig) -> tuple[MqttSource, SubmitRecorder, Metrics]:
    ingestor, metrics = SubmitRecorder(), Metrics()
    src = MqttSource(ingestor, None, None, profiles.ProfileIndex([]), limits, metrics)  # type: ignore[arg-type]
    return src, ingestor, metrics


def test_the_source_dead_letters_events_over_the_limit_and_still_acknowledges_them() -> None:
    src, ingestor, metrics = _source(config.LimitsConfig(per_source_rate=0.001, per_source_burst=3))
    for i in range(5):
        assert src.take("devices/flood/telemetry", json.dumps({"seq": i, "t": 1.0}).encode(), ("c", i))
    assert src.take("devices/calm/telemetry", b'{"t": 1.0}', ("c", 99))
    assert src.take("users/flood/posts", b'{"text": "hi"}', ("c", 100))  # users/flood is another source
    kinds = [(type(r).__name__, getattr(r, "reason", None), token) for r, token in ingestor.submitted]
    assert kinds == [("Ingested", None, ("c", 0)), ("Ingested", None, ("c", 1)), ("Ingested", None, ("c", 2)),
                     ("DeadLetter", "rate_limited", ("c", 3)), ("DeadLetter", "rate_limited", ("c", 4)),
                     ("Ingested", None, ("c", 99)), ("Ingested", None, ("c", 100))]
    letter = ingestor.submitted[3][0]
    assert isinstance(letter, DeadLetter)
    assert letter.origin == "devices/flood/telemetry" and json.loads(letter.payload)["seq"] == 3
    assert "per_source_rate" in letter.message
    assert metrics.get("rate_limited") == 2 and metrics.get("received") == 7


def test_follow_requests_count_against_the_same_source() -> None:
    src, ingestor, metrics = _source(config.LimitsConfig(per_source_rate=0.001, per_source_burst=1))
    assert src.take("users/spam/posts", b'{"text": "hi"}', 1)
    asyncio.run(src.handle("users/spam/follows", b'{"follow": "devices/d1"}', {}))
    assert [d.reason for d in ingestor.dead] == ["rate_limited"]
    assert metrics.get("rate_limited") == 1


def test_without_a_limit_every_event_goes_through() -> None:
    assert config.LimitsConfig().per_source_rate == 0  # off by default: tests and benchmarks flood few devices
    src, ingestor, metrics = _source(config.LimitsConfig())
    for i in range(5000):
        src.take("devices/one/telemetry", b'{"t": 1.0}', i)
    assert all(isinstance(r, Ingested) for r, _ in ingestor.submitted)
    assert metrics.get("rate_limited") == 0


def test_limits_are_validated() -> None:
    with pytest.raises(config.ConfigError, match="limits.per_source_burst = 10.0: needs limits.per_source_rate"):
        config.parse("[limits]\nper_source_burst = 10")
    with pytest.raises(config.ConfigError, match="limits.per_source_rate = -1: must be"):
        config.parse("[limits]\nper_source_rate = -1")
    cfg = config.parse("[limits]\nper_source_rate = 50\nper_source_burst = 200")
    assert (cfg.limits.per_source_rate, cfg.limits.per_source_burst) == (50.0, 200.0)


def test_the_limiter_is_cheap_on_the_hot_path() -> None:
    """A guard against an accidental slow path (a regex, a key built per message): 200k checks well under a
    second even on a small, shared machine."""
    import time

    limiter = TokenBuckets(rate=1e9)
    ids = [f"dev-{i}" for i in range(100)]
    started = time.perf_counter()
    for _ in range(2000):
        for key in ids:
            limiter.allow(key)
    assert time.perf_counter() - started < 1.0
