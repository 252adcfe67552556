"""Scale-free features of one sample against its own field's recent history. Shared by training and inference.

The anomaly model never sees a raw value. Every feature compares the newest sample of a series (one field of one
device) with that series' own recent window: deviations are measured in the series' own noise or spread, repeats
against the series' own repeat rate, zeros against the series' own level. That is what lets one model score fields
it never saw in training (a flow in L/min around 350 scores like a temperature around 21 °C).

A window is a row of the last `n` values of a series, oldest first, the sample being scored last, with
`MIN_HISTORY <= n <= WINDOW`. `window_features` takes many windows of the same length at once (the hot path scores a
micro-batch as one matrix); `series_features` slides over a whole recorded series the way the detector would have
seen it sample by sample, which is how the training script builds its data. Changing anything here changes what the
model means: retrain, and the detector refuses a model whose recorded feature names differ from `FEATURE_NAMES`.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

WINDOW = 48  # values per window, the scored one included
MIN_HISTORY = 12  # a series is scored from its 12th value on ("warming" before that)
RECENT = 8  # the "recent" part of a window; the rest is the "older" part

FEATURE_NAMES: tuple[str, ...] = (
    "z_level",  # value vs the window's median, in the window's robust spread (MAD)
    "z_noise",  # the same deviation in units of the window's sample-to-sample noise
    "z_step",  # the last step in noise units: spikes and dropouts start with a jump
    "z_local",  # value vs the median of the recent part, in noise units
    "roughness",  # spread / noise: how much slow movement (daily cycle, walk) the window has
    "repeat_run",  # how many samples in a row repeated exactly the current value
    "repeat_base",  # how often consecutive values are equal elsewhere in the window (quantised sensors repeat)
    "is_zero",  # the value is exactly 0.0
    "zero_distance",  # how far the window's median lives from 0, in its spread
    "zeros_recent",  # share of exact zeros among the recent values
    "zeros_older",  # share of exact zeros in the older part
    "burst",  # RMS of the recent steps over the window's noise
    "outliers_recent",  # share of recent values beyond 3 spreads of the median
    "slope_t",  # least-squares slope over the last 16 values, as total change in noise units
    "trend_z",  # mean of the recent part vs median of the older part, in noise units
    "monotony",  # how consistently the last 16 steps go the same way (drifts do)
    "burst_short",  # RMS of the last 3 steps over the window's noise
    "z_line",  # value vs a line through the last 15 values, extrapolated, in noise units
    "fill",  # how full the window is (n / WINDOW); statistics of short windows are noisier
)

_SLOPE_SPAN = 16
_Z_CAP = 1e6  # before the log: keeps a perfectly flat history from producing infinities
_LOG_CAP = float(np.log1p(_Z_CAP))


def _slog(x: np.ndarray) -> np.ndarray:
    """Signed log1p: keeps the order and sign of a ratio, tames its range (a stuck history divides by ~0)."""
    x = np.minimum(np.maximum(x, -_Z_CAP), _Z_CAP)  # np.clip, without its Python-level wrapper
    return np.sign(x) * np.log1p(np.abs(x))


def _median(x: np.ndarray) -> np.ndarray:
    """The median of each row, bit for bit what np.median(x, axis=1) gives for finite values, at a fraction of its
    cost: one partition at the middle (two for an even length, averaged as np.median averages them)."""
    m = x.shape[1]
    half = m // 2
    if m % 2:
        return np.partition(x, half, axis=1)[:, half]
    part = np.partition(x, (half - 1, half), axis=1)
    return (part[:, half - 1] + part[:, half]) / 2.0


def _repeat_run(hist: np.ndarray, v: np.ndarray) -> np.ndarray:
    """How many values at the end of each history row equal the row's `v` exactly, counting back from the end."""
    differs = hist[:, ::-1] != v[:, None]
    # argmax finds the first differing value counting back; a row where none differs repeats all the way.
    return np.where(differs.any(axis=1), differs.argmax(axis=1), hist.shape[1])


# Where each feature lands in the output. The ratio features are computed as one matrix each for the "in noise
# units" and the "in spread units" ones, then go through one signed log: with the few rows of a micro-batch,
# numpy's cost per call, not the arithmetic, is what a feature costs (for 28 rows, 208 -> 129 us).
_COL = {name: i for i, name in enumerate(FEATURE_NAMES)}
_PER_NOISE = ("z_noise", "z_step", "z_local", "roughness", "burst", "slope_t", "trend_z", "burst_short", "z_line")
_PER_SPREAD = ("z_level", "zero_distance")
_RATIO_COLS = np.array([_COL[name] for name in _PER_NOISE + _PER_SPREAD])
_N = {name: i for i, name in enumerate(_PER_NOISE)}  # columns of the numerators divided by the noise
_S = {name: i for i, name in enumerate(_PER_SPREAD)}  # and by the spread


@lru_cache(maxsize=None)
def _centred_ramp(length: int) -> tuple[np.ndarray, float]:
    """0..length-1 minus its mean, and its dot product with itself: the fixed half of a least-squares slope."""
    x = np.arange(length, dtype=np.float64)
    x -= x.mean()
    return x, float(x @ x)


