"""Serial devices end to end: real pseudo-terminals, the real simulator, the real gateway process, real mosquitto."""

from __future__ import annotations

import json
import os
import random
import select
import sqlite3
import subprocess
import sys
import time
import tty
import uuid
from pathlib import Path

import pytest

from devices import serial_frame as sf
from devices.profiles import BUILTIN_DIR, load_dir
from devices.serial_frame import Frame, FrameDecoder, FrameType
from tests.gateway_process import GatewayProcess
from tests.mqtt_helpers import Collector
from tests.servers import REPO

pytestmark = pytest.mark.integration

ENV = next(p for p in load_dir(BUILTIN_DIR) if p.name == "env-sensor")
FIELDS = {"temperature", "humidity", "pressure", "battery"}


def uid() -> str:
    return uuid.uuid4().hex[:8]


class Sim:
    """`firmware-sim serial` in its own process."""

    def __init__(self, link: Path, *args: str) -> None:
        self.err_path = link.with_suffix(".sim.err")
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "serial", "--link", str(link),
                                          *args], cwd=REPO, stdout=subprocess.PIPE, stderr=err)
        deadline = time.monotonic() + 10
        while not link.exists():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.stderr()
            time.sleep(0.02)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def summary(self, timeout: float = 30) -> dict:
        out, _ = self.proc.communicate(timeout=timeout)
        return json.loads(out.decode().strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def sims():
    started: list[Sim] = []
    yield started
    for sim in started:
        sim.kill()


@pytest.fixture
def gateways():
    started: list[GatewayProcess] = []
    yield started
    for gw in started:
        gw.kill()


def gateway(mosquitto, tmp_path: Path, gateways: list, *args: str, config: Path | None = None,
            follow: list[str] = ()) -> GatewayProcess:
    gw = GatewayProcess(tmp_path / "gw", mosquitto.address, "--influx-api", "none", *args,
                        client_id=f"gw-{uid()}", config=config)
    for device in follow:
        assert gw.run_cli("follow", "fiona", f"devices/{device}").returncode == 0
    gateways.append(gw)
    return gw.start()


def log_rows(gw: GatewayProcess, device: str) -> list[dict]:
    db = sqlite3.connect(gw.data_dir / "log.db")
    try:
        rows = db.execute("SELECT payload FROM events WHERE source = ?", (f"devices/{device}",)).fetchall()
    finally:
        db.close()
    return [json.loads(p) for (p,) in rows]


def test_every_reading_reaches_a_follower_over_a_line_with_five_percent_noise(mosquitto, tmp_path, gateways, sims):
    prefix = f"env-{uid()}-"
    devices = [f"{prefix}{i:04d}" for i in (1, 2)]
    feed = Collector(mosquitto.address, *(f"feeds/fiona/devices/{d}/telemetry" for d in devices))
    link = tmp_path / "tty-noisy"
    sims.append(Sim(link, "--devices", "2", "--events", "400", "--noise", "0.05", "--baud", "921600",
                    "--device-prefix", prefix, "--no-progress"))
    gw = gateway(mosquitto, tmp_path, gateways, "--serial", str(link), follow=devices)

    summary = sims[0].summary()
    assert summary["sent"] == summary["acknowledged"] == 400 and summary["unacked"] == 0
    assert summary["noisy_frames"] > 0 and summary["retransmitted"] > 0
    assert feed.wait_for(lambda m: {(t, json.loads(p)["payload"]["seq"]) for t, p, _ in m}
                         >= {(f"feeds/fiona/devices/{d}/telemetry", s) for d in devices for s in range(1, 201)})
    envelope = feed.json()[0]
    # The same envelope as MQTT telemetry: followers cannot tell the transports apart.
    assert envelope["source"] in {f"devices/{d}" for d in devices}
    assert envelope["kind"] == "telemetry" and envelope["ts"] == envelope["payload"]["ts"]
    assert set(envelope["payload"]) == {"seq", "ts"} | FIELDS
    assert len(envelope["id"]) == 28 and envelope["offset"] > 0 and envelope["verdicts"]
    status = gw.wait_status(lambda s: s["metrics"]["appended"] >= 400)
    m = status["metrics"]
    assert m["appended"] == 400 and m["serial_crc_errors"] + m["serial_resyncs"] > 0
    assert sorted(r["seq"] for d in devices for r in log_rows(gw, d)) == sorted(list(range(1, 201)) * 2)
    feed.close()


def test_a_line_unplugged_and_replugged_mid_stream_loses_nothing(mosquitto, tmp_path, gateways, sims):
    prefix = f"env-{uid()}-"
    link = tmp_path / "tty-plug"
    sims.append(Sim(link, "--events", "300", "--rate", "200", "--unplug-every", "0.8", "--unplug-pause", "0.3",
                    "--resend-timeout", "0.2",
                    "--device-prefix", prefix, "--no-progress"))
    gw = gateway(mosquitto, tmp_path, gateways, "--serial", str(link))

    summary = sims[0].summary()
    assert summary["unplugs"] >= 2 and summary["unacked"] == 0 and summary["acknowledged"] == 300
    status = gw.wait_status(lambda s: s["metrics"]["appended"] >= 300)
    assert status["metrics"]["serial_disconnects"] >= 2
    assert status["metrics"]["serial_connects"] >= status["metrics"]["serial_disconnects"]
    assert sorted(r["seq"] for r in log_rows(gw, f"{prefix}0001")) == list(range(1, 301))


def test_a_retransmitted_frame_is_logged_once_and_acknowledged_again(mosquitto, tmp_path, gateways, sims):
    prefix = f"env-{uid()}-"
    link = tmp_path / "tty-twice"
    sims.append(Sim(link, "--events", "30", "--repeat-every", "1", "--device-prefix", prefix, "--no-progress"))
    gw = gateway(mosquitto, tmp_path, gateways, "--serial", str(link))

    summary = sims[0].summary()
    assert summary["acknowledged"] == 30 and summary["retransmitted"] >= 30
    status = gw.wait_status(lambda s: s["metrics"]["appended"] >= 30 and s["metrics"]["duplicates"] >= 30)
    assert status["metrics"]["appended"] == 30
    assert sorted(r["seq"] for r in log_rows(gw, f"{prefix}0001")) == list(range(1, 31))


def test_a_saturated_gateway_stops_acknowledging_and_loses_nothing_when_it_resumes(mosquitto, tmp_path, gateways,
                                                                                   sims):
    """Hold the log's write lock: appends cannot finish, so no ACK may go out and the devices must hold their data
    (their retransmission buffers fill and they stop producing). Release it: everything arrives, once."""
    prefix = f"env-{uid()}-"
    link = tmp_path / "tty-flood"
    gw = gateway(mosquitto, tmp_path, gateways)  # no serial port yet: take the lock before any frame arrives
    gw.terminate()
    locker = sqlite3.connect(gw.data_dir / "log.db", isolation_level=None, timeout=5)
    locker.execute("BEGIN IMMEDIATE")
    sims.append(Sim(link, "--devices", "2", "--events", "500", "--window", "32", "--resend-timeout", "0.3",
                    "--baud", "0", "--device-prefix", prefix))
    gw.argv += ["--serial", str(link)]
    gw.start()
    # The devices send their whole window (32 frames each) and then only resend it, waiting for acknowledgements
    # that cannot come. How much of it the gateway has read by then depends on timing (it reads a batch, then waits
    # for the log), so the devices' side is what is waited for.
    deadline = time.monotonic() + 30
    while True:
        progress = sims[0].stderr().strip().splitlines()
        if progress and progress[-1].startswith("sent 64/500") and " acked 0 " in progress[-1]:
            break
        assert sims[0].proc.poll() is None, "the simulator finished although nothing was acknowledged"
        assert time.monotonic() < deadline, f"the devices never filled their windows: {progress[-1:]}"
        time.sleep(0.1)
    assert gw.metric("serial_frames") > 0 and gw.metric("appended") == 0
    locker.execute("ROLLBACK")
    locker.close()

    summary = sims[0].summary()
    assert summary["acknowledged"] == 500 and summary["unacked"] == 0
    gw.wait_status(lambda s: s["metrics"]["appended"] >= 500)
    seqs = sorted(r["seq"] for i in (1, 2) for r in log_rows(gw, f"{prefix}{i:04d}"))
    assert seqs == sorted(list(range(1, 251)) * 2)


class Line:
    """A pty the test writes raw bytes into, as a device with a broken transmitter would."""

    def __init__(self, link: Path) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.symlink(os.ttyname(self.slave), link)
        self.decoder = FrameDecoder()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            _, ready, _ = select.select([], [self.master], [], 5)
            assert ready, "the gateway stopped reading the line"
            n = os.write(self.master, view[:1024])
            view = view[n:]

    def frames_until(self, predicate, timeout: float = 10) -> list[Frame]:
        got: list[Frame] = []
        deadline = time.monotonic() + timeout
        while not predicate(got) and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                got += [f for f in self.decoder.feed(os.read(self.master, 4096)) if isinstance(f, Frame)]
        return got

    def close(self) -> None:
        os.close(self.master)
        os.close(self.slave)


def test_garbage_on_a_hot_plugged_line_never_crashes_the_gateway(mosquitto, tmp_path, gateways):
    """A port matched by a glob appears after the gateway started; it carries random bytes, a long run without a
    delimiter, a damaged frame and frames of an unknown profile, and the next good frame is still acknowledged."""
    config = tmp_path / "gateway.toml"
    config.write_text(f'[serial]\nports = ["{tmp_path}/ttyGLOB*"]\nrescan_interval = 0.2\n')
    gw = gateway(mosquitto, tmp_path, gateways, config=config)
    line = Line(tmp_path / "ttyGLOB0")
    try:
        gw.wait_status(lambda s: s["metrics"]["serial_connects"] >= 1, timeout=10)
        device = f"env-{uid()}"
        rng = random.Random(7)
        good = sf.data_frame(device, 5, 1_767_225_600_000,
                             {"temperature": 20.5, "humidity": 40.0, "pressure": 1000.0, "battery": 3.9}, ENV)
        damaged = bytearray(sf.cobs_decode(sf.encode(good)[:-1]))
        damaged[-3] ^= 0x01
        line.write(bytes(rng.randrange(256) for _ in range(20_000)))
        line.write(b"\x42" * 5000)
        line.write(b"\x00" + sf.cobs_encode(bytes(damaged)) + b"\x00")
        line.write(sf.encode(Frame(FrameType.DATA, device, 6, ts_ms=1_767_225_600_001, values=(1, 2))))
        line.write(sf.encode(good))
        replies = line.frames_until(lambda got: any(f.type == FrameType.ACK and f.seq == 5 for f in got))
        assert sf.ack(device, 5) in replies
        assert sf.nack(device, 5) in replies  # the damaged copy still named its seq
        assert sf.ack(device, 6) in replies  # invalid (too few fields): dead-lettered, and acknowledged
        status = gw.wait_status(lambda s: s["metrics"]["appended"] >= 1)
        m = status["metrics"]
        assert m["serial_resyncs"] >= 3 and m["serial_crc_errors"] >= 1 and m["serial_oversize"] >= 1
        assert status["deadletter_reasons"]["field_count"] == 1
        assert log_rows(gw, device) == [{"seq": 5, "ts": 1_767_225_600_000, "temperature": 20.5, "humidity": 40.0,
                                         "pressure": 1000.0, "battery": 3.9}]
    finally:
        line.close()
    # Unplugged: the port is closed and, being a glob match that is gone, forgotten until it reappears.
    gw.wait_status(lambda s: s["metrics"]["serial_disconnects"] >= 1)
    assert gw.terminate() == 0
