"""Every query of the Grafana dashboards in deploy/grafana/ runs against a real InfluxDB 1.x and returns data.

The real gateway writes to the database while both simulators drive it (`firmware-sim mqtt`: telemetry with injected
anomalies; `firmware-sim social`: follows, posts, sponsored posts, likes, reposts), plus a few hostile messages for
dead letters. Then each panel's targets and each annotation query are expanded the way Grafana expands them
($timeFilter, $__interval, template variables resolved by running their own queries) and sent to InfluxDB's
`/query`: each must return at least one series, and every column it selects must hold a value. A misspelled field,
measurement or tag, or a query InfluxDB refuses, fails the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import publish_all

pytestmark = pytest.mark.integration

DASHBOARDS = servers.REPO / "deploy" / "grafana" / "dashboards"
METRICS_INTERVAL = 1.0  # the gateway's influx.metrics_interval here, and the datasource's min interval


def firmware_sim(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", *args, "--no-progress"], cwd=servers.REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(sim: subprocess.Popen[str]) -> None:
    out, err = sim.communicate(timeout=60)
    assert sim.returncode == 0, err


@pytest.fixture(scope="module")
def filled_database(mosquitto, influxdb, tmp_path_factory) -> Iterator[tuple[str, int, int]]:
    """A database the gateway wrote during a simulator run: (name, start ms, end ms of the run)."""
    tmp = tmp_path_factory.mktemp("dashboards")
    db, tag = f"dash_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex[:6]
    config = tmp / "gateway.toml"
    config.write_text(f"[influx]\nmetrics_interval = {METRICS_INTERVAL}\nflush_interval = 0.05\n"
                      "[social]\nstats_interval_ms = 100\ndefault_cpm = 4.0\n")
    gw = GatewayProcess(tmp / "gw", mosquitto.address, "--influx-api", "v1", "--influx-url", influxdb.url,
                        "--influx-db", db, client_id=f"gw-dash-{tag}", config=config)
    started_ms = int(time.time() * 1000)
    try:
        gw.start()
        sims = [
            firmware_sim("mqtt", "--broker", mosquitto.address, "--devices", "4", "--events", "800", "--rate",
                         "400", "--seed", "3", "--anomaly-rate", "0.03", "--device-prefix", f"d{tag}-"),
            firmware_sim("social", "--broker", mosquitto.address, "--users", "30", "--posts", "24", "--rate", "12",
                         "--p-like", "0.5", "--p-repost", "0.2", "--p-sponsor", "0.4", "--settle", "1",
                         "--user-prefix", f"u{tag}"),
        ]
        # Dead letters after the first metrics point, so that their count moves between two points.
        gw.wait_status(lambda s: s["metrics"]["written"] > 0)
        time.sleep(METRICS_INTERVAL * 1.5)
        publish_all(mosquitto.address, [(f"devices/d{tag}-bad/telemetry", b"{not json"),
                                        (f"devices/d{tag}-bad/telemetry", b'{"t": "warm"}'),
                                        (f"users/u{tag}-bad/posts", b'{"text": ""}')])
        for sim in sims:
            finish(sim)
        gw.wait_status(lambda s: s["metrics"]["influx_lag"] == 0 and s["metrics"]["stats_lag"] == 0)
        time.sleep(METRICS_INTERVAL * 2.5)  # two more self-metric points after the last event
        assert gw.terminate() == 0
    finally:
        gw.kill()
    yield db, started_ms, int(time.time() * 1000)


# --- what Grafana does to a query before it sends it ---------------------------------------------------------------


def interval_for(range_ms: int, min_interval_s: float, max_data_points: int = 1000) -> str:
    """Grafana's $__interval: the range over the panel's data points, rounded to a round value, at least the
    datasource's min interval (its `timeInterval`)."""
    raw_s = max(range_ms / 1000 / max_data_points, min_interval_s)
    for step in (1, 2, 5, 10, 15, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600):
        if raw_s <= step:
            return f"{step}s"
    return f"{int(raw_s)}s"


def expand(query: str, variables: dict[str, str], start_ms: int, end_ms: int, interval: str) -> str:
    q = query.replace("$timeFilter", f"time >= {start_ms}ms and time <= {end_ms}ms")
    q = q.replace("$__interval_ms", str(int(interval[:-1]) * 1000)).replace("$__interval", interval)
    for name, value in sorted(variables.items(), key=lambda kv: -len(kv[0])):  # $device before $dev
        q = q.replace(f"${{{name}}}", value).replace(f"[[{name}]]", value).replace(f"${name}", value)
    leftover = re.findall(r"\$\w+|\[\[\w+\]\]", q)
    assert not leftover, f"unresolved variables {leftover} in {query!r}"
    return q


def run(influxdb: servers.HttpServer, db: str, query: str) -> list[dict[str, Any]]:
    """The series of one statement; RuntimeError with InfluxDB's reason when it refuses it (a parse error is a
    400, an error in execution a 200 carrying `error`)."""
    try:
        return list(servers.influxql(influxdb, db, query).get("series", []))
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"HTTP {exc.code}: {exc.read().decode(errors='replace').strip()}") from None


