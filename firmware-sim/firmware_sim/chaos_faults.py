"""The faults `firmware-sim chaos` injects, one class each, and the clients they act on.

A fault's `inject` does one injection and returns a note for the report (what happened, how long the installation
took to recover), or raises FaultError when it could not be carried out. Faults that act on processes do so only
by the PID the user named (`--broker-pid`) or the PID the gateway wrote into its own status file, and only after
checking that the process is there; anything else they do through the commands the user gave
(`--gateway-restart`, `--broker-restart`, `--influx-stop`/`--influx-start`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.chaos_report import Delivery, Key
from firmware_sim.mqtt_mode import Connection, login_client

STALE_STATUS_S = 5.0  # the gateway rewrites status.json every second; older than this, it is not running
RECONNECT_WAIT_S = 15.0
COMMAND_TIMEOUT_S = 120.0


class FaultError(Exception):
    """An injection that failed; the message says why. `applied`: the fault itself happened (the gateway was
    killed, the connection cut) but the installation did not recover as it should."""

    def __init__(self, message: str, applied: bool = False) -> None:
        super().__init__(message)
        self.applied = applied


# --- the clients -------------------------------------------------------------------------------------------------


def paho_client(client_id: str, password: str | None, cafile: Path | None) -> mqtt.Client:
    """`login_client`, back quickly after a broker restart, with room for a burst of QoS 1 publishes."""
    client = login_client(client_id, password, cafile)
    client.reconnect_delay_set(0.2, 5)
    client.max_inflight_messages_set(100)
    return client


class DeviceLink(Connection):
    """A device connection that knows which reading each PUBACK answers.

    The PUBACK callback runs on paho's network thread while paho holds its own message lock, so it only appends
    (mid, refused) to a deque; the sender's thread pairs mids with readings in `settle`. Pairing there is safe: a
    mid is recorded before `settle` can run on the same thread, and paho reuses a mid only after 65,535 others.
    """

    def __init__(self, client_id: str, password: str | None = None, cafile: Path | None = None) -> None:
        super().__init__(client_id, qos=1, password=password, cafile=cafile)
        self.client.reconnect_delay_set(0.2, 5)  # back quickly after a broker restart, not after 2 minutes
        self._answers: deque[tuple[int, bool]] = deque()
        self._outstanding: dict[int, Key] = {}
        self.connects = 0

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        super()._on_connect(client, userdata, flags, reason, properties)
        if not reason.is_failure:
            self.connects += 1

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode,
                    properties: Properties | None) -> None:
        super()._on_publish(client, userdata, mid, reason, properties)
        self._answers.append((mid, reason.is_failure))

    def send(self, topic: str, payload: bytes, key: Key) -> None:
        info = self.publish(topic, payload)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # only with 65,535 publishes unanswered; the pacer prevents it
            raise RuntimeError(f"paho refused to queue a publish on {self.client_id}")
        self._outstanding[info.mid] = key

    def settle(self, acked: set[Key], refused: set[Key]) -> None:
        """Move every answered reading to `acked` or `refused`. Call from the thread that calls `send`."""
        while self._answers:
            mid, failed = self._answers.popleft()
            key = self._outstanding.pop(mid, None)
            if key is not None:
                (refused if failed else acked).add(key)

    @property
    def unanswered(self) -> int:
        return len(self._outstanding)

    def drop(self) -> None:
        """Cut the connection without DISCONNECT, as a lost network would; paho reconnects and re-sends what was
        in flight (QoS 1, DUP set)."""
        drop_socket(self.client)


def drop_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is None:
        raise FaultError("the connection is already down")
    try:
        sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    except OSError as exc:
        raise FaultError(f"could not cut the connection: {exc}") from None


class Follower:
    """The run's follower: a persistent session on `feeds/{id}/#` (the broker keeps its queue while it is away).
    Keeps every delivery of the run's devices, and sends its own follow requests (a broker with accounts lets only
    user X publish `users/X/follows`)."""

    SESSION_EXPIRY_S = 600

    def __init__(self, follower_id: str, device_prefix: str, password: str | None = None,
                 cafile: Path | None = None) -> None:
        self.follower_id = follower_id
        self.device_prefix = device_prefix
        self.client = paho_client(follower_id, password, cafile)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.deliveries: dict[Key, list[Delivery]] = defaultdict(list)
        self.connects = 0
        self.undecodable = 0

    def start(self, host: str, port: int) -> None:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.SESSION_EXPIRY_S
        self.client.connect(host, port, keepalive=30, clean_start=False, properties=props)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            return
        self.connects += 1
        client.subscribe(f"feeds/{self.follower_id}/#", qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        at = time.monotonic()
        try:
            doc = json.loads(msg.payload)
            device = str(doc["source"]).removeprefix("devices/")
            if not device.startswith(self.device_prefix):
                return
            key = (device, int(doc["payload"]["seq"]))
            delivery = Delivery(at, str(doc["id"]))
        except (ValueError, KeyError, TypeError):
            self.undecodable += 1
            return
        with self.lock:
            self.deliveries[key].append(delivery)

    def publish_all(self, messages: list[tuple[str, bytes]], timeout: float) -> int:
        return publish_all(self.client, messages, timeout)

    def snapshot(self) -> dict[Key, list[Delivery]]:
        with self.lock:
            return {k: list(v) for k, v in self.deliveries.items()}

    def delivered(self, key: Key) -> bool:
        with self.lock:
            return bool(self.deliveries.get(key))

    def drop(self) -> None:
        drop_socket(self.client)

    def close(self) -> None:
        """Disconnect and let the broker forget the session (expiry 0 on DISCONNECT)."""
        props = Properties(PacketTypes.DISCONNECT)
        props.SessionExpiryInterval = 0
        self.client.disconnect(properties=props)
        self.client.loop_stop()


class Peer:
    """A plain client of the run with a clean session and its own network thread."""

    def __init__(self, client_id: str, password: str | None = None, cafile: Path | None = None) -> None:
        self.client = paho_client(client_id, password, cafile)

    def start(self, host: str, port: int) -> None:
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher(Peer):
    """The hostile messages: a QoS 1 publisher that waits for the PUBACKs."""

    def publish_all(self, messages: list[tuple[str, bytes]], timeout: float) -> int:
        return publish_all(self.client, messages, timeout)


def publish_all(client: mqtt.Client, messages: list[tuple[str, bytes]], timeout: float) -> int:
    """Publish at QoS 1; return how many the broker acknowledged within `timeout`."""
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.01, deadline - time.monotonic()))
    return sum(1 for info in infos if info.is_published())


class DeadletterWatcher(Peer):
    """Counts the dead letters of the run's own ids on `gateway/deadletter`, by reason. A broker with accounts
    shows that topic only to operator accounts (deploy/mosquitto.acl), so there it logs in as one."""

    def __init__(self, client_id: str, prefix: str, password: str | None = None, cafile: Path | None = None) -> None:
        super().__init__(client_id, password, cafile)
        self.prefix = prefix
        self.client.on_connect = lambda client, *args: client.subscribe("gateway/deadletter", qos=0)
        self.client.on_subscribe = lambda *args: self.subscribed.set()
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()
        self.lock = threading.Lock()
        self.reasons: list[str] = []

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict) and self.prefix in str(doc.get("origin", "")):
            with self.lock:
                self.reasons.append(str(doc.get("reason")))

    def snapshot(self) -> list[str]:
        with self.lock:
            return list(self.reasons)


# --- what every fault gets ---------------------------------------------------------------------------------------


@dataclass
class Context:
    host: str
    port: int
    prefix: str
    links: list[DeviceLink]
    follower: Follower
    say: Callable[[str], None]  # one line on stderr, as it happens
    abort: threading.Event  # set on Ctrl-C: cut waits short
    rng: Any  # random.Random, seeded


class Fault(Protocol):
    name: str

    def inject(self, ctx: Context) -> str: ...

    def close(self) -> None: ...


# --- processes ---------------------------------------------------------------------------------------------------


def process_state(pid: int) -> str | None:
    """'running', 'zombie' (dead, not yet reaped by its parent), or None (no such process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return "running"  # someone else's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat[stat.rindex(")") + 2] in "ZX":
            return "zombie"
    except (OSError, ValueError, IndexError):
        pass
    return "running"


def cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None


def run_command(command: str, what: str) -> str:
    """Run a user's shell command to completion; FaultError with its output's tail when it fails.

    Its output goes to a file, not a pipe: a command that starts a daemon in the background (`gateway run &`)
    leaves that daemon holding the output, and a pipe would never reach end-of-file.
    """
    with tempfile.TemporaryFile() as out:
        try:
            result = subprocess.run(command, shell=True, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise FaultError(f"{what} command did not finish within {COMMAND_TIMEOUT_S:g}s: {command}") from None
        out.seek(0)
        tail = out.read()[-400:].decode(errors="replace").strip()
    if result.returncode != 0:
        raise FaultError(f"{what} command exited with {result.returncode}: {command}" + (f": {tail}" if tail else ""))
    return tail


@dataclass
class GatewayControl:
    """The running gateway, found through the status file it rewrites every second in its data folder."""

    data_dir: Path
    restart: str
    timeout: float

    def status(self) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.data_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return doc if isinstance(doc, dict) else None

    def running_pid(self) -> int:
        """The PID of the gateway that wrote a fresh status file; FaultError when there is none."""
        doc = self.status()
        if doc is None:
            raise FaultError(f"no status.json in {self.data_dir}: is the gateway running with this data folder?")
        age = time.time() - float(doc.get("time", 0))
        pid = int(doc.get("pid", 0))
        if age > STALE_STATUS_S or pid <= 0:
            raise FaultError(f"{self.data_dir}/status.json is {age:.0f}s old: the gateway is not running")
        if process_state(pid) != "running":
            raise FaultError(f"the gateway's pid {pid} (from status.json) is not running")
        line = cmdline(pid)
        if line is not None and "gateway" not in line:
            raise FaultError(f"pid {pid} from status.json is not a gateway ({line[:80]!r}); not touching it")
        return pid

    def wait_back(self, old_pid: int, since: float) -> tuple[int, float]:
        """Wait for a gateway other than `old_pid` to write a fresh status, connected to the broker."""
        deadline = since + self.timeout
        while time.monotonic() < deadline:
            doc = self.status()
            if doc is not None and int(doc.get("pid", 0)) not in (0, old_pid) and doc.get("mqtt_connected") \
                    and time.time() - float(doc.get("time", 0)) < STALE_STATUS_S:
                return int(doc["pid"]), time.monotonic() - since
            time.sleep(0.1)
        raise FaultError(f"the gateway did not come back within {self.timeout:g}s after the restart command")


class GatewaySignal:
    """kill-gateway (SIGKILL at a random moment) or term-gateway (SIGTERM under load, an orderly shutdown), then
    the user's restart command, then wait for the gateway to be back and connected."""

    TERM_WAIT_S = 30.0  # the gateway's shutdown deadline is 20 s

    def __init__(self, name: str, sig: signal.Signals, control: GatewayControl) -> None:
        self.name = name
        self.sig = sig
        self.control = control

    def inject(self, ctx: Context) -> str:
        pid = self.control.running_pid()
        os.kill(pid, self.sig)
        t0 = time.monotonic()
        wait = self.TERM_WAIT_S if self.sig == signal.SIGTERM else 5.0
        while process_state(pid) == "running" and time.monotonic() - t0 < wait:
            time.sleep(0.05)
        if process_state(pid) == "running":
            raise FaultError(f"pid {pid} still running {wait:g}s after {self.sig.name}", applied=True)
        stopped = time.monotonic() - t0
        try:
            run_command(self.control.restart, "gateway restart")
            new_pid, took = self.control.wait_back(pid, t0)
        except FaultError as exc:
            raise FaultError(f"{self.sig.name} pid {pid}; {exc}", applied=True) from None
        stop_note = f", exited after {stopped:.1f}s" if self.sig == signal.SIGTERM else ""
        return f"{self.sig.name} pid {pid}{stop_note}; back as pid {new_pid} after {took:.1f}s"

    def close(self) -> None:
        pass


class PauseBroker:
    """SIGSTOP the broker for longer than the keepalives (a network cut, as both sides see it), then SIGCONT.

    `pid` is a PID or a pid file, read at each injection, so a broker restarted in between is still found."""

    name = "pause-broker"

    def __init__(self, pid: str, seconds: float) -> None:
        self.pid = pid
        self.seconds = seconds
        self.paused: int | None = None

    def broker_pid(self) -> int:
        if self.pid.isdigit():
            return int(self.pid)
        try:
            lines = Path(self.pid).read_text().split()
            return int(lines[-1])
        except (OSError, ValueError, IndexError) as exc:
            raise FaultError(f"no PID in {self.pid}: {exc}") from None

    def inject(self, ctx: Context) -> str:
        pid = self.broker_pid()
        if process_state(pid) != "running":
            raise FaultError(f"the broker's pid {pid} is not running")
        os.kill(pid, signal.SIGSTOP)
        self.paused = pid
        t0 = time.monotonic()
        try:
            ctx.abort.wait(self.seconds)
        finally:
            os.kill(pid, signal.SIGCONT)  # whatever happens: never leave the broker frozen
            self.paused = None
        what = f"paused pid {pid} for {time.monotonic() - t0:.1f}s"
        return f"{what}; {wait_reconnected(ctx, RECONNECT_WAIT_S + self.seconds, what)}"

    def close(self) -> None:
        if self.paused is not None and process_state(self.paused) is not None:
            try:
                os.kill(self.paused, signal.SIGCONT)
            except OSError:
                pass


class RestartBroker:
    name = "restart-broker"

    def __init__(self, command: str) -> None:
        self.command = command

    def inject(self, ctx: Context) -> str:
        connects = _connects(ctx)
        t0 = time.monotonic()
        run_command(self.command, "broker restart")
        what = f"restart command took {time.monotonic() - t0:.1f}s"
        return f"{what}; {wait_reconnected(ctx, 60.0, what, connects)}"

    def close(self) -> None:
        pass


class InfluxOutage:
    """Stop the database with the user's command, keep it stopped, start it again (always, once stopped)."""

    name = "influx-outage"

    def __init__(self, stop: str, start: str, seconds: float) -> None:
        self.stop_command = stop
        self.start_command = start
        self.seconds = seconds

    def inject(self, ctx: Context) -> str:
        run_command(self.stop_command, "InfluxDB stop")
        t0 = time.monotonic()
        try:
            ctx.abort.wait(self.seconds)
        finally:
            try:
                run_command(self.start_command, "InfluxDB start")
            except FaultError as exc:
                raise FaultError(str(exc), applied=True) from None
        return f"InfluxDB stopped for {time.monotonic() - t0:.1f}s"

    def close(self) -> None:
        pass


def _connects(ctx: Context) -> list[int]:
    return [link.connects for link in ctx.links] + [ctx.follower.connects]


def wait_reconnected(ctx: Context, timeout: float, what: str, before: list[int] | None = None) -> str:
    """Wait until every client of the run is connected (with `before`: each one connected again since); a note,
    or FaultError when the broker does not take them back within `timeout`."""
    t0 = time.monotonic()
    clients: list[Any] = [link.client for link in ctx.links] + [ctx.follower.client]
    while time.monotonic() - t0 < timeout and not ctx.abort.is_set():
        now = _connects(ctx)
        if all(c.is_connected() for c in clients) and (before is None or all(a > b for a, b in zip(now, before))):
            return f"clients connected after {time.monotonic() - t0:.1f}s"
        time.sleep(0.05)
    if ctx.abort.is_set():
        return "clients not checked (interrupted)"
    raise FaultError(f"{what}; the run's clients were not connected again within {timeout:g}s", applied=True)


# --- connections -------------------------------------------------------------------------------------------------


class Reconnect:
    """Cut a connection abruptly mid-stream, a device's and the follower's in turn: the device re-sends what was
    in flight, the follower's persistent session keeps what the broker had for it."""

    name = "reconnect"

    def __init__(self) -> None:
        self.count = 0

    def inject(self, ctx: Context) -> str:
        self.count += 1
        if self.count % 2:
            link = ctx.rng.choice(ctx.links)
            before, what = link.connects, f"device connection {link.client_id}"
            link.drop()
            ok = _wait(lambda: link.connects > before and link.client.is_connected(), RECONNECT_WAIT_S, ctx.abort)
        else:
            before, what = ctx.follower.connects, "follower connection"
            ctx.follower.drop()
            ok = _wait(lambda: ctx.follower.connects > before and ctx.follower.client.is_connected(),
                       RECONNECT_WAIT_S, ctx.abort)
        if ok is None:
            raise FaultError(f"{what} cut, not back within {RECONNECT_WAIT_S:g}s", applied=True)
        return f"{what} cut, back after {ok:.1f}s"

    def close(self) -> None:
        pass


def _wait(predicate: Callable[[], bool], timeout: float, abort: threading.Event) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout and not abort.is_set():
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.02)
    return None


# --- hostile input -----------------------------------------------------------------------------------------------


def hostile_ids(prefix: str) -> tuple[str, str]:
    """The device and the user the hostile messages speak as (accounts of their own, on a broker with accounts)."""
    return f"{prefix}bad", f"{prefix}troll"


def hostile_messages(prefix: str) -> list[tuple[str, bytes, str]]:
    """(topic, payload, the dead-letter reason the gateway should give) for one round of hostile input.

    Every topic is one the gateway subscribes to, and every id in it is the run's own, so nothing here can change
    real state. Wildcards (+ #) cannot appear in a topic someone publishes to (the broker refuses them), so they
    are tried where an id is data: in follow requests and event ids.
    """
    device, user = hostile_ids(prefix)
    t = f"devices/{device}/telemetry"
    good = b'{"temperature": 21.5}'
    return [
        (t, b'{"seq": 1, "temperature": 21.5', "malformed_json"),
        (t, b"{'temperature': 21.5}", "malformed_json"),
        (t, b'{"temperature": 21.5, "unit": "\xb0C"}', "invalid_utf8"),
        (t, b'{"temperature": NaN}', "non_finite"),
        (t, b'{"temperature": -Infinity}', "non_finite"),
        (t, b'{"temperature": 1e999}', "non_finite"),
        (t, b"[21.5, 48.0]", "not_an_object"),
        (t, b'{"temperature": "hot"}', "wrong_type"),
        (t, b'{"seq": -1, "temperature": 21.5}', "bad_seq"),
        (t, b'{"seq": 1, "ts": "yesterday", "temperature": 21.5}', "bad_ts"),
        (t, b"{}", "no_fields"),
        (t, b'{"temp+#/": 21.5}', "bad_field_name"),
        (t, b'{"temperature": 21.5, "pad": "' + b"x" * 20_000 + b'"}', "oversize"),
        (f"devices/{prefix}bad id/telemetry", good, "bad_device_id"),
        (f"devices/{prefix}b\u0430d/telemetry", good, "bad_device_id"),  # a Cyrillic a
        (f"devices/{prefix}{'x' * 64}/telemetry", good, "bad_device_id"),
        (f"users/{user}/follows", b'{"follow": "devices/+"}', "bad_follow"),
        (f"users/{user}/follows", b'{"follow": "devices/#"}', "bad_follow"),
        (f"users/{user}/follows", f'{{"follow": "devices/{prefix}0001/x"}}'.encode(), "bad_follow"),
        (f"users/{user}/posts", b'{"text": ""}', "empty_text"),
        (f"users/{user}/interactions", b'{"type": "like", "event_id": "#"}', "bad_event_id"),
    ]


class Hostile:
    """Publishes one round of hostile input per injection; the dead-letter watcher counts what comes back.

    `senders` publish the messages whose topics name them (`devices/{id}/...`, `users/{id}/...`); `anyone`, when
    given, the rest. On a broker with accounts there is no `anyone`: the messages with ids no account can have
    (`bad_device_id`) are refused by the broker's ACL before the gateway could see them, so they are not sent.
    """

    name = "hostile"

    def __init__(self, prefix: str, senders: dict[str, Publisher], anyone: Publisher | None = None) -> None:
        rounds: dict[int, tuple[Publisher, list[tuple[str, bytes]]]] = {}
        for topic, payload, _ in hostile_messages(prefix):
            publisher = senders.get(topic.split("/")[1], anyone)
            if publisher is not None:
                rounds.setdefault(id(publisher), (publisher, []))[1].append((topic, payload))
        self.rounds = list(rounds.values())
        self.per_round = sum(len(batch) for _, batch in self.rounds)
        self.sent = 0

    def inject(self, ctx: Context) -> str:
        acked = sum(publisher.publish_all(batch, timeout=10.0) for publisher, batch in self.rounds)
        self.sent += self.per_round
        if acked < self.per_round:
            raise FaultError(f"the broker acknowledged {acked} of {self.per_round} hostile messages", applied=True)
        return f"{self.per_round} hostile messages published"

    def close(self) -> None:
        pass


# --- a follower that never reads ---------------------------------------------------------------------------------


def _mqtt_string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    n, length = len(body), bytearray()
    while True:
        byte, n = n % 128, n // 128
        length.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([first]) + bytes(length) + body


class SlowFollower:
    """A second follower of every device with a persistent session that subscribes and then never reads: its
    socket buffers fill, the broker queues for it, and the run's own follower must not be held up.

    A raw MQTT 3.1.1 client (paho would keep reading), with a login and TLS when the broker wants them. It sends
    its own follow requests before it falls silent (a broker with accounts lets only user X publish
    `users/X/follows`). At the end it connects again with clean session, which removes its session, so the
    broker stops queueing for it, and sends its unfollow requests on that connection.
    """

    name = "slow-follower"
    WINDOW = 100  # follow requests in flight at once

    def __init__(self, follower_id: str, host: str, port: int, password: str | None = None,
                 cafile: Path | None = None) -> None:
        self.follower_id = follower_id
        self.host, self.port = host, port
        self.password = password
        self.tls = ssl.create_default_context(cafile=str(cafile)) if cafile is not None else None
        self.sock: socket.socket | None = None

    def connect(self, sources: Sequence[str] = ()) -> None:
        """Log in with a persistent session, subscribe to the feed, follow `sources`, then stop reading."""
        # Clean session 0, keepalive 0 (the broker never drops it for silence); a small receive buffer fills fast.
        sock = self._login(clean=False, keepalive=0, receive_buffer=4096)
        sock.sendall(_packet(0x82, struct.pack("!H", 1) + _mqtt_string(f"feeds/{self.follower_id}/#") + bytes([1])))
        first, body = _read_packet(sock)
        while first >> 4 != 9:  # deliveries a session left over from an earlier run may come first
            first, body = _read_packet(sock)
        if body[2:] != bytes([1]):
            sock.close()
            raise FaultError(f"the broker refused the slow follower's subscription: SUBACK {body.hex()}")
        self._requests(sock, "follow", sources)
        self.sock = sock

    def inject(self, ctx: Context) -> str:
        raise FaultError("slow-follower is present for the whole run, not injected")

    def close(self, sources: Sequence[str] = ()) -> None:
        """Stop, forget the session, and unfollow `sources`."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            with self._login(clean=True, keepalive=30) as sock:
                if sources:
                    self._requests(sock, "unfollow", sources)
                sock.sendall(bytes([0xE0, 0]))
        except (OSError, FaultError):
            pass

    def _login(self, clean: bool, keepalive: int, receive_buffer: int | None = None) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if receive_buffer is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)  # before connect: the window
            sock.settimeout(10)
            sock.connect((self.host, self.port))
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_hostname=self.host)
            flags = 0x02 if clean else 0x00
            login = b""
            if self.password is not None:  # the username is the follower's id
                flags |= 0xC0
                login = _mqtt_string(self.follower_id) + _mqtt_string(self.password)
            sock.sendall(_packet(0x10, _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", keepalive)
                                 + _mqtt_string(self.follower_id) + login))
            connack = _read(sock, 4)
            if connack[0] != 0x20 or connack[3] != 0:
                raise FaultError(f"the broker refused the slow follower {self.follower_id}: CONNACK {connack.hex()}")
        except BaseException:
            sock.close()
            raise
        return sock

    def _requests(self, sock: socket.socket, verb: str, sources: Sequence[str]) -> None:
        """QoS 1 requests on `users/{id}/follows`, a window of them at a time, each waited for (its PUBACK)."""
        topic = _mqtt_string(f"users/{self.follower_id}/follows")
        for start in range(0, len(sources), self.WINDOW):
            window = sources[start:start + self.WINDOW]
            for mid, source in enumerate(window, 2):  # id 1 is the SUBSCRIBE's
                sock.sendall(_packet(0x32, topic + struct.pack("!H", mid) + json.dumps({verb: source}).encode()))
            pending = set(range(2, 2 + len(window)))
            while pending:
                first, body = _read_packet(sock)
                if first >> 4 == 4 and len(body) >= 2:  # PUBACK; anything else (a queued delivery) is skipped
                    pending.discard(struct.unpack("!H", body[:2])[0])


def _read(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise FaultError("the broker closed the connection")
        data += chunk
    return data


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """One MQTT packet: its first byte and its body."""
    first = _read(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, _read(sock, length)
