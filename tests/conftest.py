from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests import servers


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.Server]:
    """One real mosquitto per test session, on the project's mosquitto.conf and a free port.

    Tests keep out of each other's way by using their own topics and client ids. A test that restarts, pauses or
    kills the broker must use `private_mosquitto` instead.
    """
    server = servers.mosquitto(tmp_path_factory.mktemp("broker"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[servers.Server]:
    server = servers.mosquitto(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.HttpServer]:
    """One real InfluxDB 1.x per session (HTTP on a free loopback port, auth off, files under the session's tmp).

    Tests keep apart by writing to their own database. A test that stops or restarts InfluxDB uses
    `private_influxdb`. Read back with `servers.influxql` / `servers.influx_rows`.
    """
    server = servers.influxdb(tmp_path_factory.mktemp("influxdb"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_influxdb(tmp_path: Path) -> Iterator[servers.HttpServer]:
    server = servers.influxdb(tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def victoria_metrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[servers.HttpServer]:
    """One real victoria-metrics per session, written through the InfluxDB v2 API and read back with
    `servers.vm_samples` (`/api/v1/export`). Tests keep apart by using their own measurement names."""
    server = servers.victoria_metrics(tmp_path_factory.mktemp("victoria-metrics"))
    server.start()
    yield server
    server.stop()
