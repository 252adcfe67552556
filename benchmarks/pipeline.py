"""End-to-end benchmark of the telemetry pipeline (not a test): prints JSON.

Starts the project's mosquitto, InfluxDB 1.x (when installed) and the gateway (durability on, ONNX on, v1 writes),
drives load with `firmware-sim mqtt` (one MQTT connection per simulator process, `--connections`), and measures
at a follower in its own process (mosquitto_sub when installed, otherwise a paho subscriber):

- drain: the gateway's own capacity, without a load generator competing for the two cores. The events are
  published while the gateway is stopped (the broker queues them in its persistent session), then the gateway
  starts; events/s = events received by the one follower / time from its first to its last receipt, and the
  gateway's CPU time per event over the drain (big batches: the per-event cost at saturation);
- throughput: the simulator publishes as fast as the broker acknowledges while the gateway runs; events/s as above
  (QoS 1 all the way; here the simulator, the broker, the follower and the gateway share the machine; the broker
  queues what the gateway has not taken yet, so the simulators finish first and the gateway catches up), and the
  CPU time per event of each of them over that phase (`throughput_cpu_us_per_event`): two cores give 111 us per
  event at 18,000 events/s, and this shows how much of that the harness itself takes;
- latency at a fixed rate (default 2,000 events/s): the simulator stamps each payload with its publish time
  (`--stamp-field`), the follower subtracts it from its receive time; p50/p99 over the run after a warm-up;
- the gateway's peak RSS (VmHWM) after the drain and over the whole run, the most events it held waiting for an
  append in the drain, and its CPU time per event in the latency phase (the figure least disturbed by other work on
  a shared machine).

Each variant runs `--runs` times on fresh servers and data; medians are reported, every run is kept in `runs`.
Variants: `full` (the defaults: fsync full, ONNX on), `no-onnx`, `fsync-normal`, `window-0`, `window-1`,
`window-5`, `window-10`, `window-20` (the log's commit window, storage.commit_window_ms; the latency phase also
reports the bytes the gateway wrote to disk per event, `disk_bytes_per_event`), `bare-relay` and `lean-relay` (benchmarks/relay.py instead of the
gateway, on gmqtt or on the gateway's own MQTT client: the MQTT work alone, the floor under each) and `broker-only`
(no gateway: the follower subscribes to the devices' topic, so the simulator, the broker and the follower alone set
the pace: the harness's own ceiling; no drain); all in one invocation so they share the noise.

    python benchmarks/pipeline.py --runs 3 --events 60000 --latency-seconds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
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

STAMP = "t_pub_us"
PREFIX = "bench-"  # the simulated devices' ids
FEED = "feeds/bench/#"  # the one follower's feed (it follows every device)
DEVICES = "devices/+/telemetry"  # what the broker-only follower takes directly
VARIANTS: dict[str, str] = {
    "full": "",
    "no-onnx": "[anomaly]\nenabled = false\n",
    "fsync-normal": '[storage]\nfsync = "normal"\n',
    "window-0": "[storage]\ncommit_window_ms = 0\n",
    "window-1": "[storage]\ncommit_window_ms = 1\n",
    "window-5": "[storage]\ncommit_window_ms = 5\n",
    "window-10": "[storage]\ncommit_window_ms = 10\n",
    "window-20": "[storage]\ncommit_window_ms = 20\n",
    "bare-relay": "",  # not the gateway: benchmarks/relay.py on gmqtt, the MQTT work alone (see there)
    "lean-relay": "",  # benchmarks/relay.py on the gateway's own MQTT client
    "broker-only": "",  # no gateway: the follower subscribes to the devices' topic; the harness's own ceiling
}


class RelayProcess:
    """benchmarks/relay.py behind the few methods of GatewayProcess the harness uses."""

    def __init__(self, base: Path, broker: str, follower: str, client: str = "gmqtt") -> None:
        self.ready = base / "relay.ready"
        self.argv = [sys.executable, str(REPO / "benchmarks" / "relay.py"), "--broker", broker,
                     "--client-id", "bench-relay", "--follower", follower, "--ready-file", str(self.ready),
                     "--client", client]
        self.proc: subprocess.Popen[bytes] | None = None

    def run_cli(self, *args: str) -> None:
        pass  # no follower graph: the follower is on the command line

    def start(self) -> None:
        self.ready.unlink(missing_ok=True)
        self.proc = subprocess.Popen(self.argv, cwd=REPO)
        deadline = time.monotonic() + 30
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the relay did not connect")
            time.sleep(0.05)

    def terminate(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def status(self) -> None:
        return None


def latency_us(payload: bytes, received: float) -> float | None:
    """Receive time minus the simulator's stamp, for an envelope or the device's own message (broker-only)."""
    data = json.loads(payload)
    stamp = data.get("payload", data).get(STAMP)
    return None if stamp is None else received * 1e6 - stamp


def follower(address: str, topic: str, ready: Any, out: Any, expect: int, timeout: float,
             stamped: bool = True) -> None:
    """Runs in its own process so the subscriber does not share a GIL with anything else."""
    import paho.mqtt.client as mqtt

    host, _, port = address.rpartition(":")
    latencies: list[float] = []
    first = last = 0.0
    count = 0

    def on_message(client: Any, userdata: Any, msg: Any) -> None:
        nonlocal first, last, count
        now = time.time()
        if count == 0:
            first = now
        last = now
        count += 1
        if stamped:  # throughput phases do not parse: the follower must not be the bottleneck
            lat = latency_us(msg.payload, now)
            if lat is not None:
                latencies.append(lat)

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-follower", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *a: ready.set()
    client.connect(host, int(port))
    client.loop_start()
    deadline = time.monotonic() + timeout
    while count < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    client.disconnect()
    client.loop_stop()
    out.put({"count": count, "first": first, "last": last, "latencies_us": latencies})


class PahoFollower:
    """The paho subscriber above, in a process of its own (about 13,000 messages/s here at most)."""

    def __init__(self, broker: str, topic: str, expect: int, timeout: float, stamped: bool) -> None:
        ctx = mp.get_context("spawn")
        self._ready, self._out = ctx.Event(), ctx.Queue()
        self._proc = ctx.Process(target=follower, args=(broker, topic, self._ready, self._out, expect, timeout,
                                                        stamped))
        self._timeout = timeout

    def start(self) -> None:
        self._proc.start()
        self._ready.wait(10)

    def result(self) -> dict[str, Any]:
        got = self._out.get(timeout=self._timeout + 60)
        self._proc.join()
        return got


class SubFollower:
    """mosquitto_sub (the C client) as the follower: it prints each message with its receipt time, and the
    file is read after it exits, so the follower costs less CPU than anything it measures."""

    def __init__(self, broker: str, topic: str, expect: int, timeout: float, stamped: bool, out: Path) -> None:
        host, _, port = broker.rpartition(":")
        self._out = out
        self._stamped = stamped
        self._argv = ["mosquitto_sub", "-h", host, "-p", port, "-V", "mqttv5", "-q", "1", "-t", topic,
                      "-i", "bench-follower", "-C", str(expect), "-W", str(int(timeout)),
                      "-F", "%U %p" if stamped else "%U"]
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self._out, "wb") as out:
            self._proc = subprocess.Popen(self._argv, stdout=out, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # connected and subscribed (it says so nowhere we can wait on without slowing it)

    def result(self) -> dict[str, Any]:
        assert self._proc is not None
        self._proc.wait()
        first = last = 0.0
        count = 0
        latencies: list[float] = []
        with open(self._out, "rb") as lines:
            for line in lines:
                stamp, _, payload = line.partition(b" ")
                now = float(stamp)
                first = first or now
                last = now
                count += 1
                if self._stamped:
                    lat = latency_us(payload, now)
                    if lat is not None:
                        latencies.append(lat)
        return {"count": count, "first": first, "last": last, "latencies_us": latencies}


def make_follower(args: argparse.Namespace, broker: str, topic: str, expect: int, timeout: float,
                  stamped: bool) -> PahoFollower | SubFollower:
    if args.follower == "mosquitto_sub":
        return SubFollower(broker, topic, expect, timeout, stamped, args.scratch / f"follower-{time.time_ns()}.txt")
    return PahoFollower(broker, topic, expect, timeout, stamped)


def rss_peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def disk_bytes_written(pid: int) -> int:
    """What the process caused to be written to storage so far (/proc/PID/io `write_bytes`: page-cache pages it
    dirtied, 4 KiB each however little of a page changed): what an SD card wears by."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def simulator(address: str, events: int, rate: float, devices: int, prefix: str, stamp: bool,
              connections: int = 1) -> subprocess.Popen:
    argv = [sys.executable, "-m", "firmware_sim.cli", "mqtt", "--broker", address, "--devices", str(devices),
            "--events", str(events), "--rate", str(rate), "--device-prefix", prefix, "--no-progress",
            "--drain-timeout", "60", "--connections", str(connections)]
    if stamp:
        argv += ["--stamp-field", STAMP]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def prefixes(args: argparse.Namespace) -> list[str]:
    """Device id prefixes, one per publisher; the first is the one the other phases use."""
    return [PREFIX] if args.publishers == 1 else [f"{PREFIX}{k}-" for k in range(args.publishers)]


