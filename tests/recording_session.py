"""A wrapper for an onnxruntime session that records what the filters feed it (the unit tests of both models)."""

from __future__ import annotations

from typing import Any

import numpy as np


class RecordingSession:
    """Passes everything to the real session, counting `run` calls and keeping each call's input."""

    def __init__(self, session: Any) -> None:
        self.inner = session
        self.feeds: list[np.ndarray] = []

    @property
    def runs(self) -> int:
        return len(self.feeds)

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> Any:
        self.feeds.append(next(iter(feed.values())))
        return self.inner.run(output_names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
