"""Serial throughput benchmark (not a test): prints JSON.

For each baud rate and noise level, starts mosquitto and the gateway (durability on: fsync full, ONNX on, no
InfluxDB) on a fresh data folder, and runs `firmware-sim serial` on one pty line as fast as the gateway's ACKs and
the paced line allow. frames/s = readings acknowledged / simulator elapsed time (every reading acknowledged means
durably in the log). A pty has no baud rate of its own; the simulator paces its bytes at baud/10 bytes per second.
The line limit for a 44-byte env-sensor DATA frame is printed next to each result. Median of `--runs` runs.

    python benchmarks/serial_throughput.py --runs 3 --events 3000
"""

from __future__ import annotations

import argparse
import json
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

FRAME_BYTES = 44  # an env-sensor DATA frame of a 8-character device id, delimiter included


def one_run(base: Path, baud: int, noise: float, events: int, devices: int, window: int) -> dict[str, Any]:
    broker = servers.mosquitto(base)
    broker.start()
    link = base / "tty"
    gw = GatewayProcess(base / "gw", broker.address, "--influx-api", "none", "--serial", str(link),
                        client_id=f"bench-{base.name}")
    try:
        sim = subprocess.Popen([sys.executable, "-m", "firmware_sim.cli", "serial", "--link", str(link),
                                "--devices", str(devices), "--events", str(events), "--noise", str(noise),
                                "--baud", str(baud), "--window", str(window), "--no-progress"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        gw.start()
        out, _ = sim.communicate(timeout=600)
        summary = json.loads(out.decode().strip().splitlines()[-1])
        status = gw.wait_status(lambda s: s["metrics"]["appended"] >= summary["acknowledged"], timeout=30)
        summary["crc_errors"] = status["metrics"]["serial_crc_errors"]
        summary["logged"] = status["metrics"]["appended"]
        return summary
    finally:
        gw.kill()
        broker.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--devices", type=int, default=4)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--bauds", default="115200,921600")
    ap.add_argument("--noises", default="0,0.05")
    args = ap.parse_args()
    results = []
    for baud in map(int, args.bauds.split(",")):
        for noise in map(float, args.noises.split(",")):
            runs = []
            for i in range(args.runs):
                with tempfile.TemporaryDirectory(prefix="serial-bench-") as tmp:
                    runs.append(one_run(Path(tmp), baud, noise, args.events, args.devices, args.window))
                print(f"baud {baud} noise {noise} run {i + 1}: {runs[-1]['achieved_rate']} frames/s",
                      file=sys.stderr)
            results.append({
                "baud": baud,
                "noise": noise,
                "frames_per_s": statistics.median(r["achieved_rate"] for r in runs),
                "line_limit_frames_per_s": round(baud / 10 / FRAME_BYTES, 1),
                "lost": max(r["unacked"] for r in runs),
                "retransmitted_median": statistics.median(r["retransmitted"] for r in runs),
                "runs": runs,
            })
    print(json.dumps({"events": args.events, "devices": args.devices, "window": args.window,
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "results": results}, indent=1))


if __name__ == "__main__":
    main()
