"""`gateway` command line: run the daemon, check a config, manage the follower graph, back up and restore."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from gateway import config as config_mod
from gateway.config import Config, ConfigError
from gateway.ops.logs import LEVELS

CONFIG_HELP = "gateway.toml (default: $GATEWAY_CONFIG, else /etc/edge-gateway/gateway.toml when it exists)."


def _config(option: str | None) -> tuple[Config, Path | None]:
    """The configuration every subcommand uses, and the file it came from (None: the development defaults)."""
    path = config_mod.locate(option)
    if path is None:
        return Config(), None
    try:
        return config_mod.load(path), path
    except ConfigError as exc:
        _fail(exc, str(path))


def _load(option: str | None) -> Config:
    return _config(option)[0]


def _fail(exc: ConfigError, origin: str) -> NoReturn:
    click.echo(f"configuration error in {origin}:", err=True)
    for problem in exc.problems:
        click.echo(f"  {problem}", err=True)
    sys.exit(2)


def _data_dir(cfg: Config, option: str | None) -> Path:
    return Path(option) if option else cfg.data_dir()


_config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False), help=CONFIG_HELP)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-gateway", prog_name="gateway")
def main() -> None:
    """Event-driven IoT edge gateway."""


@main.command()
@_config_option
@click.option("--broker", help="Broker HOST:PORT (overrides mqtt.broker).")
@click.option("--influx-url", help="InfluxDB URL (overrides influx.url).")
@click.option("--influx-db", help="v1 database or v2 bucket (overrides influx.database).")
@click.option("--influx-api", type=click.Choice(["v1", "v2", "none"]), help="Overrides influx.api.")
@click.option("--data-dir", help="Folder for the log and the follower graph (overrides storage.data_dir).")
@click.option("--client-id", help="MQTT client id (overrides mqtt.client_id).")
@click.option("--health", help="HOST:PORT of the health endpoint, '' to turn it off (overrides health.listen).")
@click.option("--serial", "serial_ports", multiple=True, metavar="PATH",
              help="Serial port path or glob; repeatable (overrides serial.ports).")
@click.option("--log-level", type=click.Choice(LEVELS, case_sensitive=False), help="Overrides log.level.")
def run(config_path: str | None, broker: str | None, influx_url: str | None, influx_db: str | None,
        influx_api: str | None, data_dir: str | None, client_id: str | None, health: str | None,
        serial_ports: tuple[str, ...], log_level: str | None) -> None:
    """Run the gateway daemon until SIGTERM or SIGINT; SIGHUP reloads what can change live."""
    from gateway.ops.logs import configure

    cfg, origin = _config(config_path)
    shown = str(origin) if origin is not None else "command line"
    overrides: dict[str, dict[str, Any]] = {
        "mqtt": {"broker": broker, "client_id": client_id},
        "influx": {"url": influx_url, "database": influx_db, "api": influx_api},
        "storage": {"data_dir": data_dir},
        "serial": {"ports": list(serial_ports) or None},
        "health": {"listen": health},
        "log": {"level": log_level.lower() if log_level else None},
    }
    try:
        cfg = config_mod.override(cfg, **overrides)
    except ConfigError as exc:
        _fail(exc, shown)
    tls_problems = config_mod.tls_files(cfg.mqtt) + config_mod.tls_files(cfg.upstream, "upstream")
    if tls_problems:
        _fail(ConfigError(tls_problems), shown)
    try:
        cfg = config_mod.with_secrets(cfg)
    except ConfigError as exc:
        _fail(exc, shown)
    configure(cfg.log.level, cfg.log.format)
    logger = logging.getLogger(__name__)
    for warning in config_mod.WARNINGS:
        logger.warning("%s: %s", shown, warning)
    if origin is None:
        logger.info("no config file (--config, $%s, %s): development defaults", config_mod.CONFIG_ENV,
                    config_mod.SYSTEM_CONFIG)
    else:
        logger.info("config file %s", origin)
    logger.info("config: %s", config_mod.as_dict(cfg, redact=True))
    from gateway.runtime import run as run_gateway

    run_gateway(cfg, origin, overrides)


@main.command("check-config")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
def check_config(path: str | None) -> None:
    """Validate a config file (default: the one `gateway run` would use): every error names the field and the
    bad value; the models and device profiles it names must exist and load."""
    cfg, origin = _config(path)
    shown = str(origin) if origin is not None else "the development defaults"
    problems = _model_problems(cfg)
    problems += [str(p) for p in config_mod.tls_files(cfg.mqtt)]
    problems += [str(p) for p in config_mod.tls_files(cfg.upstream, "upstream")]
    if not problems and cfg.mqtt.tls:
        from gateway.mqtt.tls import tls_context

        try:
            tls_context(cfg.mqtt)
        except ConfigError as exc:
            problems += [str(p) for p in exc.problems]
    if not cfg.profiles_path().is_dir():
        problems.append(f"profiles_dir = {cfg.profiles_dir!r}: folder not found")
    else:
        from devices.profiles import ProfileError, load_dir

        try:
            load_dir(cfg.profiles_path())
        except ProfileError as exc:
            problems.append(f"profiles_dir: {exc}")
    if problems:
        click.echo(f"configuration error in {shown}:", err=True)
        for p in problems:
            click.echo(f"  {p}", err=True)
        sys.exit(2)
    click.echo(f"{shown}: OK")


def _model_problems(cfg: Config) -> list[str]:
    """Each enabled model's file must exist and open as the gateway would open it."""
    from gateway.runtime import load_content_filter, load_detector, onnxruntime_installed

    problems = []
    if (cfg.anomaly.enabled or cfg.content.enabled) and not onnxruntime_installed():
        click.echo("warning: onnxruntime is not installed: the gateway will run with its models off", err=True)
        return problems
    for enabled, setting, value, path, loader in (
            (cfg.anomaly.enabled, "anomaly.model", cfg.anomaly.model, cfg.model_path(), load_detector),
            (cfg.content.enabled, "content.model", cfg.content.model, cfg.content_model_path(), load_content_filter)):
        if not enabled:
            continue
        if not path.is_file():
            problems.append(f"{setting} = {value!r}: file not found")
            continue
        try:
            loader(cfg)
        except Exception as exc:  # onnxruntime raises its own types for a file that is not a model
            problems.append(f"{setting} = {value!r}: does not load: {exc}")
    return problems


