"""`firmware-sim serial`: simulated devices on a serial line, speaking docs/serial-protocol.md.

The line is a pseudo-terminal pair: the simulator holds the master side and exposes the slave side at `--link` (a
symlink to /dev/pts/N), which is what the gateway opens as its serial port. Several devices share one line
(`--devices N`): every frame carries its device id, as on an RS-485 bus.

Each simulated device behaves like firmware with a small RAM buffer:

- on every (re)connect it sends HELLO (id, profile name) and resends it until the gateway acknowledges it;
- readings (from `signals.DeviceSignal`, the same signals as `firmware-sim mqtt`) are DATA frames with a `seq` that
  keeps counting across reconnects; each stays in a bounded retransmission buffer (`--window` frames) until its ACK
  arrives, and is resent after `--resend-timeout` seconds or at once on a NACK for it. A device whose buffer is full
  produces nothing more until ACKs come back (the gateway's backpressure reaches the device);
- `--noise P` damages each frame written with probability P (a bit flip, a dropped byte or an inserted byte);
- `--unplug-every S` closes the pty (the gateway sees a hangup), waits `--unplug-pause` seconds, and creates a new
  one at the same path.

A pty carries bytes as fast as the CPU moves them, whatever baud rate either side sets, so `--baud B` paces the
simulator's writes at B/10 bytes per second (8N1: ten bit times per byte) to behave like a real line.

Progress goes to stderr; a JSON summary to stdout at the end. Exit status 0 when every reading was acknowledged,
1 when some were not within `--drain-timeout`.
"""

from __future__ import annotations

import json
import os
import random
import select
import sys
import time
import tty
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import click

from devices import serial_frame as sf
from devices.profiles import BUILTIN_DIR, DeviceProfile, load_dir
from devices.serial_frame import Frame, FrameDecoder, FrameType, NackReason
from firmware_sim.signals import DeviceSignal

EXIT_UNACKNOWLEDGED = 1
MAX_OUT_BYTES = 16 * 1024  # what we queue for the line ahead of the pacing; beyond it devices wait


@dataclass(frozen=True)
class SerialRun:
    link: Path
    devices: int = 1
    events: int = 100
    rate: float = 0.0  # readings per second over all devices; 0: as fast as the window and the line allow
    noise: float = 0.0
    unplug_every: float | None = None
    unplug_pause: float = 0.5
    baud: int = 115200  # 0: no pacing
    seed: int = 1
    device_prefix: str = "env-"
    kind: str = "env"
    profile: str = "env-sensor"
    window: int = 32
    resend_timeout: float = 0.5
    drain_timeout: float = 20.0
    progress: bool = True
    repeat_every: int = 0  # tests: send every Nth reading twice (a retransmission the gateway must count once)


@dataclass
class Summary:
    link: str
    devices: int
    sent: int = 0  # distinct readings sent
    acknowledged: int = 0
    retransmitted: int = 0
    unacked: int = 0
    nacks: int = 0
    hellos: int = 0
    noisy_frames: int = 0
    unplugs: int = 0
    bytes_written: int = 0
    elapsed_s: float = 0.0
    achieved_rate: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "link": self.link, "devices": self.devices, "sent": self.sent, "acknowledged": self.acknowledged,
            "retransmitted": self.retransmitted, "unacked": self.unacked, "nacks": self.nacks,
            "hellos": self.hellos, "noisy_frames": self.noisy_frames, "unplugs": self.unplugs,
            "bytes_written": self.bytes_written, "elapsed_s": round(self.elapsed_s, 3),
            "achieved_rate": round(self.achieved_rate, 1),
        }


class _Device:
    def __init__(self, signal: DeviceSignal, profile: DeviceProfile) -> None:
        self.signal = signal
        self.profile = profile
        self.id = signal.device_id
        self.unacked: OrderedDict[int, list[Any]] = OrderedDict()  # seq -> [wire bytes, last sent (monotonic)]
        self.hello_acked = False
        self.hello_sent = -1e9
        self.last_seq = 0


