"""The gateway's one connection to the broker: batches in, batches out, kept up across failures.

    socket read ──▶ Decoder.feed ──▶ every PUBLISH of the read, as one list ──▶ on_publishes(list)
                                 └─▶ PUBACKs for our publishes ──▶ their trackers; room in the window
    publish() / ack() ──▶ packets gathered during one event-loop pass ──▶ one socket write

Why not a general-purpose client: the gateway's cost per event is set by how many times it crosses from C into
Python per event. gmqtt makes a task and a coroutine chain per received message, writes every packet with its own
send(), and offers no way to acknowledge a message after a durable write except returning from a coroutine per
message; measured in `benchmarks/RESULTS.md`. Here a socket read becomes one call with all its messages, and a group
commit's acknowledgements leave in one write.

What it does, per MQTT 5.0 (and 3.1.1, for brokers without 5.0):
- a persistent session (clean start off, `session_expiry`), so the broker keeps what arrives while we are away;
- QoS 1 both ways. Received messages are acknowledged only when the caller says so (`ack`), after its durable write.
  An acknowledgement tagged with an older connection is dropped: the broker resends that message on the new one.
- our publishes keep to the broker's Receive Maximum (CONNACK); beyond it `publish` returns False and the caller
  waits for `room()`. Unacknowledged publishes are kept and sent again (DUP) after a reconnect, in order, whether
  or not the broker kept our session, so a follower never misses one (it may see one twice);
- the caller bounds what it is sent: `pause_reading` stops reading the socket, so TCP's window closes and the
  backlog waits in the broker (mosquitto 2.0 overruns a client's Receive Maximum once acknowledgements flow;
  docs/ARCHITECTURE.md);
- keepalive: a PINGREQ when we have sent nothing for half the keepalive, and a broker silent for 1.5 keepalives is
  taken for gone (the socket is aborted and the reconnect loop takes over);
- reconnects with jittered, capped exponential backoff; a retained `online` on the status topic after each connect,
  and `offline` as the will and on an orderly close.

A broker with Nagle's algorithm on (mosquitto's default) holds its next small packets until we acknowledge, at the
TCP level, what it sent; the kernel delays that ACK (40 ms or more) unless data of ours carries it. So the client
never sits on something it could send: PUBACKs leave right after the commit, publishes refill the window in the
very callback that read the PUBACKs, and a read's writes are flushed before the callback returns. On a stock
mosquitto that keeps the throughput of a broker with Nagle off (benchmarks/RESULTS.md); no socket option needed.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol, Sequence

from gateway.backoff import Backoff
from gateway.mqtt import packets as pk

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Told when the broker acknowledges a publish made with it (one call per PUBACK)."""

    def acked(self) -> None: ...


