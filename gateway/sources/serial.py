"""Serial source: devices speaking the framed protocol of docs/serial-protocol.md on serial ports.

    port (pyserial, non-blocking fd, loop.add_reader) ─▶ FrameDecoder ─▶ frames of one read, as a batch
        DATA  ─▶ profile + from_mapping ─▶ one group for the log ... committed ─▶ one write of their ACKs
        bad   ─▶ counted; NACK when the damaged frame still names its device and seq; a sample dead-lettered

Three layers, each small:

- `SerialPort` only opens, reads, writes and closes one device file.
- `SerialSource` keeps one path connected: it reopens a port that went away (USB unplugged, pty closed: the fd
  reports HUP and reads EOF/EIO) with jittered, capped exponential backoff, and turns frames into log appends.
- `SerialSources` owns every configured path and glob; globs are rescanned so a newly plugged adapter is opened.

Acknowledged means logged, as for MQTT: a DATA frame's ACK is written only after the log committed its group (the
event is durably in the log, or was already there: a retransmission is recognised by its (device, seq, ts) and
acknowledged again). Backpressure follows from that and from a bounded read-ahead: while commits wait (the log is
saturated or over its disk budget) no ACK goes out, and once `max_queued_frames` frames are waiting the fd is taken
off the event loop, so the kernel buffer fills and the device's own writes stop. The device keeps its data; nothing
is dropped here.

Frames that did not decode are line noise as far as the gateway can tell: every one is counted, NACKed when it still
names a device and seq, and a few per second are dead-lettered so an operator can see what the line carries. A
frame that decoded but is not valid telemetry (out of range, wrong field count) is dead-lettered and acknowledged,
like a bad MQTT message: resending it could not make it valid.
"""

from __future__ import annotations

import asyncio
import dataclasses
import glob
import logging
import os
import termios
import time
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import serial  # pyserial

from devices import serial_frame as sf
from devices.profiles import DeviceProfile, ProfileIndex
from devices.serial_frame import Frame, FrameDecoder, FrameError, FrameType, NackReason
from devices.telemetry import TelemetryError, from_mapping
from gateway.backoff import Backoff
from gateway.event import ID, KIND_TELEMETRY, DeadLetter, Ingested, compact_json
from gateway.ops.metrics import Metrics
from gateway.ratelimit import TokenBucket

log = logging.getLogger(__name__)

READ_SIZE = 4096
MAX_UNSENT_BYTES = 64 * 1024  # ACKs waiting for a device that does not read; beyond this the oldest are dropped
MAX_DEVICES_PER_PORT = 1024  # HELLOs remembered per port (a noisy line must not grow this without bound)
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class SerialSettings:
    """What one port needs from `gateway.config.SerialConfig` (kept apart so tests can build it directly)."""

    baud: int = 115200
    profile: str = ""  # profile of devices that sent no HELLO; empty: the profile matching the device id
    reopen_min: float = 0.2
    reopen_max: float = 5.0
    rescan_interval: float = 2.0
    max_queued_frames: int = 512
    max_fields: int = 64
    noise_deadletters_per_second: float = 1.0


class PortGone(Exception):
    """The device went away (EOF, EIO, HUP): close and reopen."""


