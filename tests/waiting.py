"""Waiting in tests for what must happen, instead of sleeping a fixed time and hoping it did."""

from __future__ import annotations

import asyncio
import time
from typing import Callable


async def until(cond: Callable[[], object], what: str = "condition", timeout: float = 15.0) -> None:
    """Polls `cond` from the event loop until it holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} not met within {timeout}s"
        await asyncio.sleep(0.01)

