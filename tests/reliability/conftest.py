"""Fixtures of the fault-injection suite: a gateway factory whose processes are all killed at the end."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests import servers
from tests.gateway_process import GatewayProcess
from tests.reliability.harness import kill_leftover_runs, uid, write_config

MakeGateway = Callable[..., GatewayProcess]


@pytest.fixture
def durable_mosquitto(tmp_path: Path) -> Iterator[servers.Server]:
    """A private mosquitto whose persistence really reaches the disk, for tests that restart the broker.

    `servers.mosquitto` already keeps a broker started as root from dropping to a user that cannot write the
    test's folder; this fixture checks that persistence really worked: a restart must come back with its sessions.
    """
    server = servers.mosquitto(tmp_path)
    server.start()
    yield server
    server.kill()
    assert "Permission denied" not in server.log_path.read_text(errors="replace")


@pytest.fixture
def make_gateway(tmp_path: Path) -> Iterator[MakeGateway]:
    """`make_gateway(broker, influx_url=None, db=None, config=None)` -> a GatewayProcess, not yet started.

    `config` is a {"section": {"key": value}} dict written to a TOML file; with no InfluxDB URL the gateway writes
    nothing (`--influx-api none`). Every gateway made here is killed (by its PID) when the test ends.
    """
    made: list[GatewayProcess] = []

    def make(broker: str, influx_url: str | None = None, db: str | None = None,
             config: dict[str, dict[str, object]] | None = None, name: str = "gw") -> GatewayProcess:
        extra = ["--influx-api", "none"] if influx_url is None else [
            "--influx-api", "v1", "--influx-url", influx_url, "--influx-db", db or "gateway"]
        path = write_config(tmp_path / f"{name}.toml", config) if config else None
        gw = GatewayProcess(tmp_path / name, broker, *extra, client_id=uid("gw-"), config=path)
        made.append(gw)
        return gw

    yield make
    for gw in made:
        gw.kill()


@pytest.fixture(autouse=True)
def no_simulator_outlives_its_test() -> Iterator[None]:
    """A test that fails while its simulator still publishes would leave it running, and on the shared broker that
    traffic reaches the next test's gateway (which subscribes to every device): one failure became two."""
    yield
    kill_leftover_runs()
