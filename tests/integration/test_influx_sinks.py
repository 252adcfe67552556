"""The InfluxDB writers and sink against real servers: InfluxDB 1.6 for the v1 path (read back with InfluxQL),
victoria-metrics for the v2 path through influxdb-client (read back through /api/v1/export), and a scripted
stdlib HTTP server for the answers a healthy database never gives (429, 503, 500, slow, dropped connections).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.ops.metrics import Metrics
from gateway.sinks.influx import InfluxSink
from gateway.sinks.influx_writers import (
    InfluxV1Writer,
    InfluxV2Writer,
    RejectedWriteError,
    RetryableWriteError,
    TooLargeError,
)
from gateway.sinks.lineprotocol import Point, encode, sanitize_name
from tests import servers
from tests.waiting import until

pytestmark = pytest.mark.integration

_ids = itertools.count()
NOW_NS = time.time_ns() // 1_000_000_000 * 1_000_000_000  # whole seconds, so ms truncation is easy to predict


def unique(prefix: str) -> str:
    return f"{prefix}_{time.monotonic_ns()}_{next(_ids)}"


def sink_of(writer: object, **options: object) -> InfluxSink:
    """An InfluxDB sink that keeps what the server rejected (the gateway makes dead letters of them)."""
    sink = InfluxSink(writer, Metrics(), **options)  # type: ignore[arg-type]
    sink.rejected = []  # type: ignore[attr-defined]
    sink._on_rejected = lambda body, points, reason: sink.rejected.append((body, reason))  # type: ignore
    return sink


def v1_writer(server: servers.Server, db: str, timeout: float = 5.0) -> InfluxV1Writer:
    return InfluxV1Writer(f"http://{server.address}", db, timeout)


def v2_writer(server: servers.Server, timeout: float = 5.0) -> InfluxV2Writer:
    return InfluxV2Writer(f"http://{server.address}", org="edge", bucket="telemetry", token="unused",
                          timeout=timeout)


# --- InfluxDB 1.x ------------------------------------------------------------------------------------------------


def test_v1_points_round_trip_exactly_and_the_database_is_created_on_first_use(influxdb):
    db = unique("rt")
    points = [
        Point("env", (("device", "dev-1"), ("site", "roof top")),
              (("temp", 21.375), ("count", 7), ("ok", True), ("note", 'say "hi"\\')), NOW_NS + 1),
        Point("env", (("device", "dev-2"), ("site", "a,b=c")),
              (("temp", -0.1), ("count", -(2**63)), ("ok", False), ("note", "")), NOW_NS + 2),
    ]
    writer = v1_writer(influxdb, db)
    writer.write(encode(points))
    writer.close()
    rows = servers.influx_rows(influxdb, db, "env")
    assert rows == [
        {"time": NOW_NS + 1, "device": "dev-1", "site": "roof top", "temp": 21.375, "count": 7, "ok": True,
         "note": 'say "hi"\\'},
        {"time": NOW_NS + 2, "device": "dev-2", "site": "a,b=c", "temp": -0.1, "count": -(2**63), "ok": False,
         "note": ""},
    ]


def test_v1_two_points_of_one_series_a_nanosecond_apart_both_survive_and_a_resend_overwrites(influxdb):
    db = unique("ns")
    writer = v1_writer(influxdb, db)
    body = encode([Point("s", (("d", "x"),), (("v", 1.0),), NOW_NS), Point("s", (("d", "x"),), (("v", 2.0),), NOW_NS + 1)])
    writer.write(body)
    writer.write(body)  # what a drainer does after a crash between the write and the DELETE
    writer.close()
    assert [(r["time"], r["v"]) for r in servers.influx_rows(influxdb, db, "s")] == [(NOW_NS, 1.0), (NOW_NS + 1, 2.0)]


def test_v1_keeps_one_connection_alive_across_writes(influxdb):
    db = unique("ka")
    writer = v1_writer(influxdb, db)
    writer.write(encode([Point("k", (), (("v", 1),), NOW_NS)]))
    conn = writer._conn
    writer.write(encode([Point("k", (), (("v", 2),), NOW_NS + 1)]))
    assert writer._conn is conn and conn is not None
    writer.close()


def test_v1_a_field_type_conflict_is_rejected_with_the_servers_reason(influxdb):
    db = unique("conflict")
    writer = v1_writer(influxdb, db)
    writer.write(b"c x=1i 1\n")
    with pytest.raises(RejectedWriteError) as info:
        writer.write(b'c x="s" 2\nc x=3i 3\n')
    writer.close()
    assert info.value.status == 400 and info.value.partial
    assert "field type conflict" in str(info.value)
    # "partial write": InfluxDB 1.x stored the good line of the rejected body.
    assert [r["time"] for r in servers.influx_rows(influxdb, db, "c")] == [1, 3]


# Arbitrary names and values through the real parser. Keys get a prefix so tag and field columns cannot collide
# in SELECT * (and "time", which InfluxDB 1.x refuses as a key, cannot occur).
_text = st.text(alphabet=st.sampled_from(list('\\ ,="#=\n\t') + ["é", "a", "b", "\u2028"]) | st.characters(
    blacklist_categories=("Cs",)), max_size=8)
_values = (st.floats(allow_nan=False, allow_infinity=False, allow_subnormal=True)
           | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.booleans() | _text)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(measurement=_text, tags=st.dictionaries(_text, _text, max_size=3),
       fields=st.dictionaries(_text, _values, min_size=1, max_size=3))
@example(measurement="", tags={}, fields={"s": "a\rb\nc\r\n"})  # found by a CI run: a carriage return
def test_v1_arbitrary_names_and_values_read_back_as_sanitized(influxdb, measurement, tags, fields):
    point = Point("m" + measurement, tuple(("t" + k, v) for k, v in tags.items()),
                  tuple(("f" + k, v) for k, v in fields.items()), NOW_NS)
    db = unique("hyp")
    writer = v1_writer(influxdb, db)
    writer.write(encode([point]))
    writer.close()
    result = servers.influxql(influxdb, db, "SELECT * FROM /.*/")
    [series] = result["series"]
    assert series["name"] == sanitize_name(point.measurement, kind="measurement")
    [row] = [dict(zip(series["columns"], values)) for values in series["values"]]
    want_tags = {sanitize_name(k): sanitize_name(v) for k, v in point.tags if sanitize_name(v)}
    # Line breaks in a string value end the line in some parsers: the encoder writes them as spaces.
    want_fields = {sanitize_name(k, kind="field"): v.replace("\n", " ").replace("\r", " ") if isinstance(v, str)
                   else v for k, v in point.fields}
    got = {k: v for k, v in row.items() if k != "time" and v is not None}
    assert {k: got[k] for k in want_tags} == want_tags
    for key, value in want_fields.items():
        if isinstance(value, float):
            # JSON has one number type: InfluxDB prints 2.0 as 2 and 6.16294282038927e16 as 61629428203892700.
            assert isinstance(got[key], (int, float)) and float(got[key]) == value
        else:
            assert type(got[key]) is type(value) and got[key] == value
    assert row["time"] == NOW_NS


def test_the_sink_writes_a_backlog_built_while_influxdb_was_down(private_influxdb):
    async def scenario() -> None:
        db = unique("backlog")
        sink = sink_of(v1_writer(private_influxdb, db, timeout=2.0), backoff_initial=0.05, backoff_max=0.2,
                       max_lines=300, flush_interval=0)
        sink.start()
        private_influxdb.stop()
        expected, futures = {}, []
        for b in range(20):
            pts = [Point("b", (("dev", f"d{i % 5}"),), (("v", float(b * 100 + i)),), NOW_NS + b * 100 + i)
                   for i in range(100)]
            expected.update({(p.tags[0][1], p.ts_ns): p.fields[0][1] for p in pts})
            futures.append(sink.put(encode(pts), len(pts)))
        await until(lambda: sink.stats().retried >= 2, what="the sink retrying against the stopped server")
        assert sink.stats().buffered == 2000 and not any(f.done() for f in futures)
        private_influxdb.start()
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        sink.stop(5)
        rows = servers.influx_rows(private_influxdb, db, "b")
        assert len(rows) == 2000
        assert {(r["dev"], r["time"]): r["v"] for r in rows} == expected
        stats = sink.stats()
        assert stats.written == 2000 and stats.dropped == 0 and stats.buffered == 0
        assert "cannot reach" in (stats.last_error or "")

    asyncio.run(scenario())


def test_a_batch_influxdb_rejects_is_dropped_as_a_dead_letter_and_the_others_go_through(influxdb):
    async def scenario() -> None:
        db = unique("dead")
        sink = sink_of(v1_writer(influxdb, db), flush_interval=0.3)
        sink.start()
        # Sent together: the request is rejected, and the sink narrows it down to the one bad batch.
        done = [sink.put(encode([Point("c", (), (("x", 1),), NOW_NS + 1)]), 1),
                sink.put(encode([Point("c", (), (("x", "s"),), NOW_NS + 2)]), 1),
                sink.put(encode([Point("c", (), (("x", 3),), NOW_NS + 3)]), 1)]
        await asyncio.wait_for(asyncio.gather(*done), 15)
        await asyncio.wait_for(sink.put(encode([Point("c", (), (("x", 4),), NOW_NS + 4)]), 1), 15)
        sink.stop(5)
        [(body, reason)] = sink.rejected  # type: ignore[attr-defined]
        assert body == b'c x="s" ' + str(NOW_NS + 2).encode() + b"\n"
        assert "field type conflict" in reason and "400" in reason
        assert [(r["time"], r["x"]) for r in servers.influx_rows(influxdb, db, "c")] == [
            (NOW_NS + 1, 1), (NOW_NS + 3, 3), (NOW_NS + 4, 4)]
        assert sink.stats().dropped == 1

    asyncio.run(scenario())


# --- victoria-metrics through the InfluxDB v2 API -----------------------------------------------------------------


def test_v2_points_round_trip_through_victoria_metrics_as_measurement_underscore_field(victoria_metrics):
    m = unique("vm")
    writer = v2_writer(victoria_metrics)
    writer.write(encode([
        Point(m, (("dev", "a"),), (("temp", 21.375), ("count", 7), ("ok", True)), NOW_NS + 5_000_000),
        Point(m, (("dev", "b"),), (("temp", -3.5),), NOW_NS + 6_000_000),
    ]))
    writer.close()
    got = servers.vm_samples(victoria_metrics, f'{{__name__=~"{m}_.*"}}', expect=4)
    assert got == [
        ({"__name__": f"{m}_count", "dev": "a"}, NOW_NS // 1_000_000 + 5, 7),
        ({"__name__": f"{m}_ok", "dev": "a"}, NOW_NS // 1_000_000 + 5, 1),
        ({"__name__": f"{m}_temp", "dev": "a"}, NOW_NS // 1_000_000 + 5, 21.375),
        ({"__name__": f"{m}_temp", "dev": "b"}, NOW_NS // 1_000_000 + 6, -3.5),
    ]


def test_v2_victoria_metrics_keeps_milliseconds_and_every_sample_within_one(victoria_metrics):
    m = unique("vmts")
    writer = v2_writer(victoria_metrics)
    series = (("dev", "a"),)
    writer.write(encode([
        Point(m, series, (("v", 1.0),), NOW_NS),
        Point(m, series, (("v", 2.0),), NOW_NS + 1_000_000),        # 1 ms later: a separate sample
        Point(m, series, (("v", 3.0),), NOW_NS + 1_000_001),        # same millisecond as the previous one
    ]))
    writer.close()
    got = servers.vm_samples(victoria_metrics, f"{m}_v", expect=3)
    ms = NOW_NS // 1_000_000
    # Nanoseconds are truncated to ms, and two samples in one ms are both kept (no -dedup.minScrapeInterval),
    # so unlike InfluxDB a re-sent batch would be stored twice here.
    assert [(ts, v) for _, ts, v in got] == [(ms, 1.0), (ms + 1, 2.0), (ms + 1, 3.0)]


def test_the_sink_writes_a_backlog_into_victoria_metrics_after_it_restarts_exactly_once(tmp_path):
    vm = servers.victoria_metrics(tmp_path)
    vm.start()

    async def scenario() -> None:
        m = unique("vmbacklog")
        sink = sink_of(v2_writer(vm, timeout=2.0), backoff_initial=0.05, backoff_max=0.2, max_lines=250)
        sink.start()
        vm.stop()
        futures = []
        for b in range(10):
            pts = [Point(m, (("dev", "x"),), (("v", float(b * 100 + i)),), NOW_NS + (b * 100 + i) * 1_000_000)
                   for i in range(100)]
            futures.append(sink.put(encode(pts), len(pts)))
        await until(lambda: sink.stats().retried >= 2, what="the sink retrying against the stopped server")
        vm.start()
        await asyncio.wait_for(asyncio.gather(*futures), 30)
        sink.stop(5)
        got = servers.vm_samples(vm, f"{m}_v", expect=1000)
        assert [v for _, _, v in got] == [float(i) for i in range(1000)]  # none lost, none twice

    try:
        asyncio.run(scenario())
    finally:
        vm.kill()


# --- a scripted server for the answers real databases rarely give ------------------------------------------------


@dataclass
class Answer:
    status: int = 204
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    drop_connection: bool = False  # close the socket after answering, without saying so


class ScriptedServer:
    """A loopback HTTP/1.1 server answering writes from a script (then 204); /query always succeeds."""

    def __init__(self) -> None:
        self.script: list[Answer] = []
        self.writes: list[tuple[float, bytes]] = []
        self.connections = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                outer.connections += 1

            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                answer = Answer(200, {"Content-Type": "application/json"}, b'{"results":[{}]}')
                if not self.path.startswith("/query"):
                    outer.writes.append((time.monotonic(), body))
                    answer = outer.script.pop(0) if outer.script else Answer()
                time.sleep(answer.delay)
                self.send_response(answer.status)
                for k, v in answer.headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                self.wfile.write(answer.body)
                if answer.drop_connection:
                    self.close_connection = True

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a client that timed out and hung up is what some tests are about

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def scripted() -> Iterator[ScriptedServer]:
    server = ScriptedServer()
    yield server
    server.close()


def make_writer(kind: str, server: ScriptedServer, timeout: float = 2.0):
    return v1_writer(server, "db", timeout) if kind == "v1" else v2_writer(server, timeout)  # type: ignore[arg-type]


BODY = b"m v=1 1\n"


@pytest.mark.parametrize("kind", ["v1", "v2"])
@pytest.mark.parametrize(("answer", "error", "status", "retry_after"), [
    (Answer(429, {"Retry-After": "2"}), RetryableWriteError, 429, 2.0),
    (Answer(503, {"Retry-After": "0.5"}), RetryableWriteError, 503, 0.5),
    (Answer(503), RetryableWriteError, 503, None),
    (Answer(503, {"Retry-After": "soon"}), RetryableWriteError, 503, 10.0),
    (Answer(429, {"Retry-After": "86400"}), RetryableWriteError, 429, 600.0),
    (Answer(500, body=b'{"error":"timeout"}'), RetryableWriteError, 500, None),
    (Answer(502), RetryableWriteError, 502, None),
    (Answer(401, body=b'{"error":"authorization failed"}'), RetryableWriteError, 401, None),
    (Answer(400, body=b'{"error":"unable to parse"}'), RejectedWriteError, 400, None),
    (Answer(422, body=b'{"code":"unprocessable","message":"outside retention"}'), RejectedWriteError, 422, None),
    (Answer(413), TooLargeError, 413, None),
])
def test_writers_map_statuses_to_decisions(scripted, kind, answer, error, status, retry_after):
    scripted.script = [answer]
    writer = make_writer(kind, scripted)
    with pytest.raises(error) as info:
        writer.write(BODY)
    writer.close()
    assert type(info.value) is error and info.value.status == status
    assert getattr(info.value, "retry_after", None) == retry_after
    assert len(scripted.writes) == 1, "the writer itself never retries"
    if answer.body:
        message = json.loads(answer.body)
        assert message.get("error", message.get("message")) in str(info.value)


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_every_2xx_is_delivered(scripted, kind):
    scripted.script = [Answer(200), Answer(204), Answer(202)]
    writer = make_writer(kind, scripted)
    for _ in range(3):
        writer.write(BODY)
    writer.close()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_a_slow_server_is_a_retryable_timeout(scripted, kind):
    scripted.script = [Answer(delay=1.5)]
    writer = make_writer(kind, scripted, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RetryableWriteError):
        writer.write(BODY)
    assert time.monotonic() - start < 1.2
    writer.close()


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_a_refused_connection_is_retryable(kind):
    port = servers.free_port()
    writer = (InfluxV1Writer(f"http://127.0.0.1:{port}", "db", 1.0) if kind == "v1"
              else InfluxV2Writer(f"http://127.0.0.1:{port}", "o", "b", "t", 1.0))
    with pytest.raises(RetryableWriteError, match="cannot reach"):
        writer.write(BODY)
    writer.close()


def test_v1_reuses_its_connection_and_recovers_from_one_the_server_closed(scripted):
    scripted.script = [Answer(), Answer(drop_connection=True), Answer(), Answer()]
    writer = make_writer("v1", scripted)
    for _ in range(4):
        writer.write(BODY)
    writer.close()
    assert len(scripted.writes) == 4
    assert scripted.connections == 2  # one until the server dropped it, then one more


def test_the_sink_waits_as_long_as_retry_after_says_then_delivers(scripted):
    scripted.script = [Answer(429, {"Retry-After": "0.4"}), Answer(503), Answer(500)]

    async def scenario() -> None:
        sink = sink_of(make_writer("v2", scripted), backoff_initial=0.02, backoff_max=0.05)
        sink.start()
        await asyncio.wait_for(sink.put(BODY, 1), 15)
        sink.stop(2)
        assert sink.stats().retried == 3 and sink.stats().written == 1

    asyncio.run(scenario())
    times = [t for t, _ in scripted.writes]
    assert len(times) == 4 and all(body == BODY for _, body in scripted.writes)
    assert times[1] - times[0] >= 0.4, "Retry-After honoured"
    assert all(0.01 <= b - a < 0.4 for a, b in zip(times[1:], times[2:])), "own backoff after 503 and 500"


def test_the_sink_splits_on_413_against_a_server(scripted):
    body = b"".join(f"m v={i} {i}\n".encode() for i in range(8))
    writer = make_writer("v1", scripted)
    original = writer.write

    def write(b: bytes) -> None:  # the server says 413 to any body of more than two lines
        scripted.script.append(Answer(413) if b.count(b"\n") > 2 else Answer())
        original(b)

    writer.write = write  # type: ignore[method-assign]

    async def scenario() -> None:
        sink = sink_of(writer)
        sink.start()
        await asyncio.wait_for(sink.put(body, 8), 15)
        sink.stop(2)
        assert sink.stats().splits == 3 and sink.stats().written == 8 and not sink.rejected  # type: ignore

    asyncio.run(scenario())
    delivered = [b for b in (w for _, w in scripted.writes) if b.count(b"\n") <= 2]
    assert b"".join(delivered) == body


def test_influxdb_fixture_is_healthy_and_answers_influxql(influxdb):
    assert servers.influxql(influxdb, "", "SHOW DATABASES")["statement_id"] == 0
