"""The InfluxDB consumer: one point per reading, written in batches by a thread of its own.

    batch of events (event loop) ─▶ telemetry lines ─▶ buffer (bounded) ─▶ writer thread: one request per
                                                                          flush_interval, up to max_lines lines
                  future per batch ◀──────── resolved when the request that carried it succeeded ◀──┘

A reading's point: measurement `telemetry`, tags `device` and `anomaly` ("true"/"false"), its numeric fields, `seq`,
`anomaly_score`, and on the reading that starts or ends an anomaly episode (an alert) `anomaly_episode` ("start",
"end"). Its timestamp is the reading's millisecond plus the log offset (mod 10^6) as nanoseconds: two
readings of one device in the same millisecond are two points, and writing a batch again (after a crash, or a
request whose answer was lost) writes identical points, which InfluxDB overwrites: idempotent. Points are written at
least once; InfluxDB makes that exactly once.

The buffer is the only place points wait in memory, and it is bounded (`max_points`): while InfluxDB is slow or
away, `deliver` waits, the consumer in front of it falls behind and reads back from the log later, so an outage
costs the log disk (within its budget), never memory. Failures are decided by the writer's error type
(gateway/sinks/influx_writers.py): retryable (back off, at least the server's Retry-After; the same body again);
too large (413: halves); rejected (400/422: the batches are bisected, and only the one holding the bad line is
dropped, as a dead letter with the server's reason, so one bad point cannot stall the rest).

Besides readings the sink writes snapshots that are not events (the live counts, the gateway's own metrics) through
`put_points`; those are dropped, and counted, when the buffer is full.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from gateway.backoff import Backoff
from gateway.event import KIND_TELEMETRY, Event, InTransaction, Point
from gateway.ops.metrics import Metrics
from gateway.sinks.influx_writers import RejectedWriteError, RetryableWriteError, TooLargeError, Writer
from gateway.sinks.lineprotocol import encode, encode_line, field_key_is_plain, format_value, series_head, split_lines

log = logging.getLogger(__name__)
_isfinite = math.isfinite

_RESERVED = ("seq", "ts")
# Field keys a reading's own fields may not take in the fast path: the gateway adds these to the line itself.
_ADDED = frozenset({"anomaly_score", "anomaly_episode"})
_INT64_MAX = 2**63 - 1
_CACHE_MAX = 65_536


def telemetry_lines(events: Sequence[Event]) -> tuple[bytes, int]:
    """The line-protocol body of a batch's readings, and how many points it holds."""
    lines: list[str] = []
    for e in events:
        if e.kind != KIND_TELEMETRY:
            continue
        line = _plain_line(e)
        if line is None:
            line = _line(e)
        if line is not None:
            lines.append(line)
    if not lines:
        return b"", 0
    # "replace": a lone surrogate cannot be UTF-8; it becomes "?" instead of failing the batch.
    return ("\n".join(lines) + "\n").encode("utf-8", "replace"), len(lines)


# The fast path's caches: the head of each device's two series, and field keys known to need no escaping.
_HEADS: dict[tuple[str, bool], str] = {}
_PLAIN_KEYS: set[str] = set()


def _plain_line(e: Event) -> str | None:
    """The line of a reading of plain field keys and finite float values with a finite score, written directly
    from the caches (what nearly every reading is, and the line encoding was a tenth of the event loop's time:
    benchmarks/RESULTS.md); None for anything else, which `_line` writes. Both give the same line for what both
    can write (tests/unit/test_fanout_and_points.py)."""
    verdict = e.verdict
    if verdict is not None and not (type(verdict.score) is float and _isfinite(verdict.score)):
        return None
    payload = e.payload
    parts: list[str] = []
    for k, v in payload.items():
        if k in _RESERVED:
            continue
        if type(v) is not float or not _isfinite(v) or (k not in _PLAIN_KEYS and not _learn_plain(k)):
            return None
        parts.append(f"{k}={v!r}")
    seq = payload.get("seq")
    if not parts or (seq is not None and not (type(seq) is int and 0 <= seq <= _INT64_MAX)):
        return None
    if seq is not None:
        parts.append(f"seq={seq}i")
    flagged = False
    if verdict is not None:
        parts.append(f"anomaly_score={verdict.score!r}")
        flagged = verdict.flagged
        if verdict.detail is not None and "episode" in verdict.detail:
            parts.append(f"anomaly_episode={format_value(str(verdict.detail['episode']))}")
    key = (e.source, flagged)
    head = _HEADS.get(key)
    if head is None:
        if len(_HEADS) >= _CACHE_MAX:
            _HEADS.clear()
        head = _HEADS[key] = series_head("telemetry", (("anomaly", "true" if flagged else "false"),
                                                        ("device", e.source_id)))
    if not head:
        return None
    return f"{head} {','.join(parts)} {e.ts_ms * 1_000_000 + e.offset % 1_000_000}"


