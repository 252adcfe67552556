"""The anomaly filter: one ONNX classifier scoring every numeric field of every device from its own recent history.

    items (source, fields) ──> per-(source, field) rings ──> windows ──> features ──> ONE session.run ──> Verdicts
                               (bounded, LRU)                          (anomaly_features, vectorised)

Each field of each device is a series with a ring of its last values. A micro-batch of items appends every value to
its ring, cuts each value's window (its history up to and including itself, as it was at that value's arrival),
turns all windows into one feature matrix and runs the model once. The model is a multi-class classifier (normal +
the anomaly types) trained on the simulator's signals (models/anomaly/train.py); it never sees raw values, only
scale-free features, so it scores devices and fields it never saw in training.

Warm-up: a series is scored from its `MIN_HISTORY`-th value on. An item none of whose fields is scored yet gets the
label "warming" with score 0 and is never flagged; in an item where only some fields are warm, the warming ones are
simply left out.

Memory is bounded by `max_series`: a new series beyond it evicts the least recently updated one (which starts over,
warming, if it comes back). A device inventing field names churns the cache but cannot grow it.

Not thread-safe: one caller at a time (the gateway's filter stage owns one detector).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from gateway.event import Verdict
from gateway.filters.onnx_session import open_session
from gateway.filters.anomaly_features import FEATURE_NAMES, MIN_HISTORY, WINDOW, window_features

NORMAL = "normal"
WARMING = "warming"

# A ring holds two windows: a series may then receive WINDOW values within one micro-batch before the windows of
# its earlier values in that batch would be overwritten (past that, the batch is cut into chunks; see score()).
_RING = 2 * WINDOW
_PER_CHUNK = _RING - WINDOW
_INITIAL_SLOTS = 1024


class ModelMetadataError(ValueError):
    """The .onnx file lacks the metadata the detector relies on, or was trained on different features."""


class AnomalyDetector:
    """Scores micro-batches of telemetry against the committed sensor-anomaly model.

    `threshold` defaults to the one the training script chose and recorded in the model's metadata.
    `session` is the onnxruntime session; it may be wrapped (for instance to count runs) but must keep `run`.
    """

    def __init__(
        self,
        model_path: str | Path,
        *,
        threshold: float | None = None,
        max_series: int = 10_000,
        intra_op_threads: int = 1,
    ) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be at least 1, got {max_series}")
        self.session: Any
        self.session, meta = open_session(model_path, intra_op_threads)
        self.name, self.version, self.classes, default_threshold = _read_metadata(meta, model_path)
        self.threshold = default_threshold if threshold is None else float(threshold)
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be within (0, 1], got {self.threshold}")
        self._input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        if "probabilities" not in outputs:
            raise ModelMetadataError(f"{model_path}: no 'probabilities' output (export with zipmap disabled)")
        self._output = "probabilities"
        self._normal_col = self.classes.index(NORMAL)
        self._anomaly_cols = np.array([i for i, c in enumerate(self.classes) if c != NORMAL])

        self.max_series = max_series
        self._index: OrderedDict[tuple[str, str], int] = OrderedDict()
        self._store = np.zeros((0, _RING), dtype=np.float64)
        self._count: list[int] = []  # values ever written per slot (the ring's end), a plain list: read per value
        self.evicted = 0

    @property
    def tracked(self) -> int:
        """How many (source, field) series have history right now."""
        return len(self._index)

    def score(self, items: Sequence[tuple[str, Mapping[str, float]]]) -> list[Verdict]:
        """One verdict per item, in order; each item's fields join their series' history first."""
        n_items = len(items)
        warming = [False] * n_items
        rows_item: list[int] = []
        rows_field: list[str] = []
        features: list[np.ndarray] = []
        # Rows of the current chunk: the ring slot and the series length after the value was written.
        slots: list[int] = []
        ends: list[int] = []
        in_chunk: dict[int, int] = {}
        # The chunk's ring writes, applied in one numpy call before its windows are cut: flat index into the
        # store, and value. Per-value numpy indexing cost more than the rest of this loop together.
        put_at: list[int] = []
        put_value: list[float] = []
        index = self._index
        count = self._count

        def flush() -> None:
            if put_at:
                np.put(self._store, put_at, put_value)
                put_at.clear()
                put_value.clear()
            if slots:
                features.append(self._chunk_features(np.array(slots), np.array(ends)))
                slots.clear()
                ends.clear()
            in_chunk.clear()

        for i, (source, fields) in enumerate(items):
            for name, raw in fields.items():
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    continue
                if not math.isfinite(value):
                    continue  # the gateway rejects these before us; a NaN in a ring would poison its window
                key = (source, name)
                slot = index.get(key)
                if slot is None:
                    if len(index) >= self.max_series:
                        victim = next(iter(index.values()))
                        if victim in in_chunk:
                            flush()  # the victim's ring still holds windows this chunk has not cut yet
                    slot = self._admit(key)
                else:
                    index.move_to_end(key)
                written = in_chunk.get(slot, 0)
                if written >= _PER_CHUNK:
                    flush()
                    written = 0
                in_chunk[slot] = written + 1
                end = count[slot]
                put_at.append(slot * _RING + end % _RING)
                put_value.append(value)
                end += 1
                count[slot] = end
                if end >= MIN_HISTORY:
                    slots.append(slot)
                    ends.append(end)
                    rows_item.append(i)
                    rows_field.append(name)
                else:
                    warming[i] = True
        flush()

        item_score = np.zeros(n_items, dtype=np.float64)
        item_best = np.full(n_items, -1, dtype=np.int64)
        row_label: np.ndarray | None = None
        p_anomaly = np.zeros(0)
        if rows_item:
            x = np.concatenate(features)
            proba = np.asarray(self.session.run([self._output], {self._input: x})[0], dtype=np.float64)
            p_anomaly = 1.0 - proba[:, self._normal_col]
            row_label = self._anomaly_cols[np.argmax(proba[:, self._anomaly_cols], axis=1)]
            item_of_row = np.asarray(rows_item)
            np.maximum.at(item_score, item_of_row, p_anomaly)
            # The row that gave each item its score: the last row of the item holding the maximum.
            is_max = p_anomaly >= item_score[item_of_row]
            item_best[item_of_row[is_max]] = np.nonzero(is_max)[0]

        flagged_fields: dict[int, dict[str, str]] = {}
        if row_label is not None:
            for r in np.nonzero(p_anomaly >= self.threshold)[0]:
                flagged_fields.setdefault(rows_item[r], {})[rows_field[r]] = self.classes[row_label[r]]

        verdicts: list[Verdict] = []
        best_rows, scores = item_best.tolist(), item_score.tolist()  # Python numbers: cheap to index one by one
        for i in range(n_items):
            best = best_rows[i]
            if best < 0:
                label = WARMING if warming[i] else NORMAL
                verdicts.append(Verdict(self.name, self.version, 0.0, label, False))
                continue
            score = round(scores[i], 6)
            if i in flagged_fields:
                assert row_label is not None
                verdicts.append(Verdict(self.name, self.version, score, self.classes[row_label[best]], True,
                                        {"fields": flagged_fields[i]}))
            else:
                verdicts.append(Verdict(self.name, self.version, score, NORMAL, False))
        return verdicts

    def _admit(self, key: tuple[str, str]) -> int:
        if len(self._index) >= self.max_series:
            _, slot = self._index.popitem(last=False)
            self.evicted += 1
        else:
            # Below the cap nothing was ever evicted, so slots 0..len-1 are exactly the ones in use.
            slot = len(self._index)
            if slot >= len(self._store):
                self._grow()
        self._count[slot] = 0
        self._index[key] = slot
        return slot

    def _grow(self) -> None:
        # Grow by doubling up to max_series, so a small deployment never allocates the whole cap.
        size = min(self.max_series, max(_INITIAL_SLOTS, 2 * len(self._store)))
        store = np.zeros((size, _RING), dtype=np.float64)
        store[: len(self._store)] = self._store
        self._count.extend([0] * (size - len(self._count)))
        self._store = store

    def _chunk_features(self, slots: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """Features of the chunk's rows, in row order. Full windows go as one matrix, short ones by length."""
        out = np.empty((len(slots), len(FEATURE_NAMES)), dtype=np.float32)
        full = ends >= WINDOW
        if full.any():
            cols = (ends[full, None] - WINDOW + np.arange(WINDOW)) % _RING
            out[full] = window_features(self._store[slots[full, None], cols])
        if not full.all():
            # Only series still filling their first window land here, so this loop is short-lived per series.
            for n in np.unique(ends[~full]):
                sel = ends == n
                out[sel] = window_features(self._store[slots[sel], :n])
        return out


def _read_metadata(meta: Mapping[str, str], path: str | Path) -> tuple[str, str, list[str], float]:
    missing = [k for k in ("name", "version", "classes", "features", "window", "min_history", "threshold")
               if k not in meta]
    if missing:
        raise ModelMetadataError(f"{path}: metadata_props lacks {', '.join(missing)}")
    features = meta["features"].split(",")
    if tuple(features) != FEATURE_NAMES:
        raise ModelMetadataError(f"{path}: trained on features {features}, this gateway computes "
                                 f"{list(FEATURE_NAMES)}; retrain with models/anomaly/train.py")
    if int(meta["window"]) != WINDOW or int(meta["min_history"]) != MIN_HISTORY:
        raise ModelMetadataError(f"{path}: trained with window {meta['window']} / min_history "
                                 f"{meta['min_history']}, this gateway uses {WINDOW} / {MIN_HISTORY}")
    classes = meta["classes"].split(",")
    if NORMAL not in classes or len(classes) < 2:
        raise ModelMetadataError(f"{path}: classes {classes} must include {NORMAL!r} and at least one anomaly")
    return meta["name"], meta["version"], classes, float(meta["threshold"])
