"""Recognising retransmissions in memory: the newest keys of all sources, and the last few of each source."""

from gateway.log.dedup import HashRing, RecentKeys


def test_a_key_among_the_newest_of_all_sources_is_seen_whichever_source_sent_it():
    keys = RecentKeys(recent=100, per_source=2)
    for i in range(100):
        keys.add(f"devices/d-{i % 7}", f"{i}@t")
    assert all(keys.seen(f"devices/d-{i % 7}", f"{i}@t") for i in range(100))
    assert not keys.seen("devices/d-1", "0@t")  # same key, other source


def test_a_source_keeps_its_last_keys_however_much_traffic_other_sources_make_meanwhile():
    keys = RecentKeys(recent=10, per_source=4)
    for seq in range(1, 7):
        keys.add("devices/quiet", f"{seq}@t")
    for i in range(10_000):
        keys.add("devices/busy", f"{i}@t")
    assert [keys.seen("devices/quiet", f"{seq}@t") for seq in range(1, 7)] == [False, False, True, True, True, True]


def test_memory_is_bounded_by_the_number_of_sources_least_recently_seen_forgotten_first():
    keys = RecentKeys(recent=1, per_source=8, max_sources=3)
    for source in ("a", "b", "c"):
        keys.add(source, "k1")
    keys.add("a", "k2")  # a is the most recent now
    keys.add("d", "k1")  # evicts b
    assert keys.seen("a", "k1") and keys.seen("c", "k1") and keys.seen("d", "k1")
    assert not keys.seen("b", "k1")
    assert len(keys) == 1


def test_a_hash_made_of_the_bytes_where_two_stored_hashes_meet_is_not_one_of_them():
    ring = HashRing(4)
    first, second = 0x1122334455667788, 0x0102030405060708
    ring.add(first)
    ring.add(second)
    # Packed little-endian end to end, the 8 bytes at offset 4 are first's upper half, then second's lower half.
    straddling = int.from_bytes(first.to_bytes(8, "little")[4:] + second.to_bytes(8, "little")[:4], "little")
    assert first in ring and second in ring
    assert straddling not in ring
    ring.add(straddling)
    assert straddling in ring, "once stored, it is found at its own place past the false one"


def test_a_full_ring_forgets_its_oldest_hash_first():
    ring = HashRing(3)
    for h in (-1, 2, 3, 4):
        ring.add(h)
    assert -1 not in ring and all(h in ring for h in (2, 3, 4))
    ring.add(5)
    assert 2 not in ring and all(h in ring for h in (3, 4, 5))
