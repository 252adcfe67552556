"""Real MQTT clients for tests: a publisher that waits for every PUBACK and a subscriber that collects."""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any, Callable, Iterable

import paho.mqtt.client as mqtt


def _client(client_id: str | None = None, clean: bool = True) -> mqtt.Client:
    return mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{uuid.uuid4().hex[:10]}",
                       protocol=mqtt.MQTTv5)


def _hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def publish_all(address: str, messages: Iterable[tuple[str, bytes]], qos: int = 1, timeout: float = 30) -> int:
    """Publish and return once the broker acknowledged every message. Returns how many were sent."""
    client = _client()
    client.max_inflight_messages_set(200)
    client.connect(*_hostport(address))
    client.loop_start()
    try:
        infos = [client.publish(topic, payload, qos=qos) for topic, payload in messages]
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish in time"
        return len(infos)
    finally:
        client.disconnect()
        client.loop_stop()


class Collector:
    """Subscribes and keeps every message received: (topic, payload bytes, retain flag)."""

    def __init__(self, address: str, *topics: str, qos: int = 1, client_id: str | None = None,
                 clean_start: bool = True) -> None:
        self.messages: list[tuple[str, bytes, bool]] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._topics = topics
        self._qos = qos
        self.client = _client(client_id)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        props = None
        if not clean_start:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
        self.client.connect(*_hostport(address), clean_start=clean_start, properties=props)
        self.client.loop_start()
        assert self._subscribed.wait(10), "subscription not acknowledged"

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        client.subscribe([(t, self._qos) for t in self._topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[list[tuple[str, bytes, bool]]], bool], timeout: float = 20) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wait_count(self, n: int, timeout: float = 20) -> bool:
        return self.wait_for(lambda m: len(m) >= n, timeout)

    def json(self) -> list[dict[str, Any]]:
        with self._cond:
            return [json.loads(p) for _, p, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
