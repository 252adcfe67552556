"""The `gateway` command line, without a daemon: config checks and the follower graph."""

from click.testing import CliRunner

from gateway.cli import main


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
    assert runner.invoke(main, ["follow", "alice", "devices/dev-1", *d]).output == "alice follows devices/dev-1\n"
    assert "already" in runner.invoke(main, ["follow", "alice", "devices/dev-1", *d]).output
    assert runner.invoke(main, ["following", "alice", *d]).output == "devices/dev-1\n"
    assert runner.invoke(main, ["unfollow", "alice", "devices/dev-1", *d]).output == "alice unfollowed devices/dev-1\n"
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
