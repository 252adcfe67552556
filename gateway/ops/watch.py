"""`gateway watch`: a live console view of what flows, from a subscriber's side (paho-mqtt).

It subscribes like any follower would (its feed, the alerts, the dead letters, the gateway's status) and prints one
line per second with rates and totals, plus each alert and dead letter as it happens. With --data-dir it also shows
the daemon's own counters from its status file.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt


class _State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.feed = self.alerts = self.dead = 0
        self.flagged = 0
        self.status = "?"
        self.events: list[str] = []


def alert_line(doc: dict[str, Any]) -> str:
    """One alert as the view prints it: an episode's start names the fields and what they did, its end is one word."""
    v = doc["verdicts"][0] if doc.get("verdicts") else {}
    detail = v.get("detail") or {}
    head = f"ALERT {detail.get('episode', '?'):5s} {doc['source']} seq={doc['payload'].get('seq')}"
    if detail.get("episode") == "end":
        return head
    return f"{head} {v.get('label')} score={v.get('score', 0):.2f} fields={detail.get('fields')}"


def watch(broker: str, follower: str, data_dir: str | None, seconds: float | None) -> None:
    state = _State()
    host, _, port = broker.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"watch-{uuid.uuid4().hex[:8]}",
                         protocol=mqtt.MQTTv5)

    def on_connect(c: mqtt.Client, *_: Any) -> None:
        c.subscribe([(f"feeds/{follower}/#", 1), ("alerts/+", 1), ("gateway/deadletter", 0), ("gateway/status", 1)])

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
    client.on_message = on_message
    client.connect(host, int(port))
    client.loop_start()
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
                line = (f"gateway {state.status:7s} | feed {rate:7.0f}/s total {state.feed:8d} "
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
