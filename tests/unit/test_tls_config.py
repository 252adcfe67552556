"""The gateway's TLS settings: validated together, files checked at start, a context that verifies the broker."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway import config
from gateway.cli import main
from gateway.config import ConfigError, MqttConfig
from gateway.mqtt.tls import tls_context
from tests.servers import REPO, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs") / "c", "--client", "gateway", "broker.example")


def test_tls_files_without_tls_are_refused_rather_than_ignored() -> None:
    """Someone who set ca_file but forgot tls = true would otherwise send the password in the clear."""
    with pytest.raises(ConfigError) as err:
        config.parse('[mqtt]\nca_file = "/etc/ca.crt"\ntls_insecure = true\nkey_file = "k.pem"\n')
    shown = [str(p) for p in err.value.problems]
    assert "mqtt.ca_file = '/etc/ca.crt': needs mqtt.tls = true" in shown
    assert "mqtt.tls_insecure = True: needs mqtt.tls = true" in shown
    assert "mqtt.key_file = 'k.pem': needs mqtt.cert_file" in shown


def test_missing_tls_files_are_a_start_error_naming_the_setting(tmp_path: Path) -> None:
    cfg = config.parse(f'[mqtt]\ntls = true\nca_file = "{tmp_path}/nope.crt"\n')  # parses: the file is the host's
    with pytest.raises(ConfigError, match=r"mqtt.ca_file = '.*nope.crt': No such file or directory"):
        tls_context(cfg.mqtt)
    result = CliRunner().invoke(main, ["run", "--data-dir", str(tmp_path / "d"), "--broker", "127.0.0.1:1",
                                       "--config", str(_write(tmp_path, cfg))])
    assert result.exit_code == 2, result.output
    assert "mqtt.ca_file" in result.output and "No such file" in result.output
    assert not (tmp_path / "d").exists()


def test_a_file_that_is_not_a_certificate_is_named(tmp_path: Path) -> None:
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match=r"mqtt.ca_file = '.*junk.crt': cannot be used for TLS"):
        tls_context(MqttConfig(tls=True, ca_file=str(junk)))


def test_the_context_verifies_chain_and_name(certs: Path) -> None:
    assert tls_context(MqttConfig()) is None
    ctx = tls_context(MqttConfig(tls=True, ca_file=str(certs / "ca.crt")))
    assert ctx is not None
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert any("edge-gateway local CA" in str(c["subject"]) for c in ctx.get_ca_certs())
    insecure = tls_context(MqttConfig(tls=True, ca_file=str(certs / "ca.crt"), tls_insecure=True))
    assert insecure is not None and not insecure.check_hostname and insecure.verify_mode == ssl.CERT_REQUIRED


def test_a_client_certificate_is_loaded_and_a_wrong_key_is_named(certs: Path) -> None:
    ok = MqttConfig(tls=True, ca_file=str(certs / "ca.crt"), cert_file=str(certs / "client-gateway.crt"),
                    key_file=str(certs / "client-gateway.key"))
    assert tls_context(ok) is not None
    wrong = MqttConfig(tls=True, cert_file=str(certs / "client-gateway.crt"), key_file=str(certs / "server.key"))
    with pytest.raises(ConfigError, match="mqtt.cert_file = .*cannot be used for TLS"):
        tls_context(wrong)


def test_make_certs_names_localhost_loopback_and_the_given_host(certs: Path) -> None:
    import subprocess

    text = subprocess.run(["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-ext",
                           "subjectAltName"], capture_output=True, text=True, check=True).stdout
    assert "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "DNS:broker.example" in text
    assert (certs / "server.key").stat().st_mode & 0o077 in (0, 0o040)  # never world-readable
    assert (certs / "ca.key").stat().st_mode & 0o077 == 0


def test_check_config_checks_the_tls_files(tmp_path: Path, certs: Path) -> None:
    good = _write(tmp_path, config.parse(f'[mqtt]\ntls = true\nca_file = "{certs}/ca.crt"\n'), "good.toml")
    result = CliRunner().invoke(main, ["check-config", str(good)])
    assert result.exit_code == 0, result.output
    bad = _write(tmp_path, config.parse(f'[mqtt]\ntls = true\ncert_file = "{certs}/ca.crt"\n'
                                        f'key_file = "{certs}/server.key"\n'), "bad.toml")
    result = CliRunner().invoke(main, ["check-config", str(bad)])
    assert result.exit_code == 2 and "mqtt.cert_file" in result.output


def test_the_production_example_config_is_valid() -> None:
    cfg = config.load(REPO / "deploy" / "gateway-production.toml")
    assert cfg.mqtt.tls and cfg.mqtt.username == "gateway" and not cfg.mqtt.tls_insecure
    assert cfg.limits.per_source_rate > 0
    assert cfg.mqtt.password_file == "mqtt-password" and not cfg.mqtt.password  # the secret is a credential


def _write(tmp_path: Path, cfg: config.Config, name: str = "gateway.toml") -> Path:
    m = cfg.mqtt
    lines = ["[mqtt]", f"tls = {str(m.tls).lower()}"]
    lines += [f'{k} = "{getattr(m, k)}"' for k in ("ca_file", "cert_file", "key_file") if getattr(m, k)]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path