def children_cpu_seconds() -> float:
    """CPU time of this process's children that have been waited for (the simulators, the follower)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def throughput_phase(broker: str, args: argparse.Namespace, topic: str, pids: dict[str, int]) -> dict[str, Any]:
    """The simulator publishes as fast as acknowledgements allow; events/s as the follower on `topic` sees them.

    Also where the two cores went meanwhile: the CPU time per received event of the simulators, the follower and
    each process in `pids` (the broker, the gateway, InfluxDB). The harness's own share (simulators, broker,
    follower) is what any gateway measured here has to fit beside.
    """
    sub = make_follower(args, broker, topic, args.events, 300, False)
    sub.start()
    cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    children_before = children_cpu_seconds()
    t0 = time.time()
    # One simulator process publishes about 14,000 events/s here at most; more publishers, each with its own
    # devices, lift that ceiling (they share the two cores with everything else).
    shares = [args.events // args.publishers + (k < args.events % args.publishers) for k in range(args.publishers)]
    sims = [simulator(broker, n, 1e6, args.devices, prefix, stamp=False, connections=args.connections)
            for n, prefix in zip(shares, prefixes(args))]
    summaries = []
    for sim in sims:
        sim_out, _ = sim.communicate(timeout=600)
        summaries.append(json.loads(sim_out) if sim_out.strip() else {})
    cpu = {"simulators": children_cpu_seconds() - children_before}
    children_before = children_cpu_seconds()
    got = sub.result()
    cpu["follower"] = children_cpu_seconds() - children_before  # reaped in result()
    # Read after the follower has everything: the broker acknowledges the simulators at once and queues for the
    # gateway, so the simulators finish long before the gateway does.
    cpu.update({name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()})
    span = got["last"] - got["first"]
    received = max(1, got["count"])
    return {
        "throughput_cpu_us_per_event": {name: round(seconds / received * 1e6, 1) for name, seconds in cpu.items()},
        "throughput_events_per_s": round(got["count"] / span, 1) if span > 0 else None,
        "throughput_received": got["count"],
        "throughput_sent": sum(m.get("sent", 0) for m in summaries),
        "simulator_publish_rate": round(sum(m.get("achieved_rate", 0) for m in summaries), 1),
        "throughput_wall_s": round(time.time() - t0, 2),
    }


def latency_phase(broker: str, args: argparse.Namespace, topic: str, pid: int | None) -> dict[str, Any]:
    """A fixed rate of stamped events, measured on a fresh follower; the CPU per event of process `pid` meanwhile."""
    n = int(args.latency_rate * args.latency_seconds)
    sub = make_follower(args, broker, topic, n, 120, True)
    sub.start()
    cpu_before = cpu_seconds(pid) if pid else 0.0
    written_before = disk_bytes_written(pid) if pid else 0
    sim = simulator(broker, n, args.latency_rate, args.devices, prefixes(args)[0], stamp=True,
                    connections=args.connections)
    sim.communicate(timeout=300)
    got = sub.result()
    result: dict[str, Any] = {"latency_events": got["count"]}
    if pid:
        # CPU time per event barely depends on what else the shared machine runs, unlike latency: the figure to
        # compare variants by when the machine is noisy.
        result["gateway_cpu_us_per_event"] = round((cpu_seconds(pid) - cpu_before) / max(1, got["count"]) * 1e6, 1)
        time.sleep(1.0)  # the last commits reach the disk
        result["disk_bytes_per_event"] = round((disk_bytes_written(pid) - written_before) / max(1, got["count"]))
    lat = sorted(got["latencies_us"][int(len(got["latencies_us"]) * 0.1):])  # drop the warm-up tenth
    if lat:
        result["latency_p50_ms"] = round(lat[len(lat) // 2] / 1000, 3)
        result["latency_p99_ms"] = round(lat[int(len(lat) * 0.99)] / 1000, 3)
        result["latency_max_ms"] = round(lat[-1] / 1000, 3)
    return result


def broker_only_run(args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """The harness without a gateway: the follower subscribes to the devices' topic itself. What the simulator,
    the broker and the follower reach together on this machine is the ceiling for any gateway measured here."""
    broker = servers.mosquitto(base)
    broker.start()
    try:
        assert broker.proc is not None
        return {"variant": "broker-only", **throughput_phase(broker.address, args, DEVICES,
                                                             {"broker": broker.proc.pid}),
                **latency_phase(broker.address, args, DEVICES, None)}
    finally:
        broker.stop()


def one_run(variant: str, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    broker = servers.mosquitto(base)
    broker.start()
    influx = None
    extra = ["--influx-api", "none"]
    if shutil.which("influxd") and not args.no_influx:
        influx = servers.influxdb(base)
        influx.start()
        extra = ["--influx-api", "v1", "--influx-url", influx.url, "--influx-db", "bench"]
    config = base / "gateway.toml"
    config.write_text(VARIANTS[variant])
    gw: GatewayProcess | RelayProcess
    if variant in ("bare-relay", "lean-relay"):
        gw = RelayProcess(base, broker.address, "bench", "gmqtt" if variant == "bare-relay" else "gateway")
    else:
        gw = GatewayProcess(base / "gw", broker.address, *extra, "--log-level", "WARNING", client_id="bench-gw",
                            config=config)
    result: dict[str, Any] = {"variant": variant}
    try:
        for prefix in prefixes(args):
            for i in range(args.devices):
                gw.run_cli("follow", "bench", f"devices/{prefix}{i + 1:04d}")
        if args.latency_only:
            gw.start()
            assert gw.proc is not None
            result.update(latency_phase(broker.address, args, FEED, gw.proc.pid))
            result["gateway_rss_peak_mb"] = round(rss_peak_mb(gw.proc.pid), 1)
            return result
        # Drain: the first start makes the gateway's session and subscription; the events queue while it is down.
        gw.start()
        assert gw.proc is not None
        time.sleep(1.0)
        # This start's CPU (imports, model load, connect) stands for the next start's, which is not part of the
        # drain's cost: subtracted from the draining process's total below.
        startup_cpu = cpu_seconds(gw.proc.pid)
        gw.terminate()
        sim = simulator(broker.address, args.events, 1e6, args.devices, prefixes(args)[0], stamp=False,
                        connections=args.connections)
        sim.communicate(timeout=600)
        sub = make_follower(args, broker.address, FEED, args.events, 300, False)
        sub.start()
        assert broker.proc is not None
        broker_before = cpu_seconds(broker.proc.pid)
        gw.start()
        assert gw.proc is not None
        got = sub.result()
        span = got["last"] - got["first"]
        result["drain_events_per_s"] = round(got["count"] / span, 1) if span > 0 else None
        result["drain_received"] = got["count"]
        result["drain_cpu_us_per_event"] = round((cpu_seconds(gw.proc.pid) - startup_cpu) / got["count"] * 1e6, 1)
        # The broker's share: it carries every event twice (to the gateway, then to the follower).
        result["drain_broker_cpu_us_per_event"] = round((cpu_seconds(broker.proc.pid) - broker_before)
                                                        / got["count"] * 1e6, 1)
        # Memory after a backlog: what the drain left in VmHWM, and the most events it held waiting for an append.
        result["drain_rss_peak_mb"] = round(rss_peak_mb(gw.proc.pid), 1)
        result["drain_pending_peak"] = ((gw.status() or {}).get("metrics") or {}).get("log_pending_peak")

        pids = {"broker": broker.proc.pid, "gateway": gw.proc.pid}
        if influx is not None and influx.proc is not None:
            pids["influxdb"] = influx.proc.pid
        result.update(throughput_phase(broker.address, args, FEED, pids))
        result.update(latency_phase(broker.address, args, FEED, gw.proc.pid))
        result["gateway_rss_peak_mb"] = round(rss_peak_mb(gw.proc.pid), 1)
        status = gw.status() or {}
        result["gateway_counters"] = {k: status.get("metrics", {}).get(k) for k in
                                      ("received", "appended", "committed", "delivered", "points", "written")}
    finally:
        gw.kill()
        if influx is not None:
            influx.stop()
        broker.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--events", type=int, default=60_000)
    parser.add_argument("--devices", type=int, default=50)
    parser.add_argument("--publishers", type=int, default=1, help="simulator processes in the throughput phase")
    # paho runs a network thread per connection, and the threads of one process contend for its GIL: with 50
    # devices, one simulator process published 13,500-14,200 events/s over 1 connection, 9,300-10,100 over 8 (its
    # default). The load generator should take as little of the shared machine as it can.
    parser.add_argument("--connections", type=int, default=1, help="MQTT connections per simulator process")
    parser.add_argument("--follower", choices=("mosquitto_sub", "paho"),
                        default="mosquitto_sub" if shutil.which("mosquitto_sub") else "paho",
                        help="the subscriber that measures (mosquitto_sub: Debian's mosquitto-clients)")
    parser.add_argument("--latency-rate", type=float, default=2000.0)
    parser.add_argument("--latency-seconds", type=float, default=20.0)
    parser.add_argument("--variants", default="full,no-onnx,fsync-normal")
    parser.add_argument("--no-influx", action="store_true")
    parser.add_argument("--latency-only", action="store_true",
                        help="only the fixed-rate phase (latency, CPU and disk bytes per event)")
    args = parser.parse_args()

    runs: list[dict[str, Any]] = []
    variants = args.variants.split(",")
    for i in range(args.runs):
        for variant in variants:  # interleaved, so slow phases of the shared machine hit every variant alike
            with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
                args.scratch = Path(tmp)  # the follower's receipts
                if variant == "broker-only":
                    run = broker_only_run(args, Path(tmp))
                else:
                    run = one_run(variant, args, Path(tmp))
                run["run"] = i
                runs.append(run)
                print(json.dumps(run), file=sys.stderr)

    summary: dict[str, Any] = {}
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        summary[variant] = {
            key: statistics.median(r[key] for r in mine if r.get(key) is not None)
            for key in ("drain_events_per_s", "drain_cpu_us_per_event", "drain_broker_cpu_us_per_event",
                        "drain_rss_peak_mb", "drain_pending_peak",
                        "throughput_events_per_s", "latency_p50_ms", "latency_p99_ms", "gateway_rss_peak_mb",
                        "gateway_cpu_us_per_event", "disk_bytes_per_event", "simulator_publish_rate")
            if any(r.get(key) is not None for r in mine)
        }
        shares = [r["throughput_cpu_us_per_event"] for r in mine if r.get("throughput_cpu_us_per_event")]
        if shares:
            summary[variant]["throughput_cpu_us_per_event"] = {
                name: statistics.median(share[name] for share in shares) for name in shares[0]}
    params = {k: v for k, v in vars(args).items() if k != "scratch"}
    print(json.dumps({"machine": {"cpus": os.cpu_count()}, "params": params, "median": summary, "runs": runs},
                     indent=1))


if __name__ == "__main__":
    main()
