"""The gateway process dies under load, cleanly (SIGTERM) or not (kill -9), and comes back: nothing the broker
acknowledged to a device is lost, every follower gets every event at least once, InfluxDB holds every reading once."""

from __future__ import annotations

import random
import time

import pytest

from tests.reliability.harness import (Fleet, account, assert_nothing_acknowledged_was_lost, follow_fleet, follower,
                                       uid)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]


def test_sigterm_under_load_exits_0_within_the_deadline_and_a_restart_loses_nothing(
        mosquitto, influxdb, make_gateway, tmp_path):
    fleet, db = Fleet(uid("term") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influxdb.url, db)
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=800, duration=8, log=tmp_path / "sim.log")
    gw.wait_status(lambda s: s["metrics"]["committed"] >= 1500)

    t0 = time.monotonic()
    assert gw.terminate(timeout=30) == 0
    took = time.monotonic() - t0
    assert took < 16, f"SIGTERM took {took:.1f}s; the deadline is 20 s and cancelling starts at 16 s"
    assert "deadline passed" not in gw.output()
    final = gw.status()
    assert final is not None and final["metrics"]["committed"] == final["metrics"]["appended"]

    gw.start()  # the broker kept what arrived meanwhile in the gateway's session
    load.wait()
    acc = account("sigterm under load", [fleet], {"fan": fan}, (influxdb, db))
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()


def test_ten_kill_9s_at_random_moments_lose_nothing(mosquitto, influxdb, make_gateway, tmp_path):
    rng = random.Random(20240917)
    fleet, db = Fleet(uid("kill") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influxdb.url, db)
    follow_fleet(gw, fleet.prefix + "a", fleet)
    follow_fleet(gw, fleet.prefix + "b", fleet)
    fans = {"a": follower(mosquitto.address, fleet.prefix + "a"), "b": follower(mosquitto.address, fleet.prefix + "b")}
    gw.start()
    load = fleet.start(mosquitto.address, rate=500, duration=60, log=tmp_path / "sim.log")

    kills = 0
    while kills < 10:
        time.sleep(rng.uniform(0.3, 1.5))
        gw.kill()
        kills += 1
        gw.start()
    load.interrupt()
    acc = account(f"kill -9 x{kills}", [fleet], fans, (influxdb, db))
    assert_nothing_acknowledged_was_lost(acc)
    for c in fans.values():
        c.close()
