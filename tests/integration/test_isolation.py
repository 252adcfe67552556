"""Identity and isolation against a real mosquitto on deploy/mosquitto-production.conf and deploy/mosquitto.acl.

One broker for the module (TLS with certificates from deploy/make-certs, accounts made by `gateway credentials`)
and one gateway connected to it over TLS with its service account. Each attack is tried by a real client with
real credentials, next to a legitimate action that must work (so a test cannot pass because nothing flows), and
ordered so that the forged message, had it passed, would have arrived before the one the test waits for.

mosquitto answers an unauthorised MQTT 5 QoS 1 publish with PUBACK reason 0x87 (Not authorized) and drops it.
"""

from __future__ import annotations

import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from firmware_sim.chaos_faults import hostile_messages
from gateway.cli import main as gateway_cli
from gateway.ops.credentials import Credentials
from tests import servers
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.integration

NOT_AUTHORIZED = 0x87
CLEAN = "Lovely morning at the lake, the ducks are back and the coffee is good."
OFFENSIVE = "you are a stupid worthless idiot, shut up you pathetic moron"
RATE, BURST = 5.0, 20.0  # the gateway's limits.per_source_* here; every other test stays far below the burst

ACCOUNTS = {
    "gateway": "service", "operator": "service", "homeassistant": "service", "dev-ha": "device",
    "dev-a": "device", "dev-b": "device", "dev-c": "device", "dev-flood": "device", "dev-calm": "device",
    "alice": "user", "bob": "user", "carol": "user", "dave": "user", "fan": "user", "mallory": "user",
    "sim0001": "device", "sim0002": "device", "simfan": "user",
    "chk-0001": "device", "chk-0002": "device", "chk-0003": "device", "chk-fan": "user", "chk-slow": "user",
    "chk-bad": "device", "chk-troll": "user", "plug1": "device", "plug2": "device", "hall": "device",
    "zigbee2mqtt": "service",
}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.ProductionBroker]:
    server = servers.production_mosquitto(tmp_path_factory.mktemp("isolation"))
    creds = Credentials(server.password_file)
    server.passwords = {name: creds.add(name, role) for name, role in ACCOUNTS.items()}
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gateway(broker: servers.ProductionBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """The gateway over TLS (CA from make-certs, host name checked) with the service account, rate limits on."""
    base = tmp_path_factory.mktemp("isolation-gw")
    profiles = base / "profiles"  # the shipped profile and the three dialects, as a user enables them
    profiles.mkdir()
    for profile in [*(servers.REPO / "devices" / "profiles").glob("*.toml"),
                    *(servers.REPO / "devices" / "dialects").glob("*.toml")]:
        shutil.copy(profile, profiles)
    config = base / "gateway.toml"
    config.write_text(f'profiles_dir = "{profiles}"\n'
                      f'[mqtt]\nusername = "gateway"\npassword = "{broker.passwords["gateway"]}"\n'
                      f'tls = true\nca_file = "{broker.ca_file}"\npublish_connections = 1\n'
                      f"[limits]\nper_source_rate = {RATE}\nper_source_burst = {BURST}\n"
                      "[social]\nstats_interval_ms = 50\n[homeassistant]\nenabled = true\n")
    gw = GatewayProcess(base / "gw", broker.address, "--influx-api", "none", client_id="gw-isolation",
                        config=config)
    gw.start()
    yield gw
    gw.terminate()


class Peer:
    """One account's connection (the broker allows one live connection per account): subscribes, publishes and
    keeps what it receives, the SUBACK and PUBACK reason codes included."""

    def __init__(self, broker: servers.ProductionBroker, user: str | None, *topics: str,
                 password: str | None = None, port: int | None = None, client_id: str | None = None,
                 tls: bool | None = None, transport: str = "tcp") -> None:
        self.user = user
        self.messages: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()
        self.acks: dict[int, Any] = {}
        self.connack: Any = None
        self.disconnects = 0
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, transport=transport,
                                  client_id=client_id or f"peer-{uuid.uuid4().hex[:8]}")
        if user is not None:
            pw = password if password is not None else broker.passwords[user]
            self.client.username_pw_set(user, pw)
        if port is None if tls is None else tls:  # the TLS listener unless another port is named
            self.client.tls_set(ca_certs=str(broker.ca_file))
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_ack
        self.client.connect("127.0.0.1", port or broker.port)
        self.client.loop_start()
        self._wait(lambda: self.connack is not None, "no CONNACK")
        if not self.accepted:
            self.close()
            return
        if topics:
            self.subscribe(*topics)

    @property
    def accepted(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            client.disconnect()  # refused: stop paho from retrying in the background
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        with self.cond:
            self.disconnects += 1
            self.cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self.cond:
            self.messages.append((msg.topic, msg.payload))
            self.cond.notify_all()

    def _on_ack(self, client: Any, userdata: Any, mid: int, rc: Any, props: Any = None) -> None:
        with self.cond:
            self.acks[mid] = rc
            self.cond.notify_all()

    def _wait(self, predicate: Callable[[], bool], what: str, timeout: float = 10) -> None:
        with self.cond:
            assert self.cond.wait_for(predicate, timeout), f"{self.user}: {what}"

    def subscribe(self, *topics: str) -> list[int]:
        """Subscribe and return the broker's reason code per topic (granted QoS, or a refusal)."""
        _, mid = self.client.subscribe([(t, 1) for t in topics])
        self._wait(lambda: mid in self.acks, "no SUBACK")
        return [rc.value for rc in self.acks[mid]]

    def publish(self, topic: str, payload: bytes | dict[str, Any], retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code (0: accepted)."""
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        info = self.client.publish(topic, data, qos=1, retain=retain)
        self._wait(lambda: info.mid in self.acks, f"no PUBACK for {topic}")
        return int(self.acks[info.mid].value)

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes]]], bool], timeout: float = 20) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.messages), timeout)

    def payloads(self, topic_prefix: str = "") -> list[dict[str, Any]]:
        with self.cond:
            return [json.loads(p)["payload"] for t, p in self.messages if t.startswith(topic_prefix)]

    def topics(self) -> set[str]:
        with self.cond:
            return {t for t, _ in self.messages}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(broker: servers.ProductionBroker) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def connect(user: str | None, *topics: str, **kw: Any) -> Peer:
        peer = Peer(broker, user, *topics, **kw)
        made.append(peer)
        return peer

    yield connect
    for peer in made:
        peer.close()


def has(predicate: Callable[[dict[str, Any]], bool]) -> Callable[[list[tuple[str, bytes]]], bool]:
    return lambda messages: any(predicate(json.loads(p).get("payload", {})) for _, p in messages
                                if p.startswith(b"{"))


def follow(gateway: GatewayProcess, user: Peer, *sources: str, action: str = "follow") -> None:
    """`user` (un)follows over MQTT, as an app would; returns once the gateway has applied it."""
    metric = "follows" if action == "follow" else "unfollows"
    before = gateway.metric(metric)
    for source in sources:
        assert user.publish(f"users/{user.user}/follows", {action: source}) == 0
    gateway.wait_status(lambda s: s["metrics"][metric] >= before + len(sources), timeout=15)


def test_anonymous_clients_and_wrong_passwords_are_refused_on_every_listener(broker, peers):
    """Anonymous clients are refused twice over: allow_anonymous false, and use_username_as_clientid (a client
    without a username has no client id)."""
    for port in (None, broker.plain_port):  # the TLS listener and the loopback one
        assert peers(None, port=port).connack.value == NOT_AUTHORIZED
        assert peers("alice", password="not-her-password", port=port).connack.value == NOT_AUTHORIZED
        assert peers("nobody", password="x", port=port).connack.value == NOT_AUTHORIZED
        good = peers("alice", port=port)
        assert good.accepted  # the right password is let in on both
        good.close()


def test_tls_with_a_certificate_from_another_ca_fails(broker, tmp_path):
    other = servers.make_certs(tmp_path / "other-ca")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(other / "ca.crt"))
    client.username_pw_set("alice", broker.passwords["alice"])
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect("127.0.0.1", broker.port)
    # And a client that skips TLS gets no MQTT session on the TLS port.
    plain = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    plain.username_pw_set("alice", broker.passwords["alice"])
    connected = threading.Event()
    plain.on_connect = lambda *a: connected.set()
    plain.connect("127.0.0.1", broker.port)
    plain.loop_start()
    assert not connected.wait(1.0)
    plain.loop_stop()


def test_the_gateway_refuses_a_broker_whose_certificate_is_from_another_ca(broker, tmp_path):
    other = servers.make_certs(tmp_path / "other-ca")
    config = tmp_path / "gateway.toml"
    config.write_text(f'[mqtt]\nusername = "gateway"\npassword = "{broker.passwords["gateway"]}"\ntls = true\n'
                      f'ca_file = "{other / "ca.crt"}"\nreconnect_min = 0.1\nreconnect_max = 0.5\n'
                      '[anomaly]\nenabled = false\n[content]\nenabled = false\n')
    gw = GatewayProcess(tmp_path / "gw", broker.address, "--influx-api", "none", client_id="gw-wrong-ca",
                        config=config)
    gw.data_dir.mkdir(parents=True)
    with open(gw.log_path, "ab") as log:  # not gw.start(): that waits for a connection that must not happen
        gw.proc = subprocess.Popen(gw.argv, cwd=servers.REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        status = gw.wait_status(lambda s: s["metrics"]["mqtt_connect_failures"] >= 2, timeout=20)
        assert not status["mqtt_connected"] and status["metrics"]["mqtt_connects"] == 0
        assert "CERTIFICATE_VERIFY_FAILED" in gw.output()
    finally:
        gw.kill()


def test_the_gateway_connects_over_tls_with_its_service_account(broker, gateway):
    assert gateway.status()["mqtt_connected"]  # type: ignore[index]
    log = broker.log_path.read_text()
    # "New connection from ADDR on port P." then "New client connected from ADDR as ID (..., u'gateway')".
    tls_peers = set(re.findall(rf"New connection from (\S+) on port {broker.port}\.", log))
    gw_peers = set(re.findall(r"New client connected from (\S+) as \S+ \(.*u'gateway'\)", log))
    assert tls_peers & gw_peers


def test_a_device_cannot_publish_as_another_device(broker, gateway, peers):
    fan = peers("fan", "feeds/fan/#")
    follow(gateway, fan, "devices/dev-a", "devices/dev-b")
    dev_a, dev_b = peers("dev-a"), peers("dev-b")
    assert dev_a.publish("devices/dev-b/telemetry", {"forged": 666.0}) == NOT_AUTHORIZED
    assert dev_a.publish("devices/dev-a/telemetry", {"own": 1.0}) == 0  # sent after the forgery
    assert dev_b.publish("devices/dev-b/telemetry", {"genuine": 2.0}) == 0
    assert fan.wait_for(lambda m: has(lambda p: "own" in p)(m) and has(lambda p: "genuine" in p)(m))
    assert not has(lambda p: "forged" in p)(fan.messages)
    assert fan.topics() <= {"feeds/fan/devices/dev-a/telemetry", "feeds/fan/devices/dev-b/telemetry"}


def test_dialect_devices_speak_only_for_themselves_and_reach_the_gateway(broker, gateway, peers):
    """deploy/mosquitto.acl's dialect lines: a Tasmota device and an ESPHome node publish under their own account's
    name only, the zigbee2mqtt bridge's account for its devices, and the gateway reads all three."""
    fan = peers("fan", "feeds/fan/#")
    follow(gateway, fan, "devices/tasmota-plug1", "devices/tasmota-plug2", "devices/esphome-hall",
           "devices/z2m-kitchen")
    plug1, hall, bridge = peers("plug1"), peers("hall"), peers("zigbee2mqtt")
    assert plug1.publish("tele/plug2/SENSOR", {"BME280": {"Temperature": 66.6}, "TempUnit": "C"}) == NOT_AUTHORIZED
    assert plug1.publish("tele/plug1/SENSOR", {"BME280": {"Temperature": 21.5}, "TempUnit": "C"}) == 0
    assert hall.publish("plug1/sensor/temperature/state", b"66.6") == NOT_AUTHORIZED
    assert hall.publish("hall/sensor/temperature/state", b"19.25") == 0
    assert plug1.publish("zigbee2mqtt/kitchen", {"temperature": 66.6}) == NOT_AUTHORIZED
    assert bridge.publish("zigbee2mqtt/kitchen", {"temperature": 22.75}) == 0
    assert fan.wait_for(lambda m: {t for t, _ in m} >= {"feeds/fan/devices/tasmota-plug1/telemetry",
                                                         "feeds/fan/devices/esphome-hall/telemetry",
                                                         "feeds/fan/devices/z2m-kitchen/telemetry"})
    assert not any(66.6 in p.values() for p in fan.payloads())
    assert "feeds/fan/devices/tasmota-plug2/telemetry" not in fan.topics()


def test_no_one_can_forge_what_only_the_gateway_writes(broker, gateway, peers):
    """Deliveries, stats (retained), alerts, quarantine, the gateway's status and dead letters."""
    bob = peers("bob", "feeds/bob/#", "events/+/stats", "gateway/status")
    mallory = peers("mallory")
    for topic, retain in [("feeds/bob/devices/dev-a/telemetry", False), ("feeds/bob/notices", False),
                          ("events/0000/stats", True), ("alerts/dev-a", False), ("quarantine/bob", False),
                          ("gateway/status", True), ("gateway/deadletter", False)]:
        assert mallory.publish(topic, {"id": "forged", "likes": 10**6}, retain=retain) == NOT_AUTHORIZED, topic
    dev = peers("dev-c")
    assert dev.publish("feeds/bob/devices/dev-c/telemetry", {"forged": 1.0}) == NOT_AUTHORIZED
    assert dev.publish("users/bob/posts", {"text": "I am bob"}) == NOT_AUTHORIZED
    assert bob.wait_for(lambda m: ("gateway/status", b"online") in m, timeout=5)  # retained, from the gateway
    assert not any(b"forged" in p or b"I am bob" in p for _, p in bob.messages)


def test_home_assistant_reads_its_discovery_and_states_and_no_one_else_reads_or_forges_them(broker, gateway,
                                                                                             peers):
    ha = peers("homeassistant", "homeassistant/#", "gateway/ha/#", "gateway/status")
    mallory = peers("mallory", "#", "homeassistant/#", "gateway/ha/#")
    dev = peers("dev-ha")
    assert ha.publish("homeassistant/status", b"online") == 0  # Home Assistant's own birth message
    for topic in ("homeassistant/sensor/gw-isolation/dev-ha__level/config", "homeassistant/device/x/config",
                  "gateway/ha/dev-ha/state", "gateway/ha/dev-ha/anomaly"):
        assert mallory.publish(topic, b'{"forged": 1}', retain=True) == NOT_AUTHORIZED, topic
        assert dev.publish(topic, b'{"forged": 1}', retain=True) == NOT_AUTHORIZED, topic
        assert ha.publish(topic, b'{"forged": 1}', retain=True) == NOT_AUTHORIZED, topic  # it reads, never writes
    assert dev.publish("devices/dev-ha/telemetry", {"seq": 1, "level": 3.0}) == 0
    assert ha.wait_for(lambda m: (b'{"seq":1,"level":3.0}' in [p for t, p in m if t == "gateway/ha/dev-ha/state"]
                                  and "homeassistant/sensor/gw-isolation/dev-ha__level/config" in {t for t, _ in m}
                                  and ("gateway/ha/dev-ha/anomaly", b"OFF") in m))
    assert not any(b"forged" in p for _, p in ha.messages)
    assert ("gateway/status", b"online") in ha.messages  # the availability every entity follows
    leaked = {t for t in mallory.topics() if t.startswith(("homeassistant/", "gateway/ha/"))}
    assert not leaked, f"mallory read {leaked}"


def test_no_one_reads_a_feed_that_is_not_theirs_even_with_wildcards(broker, gateway, peers):
    bob = peers("bob", "feeds/bob/#")
    mallory = peers("mallory", "feeds/mallory/#")
    follow(gateway, bob, "devices/dev-c")
    follow(gateway, mallory, "devices/dev-c")  # mallory may follow dev-c: she gets her own copy, nothing more
    spying = ["#", "feeds/#", "feeds/+/#", "feeds/+/devices/+/telemetry", "feeds/bob/#", "+/bob/#",
              "devices/+/telemetry", "users/#", "quarantine/#", "alerts/#", "gateway/deadletter", "$SYS/#"]
    mallory.subscribe(*spying)  # mosquitto grants them; its ACL filters what is delivered
    dev = peers("dev-c")
    assert dev.publish("devices/dev-c/telemetry", {"seq": 1, "reading": 1.0}) == 0
    assert bob.wait_for(has(lambda p: p.get("reading") == 1.0))
    assert mallory.wait_for(has(lambda p: p.get("reading") == 1.0))
    assert dev.publish("devices/dev-c/telemetry", {"seq": 2, "reading": 2.0}) == 0  # a later batch
    assert bob.wait_for(has(lambda p: p.get("reading") == 2.0))
    assert mallory.wait_for(has(lambda p: p.get("reading") == 2.0))
    leaked = {t for t in mallory.topics() if not (t.startswith("feeds/mallory/") or t.startswith("events/")
                                                  or t == "gateway/status")}
    assert not leaked, f"mallory read {leaked}"
    assert "feeds/bob/devices/dev-c/telemetry" in bob.topics()


def test_a_user_cannot_post_like_or_follow_as_someone_else(broker, gateway, peers):
    alice = peers("alice", "feeds/alice/#")
    bob = peers("bob", "feeds/bob/#")
    mallory = peers("mallory", "events/+/stats")
    follow(gateway, bob, "users/alice")
    assert alice.publish("users/alice/posts", {"text": CLEAN, "nonce": uuid.uuid4().hex}) == 0
    assert bob.wait_for(has(lambda p: p.get("text") == CLEAN))
    event_id = next(json.loads(p)["id"] for t, p in bob.messages if t == "feeds/bob/users/alice/post")

    # Posting as alice: refused; alice's next post reaches bob and the forgery never does.
    assert mallory.publish("users/alice/posts", {"text": "alice says: send me money"}) == NOT_AUTHORIZED
    assert alice.publish("users/alice/posts", {"text": "second post", "nonce": uuid.uuid4().hex}) == 0
    assert bob.wait_for(has(lambda p: p.get("text") == "second post"))
    assert not has(lambda p: "money" in p.get("text", ""))(bob.messages)

    # Liking as bob: refused; mallory's own like counts, once.
    assert mallory.publish("users/bob/interactions", {"type": "like", "event_id": event_id}) == NOT_AUTHORIZED
    assert mallory.publish("users/mallory/interactions", {"type": "like", "event_id": event_id}) == 0

    def stats(messages: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        return [json.loads(p) for t, p in messages if t == f"events/{event_id}/stats"]

    assert mallory.wait_for(lambda m: any(s["likes"] >= 1 for s in stats(m)))
    assert max(s["likes"] for s in stats(mallory.messages)) == 1

    # Following for bob: refused; mallory's own follow, sent after it, is applied.
    follows = gateway.metric("follows")
    assert mallory.publish("users/bob/follows", {"follow": "devices/dev-flood"}) == NOT_AUTHORIZED
    assert mallory.publish("users/mallory/follows", {"follow": "devices/dev-flood"}) == 0
    gateway.wait_status(lambda s: s["metrics"]["follows"] >= follows + 1)
    assert "devices/dev-flood" not in gateway.run_cli("following", "bob").stdout.split()
    assert "devices/dev-flood" in gateway.run_cli("following", "mallory").stdout.split()


def test_an_unfollowed_user_stops_receiving(broker, gateway, peers):
    carol = peers("carol", "feeds/carol/#")
    bob = peers("bob", "feeds/bob/#")
    follow(gateway, carol, "devices/dev-a")
    follow(gateway, bob, "devices/dev-a")
    dev = peers("dev-a")
    assert dev.publish("devices/dev-a/telemetry", {"mark": 1.0}) == 0
    assert carol.wait_for(has(lambda p: p.get("mark") == 1.0))
    follow(gateway, carol, "devices/dev-a", action="unfollow")
    for mark in (2.0, 3.0):  # bob still gets each; the second is a later batch than the first
        assert dev.publish("devices/dev-a/telemetry", {"mark": mark}) == 0
        assert bob.wait_for(has(lambda p, mark=mark: p.get("mark") == mark))
    assert [p["mark"] for p in carol.payloads("feeds/carol/devices/dev-a") if "mark" in p] == [1.0]


def test_a_quarantined_post_goes_only_to_its_author_and_the_moderators(broker, gateway, peers):
    alice = peers("alice", "feeds/alice/#", "quarantine/alice")
    bob = peers("bob", "feeds/bob/#", "quarantine/#", "feeds/+/notices", "#")
    operator = peers("operator", "quarantine/#")
    follow(gateway, bob, "users/alice")
    assert alice.publish("users/alice/posts", {"text": OFFENSIVE, "nonce": uuid.uuid4().hex}) == 0
    assert alice.publish("users/alice/posts", {"text": CLEAN, "nonce": uuid.uuid4().hex}) == 0
    assert alice.wait_for(lambda m: any(t == "feeds/alice/notices" for t, _ in m))
    assert alice.wait_for(lambda m: any(t == "quarantine/alice" for t, _ in m))
    assert operator.wait_for(lambda m: any(t == "quarantine/alice" for t, _ in m))
    blocked = json.loads(next(p for t, p in alice.messages if t == "quarantine/alice"))
    assert blocked["payload"]["text"] == OFFENSIVE and blocked["verdicts"][0]["label"] == "blocked"
    assert bob.wait_for(has(lambda p: p.get("text") == CLEAN))  # posted after the blocked one
    # The author knows the blocked post's id (from her notice): reposting it does not get it past the policy.
    ignored = gateway.metric("interactions_ignored")
    assert alice.publish("users/alice/interactions", {"type": "repost", "event_id": blocked["id"]}) == 0
    assert alice.publish("users/alice/posts", {"text": "after the repost", "nonce": uuid.uuid4().hex}) == 0
    assert bob.wait_for(has(lambda p: p.get("text") == "after the repost"))
    gateway.wait_status(lambda s: s["metrics"]["interactions_ignored"] >= ignored + 1)
    assert not any(OFFENSIVE.encode() in p or blocked["id"].encode() in p for _, p in bob.messages)
    assert not any(t.startswith("quarantine/") or t.endswith("/notices") for t in bob.topics())


def test_a_flooding_device_is_held_to_its_rate_and_others_are_not(broker, gateway, peers):
    fan = peers("fan", "feeds/fan/#")
    follow(gateway, fan, "devices/dev-flood", "devices/dev-calm")
    limited = gateway.status()["deadletter_reasons"].get("rate_limited", 0)  # type: ignore[index]
    flood, calm = peers("dev-flood"), peers("dev-calm")
    infos = [flood.client.publish("devices/dev-flood/telemetry", json.dumps({"n": float(i)}).encode(), qos=1)
             for i in range(200)]
    for info in infos:
        info.wait_for_publish(10)
    assert calm.publish("devices/dev-calm/telemetry", {"calm": 1.0}) == 0
    assert fan.wait_for(has(lambda p: "calm" in p))
    deadline = time.monotonic() + 15
    while True:  # every flood message is either delivered or dead-lettered
        status = gateway.status() or {"deadletter_reasons": {}}
        dropped = status["deadletter_reasons"].get("rate_limited", 0) - limited
        delivered = len(fan.payloads("feeds/fan/devices/dev-flood"))
        if delivered + dropped >= 200 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delivered + dropped == 200
    assert BURST <= delivered <= BURST + RATE * 5  # the burst, plus what refilled while the flood was sent
    assert status["metrics"]["rate_limited"] >= dropped


def test_no_one_can_take_over_another_accounts_session(broker, gateway, peers):
    """With use_username_as_clientid, connecting with the gateway's client id does not disconnect it."""
    disconnects = gateway.metric("mqtt_disconnects")
    for client_id in ("gw-isolation", "gateway"):
        intruder = peers("mallory", client_id=client_id)
        assert intruder.accepted
        intruder.close()
    deadline = time.time() + 1.5  # the status file is rewritten every second
    status = gateway.wait_status(lambda s: s["time"] > deadline)
    assert status["mqtt_connected"] and status["metrics"]["mqtt_disconnects"] == disconnects


def test_removing_credentials_takes_effect_on_sighup(broker, peers, tmp_path):
    runner = CliRunner()
    pwfile = str(broker.password_file)
    added = runner.invoke(gateway_cli, ["credentials", "add", "--role", "user", "erin", "--password-file", pwfile,
                                        "--reload-pid", str(broker.proc.pid)])
    assert added.exit_code == 0, added.output
    password = added.stdout.strip()
    erin = _connect_when_accepted(broker, "erin", password)

    removed = runner.invoke(gateway_cli, ["credentials", "remove", "erin", "--password-file", pwfile])
    assert removed.exit_code == 0 and "SIGHUP" in removed.stderr
    assert erin.publish("users/erin/posts", {"text": "still here"}) == 0  # not reloaded yet: still connected

    broker.reload()  # what `--reload-pid` does
    erin._wait(lambda: erin.disconnects >= 1, "the broker kept a removed account connected")
    erin.close()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        again = peers("erin", password=password)
        if again.connack.value == NOT_AUTHORIZED:
            break
        again.close()
    assert again.connack.value == NOT_AUTHORIZED
    assert "erin" not in runner.invoke(gateway_cli, ["credentials", "list", "--password-file", pwfile]).stdout


def _connect_when_accepted(broker: servers.ProductionBroker, user: str, password: str) -> Peer:
    """SIGHUP is handled asynchronously: retry until the new account is known."""
    deadline = time.monotonic() + 5
    while True:
        peer = Peer(broker, user, password=password)
        if peer.accepted or time.monotonic() > deadline:
            assert peer.accepted, f"{user} not accepted after the reload"
            return peer
        peer.close()
        time.sleep(0.05)


def test_browsers_get_the_same_accounts_tls_and_acl_over_secure_websockets(tmp_path):
    """deploy/mosquitto-websockets.conf appended to the production file. mosquitto 2.0.11 makes that listener
    listen on every interface, so broker and clients run in a private network namespace (`unshare --net`)."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare --net` (root) to keep the all-interfaces websockets listener private")
    broker = servers.production_mosquitto(tmp_path)
    creds = Credentials(broker.password_file)
    passwords = {name: creds.add(name, role) for name, role in
                 [("gateway", "service"), ("dev-a", "device"), ("bob", "user"), ("mallory", "user")]}
    ws_port = servers.add_websockets_listener(broker)
    spec = {"argv": broker.argv, "port": broker.port, "plain_port": broker.plain_port, "ws_port": ws_port,
            "data_dir": str(broker.data_dir), "log_path": str(broker.log_path), "certs": str(broker.certs),
            "password_file": str(broker.password_file), "passwords": passwords}
    done = subprocess.run(["unshare", "--net", sys.executable, "-c",
                           "import sys; from tests.integration.test_isolation import websockets_probe; "
                           "websockets_probe(sys.argv[1])", json.dumps(spec)],
                          cwd=servers.REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{done.stderr[-3000:]}\n{broker.log_path.read_text()[-2000:]}"
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {
        "anonymous": NOT_AUTHORIZED, "wrong_password": NOT_AUTHORIZED, "forged_publish": NOT_AUTHORIZED,
        "own_publish": 0, "gateway_got": ["devices/dev-a/telemetry"],
        "bob_topics": ["feeds/bob/devices/dev-a/telemetry"], "mallory_topics": ["feeds/mallory/devices/dev-a/telemetry"],
    }


def websockets_probe(spec_json: str) -> None:
    """Inside `unshare --net` (only a loopback interface, brought up here): the broker on the production file plus
    the websockets snippet, browsers' side over wss, the gateway's over TLS. Prints one JSON line of outcomes."""
    spec = json.loads(spec_json)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    broker = servers.ProductionBroker(
        "mosquitto-ws", spec["argv"], spec["port"], Path(spec["data_dir"]), Path(spec["log_path"]),
        plain_port=spec["plain_port"], password_file=Path(spec["password_file"]), certs=Path(spec["certs"]),
        passwords=spec["passwords"])
    broker.start()
    made: list[Peer] = []

    def wss(user: str | None, *topics: str, **kw: Any) -> Peer:
        made.append(Peer(broker, user, *topics, port=spec["ws_port"], tls=True, transport="websockets", **kw))
        return made[-1]

    try:
        servers.wait_for_port(spec["ws_port"], 10, broker.proc)
        out: dict[str, Any] = {"anonymous": wss(None).connack.value,
                               "wrong_password": wss("bob", password="nope").connack.value}
        gateway = Peer(broker, "gateway", "devices/+/telemetry")  # over TLS, as the gateway would
        made.append(gateway)
        bob, mallory = wss("bob", "feeds/bob/#"), wss("mallory", "#", "feeds/mallory/#")
        dev = wss("dev-a")
        out["forged_publish"] = dev.publish("devices/dev-b/telemetry", {"forged": 1.0})
        out["own_publish"] = dev.publish("devices/dev-a/telemetry", {"own": 1.0})
        assert gateway.wait_for(lambda m: len(m) >= 1, 10)
        for who in ("bob", "mallory"):
            assert gateway.publish(f"feeds/{who}/devices/dev-a/telemetry", {"for": who}) == 0
        assert bob.wait_for(lambda m: len(m) >= 1, 10) and mallory.wait_for(lambda m: len(m) >= 1, 10)
        time.sleep(0.2)  # room for a leaked copy to show up
        out["gateway_got"] = sorted(gateway.topics())
        out["bob_topics"], out["mallory_topics"] = sorted(bob.topics()), sorted(mallory.topics())
        print(json.dumps(out))
    finally:
        for peer in made:
            peer.close()
        broker.stop()


def test_the_simulator_connects_each_device_with_its_own_account_over_tls(broker, gateway, peers, tmp_path):
    fan = peers("simfan", "feeds/simfan/#")
    follow(gateway, fan, "devices/sim0001", "devices/sim0002")
    creds = tmp_path / "devices.txt"
    creds.write_text("# id password\n" + "".join(f"{d} {broker.passwords[d]}\n" for d in ("sim0001", "sim0002")))
    argv = [sys.executable, "-m", "firmware_sim.cli", "mqtt", "--broker", broker.address, "--devices", "2",
            "--events", "20", "--rate", "100", "--device-prefix", "sim", "--no-progress",
            "--cafile", str(broker.ca_file), "--credentials", str(creds)]
    run = subprocess.run(argv, cwd=servers.REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["acknowledged"] == 20 and summary["rejected"] == 0
    assert fan.wait_for(lambda m: len(m) >= 20, 20), f"{len(fan.messages)} of 20 delivered"
    assert {t.split("/")[3] for t in fan.topics()} == {"sim0001", "sim0002"}

    creds.write_text(f"sim0001 {broker.passwords['sim0002']}\nsim0002 {broker.passwords['sim0002']}\n")
    refused = subprocess.run(argv, cwd=servers.REPO, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "refused client 'sim0001'" in refused.stderr


def test_chaos_checks_a_production_installation_with_its_own_accounts_over_tls(broker, gateway, tmp_path):
    """`firmware-sim chaos` as README "Checking your own installation" runs it against a broker set up like
    deploy/mosquitto-production.conf: every device and the follower log in as themselves, over TLS."""
    creds = tmp_path / "chaos-accounts.txt"
    accounts = ("chk-0001", "chk-0002", "chk-0003", "chk-fan", "chk-slow", "chk-bad", "chk-troll", "operator")
    creds.write_text("".join(f"{a} {broker.passwords[a]}\n" for a in accounts))
    argv = [sys.executable, "-m", "firmware_sim.cli", "chaos", "--broker", broker.address, "--cafile",
            str(broker.ca_file), "--credentials", str(creds), "--operator", "operator", "--prefix", "chk-",
            "--devices", "3",
            # 2 readings/s per device: well under the gateway's per-source limit here (RATE)
            "--rate", "6", "--duration", "8", "--fault-interval", "2", "--drain-timeout", "20",
            "--setup-timeout", "20", "--json", "--no-progress"]
    follows_before, unfollows_before = gateway.metric("follows"), gateway.metric("unfollows")
    deadlettered_before = gateway.metric("deadlettered")
    run = subprocess.run(argv, cwd=servers.REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
    report = json.loads(run.stdout)
    assert report["result"] == "pass"
    assert report["sent"] >= 40 and report["acknowledged"] == report["delivered"] == report["sent"]
    # The default faults: each reconnect logs in again, the slow follower logged in over TLS and followed every
    # device itself, and the hostile messages went out as chk-bad and chk-troll.
    faults = report["faults"]
    assert set(faults) == {"hostile", "reconnect", "slow-follower"}
    assert faults["reconnect"]["injected"] >= 1 and faults["hostile"]["injected"] >= 1
    assert all(f["failed"] == 0 for f in faults.values()), faults
    # Only the messages the two accounts may send: a topic with an id no account can have (bad_device_id) is
    # refused by the ACL before the gateway could dead-letter it. Each one sent is dead-lettered (by its reason,
    # or as rate_limited past the limit here), and the operator account saw some of them (QoS 0, rate-limited).
    per_round = sum(1 for topic, _, _ in hostile_messages("chk-") if topic.split("/")[1] in ("chk-bad", "chk-troll"))
    hostile = report["hostile"]
    assert hostile["sent"] == per_round * faults["hostile"]["injected"]
    assert 1 <= hostile["deadletters_seen"] <= hostile["sent"]
    gateway.wait_status(lambda st: st["metrics"]["deadlettered"] >= deadlettered_before + hostile["sent"], timeout=10)
    assert report["failures"] == []
    # Both followers' requests reached the gateway: 3 follows each (then as many unfollows).
    gateway.wait_status(lambda st: st["metrics"]["follows"] >= follows_before + 6
                        and st["metrics"]["unfollows"] >= unfollows_before + 6, timeout=10)
    # The run removes its follows when it ends (each follower sent its own: no one else may).
    for follower in ("chk-fan", "chk-slow"):
        deadline = time.monotonic() + 10
        while gateway.run_cli("following", follower).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gateway.run_cli("following", follower).stdout.strip() == ""

    creds.write_text("".join(f"{a} {broker.passwords['chk-0001']}\n" for a in accounts))  # wrong passwords
    refused = subprocess.run(argv, cwd=servers.REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 3, refused.stdout + refused.stderr[-2000:]
    assert "refused client 'chk-0002': Not authorized" in refused.stderr


def test_watch_logs_in_over_tls_with_an_operator_account_and_names_a_refused_login(broker, gateway, peers, tmp_path):
    config = tmp_path / "watch.toml"
    config.write_text(f'[mqtt]\nbroker = "{broker.address}"\nusername = "gateway"\ntls = true\n'
                      f'ca_file = "{broker.ca_file}"\n')
    secret = tmp_path / "operator.password"
    secret.write_text(broker.passwords["operator"] + "\n")
    argv = [sys.executable, "-m", "gateway.cli", "watch", "--config", str(config), "--follower", "operator",
            "--username", "operator", "--password-file", str(secret), "--seconds", "6"]
    device = peers("dev-c")
    watching = subprocess.Popen(argv, cwd=servers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert watching.stdout is not None
    seen = []
    for line in watching.stdout:  # the retained "online" arrives once its subscriptions are in place
        seen.append(line)
        if "gateway online" in line:
            break
    device.publish("devices/dev-c/telemetry", b"{not json")  # a dead letter the operator may read
    out, err = watching.communicate(timeout=30)
    out = "".join(seen) + out
    assert watching.returncode == 0, err
    assert "gateway online" in out and "DEAD" in out and "dev-c" in out

    secret.write_text("wrong\n")
    refused = subprocess.run(argv, cwd=servers.REPO, capture_output=True, text=True, timeout=30)
    assert refused.returncode == 1
    assert f"the broker at {broker.address} refused the login: Not authorized" in refused.stderr
    assert "Traceback" not in refused.stderr
