"""Recognising a retransmission before it is logged twice, in memory and bounded.

A retransmission repeats its source's dedup key (a device's `seq@ts`, a post's nonce). Two kinds reach us:

- the broker redelivers what we received but had not acknowledged when the connection (or the gateway) went down.
  Those are the newest events in the log, at most our receive window of them: the last `recent` keys of all sources
  (a set, rebuilt from the log's tail at start) catch them, however they are spread over sources;
- a device resends what the broker never acknowledged to it (a lost PUBACK, a serial ACK lost on the line), after
  it reconnected, which can be minutes later with any amount of other traffic in between. A device holds at most its
  own in-flight window of such messages: the last `per_source` keys of each source catch them.

The log keeps no index for this: an index is one more page written per commit (gateway/log/store.py). Keys are kept
as their hashes (64 bits: a false match among a few thousand keys has odds of about 1 in 10^12), per source in a
compact ring of packed bytes, so a source costs about `per_source` * 8 bytes and a lookup is one search of those
bytes in C. At most `max_sources` sources are remembered; the least recently seen is forgotten first.
"""

from __future__ import annotations

import struct
from collections import OrderedDict, deque

_HASH = struct.Struct("<q")
_WIDTH = _HASH.size


class HashRing:
    """The last `size` key hashes of one source, packed end to end; the oldest is overwritten first."""

    __slots__ = ("keys", "next", "size")

    def __init__(self, size: int) -> None:
        self.keys = bytearray()
        self.next = 0  # the slot overwritten next, once the ring is full
        self.size = size

    def __contains__(self, h: int) -> bool:
        packed, keys = _HASH.pack(h), self.keys
        at = keys.find(packed)
        while at % _WIDTH:  # bytes that straddle two hashes, not one of them (-1 % 8 is 7: checked below)
            if at < 0:
                return False
            at = keys.find(packed, at + 1)
        return True

    def add(self, h: int) -> None:
        if len(self.keys) < self.size * _WIDTH:
            self.keys += _HASH.pack(h)
        else:
            _HASH.pack_into(self.keys, self.next * _WIDTH, h)
            self.next = (self.next + 1) % self.size


class RecentKeys:
    def __init__(self, recent: int = 8192, per_source: int = 64, max_sources: int = 50_000) -> None:
        self._recent: set[int] = set()
        self._order: deque[int] = deque()
        self._recent_max = recent
        self._per_source = per_source
        self._max_sources = max_sources
        self._rings: OrderedDict[str, HashRing] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def seen(self, source: str, key: str) -> bool:
        if hash((source, key)) in self._recent:
            return True
        ring = self._rings.get(source)
        return ring is not None and hash(key) in ring

    def add(self, source: str, key: str) -> None:
        h = hash((source, key))
        self._recent.add(h)
        self._order.append(h)
        if len(self._order) > self._recent_max:
            self._recent.discard(self._order.popleft())
        rings = self._rings
        ring = rings.get(source)
        if ring is None:
            if len(rings) >= self._max_sources:
                rings.popitem(last=False)
            ring = rings[source] = HashRing(self._per_source)
        else:
            rings.move_to_end(source)
        ring.add(hash(key))