@main.command("init-config")
@click.argument("path", type=click.Path(dir_okay=False, allow_dash=True))
@click.option("--data-dir", help="Set storage.data_dir in the file (for a service: /var/lib/edge-gateway).")
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def init_config(path: str, data_dir: str | None, force: bool) -> None:
    """Write a starter config to PATH ('-': standard output): every setting with its description and default,
    commented out."""
    text = config_mod.starter(data_dir or "")
    if path == "-":
        click.echo(text, nl=False)
        return
    target = Path(path)
    if target.exists() and not force:
        raise click.ClickException(f"{target} exists; --force to overwrite it")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    click.echo(f"wrote {target}; check it with: gateway check-config {target}", err=True)


@main.command("config-reference")
def config_reference() -> None:
    """Print the configuration reference (Markdown), generated from the schema."""
    click.echo(config_mod.reference())


@main.command("try-profile")
@click.argument("profile")
@click.option("--topic", required=True, help="The topic the device publishes on.")
@click.option("--payload", required=True, help="The message, as the device sends it ('-': standard input).")
@_config_option
def try_profile(profile: str, topic: str, payload: str, config_path: str | None) -> None:
    """What one message becomes under a device profile: the device id and the reading's fields, or the dead letter's
    reason and message. PROFILE is a profile file, or the name of a profile in the configured profiles folder (or
    of a shipped dialect: tasmota, zigbee2mqtt, esphome). Exit 0 for a reading, 1 for a dead letter or an ignored
    topic, 2 when the profile cannot be found or read."""
    from devices.profiles import DIALECTS_DIR, ProfileError, ProfileIndex, parse
    from devices.telemetry import TelemetryError

    cfg = _load(config_path)
    path = Path(profile)
    try:
        if path.suffix == ".toml" or path.is_file():
            found, origin = parse(path.read_text(), str(path)), str(path)
        else:
            named = [(p, f) for folder in (cfg.profiles_path(), DIALECTS_DIR) if folder.is_dir()
                     for f in sorted(folder.glob("*.toml")) for p in _profile_or_none(f) if p.name == profile]
            if not named:
                _refuse(f"no profile named {profile!r} in {cfg.profiles_path()} or {DIALECTS_DIR}, and no such file")
            found, origin = named[0][0], str(named[0][1])
    except (OSError, ProfileError) as exc:
        _refuse(str(exc))
    body = sys.stdin.buffer.read() if payload == "-" else payload.encode()
    click.echo(f"profile     {found.name} ({origin})")
    router = ProfileIndex([found]).router
    if not router:
        _refuse(f"profile {found.name!r} has no [source]: its devices publish on devices/{{id}}/telemetry")
    match = router.route(topic, topic.split("/"))
    if match is False:
        click.echo(f"ignored     {topic} is under the profile's ignore list: no reading, no dead letter")
        sys.exit(1)
    try:
        if match is None:
            patterns = ", ".join(s.topic for s in found.sources)
            raise TelemetryError("unknown_topic", f"the topic matches none of the profile's patterns ({patterns})")
        click.echo(f"topic       {topic} (pattern {match.source.topic})")
        device_id = match.device_id()
        t = match.reading(body, max_bytes=cfg.limits.max_payload_bytes, max_fields=cfg.limits.max_fields)
    except TelemetryError as exc:
        click.echo(f"dead letter {exc.reason}: {exc.message}")
        sys.exit(1)
    click.echo(f"reading     devices/{device_id} telemetry (feeds/{{follower}}/devices/{device_id}/telemetry)")
    width = max(len(name) for name in t.fields)
    for name, value in t.fields.items():
        spec = found.field(name)
        unit = f" {spec.unit}" if spec is not None and spec.unit else ""
        state = "  (a state: not scored by the anomaly model)" if name in found.unscored else ""
        click.echo(f"  {name:<{width}}  {value!r}{unit}{state}")


