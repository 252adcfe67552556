"""`gateway backup` / `gateway restore`: a consistent copy of the log and the graph, taken while the log is written."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.fanout.graph import FollowerGraph
from gateway.log.store import SCHEMA_VERSION, LogStore
from gateway.ops.backup import BackupError, backup, restore
from tests.unit.test_log_store import reading


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    store = LogStore(d / "log.db", fsync="off")
    store.append([reading(i) for i in range(1, 101)], [None] * 100, progress={"feeds": 60})
    store.close()
    graph = FollowerGraph(d / "graph.db")
    graph.follow("alice", "devices/d-1")
    graph.close()
    return d


def events_in(path: Path) -> list[int]:
    db = sqlite3.connect(path)
    try:
        return [row[0] for row in db.execute("SELECT offset FROM events ORDER BY offset")]
    finally:
        db.close()


def test_a_backup_holds_the_events_the_progress_and_the_graph(data, tmp_path):
    copied = backup(data, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["backup.json", "graph.db", "log.db"]
    assert [c.name for c in copied] == ["log.db", "graph.db"]
    assert copied[0].schema_version == SCHEMA_VERSION
    assert events_in(tmp_path / "b" / "log.db") == list(range(1, 101))
    store = LogStore(tmp_path / "b" / "log.db", fsync="off")
    assert store.progress() == {"feeds": 60}
    store.close()
    assert FollowerGraph(tmp_path / "b" / "graph.db").following("alice") == ["devices/d-1"]
    assert json.loads((tmp_path / "b" / "backup.json").read_text())["databases"][0]["name"] == "log.db"


def test_a_backup_taken_while_the_log_is_appended_to_is_one_committed_state(data, tmp_path):
    store = LogStore(data / "log.db", fsync="off")
    stop = threading.Event()

    def append() -> None:
        offset = 101
        while not stop.is_set():
            store.append([reading(o) for o in range(offset, offset + 50)], [None] * 50)
            offset += 50

    writer = threading.Thread(target=append)
    writer.start()
    try:
        time.sleep(0.05)
        backup(data, tmp_path / "b")
    finally:
        stop.set()
        writer.join()
        store.close()
    offsets = events_in(tmp_path / "b" / "log.db")
    assert offsets == list(range(1, len(offsets) + 1))  # no torn batch: whole batches of 50 after the first 100
    assert (len(offsets) - 100) % 50 == 0


def test_a_backup_refuses_a_folder_that_is_not_a_data_folder_or_a_used_destination(data, tmp_path):
    with pytest.raises(BackupError, match="no log.db"):
        backup(tmp_path / "nothing", tmp_path / "b")
    backup(data, tmp_path / "b")
    with pytest.raises(BackupError, match="already holds a backup"):
        backup(data, tmp_path / "b")


def test_restore_puts_the_backup_back_and_keeps_what_it_replaced(data, tmp_path):
    backup(data, tmp_path / "b")
    store = LogStore(data / "log.db", fsync="off")
    store.append([reading(101)], [None])
    store.close()
    restored, aside = restore(tmp_path / "b", data)
    assert [c.name for c in restored] == ["log.db", "graph.db"]
    assert events_in(data / "log.db") == list(range(1, 101))
    assert aside is not None and events_in(aside / "log.db")[-1] == 101


def test_restore_refuses_while_a_gateway_runs_on_the_folder(data, tmp_path):
    backup(data, tmp_path / "b")
    (data / "status.json").write_text(json.dumps({"time": time.time()}))
    with pytest.raises(BackupError, match="stop it first"):
        restore(tmp_path / "b", data)
    (data / "status.json").write_text(json.dumps({"time": time.time() - 60}))  # a gateway that stopped
    restore(tmp_path / "b", data)


def test_restore_refuses_what_is_not_a_backup_or_is_damaged(data, tmp_path):
    with pytest.raises(BackupError, match="not a backup"):
        restore(data, tmp_path / "new")
    backup(data, tmp_path / "b")
    (tmp_path / "b" / "graph.db").write_bytes(b"SQLite format 3\x00" + b"\x00" * 200)
    with pytest.raises(BackupError, match="graph.db"):
        restore(tmp_path / "b", data)
    assert events_in(data / "log.db") == list(range(1, 101))  # nothing replaced


def test_the_commands_use_the_configured_data_folder_and_copy_the_config(data, tmp_path):
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(f'[storage]\ndata_dir = "{data}"\n')
    made = CliRunner().invoke(main, ["backup", str(tmp_path / "b"), "--config", str(cfg)])
    assert made.exit_code == 0, made.output
    assert (tmp_path / "b" / "gateway.toml").read_text() == cfg.read_text()
    assert "log.db:" in made.stdout and "schema version" in made.stdout
    again = CliRunner().invoke(main, ["backup", str(tmp_path / "b"), "--config", str(cfg)])
    assert again.exit_code == 1 and "already holds a backup" in again.output
    put_back = CliRunner().invoke(main, ["restore", str(tmp_path / "b"), "--config", str(cfg)])
    assert put_back.exit_code == 0, put_back.output
    assert "the files it replaced are in" in put_back.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root (CI runs as root)")
def test_root_backs_up_a_stopped_daemons_files_only_as_their_owner_and_restores_them_to_it(data, tmp_path):
    daemon = 4321  # the files belong to the daemon's user, and root runs the command
    for path in [data, *data.iterdir()]:
        os.chown(path, daemon, daemon)
    with pytest.raises(BackupError, match="run this as that user"):
        backup(data, tmp_path / "b")  # it would leave root-owned -wal/-shm beside the daemon's files
    assert sorted(p.name for p in data.iterdir()) == ["graph.db", "log.db"]
    for path in data.iterdir():
        os.chown(path, 0, 0)
    backup(data, tmp_path / "b")
    for path in [data, *data.iterdir()]:
        os.chown(path, daemon, daemon)
    restored, _ = restore(tmp_path / "b", data)
    assert {(data / c.name).stat().st_uid for c in restored} == {daemon}