class ConnectError(Exception):
    """The broker refused the connection (CONNACK with a failure), or the connection failed before CONNACK."""

    def __init__(self, message: str, reason: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Settings:
    host: str
    port: int
    client_id: str
    protocol: str = "auto"  # "5", "3.1.1" or "auto" (5, falling back to 3.1.1)
    username: str = ""
    password: str = ""
    keepalive: int = 30
    session_expiry: int = 7 * 24 * 3600
    receive_maximum: int = 2000  # what we ask the broker to send us unacknowledged
    tls: ssl.SSLContext | None = None
    reconnect_min: float = 0.5
    reconnect_max: float = 30.0
    subscriptions: tuple[str, ...] = ()
    status_topic: str = "gateway/status"  # retained online/offline and the will; "" for none
    connect_timeout: float = 10.0
    # More addresses of the same service (the nodes of a cluster): after a failed attempt or a lost connection the
    # next one in turn is tried, host:port first. What is in flight is sent again to whichever answers.
    alternates: tuple[tuple[str, int], ...] = ()
    send_maximum: int = 65535  # the most of our QoS 1 publishes unacknowledged, below the broker's own window


@dataclass
class Stats:
    connects: int = 0
    disconnects: int = 0
    connect_failures: int = 0
    resent: int = 0  # publishes sent again after a reconnect
    refused: int = 0  # publishes the broker acknowledged with a failure reason (5.0), and so did not take
    oversize: int = 0  # publishes over the broker's maximum packet size, not sent
    last_error: str | None = None
    refused_subscriptions: list[str] = field(default_factory=list)


PublishHandler = Callable[[list[pk.Inbound], int], None]


class MqttClient:
    """`run()` keeps the connection up until `close()`. Every method is for the event loop's thread."""

    def __init__(self, settings: Settings, on_publishes: PublishHandler,
                 on_connected: Callable[[bool], None] | None = None, queue_limit: int = 4096) -> None:
        self.settings = settings
        self._on_publishes = on_publishes
        self._on_connected = on_connected
        self.stats = Stats()
        self.connected = asyncio.Event()
        self.connection_no = 0  # bumped per connection; acknowledgements carry the one they belong to
        self.version = pk.V311 if settings.protocol == "3.1.1" else pk.V5
        self._protocol: _Connection | None = None
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._addresses = [(settings.host, settings.port), *settings.alternates]
        self._address = 0  # index in _addresses of the one tried now
        self._closing = False
        self._lost: asyncio.Future[None] | None = None
        # Our publishes awaiting PUBACK, in publish order: packet id -> [packet, tracker, connection it was sent
        # on]. Kept across reconnects and sent again after one.
        self._inflight: dict[int, list] = {}
        self._ready = False  # CONNACK accepted on the current connection: packets may be written
        self._next_id = 1
        self.window = 1  # the broker's Receive Maximum, from its CONNACK
        self._max_packet = pk.MAX_REMAINING_LENGTH + 5
        self._room: asyncio.Future[None] | None = None
        # QoS 1 publishes beyond the broker's window: (topic, payload, retain, tracker, properties), sent in order
        # as it opens.
        self._queue: deque[tuple[bytes, bytes, bool, Tracker | None, bytes]] = deque()
        self._queue_limit = queue_limit
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._paused = False
        self._last_sent = self._last_received = time.monotonic()
        self._subscribed: asyncio.Future[pk.SubAck] | None = None
        self._unsubscribed: asyncio.Future[pk.UnsubAck] | None = None
        self._connack: asyncio.Future[pk.ConnAck] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # A publish-only connection in step with the log's commits: asked after each write of publishes whether to
        # leave their acknowledgements in the socket until the callback it is given runs (gateway/log/appender.py
        # `hold_reads`), so they are read in the same wake-up as the next batch, not in one of their own.
        self.hold_reads: Callable[[Callable[[], None]], bool] | None = None
        self._held = False

    # --- what the rest of the gateway calls ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def has_room(self) -> bool:
        return len(self._queue) < self._queue_limit

    @property
    def queued(self) -> int:
        """QoS 1 publishes waiting for room in the broker's window (or for the connection)."""
        return len(self._queue)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 publishes taken and not yet acknowledged by the broker: in its window or queued before it."""
        return len(self._inflight) + len(self._queue)

    def window_open(self) -> bool:
        """Whether a QoS 1 publish now would be sent at once: connected, nothing queued, the window not full."""
        return self._ready and not self._queue and len(self._inflight) < self.window

    @property
    def address(self) -> str:
        """HOST:PORT of the broker connected to now (or tried next)."""
        host, port = self._addresses[self._address]
        return f"{host}:{port}"

    def publish(self, topic: bytes, payload: bytes, qos: int = 1, retain: bool = False,
                tracker: Tracker | None = None, properties: bytes = b"") -> bool:
        """Send a publish with this loop pass's write. QoS 1 beyond the broker's window waits in a bounded queue
        and goes out as PUBACKs make room, in the same callback that read them, so the window is refilled without
        a trip through the event loop; also while disconnected, until the reconnect. False (nothing taken) only
        when that queue is full: wait for `room()`. QoS 0 publishes while disconnected are dropped. `properties`:
        encoded MQTT 5 properties (packets.user_properties), left out on a 3.1.1 connection."""
        if qos:
            if self._queue or not self._ready or len(self._inflight) >= self.window:
                if len(self._queue) >= self._queue_limit:
                    return False
                self._queue.append((topic, payload, retain, tracker, properties))
                return True
            self._send(topic, payload, retain, tracker, properties)
        elif self._ready:
            packet = pk.publish(topic, payload, 0, qos=0, retain=retain, version=self.version)
            if len(packet) > self._max_packet:
                self._oversize(topic, len(packet), None)
            else:
                self._write(packet)
        return True

    def _send(self, topic: bytes, payload: bytes, retain: bool, tracker: Tracker | None,
              properties: bytes = b"") -> None:
        packet_id = self._allocate()
        packet = pk.publish(topic, payload, packet_id, qos=1, retain=retain, version=self.version,
                            properties=properties)
        if len(packet) > self._max_packet:
            self._oversize(topic, len(packet), tracker)
            return
        self._inflight[packet_id] = [packet, tracker, self.connection_no]
        self._write(packet)

    def _refill(self) -> None:
        """Move queued publishes into the broker's window while it has room."""
        queue, inflight, window = self._queue, self._inflight, self.window
        while queue and self._ready and len(inflight) < window:
            self._send(*queue.popleft())
        if self._room is not None and not self._room.done() and len(queue) < self._queue_limit:
            self._room.set_result(None)

    async def room(self) -> None:
        """Wait until a QoS 1 publish is taken again (the queue in front of the broker's window has room)."""
        while not self.has_room():
            if self._room is None or self._room.done():
                self._room = asyncio.get_running_loop().create_future()
            await self._room

    def ack(self, packet_ids: list[int], connection_no: int) -> None:
        """Acknowledge received QoS 1 messages (after their durable write). Ids from an earlier connection are
        dropped: the broker sends those messages again on the new one."""
        if packet_ids and connection_no == self.connection_no and self._ready:
            self._write(pk.pubacks(packet_ids))

    def pause_reading(self) -> None:
        if not self._paused:
            self._paused = True
            if self._protocol is not None:
                self._protocol.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused:
            self._paused = False
            self._last_received = time.monotonic()  # the silence was ours, not the broker's
            if self._protocol is not None:
                self._protocol.transport.resume_reading()

    async def run(self) -> None:
        """Connect, and reconnect whenever the connection is lost, until `close()`."""
        self._loop = asyncio.get_running_loop()
        while not self._closing:
            version = self.version
            try:
                await self._connect()
            except (OSError, ConnectError, pk.ProtocolError, asyncio.TimeoutError, TimeoutError) as exc:
                self._drop_connection()
                if self._closing:
                    return
                self.stats.connect_failures += 1
                self.stats.last_error = str(exc) or type(exc).__name__
                delay = self._backoff.next_delay()
                log.warning("cannot connect to %s (%s); retrying in %.1fs", self.address, self.stats.last_error,
                            delay)
                if self.version == version:  # the same address again when only the protocol version changed
                    self._address = (self._address + 1) % len(self._addresses)
                await self._sleep(delay)
                continue
            assert self._lost is not None
            keepalive = asyncio.create_task(self._keepalive(), name="mqtt keepalive")
            try:
                await self._lost
            finally:
                keepalive.cancel()
            self.connected.clear()
            self.stats.disconnects += 1
            if self._closing:
                log.info("disconnected from %s (shutting down)", self.address)
                return
            delay = self._backoff.next_delay()
            log.warning("connection to %s lost (%s); reconnecting in %.1fs", self.address,
                        self.stats.last_error or "closed by the broker", delay)
            self._address = (self._address + 1) % len(self._addresses)
            await self._sleep(delay)

    async def close(self, timeout: float = 5.0) -> None:
        """Orderly: retained `offline` and its PUBACK (so it reached the broker), then DISCONNECT (so the will is
        not published again). When `offline` cannot be delivered the connection is dropped instead, and the broker
        publishes the will, which says the same. The session stays with the broker for the next start."""
        self._closing = True
        protocol = self._protocol
        if protocol is not None and self.connected.is_set():
            delivered = await self._say_offline(timeout) if self.settings.status_topic else True
            if delivered:
                self._write(pk.disconnect(version=self.version))
                self._flush()
                protocol.transport.close()
            else:
                protocol.transport.abort()
        elif protocol is not None:
            protocol.transport.abort()
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    async def _say_offline(self, timeout: float) -> bool:
        """The retained `offline`, waited for until the broker acknowledged it (False: it did not in time)."""
        done = _Flag()
        if not self.publish(self.settings.status_topic.encode(), b"offline", qos=1, retain=True, tracker=done):
            return False
        try:
            await asyncio.wait_for(done.wait(), timeout)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            log.warning("broker did not acknowledge the offline status within %.0fs", timeout)
            return False

    # --- connection ------------------------------------------------------------------------------------------------

    async def _connect(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        self._connack = loop.create_future()
        self._lost = loop.create_future()
        timeout = s.connect_timeout
        host, port = self._addresses[self._address]
        transport, protocol = await asyncio.wait_for(loop.create_connection(
            lambda: _Connection(self, self.version), host, port, ssl=s.tls,
            server_hostname=host if s.tls is not None else None), timeout)
        self._protocol = protocol
        if self._closing:  # close() came while the TCP connection was being made: it had nothing to abort
            raise ConnectError("closed while connecting")
        self.connection_no += 1  # before any PUBLISH of this connection can arrive
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # our batches are written whole already
        will = pk.Will(s.status_topic, b"offline", qos=1, retain=True) if s.status_topic else None
        protocol.send_now(pk.connect(
            s.client_id, version=self.version, keepalive=s.keepalive, clean_start=False,
            username=s.username or None, password=s.password or None, will=will,
            session_expiry=s.session_expiry, receive_maximum=min(max(1, s.receive_maximum), 65535)))
        try:
            connack = await asyncio.wait_for(asyncio.shield(self._connack), timeout)
        except ConnectError:
            if self.version == pk.V5 and s.protocol == "auto":
                self.version = pk.V311  # a broker that knows only 3.1.1 refuses 5.0 or hangs up on it
                log.info("broker at %s does not speak MQTT 5; trying 3.1.1", self.address)
            raise
        if connack.reason != 0:
            # A 5.0 broker says 0x84; a 3.1.1-only one answers with its own return code 0x01 (nats-server 2.9).
            if s.protocol == "auto" and self.version == pk.V5 and connack.reason in (
                    pk.UNSUPPORTED_PROTOCOL_V5, pk.UNACCEPTABLE_PROTOCOL_V311):
                self.version = pk.V311
                log.info("broker at %s speaks MQTT 3.1.1 only; trying 3.1.1", self.address)
            raise ConnectError(f"broker refused the connection: {pk.reason_text(connack.reason, self.version)}",
                               connack.reason)
        self.stats.connects += 1
        self.stats.last_error = None  # a later loss must not show the reason of an earlier failure
        self._backoff.reset()
        if s.subscriptions:
            await self._subscribe(s.subscriptions, timeout)
        if s.status_topic:
            self.publish(s.status_topic.encode(), b"online", qos=1, retain=True) or self._publish_later(
                s.status_topic.encode(), b"online")
        self.connected.set()
        log.info("connected to %s as %s (MQTT %s, session present: %s, broker window %d)", self.address,
                 s.client_id, "5" if self.version == pk.V5 else "3.1.1", connack.session_present, self.window)
        if self._on_connected is not None:
            self._on_connected(connack.session_present)

    async def resubscribe(self, filters: Sequence[str]) -> list[str]:
        """Subscribe to `filters` from now on instead of what the settings named: the new ones are subscribed to and
        the dropped ones unsubscribed from on the live connection, and every later connect subscribes to the new
        list. Returns the new filters the broker refused. Disconnected, or disconnected meanwhile: the next connect
        subscribes to the new list, nothing else to do. One call at a time."""
        old = self.settings.subscriptions
        self.settings = replace(self.settings, subscriptions=tuple(filters))
        added = [f for f in filters if f not in old]
        dropped = [f for f in old if f not in filters]
        if not self.connected.is_set():
            return []
        timeout = self.settings.connect_timeout
        refused: list[str] = []
        try:
            if added:
                refused = await self._subscribe(added, timeout)
            if dropped:
                self._unsubscribed = asyncio.get_running_loop().create_future()
                self._write(pk.unsubscribe(self._allocate_transient(), dropped, self.version))
                await asyncio.wait_for(asyncio.shield(self._unsubscribed), timeout)
        except ConnectError:
            pass  # the reconnect subscribes to the new list
        except asyncio.TimeoutError:
            log.warning("no acknowledgement of the new subscriptions from %s; the next connect subscribes to them",
                        self.address)
        return refused

    async def _subscribe(self, filters: Sequence[str], timeout: float) -> list[str]:
        """SUBSCRIBE at QoS 1 and wait for the SUBACK; returns the filters the broker refused (and logs them)."""
        self._subscribed = asyncio.get_running_loop().create_future()
        self._write(pk.subscribe(self._allocate_transient(), list(filters), 1, self.version))
        suback = await asyncio.wait_for(asyncio.shield(self._subscribed), timeout)
        refused = [f for f, r in zip(filters, suback.reasons) if r >= 0x80]
        if refused:
            self.stats.refused_subscriptions = refused
            log.error("broker refused the subscriptions %s (%s)", refused,
                      ", ".join(pk.reason_text(r, self.version) for r in suback.reasons if r >= 0x80))
        return refused

    def _publish_later(self, topic: bytes, payload: bytes) -> bool:
        async def later() -> None:
            await self.room()
            self.publish(topic, payload, qos=1, retain=True)
        asyncio.ensure_future(later())
        return True

    def _drop_connection(self) -> None:
        if self._protocol is not None:
            self._protocol.transport.abort()
            self._protocol = None
        self._ready = False
        self.connected.clear()

    async def _sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))

    async def _keepalive(self) -> None:
        keepalive = self.settings.keepalive
        if keepalive <= 0:
            return
        while True:
            await asyncio.sleep(keepalive / 4)
            now = time.monotonic()
            if self._paused:
                self._last_received = now  # not reading is our choice; it says nothing about the broker
            if now - self._last_received > 1.5 * keepalive:
                self.stats.last_error = f"no packet from the broker for {now - self._last_received:.1f}s"
                log.warning("broker silent for %.1fs (keepalive %ds): dropping the connection",
                            now - self._last_received, keepalive)
                self._lost_now(self.stats.last_error)
                return
            if now - self._last_sent >= keepalive / 2:
                self._write(pk.PINGREQ_PACKET)

    def _lost_now(self, why: str) -> None:
        if self._protocol is not None:
            self._protocol.transport.abort()

    # --- packets -------------------------------------------------------------------------------------------------

    def _allocate(self) -> int:
        packet_id = self._next_id
        while packet_id in self._inflight:
            packet_id = packet_id % 65535 + 1
        self._next_id = packet_id % 65535 + 1
        return packet_id

    def _allocate_transient(self) -> int:
        """An id for a SUBSCRIBE: any id not held by a publish."""
        return self._allocate()

    def _oversize(self, topic: bytes, size: int, tracker: Tracker | None) -> None:
        self.stats.oversize += 1
        log.error("not publishing %d bytes to %s: over the broker's maximum packet size %d", size,
                  topic[:120].decode("utf-8", "replace"), self._max_packet)
        if tracker is not None:
            tracker.acked()  # it cannot be delivered: do not hold everything behind it

    def _write(self, packet: bytes) -> None:
        self._out.append(packet)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._out:
            return
        data = b"".join(self._out) if len(self._out) > 1 else self._out[0]
        self._out = []
        protocol = self._protocol
        if protocol is not None and not protocol.transport.is_closing():
            protocol.transport.write(data)
            self._last_sent = time.monotonic()
            if (self.hold_reads is not None and not self._held and not self._queue
                    and len(self._inflight) < self.window and self.hold_reads(self._unhold)):
                self._held = True
                self.pause_reading()

    def _unhold(self) -> None:
        self._held = False
        self.resume_reading()

    # --- from the protocol object ----------------------------------------------------------------------------------

    def _received(self, got: pk.Received, protocol: _Connection) -> None:
        self._last_received = time.monotonic()
        if got.pubacks:
            inflight = self._inflight
            for packet_id in got.pubacks:
                entry = inflight.pop(packet_id, None)
                if entry is not None and entry[1] is not None:
                    entry[1].acked()
            if self._queue:
                self._refill()
        for packet in got.control:
            self._control(packet)
        if got.publishes:
            self._on_publishes(got.publishes, self.connection_no)
        self._flush()  # what this read made us send leaves now, not on the loop's next pass

    def _control(self, packet: pk.Control) -> None:
        if isinstance(packet, pk.ConnAck):
            if packet.reason == 0:
                self._accepted(packet)
            if self._connack is not None and not self._connack.done():
                self._connack.set_result(packet)
        elif isinstance(packet, pk.SubAck):
            if self._subscribed is not None and not self._subscribed.done():
                self._subscribed.set_result(packet)
        elif isinstance(packet, pk.UnsubAck):
            if self._unsubscribed is not None and not self._unsubscribed.done():
                self._unsubscribed.set_result(packet)
        elif isinstance(packet, pk.PubAck):
            self.stats.refused += 1
            log.warning("broker refused publish %d: %s", packet.packet_id,
                        pk.reason_text(packet.reason, self.version))
        elif isinstance(packet, pk.Disconnect):
            self.stats.last_error = f"broker disconnected us: {pk.reason_text(packet.reason)}" + (
                f" ({packet.reason_string})" if packet.reason_string else "")
            log.warning("%s", self.stats.last_error)

    def _accepted(self, connack: pk.ConnAck) -> None:
        """CONNACK accepted: from here on packets may be written. Done at once, not when `_connect` resumes, so
        that nothing received or published in between can go out of order."""
        self.window = max(1, min(connack.receive_maximum, self.settings.send_maximum))
        self._max_packet = connack.maximum_packet_size
        self._ready = True
        if self._paused and self._protocol is not None:
            self._protocol.transport.pause_reading()
        # In order, before anything new (4.4): what the broker may not have received. Sent again even when it lost
        # our session: the data is ours to deliver, and a follower drops a repeat by the event id.
        for entry in self._inflight.values():
            self.stats.resent += 1
            self._write(pk.with_dup(entry[0]))
            entry[2] = self.connection_no
        self._refill()

    def _connection_lost(self, protocol: _Connection, exc: Exception | None) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._ready = False
            self._out = []
        if exc is not None:
            self.stats.last_error = str(exc) or type(exc).__name__
        if self._connack is not None and not self._connack.done():
            self._connack.set_exception(ConnectError(
                f"connection closed before CONNACK{f' ({exc})' if exc else ''}"))
        if self._subscribed is not None and not self._subscribed.done():
            self._subscribed.set_exception(ConnectError("connection closed before SUBACK"))
        if self._unsubscribed is not None and not self._unsubscribed.done():
            self._unsubscribed.set_exception(ConnectError("connection closed before UNSUBACK"))
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self.connected.clear()


