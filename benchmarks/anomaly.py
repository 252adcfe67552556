"""CPU per reading of the anomaly filter, by batch size: what the filter stage pays per telemetry event.

    python benchmarks/anomaly.py                          this checkout
    python benchmarks/anomaly.py --repo /tmp/old-checkout  another one (a `git worktree` of an earlier commit),
                                                           to compare detectors in one invocation

50 simulated devices (env and machine, 4 fields each) at 1 s, 400 readings each, scored in batches of the given
sizes; process CPU time, so other load on the machine matters less than wall time would. At 2,000 events/s with a
3 ms commit window the filter sees batches of about 6; in a flood, hundreds.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=HERE.parent, help="checkout whose gateway and model to load")
    parser.add_argument("--batches", default="1,2,6,100", help="batch sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs per batch size; the median is reported")
    args = parser.parse_args()
    repo = args.repo.resolve()
    sys.path[:0] = [str(repo), str(HERE.parent / "firmware-sim")]
    AnomalyDetector = importlib.import_module("gateway.filters.anomaly").AnomalyDetector  # noqa: N806
    from firmware_sim.signals import EPOCH_2026_MS, DeviceSignal

    signals = [DeviceSignal(f"d{i}", 7, ("env", "machine")[i % 2], start_ms=EPOCH_2026_MS, interval_ms=1000,
                            anomaly_rate=0.005) for i in range(50)]
    readings = [(f"devices/d{i}/telemetry", s.next()) for _ in range(400) for i, s in enumerate(signals)]
    model = repo / "models" / "anomaly" / "anomaly.onnx"
    print(f"{repo} ({model.stat().st_size / 1e6:.2f} MB model), {len(readings)} readings")
    for size in (int(b) for b in args.batches.split(",")):
        per_reading = []
        for _ in range(args.runs):
            detector = AnomalyDetector(model)
            items = [(src, r.fields, r.ts_ms) for src, r in readings]
            try:
                detector.score(items[:1])
            except (TypeError, ValueError):  # a detector from before timestamps were passed
                items = [(src, fields) for src, fields, _ in items]
                detector = AnomalyDetector(model)
            started = time.process_time()
            for i in range(0, len(items), size):
                detector.score(items[i:i + size])
            per_reading.append((time.process_time() - started) / len(items) * 1e6)
        per_reading.sort()
        print(f"  batch {size:4d}: {per_reading[len(per_reading) // 2]:6.1f} us per reading "
              f"(runs {', '.join(f'{x:.1f}' for x in per_reading)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
