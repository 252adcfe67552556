"""`gateway backup` and `gateway restore`: a consistent copy of what a gateway cannot lose, taken while it runs.

What matters lives in two SQLite files of the data folder: `log.db` (the events not yet trimmed, every consumer's
progress, the likes, reposts, replies, impressions and revenue, the dead letters) and `graph.db` (who follows whom).
`status.json` is rewritten every second and is not worth keeping. Each database is copied with SQLite's online
backup API in one step, so the copy is one committed state of the file even while the daemon appends to it (in WAL
mode the daemon's writes go on meanwhile), then checked with `PRAGMA quick_check` before it takes its final name.

A restore checks the backup's files the same way, refuses while a gateway writes to the data folder, and moves the
files it replaces aside (into `before-restore-TIME/`) instead of deleting them.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

DATABASES = ("log.db", "graph.db")
MANIFEST = "backup.json"
CONFIG_COPY = "gateway.toml"
LIVE_STATUS_SECONDS = 5.0  # the daemon rewrites status.json every second


class BackupError(Exception):
    """Why a backup or restore could not be made; nothing was replaced."""


@dataclass(frozen=True)
class Copied:
    name: str
    bytes: int
    schema_version: int


def backup(data_dir: Path, dest: Path, config: Path | None = None) -> list[Copied]:
    """Copy the databases of `data_dir` (and the config file, when given) into the folder `dest`, which must not
    hold a backup already."""
    if not (data_dir / "log.db").is_file():
        raise BackupError(f"no log.db in {data_dir}: is this the gateway's data folder (storage.data_dir)?")
    if (dest / MANIFEST).exists() or any((dest / name).exists() for name in DATABASES):
        raise BackupError(f"{dest} already holds a backup; choose a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in DATABASES:
        source = data_dir / name
        if source.is_file():
            copied.append(_copy_database(source, dest / name))
    if config is not None:
        shutil.copyfile(config, dest / CONFIG_COPY)
    manifest = {"time": time.time(), "data_dir": str(data_dir.resolve()),
                "config": str(config.resolve()) if config is not None else None,
                "databases": [c.__dict__ for c in copied]}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return copied


def restore(source: Path, data_dir: Path) -> tuple[list[Copied], Path | None]:
    """Put the databases of the backup `source` in place in `data_dir`; returns what was restored and where the
    files it replaced were moved (None: there were none)."""
    if not (source / MANIFEST).is_file() or not (source / "log.db").is_file():
        raise BackupError(f"{source} is not a backup made by `gateway backup` (no {MANIFEST} and log.db)")
    if _daemon_running(data_dir):
        raise BackupError(f"a gateway is running on {data_dir} (its status.json is fresh): stop it first "
                          "(systemctl stop edge-gateway)")
    for name in DATABASES:
        if (source / name).is_file():
            _check(source / name)
    data_dir.mkdir(parents=True, exist_ok=True)
    replaced = [p for name in DATABASES for p in _files_of(data_dir / name) if p.exists()]
    aside = None
    if replaced:
        aside = data_dir / time.strftime("before-restore-%Y%m%d-%H%M%S")
        aside.mkdir()
        for p in replaced:
            os.replace(p, aside / p.name)
    restored = [_copy_database(source / name, data_dir / name) for name in DATABASES if (source / name).is_file()]
    owner = data_dir.stat()
    if os.geteuid() == 0 and owner.st_uid != 0:  # `sudo gateway restore`: the files are the daemon's, not root's
        for c in restored:
            os.chown(data_dir / c.name, owner.st_uid, owner.st_gid)
    return restored, aside


def _copy_database(source: Path, target: Path) -> Copied:
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    # Even a read-only connection creates the WAL's side files when no writer has them open, and leaves them:
    # created by another user (root, typically) they would keep the daemon from opening its own file.
    side_files = all(source.with_name(source.name + suffix).exists() for suffix in ("-wal", "-shm"))
    if _in_wal_mode(source) and not side_files and source.stat().st_uid != os.geteuid():
        raise BackupError(f"{source} belongs to uid {source.stat().st_uid}: run this as that user "
                          "(sudo -u edge-gateway gateway ...), so that the files SQLite creates beside it belong "
                          "to the daemon")
    try:
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True, timeout=10.0)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)  # all pages in one step: one consistent state of the source
                dst.execute("PRAGMA journal_mode=DELETE")  # a single file, no -wal beside it
                version = dst.execute("PRAGMA user_version").fetchone()[0]
            finally:
                dst.close()
        finally:
            src.close()
        _check(partial)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"copying {source}: {exc}") from None
    os.replace(partial, target)
    return Copied(target.name, target.stat().st_size, version)


def _check(path: Path) -> None:
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise BackupError(f"{path} is not a readable database: {exc}") from None
    if result != "ok":
        raise BackupError(f"{path} is damaged: {result}")


def _in_wal_mode(db: Path) -> bool:
    """From the file's header (bytes 18 and 19 are 2 in WAL mode): the live files are, the backup's copies not."""
    with open(db, "rb") as f:
        header = f.read(20)
    return len(header) == 20 and header[18] == 2


def _files_of(db: Path) -> list[Path]:
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


def _daemon_running(data_dir: Path) -> bool:
    try:
        written = json.loads((data_dir / "status.json").read_text())["time"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return time.time() - float(written) < LIVE_STATUS_SECONDS
