"""Smoke test of an installed gateway: it starts on its embedded defaults, ingests simulated telemetry, scores it
with the ONNX model and delivers a follower's feed.

    python scripts/smoke.py --gateway VENV/bin/gateway --broker 127.0.0.1:PORT --workdir DIR

Runs the given `gateway` executable from DIR (not from a checkout, so the models must come from the installed
package), against a broker that is already running. Needs only paho-mqtt, which the gateway's own install brings,
so it runs with the installed venv's Python: in tests (tests/integration/test_install.py) and inside the arm64
root that scripts/pi-smoke builds. Prints one line per check; exit status 0 when all passed.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt

READINGS = 200
SPIKE_AT = 150  # a reading far outside the device's own normal, after its warm-up


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateway", required=True, help="the installed `gateway` executable")
    parser.add_argument("--broker", required=True, help="HOST:PORT of a running broker")
    parser.add_argument("--workdir", required=True, type=Path, help="an empty folder for the gateway's data")
    parser.add_argument("--timeout", type=float, default=120, help="seconds for each step (emulated CPUs are slow)")
    args = parser.parse_args()
    host, _, port = args.broker.rpartition(":")
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    gateway = [args.gateway]

    def cli(*argv: str) -> str:
        done = subprocess.run(gateway + list(argv), cwd=work, capture_output=True, text=True, timeout=args.timeout)
        if done.returncode != 0:
            raise SystemExit(f"FAIL: gateway {' '.join(argv)}: {done.stderr.strip()}")
        return done.stdout.strip()

    print(f"ok: {cli('--version')}")
    print(f"ok: check-config: {cli('check-config')}")
    cli("follow", "smoke-user", "devices/smoke-1", "--data-dir", str(data))
    log = open(work / "gateway.log", "wb")
    daemon = subprocess.Popen(gateway + ["run", "--broker", args.broker, "--data-dir", str(data), "--influx-api",
                                         "none", "--health", "127.0.0.1:0", "--client-id", "smoke-gateway"],
                              cwd=work, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _connected(data), args.timeout, daemon, work)
        print("ok: the gateway started and subscribed")
        feed: list[dict] = []
        received = threading.Condition()

        def on_message(client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
            with received:
                feed.append(json.loads(msg.payload))
                received.notify_all()

        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="smoke-client", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        client.on_message = on_message
        client.on_subscribe = lambda *_: subscribed.set()
        client.connect(host, int(port))
        client.loop_start()
        client.subscribe("feeds/smoke-user/#", qos=1)
        if not subscribed.wait(args.timeout):
            raise SystemExit("FAIL: the broker did not acknowledge the feed's subscription")
        start = int(time.time() * 1000)
        infos = [client.publish("devices/smoke-1/telemetry", json.dumps(
            {"seq": i, "ts": start + i * 1000, "temperature": 90.0 if i == SPIKE_AT else 21.0 + 0.1 * (i % 5),
             "humidity": 40.0 + 0.2 * (i % 3)}), qos=1) for i in range(READINGS)]
        for info in infos:
            info.wait_for_publish(args.timeout)
        with received:
            if not received.wait_for(lambda: len(feed) >= READINGS, args.timeout):
                raise SystemExit(f"FAIL: the feed got {len(feed)} of {READINGS} readings")
        client.loop_stop()
        client.disconnect()
        print(f"ok: the follower's feed got all {READINGS} readings")
        verdicts = {e["payload"]["seq"]: e["verdicts"][0] for e in feed}
        model = verdicts[0]["model"]
        flagged = sorted(seq for seq, v in verdicts.items() if v["flagged"])
        if SPIKE_AT not in flagged:
            raise SystemExit(f"FAIL: the spike at reading {SPIKE_AT} was not flagged (flagged: {flagged})")
        print(f"ok: {model} {verdicts[0]['version']} scored every reading and flagged the spike "
              f"({len(flagged)} flagged)")
    finally:
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(args.timeout)
        log.close()
    if code != 0:
        raise SystemExit(f"FAIL: the gateway exited with {code}; see {work / 'gateway.log'}")
    print("ok: the gateway stopped cleanly")
    return 0


def _connected(data: Path) -> bool:
    try:
        return bool(json.loads((data / "status.json").read_text())["mqtt_connected"])
    except (OSError, ValueError, KeyError):
        return False


def _wait(predicate, timeout: float, daemon: subprocess.Popen, work: Path) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if daemon.poll() is not None:
            raise SystemExit(f"FAIL: the gateway exited with {daemon.returncode}; see {work / 'gateway.log'}")
        if time.monotonic() > deadline:
            raise SystemExit(f"FAIL: the gateway did not connect within {timeout:.0f} s; see {work / 'gateway.log'}")
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
