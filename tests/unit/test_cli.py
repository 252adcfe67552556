"""The `gateway` command line, without a daemon: config checks and the follower graph."""

import json
import time

import pytest
from click.testing import CliRunner

from gateway import config
from gateway.cli import main
from firmware_sim.cli import main as sim_main


def test_check_config_accepts_a_good_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[mqtt]\nbroker = "127.0.0.1:1999"\n[influx]\napi = "v2"\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 0, result.output
    assert "OK" in result.output


def test_check_config_names_every_bad_field_and_value(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[mqtt]\nbroker = "nowhere"\n[anomaly]\nmodel = "missing.onnx"\nthreshold = 7\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "mqtt.broker = 'nowhere': must be HOST:PORT" in result.output
    assert "anomaly.threshold = 7: must be between 0 and 1" in result.output


def test_check_config_reports_a_missing_model_file(tmp_path):
    path = tmp_path / "gateway.toml"
    path.write_text('[anomaly]\nmodel = "/nonexistent/model.onnx"\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2
    assert "anomaly.model = '/nonexistent/model.onnx': file not found" in result.output


def test_run_refuses_a_bad_override_before_touching_anything(tmp_path):
    result = CliRunner().invoke(main, ["run", "--broker", "nope", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "mqtt.broker = 'nope'" in result.output
    assert not (tmp_path / "d").exists()


def test_follow_unfollow_and_list(tmp_path):
    runner = CliRunner()
    d = ["--data-dir", str(tmp_path)]
    first = runner.invoke(main, ["follow", "alice", "devices/dev-1", *d])
    assert first.stdout == "alice follows devices/dev-1\n"
    assert first.stderr == f"new follower graph: {tmp_path / 'graph.db'}\n"
    assert "already" in runner.invoke(main, ["follow", "alice", "devices/dev-1", *d]).stdout
    assert runner.invoke(main, ["following", "alice", *d]).stdout == "devices/dev-1\n"
    assert runner.invoke(main, ["unfollow", "alice", "devices/dev-1", *d]).stdout == "alice unfollowed devices/dev-1\n"
    bad = runner.invoke(main, ["follow", "al/ice", "devices/dev-1", *d])
    assert bad.exit_code == 2 and "follower" in bad.output


def test_status_without_a_daemon_says_so(tmp_path):
    result = CliRunner().invoke(main, ["status", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert "is the gateway running" in result.output


def test_import_follows_loads_a_graph_and_reports_bad_lines(tmp_path):
    edges = tmp_path / "edges.txt"
    edges.write_text("# follower source\nalice users/bob\ncarol users/bob  # a fan\nalice users/bob\n\n"
                     "mallory users/+\njust-one-field\nbob devices/dev-1\n")
    result = CliRunner().invoke(main, ["import-follows", str(edges), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1, result.output
    assert "3 follows added, 1 already present, 2 bad lines" in result.output
    assert "line 6: source id '+'" in result.output
    assert "line 7: expected FOLLOWER SOURCE" in result.output
    listing = CliRunner().invoke(main, ["following", "alice", "--data-dir", str(tmp_path)])
    assert listing.output.split() == ["users/bob"]


def test_import_follows_reads_standard_input(tmp_path):
    result = CliRunner().invoke(main, ["import-follows", "-", "--data-dir", str(tmp_path)],
                                input="dave devices/dev-9\n")
    assert result.exit_code == 0, result.output
    assert "1 follows added, 0 already present, 0 bad lines" in result.output


@pytest.mark.parametrize("cli", [main, sim_main], ids=["gateway", "firmware-sim"])
def test_both_commands_answer_dash_h_and_version(cli):
    assert CliRunner().invoke(cli, ["-h"]).exit_code == 0
    version = CliRunner().invoke(cli, ["--version"])
    assert version.exit_code == 0 and "version 0." in version.stdout


def test_an_unknown_log_level_is_refused_with_the_choices_not_a_traceback(tmp_path):
    result = CliRunner().invoke(main, ["run", "--log-level", "verbose", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 2
    assert "'verbose' is not one of 'debug', 'info', 'warning', 'error'" in result.output
    assert not (tmp_path / "d").exists()


def test_reading_the_graph_of_a_wrong_folder_is_an_error_not_an_empty_graph(tmp_path):
    result = CliRunner().invoke(main, ["following", "alice", "--data-dir", str(tmp_path / "elsewhere")])
    assert result.exit_code == 1
    assert f"no follower graph at {tmp_path / 'elsewhere' / 'graph.db'}" in result.output
    assert not (tmp_path / "elsewhere").exists()


def test_every_subcommand_finds_the_config_through_the_environment(tmp_path, monkeypatch):
    data = tmp_path / "data"
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n')
    monkeypatch.setenv("GATEWAY_CONFIG", str(cfg))
    assert CliRunner().invoke(main, ["follow", "alice", "users/bob"]).exit_code == 0
    assert (data / "graph.db").exists()
    assert CliRunner().invoke(main, ["following", "alice"]).stdout == "users/bob\n"
    (data / "status.json").write_text(json.dumps({"time": time.time(), "metrics": {}}))
    assert CliRunner().invoke(main, ["status"]).exit_code == 0
    assert CliRunner().invoke(main, ["check-config"]).stdout == f"{cfg}: OK\n"


def test_a_broken_config_found_by_discovery_is_reported_by_name(tmp_path, monkeypatch):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text('[mqtt]\nbroker = "nowhere"\n')
    monkeypatch.setenv("GATEWAY_CONFIG", str(cfg))
    result = CliRunner().invoke(main, ["status"])
    assert result.exit_code == 2
    assert f"configuration error in {cfg}" in result.output and "mqtt.broker = 'nowhere'" in result.output


def test_check_config_loads_both_models(tmp_path):
    not_a_model = tmp_path / "content.onnx"
    not_a_model.write_bytes(b"this is not an ONNX file")
    path = tmp_path / "gateway.toml"
    path.write_text(f'[content]\nmodel = "{not_a_model}"\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert result.exit_code == 2
    assert f"content.model = '{not_a_model}': does not load" in result.output
    path.write_text('[content]\nmodel = "/nonexistent/content.onnx"\n')
    result = CliRunner().invoke(main, ["check-config", str(path)])
    assert "content.model = '/nonexistent/content.onnx': file not found" in result.output


def test_init_config_writes_a_starter_that_check_config_accepts_and_keeps_an_existing_file(tmp_path):
    path = tmp_path / "etc" / "gateway.toml"
    result = CliRunner().invoke(main, ["init-config", str(path), "--data-dir", "/var/lib/edge-gateway"])
    assert result.exit_code == 0, result.output
    assert config.load(path).storage.data_dir == "/var/lib/edge-gateway"
    assert CliRunner().invoke(main, ["check-config", str(path)]).exit_code == 0
    path.write_text("# mine\n")
    refused = CliRunner().invoke(main, ["init-config", str(path)])
    assert refused.exit_code == 1 and "--force" in refused.output
    assert path.read_text() == "# mine\n"
    assert CliRunner().invoke(main, ["init-config", str(path), "--force"]).exit_code == 0
    assert path.read_text().startswith("# edge-gateway configuration")


# --- try-profile -----------------------------------------------------------------------------------------------


def test_try_profile_shows_the_reading_a_message_becomes():
    result = CliRunner().invoke(main, ["try-profile", "tasmota", "--topic", "tele/kitchen/SENSOR", "--payload",
                                       '{"Time":"2024-05-01T12:00:00","BME280":{"Temperature":21.4,"Humidity":40.2,'
                                       '"Pressure":1013.2},"PressureUnit":"hPa","TempUnit":"C"}'])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("profile     tasmota (") and lines[0].endswith("devices/dialects/tasmota.toml)")
    assert lines[1:] == ["topic       tele/kitchen/SENSOR (pattern tele/{id}/SENSOR)",
                         "reading     devices/tasmota-kitchen telemetry "
                         "(feeds/{follower}/devices/tasmota-kitchen/telemetry)",
                         "  temperature  21.4 degC",
                         "  humidity     40.2 %RH",
                         "  pressure     1013.2 hPa"]


def test_try_profile_shows_the_dead_letter_and_exits_1():
    result = CliRunner().invoke(main, ["try-profile", "zigbee2mqtt", "--topic", "zigbee2mqtt/living room",
                                       "--payload", '{"temperature": 21.5}'])
    assert result.exit_code == 1
    assert result.output.splitlines()[-1].startswith(
        "dead letter bad_device_id: zigbee2mqtt: name 'living room' gives device id 'z2m-living room'")
    other = CliRunner().invoke(main, ["try-profile", "esphome", "--topic", "kitchen/status", "--payload", "online"])
    assert other.exit_code == 1
    assert other.output.splitlines()[-1] == (
        "dead letter unknown_topic: the topic matches none of the profile's patterns "
        "({id}/sensor/{field}/state, {id}/binary_sensor/{field}/state)")
    ignored = CliRunner().invoke(main, ["try-profile", "zigbee2mqtt", "--topic", "zigbee2mqtt/bridge/state",
                                        "--payload", "online"])
    assert ignored.exit_code == 1 and "ignored" in ignored.output


def test_try_profile_reads_a_file_a_configured_folder_and_standard_input(tmp_path):
    folder = tmp_path / "profiles"
    folder.mkdir()
    (folder / "broken.toml").write_text("name = ")  # a broken neighbour does not hide the one asked for
    (folder / "meter.toml").write_text('name = "meter"\n[source]\ntopic = "meters/{id}/{field}"\n'
                                       'payload = "value"\n[fields.power]\nunit = "W"\n')
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'profiles_dir = "{folder}"\n')
    by_name = CliRunner().invoke(main, ["try-profile", "meter", "--config", str(cfg), "--topic", "meters/m1/power",
                                        "--payload", "-"], input="230.5\n")
    assert by_name.exit_code == 0, by_name.output
    assert by_name.output.splitlines()[-1] == "  power  230.5 W"
    by_file = CliRunner().invoke(main, ["try-profile", str(folder / "meter.toml"), "--topic", "meters/m1/power",
                                        "--payload", "lots"])
    assert by_file.exit_code == 1 and "dead letter not_numeric" in by_file.output
    unknown = CliRunner().invoke(main, ["try-profile", "nope", "--config", str(cfg), "--topic", "a", "--payload", ""])
    assert unknown.exit_code == 2 and "no profile named 'nope'" in unknown.output
    broken = CliRunner().invoke(main, ["try-profile", str(folder / "broken.toml"), "--topic", "a", "--payload", ""])
    assert broken.exit_code == 2 and "broken.toml" in broken.output
    plain = CliRunner().invoke(main, ["try-profile", "env-sensor", "--topic", "a", "--payload", ""])
    assert plain.exit_code == 2 and "has no [source]" in plain.output


def test_try_profile_marks_the_states_the_anomaly_model_leaves_alone():
    result = CliRunner().invoke(main, ["try-profile", "zigbee2mqtt", "--topic", "zigbee2mqtt/0x00158d0001a2b3c4",
                                       "--payload", '{"temperature": 21.5, "contact": false}'])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ")}
    assert lines["contact"].endswith("0.0  (a state: not scored by the anomaly model)")
    assert "not scored" not in lines["temperature"]
