"""What a SIGHUP reload does to the models (tests/integration/test_reload.py sends the signal to the daemon): the
configured thresholds apply, 0 brings back the model's own, and thresholds that contradict change nothing."""

from __future__ import annotations

import pytest

from gateway import config
from tests.unit.test_without_onnxruntime import built


def test_thresholds_apply_on_reload_and_zero_means_the_models_own(tmp_path):
    base = f'[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n[influx]\napi = "none"\n'
    with built(tmp_path) as gateway:
        detector, content = gateway.filters.detector, gateway.filters.content
        own = (detector.threshold, detector.quiet, content.mark_threshold, content.block_threshold)
        applied, restart = gateway.reload(config.parse(
            base + "[anomaly]\nthreshold = 0.5\nepisode_quiet = 7\n[content]\nmark_threshold = 0.3\n"))
        assert applied == ["anomaly.episode_quiet", "anomaly.threshold", "content.mark_threshold"] and restart == []
        assert (detector.threshold, detector.quiet, content.mark_threshold) == (0.5, 7, 0.3)
        gateway.reload(config.parse(base))
        assert (detector.threshold, detector.quiet, content.mark_threshold, content.block_threshold) == own


def test_a_mark_threshold_above_the_block_threshold_changes_nothing(tmp_path):
    base = f'[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n[influx]\napi = "none"\n'
    with built(tmp_path) as gateway:
        content = gateway.filters.content
        before = (content.mark_threshold, content.block_threshold, gateway.cfg.log.level)
        with pytest.raises(ValueError, match="above content.block_threshold"):
            gateway.reload(config.parse(base + '[content]\nmark_threshold = 0.9\nblock_threshold = 0.5\n'
                                               '[log]\nlevel = "debug"\n'))
        assert (content.mark_threshold, content.block_threshold, gateway.cfg.log.level) == before


def test_profiles_loaded_on_reload_decide_which_fields_the_anomaly_model_scores(tmp_path):
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    base = (f'profiles_dir = "{profiles}"\n[storage]\ndata_dir = "{tmp_path}"\nfsync = "off"\n'
            '[influx]\napi = "none"\n')
    with built(tmp_path) as gateway:
        gateway.reload(config.parse(base))
        assert gateway.filters.profiles.get("door-1") is None
        (profiles / "door.toml").write_text('name = "door"\nmatch = ["door-*"]\n[fields.contact]\n'
                                            'values = { OPEN = 1, CLOSED = 0 }\n')
        applied, _ = gateway.reload(config.parse(base))
        assert "device profiles (door)" in applied
        assert gateway.filters.profiles.get("door-1").unscored == frozenset({"contact"})