READ_SIZE = 64 * 1024  # the most one socket read takes (a read's packets are handed on as one batch)


class _Connection(asyncio.BufferedProtocol):
    """asyncio's side of one TCP (or TLS) connection; the client does the thinking.

    A BufferedProtocol: the kernel copies into one buffer of ours, READ_SIZE at most per read. The bound matters:
    the MQTT source stops reading when the log is full, and what one read brings in on top of that is what memory
    must hold beyond the limit (asyncio's own reads take up to 256 KiB). A packet larger than the buffer grows it
    for as long as it takes to arrive.
    """

    def __init__(self, client: MqttClient, version: int) -> None:
        self.client = client
        self.decoder = pk.Decoder(version)
        self.transport: asyncio.Transport
        self._buffer = bytearray(READ_SIZE)
        self._filled = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send_now(self, data: bytes) -> None:
        self.transport.write(data)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled == len(self._buffer):  # one packet is larger than the buffer: make room for the rest
            needed = self.decoder.pending_length(self._buffer, 0)
            grown = bytearray(max(needed, 2 * len(self._buffer)))
            grown[:self._filled] = self._buffer
            self._buffer = grown
        return memoryview(self._buffer)[self._filled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        try:
            got, used = self.decoder.parse(self._buffer, self._filled)
        except pk.ProtocolError as exc:
            log.error("protocol error from the broker: %s; dropping the connection", exc)
            self.client.stats.last_error = f"protocol error: {exc}"
            self.transport.abort()
            return
        if used:
            rest = self._filled - used
            if len(self._buffer) > READ_SIZE and rest <= READ_SIZE:  # the large packet is through: back to size
                shrunk = bytearray(READ_SIZE)
                shrunk[:rest] = self._buffer[used:self._filled]
                self._buffer = shrunk
            elif rest:
                self._buffer[:rest] = self._buffer[used:self._filled]
            self._filled = rest
        self.client._received(got, self)  # noqa: SLF001 - the protocol object is the client's own part

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._connection_lost(self, exc)  # noqa: SLF001


class _Flag:
    """A tracker that can be awaited: set by the PUBACK of one publish."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def acked(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
