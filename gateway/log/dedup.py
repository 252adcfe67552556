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
compact ring, so a source costs about `per_source` * 8 bytes. At most `max_sources` sources are remembered; the
least recently seen is forgotten first.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict, deque


class RecentKeys:
    def __init__(self, recent: int = 8192, per_source: int = 64, max_sources: int = 50_000) -> None:
        self._recent: set[int] = set()
        self._order: deque[int] = deque()
        self._recent_max = recent
        self._per_source = per_source
        self._max_sources = max_sources
        self._rings: OrderedDict[str, list] = OrderedDict()  # source -> [array of hashes, next slot]

    def __len__(self) -> int:
        return len(self._order)

    def seen(self, source: str, key: str) -> bool:
        if hash((source, key)) in self._recent:
            return True
        ring = self._rings.get(source)
        return ring is not None and hash(key) in ring[0]

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
            ring = rings[source] = [array("q"), 0]
        else:
            rings.move_to_end(source)
        keys = ring[0]
        if len(keys) < self._per_source:
            keys.append(hash(key))
        else:
            keys[ring[1]] = hash(key)
            ring[1] = (ring[1] + 1) % self._per_source
