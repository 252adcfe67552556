"""Forwarding throughput of the upstream link (issue 18; not a test): prints JSON.

The case that matters is the WAN coming back: a backlog waits in the log and the link forwards it as fast as the
central broker acknowledges (or as its rate cap allows). So each run starts the site's mosquitto and the gateway
with the link pointed at a central mosquitto that is not running yet, publishes `--events` readings (QoS 1) and
waits until the gateway has logged them all (its upstream lag is then `--events`), starts the central mosquitto
with a subscriber on it (`mosquitto_sub`, its own process, a receive timestamp per message), and measures:

- events/s upstream: distinct readings received / time from the first receipt to the last;
- the gateway's CPU time per forwarded event over the drain (/proc/PID/stat; the backlog's append is before);
- how long until the gateway's status says lag 0 (the progress committed; status.json is rewritten every second,
  so this is coarse by up to a second).

Variants: `drain` (no cap), `capped` (`upstream.max_events_per_second = --cap`: checks that the pace is the cap).
Medians of `--runs`. Everything runs on this machine's loopback: the link's window (upstream.max_inflight) and the
gateway's CPU, not a WAN's round trip, set the pace here.

    python benchmarks/upstream.py --events 20000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests import servers  # noqa: E402  (the one place that knows how to start the servers)
from tests.gateway_process import GatewayProcess  # noqa: E402

DEVICES = 20
PROBE = '{"probe": true}'


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def publish(address: str, n: int) -> None:
    import paho.mqtt.client as mqtt

    host, _, port = address.rpartition(":")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-up-load", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    infos = [client.publish(f"devices/bench-{k % DEVICES:04d}/telemetry",
                            json.dumps({"seq": k // DEVICES + 1, "temperature": 20 + (k % 9) * 0.1}).encode(), qos=1)
             for k in range(n)]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def run_once(base: Path, events: int, cap: float) -> dict[str, Any]:
    site = servers.mosquitto(base / "site")
    central = servers.mosquitto(base / "central")
    config = base / "gateway.toml"
    config.write_text(
        "[mqtt]\nreconnect_max = 0.5\n[anomaly]\nwarm_events = 0\n"
        f"[upstream]\nenabled = true\nbrokers = [\"{central.address}\"]\nsite = \"bench\"\nkinds = [\"telemetry\"]\n"
        + (f"max_events_per_second = {cap}\n" if cap else ""))
    site.start()
    gw = GatewayProcess(base / "gw", site.address, "--influx-api", "none", client_id="bench-up", config=config)
    sub: subprocess.Popen[bytes] | None = None
    try:
        gw.start()
        publish(site.address, events)
        gw.wait_status(lambda s: s["metrics"]["appended"] >= events, 300)
        # The subscriber must be in place before the link connects, or it misses the first messages: the gateway
        # is frozen (SIGSTOP, a second or two, far below its keepalive) while the central broker and the
        # subscriber start, and a probe through the broker says the subscription is there.
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGSTOP)
        central.start()
        host, _, port = central.address.rpartition(":")
        out = open(base / "received.txt", "wb")
        sub = subprocess.Popen(["mosquitto_sub", "-h", host, "-p", port, "-q", "1", "-t", "sites/bench/devices/#",
                                "-C", str(events + 1), "-F", "%U %p"], stdout=out)
        out.close()
        deadline = time.monotonic() + 30
        while not (base / "received.txt").read_bytes():
            assert time.monotonic() < deadline, "the subscriber never received the probe"
            subprocess.run(["mosquitto_pub", "-h", host, "-p", port, "-q", "1", "-t", "sites/bench/devices/probe",
                            "-m", PROBE], check=True)
            time.sleep(0.2)
        cpu0 = cpu_seconds(gw.proc.pid)
        gw.proc.send_signal(signal.SIGCONT)
        started = time.monotonic()
        sub.wait(600)
        cpu1 = cpu_seconds(gw.proc.pid)
        gw.wait_status(lambda s: s["upstream"]["lag"] == 0, 120)
        lag_zero_s = time.monotonic() - started
        stamps, ids = [], set()
        for line in (base / "received.txt").read_bytes().splitlines():
            stamp, _, payload = line.partition(b" ")
            if payload == PROBE.encode():
                continue
            stamps.append(float(stamp))
            ids.add(json.loads(payload)["id"])
        span = max(stamps) - min(stamps)
        return {"events": events, "distinct": len(ids), "events_per_s": round(len(ids) / span),
                "gateway_cpu_us_per_event": round((cpu1 - cpu0) / len(ids) * 1e6, 1),
                "lag_zero_after_s": round(lag_zero_s, 1)}
    finally:
        if sub is not None and sub.poll() is None:
            sub.kill()
        if gw.proc is not None and gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGCONT)
        gw.kill()
        site.kill()
        central.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cap", type=float, default=2000.0, help="events/s of the `capped` variant")
    args = parser.parse_args()
    report: dict[str, Any] = {}
    for variant, cap in (("drain", 0.0), ("capped", args.cap)):
        runs = []
        for _ in range(args.runs):
            with tempfile.TemporaryDirectory(prefix="bench-upstream-") as tmp:
                runs.append(run_once(Path(tmp), args.events, cap))
        report[variant] = {key: statistics.median(r[key] for r in runs)
                           for key in ("events_per_s", "gateway_cpu_us_per_event", "lag_zero_after_s")}
        report[variant]["cap"] = cap or None
        report[variant]["runs"] = runs
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
