"""`gateway credentials`: broker accounts in mosquitto's password file, roles beside it."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.ops.credentials import Credentials, CredentialsError


def cli(pwfile: Path, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["credentials", *args, "--password-file", str(pwfile)])
    return result.exit_code, result.stdout, result.stderr


def test_add_prints_the_password_once_and_stores_only_its_hash(tmp_path: Path) -> None:
    pwfile = tmp_path / "gateway.passwd"
    code, out, err = cli(pwfile, "add", "--role", "device", "dev-1")
    assert code == 0, err
    password = out.strip()
    assert out == password + "\n" and len(password) >= 32  # alone on stdout: PASS=$(gateway credentials add ...)
    assert "SIGHUP" in err  # how to make it take effect
    line = pwfile.read_text().strip()
    assert line.startswith("dev-1:$7$") and password not in line  # mosquitto 2.0's PBKDF2-SHA512 hash
    assert stat.S_IMODE(pwfile.stat().st_mode) & 0o007 == 0  # not world-readable
    assert (tmp_path / "gateway.passwd.roles").read_text() == "dev-1 device\n"
    code2, out2, _ = cli(pwfile, "add", "--role", "user", "alice")
    assert code2 == 0 and out2.strip() != password


def test_list_gives_ids_and_roles_including_entries_made_by_hand(tmp_path: Path) -> None:
    pwfile = tmp_path / "p"
    for role, name in (("device", "dev-1"), ("user", "alice"), ("service", "gateway")):
        assert cli(pwfile, "add", "--role", role, name)[0] == 0
    subprocess.run(["mosquitto_passwd", "-b", str(pwfile), "legacy", "x"], check=True)
    code, out, _ = cli(pwfile, "list")
    assert code == 0
    assert out.splitlines() == ["dev-1 device", "alice user", "gateway service", "legacy unknown"]


def test_remove_deletes_the_entry_and_the_role(tmp_path: Path) -> None:
    pwfile = tmp_path / "p"
    cli(pwfile, "add", "--role", "device", "dev-1")
    cli(pwfile, "add", "--role", "user", "alice")
    code, _, err = cli(pwfile, "remove", "dev-1")
    assert code == 0 and "removed device dev-1" in err
    assert not any(line.startswith("dev-1:") for line in pwfile.read_text().splitlines())
    assert cli(pwfile, "list")[1] == "alice user\n"
    code, _, err = cli(pwfile, "remove", "dev-1")
    assert code == 1 and "no account 'dev-1'" in err


def test_ids_roles_and_duplicates_are_refused(tmp_path: Path) -> None:
    pwfile = tmp_path / "p"
    assert cli(pwfile, "add", "--role", "user", "alice")[0] == 0
    code, _, err = cli(pwfile, "add", "--role", "device", "alice")
    assert code == 1 and "already exists" in err  # one id, one account: devices/alice and users/alice are one
    for bad in ("a/b", "#", "+", "x" * 65, "dev 1", "ünï"):
        code, _, err = cli(pwfile, "add", "--role", "device", bad)
        assert code == 1 and "must be 1-64 characters" in err, bad
    assert cli(pwfile, "add", "--role", "admin", "bob")[0] == 2  # click refuses the role
    assert cli(pwfile, "list")[1] == "alice user\n"


def test_the_password_never_appears_on_a_command_line(tmp_path: Path) -> None:
    """mosquitto_passwd -b would put it in the process list for any local user to read."""
    argv_log = tmp_path / "argv"
    fake = tmp_path / "fake_passwd"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {argv_log}\ncat > /dev/null\n")
    fake.chmod(0o755)
    password = Credentials(tmp_path / "p", mosquitto_passwd=str(fake)).add("dev-1", "device")
    assert "dev-1" in argv_log.read_text() and password not in argv_log.read_text()


def test_a_missing_tool_or_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="mosquitto_passwd not found"):
        Credentials(tmp_path / "p", mosquitto_passwd=str(tmp_path / "nope")).add("dev-1", "device")
    with pytest.raises(CredentialsError, match="cannot"):
        Credentials(tmp_path / "no-such-dir" / "p").add("dev-1", "device")


def test_reload_pid_sends_sighup(tmp_path: Path) -> None:
    # A stand-in for mosquitto that reports the SIGHUP it gets.
    marker = tmp_path / "hup"
    proc = subprocess.Popen([sys.executable, "-c", "import signal, sys, time, pathlib\n"
                             "signal.signal(signal.SIGHUP, lambda *a: (pathlib.Path(sys.argv[1]).write_text('hup'),"
                             " sys.exit(0)))\nprint('ready', flush=True)\ntime.sleep(30)", str(marker)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        code, _, err = cli(tmp_path / "p", "add", "--role", "device", "dev-1", "--reload-pid", str(proc.pid))
        assert code == 0, err
        assert proc.wait(10) == 0 and marker.read_text() == "hup"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