def _refuse(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _profile_or_none(path: Path) -> list[Any]:
    """The profile in a file, or nothing when it does not parse (try-profile looks for one name among them; a
    broken neighbour is check-config's business)."""
    from devices.profiles import ProfileError, parse

    try:
        return [parse(path.read_text(), str(path))]
    except (OSError, ProfileError):
        return []


def _graph(config_path: str | None, data_dir: str | None, *, create: bool = True) -> Any:
    """The follower graph of the configured data folder. Changing it creates the file if need be (and says so);
    reading it does not: a wrong folder is an error, not an empty graph."""
    from gateway.fanout.graph import FollowerGraph

    path = _data_dir(_load(config_path), data_dir) / "graph.db"
    if not path.is_file():
        if not create:
            raise click.ClickException(f"no follower graph at {path}: is this the gateway's data folder? "
                                       "(--data-dir, --config or storage.data_dir)")
        click.echo(f"new follower graph: {path}", err=True)
    return FollowerGraph(path)


_graph_options = [
    _config_option,
    click.option("--data-dir", help="The gateway's data folder (overrides storage.data_dir)."),
]


def _with_graph_options(f: Any) -> Any:
    for option in reversed(_graph_options):
        f = option(f)
    return f


@main.command()
@click.argument("follower")
@click.argument("source")
@_with_graph_options
def follow(follower: str, source: str, config_path: str | None, data_dir: str | None) -> None:
    """FOLLOWER starts following SOURCE (devices/ID or users/ID). A running gateway picks it up within a second."""
    from gateway.fanout.graph import GraphError

    try:
        added = _graph(config_path, data_dir).follow(follower, source)
    except GraphError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"{follower} follows {source}" + ("" if added else " (already)"))