def empty_columns(series: list[dict[str, Any]], wildcard: bool) -> list[str] | None:
    """None when the result has data: every column but time holds a value in some row of some series (a misspelled
    field among several is an empty column). A wildcard (`mean(*)`) selects fields other series have too, so there
    one column with a value is enough. Otherwise the columns without one (all of them when nothing came back)."""
    values: dict[str, bool] = {}
    for s in series:
        for i, col in enumerate(s["columns"]):
            if col != "time":
                values[col] = values.get(col, False) or any(row[i] is not None for row in s.get("values", []))
    if not values:
        return ["(no series)"]
    if wildcard:
        return None if any(values.values()) else sorted(values)
    empty = sorted(c for c, has in values.items() if not has)
    return empty or None


def resolve_variables(dashboard: dict[str, Any], influxdb: servers.HttpServer, db: str) -> dict[str, str]:
    """Query variables as Grafana resolves them with nothing chosen yet: run the variable's query, keep the first
    column's values that match its regex, sort them, take the first."""
    out: dict[str, str] = {}
    for var in dashboard["templating"]["list"]:
        if var["type"] == "datasource":
            out[var["name"]] = "InfluxDB"  # only ever in a panel's datasource, never in a query
            continue
        assert var["type"] == "query", var
        query = var["query"] if isinstance(var["query"], str) else var["query"]["query"]
        series = run(influxdb, db, expand(query, out, 0, 0, "1s"))
        values = [row[-1] if s["columns"][0] == "key" else row[0] for s in series for row in s["values"]]
        if var.get("regex"):
            values = [v for v in values if re.search(var["regex"].strip("/"), v)]
        assert values, f"variable ${var['name']} has no values: {query}"
        out[var["name"]] = sorted(values)[0]
    return out


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dashboard["panels"]:
        yield p
        yield from p.get("panels", [])  # panels inside a collapsed row


def queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, query) for every panel target and every annotation that queries InfluxDB."""
    for p in panels(dashboard):
        for t in p.get("targets", []):
            assert t.get("rawQuery"), f"panel {p['title']!r} target {t['refId']}: only raw InfluxQL is checked"
            yield f"{p['title']!r} {t['refId']}", t["query"]
    for a in dashboard["annotations"]["list"]:
        if "query" in a:
            yield f"annotation {a['name']!r}", a["query"]


def failures(dashboard: dict[str, Any], influxdb: servers.HttpServer, db: str, start_ms: int,
             end_ms: int) -> list[str]:
    variables = resolve_variables(dashboard, influxdb, db)
    interval = interval_for(end_ms - start_ms, METRICS_INTERVAL)
    out = []
    for where, query in queries(dashboard):
        expanded = expand(query, variables, start_ms, end_ms, interval)
        try:
            empty = empty_columns(run(influxdb, db, expanded), wildcard="(*)" in query or "SELECT *" in query)
        except RuntimeError as exc:
            out.append(f"{where}: {exc}")
            continue
        if empty:
            out.append(f"{where}: no data in {', '.join(empty)} for {expanded}")
    return out


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def test_the_dashboards_are_there_and_use_the_provisioned_datasource():
    assert sorted(p.name for p in DASHBOARDS.glob("*.json")) == ["edge-gateway-flow.json", "edge-gateway.json"]
    provisioned = (DASHBOARDS.parent / "provisioning" / "datasources" / "edge-gateway.yaml").read_text()
    uids = set()
    for path in DASHBOARDS.glob("*.json"):
        d = load(path)
        uids.add(d["uid"])
        ids = [p["id"] for p in panels(d)]
        assert len(ids) == len(set(ids)), path
        chooser = next(v for v in d["templating"]["list"] if v["type"] == "datasource")
        assert chooser["query"] == "influxdb" and f"uid: {chooser['current']['value']}\n" in provisioned
        for p in panels(d):
            for t in [p, *p.get("targets", [])]:
                assert t["datasource"] == {"type": "influxdb", "uid": "${datasource}"}, (path.name, p["title"])
    assert len(uids) == 2


@pytest.mark.parametrize("name", ["edge-gateway.json", "edge-gateway-flow.json"])
def test_every_panel_query_returns_data(name, influxdb, filled_database):
    db, start, end = filled_database
    # Grafana's range: the run, with a margin either side (readings carry the simulator's scheduled time).
    problems = failures(load(DASHBOARDS / name), influxdb, db, start - 60_000, end + 60_000)
    assert not problems, "\n".join(problems)


def test_a_wrong_query_fails_the_check(influxdb, filled_database):
    db, start, end = filled_database
    dashboard = load(DASHBOARDS / "edge-gateway.json")
    first = next(p for p in panels(dashboard) if p.get("targets"))
    target = first["targets"][0]
    for wrong in (target["query"].replace('"received"', '"recieved"'),  # a misspelled field: no data
                  target["query"].replace('FROM "gateway"', 'FROM "gateways"'),  # no such measurement
                  target["query"].replace("GROUP BY", "GROUP BY BY")):  # InfluxDB refuses it
        assert wrong != target["query"]
        first["targets"] = [dict(target, query=wrong)]
        dashboard["panels"] = [first]
        dashboard["annotations"]["list"] = []
        assert failures(dashboard, influxdb, db, start - 60_000, end + 60_000), wrong
