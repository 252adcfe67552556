"""`gateway watch`: a live console view of what flows, from a subscriber's side (paho-mqtt).

It subscribes like any follower would (its feed, the alerts, the dead letters, the gateway's status) and prints one
line per second with rates and totals, plus each alert and dead letter as it happens. With a data folder it also
shows the daemon's own counters from its status file. It connects as the config says (broker, TLS), but never with
the gateway's own account: a broker that allows one connection per account would cut the gateway off.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt

CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Login:
    """Where and as whom `watch` connects."""

    broker: str
    username: str = ""
    password: str = ""
    tls: ssl.SSLContext | None = None


class WatchError(click.ClickException):
    """The broker cannot be reached or refuses us: one line, no traceback."""


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.feed = self.alerts = self.dead = 0
        self.flagged = 0
        self.status = "?"
        self.broker = "up"
        self.events: list[str] = []


def alert_line(doc: dict[str, Any]) -> str:
    """One alert as the view prints it: an episode's start names the fields and what they did, its end is one word."""
    v = doc["verdicts"][0] if doc.get("verdicts") else {}
    detail = v.get("detail") or {}
    head = f"ALERT {detail.get('episode', '?'):5s} {doc['source']} seq={doc['payload'].get('seq')}"
    if detail.get("episode") == "end":
        return head
    return f"{head} {v.get('label')} score={v.get('score', 0):.2f} fields={detail.get('fields')}"


def watch(login: Login, follower: str, data_dir: str | None, seconds: float | None) -> None:
    state = _State()
    broker = login.broker
    host, _, port = broker.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)
    if login.username:
        client.username_pw_set(login.username, login.password)
    if login.tls is not None:
        client.tls_set_context(login.tls)
    client.reconnect_delay_set(1, 10)
    connack: list[Any] = []
    answered = threading.Event()

    def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        connack.append(reason)
        answered.set()
        if reason.is_failure:
            return
        with state.lock:
            state.broker = "up"
        c.subscribe([(f"feeds/{follower}/#", 1), ("alerts/+", 1), ("gateway/deadletter", 0), ("gateway/status", 1)])

    def on_disconnect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        with state.lock:
            state.broker = "DOWN (reconnecting)"

    def on_message(c: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with state.lock:
            if msg.topic.startswith("feeds/"):
                state.feed += 1
                try:
                    doc = json.loads(msg.payload)
                    state.flagged += any(v.get("flagged") for v in doc.get("verdicts", []))
                except ValueError:
                    pass
            elif msg.topic.startswith("alerts/"):
                state.alerts += 1
                state.events.append(alert_line(json.loads(msg.payload)))
            elif msg.topic == "gateway/deadletter":
                state.dead += 1
                doc = json.loads(msg.payload)
                state.events.append(f"DEAD  {doc['origin']} {doc['reason']}: {doc['message']}")
            elif msg.topic == "gateway/status":
                state.status = msg.payload.decode(errors="replace")

    client.on_connect = on_connect
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    try:
        client.connect(host, int(port))
    except (OSError, ValueError) as exc:  # refused, unknown host, TLS handshake (ssl.SSLError is an OSError)
        raise WatchError(f"cannot connect to the broker at {broker}: {exc}") from None
    client.loop_start()
    try:
        if not answered.wait(CONNECT_TIMEOUT):
            raise WatchError(f"the broker at {broker} did not answer within {CONNECT_TIMEOUT:.0f} s")
        if connack[0].is_failure:
            hint = "" if login.username else " (no account given: --username and --password-file)"
            raise WatchError(f"the broker at {broker} refused the login: {connack[0]}{hint}")
    except WatchError:
        client.loop_stop()
        raise
    started = last_t = time.monotonic()
    last_feed = 0
    try:
        while seconds is None or time.monotonic() - started < seconds:
            time.sleep(1.0)
            now = time.monotonic()
            with state.lock:
                lines, state.events = state.events[-5:], []
                rate = (state.feed - last_feed) / (now - last_t)
                last_feed, last_t = state.feed, now
                line = ("" if state.broker == "up" else f"broker {state.broker} | ") + (
                        f"gateway {state.status:7s} | feed {rate:7.0f}/s total {state.feed:8d} "
                        f"flagged {state.flagged:5d} | alerts {state.alerts:5d} | dead letters {state.dead:4d}")
            if data_dir:
                try:
                    s = json.loads((Path(data_dir) / "status.json").read_text())["metrics"]
                    line += (f" | logged {s['appended']:.0f} delivered {s['committed']:.0f}"
                             f" influx behind {s.get('influx_lag', 0):.0f}")
                except (OSError, ValueError, KeyError):
                    pass
            for text in lines:
                click.echo(text)
            click.echo(line)
    except KeyboardInterrupt:
        pass
    finally:
        client.disconnect()
        client.loop_stop()