@main.command()
@click.argument("follower")
@click.argument("source")
@_with_graph_options
def unfollow(follower: str, source: str, config_path: str | None, data_dir: str | None) -> None:
    """FOLLOWER stops following SOURCE."""
    from gateway.fanout.graph import GraphError

    try:
        removed = _graph(config_path, data_dir).unfollow(follower, source)
    except GraphError as exc:
        raise click.BadParameter(str(exc)) from None
    click.echo(f"{follower} unfollowed {source}" if removed else f"{follower} was not following {source}")


@main.command("import-follows")
@click.argument("edges", type=click.File("r", encoding="utf-8", errors="replace"))
@_with_graph_options
def import_follows(edges: Any, config_path: str | None, data_dir: str | None) -> None:
    """Add the follows listed in EDGES ('-': standard input), one `FOLLOWER SOURCE` pair per line ('#' starts a
    comment), in large transactions: the way to load a whole graph. A line that is not a valid pair is reported
    and skipped (exit status 1); the others are imported."""
    from gateway.fanout.graph import FOLLOW, Change, GraphError

    bad: list[str] = []

    def changes() -> Any:
        for number, line in enumerate(edges, 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise GraphError("expected FOLLOWER SOURCE")
                yield Change(FOLLOW, fields[0], fields[1])
            except GraphError as exc:
                bad.append(f"line {number}: {exc}")

    added, already = _graph(config_path, data_dir).import_changes(changes())
    click.echo(f"{added} follows added, {already} already present, {len(bad)} bad lines")
    for message in bad[:20]:
        click.echo(f"  {message}", err=True)
    if len(bad) > 20:
        click.echo(f"  ... and {len(bad) - 20} more", err=True)
    if bad:
        sys.exit(1)


@main.command()
@click.argument("follower")
@_with_graph_options
def following(follower: str, config_path: str | None, data_dir: str | None) -> None:
    """List what FOLLOWER follows."""
    for source in _graph(config_path, data_dir, create=False).following(follower):
        click.echo(source)


@main.command()
@_config_option
@click.option("--broker", help="HOST:PORT (overrides mqtt.broker; TLS and its CA come from the config).")
@click.option("--username", default="", help="Account to log in with (a user's or an operator's; never the "
              "gateway's own: the broker would cut the gateway off).")
@click.option("--password-file", type=click.Path(dir_okay=False, exists=True),
              help="File whose first line is that account's password.")
@click.option("--follower", required=True, help="Whose feed to watch.")
@click.option("--data-dir", help="Also show the daemon's counters from its status file (default: the configured "
              "data folder, when it has one).")
@click.option("--seconds", type=float, help="Stop after this long (default: until Ctrl-C).")
def watch(config_path: str | None, broker: str | None, username: str, password_file: str | None, follower: str,
          data_dir: str | None, seconds: float | None) -> None:
    """Live view of a follower's feed, alerts and dead letters."""
    from gateway.mqtt.tls import tls_context
    from gateway.ops.watch import Login, watch as run_watch

    cfg = _load(config_path)
    if username and username == cfg.mqtt.username:
        raise click.BadParameter(f"{username!r} is the gateway's own account: the broker allows one connection per "
                                 "account and would cut the gateway off; use a user's or an operator's",
                                 param_hint="--username")
    try:
        tls = tls_context(cfg.mqtt)
    except ConfigError as exc:
        _fail(exc, "the configuration")
    password = (Path(password_file).read_text().splitlines() or [""])[0] if password_file else ""
    if data_dir is None and (cfg.data_dir() / "status.json").is_file():
        data_dir = str(cfg.data_dir())
    run_watch(Login(broker or cfg.mqtt.broker, username, password, tls), follower, data_dir, seconds)


@main.group()
def credentials() -> None:
    """Broker accounts for deploy/mosquitto-production.conf (password file and roles); see gateway/credentials.py."""


_password_file = click.option("--password-file", default="/etc/mosquitto/gateway.passwd", show_default=True,
                              envvar="GATEWAY_PASSWORD_FILE", type=click.Path(dir_okay=False),
                              help="mosquitto's password_file; roles are kept beside it in FILE.roles.")
_reload_pid = click.option("--reload-pid", type=int, metavar="PID",
                           help="Send SIGHUP to this mosquitto so the change takes effect now.")


def _credentials_done(reload_pid: int | None) -> None:
    from gateway.ops.credentials import RELOAD_HINT, CredentialsError, reload

    if reload_pid is None:
        click.echo(RELOAD_HINT, err=True)
        return
    try:
        reload(reload_pid)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"sent SIGHUP to {reload_pid}", err=True)


