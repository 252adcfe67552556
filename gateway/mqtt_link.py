"""The gateway's one MQTT connection (gmqtt): session, status, reconnects, and acknowledged publishing.

- Persistent session (clean start off, long session expiry) so the broker queues telemetry while we are away, and
  `optimistic_acknowledgement=False` so gmqtt sends PUBACK only when our async handler returns, i.e. after the
  durable append.
- Retained `online` on `gateway/status` after every connect, `offline` as the last will and on clean shutdown.
- Reconnects use gmqtt's own loop; we set its delay before each attempt to a jittered, capped exponential backoff
  and count connects and disconnects.
- Publishing at QoS 1 is grouped in batches: `AckTracker` (a gmqtt storage, the place gmqtt keeps in-flight QoS 1
  packets until PUBACK) tells us when every publish of a batch was acknowledged, with one future per batch instead
  of one per message, and keeps the in-flight count under the broker's receive maximum.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Protocol

import gmqtt
from gmqtt.mqtt.constants import MQTTv50, MQTTv311
from gmqtt.storage import PersistentStorage

from gateway.config import ConfigError, ConfigProblem, MqttConfig, tls_files
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_TOPIC = "gateway/status"


class SessionLost(Exception):
    """The broker did not keep our session: publishes awaiting PUBACK will never be acknowledged."""


class AckBatch:
    __slots__ = ("pending", "sealed", "future", "published")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pending = 0
        self.published = 0
        self.sealed = False
        self.future: asyncio.Future[None] = loop.create_future()

    def _settle(self) -> None:
        if self.sealed and self.pending == 0 and not self.future.done():
            self.future.set_result(None)


class AckTracker(PersistentStorage):
    """gmqtt's in-flight store, extended to group publishes into batches that resolve on their last PUBACK."""

    def __init__(self) -> None:
        super().__init__()
        self._batch_of: dict[int, AckBatch] = {}
        self._current: AckBatch | None = None
        self._room: asyncio.Future[None] | None = None
        self.limit = 1000

    @property
    def in_flight(self) -> int:
        return len(self._messages)

    def open(self) -> AckBatch:
        self._current = AckBatch(asyncio.get_running_loop())
        return self._current

    def seal(self) -> AckBatch:
        batch = self._current
        assert batch is not None, "seal() without open()"
        self._current = None
        batch.sealed = True
        batch._settle()
        return batch

    def push_message(self, mid: int, raw_package: bytes) -> None:
        super().push_message(mid, raw_package)
        if self._current is not None and mid not in self._batch_of:
            self._batch_of[mid] = self._current
            self._current.pending += 1
            self._current.published += 1

    def remove_message_by_mid(self, mid: int) -> None:
        super().remove_message_by_mid(mid)
        batch = self._batch_of.pop(mid, None)
        if batch is not None:
            batch.pending -= 1
            batch._settle()
        # Wake a blocked publisher only once half the window is free, not on every PUBACK.
        if self._room is not None and len(self._messages) <= self.limit // 2 and not self._room.done():
            self._room.set_result(None)

    def clear(self) -> None:
        super().clear()
        batches = set(self._batch_of.values())
        self._batch_of.clear()
        for batch in batches:
            if not batch.future.done():
                batch.future.set_exception(SessionLost("broker session lost; unacknowledged publishes dropped"))
        if self._room is not None and not self._room.done():
            self._room.set_result(None)

    async def wait_for_room(self) -> None:
        while len(self._messages) >= self.limit:
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room


class WriteCoalescer:
    """Stands in for gmqtt's transport: writes made during one event-loop pass go to the socket as one write.

    gmqtt writes every packet (each feed publish, each PUBACK) straight to the socket, one send() syscall each;
    under load that was the largest single cost on the loop. Here they are joined and written on the next pass,
    which comes right after the current callbacks: no timer, no added wait beyond that pass.
    """

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._buffer: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if not self._buffer:
            self._loop.call_soon(self.flush)
        self._buffer.append(data)

    def flush(self) -> None:
        if self._buffer:
            data, self._buffer = b"".join(self._buffer), []
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()  # a DISCONNECT written just before close must still go out
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def coalesce_writes(client: gmqtt.Client) -> None:
    """Install a WriteCoalescer on the client's current connection (gmqtt makes a new one per reconnect)."""
    conn = client._connection  # noqa: SLF001 - gmqtt has no hook for its transport
    if conn is None or isinstance(conn._transport, WriteCoalescer):  # noqa: SLF001
        return
    coalescer = WriteCoalescer(conn._transport)  # noqa: SLF001
    conn._transport = coalescer  # noqa: SLF001 - used for QoS resends after reconnect
    conn._protocol._transport = coalescer  # noqa: SLF001 - used for every other packet


