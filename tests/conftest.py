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
