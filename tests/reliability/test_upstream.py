"""The upstream link under WAN faults: the central broker frozen (SIGSTOP: a cut link, as the gateway sees it),
stopped and started again, a node of a 3-node nats-server cluster killed (SIGKILL) and restarted while the
gateway forwards to it, the gateway itself killed (SIGKILL) in the middle of forwarding, and an outage longer than
the log's disk budget lasts.

Each run publishes a known set of readings to the site's broker at a steady rate (every one acknowledged, so every
one is in the gateway's log), injects its faults while the link forwards, and then asks from the far side: did every
reading arrive at least once; does every copy of a reading carry the same event id; are there no more copies than
the link's resends (and the central broker's own redeliveries to the collector) explain; did each device's
readings first arrive in order; and did the gateway's upstream lag (events and seconds) come back to 0?
`-s` prints each run's figures.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import paho.mqtt.client as mqtt
import pytest

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.reliability.harness import uid, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

KEEPALIVE = 2  # seconds, upstream: the link notices a silent central broker within about 1.5 keepalives


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


class FarSide:
    """A subscriber on the central broker with a persistent session (it gets what arrived while it was away), kept
    connected across the broker's restarts. Keeps every message: topic, envelope, the `event-id` user property,
    and whether the broker flagged it as a redelivery to us (DUP)."""

    def __init__(self, address: str, topic: str, v5: bool = True) -> None:
        self.messages: list[tuple[str, dict[str, Any], str | None]] = []
        self.redelivered = 0
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._topic = topic
        client_id = uid("far-")
        if v5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            connect_args: dict[str, Any] = {"clean_start": False, "properties": props}
        else:
            self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                      protocol=mqtt.MQTTv311, clean_session=False)
            connect_args = {}
        self.client.reconnect_delay_set(0.1, 1.0)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self._topic, 1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(*_hostport(address), keepalive=5, **connect_args)
        self.client.loop_start()
        assert self._subscribed.wait(20), "the far side's subscription was not acknowledged"

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if not msg.topic.endswith("/telemetry"):
            return  # the link's retained status, alerts
        props = getattr(msg, "properties", None)
        user = dict(getattr(props, "UserProperty", []) or []) if props is not None else {}
        with self._lock:
            self.messages.append((msg.topic, json.loads(msg.payload), user.get("event-id")))
            self.redelivered += bool(msg.dup)

    def keys(self) -> set[tuple[str, int]]:
        with self._lock:
            return {(env["source"], env["payload"]["seq"]) for _, env, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Load(threading.Thread):
    """`n` readings of `devices` devices at `rate`/s to the site's broker, QoS 1; done when each was acknowledged."""

    def __init__(self, address: str, prefix: str, n: int, rate: float, devices: int = 10) -> None:
        super().__init__(daemon=True)
        self.address, self.prefix, self.n, self.rate, self.devices = address, prefix, n, rate, devices
        self.acknowledged = 0
        self.error: BaseException | None = None

    def key(self, k: int) -> tuple[str, int]:
        return f"devices/{self.prefix}{k % self.devices + 1:04d}", k // self.devices + 1

    def run(self) -> None:
        try:
            client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=uid("load-"), protocol=mqtt.MQTTv5)
            client.max_inflight_messages_set(100)
            client.connect(*_hostport(self.address))
            client.loop_start()
            started, infos = time.monotonic(), []
            for k in range(self.n):
                source, seq = self.key(k)
                payload = json.dumps({"seq": seq, "temperature": 20.0 + (k % 7) * 0.1}).encode()
                infos.append(client.publish(f"{source}/telemetry", payload, qos=1))
                ahead = started + (k + 1) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            for info in infos:
                info.wait_for_publish(30)
                self.acknowledged += info.is_published()
            client.disconnect()
            client.loop_stop()
        except BaseException as exc:  # reported by the test
            self.error = exc


def upstream(gw: GatewayProcess) -> dict[str, Any]:
    status = gw.status()
    return (status or {}).get("upstream") or {}