def gate_reads(client: gmqtt.Client, gate: ReadGate) -> None:
    """Make the client's current connection read its socket only while `gate` has room.

    A receive maximum should be enough to bound what arrives unacknowledged, but mosquitto 2.0 overruns it once
    acknowledgements flow (docs/ARCHITECTURE.md), and gmqtt hands every packet it reads straight to us. Not reading
    is the bound that holds with any broker: asyncio's stream reader pauses the transport once its buffer is full,
    TCP's window closes, and the backlog waits in the broker, whose job that is. gmqtt reads in one loop per
    connection, `await self.read(...)` per chunk of up to 64 KiB, so gating that call stops it between chunks.
    """
    protocol = client._connection._protocol  # noqa: SLF001 - gmqtt has no hook for its read loop
    if getattr(protocol, "_gateway_gated", False):
        return
    read = protocol.read

    async def gated_read(n: int = -1) -> bytes:
        if not gate.has_room():  # checked first: no coroutine per read while there is room
            await gate.room()
        return await read(n)

    protocol.read = gated_read
    protocol._gateway_gated = True


def tls_context(cfg: MqttConfig) -> ssl.SSLContext | None:
    """The TLS context for `mqtt.tls`, or None without TLS. Raises ConfigError naming the setting when a file is
    missing or unusable, so the daemon stops at start instead of retrying a connection that cannot work."""
    if not cfg.tls:
        return None
    problems = tls_files(cfg)
    if problems:
        raise ConfigError(problems)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # verifies the chain and, by default, the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    setting, path = "mqtt.ca_file", cfg.ca_file
    try:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        if cfg.cert_file:
            setting, path = "mqtt.cert_file", cfg.cert_file
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError([ConfigProblem(setting, path, f"cannot be used for TLS ({exc})")]) from None
    if cfg.tls_insecure:
        ctx.check_hostname = False  # the chain is still verified (verify_mode stays CERT_REQUIRED)
    return ctx


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter."""

    base: float
    cap: float
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(self.base / 2, min(self.cap, self.base * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


class ReadGate(Protocol):
    """What decides whether the link reads its socket on (the ingestor: `has_room`, `room`)."""

    def has_room(self) -> bool: ...

    async def room(self) -> None: ...


MessageHandler = Callable[[str, bytes, dict[str, Any]], Awaitable[int]]
FastHandler = Callable[[str, bytes, object], bool]


class MqttLink:
    def __init__(self, cfg: MqttConfig, metrics: Metrics, on_message: MessageHandler,
                 subscriptions: list[str], take: FastHandler | None = None,
                 read_gate: ReadGate | None = None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.tracker = AckTracker()
        self.tracker.limit = max(2, cfg.max_inflight)
        self._handler = on_message
        self._subscriptions = subscriptions
        self._backoff = Backoff(cfg.reconnect_min, cfg.reconnect_max)
        self.connected = asyncio.Event()
        will = gmqtt.Message(STATUS_TOPIC, b"offline", qos=1, retain=True)
        props: dict[str, Any] = {}
        if cfg.protocol != "3.1.1":
            props["session_expiry_interval"] = cfg.session_expiry
            # Our receive maximum: how many QoS 1 messages the broker may send before we acknowledge. We
            # acknowledge only after the append; without it the broker may send up to 65,535 (the protocol's
            # default) and all of them wait in memory. An MQTT 3.1.1 broker has only its own limit
            # (max_inflight_messages in mosquitto.conf).
            props["receive_maximum"] = min(cfg.max_inflight, 65535)
        self.client = gmqtt.Client(
            cfg.client_id,
            clean_session=False,
            optimistic_acknowledgement=False,
            will_message=will,
            persistent_storage=self.tracker,
            **props,
        )
        if cfg.username:
            self.client.set_auth_credentials(cfg.username, cfg.password or None)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.set_config({"reconnect_retries": -1, "reconnect_delay": cfg.reconnect_min})
        self._ssl = tls_context(cfg)
        self._connection_no = 0
        self._closing = False  # close() was called: a disconnect is the one we asked for
        self._read_gate = read_gate
        if take is not None:
            self._install_fast_path(take)

    def _install_fast_path(self, take: FastHandler) -> None:
        """Received QoS 1 events skip gmqtt's task per message: `take` joins them to the open batch, and `puback`
        acknowledges the whole batch after its commit.

        gmqtt offers no hook for this, so its handler's QoS 1 method is replaced on this one instance (messages
        `take` declines still go the documented way: an async on_message whose return sends the PUBACK). A task
        and a coroutine chain per message were the largest cost on the event loop at full load. The tests that
        kill the gateway between receipt and append check that the PUBACK still waits for the log.
        """
        handler = self.client._package_handler  # noqa: SLF001
        general = handler._handle_qos_1_publish_packet  # noqa: SLF001

        def qos_1(mid: int, packet: bytes, topic: str, properties: dict[str, Any]) -> None:
            if not (isinstance(topic, str) and take(topic, packet, (self._connection_no, mid))):
                general(mid, packet, topic, properties)

        handler._handle_qos_1_publish_packet = qos_1  # noqa: SLF001

    def puback(self, tokens: list[object]) -> None:
        """Acknowledge hot-path messages whose batch is committed. A token from an earlier connection is dropped:
        the broker redelivers that message on the new one, and the log recognises the copy."""
        handler = self.client._package_handler  # noqa: SLF001
        current = self._connection_no
        for no, mid in tokens:  # type: ignore[misc]
            if no == current:
                handler._send_puback(mid)  # noqa: SLF001

    async def connect(self) -> None:
        host, _, port = self.cfg.broker.rpartition(":")
        version = MQTTv311 if self.cfg.protocol == "3.1.1" else MQTTv50
        if self.cfg.password and self._ssl is None and host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("mqtt.password is sent to %s without TLS: set mqtt.tls", self.cfg.broker)
        while True:
            try:
                # gmqtt hands `ssl` to loop.create_connection, and keeps it for every reconnect.
                await self.client.connect(host, int(port), ssl=self._ssl or False, keepalive=self.cfg.keepalive,
                                          version=version)
                return
            except (OSError, gmqtt.mqtt.handler.MQTTConnectError) as exc:
                delay = self._backoff.next_delay()
                self.metrics.inc("mqtt_connect_failures")
                log.warning("cannot connect to %s (%s); retrying in %.1fs", self.cfg.broker, exc, delay)
                await asyncio.sleep(delay)

    def _on_connect(self, client: gmqtt.Client, flags: int, rc: int, properties: dict[str, Any]) -> None:
        self._connection_no += 1
        coalesce_writes(client)
        if self._read_gate is not None:
            gate_reads(client, self._read_gate)
        self._backoff.reset()
        self.metrics.inc("mqtt_connects")
        # Stay under the broker's receive maximum: gmqtt raises instead of waiting when it runs out of ids. Read
        # from the CONNACK itself: the `properties` gmqtt hands us let our own CONNECT values override the
        # broker's, and we send a receive_maximum of our own.
        connack = client._package_handler._connack_properties or {}  # noqa: SLF001
        receive_maximum = connack.get("receive_maximum", [65535])[0]
        self.tracker.limit = max(2, min(self.cfg.max_inflight, receive_maximum - 2))
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        if not self.try_publish(STATUS_TOPIC, b"online", qos=1, retain=True):  # a replayed session can fill the window
            asyncio.ensure_future(self.publish(STATUS_TOPIC, b"online", qos=1, retain=True))
        self.connected.set()
        log.info("connected to %s (session present: %s)", self.cfg.broker, bool(flags))

    def _on_disconnect(self, client: gmqtt.Client, packet: Any, exc: Exception | None = None) -> None:
        self.connected.clear()
        self.metrics.inc("mqtt_disconnects")
        if self._closing:
            log.info("disconnected from %s (shutting down)", self.cfg.broker)
            return
        delay = self._backoff.next_delay()
        client.reconnect_delay = delay
        log.warning("disconnected from %s; reconnecting in %.1fs", self.cfg.broker, delay)

    async def _on_message(self, client: gmqtt.Client, topic: str, payload: bytes, qos: int,
                          properties: dict[str, Any]) -> int:
        return await self._handler(topic, payload, properties)

    def try_publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> bool:
        """Publish now if the in-flight window has room (QoS 0 always has); False means: await `publish`.
        The hot path calls this first, so no coroutine is made per delivery while there is room."""
        if qos and self.tracker.in_flight >= self.tracker.limit:
            return False
        self.client.publish(topic, payload, qos=qos, retain=retain)
        return True

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish, waiting for room in the in-flight window first: gmqtt raises instead of waiting when it runs
        out of packet ids, so every QoS 1 publish of the gateway goes through here or `try_publish`."""
        while not self.try_publish(topic, payload, qos, retain):
            await self.tracker.wait_for_room()

    async def close(self) -> None:
        self._closing = True
        if self.client.is_connected:
            await self.publish(STATUS_TOPIC, b"offline", qos=1, retain=True)
            await self.client.disconnect()
