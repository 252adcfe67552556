"""The broker goes away under load: restarted (its persistence keeps the sessions and their queues), or frozen by
SIGSTOP for longer than the gateway's keepalive (a network cut as seen from the gateway) and thawed by SIGCONT."""

from __future__ import annotations

import time

import pytest

from tests.reliability.harness import (Fleet, account, assert_nothing_acknowledged_was_lost, follow_fleet, follower,
                                       uid)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

KEEPALIVE = 2  # seconds; the gateway must notice a silent broker within about 1.5 keepalives


def test_a_broker_restart_mid_load_loses_nothing_the_broker_acknowledged(
        durable_mosquitto, influxdb, make_gateway, tmp_path):
    broker = durable_mosquitto
    fleet, db = Fleet(uid("brst") + "-", devices=10), uid("rel_")
    gw = make_gateway(broker.address, influxdb.url, db, config={"mqtt": {"keepalive": KEEPALIVE,
                                                                         "reconnect_max": 1.0}})
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(broker.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(broker.address, rate=600, duration=10, log=tmp_path / "sim.log")
    gw.wait_status(lambda s: s["metrics"]["committed"] >= 1000)

    broker.restart()  # SIGTERM: mosquitto writes its persistence file, then starts again on the same port
    connects = gw.metric("mqtt_connects")
    gw.wait_status(lambda s: s["mqtt_connected"] and s["metrics"]["mqtt_connects"] >= connects, timeout=20)

    summary = load.wait()
    assert summary["disconnects"] >= 1, "the simulator should have seen the broker go away"
    acc = account("broker restart", [fleet], {"fan": fan}, (influxdb, db))
    assert gw.metric("mqtt_disconnects") >= 1
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()


def test_a_broker_frozen_longer_than_the_keepalive_is_survived(durable_mosquitto, influxdb, make_gateway, tmp_path):
    broker = durable_mosquitto
    fleet, db = Fleet(uid("stop") + "-", devices=10), uid("rel_")
    gw = make_gateway(broker.address, influxdb.url, db, config={"mqtt": {"keepalive": KEEPALIVE,
                                                                         "reconnect_max": 1.0}})
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(broker.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(broker.address, rate=600, duration=12, log=tmp_path / "sim.log")
    gw.wait_status(lambda s: s["metrics"]["committed"] >= 1000)

    broker.pause()
    try:
        # The gateway notices the silence by its keepalive and says so in its status.
        gw.wait_status(lambda s: not s["mqtt_connected"], timeout=4 * KEEPALIVE)
        time.sleep(KEEPALIVE)
    finally:
        broker.resume()
    gw.wait_status(lambda s: s["mqtt_connected"], timeout=20)

    load.wait()
    acc = account("broker SIGSTOP/SIGCONT", [fleet], {"fan": fan}, (influxdb, db))
    assert gw.metric("mqtt_disconnects") >= 1
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()
