"""A bare MQTT relay: the floor under a gateway built on an MQTT client and asyncio (a benchmark reference, not a
product), on gmqtt (`--client gmqtt`, what the gateway used before its own client) or on the gateway's own client
(`--client gateway`, gateway/mqtt/client.py).

It subscribes to `devices/+/telemetry` at QoS 1 with a persistent session, and for every message publishes a small
envelope (`{"id", "source", "kind", "payload"}`) at QoS 1 to `feeds/{follower}/devices/{id}/telemetry` for each
follower given on the command line, then lets gmqtt acknowledge the message. No log, no model, no follower graph,
no InfluxDB, no durability: what is left is the MQTT work every event costs (parse, publish, PUBACKs both ways) plus
one json.loads and one json.dumps. `benchmarks/pipeline.py --variants bare-relay` runs it in the gateway's place,
so the same harness measures how much of the gateway's cost is MQTT itself.

    python benchmarks/relay.py --broker 127.0.0.1:1883 --client-id relay --follower bench [--client gateway]

gmqtt is not a dependency of the gateway: `pip install -e '.[bench]'` brings it for this comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections import deque
from typing import Any

try:
    import gmqtt
    from gmqtt.mqtt.constants import MQTTv50
    from gmqtt.storage import PersistentStorage
except ImportError:  # only --client gateway works without it
    PersistentStorage = object  # type: ignore[misc,assignment]


class Window(PersistentStorage):
    """gmqtt's in-flight store, counting: the relay must stay under the broker's receive maximum (mosquitto drops
    a client that exceeds it), so publishes wait in a queue while the window is full and go out as PUBACKs free it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.waiting: deque[tuple[str, bytes]] = deque()
        self.client: gmqtt.Client | None = None

    def send(self, topic: str, body: bytes) -> None:
        if self.waiting or len(self._messages) >= self.limit:
            self.waiting.append((topic, body))
        else:
            assert self.client is not None
            self.client.publish(topic, body, qos=1)

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        while self.waiting and len(self._messages) < self.limit:
            assert self.client is not None
            self.client.publish(*self.waiting.popleft(), qos=1)


async def connected_until_signalled(ready_file: str | None) -> None:
    """Tell the run script we are connected (by writing `ready_file`), then wait for SIGTERM or SIGINT."""
    if ready_file:
        with open(ready_file, "w") as f:
            f.write("connected\n")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def relay(broker: str, client_id: str, followers: list[str], ready_file: str | None) -> None:
    host, _, port = broker.rpartition(":")
    window = Window(limit=500)
    client = gmqtt.Client(client_id, clean_session=False, session_expiry_interval=3600, persistent_storage=window)
    window.client = client
    connected = asyncio.Event()
    n = 0

    def on_connect(c: gmqtt.Client, flags: int, rc: int, properties: Any) -> None:
        c.subscribe("devices/+/telemetry", qos=1)
        connected.set()

    def on_message(c: gmqtt.Client, topic: str, payload: bytes, qos: int, properties: Any) -> int:
        nonlocal n
        n += 1
        device = topic.split("/")[1]
        body = json.dumps({"id": n, "source": f"devices/{device}", "kind": "telemetry",
                           "payload": json.loads(payload)}, separators=(",", ":")).encode()
        for follower in followers:
            window.send(f"feeds/{follower}/devices/{device}/telemetry", body)
        return 0  # gmqtt has already sent the PUBACK (optimistic: nothing waits for a disk)

    client.on_connect = on_connect
    client.on_message = on_message
    await client.connect(host, int(port), version=MQTTv50)
    await connected.wait()
    await connected_until_signalled(ready_file)
    await client.disconnect()


async def lean_relay(broker: str, client_id: str, followers: list[str], ready_file: str | None) -> None:
    """The same job on gateway/mqtt/client.py: a read's messages in one call, their PUBACKs in one write."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gateway.mqtt.client import MqttClient, Settings

    host, _, port = broker.rpartition(":")
    n = 0
    client: MqttClient | None = None
    waiting: deque[tuple[bytes, bytes]] = deque()

    def send() -> None:
        assert client is not None
        while waiting and client.publish(*waiting[0], qos=1):
            waiting.popleft()
        if waiting:
            asyncio.ensure_future(later())

    async def later() -> None:
        assert client is not None
        await client.room()
        send()

    def on_publishes(messages: list[tuple[str, bytes, int]], connection_no: int) -> None:
        nonlocal n
        for topic, payload, _ in messages:
            n += 1
            device = topic.split("/")[1]
            body = json.dumps({"id": n, "source": f"devices/{device}", "kind": "telemetry",
                               "payload": json.loads(payload)}, separators=(",", ":")).encode()
            for follower in followers:
                waiting.append((f"feeds/{follower}/devices/{device}/telemetry".encode(), body))
        assert client is not None
        client.ack([pid for _, _, pid in messages if pid], connection_no)  # nothing waits for a disk
        send()

    client = MqttClient(Settings(host, int(port), client_id, session_expiry=3600, receive_maximum=500,
                                 subscriptions=("devices/+/telemetry",), status_topic=f"relay/{client_id}"),
                        on_publishes)
    task = asyncio.create_task(client.run())
    await client.connected.wait()
    await connected_until_signalled(ready_file)
    await client.close()
    task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--broker", required=True)
    parser.add_argument("--client-id", default="relay")
    parser.add_argument("--follower", action="append", default=[])
    parser.add_argument("--ready-file", help="written once connected and subscribed")
    parser.add_argument("--client", choices=["gmqtt", "gateway"], default="gmqtt")
    args = parser.parse_args()
    run = lean_relay if args.client == "gateway" else relay
    asyncio.run(run(args.broker, args.client_id, args.follower or ["bench"], args.ready_file))


if __name__ == "__main__":
    main()
