"""Start and stop the real servers the integration tests talk to.

Every server gets a free loopback port and its own data folder, and is stopped by the PID this module started, never
by name. Readiness is polled (a TCP connect or an HTTP probe) instead of sleeping a fixed time.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@dataclass
class Server:
    """A server process this test session started: restartable, pausable, stopped by its own PID."""

    name: str
    argv: list[str]
    port: int
    data_dir: Path
    log_path: Path
    env: dict[str, str] | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()
        wait_for_port(self.port, timeout, self.proc)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


def mosquitto_conf_for_test(port: int, data_dir: Path) -> str:
    """The project's mosquitto.conf with only the port and the persistence folder changed."""
    text = (REPO / "mosquitto.conf").read_text()
    text, n = re.subn(r"(?m)^listener\s+\d+\s+127\.0\.0\.1\s*$", f"listener {port} 127.0.0.1", text)
    assert n == 1, "mosquitto.conf must have exactly one loopback `listener PORT 127.0.0.1` line"
    text, n = re.subn(r"(?m)^persistence_location\s+.*$", f"persistence_location {data_dir}/", text)
    assert n == 1, "mosquitto.conf must set persistence_location"
    if os.geteuid() == 0:
        # Started as root, mosquitto drops to the `mosquitto` user, which cannot write into the test's private
        # folder: persistence would fail silently and a restarted broker would have lost every session.
        text += "\nuser root\n"
    return text


def mosquitto(base: Path) -> Server:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    data = base / "mosquitto"
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "mosquitto.conf"
    conf.write_text(mosquitto_conf_for_test(port, data))
    return Server("mosquitto", [exe, "-c", str(conf)], port, data, data / "mosquitto.log", env=dict(os.environ))