def account(far: FarSide, load: Load, gw: GatewayProcess, name: str, fault_ended: float,
            unflagged_redeliveries: int = 0) -> dict[str, Any]:
    """Wait for the far side to hold every reading and the lag to be 0; check the copies; return the figures.

    Copies beyond the first are allowed up to what the link sent again after a reconnect plus what the central
    broker redelivered to the far side, which mosquitto flags (DUP); `unflagged_redeliveries` is for a broker that
    may redeliver without the flag after one of its nodes died."""
    load.join(60)
    assert load.error is None and load.acknowledged == load.n, (load.error, load.acknowledged)
    expected = {load.key(k) for k in range(load.n)}
    wait_until(lambda: expected <= far.keys(), 60, f"{name}: every reading at the far side")
    # The log's offset, not the `appended` metric: it survives a restart of the gateway (metrics start at 0).
    status = gw.wait_status(lambda s: s["log_offset"] >= load.n and s["upstream"]["lag"] == 0
                            and s["upstream"]["lag_seconds"] == 0, 60)
    caught_up = time.monotonic() - fault_ended
    with far._lock:
        messages = list(far.messages)
    ids: dict[tuple[str, int], set[str]] = defaultdict(set)
    first_seen: dict[str, list[int]] = defaultdict(list)
    for topic, env, prop in messages:
        key = (env["source"], env["payload"]["seq"])
        if key not in ids:
            first_seen[env["source"]].append(key[1])
        ids[key].add(env["id"])
        assert prop is None or prop == env["id"], "the event-id property and the payload's id differ"
        assert topic == f"sites/{gw.client_id}/{env['source']}/telemetry"
    assert all(len(v) == 1 for v in ids.values()), "a reading arrived with two different event ids"
    for source, seqs in first_seen.items():
        assert seqs == sorted(seqs), f"{source}: readings first arrived out of order"
    duplicates = len(messages) - len(ids)
    resent = status["metrics"]["upstream_resent"]
    assert duplicates <= resent + far.redelivered + unflagged_redeliveries, (duplicates, resent, far.redelivered)
    figures = {"run": name, "sent": load.n, "received": len(messages), "distinct": len(ids),
               "duplicates": duplicates, "resent_by_link": int(resent), "redelivered_to_far_side": far.redelivered,
               "link_connects": int(status["metrics"]["upstream_connects"]),
               "lag_zero_after_fault_s": round(caught_up, 1)}
    print(json.dumps(figures))
    return figures


@pytest.fixture
def central(tmp_path: Path) -> Iterator[servers.Server]:
    """The central broker at the far end of the WAN: a mosquitto of its own, killed (by its PID) at the end."""
    server = servers.mosquitto(tmp_path / "central")
    server.start()
    yield server
    server.kill()


def linked(make_gateway: Any, site: servers.Server, central: servers.Server, storage: dict[str, Any] | None = None,
           **upstream: Any) -> GatewayProcess:
    """A gateway on the site's broker whose upstream link goes to `central`; not started."""
    return make_gateway(site.address, config={
        "mqtt": {"reconnect_max": 1.0}, "storage": storage or {},
        "upstream": {"enabled": True, "brokers": [central.address], "keepalive": KEEPALIVE, **upstream}})


def test_a_frozen_and_a_restarted_central_mosquitto_lose_nothing(durable_mosquitto, central, make_gateway):
    site = durable_mosquitto
    gw = linked(make_gateway, site, central).start()
    far = FarSide(central.address, f"sites/{gw.client_id}/#")
    gw.wait_status(lambda s: s["upstream"]["connected"])
    load = Load(site.address, uid("up") + "-", n=4000, rate=400)
    load.start()
    gw.wait_status(lambda s: s["metrics"]["upstream_forwarded"] >= 300)

    central.pause()  # SIGSTOP: the WAN is cut, as far as the gateway can tell
    gw.wait_status(lambda s: not s["upstream"]["connected"] and s["upstream"]["lag"] >= 400, 20)
    paused_lag = upstream(gw)
    central.resume()
    gw.wait_status(lambda s: s["upstream"]["connected"] and s["upstream"]["lag"] < 200, 60)

    central.stop()  # SIGTERM: mosquitto saves the far side's session and queue, and comes back with them
    gw.wait_status(lambda s: not s["upstream"]["connected"], 20)
    central.start()
    restarted = time.monotonic()
    figures = account(far, load, gw, "mosquitto: SIGSTOP/SIGCONT, then a restart", restarted)
    print(json.dumps({"lag_while_paused": paused_lag}))
    assert figures["link_connects"] >= 3
    far.close()


def test_a_gateway_killed_while_forwarding_resumes_from_its_committed_offset(durable_mosquitto, central,
                                                                           make_gateway):
    """kill -9 while the link has publishes in flight: the restarted gateway forwards from the link's committed
    offset. What the dead process had forwarded but not yet committed is sent again under the same event ids: at
    most its window in flight plus what was finished since the last progress commit (consumers' progress rides
    along with the log's commits once a second). A restart from the start of the log would send at least every
    reading forwarded before the kill again, which is more than that."""
    window, rate = 50, 300
    may_repeat = window + 2 * rate  # the window and two progress intervals
    site = durable_mosquitto
    gw = linked(make_gateway, site, central, max_inflight=window).start()
    far = FarSide(central.address, f"sites/{gw.client_id}/#")
    gw.wait_status(lambda s: s["upstream"]["connected"])
    load = Load(site.address, uid("kl") + "-", n=3000, rate=rate)
    load.start()
    gw.wait_status(lambda s: s["metrics"]["upstream_forwarded"] >= 1500)

    gw.kill()  # SIGKILL: no progress committed on the way out, publishes in flight to the central broker
    forwarded_before = len(far.keys())
    assert may_repeat < forwarded_before < load.n, forwarded_before
    gw.start()  # the site broker kept what arrived meanwhile in the gateway's session
    restarted = time.monotonic()
    # The restarted process counts only its own resends; what it forwards again after the kill is the part of
    # the dead one's work it never committed.
    figures = account(far, load, gw, "gateway SIGKILL while forwarding", restarted, unflagged_redeliveries=may_repeat)
    assert figures["distinct"] == load.n
    far.close()