def _learn_plain(key: str) -> bool:
    if key in _ADDED or not field_key_is_plain(key):
        return False
    if len(_PLAIN_KEYS) < _CACHE_MAX:
        _PLAIN_KEYS.add(key)
    return True


def _line(e: Event) -> str | None:
    """Any reading, through the general encoder."""
    payload = e.payload
    fields: list[tuple[str, Any]] = [(k, v) for k, v in payload.items() if k not in _RESERVED]
    seq = payload.get("seq")
    if seq is not None:
        fields.append(("seq", int(seq)))
    verdict = e.verdict
    anomalous = "false"
    if verdict is not None:
        fields.append(("anomaly_score", verdict.score))
        if verdict.flagged:
            anomalous = "true"
        if verdict.detail is not None and "episode" in verdict.detail:
            fields.append(("anomaly_episode", str(verdict.detail["episode"])))
    return encode_line("telemetry", (("anomaly", anomalous), ("device", e.source_id)), fields,
                       e.ts_ms * 1_000_000 + e.offset % 1_000_000)


@dataclass(slots=True)
class _Chunk:
    body: bytes
    points: int
    future: asyncio.Future[Any] | None  # None: a snapshot nobody waits for


@dataclass(frozen=True, slots=True)
class InfluxStats:
    written: int  # points the server accepted
    requests: int
    retried: int  # failed requests that were retried
    splits: int  # bodies cut in half after a 413 or a rejection
    dropped: int  # points the server rejected (dead-lettered), or snapshots dropped for lack of room
    buffered: int  # points waiting in memory
    last_error: str | None
    backoff_s: float


