"""On 32-bit ARM there is no onnxruntime wheel (pyproject.toml leaves the dependency out there): the gateway must
still start, with its models off, and say so once."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

from gateway import config, runtime


@contextlib.contextmanager
def built(tmp_path) -> Iterator[runtime.Gateway]:
    """The gateway as `gateway run` builds it before connecting anywhere; closed afterwards."""
    cfg = config.parse(f'[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n[influx]\napi = "none"\n')
    gateway = runtime.Gateway(cfg)
    try:
        yield gateway
    finally:
        gateway.storage.shutdown()
        gateway.reading.shutdown()
        gateway.store.close()
        gateway.reader.close()
        gateway.graph.close()


def said(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "onnxruntime" in r.getMessage()]


def test_without_onnxruntime_the_gateway_starts_with_its_models_off_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"), built(tmp_path) as gateway:
        assert gateway.filters.detector is None and gateway.filters.content is None
    assert len(said(caplog)) == 1 and "models are off" in said(caplog)[0]


def test_with_onnxruntime_the_models_load_and_nothing_is_said(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"), built(tmp_path) as gateway:
        assert gateway.filters.detector is not None and gateway.filters.content is not None
    assert said(caplog) == []