def test_an_outage_longer_than_the_disk_budget_holds_devices_back_and_loses_nothing(durable_mosquitto, central,
                                                                                    make_gateway):
    """The central broker is unreachable until the log reaches `storage.max_log_bytes`, every reading in it still
    owed to the link: the gateway stops acknowledging (the site broker keeps the rest in the gateway's session) and
    says so; once the WAN is back the link drains the log, the log is trimmed behind it, and every reading arrives."""
    site = durable_mosquitto
    far = FarSide(central.address, "sites/#")  # a persistent session, so it is owed what arrives while it is away
    central.stop()  # SIGTERM: the far side's session is saved; the WAN is down before the gateway starts
    gw = linked(make_gateway, site, central, storage={"max_log_bytes": 1_500_000}).start()
    load = Load(site.address, uid("bg") + "-", n=8000, rate=800)
    load.start()
    gw.wait_status(lambda s: s["metrics"]["backpressure_waits"] >= 1, 40)
    held = gw.metric("appended")
    time.sleep(2.5)  # two rewrites of the status file
    assert gw.metric("appended") == held, "nothing may be logged (nor acknowledged) over the disk budget"
    assert held < load.n
    assert "disk budget reached" in gw.output()
    assert upstream(gw)["lag"] >= held  # every reading in the log is still owed to the link

    central.start()
    figures = account(far, load, gw, "WAN outage past the disk budget", time.monotonic())
    assert figures["distinct"] == load.n
    far.close()


def test_a_killed_nats_node_loses_nothing_the_link_forwarded(make_gateway, durable_mosquitto, tmp_path: Path):
    """nats-server 2.9 speaks MQTT 3.1.1 only: the link falls back from 5 (`protocol = "auto"`), so the event id
    travels in the payload alone. The gateway knows all three nodes and starts on n1, which is killed."""
    site = durable_mosquitto
    nodes = servers.nats_cluster(tmp_path / "nats")
    servers.start_cluster(nodes)
    try:
        gw = make_gateway(site.address, config={
            "mqtt": {"reconnect_max": 1.0},
            # nats-server stores each QoS 1 publish in JetStream from the connection's read loop, one after the
            # other; while the cluster re-forms that took 4-7 s for a window of 1,000 (seen), longer than 1.5
            # keepalives of 2 s: the link dropped the connection, re-sent the window, and never got ahead. A smaller
            # window and a longer keepalive (a SIGKILLed node closes its sockets, so failover needs no keepalive).
            "upstream": {"enabled": True, "brokers": [n.address for n in nodes], "keepalive": 10,
                         "max_inflight": 100}})
        gw.start()
        far = FarSide(nodes[2].address, f"sites/{gw.client_id}/#", v5=False)
        gw.wait_status(lambda s: s["upstream"]["connected"], 30)
        assert upstream(gw)["broker"] == nodes[0].address
        load = Load(site.address, uid("nt") + "-", n=3000, rate=300)
        load.start()
        gw.wait_status(lambda s: s["metrics"]["upstream_forwarded"] >= 300, 30)

        nodes[0].kill()  # SIGKILL, while the link has publishes in flight to it
        gw.wait_status(lambda s: s["upstream"]["connected"] and s["upstream"]["broker"] != nodes[0].address, 30)
        failed_over = upstream(gw)["broker"]
        # The same store_dir: it rejoins and catches its replicas up. Its /healthz turns ok only once every stream is
        # current, which took over 30 s on a loaded CI machine (seen); the link is on another node meanwhile and
        # nothing here waits for n1, so only its MQTT listener is waited for.
        nodes[0].launch()
        servers.wait_for_port(nodes[0].port, 30, nodes[0].proc)
        restarted = time.monotonic()
        # A JetStream consumer whose acknowledgements died with n1 redelivers them, unflagged (seen: 1 copy); its
        # window, max_ack_pending, is 1024 for nats-server's MQTT sessions.
        figures = account(far, load, gw, f"nats cluster: n1 SIGKILL, failover to {failed_over}, n1 back",
                          restarted, unflagged_redeliveries=1024)
        assert figures["link_connects"] >= 2
        far.close()
    finally:
        for node in nodes:
            node.kill()