def stock_mosquitto(base: Path) -> Server:
    """mosquitto as many users already run it: its defaults for flow control (20 QoS 1 messages in flight per
    client) and Nagle's algorithm left on; only the loopback listener, anonymous access and an unlimited queue (so a
    lost message is the gateway's fault, not a queue limit's) are set."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    data = base / "stock-mosquitto"
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 0\nmax_queued_bytes 0\nlog_dest stderr\nlog_type error\n"
                    "log_type warning\n" + ("user root\n" if os.geteuid() == 0 else ""))
    return Server("mosquitto-stock", [exe, "-c", str(conf)], port, data, data / "mosquitto.log", env=dict(os.environ))


def mosquitto_production_conf_for_test(tls_port: int, plain_port: int, data_dir: Path, password_file: Path,
                                       certs: Path) -> str:
    """deploy/mosquitto-production.conf with only its ports, persistence folder and file paths changed.

    The ACL is the repository's deploy/mosquitto.acl itself, so the tests check the file that is shipped.
    """
    text = (REPO / "deploy" / "mosquitto-production.conf").read_text()
    changes = [
        (r"^listener\s+8883\s*$", f"listener {tls_port} 127.0.0.1"),
        (r"^listener\s+1883\s+127\.0\.0\.1\s*$", f"listener {plain_port} 127.0.0.1"),
        (r"^persistence_location\s+.*$", f"persistence_location {data_dir}/"),
        (r"^password_file\s+.*$", f"password_file {password_file}"),
        (r"^acl_file\s+.*$", f"acl_file {REPO / 'deploy' / 'mosquitto.acl'}"),
        (r"^certfile\s+.*$", f"certfile {certs / 'server.crt'}"),
        (r"^keyfile\s+.*$", f"keyfile {certs / 'server.key'}"),
    ]
    for pattern, line in changes:
        text, n = re.subn(f"(?m){pattern}", line, text)
        assert n == 1, f"deploy/mosquitto-production.conf must have exactly one line matching {pattern!r}"
    if os.geteuid() == 0:
        text += "\nuser root\n"  # as in mosquitto_conf_for_test
    return text


def make_certs(out: Path, *names: str) -> Path:
    """A CA and a server certificate for 127.0.0.1/localhost (and `names`), made by deploy/make-certs."""
    subprocess.run([str(REPO / "deploy" / "make-certs"), "--out", str(out), *names], check=True,
                   capture_output=True, timeout=60)
    return out


@dataclass(repr=False)
class ProductionBroker(Server):
    """mosquitto on the production config: TLS on `port`, the optional plain loopback listener on `plain_port`,
    accounts in `password_file` (empty at first: add them with gateway.credentials), certificates from
    deploy/make-certs in `certs`."""

    plain_port: int = 0
    password_file: Path = Path()
    certs: Path = Path()
    passwords: dict[str, str] = field(default_factory=dict)  # accounts a test made: id -> password

    def __repr__(self) -> str:
        return f"<mosquitto (production) TLS at {self.address}, plain at 127.0.0.1:{self.plain_port}>"

    @property
    def plain_address(self) -> str:
        return f"127.0.0.1:{self.plain_port}"

    @property
    def ca_file(self) -> Path:
        return self.certs / "ca.crt"

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)
        wait_for_port(self.plain_port, timeout, self.proc)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads the password and ACL files."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGHUP)


def production_mosquitto(base: Path) -> ProductionBroker:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    tls_port, plain_port = free_port(), free_port()
    data = base / "mosquitto-production"
    data.mkdir(parents=True, exist_ok=True)
    certs = make_certs(data / "certs")
    password_file = data / "gateway.passwd"
    password_file.touch()
    conf = data / "mosquitto.conf"
    conf.write_text(mosquitto_production_conf_for_test(tls_port, plain_port, data, password_file, certs))
    return ProductionBroker("mosquitto-production", [exe, "-c", str(conf)], tls_port, data, data / "mosquitto.log",
                            env=dict(os.environ), plain_port=plain_port, password_file=password_file, certs=certs)



def add_websockets_listener(broker: ProductionBroker) -> int:
    """Appends deploy/mosquitto-websockets.conf (wss, same accounts, ACL and certificates) to the broker's
    configuration, on a free port, and returns that port. mosquitto 2.0.11 makes this listener listen on every
    interface: start the broker only inside a private network namespace (tests/netns.py, or `unshare --net`)."""
    port = free_port()
    snippet = (REPO / "deploy" / "mosquitto-websockets.conf").read_text()
    snippet, n = re.subn(r"(?m)^listener\s+8084\s*$", f"listener {port}", snippet)
    assert n == 1, "deploy/mosquitto-websockets.conf must have exactly one `listener 8084` line"
    snippet = snippet.replace("/etc/mosquitto/certs/", f"{broker.certs}/")
    conf = Path(broker.argv[-1])
    conf.write_text(conf.read_text() + "\n" + snippet)
    return port

# Loopback only: never route a probe through a proxy named in the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --- time-series databases -------------------------------------------------------------------------------------


@dataclass(repr=False)
class HttpServer(Server):
    """A server that is ready when an HTTP health endpoint answers, not merely when its port accepts.

    InfluxDB opens its port before the meta store is loaded and answers 5xx or drops connections until then;
    polling `/ping` (InfluxDB, 204) or `/health` (victoria-metrics, 200) avoids a first test that races it.
    """

    health_path: str = "/ping"

    def __repr__(self) -> str:  # short: it shows up in every failing test's arguments
        return f"<{self.name} at {self.url}, data in {self.data_dir}>"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def start(self, timeout: float = 20.0) -> None:
        super().start(timeout)
        wait_for_http(f"{self.url}{self.health_path}", timeout, self.proc)


def wait_for_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with _LOCAL.open(url, timeout=1.0) as resp:
                if 200 <= resp.status < 300:
                    return
                last = resp.status
        except (OSError, http.client.HTTPException) as exc:  # URLError and HTTPError are OSErrors
            last = exc
        time.sleep(0.02)
    raise TimeoutError(f"{url} not healthy after {timeout}s (last: {last})")


def influxdb_conf_for_test(http_port: int, rpc_port: int, data_dir: Path) -> str:
    """An InfluxDB 1.x config with every listener on loopback and every file under `data_dir`.

    Only HTTP and the backup/restore RPC listen at all (graphite, collectd, opentsdb and udp are off by default);
    the never-enabled ifql listener still gets a free loopback port so nothing in the file points at a shared
    default. Debian's influxd spells the phone-home switch `reporting-enabled` (upstream: reporting-disabled).
    Self-monitoring, continuous queries and request logging are off: they only add writes and noise to a test.
    """
    ifql_port = free_port()
    return f"""\
