"""A wrapper for a model's session that records what the filters feed it (the unit tests of both models)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gateway.filters.onnx_session import Tensor


def as_numpy(tensor: Tensor) -> np.ndarray:
    return np.frombuffer(tensor.data, dtype=np.float32 if tensor.data.typecode == "f" else np.int64).reshape(
        tensor.shape)


class RecordingSession:
    """Passes everything to the real session, counting `run` calls and keeping each call's first input."""

    def __init__(self, session: Any) -> None:
        self.inner = session
        self.feeds: list[np.ndarray] = []

    @property
    def runs(self) -> int:
        return len(self.feeds)

    def run(self, output_names: Any, feed: dict[str, Tensor]) -> Any:
        self.feeds.append(as_numpy(next(iter(feed.values()))).copy())
        return self.inner.run(output_names, feed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