@credentials.command("add")
@click.option("--role", type=click.Choice(["device", "user", "service"]), required=True)
@click.argument("account_id", metavar="ID")
@_password_file
@_reload_pid
def credentials_add(role: str, account_id: str, password_file: str, reload_pid: int | None) -> None:
    """Create account ID; its password is printed once, alone on standard output."""
    from gateway.ops.credentials import Credentials, CredentialsError

    try:
        password = Credentials(password_file).add(account_id, role)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"added {role} {account_id} to {password_file}; its password (shown only now):", err=True)
    click.echo(password)
    _credentials_done(reload_pid)


@credentials.command("remove")
@click.argument("account_id", metavar="ID")
@_password_file
@_reload_pid
def credentials_remove(account_id: str, password_file: str, reload_pid: int | None) -> None:
    """Delete account ID (connected clients of it are cut off when mosquitto reloads)."""
    from gateway.ops.credentials import Credentials, CredentialsError

    try:
        account = Credentials(password_file).remove(account_id)
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"removed {account.role} {account.id} from {password_file}", err=True)
    _credentials_done(reload_pid)


@credentials.command("list")
@_password_file
def credentials_list(password_file: str) -> None:
    """Every account and its role, one `ID ROLE` per line."""
    from gateway.ops.credentials import Credentials, CredentialsError

    try:
        accounts = Credentials(password_file).list()
    except CredentialsError as exc:
        raise click.ClickException(str(exc)) from None
    for account in accounts:
        click.echo(f"{account.id} {account.role}")


@main.command()
@_config_option
@click.option("--data-dir", help="The gateway's data folder (overrides storage.data_dir).")
def status(config_path: str | None, data_dir: str | None) -> None:
    """Show the running daemon's status (from the status file it rewrites every second)."""
    import json
    import time

    root = _data_dir(_load(config_path), data_dir)
    try:
        doc = json.loads((root / "status.json").read_text())
    except (OSError, ValueError):
        click.echo(f"no status in {root}: is the gateway running with this data folder?", err=True)
        sys.exit(1)
    age = time.time() - doc["time"]
    click.echo(json.dumps(doc, indent=2, sort_keys=True))
    if age > 5:
        click.echo(f"warning: status is {age:.0f}s old; the gateway may not be running", err=True)
        sys.exit(1)


@main.command()
@click.option("--model", "model_path", required=True, type=click.Path(dir_okay=False), metavar="PATH",
              help="The .onnx file to try: an anomaly model rescores telemetry, a content model posts.")
@click.option("--since", metavar="TIME",
              help="Only events whose own time (ts) is at or after TIME: an age (30m, 2h, 7d) or ISO-8601 "
                   "(2026-01-05T14:00, local time unless it names a zone, e.g. Z). Default: the whole log.")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0),
              help="Devices or authors to list, those whose verdicts differ most first.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="gateway.toml: where the log is, and the thresholds to apply. " + CONFIG_HELP)