reporting-enabled = false
bind-address = "127.0.0.1:{rpc_port}"

[meta]
  dir = "{data_dir}/meta"
  logging-enabled = false

[data]
  dir = "{data_dir}/data"
  wal-dir = "{data_dir}/wal"
  index-version = "inmem"
  wal-fsync-delay = "0s"
  query-log-enabled = false

[monitor]
  store-enabled = false

[continuous_queries]
  enabled = false

[subscriber]
  enabled = false

[http]
  enabled = true
  bind-address = "127.0.0.1:{http_port}"
  auth-enabled = false
  log-enabled = false
  pprof-enabled = false
  unix-socket-enabled = false

[ifql]
  enabled = false
  bind-address = "127.0.0.1:{ifql_port}"

[logging]
  level = "warn"
  suppress-logo = true
"""


def influxdb(base: Path) -> HttpServer:
    exe = shutil.which("influxd") or "/usr/bin/influxd"
    port, rpc_port = free_port(), free_port()
    data = base / "influxdb"
    data.mkdir(parents=True, exist_ok=True)
    conf = data / "influxdb.conf"
    conf.write_text(influxdb_conf_for_test(port, rpc_port, data))
    env = dict(os.environ)
    env.pop("INFLUXDB_CONFIG_PATH", None)  # the file we pass is the only configuration
    return HttpServer("influxdb", [exe, "run", "-config", str(conf)], port, data, data / "influxdb.log", env=env,
                      health_path="/ping")


def victoria_metrics(base: Path) -> HttpServer:
    """victoria-metrics for the InfluxDB v2 write path (`/api/v2/write`), read back through `/api/v1/export`.

    -retentionPeriod=100y: with the default of one month, samples older than that are dropped silently (the write
    still answers 204). -search.latencyOffset=0s and -search.disableCache: return raw samples as soon as they are
    searchable instead of hiding the last 30s or serving a cached answer. No -dedup.minScrapeInterval, so the
    tests can see a duplicated sample.
    """
    exe = shutil.which("victoria-metrics") or "/usr/bin/victoria-metrics"
    port = free_port()
    data = base / "victoria-metrics"
    data.mkdir(parents=True, exist_ok=True)
    argv = [exe, f"-httpListenAddr=127.0.0.1:{port}", f"-storageDataPath={data}/storage", "-retentionPeriod=100y",
            "-search.latencyOffset=0s", "-search.disableCache", "-loggerLevel=WARN"]
    return HttpServer("victoria-metrics", argv, port, data, data / "victoria-metrics.log", env=dict(os.environ),
                      health_path="/health")


# --- reading back what a test wrote ----------------------------------------------------------------------------


def influxql(server: Server, db: str, q: str) -> dict[str, Any]:
    """Run an InfluxQL statement over HTTP (`/query`, epoch=ns) and return the first result, raising on errors."""
    params = urllib.parse.urlencode({"db": db, "q": q, "epoch": "ns"})
    req = urllib.request.Request(f"http://{server.address}/query?{params}", method="POST")
    with _LOCAL.open(req, timeout=10) as resp:
        body = json.load(resp)
    result = body["results"][0]
    if "error" in result:
        raise RuntimeError(f"InfluxQL {q!r}: {result['error']}")
    return dict(result)


def influx_rows(server: Server, db: str, measurement: str, where: str = "") -> list[dict[str, Any]]:
    """Every point of a measurement as a dict of column -> value (time in ns), oldest first."""
    q = f'SELECT * FROM "{measurement}"' + (f" WHERE {where}" if where else "")
    rows: list[dict[str, Any]] = []
    for series in influxql(server, db, q).get("series", []):
        cols = series["columns"]
        rows.extend(dict(zip(cols, values)) for values in series["values"])
    return sorted(rows, key=lambda r: r["time"])


def vm_export(server: Server, match: str) -> list[dict[str, Any]]:
    """Raw samples from victoria-metrics' `/api/v1/export` for a series selector, one dict per series.

    A line written as `m,t=a x=1` is the series `m_x{t="a"}` (measurement, "_", field). Timestamps come back in
    milliseconds: VictoriaMetrics keeps no finer precision.
    """
    params = urllib.parse.urlencode({"match[]": match, "start": "0"})
    with _LOCAL.open(f"http://{server.address}/api/v1/export?{params}", timeout=10) as resp:
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def vm_samples(server: Server, match: str, expect: int,
               timeout: float = 10.0) -> list[tuple[dict[str, str], int, float]]:
    """Poll until at least `expect` samples match, then return (labels, ts_ms, value), sorted.

    victoria-metrics buffers new rows for about a second before they become searchable, so a read right after a
    204 can come back empty; `/internal/force_flush` shortens that but does not remove it.
    """
    deadline = time.monotonic() + timeout
    while True:
        with _LOCAL.open(f"http://{server.address}/internal/force_flush", timeout=5):
            pass
        samples = [(s["metric"], ts, v) for s in vm_export(server, match)
                   for ts, v in zip(s["timestamps"], s["values"])]
        if len(samples) >= expect or time.monotonic() > deadline:
            return sorted(samples, key=lambda s: (sorted(s[0].items()), s[1], s[2]))
        time.sleep(0.1)


# --- NATS (a cluster with JetStream and its MQTT listener) ---------------------------------------------------------


@dataclass(repr=False)
class NatsNode(Server):
    """One nats-server of a cluster. `port` is its MQTT listener (what the gateway dials); `monitor_port` answers
    /healthz, which says ok once JetStream is up on this node."""

    monitor_port: int = 0

    def __repr__(self) -> str:
        return f"<nats-server {self.name}: MQTT at {self.address}, data in {self.data_dir}>"

    def launch(self) -> None:
        """Start the process without waiting: a node's JetStream is ready only once a quorum of nodes runs."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        log.close()

    def wait_ready(self, timeout: float = 30.0) -> None:
        wait_for_http(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout, self.proc)
        wait_for_port(self.port, timeout, self.proc)

    def start(self, timeout: float = 30.0) -> None:
        self.launch()
        self.wait_ready(timeout)


