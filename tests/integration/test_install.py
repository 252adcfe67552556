"""Installed as a user installs it: the wheel, built from this checkout, into a clean venv, and run from a folder
that is not the checkout, so everything it needs (models, device profiles) must come from the wheel."""

from __future__ import annotations

import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.servers import REPO

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--wheel-dir", str(out), str(REPO)], check=True, capture_output=True, timeout=300)
    (found,) = out.glob("edge_gateway-*.whl")
    return found


def test_the_wheel_carries_the_models_and_the_device_profiles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for model in ("anomaly/anomaly.onnx", "content/content.onnx", "anomaly/MODEL_CARD.md", "content/MODEL_CARD.md"):
        assert f"gateway/models/{model}" in names
    assert {n for n in names if n.startswith("devices/profiles/") and n.endswith(".toml")}
    assert not {n for n in names if n.startswith(("tests/", "benchmarks/"))}


def test_a_clean_venv_with_the_wheel_runs_the_gateway_on_its_defaults(wheel, mosquitto, tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    smoke = subprocess.run([str(python), str(REPO / "scripts" / "smoke.py"), "--gateway",
                            str(env_dir / "bin" / "gateway"), "--broker", mosquitto.address,
                            "--workdir", str(tmp_path / "work"), "--timeout", "60"],
                           capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout + smoke.stderr + _log(tmp_path / "work" / "gateway.log")
    assert "flagged the spike" in smoke.stdout
    assert "the gateway stopped cleanly" in smoke.stdout


def _log(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""