@click.option("--data-dir", help="Folder of log.db (overrides storage.data_dir).")
def replay(model_path: str, since: str | None, top: int, as_json: bool, config_path: str | None,
           data_dir: str | None) -> None:
    """Rescore the events still in the log with another model and show how its verdicts differ from the ones
    given at the time: flagged by both, then only, now only, per device or author. Publishes nothing and only
    reads the log, so it is safe beside the running daemon.

    The configuration's thresholds (anomaly.threshold, episode_*, content.*_threshold) apply as the daemon would
    apply them; 0 means the model's own. The anomaly model learns each device's normal as it goes: the first
    24 readings of every series are warm-up here, while the verdicts at the time had the history from before --since
    (and warmed up again after each restart of the daemon). Run it as the daemon's user.
    """
    import contextlib
    import json
    import sqlite3
    import time

    from gateway.log.store import offset_span
    from gateway.ops import replay as rp

    cfg = _load(config_path)
    since_ms = None
    if since is not None:
        try:
            since_ms = rp.parse_since(since, int(time.time() * 1000))
        except rp.ReplayError as exc:
            raise click.BadParameter(str(exc), param_hint="--since") from None
    log_path = _data_dir(cfg, data_dir) / "log.db"
    try:
        db = rp.open_log(log_path)
        try:
            model = rp.load_model(Path(model_path), cfg)
            span = offset_span(db)
            bar: Any = contextlib.nullcontext()
            if sys.stderr.isatty() and span is not None:
                bar = click.progressbar(length=span[1] - span[0] + 1, label=f"rescoring {model.kind}",
                                        file=sys.stderr, show_eta=True)
            with bar as progress:
                report = rp.replay(db, model, since_ms, span=span,
                                   progress=progress.update if progress is not None else None)
        finally:
            db.close()
    except rp.ReplayError as exc:
        raise click.ClickException(str(exc)) from None
    except sqlite3.Error as exc:  # a disk error while reading; the log itself is untouched
        raise click.ClickException(f"reading {log_path}: {exc}") from None
    if as_json:
        click.echo(json.dumps(report.as_dict(top), indent=2))
    else:
        click.echo(rp.format_report(report, top))


@main.command()
@click.argument("dest", type=click.Path(file_okay=False))
@_config_option
@click.option("--data-dir", help="The gateway's data folder (overrides storage.data_dir).")
def backup(dest: str, config_path: str | None, data_dir: str | None) -> None:
    """Copy the log (events, progress, counts, revenue, dead letters), the follower graph and the config file into
    the new folder DEST, consistently, while the gateway runs. Run it as the daemon's user."""
    from gateway.ops.backup import BackupError, backup as make_backup

    cfg, origin = _config(config_path)
    try:
        copied = make_backup(_data_dir(cfg, data_dir), Path(dest), origin)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    for c in copied:
        click.echo(f"{Path(dest) / c.name}: {c.bytes} bytes, schema version {c.schema_version}")
    if origin is not None:
        click.echo(f"{Path(dest) / 'gateway.toml'}: copy of {origin}")


@main.command()
@click.argument("source", type=click.Path(file_okay=False, exists=True))
@_config_option
@click.option("--data-dir", help="The gateway's data folder (overrides storage.data_dir).")
def restore(source: str, config_path: str | None, data_dir: str | None) -> None:
    """Put the databases of a backup made by `gateway backup` back into the data folder. The gateway must be
    stopped; the files replaced are moved aside, not deleted. The config file in the backup is left for you to
    compare and copy."""
    from gateway.ops.backup import BackupError, restore as put_back

    root = _data_dir(_load(config_path), data_dir)
    try:
        restored, aside = put_back(Path(source), root)
    except BackupError as exc:
        raise click.ClickException(str(exc)) from None
    for c in restored:
        click.echo(f"restored {root / c.name} ({c.bytes} bytes)")
    if aside is not None:
        click.echo(f"the files it replaced are in {aside}")


if __name__ == "__main__":
    main()
