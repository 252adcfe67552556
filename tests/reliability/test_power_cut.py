"""A power cut mid-write leaves a torn last frame in the ingest log's WAL (`log.db-wal`). SQLite's WAL checksums must
discard it on the next open: the gateway starts, and the events whose append was torn were never acknowledged to the
broker, so it redelivers them. Simulated as kill -9 under load, then damage to the WAL right after its last valid
frame, then a restart."""

from __future__ import annotations

import os
import random
import struct
from pathlib import Path

import pytest

from tests.reliability.harness import (Fleet, account, assert_nothing_acknowledged_was_lost, follow_fleet, follower,
                                       uid)

pytestmark = [pytest.mark.integration, pytest.mark.reliability]

WAL_HEADER, FRAME_HEADER = 32, 24


def end_of_valid_frames(wal: Path) -> tuple[int, int, bytes]:
    """(offset just after the last frame of the current WAL generation, page size, the generation's salts).

    After a checkpoint SQLite rewrites the WAL from the start and leaves older frames (other salts) behind them,
    so the end of the file is not the end of the log: the current frames are those carrying the header's salts.
    """
    data = wal.read_bytes()
    page_size = struct.unpack(">I", data[8:12])[0]
    salts = data[16:24]
    frame = FRAME_HEADER + page_size
    end = WAL_HEADER
    while end + frame <= len(data) and data[end + 8:end + 16] == salts:
        end += frame
    return end, page_size, salts


@pytest.mark.parametrize("damage", ["torn_frame", "truncated_frame"])
def test_a_torn_last_write_in_the_log_wal_is_discarded_and_nothing_acknowledged_is_lost(
        damage, mosquitto, influxdb, make_gateway, tmp_path):
    rng = random.Random(5)
    fleet, db = Fleet(uid("wal") + "-", devices=10), uid("rel_")
    gw = make_gateway(mosquitto.address, influxdb.url, db)
    follow_fleet(gw, fleet.prefix + "fan", fleet)
    fan = follower(mosquitto.address, fleet.prefix + "fan")
    gw.start()
    load = fleet.start(mosquitto.address, rate=600, duration=10, log=tmp_path / "sim.log")
    gw.wait_status(lambda s: s["metrics"]["appended"] >= 2000)
    gw.kill()

    wal = gw.data_dir / "log.db-wal"
    end, page_size, salts = end_of_valid_frames(wal)
    assert end > WAL_HEADER, "the WAL should hold committed frames after a kill -9 under load"
    with open(wal, "r+b") as f:
        if damage == "torn_frame":
            # The next frame was being written when the power went: a header with the right salts but a checksum
            # that does not match, and half a page of whatever was on the disk.
            f.seek(end)
            f.write(struct.pack(">II", 1, end // (FRAME_HEADER + page_size) + 1) + salts
                    + os.urandom(8) + os.urandom(page_size // 2))
        else:
            # A write that never fully reached the disk: a garbage tail in place of the next frame, then cut short.
            f.seek(end)
            f.write(bytes(rng.getrandbits(8) for _ in range(FRAME_HEADER + page_size)))
            f.truncate(end + FRAME_HEADER + page_size // 3)
        f.flush()
        os.fsync(f.fileno())

    gw.start()  # must open the damaged log and carry on
    load.wait()
    acc = account(f"wal {damage}", [fleet], {"fan": fan}, (influxdb, db))
    assert_nothing_acknowledged_was_lost(acc)
    fan.close()
