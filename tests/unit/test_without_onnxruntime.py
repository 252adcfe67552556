"""On 32-bit ARM there is no onnxruntime wheel (pyproject.toml leaves the dependency out there): the gateway must
still start, with its models off, and say so once."""

from __future__ import annotations

import logging

from gateway import config, runtime


def test_without_onnxruntime_the_gateway_starts_with_its_models_off_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(runtime, "onnxruntime_installed", lambda: False)
    cfg = config.parse(f'[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n[influx]\napi = "none"\n')
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
        gateway = runtime.Gateway(cfg)
    try:
        assert gateway.filters.detector is None and gateway.filters.content is None
        warnings = [r.getMessage() for r in caplog.records if "onnxruntime is not installed" in r.getMessage()]
        assert len(warnings) == 1 and "models are off" in warnings[0]
    finally:
        gateway.storage.shutdown()
        gateway.reading.shutdown()
        gateway.store.close()
        gateway.reader.close()
        gateway.graph.close()


def test_with_onnxruntime_the_models_load_and_nothing_is_said(tmp_path, caplog):
    cfg = config.parse(f'[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n[influx]\napi = "none"\n')
    with caplog.at_level(logging.WARNING, logger="gateway.runtime"):
        gateway = runtime.Gateway(cfg)
    try:
        assert gateway.filters.detector is not None and gateway.filters.content is not None
        assert not [r for r in caplog.records if "onnxruntime" in r.getMessage()]
    finally:
        gateway.storage.shutdown()
        gateway.reading.shutdown()
        gateway.store.close()
        gateway.reader.close()
        gateway.graph.close()
