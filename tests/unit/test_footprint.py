"""What a gateway loads only when a feature asks for it: each of these costs memory that a Pi running without the
feature should not pay (benchmarks/RESULTS.md, "What the gateway imports")."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.servers import REPO

ON_DEMAND = {
    "prometheus_client": "the first scrape of /metrics",
    "serial": "serial.ports",
    "importlib.metadata": "Home Assistant's discovery (the gateway's version in each config)",
}


def test_starting_the_daemon_loads_none_of_the_libraries_only_a_feature_needs():
    probe = ("import json, sys; import gateway.cli, gateway.runtime; "
             f"print(json.dumps([m for m in {sorted(ON_DEMAND)!r} if m in sys.modules]))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    loaded = json.loads(run.stdout)
    assert loaded == [], {m: f"should wait for {ON_DEMAND[m]}" for m in loaded}


def test_the_metrics_endpoint_loads_prometheus_client_at_its_first_scrape():
    probe = ("import sys; from gateway.ops.metrics import Metrics; from gateway.ops.prometheus import Exposition; "
             "e = Exposition(Metrics(), 'gw'); before = 'prometheus_client' in sys.modules; body = e.render(); "
             "print(before, 'prometheus_client' in sys.modules, b'edge_gateway_received_total' in body)")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["False", "True", "True"]


def test_both_models_run_without_numpy_or_onnxruntime_s_python_binding():
    """The models run through onnxruntime's C library; the binding would bring numpy and a second copy of the
    runtime, 16.7 MB resident (benchmarks/RESULTS.md)."""
    probe = ("import json, sys; from gateway import config, runtime; cfg = config.parse(''); "
             "d = runtime.load_detector(cfg); c = runtime.load_content_filter(cfg); "
             "v = d.score([('devices/d', {'t': 21.5}, 0)] * 30)[-1]; p = c.score(['hello there'])[0]; "
             "print(json.dumps([v.label, p.label, [m for m in ('numpy', 'onnxruntime') if m in sys.modules]]))")
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert run.returncode == 0, run.stderr
    reading, post, loaded = json.loads(run.stdout)
    assert reading != "warming" and post == "clean", "both models ran"
    assert loaded == []