class _Line:
    """The pty pair and the symlink the gateway opens."""

    def __init__(self, link: Path) -> None:
        self.link = link
        self.master = -1
        self.slave = -1

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        # Raw mode on the slave side: no echo of our own frames, no line editing, 0x00 and 0x0A are plain bytes.
        # We keep the slave open too, so the master does not read EIO while the gateway has not opened it yet.
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        tmp = self.link.with_name(self.link.name + ".tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(os.ttyname(self.slave), tmp)
        os.replace(tmp, self.link)  # atomically: the gateway never sees a half-made link

    def unplug(self) -> None:
        self.link.unlink(missing_ok=True)
        for fd in (self.master, self.slave):
            if fd >= 0:
                os.close(fd)
        self.master = self.slave = -1


def damage(wire: bytes, rng: random.Random) -> bytes:
    """Line noise on one frame: a bit flip, a dropped byte or an inserted byte."""
    data = bytearray(wire)
    op = rng.randrange(3)
    i = rng.randrange(len(data))
    if op == 0:
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1:
        del data[i]
    else:
        data.insert(i, rng.randrange(256))
    return bytes(data)


class Simulator:
    def __init__(self, cfg: SerialRun, err: IO[str] = sys.stderr) -> None:
        self.cfg = cfg
        self.err = err
        profiles = {p.name: p for p in load_dir(BUILTIN_DIR)}
        if cfg.profile not in profiles:
            raise click.BadParameter(f"unknown profile {cfg.profile!r}; known: {', '.join(profiles)}")
        profile = profiles[cfg.profile]
        self.wall0_ms = int(time.time() * 1000)
        per_device_ms = cfg.devices * 1000.0 / cfg.rate if cfg.rate > 0 else 1.0
        self.devices = [
            _Device(DeviceSignal(f"{cfg.device_prefix}{i + 1:04d}", cfg.seed, cfg.kind,
                                 start_ms=self.wall0_ms + i, interval_ms=per_device_ms), profile)
            for i in range(cfg.devices)
        ]
        self.by_id = {d.id: d for d in self.devices}
        self.rng = random.Random(f"{cfg.seed}/line-noise")
        self.line = _Line(cfg.link)
        self.decoder = FrameDecoder()
        self.out = bytearray()
        self.summary = Summary(str(cfg.link), cfg.devices)
        self.produced = 0
        self.budget = 0.0  # bytes the pacing allows us to write now
        self.budget_at = time.monotonic()
        self.first_ack: float | None = None

    # --- writing ------------------------------------------------------------------------------------------------

    def _queue(self, wire: bytes) -> None:
        if self.cfg.noise and self.rng.random() < self.cfg.noise:
            wire = damage(wire, self.rng)
            self.summary.noisy_frames += 1
        self.out += wire

    def _write(self, now: float) -> None:
        if not self.out or self.line.master < 0:
            return
        n = len(self.out)
        if self.cfg.baud:
            rate = self.cfg.baud / 10.0
            # At most a few milliseconds of line time banked: a real UART cannot burst after being idle.
            self.budget = min(self.budget + (now - self.budget_at) * rate, max(64.0, rate * 0.005))
            self.budget_at = now
            n = min(n, int(self.budget))
            if n <= 0:
                return
        try:
            written = os.write(self.line.master, bytes(self.out[:n]))
        except BlockingIOError:
            return  # the pty buffer is full: the gateway is not reading (backpressure)
        except OSError:
            return
        del self.out[:written]
        self.budget -= written
        self.summary.bytes_written += written

    # --- the protocol -------------------------------------------------------------------------------------------

    def _send_hellos(self, now: float) -> None:
        for d in self.devices:
            if not d.hello_acked and now - d.hello_sent >= self.cfg.resend_timeout:
                d.hello_sent = now
                self.summary.hellos += 1
                self._queue(sf.encode(sf.hello(d.id, d.last_seq & sf.U32, d.profile.name)))

    def _resend(self, now: float) -> None:
        # Only when the line is idle: resending into a full queue would only delay the frames already waiting.
        if len(self.out) > 256:
            return
        for d in self.devices:
            if not d.hello_acked:
                continue
            for entry in d.unacked.values():
                if now - entry[1] >= self.cfg.resend_timeout:
                    entry[1] = now
                    self.summary.retransmitted += 1
                    self._queue(entry[0])
                    if len(self.out) > MAX_OUT_BYTES:
                        return

    def _produce(self, now: float, t0: float) -> None:
        cfg = self.cfg
        while self.produced < cfg.events and len(self.out) < MAX_OUT_BYTES:
            if cfg.rate > 0 and now - t0 < self.produced / cfg.rate:
                return
            d = self.devices[self.produced % cfg.devices]
            if not d.hello_acked or len(d.unacked) >= cfg.window:
                return  # this device's buffer is full (or it is not connected): wait for ACKs
            r = d.signal.next()
            d.last_seq = r.seq
            wire = sf.encode(sf.data_frame(d.id, r.seq & sf.U32, r.ts_ms, r.fields, d.profile))
            d.unacked[r.seq & sf.U32] = [wire, now]
            self.produced += 1
            self.summary.sent += 1
            self._queue(wire)
            if cfg.repeat_every and self.produced % cfg.repeat_every == 0:
                self.summary.retransmitted += 1
                self.out += wire  # an undamaged second copy: the gateway must log it once

    def _receive(self) -> None:
        try:
            data = os.read(self.line.master, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        for item in self.decoder.feed(data):
            if not isinstance(item, Frame):
                continue  # our own side of the line is clean, but be as tolerant as the gateway
            d = self.by_id.get(item.device_id)
            if d is None:
                continue
            if item.type == FrameType.ACK:
                if item.code == FrameType.HELLO:
                    d.hello_acked = True
                elif d.unacked.pop(item.seq, None) is not None:
                    if not self.summary.acknowledged:
                        self.first_ack = time.monotonic()
                    self.summary.acknowledged += 1
            elif item.type == FrameType.NACK:
                self.summary.nacks += 1
                if item.code == NackReason.HELLO_REQUIRED:
                    d.hello_acked = False
                    d.hello_sent = -1e9
                entry = d.unacked.get(item.seq)
                if entry is not None:
                    entry[1] = -1e9  # resend at the next opportunity

    def _unplug(self) -> None:
        self.line.unplug()
        self.summary.unplugs += 1
        self.out.clear()  # bytes on a cable that was pulled are lost; the unacked buffer still has them
        self.decoder = FrameDecoder()
        for d in self.devices:
            d.hello_acked = False
            d.hello_sent = -1e9
        time.sleep(self.cfg.unplug_pause)
        self.line.plug()

    def run(self) -> Summary:
        cfg = self.cfg
        self.line.plug()
        t0 = last_progress = time.monotonic()
        next_unplug = t0 + cfg.unplug_every if cfg.unplug_every else None
        drain_deadline: float | None = None
        try:
            while True:
                now = time.monotonic()
                pending = sum(len(d.unacked) for d in self.devices)
                if self.produced >= cfg.events:
                    if pending == 0 and not self.out:
                        break
                    drain_deadline = drain_deadline or now + cfg.drain_timeout
                    if now >= drain_deadline:
                        break
                if next_unplug is not None and now >= next_unplug and self.produced < cfg.events:
                    self._unplug()
                    next_unplug = time.monotonic() + cfg.unplug_every  # type: ignore[operator]
                    continue
                self._send_hellos(now)
                self._resend(now)
                self._produce(now, t0)
                self._write(now)
                if cfg.progress and now - last_progress >= 1.0:
                    last_progress = now
                    self.err.write(f"sent {self.summary.sent}/{cfg.events}  acked {self.summary.acknowledged}  "
                                   f"resent {self.summary.retransmitted}  unplugs {self.summary.unplugs}  "
                                   f"{now - t0:.1f}s\n")
                    self.err.flush()
                # Sleep until the line can take more, an ACK arrives, or a timer is due: a few ms at most.
                wait_write = [self.line.master] if self.out and not cfg.baud else []
                timeout = 0.002 if self.out else 0.02
                if cfg.rate > 0 and self.produced < cfg.events:
                    timeout = min(timeout, max(0.0, t0 + self.produced / cfg.rate - now))
                readable, _, _ = select.select([self.line.master], wait_write, [], timeout)
                if readable:
                    self._receive()
        finally:
            self.line.unplug()
        s = self.summary
        s.elapsed_s = time.monotonic() - t0
        s.unacked = sum(len(d.unacked) for d in self.devices)
        # From the first ACK: the time a gateway takes to start and open the port is not the line's throughput.
        span = time.monotonic() - (self.first_ack or t0)
        s.achieved_rate = s.acknowledged / span if span > 0 else 0.0
        return s


@click.command("serial")
@click.option("--link", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Path of the symlink to the device side of the pty (what the gateway opens).")
@click.option("--devices", type=click.IntRange(1, 9999), default=1, show_default=True,
              help="Devices multiplexed on the line.")
@click.option("--events", type=click.IntRange(0), default=100, show_default=True, help="Readings in total.")
@click.option("--rate", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Readings per second over all devices; 0 = as fast as ACKs and the line allow.")
@click.option("--noise", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Probability that a frame is damaged on the line.")
@click.option("--unplug-every", type=click.FloatRange(0, min_open=True), help="Unplug the line every S seconds.")
@click.option("--unplug-pause", type=click.FloatRange(0), default=0.5, show_default=True)
@click.option("--baud", type=click.IntRange(0), default=115200, show_default=True,
              help="Pace writes like a line at this baud rate (8N1); 0 = unpaced.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--device-prefix", default="env-", show_default=True)
@click.option("--profile", default="env-sensor", show_default=True, help="Profile announced in HELLO.")
@click.option("--window", type=click.IntRange(1, 4096), default=32, show_default=True,
              help="Unacknowledged readings a device holds before it stops producing.")
@click.option("--resend-timeout", type=click.FloatRange(0, min_open=True), default=0.5, show_default=True)
@click.option("--drain-timeout", type=click.FloatRange(0), default=20.0, show_default=True)
@click.option("--repeat-every", type=click.IntRange(0), default=0, help="Send every Nth reading twice (tests).")
@click.option("--progress/--no-progress", default=True)
def serial_command(link: Path, devices: int, events: int, rate: float, noise: float, unplug_every: float | None,
                   unplug_pause: float, baud: int, seed: int, device_prefix: str, profile: str, window: int,
                   resend_timeout: float, drain_timeout: float, repeat_every: int, progress: bool) -> None:
    """Simulated devices on a pseudo-terminal serial line (framed protocol, ACK/NACK, noise, unplugs)."""
    cfg = SerialRun(link, devices, events, rate, noise, unplug_every, unplug_pause, baud, seed, device_prefix,
                    "env", profile, window, resend_timeout, drain_timeout, progress, repeat_every)
    summary = Simulator(cfg).run()
    click.echo(json.dumps(summary.as_dict()))
    if summary.unacked:
        click.echo(f"firmware-sim: {summary.unacked} of {summary.sent} readings were not acknowledged", err=True)
        sys.exit(EXIT_UNACKNOWLEDGED)
