"""Broker accounts for the production mosquitto (deploy/mosquitto-production.conf): add, remove, list.

An account is a line in mosquitto's password file, written by `mosquitto_passwd` (so the hash format is always
the one the installed broker reads), plus its role in a sidecar next to it, `<password file>.roles`: one
`ID ROLE` line per account, nothing else. The username is the identity the ACL file (deploy/mosquitto.acl) is
written against, so ids follow the same rule as device and follower ids (1-64 characters of A-Z a-z 0-9 _ . -):
an id can never smuggle an MQTT wildcard or a topic level into an ACL pattern.

The password is made here (192 random bits), given to `mosquitto_passwd` on its standard input rather than on
its command line (where any local user could read it in the process list), and returned once; only its hash is
stored. Changes take effect when mosquitto re-reads the file: on SIGHUP, which also disconnects a client whose
account was removed.
"""

from __future__ import annotations

import fcntl
import os
import secrets
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gateway.event import ID

ROLES = ("device", "user", "service")
DEFAULT_PASSWORD_FILE = "/etc/mosquitto/gateway.passwd"
RELOAD_HINT = ("mosquitto reads the password file at start and on SIGHUP: run `systemctl reload mosquitto` or "
               "`kill -HUP <mosquitto pid>` (or pass --reload-pid) for this to take effect")


class CredentialsError(Exception):
    """A request that cannot be done; the message says why, for the person at the terminal."""


@dataclass(frozen=True)
class Account:
    id: str
    role: str  # one of ROLES, or "unknown" for a password file entry made without this tool


class Credentials:
    def __init__(self, password_file: str | Path, mosquitto_passwd: str | None = None) -> None:
        self.password_file = Path(password_file)
        self.roles_file = self.password_file.with_name(self.password_file.name + ".roles")
        self._lock_file = self.password_file.with_name(self.password_file.name + ".lock")
        self._tool = mosquitto_passwd

    def add(self, account_id: str, role: str) -> str:
        """Create the account and return its password (not stored anywhere: show it once)."""
        if role not in ROLES:
            raise CredentialsError(f"role {role!r} is not one of {', '.join(ROLES)}")
        _check_id(account_id)
        with self._locked():
            if account_id in self._usernames():
                raise CredentialsError(f"account {account_id!r} already exists in {self.password_file}; remove it "
                                       "first to give it a new password")
            self._create_if_missing(self.password_file)
            password = secrets.token_urlsafe(24)
            # Asked twice, as at a terminal; read from stdin when it is not one.
            self._run([self.password_file, account_id], stdin=f"{password}\n{password}\n")
            roles = self._roles()
            roles[account_id] = role
            self._write_roles(roles)
        return password

    def remove(self, account_id: str) -> Account:
        """Delete the account from the password file (first: that is what revokes it) and from the roles."""
        _check_id(account_id)
        with self._locked():
            roles = self._roles()
            if account_id not in self._usernames():
                if roles.pop(account_id, None) is not None:
                    self._write_roles(roles)
                raise CredentialsError(f"no account {account_id!r} in {self.password_file}")
            self._run(["-D", self.password_file, account_id])
            role = roles.pop(account_id, "unknown")
            self._write_roles(roles)
        return Account(account_id, role)

    def list(self) -> list[Account]:
        """Every account of the password file with its role, in the file's order."""
        roles = self._roles()
        return [Account(name, roles.get(name, "unknown")) for name in self._usernames()]

    # --- files -----------------------------------------------------------------------------------------------

    def _usernames(self) -> list[str]:
        try:
            text = self.password_file.read_text()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise CredentialsError(f"cannot read {self.password_file}: {exc.strerror}") from None
        return [line.split(":", 1)[0] for line in text.splitlines() if ":" in line and not line.startswith("#")]

    def _roles(self) -> dict[str, str]:
        try:
            text = self.roles_file.read_text()
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise CredentialsError(f"cannot read {self.roles_file}: {exc.strerror}") from None
        roles = {}
        for line in text.splitlines():
            name, _, role = line.partition(" ")
            if name:
                roles[name] = role
        return roles

    def _write_roles(self, roles: dict[str, str]) -> None:
        """Temp file, fsync, rename, fsync the folder: a crash leaves the old file or the new one."""
        tmp = self.roles_file.with_name(self.roles_file.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            os.write(fd, "".join(f"{name} {role}\n" for name, role in roles.items()).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _share_with_mosquitto(tmp)
        os.replace(tmp, self.roles_file)
        dir_fd = os.open(self.roles_file.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _create_if_missing(self, path: Path) -> None:
        # mosquitto_passwd -c would create it world-readable (umask 022): the hashes are nobody else's business.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        except FileExistsError:
            return
        except OSError as exc:
            raise CredentialsError(f"cannot create {path}: {exc.strerror}") from None
        _share_with_mosquitto(path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One change at a time: two concurrent adds must not lose each other's role line."""
        try:
            fd = os.open(self._lock_file, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise CredentialsError(f"cannot open {self._lock_file}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _run(self, args: list[str | Path], stdin: str = "") -> None:
        tool = self._tool or shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
        if not os.access(tool, os.X_OK):
            raise CredentialsError("mosquitto_passwd not found: install the mosquitto package")
        done = subprocess.run([tool, *map(str, args)], input=stdin, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise CredentialsError(f"mosquitto_passwd failed ({done.returncode}): "
                                   f"{(done.stderr or done.stdout).strip()}")


def _check_id(account_id: str) -> None:
    if not ID.fullmatch(account_id):
        raise CredentialsError(f"id {account_id[:80]!r} must be 1-64 characters of A-Z a-z 0-9 _ . -")


def _share_with_mosquitto(path: Path) -> None:
    """Group `mosquitto` may read the file: the broker re-reads it on SIGHUP after dropping root."""
    if os.geteuid() != 0:
        return
    try:
        shutil.chown(path, group="mosquitto")
    except (LookupError, OSError):
        pass  # no such group here: the file stays root's, mode 640


def reload(pid: int) -> None:
    """Make mosquitto re-read its password and ACL files now (SIGHUP)."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise CredentialsError(f"no process {pid}: is mosquitto running?") from None
    except PermissionError:
        raise CredentialsError(f"not allowed to signal process {pid}") from None