class SerialPort:
    """One opened serial device: a non-blocking fd in raw mode. No retries, no counting: the source does that."""

    def __init__(self, path: str, baud: int) -> None:
        self.path = path
        # exclusive: a second gateway (or a stray `cat`) on the same port would steal half of the bytes.
        self._serial = serial.Serial(path, baud, timeout=0, exclusive=True)
        self.fd = self._serial.fileno()
        # pyserial's timeout=0 sets VMIN=0, where an empty read returns b"" and looks like a hangup. VMIN=1 on a
        # non-blocking fd makes "nothing yet" EAGAIN and keeps b"" for "the other end is gone".
        attrs = termios.tcgetattr(self.fd)
        attrs[6][termios.VMIN] = 1
        attrs[6][termios.VTIME] = 0
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def read(self) -> bytes | None:
        """Bytes available now; None if there are none yet. Raises PortGone on hangup."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            raise PortGone(f"{self.path}: {exc.strerror or exc}") from None
        if not data:
            raise PortGone(f"{self.path}: hung up")
        return data

    def write(self, data: bytes) -> int:
        """Write what fits now; return how much. Raises PortGone on hangup."""
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            raise PortGone(f"{self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        try:
            self._serial.close()
        except (OSError, serial.SerialException):  # already gone with the device; nothing left to release
            pass


class Sink(Protocol):
    """Where records go (the log's appender)."""

    def submit(self, records: Sequence[Ingested | DeadLetter], done: Callable[[], None] | None = None) -> None: ...

    async def room(self) -> None: ...


class SerialSource:
    """Keeps one path open and turns its frames into appends. `run()` until `close()`."""

    def __init__(self, path: str, sink: Sink, profiles: Sequence[DeviceProfile], settings: SerialSettings,
                 metrics: Metrics, *, forget_when_gone: bool = False) -> None:
        self.path = path
        self.origin = f"serial:{path}"
        self._sink = sink
        self._hello: dict[str, DeviceProfile] = {}
        self.set_profiles(profiles)
        self._settings = settings
        self._metrics = metrics
        self._forget_when_gone = forget_when_gone  # found by a glob: when the file is gone, stop; a rescan finds it
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._noise = TokenBucket(settings.noise_deadletters_per_second)
        self.connected = False
        # Per connection:
        self._port: SerialPort | None = None
        self._decoder = FrameDecoder()
        self._items: list[Frame | FrameError] = []
        self._wake = asyncio.Event()
        self._gone: str | None = None
        self._paused = False
        self._unsent = bytearray()

    def set_profiles(self, profiles: Sequence[DeviceProfile]) -> None:
        """The profiles frames are decoded with from the next one on (a device's HELLO names its own)."""
        self._by_name = {p.name: p for p in profiles}
        self._by_id = ProfileIndex(list(profiles))
        self._hello = {device: self._by_name.get(p.name, p) for device, p in self._hello.items()}

    def set_max_fields(self, max_fields: int) -> None:
        self._settings = dataclasses.replace(self._settings, max_fields=max_fields)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name=f"serial {self.path}")

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def close(self, timeout: float = 2.0) -> None:
        """Stop reading; let the batch being appended finish so its ACKs go out, then close the port."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            # Appends blocked (saturated log): the device keeps the unacknowledged frames and resends them.
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def run(self) -> None:
        retry = Backoff(self._settings.reopen_min, self._settings.reopen_max)
        while not self._closing:
            try:
                port = SerialPort(self.path, self._settings.baud)
            except (OSError, serial.SerialException, termios.error) as exc:
                if self._forget_when_gone and not os.path.exists(self.path):
                    return
                if not retry.failing:
                    log.warning("serial %s: cannot open (%s); retrying with backoff", self.path, exc)
                await self._sleep(retry.next_delay())
                continue
            retry.reset()
            self._metrics.inc("serial_connects")
            log.info("serial %s: connected at %d baud", self.path, self._settings.baud)
            try:
                await self._session(port)
            finally:
                port.close()
                self.connected = False
            if not self._closing:
                self._metrics.inc("serial_disconnects")
                log.warning("serial %s: disconnected (%s); reopening", self.path, self._gone)
                # A first short pause: a replugged adapter or recreated pty is usually back within it.
                await self._sleep(Backoff(self._settings.reopen_min, self._settings.reopen_max).next_delay())

    async def _sleep(self, seconds: float) -> None:
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)  # close() cuts the pause short
        except (asyncio.TimeoutError, TimeoutError):
            pass

    # --- one connection ----------------------------------------------------------------------------------------

    async def _session(self, port: SerialPort) -> None:
        loop = asyncio.get_running_loop()
        self._port = port
        self._decoder = FrameDecoder()  # a partial frame from before the unplug is worthless now
        self._items = []
        self._gone = None
        self._paused = False
        self._unsent.clear()
        self._hello.clear()  # devices say HELLO again on every connection
        self._wake.clear()
        self.connected = True
        loop.add_reader(port.fd, self._readable)
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if self._closing or self._gone is not None:
                    return
                items, self._items = self._items, []
                if self._paused:
                    self._paused = False
                    loop.add_reader(port.fd, self._readable)
                if items:
                    await self._handle(items)
                    if self._gone is not None:
                        return
        finally:
            loop.remove_reader(port.fd)
            loop.remove_writer(port.fd)
            self._port = None

    def _readable(self) -> None:
        """Reader callback: drain what the fd has into the decoder; the session task handles the frames."""
        port = self._port
        assert port is not None
        try:
            data = port.read()
        except PortGone as exc:
            self._lost(str(exc))
            return
        if data is None:
            return
        self._items.extend(self._decoder.feed(data))
        if len(self._items) >= self._settings.max_queued_frames:
            # Bounded read-ahead: stop reading until the session task caught up; the device's writes then block.
            asyncio.get_running_loop().remove_reader(port.fd)
            self._paused = True
        self._wake.set()

    def _lost(self, why: str) -> None:
        if self._port is not None:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._port.fd)
            loop.remove_writer(self._port.fd)
        self._gone = why
        self._wake.set()

    async def _handle(self, items: list[Frame | FrameError]) -> None:
        """One batch: everything decoded since the last batch. Appends run together; then all replies at once."""
        replies: list[Frame] = []
        acks: list[Frame] = []  # written only after the appends below returned
        appends: list[Ingested] = []
        dead: list[DeadLetter] = []
        now_ms = int(time.time() * 1000)
        frames = 0
        for item in items:
            if isinstance(item, FrameError):
                self._bad_frame(item, replies, dead, now_ms)
                continue
            frames += 1
            if item.type == FrameType.DATA:
                self._data(item, acks, appends, dead, replies, now_ms)
            elif item.type == FrameType.HELLO:
                self._on_hello(item, replies, dead, now_ms)
            # ACK and NACK only travel to devices; one arriving here is an echo or a confused peer: ignore it.
        if frames:
            self._metrics.inc("serial_frames", frames)
        if replies:
            self._send(replies)
        if appends or dead:
            # The frames of this read are one group for the log: one commit, one wake-up, then their ACKs.
            await self._sink.room()
            committed = asyncio.get_running_loop().create_future()
            self._sink.submit([*appends, *dead], lambda: committed.done() or committed.set_result(None))
            await committed
        if acks and self._gone is None:
            self._send(acks)

    def _data(self, frame: Frame, acks: list[Frame], appends: list[Ingested], dead: list[DeadLetter],
              replies: list[Frame], now_ms: int) -> None:
        self._metrics.inc("received")
        device_id = frame.device_id
        if not ID.fullmatch(device_id):
            dead.append(DeadLetter(self.origin, "bad_device_id", f"device id {device_id[:80]!r} is not a valid id",
                                   sf.encode(frame), now_ms))
            acks.append(sf.ack(device_id, frame.seq))
            return
        profile = self._profile(device_id)
        if profile is None:
            self._metrics.inc("serial_nacks")
            replies.append(sf.nack(device_id, frame.seq, NackReason.HELLO_REQUIRED))
            return
        try:
            t = from_mapping(sf.to_mapping(frame, profile), max_fields=self._settings.max_fields)
            profile.check(t)
        except (FrameError, TelemetryError) as exc:
            dead.append(DeadLetter(self.origin, exc.reason, exc.message, sf.encode(frame), now_ms))
            acks.append(sf.ack(device_id, frame.seq))
            return
        # Exactly the record the MQTT source builds for the same reading, dedup key included, so followers,
        # dashboards and the log's duplicate detection cannot tell the transports apart.
        payload = t.as_payload()
        appends.append(Ingested(f"devices/{device_id}", KIND_TELEMETRY, t.ts_ms if t.ts_ms is not None else now_ms,
                                payload, compact_json(payload), f"{t.seq}@{t.ts_ms}"))
        acks.append(sf.ack(device_id, frame.seq))

    def _profile(self, device_id: str) -> DeviceProfile | None:
        announced = self._hello.get(device_id)
        if announced is not None:
            return announced
        if self._settings.profile:
            return self._by_name.get(self._settings.profile)
        return self._by_id.get(device_id)

    def _on_hello(self, frame: Frame, replies: list[Frame], dead: list[DeadLetter], now_ms: int) -> None:
        profile = self._by_name.get(frame.profile) if frame.profile else None
        if frame.profile and profile is None:
            # Acknowledged anyway (a resent HELLO would be just as unknown); its DATA falls back to the port's
            # profile, or is NACKed, and the dead letter tells the operator which profile file is missing.
            if self._noise.take():
                dead.append(DeadLetter(self.origin, "unknown_profile",
                                       f"device {frame.device_id!r} announced unknown profile {frame.profile!r}",
                                       sf.encode(frame), now_ms))
        elif profile is not None:
            if len(self._hello) >= MAX_DEVICES_PER_PORT and frame.device_id not in self._hello:
                self._hello.clear()
            self._hello[frame.device_id] = profile
        replies.append(sf.ack(frame.device_id, frame.seq, FrameType.HELLO))

    def _bad_frame(self, err: FrameError, replies: list[Frame], dead: list[DeadLetter], now_ms: int) -> None:
        # Every decode error discarded bytes up to a delimiter: that is a resynchronisation.
        self._metrics.inc("serial_resyncs")
        if err.reason == "crc":
            self._metrics.inc("serial_crc_errors")
        elif err.reason == "oversize":
            self._metrics.inc("serial_oversize")
        if err.device_id is not None and err.seq is not None and err.frame_type == FrameType.DATA:
            # The header is not covered by a valid CRC; the device resends only a seq it still holds.
            self._metrics.inc("serial_nacks")
            replies.append(sf.nack(err.device_id, err.seq, NackReason.CORRUPT))
        if self._noise.take():
            dead.append(DeadLetter(self.origin, f"serial_{err.reason}", err.message, err.raw, now_ms))
        else:
            # Counted like every dead letter, but not stored: a noisy line would otherwise fill the table.
            self._metrics.inc("deadlettered")
            self._metrics.deadletter_reasons[f"serial_{err.reason}"] += 1

    def _send(self, frames: list[Frame]) -> None:
        """Queue replies and write as much as the port takes now; the rest when it is writable."""
        port = self._port
        if port is None:
            return
        self._unsent += b"".join(sf.encode(f) for f in frames)
        if len(self._unsent) > MAX_UNSENT_BYTES:
            # A device that does not read its replies: drop the oldest whole frames. It resends what stays
            # unacknowledged, and the log recognises the retransmissions.
            cut = self._unsent.find(0, len(self._unsent) - MAX_UNSENT_BYTES) + 1
            del self._unsent[:cut]
        self._flush()

    def _flush(self) -> None:
        port = self._port
        if port is None:
            return
        loop = asyncio.get_running_loop()
        try:
            n = port.write(bytes(self._unsent)) if self._unsent else 0
        except PortGone as exc:
            self._lost(str(exc))
            return
        del self._unsent[:n]
        if self._unsent:
            loop.add_writer(port.fd, self._flush)
        else:
            loop.remove_writer(port.fd)


class SerialSources:
    """Every configured serial path and glob. Plain paths are kept open (reopened while missing); globs are
    rescanned every `rescan_interval` seconds and each new match gets its own SerialSource."""

    def __init__(self, patterns: Sequence[str], sink: Sink, profiles: Sequence[DeviceProfile],
                 settings: SerialSettings, metrics: Metrics) -> None:
        self._patterns = list(patterns)
        self._sink = sink
        self._profiles = list(profiles)
        self._settings = settings
        self._metrics = metrics
        self.sources: dict[str, SerialSource] = {}
        self._rescan: asyncio.Task[None] | None = None
        unknown = settings.profile and settings.profile not in {p.name for p in self._profiles}
        if unknown:
            log.error("serial.profile %r is not a known profile; devices must announce theirs in HELLO",
                      settings.profile)

    def start(self) -> None:
        self._scan()
        if any(GLOB_CHARS & set(p) for p in self._patterns):
            self._rescan = asyncio.create_task(self._rescan_loop(), name="serial rescan")

    def _scan(self) -> None:
        for pattern in self._patterns:
            is_glob = bool(GLOB_CHARS & set(pattern))
            for path in sorted(glob.glob(pattern)) if is_glob else [pattern]:
                current = self.sources.get(path)
                if current is not None and not current.done:
                    continue
                source = SerialSource(path, self._sink, self._profiles, self._settings, self._metrics,
                                      forget_when_gone=is_glob)
                self.sources[path] = source
                source.start()

    async def _rescan_loop(self) -> None:
        while True:
            await asyncio.sleep(self._settings.rescan_interval)
            self._scan()

    def connected(self) -> int:
        return sum(s.connected for s in self.sources.values())

    def reconfigure(self, profiles: Sequence[DeviceProfile], max_fields: int) -> None:
        """New profiles and field limit (SIGHUP), from the next frame on, for open ports and those found later."""
        self._profiles = list(profiles)
        self._settings = dataclasses.replace(self._settings, max_fields=max_fields)
        for source in self.sources.values():
            source.set_profiles(self._profiles)
            source.set_max_fields(max_fields)

    async def close(self) -> None:
        if self._rescan is not None:
            self._rescan.cancel()
        await asyncio.gather(*(s.close() for s in self.sources.values()))


__all__ = ["SerialPort", "SerialSettings", "SerialSource", "SerialSources", "PortGone"]