def start_cluster(nodes: list[NatsNode], timeout: float = 30.0) -> None:
    for node in nodes:
        node.launch()
    for node in nodes:
        node.wait_ready(timeout)


def nats_cluster(base: Path, nodes: int = 3) -> list[NatsNode]:
    """`nodes` nats-servers routed to each other, each with JetStream (its own store_dir) and an MQTT listener.

    nats-server's MQTT keeps sessions, QoS 1 messages and retained messages in JetStream streams, so it needs
    JetStream and a server_name; in a cluster those streams are replicated (up to 3), so one node can die without
    losing them: `stream_replicas` is set, as the default follows the nodes that happen to be up when the streams
    are made (2, seen on 2.9.10), and an R2 stream stops taking writes when one of its two nodes dies. Every listener is on loopback and a free port; nothing is shared with another test."""
    exe = shutil.which("nats-server") or "/usr/sbin/nats-server"
    ports = [(free_port(), free_port(), free_port(), free_port()) for _ in range(nodes)]  # client, route, mqtt, http
    out = []
    for i, (client, route, mqtt, monitor) in enumerate(ports):
        name = f"n{i + 1}"
        data = base / f"nats-{name}"
        (data / "jetstream").mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://127.0.0.1:{p[1]}" for j, p in enumerate(ports) if j != i)
        conf = data / "nats.conf"
        conf.write_text(f"""\
server_name: {name}
listen: 127.0.0.1:{client}
http: 127.0.0.1:{monitor}
jetstream {{
  store_dir: "{data / 'jetstream'}"
}}
cluster {{
  name: upstream-test
  listen: 127.0.0.1:{route}
  routes: [{routes}]
}}
mqtt {{
  listen: 127.0.0.1:{mqtt}
  stream_replicas: {min(3, nodes)}
}}
""")
        out.append(NatsNode(f"nats-{name}", [exe, "-c", str(conf)], mqtt, data, data / "nats.log",
                            env=dict(os.environ), monitor_port=monitor))
    return out
