"""InfluxDB fails under load: stopped for 20 s, then a server that answers 500s, then 429 with Retry-After, then too
slowly. The InfluxDB consumer falls behind (the readings wait in the log), catches up when the database is back,
nothing is dropped, and every reading is in InfluxDB exactly once."""

from __future__ import annotations

import json
import time

import pytest

from tests.reliability.flaky_http import FlakyInflux, Phase
from tests.reliability.harness import (Fleet, account, assert_nothing_acknowledged_was_lost, follow_fleet, follower,
                                       uid, wait_until)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_influxdb_stopped_for_20s_under_load_its_consumer_falls_behind_then_catches_up_and_drops_nothing(
        mosquitto, private_influxdb, make_gateway, tmp_path):
    influx = private_influxdb
    fleet, db = Fleet(uid("ifx") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influx.url, db, config={"influx": {"timeout": 2.0}})
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=500, duration=28, log=tmp_path / "sim.log")
    gw.wait_status(lambda s: s["metrics"]["written"] >= 1000)

    influx.stop()
    down_at, retried = time.monotonic(), gw.metric("retried")
    backlog = 0.0
    while time.monotonic() - down_at < 20:
        backlog = max(backlog, gw.metric("influx_lag"))
        time.sleep(0.5)
    assert gw.metric("retried") > retried, "writes to a stopped database must be retried"
    assert backlog >= 5000, f"20 s at 500/s should leave InfluxDB that far behind; its peak lag was {backlog:.0f}"
    # The pipeline keeps delivering to followers while the database is away.
    assert gw.metric("committed") >= gw.metric("written") + 5000

    influx.start()
    load.wait()
    gw.wait_status(lambda s: s["metrics"]["influx_lag"] == 0 and s["metrics"]["committed"] >= fleet.sent,
                   timeout=60)
    acc = account("influxdb stopped 20s", [fleet], {"fan": fan}, (influx, db))
    assert gw.metric("write_dropped") == 0
    print(json.dumps({"influx_peak_lag": backlog, "retried": gw.metric("retried")}))
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()


def test_500s_then_429_with_retry_after_then_slow_answers_are_retried_until_everything_is_written(
        mosquitto, influxdb, make_gateway, tmp_path):
    fleet, db = Fleet(uid("flky") + "-", devices=10), uid("rel_")
    phases = [Phase("error", 4), Phase("throttle", 4), Phase("slow", 5), Phase("forward", 0)]
    with FlakyInflux(influxdb.address, phases, slow_seconds=2.5, retry_after=1) as flaky:
        gw = make_gateway(mosquitto.address, flaky.url, db, config={"influx": {"timeout": 1.0}})
        follow_fleet(gw, fleet.prefix + "fan", fleet)
        fan = follower(mosquitto.address, fleet.prefix + "fan")
        gw.start()
        load = fleet.start(mosquitto.address, rate=500, duration=14, log=tmp_path / "sim.log")
        backlog = 0.0

        def drained() -> bool:
            nonlocal backlog
            status = gw.status()
            if status is None:
                return False
            backlog = max(backlog, status["metrics"]["influx_lag"])
            return flaky.phase() == "forward" and not load.running() and status["metrics"]["influx_lag"] == 0

        load.wait()
        wait_until(drained, timeout=60, what="InfluxDB to catch up through the flaky server")
        acc = account("influxdb 500/429/slow", [fleet], {"fan": fan}, (influxdb, db))
        answered = dict(flaky.answers)
        print(json.dumps({"flaky_answers": answered, "influx_peak_lag": backlog, "retried": gw.metric("retried")}))
        assert all(answered[p.name] >= 1 for p in phases), f"every phase should have seen writes: {answered}"
        assert gw.metric("retried") >= answered["error"] + answered["throttle"]
        assert backlog >= 1000, f"InfluxDB should have fallen behind while writes failed; peak lag {backlog:.0f}"
        assert gw.metric("write_dropped") == 0
        assert_nothing_acknowledged_was_lost(acc)
        fan.close()
