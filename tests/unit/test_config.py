import re
from pathlib import Path

import pytest

from gateway import config
from gateway.config import Config, ConfigError


def test_an_empty_file_gives_working_defaults():
    cfg = config.parse("")
    assert cfg == Config()
    assert cfg.mqtt.broker == "127.0.0.1:1883"
    assert cfg.storage.fsync == "full"


def test_every_error_names_the_field_and_the_value():
    text = """
    profiles_dir = 3
    [mqtt]
    broker = "localhost"
    keepalive = 0
    password = "hunter2"
    [storage]
    fsync = "sometimes"
    [influx]
    api = "v9"
    token = 12
    colour = "blue"
    [nonsense]
    """
    with pytest.raises(ConfigError) as err:
        config.parse(text)
    shown = [str(p) for p in err.value.problems]
    assert "mqtt.broker = 'localhost': must be HOST:PORT" in shown
    assert "mqtt.keepalive = 0: must be a finite number greater than 0" in shown
    assert any(s.startswith("storage.fsync = 'sometimes': must be one of") for s in shown)
    assert any(s.startswith("influx.api = 'v9'") for s in shown)
    assert "influx.colour = 'blue': unknown setting" in shown
    assert "nonsense = {}: unknown setting" in shown
    assert "profiles_dir = 3: must be str, got int" in shown
    # Secrets are never echoed, even when wrong.
    assert "influx.token = ***: must be str, got int" in shown
    assert all("hunter2" not in s for s in shown)


def test_toml_syntax_errors_are_reported():
    with pytest.raises(ConfigError, match="<toml>"):
        config.parse("[mqtt\n")


def test_integers_are_accepted_for_float_settings():
    assert config.parse("[mqtt]\nreconnect_max = 60").mqtt.reconnect_max == 60.0


def test_command_line_overrides_go_through_the_same_validation():
    cfg = config.override(Config(), mqtt={"broker": "127.0.0.1:1999"}, storage={"data_dir": None})
    assert cfg.mqtt.broker == "127.0.0.1:1999"
    assert cfg.storage.data_dir == Config().storage.data_dir
    with pytest.raises(ConfigError, match="mqtt.broker"):
        config.override(Config(), mqtt={"broker": "nope"})


def test_redacted_dump_hides_secrets():
    cfg = config.parse('[mqtt]\npassword = "hunter2"')
    assert config.as_dict(cfg, redact=True)["mqtt"]["password"] == "***"


def test_the_reference_documents_every_setting():
    ref = config.reference()
    for section in ("mqtt", "storage", "limits", "anomaly", "pipeline", "influx"):
        for name in getattr(Config(), section).__dataclass_fields__:
            assert f"`{section}.{name}`" in ref


def test_home_assistant_is_off_by_default_and_its_prefix_is_topic_levels_without_wildcards():
    assert Config().homeassistant.enabled is False
    assert Config().homeassistant.discovery_prefix == "homeassistant"
    assert config.parse('[homeassistant]\ndiscovery_prefix = "site/ha"').homeassistant.discovery_prefix == "site/ha"
    for bad in ("", "ha/", "/ha", "ha//x", "ha/+", "ha/#", "$SYS"):
        with pytest.raises(ConfigError, match="homeassistant.discovery_prefix"):
            config.parse(f'[homeassistant]\ndiscovery_prefix = "{bad}"')


def test_the_readme_carries_the_current_configuration_reference():
    readme = (config.REPO / "README.md").read_text()
    assert config.reference() in readme, "regenerate the README's table with `gateway config-reference`"


def test_settings_an_upgrade_removed_are_ignored_with_a_warning_not_refused():
    cfg = config.parse("[pipeline]\nlinger_ms = 2.0\nmax_unacked_batches = 32\n[influx]\noutbox_max_bytes = 1000\n")
    assert cfg == Config()
    assert len(config.WARNINGS) == 3 and all("is ignored: no longer used" in w for w in config.WARNINGS)
    assert config.parse("") == Config() and config.WARNINGS == []


def test_the_starter_file_lists_every_setting_and_uncommented_gives_the_defaults():
    text = config.starter()
    assert config.parse(text) == config.Config()  # all commented out
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    assert config.parse(uncommented) == config.Config()
    for row in config.reference().splitlines()[2:]:
        name = row.split("`")[1].rpartition(".")[2]
        assert f"# {name} = " in text


def test_the_config_is_found_by_option_then_environment_then_system_file(tmp_path):
    system = tmp_path / "etc.toml"
    assert config.locate(None, {}, system) is None
    system.write_text("")
    assert config.locate(None, {}, system) == system
    assert config.locate(None, {"GATEWAY_CONFIG": "/x.toml"}, system) == Path("/x.toml")
    assert config.locate("/y.toml", {"GATEWAY_CONFIG": "/x.toml"}, system) == Path("/y.toml")


def test_the_data_folder_is_the_setting_else_systemds_state_directory_else_the_development_one():
    assert config.Config().data_dir({}) == Path("var/gateway")
    assert config.Config().data_dir({"STATE_DIRECTORY": "/var/lib/edge-gateway"}) == Path("/var/lib/edge-gateway")
    assert config.Config().data_dir({"STATE_DIRECTORY": "/a:/b"}) == Path("/a")
    explicit = config.parse('[storage]\ndata_dir = "/srv/gw"\n')
    assert explicit.data_dir({"STATE_DIRECTORY": "/var/lib/edge-gateway"}) == Path("/srv/gw")


def test_shipped_files_come_from_the_checkout_else_from_the_installed_package(tmp_path, monkeypatch):
    assert config.shipped("models/anomaly/anomaly.onnx") == config.REPO / "models/anomaly/anomaly.onnx"
    package = tmp_path / "site-packages" / "gateway"
    (package / "models" / "anomaly").mkdir(parents=True)
    (package / "models" / "anomaly" / "anomaly.onnx").write_bytes(b"")
    monkeypatch.setattr(config, "REPO", package.parent)
    monkeypatch.setattr(config, "PACKAGE", package)
    assert config.shipped("models/anomaly/anomaly.onnx") == package / "models/anomaly/anomaly.onnx"
    assert config.shipped("/abs/model.onnx") == Path("/abs/model.onnx")


def test_the_broker_password_can_come_from_a_file_or_a_systemd_credential(tmp_path):
    (tmp_path / "secret").write_text("s3cret\n")
    by_path = config.parse(f'[mqtt]\npassword_file = "{tmp_path / "secret"}"\n')
    assert config.with_secrets(by_path, {}).mqtt.password == "s3cret"
    credential = config.parse('[mqtt]\npassword_file = "secret"\n')
    assert config.with_secrets(credential, {"CREDENTIALS_DIRECTORY": str(tmp_path)}).mqtt.password == "s3cret"
    with pytest.raises(ConfigError, match=r"CREDENTIALS_DIRECTORY is not set"):
        config.with_secrets(credential, {})
    with pytest.raises(ConfigError, match=r"mqtt.password_file = '.*/missing': No such file"):
        config.with_secrets(config.parse(f'[mqtt]\npassword_file = "{tmp_path / "missing"}"\n'), {})
    with pytest.raises(ConfigError, match="not both"):
        config.parse('[mqtt]\npassword = "x"\npassword_file = "secret"\n')
    assert config.with_secrets(config.Config(), {}) == config.Config()