def window_features(windows: np.ndarray) -> np.ndarray:
    """Features of the last value of each row. `windows`: (rows, n) float64, oldest first. Returns (rows, F) float32.

    Means are written as sums divided by the count: that is what numpy's mean computes, bit for bit, without its
    Python-level overhead.
    """
    w = np.asarray(windows, dtype=np.float64)
    rows, n = w.shape
    if not MIN_HISTORY <= n <= WINDOW:
        raise ValueError(f"window length must be within [{MIN_HISTORY}, {WINDOW}], got {n}")
    if rows == 0:
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)

    out = np.empty((rows, len(FEATURE_NAMES)), dtype=np.float64)
    per_noise = np.empty((rows, len(_PER_NOISE)), dtype=np.float64)  # numerators, divided by the noise below
    per_spread = np.empty((rows, len(_PER_SPREAD)), dtype=np.float64)
    with np.errstate(all="ignore"):
        v = w[:, -1]
        hist = w[:, :-1]
        med = _median(hist)
        tiny = 1e-9 * (1.0 + np.abs(med))  # a flat history still gets a (tiny) positive scale

        steps = np.diff(w, axis=1)  # (rows, n-1); the last one ends at the scored value
        hist_steps = np.sort(np.abs(steps[:, :-1]), axis=1)
        k = hist_steps.shape[1]
        # Sample-to-sample noise from the history's steps, robust to a burst filling half the window or more: the
        # lower quartile step and the mean of the lower half (both ~1/3 of the typical step for Gaussian noise).
        # A quantised sensor whose steps are mostly 0 falls back to a fraction of the mean step.
        noise = np.maximum(3.0 * hist_steps[:, k // 4], 3.0 * (hist_steps[:, : k // 2].sum(axis=1) / (k // 2)))
        noise = np.maximum(np.maximum(noise, 0.5 * (hist_steps.sum(axis=1) / k)), tiny)
        # The spread of levels is at least the noise: a quantised history can have a MAD of exactly 0.
        spread = np.maximum(1.4826 * _median(np.abs(hist - med[:, None])), noise)

        dev = v - med
        per_spread[:, _S["z_level"]] = dev
        per_spread[:, _S["zero_distance"]] = np.abs(med)
        per_noise[:, _N["z_noise"]] = dev
        per_noise[:, _N["z_step"]] = steps[:, -1]
        per_noise[:, _N["z_local"]] = v - _median(hist[:, -RECENT:])
        per_noise[:, _N["roughness"]] = spread

        # How many values right before the scored one equal it exactly (0 = no repeat).
        run = _repeat_run(hist, v)
        out[:, _COL["repeat_run"]] = np.log1p(run)
        zero_steps = (steps == 0.0).sum(axis=1)
        out[:, _COL["repeat_base"]] = (zero_steps - run) / np.maximum(n - 1 - run, 1)

        zero = w == 0.0
        out[:, _COL["is_zero"]] = zero[:, -1]
        out[:, _COL["zeros_recent"]] = zero[:, -RECENT:].sum(axis=1, dtype=np.float64) / RECENT
        out[:, _COL["zeros_older"]] = zero[:, :-RECENT].sum(axis=1, dtype=np.float64) / (n - RECENT)

        per_noise[:, _N["burst"]] = np.sqrt((steps[:, -RECENT:] ** 2).sum(axis=1) / RECENT)
        out[:, _COL["outliers_recent"]] = (np.abs(w[:, -RECENT:] - med[:, None]) > 3.0 * spread[:, None]).sum(
            axis=1, dtype=np.float64) / RECENT

        span = min(_SLOPE_SPAN, n)
        x, xx = _centred_ramp(span)
        tail = w[:, -span:]
        slope = (tail - tail.sum(axis=1, keepdims=True) / span) @ x / xx
        per_noise[:, _N["slope_t"]] = slope * span  # the total change over the span
        per_noise[:, _N["trend_z"]] = w[:, -RECENT:].sum(axis=1) / RECENT - _median(w[:, :-RECENT])
        out[:, _COL["monotony"]] = np.abs(np.sign(steps[:, -(span - 1):]).sum(axis=1) / (span - 1))
        per_noise[:, _N["burst_short"]] = np.sqrt((steps[:, -3:] ** 2).sum(axis=1) / 3)

        # The value against a straight line through the values before it, extrapolated one step: a slow trend
        # (the daily cycle at long sample intervals) moves the median but not this.
        prev = hist[:, -(span - 1):]
        xp, xpxp = _centred_ramp(span - 1)
        prev_mean = prev.sum(axis=1) / (span - 1)
        prev_slope = (prev - prev_mean[:, None]) @ xp / xpxp
        per_noise[:, _N["z_line"]] = v - (prev_mean + prev_slope * (xp[-1] + 1.0))

        out[:, _RATIO_COLS] = _slog(np.concatenate((per_noise / noise[:, None], per_spread / spread[:, None]),
                                                   axis=1))
        out[:, _COL["fill"]] = n / WINDOW
    # Only absurd inputs (values near the float limits) get here; they must not poison the model's input. The check
    # first: nan_to_num costs more than all the ratio features together and almost never has anything to do.
    if not np.isfinite(out).all():
        np.nan_to_num(out, copy=False, nan=0.0, posinf=_LOG_CAP, neginf=-_LOG_CAP)
    return out.astype(np.float32)


def series_features(values: np.ndarray) -> np.ndarray:
    """Features of every scorable sample of one series, as the detector would have computed them one by one.

    Row `i` describes sample `MIN_HISTORY - 1 + i`: its window is the up to `WINDOW` values ending there.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError("a series is one-dimensional")
    parts = [window_features(x[None, : end + 1]) for end in range(MIN_HISTORY - 1, min(WINDOW - 1, len(x)))]
    if len(x) >= WINDOW:
        parts.append(window_features(sliding_window_view(x, WINDOW)))
    if not parts:
        return np.empty((0, len(FEATURE_NAMES)), dtype=np.float32)
    return np.concatenate(parts)