class InfluxSink:
    name = "influx"

    def __init__(self, writer: Writer, metrics: Metrics, *, flush_interval: float = 0.2, max_lines: int = 5000,
                 max_body_bytes: int = 1 << 20, max_points: int = 50_000, backoff_initial: float = 0.5,
                 backoff_max: float = 60.0,
                 on_rejected: Callable[[bytes, int, str], None] | None = None) -> None:
        self.writer = writer
        self._metrics = metrics
        self._flush_interval = flush_interval
        self._max_lines = max_lines
        self._max_body_bytes = max_body_bytes
        self._max_points = max_points
        self._backoff = Backoff(backoff_initial, backoff_max)
        self._on_rejected = on_rejected
        self._lock = threading.Lock()
        self._chunks: list[_Chunk] = []
        self._buffered = 0
        self._wake = threading.Event()  # set when the thread is idle and something arrives, or to stop/hurry
        self._idle = False
        self._hurry = False  # shutting down: no pauses between requests
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="influx-writer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._room = asyncio.Event()
        self._room.set()
        self._written = self._requests = self._retried = self._splits = self._dropped = 0
        self._last_error: str | None = None
        self._backoff_s = 0.0

    # --- the event loop's side -------------------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    async def deliver(self, events: Sequence[Event]) -> asyncio.Future[Any] | None:
        body, points = telemetry_lines(events)
        if not points:
            return None
        while self._buffered >= self._max_points:
            self._room.clear()
            await self._room.wait()
        return self.put(body, points)

    def put(self, body: bytes, points: int) -> asyncio.Future[Any]:
        """Queue an encoded body of `points` lines; the future resolves once it is written (or, rejected by the
        server, dropped as a dead letter). Does not wait for room: `deliver` does."""
        future = asyncio.get_running_loop().create_future()
        self._put(_Chunk(body, points, future))
        return future

    def state(self, results: list[Any]) -> InTransaction | None:
        return None

    def put_points(self, points: Sequence[Point]) -> bool:
        """Snapshots (live counts, self-metrics): written with the next request; False (dropped) when full."""
        body = encode(points)
        if not body:
            return True
        if self._buffered >= self._max_points:
            with self._lock:
                self._dropped += len(points)
            return False
        self._put(_Chunk(body, len(points), None))
        return True

    def _put(self, chunk: _Chunk) -> None:
        with self._lock:
            self._chunks.append(chunk)
            self._buffered += chunk.points
            idle = self._idle
        if idle or self._buffered >= self._max_lines:
            self._wake.set()

    def stats(self) -> InfluxStats:
        with self._lock:
            return InfluxStats(self._written, self._requests, self._retried, self._splits, self._dropped,
                               self._buffered, self._last_error, self._backoff_s)

    def hurry(self) -> None:
        """Shutting down: write what is buffered without the pauses between requests."""
        self._hurry = True
        self._wake.set()

    async def flush(self, timeout: float) -> bool:
        """Write what is buffered without pauses; True when empty within `timeout`, False at once while writes
        fail (the points are in the log; they are written after the restart)."""
        self._hurry = True
        self._wake.set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._chunks and self._buffered == 0:
                    return True
                if self._backoff.failing:
                    return False
            await asyncio.sleep(0.02)
        return False

    def stop(self, timeout: float) -> None:
        self._stopping = True
        self._hurry = True
        self._wake.set()
        self._thread.join(timeout)
        self.writer.close()

    def _resolve(self, chunks: list[_Chunk]) -> None:
        """Event loop: the futures of written (or dropped) chunks; room for `deliver`."""
        for chunk in chunks:
            if chunk.future is not None and not chunk.future.done():
                chunk.future.set_result(None)
        if self._buffered < self._max_points:
            self._room.set()

    # --- the writer thread -----------------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            with self._lock:
                chunks, more = self._take()
                self._idle = not chunks
            if not chunks:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            started = time.monotonic()
            try:
                self._write(chunks)
            except _Stopping:
                return
            if not more and not self._hurry and self._flush_interval:
                # That was everything: let the next points gather before the next request. One request per batch
                # at 2,000 events/s cost InfluxDB and the gateway more than the points themselves.
                self._pause(self._flush_interval - (time.monotonic() - started))

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._hurry and not self._stopping:
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def _take(self) -> tuple[list[_Chunk], bool]:
        """The oldest chunks that fit in one request (at least one), and whether any were left. Under the lock."""
        taken: list[_Chunk] = []
        lines = size = 0
        for chunk in self._chunks:
            if taken and (lines + chunk.points > self._max_lines or size + len(chunk.body) > self._max_body_bytes):
                break
            taken.append(chunk)
            lines += chunk.points
            size += len(chunk.body)
        del self._chunks[:len(taken)]
        return taken, bool(self._chunks)

    def _write(self, chunks: list[_Chunk]) -> None:
        """Write until done: retry what is retryable (same chunks), split what is too large, drop what is bad."""
        while True:
            if self._stopping:
                raise _Stopping
            try:
                self._send(chunks)
            except RetryableWriteError as exc:
                delay = self._backoff.next_delay(exc.retry_after)
                with self._lock:
                    self._retried += 1
                    self._last_error = str(exc)
                    self._backoff_s = delay
                log.warning("InfluxDB write failed, retrying in %.2fs: %s", delay, exc)
                self._sleep(delay)
                continue
            self._backoff.reset()
            with self._lock:
                self._backoff_s = 0.0
                self._buffered -= sum(c.points for c in chunks)
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._resolve, chunks)
            return

    def _send(self, chunks: list[_Chunk]) -> None:
        """One request for all chunks; on 413 or a rejection, smaller requests (which tell more): the chunks in
        halves, then a single chunk's lines in halves, so only what the server refuses is dropped."""
        if len(chunks) == 1:
            reason = self._write_body(chunks[0].body, chunks[0].points)
            if reason is not None:
                self._reject(chunks[0].body, chunks[0].points, reason)
            return
        try:
            self.writer.write(b"".join(c.body for c in chunks))
        except (TooLargeError, RejectedWriteError) as exc:
            if isinstance(exc, TooLargeError):
                with self._lock:
                    self._splits += 1
            half = len(chunks) // 2
            self._send(chunks[:half])
            self._send(chunks[half:])
            return
        with self._lock:
            self._requests += 1
            self._written += sum(c.points for c in chunks)

    def _write_body(self, body: bytes, points: int) -> str | None:
        """Write one body, halving it by lines on 413. None when all of it was stored, else the server's reason
        (a rejected half rejects the whole chunk; its stored half is overwritten harmlessly if it is ever sent
        again)."""
        try:
            self.writer.write(body)
        except TooLargeError as exc:
            if points <= 1:
                return f"a single line is too large for the server: {exc}"
            with self._lock:
                self._splits += 1
            first, second = split_lines(body)
            why_first = self._write_body(first, first.count(b"\n"))
            why_second = self._write_body(second, second.count(b"\n"))
            return why_first or why_second
        except RejectedWriteError as exc:
            return str(exc)
        with self._lock:
            self._requests += 1
            self._written += points
        return None

    def _reject(self, body: bytes, points: int, reason: str) -> None:
        log.warning("InfluxDB rejected %d points, dropped as a dead letter: %s", points, reason)
        with self._lock:
            self._dropped += points
            self._last_error = reason
        if self._on_rejected is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_rejected, body, points, reason)

    def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            time.sleep(min(0.05, end - time.monotonic()))
        if self._stopping:
            raise _Stopping


class _Stopping(Exception):
    """Raised in the writer thread to leave what is buffered: it is in the log, written after the restart."""
