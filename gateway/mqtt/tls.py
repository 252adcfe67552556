"""The TLS context of the broker connection, from `mqtt.tls` and its files."""

from __future__ import annotations

import ssl

from gateway.config import ConfigError, ConfigProblem, MqttConfig, UpstreamConfig, tls_files


def tls_context(cfg: MqttConfig | UpstreamConfig, section: str = "mqtt") -> ssl.SSLContext | None:
    """The TLS context for `mqtt.tls` (or `upstream.tls`), or None without TLS. Raises ConfigError naming the
    setting when a file is missing or unusable, so the daemon stops at start instead of retrying a connection that
    cannot work."""
    if not cfg.tls:
        return None
    problems = tls_files(cfg, section)
    if problems:
        raise ConfigError(problems)
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)  # verifies the chain and, by default, the name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    setting, path = f"{section}.ca_file", cfg.ca_file
    try:
        if cfg.ca_file:
            ctx.load_verify_locations(cafile=cfg.ca_file)
        if cfg.cert_file:
            setting, path = f"{section}.cert_file", cfg.cert_file
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError([ConfigProblem(setting, path, f"cannot be used for TLS ({exc})")]) from None
    if cfg.tls_insecure:
        ctx.check_hostname = False  # the chain is still verified (verify_mode stays CERT_REQUIRED)
    return ctx
