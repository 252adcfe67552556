"""What an output waits on: a batch of QoS 1 publishes, done once the broker acknowledged every one of them.

The client calls `acked()` once per PUBACK of a publish made with the batch as its tracker (gateway/mqtt/client.py's
`Tracker`). The output counts each publish in `pending` before handing it over (and back out if the client did not
take it), then `seal`s the batch with what must be committed with its offset; the future resolves with that once
both have happened, in either order. The feeds, Home Assistant and the upstream link all wait this way.
"""

from __future__ import annotations

import asyncio
from typing import Any


class AckedBatch:
    __slots__ = ("future", "pending", "sealed", "result")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        self.pending = 0
        self.sealed = False
        self.result: Any = None

    def acked(self) -> None:
        self.pending -= 1
        if self.pending == 0 and self.sealed and not self.future.done():
            self.future.set_result(self.result)

    def seal(self, result: Any = None) -> None:
        """No more publishes will be made with this batch; `result` is what its future resolves with."""
        self.sealed = True
        self.result = result
        if self.pending == 0 and not self.future.done():
            self.future.set_result(result)
