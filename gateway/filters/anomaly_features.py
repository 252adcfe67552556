"""What "normal" is for one field of one device, learned online, and how far a new value is from it.

Shared by the gateway (gateway/filters/anomaly.py) and the training script (models/anomaly/train.py), so the model
is trained on exactly the numbers it is served. Changing anything here changes what the model means: retrain; the
detector refuses a model whose recorded feature names differ from `FEATURE_NAMES`.

Each series (a field of a device) keeps a few running statistics, updated in O(1) per value, with no window:

    level, spread       exponentially weighted mean and variance of the value (a memory of about SLOW values)
    fast mean           the same with a memory of about FAST values: a drift walks it away from the level
    noise               exponentially weighted |step| between consecutive values, slow and fast
    repeats, zeros      how often the series repeats its last value, or reads exactly 0.0, over all its values:
                        a counter that idles at 0.0 between bursts or a reading quantised to a few levels repeats
                        and reads 0.0 as a matter of routine, and must learn so, while a stuck sensor or a dropout
                        still stands out by the length of its run
    tails               its own 99th percentile of |deviation| and of |step|: real series are heavy-tailed, and a
                        deviation that is routine for one is an alarm for another
    daily profile       the mean and spread per hour of the day, once the series' timestamps span two days (load,
                        traffic and temperatures follow the clock)
    the last few values' deviations and steps
    binary              whether every value so far was exactly 0 or 1: such a field is a state (a door contact, a
                        motion sensor, a relay), which the detector does not judge; not a feature

A value is scored against the statistics as they were before it arrived; then it updates them. A value that looks
anomalous by itself (far off the level, a 0.0 where zeros are rare, a run of repeats where repeats are rare) does not
teach the level, spread, noise and fast mean (it still counts in the repeat and zero rates), so an anomaly cannot
make itself normal and its aftermath is judged against the history before it; a value that keeps looking like that
for HOLD values in a row is the new normal (a sensor moved, a set-point changed) and is learned from then on. Every
feature is scale-free (deviations in the series' own spread or noise, rates against the series' own rates), which is
what lets one model score fields it never saw. A series is "warming" (not scored) for its first WARMUP values.

About 3 us of Python per value; the state is a few floats per series, plus 72 once a daily profile starts.
"""

from __future__ import annotations

import math
from array import array

FEATURE_NAMES: tuple[str, ...] = (
    "z_level",  # (value - level) / spread
    "z_step",  # (value - previous value) / noise
    "z_drift",  # (fast mean - level) / spread: a walk away from normal
    "noise_ratio",  # log(fast noise / slow noise): a burst of extra noise
    "roughness",  # log(spread / noise): how much the series moves slowly besides its sample noise
    "repeat_run",  # log(1 + how many times in a row the value repeated exactly)
    "repeat_rarity",  # repeats in a row x how rarely this series repeats a value
    "is_zero",  # the value is exactly 0.0
    "zero_rarity",  # is_zero x how rarely this series reads 0.0
    "zero_distance",  # |level| / spread: how far normal is from 0 (a 0.0 far from it is a dropout)
    "z_daily",  # (value - this hour's mean) / this hour's spread; 0 until the daily profile is learned
    "daily_known",  # 1 once the hour of this value has a learned profile
    "level_tail",  # |z_level| against the series' own 99th percentile of it: how rare this deviation is here
    "step_tail",  # |z_step| against the series' own 99th percentile of it
    "z_fast",  # (value - fast mean) / spread: off the recent values, not only off the long-run level
    "z_prev",  # z_level of the previous value: the second value of a short spike
    "z_max3",  # the largest |z_level| of the last three values
    "step_mean4",  # mean |z_step| of the last four values: a noise burst is large steps in both directions
    "step_sign4",  # |sum of the signs of the last four steps| / 4: 1 for a ramp, near 0 for noise
)

SLOW = 64  # values of memory of the level, spread and noise
FAST = 6  # values of memory of the fast mean and the fast noise
WARMUP = 24  # values before a series is scored
CLIP = 5.0  # spreads off the level beyond which a value is suspect, and at which learning clips it
HOLD = 2 * SLOW  # suspect values in a row before they are taken for the new normal
HOURS = 24
DAILY_MIN = 8  # values seen in an hour of the day before its profile counts
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
TAIL_P = 0.01  # the tails tracked: the 99th percentiles

_A_SLOW = 2.0 / (SLOW + 1)
_A_FAST = 2.0 / (FAST + 1)
_A_DAILY = 0.1  # per value in an hour of the day: a few days of memory for 5-minute data
_TAIL_STEP = 0.05  # stochastic approximation of a quantile, on its logarithm (scale-free)
_TAIL_START = math.log(3.0)
_Z_CAP = 1e6


_log, _log1p, _exp, _sqrt = math.log, math.log1p, math.exp, math.sqrt
_LOG_CAP = math.log1p(_Z_CAP)

# The spike guard (`is_wild`): a value at least GUARD_Z spreads off its series' level AND at least GUARD_TAIL times
# the series' own 99th percentile of that deviation is a spike, whatever the network says. The network is not
# monotone in the size of a deviation: it learned from bursty training series that huge values can be routine, so a
# reading a million spreads off a calm series could score as normal. Both conditions, because a routine burst of a
# bursty series can be many spreads off but is within its own tail; a value far beyond anything the series has
# shown is not. In a young series the tail is still near its start (3 spreads), so GUARD_TAIL 5 asks for about 15
# spreads there, as GUARD_Z does; larger constants flag fewer normal values and miss spikes of 18 to 40 spreads in
# such a series (MODEL_CARD.md gives the guard's cost on NAB).
GUARD_Z = 15.0
GUARD_TAIL = 5.0
_GUARD_Z_LOG = _log1p(GUARD_Z)  # the features are signed log1p: compare them with the constants on that scale
_GUARD_TAIL_LOG = _log1p(GUARD_TAIL)
_Z_COL, _TAIL_COL = FEATURE_NAMES.index("z_level"), FEATURE_NAMES.index("level_tail")
_ZERO_COL = FEATURE_NAMES.index("is_zero")


def is_wild(f: tuple[float, ...]) -> bool:
    """The spike guard: the features `f` of a value (from `observe`) say it is far off its series both in the series'
    spread and against the series' own 99th percentile of deviation; it is flagged as a spike, P(anomaly) 1.0. A
    0.0 is left to the network: far off a level, it is a dropout, which the zero features tell apart."""
    z = f[_Z_COL]
    return (z >= _GUARD_Z_LOG or z <= -_GUARD_Z_LOG) and f[_TAIL_COL] >= _GUARD_TAIL_LOG and f[_ZERO_COL] == 0.0


def _slog(x: float) -> float:
    """Signed log1p, capped: keeps the order and sign of a ratio and tames its range (a flat history divides by
    almost nothing)."""
    if x >= 0.0:
        return _log1p(x) if x < _Z_CAP else _LOG_CAP
    return -_log1p(-x) if x > -_Z_CAP else -_LOG_CAP


class Series:
    """The running statistics of one field of one device."""

    __slots__ = ("n", "level", "var", "fast", "noise", "noise_fast", "last", "run", "repeat_rate", "zero_rate",
                 "tail_level", "tail_step", "z1", "z2", "steps", "signs", "held", "first_day", "daily", "binary")

    def __init__(self) -> None:
        self.n = 0
        self.level = self.var = self.fast = self.noise = self.noise_fast = self.last = 0.0
        self.run = 0  # repeats of the last value in a row
        self.repeat_rate = self.zero_rate = 0.0
        self.tail_level = self.tail_step = _TAIL_START  # logs of the tracked 99th percentiles of |z|, |z_step|
        self.z1 = self.z2 = 0.0  # z_level (signed log) of the previous two values
        self.steps = (0.0, 0.0, 0.0)  # |z_step| of the previous three values
        self.signs = (0, 0, 0)  # the signs of the previous three steps
        self.held = 0  # suspect values in a row (the first HOLD of them do not teach the statistics)
        self.first_day = -1
        self.daily: array | None = None  # per hour of the day: mean, mean square, count, once a second day is seen
        self.binary = True  # every value so far was 0 or 1


def observe(s: Series, x: float, ts_ms: int) -> tuple[float, ...] | None:
    """The features of value `x` at `ts_ms` against series `s`, then `s` updated with it. None while warming."""
    if s.binary and x != 0.0 and x != 1.0:
        s.binary = False
    n = s.n
    if n == 0:
        s.n = 1
        s.level = s.fast = s.last = x
        s.first_day = ts_ms // DAY_MS
        s.zero_rate = 1.0 if x == 0.0 else 0.0
        return None
    level, last = s.level, s.last
    # Floors: a perfectly flat history has neither spread nor noise; measure against a sliver of the level instead.
    floor = 1e-9 + 1e-6 * abs(level)
    noise = s.noise if s.noise > floor else floor
    spread = _sqrt(s.var)
    if spread < 0.5 * noise:
        spread = 0.5 * noise if 0.5 * noise > floor else floor
    dev = x - level
    z = dev / spread
    az = abs(z)
    step = x - last
    z_step = step / noise
    az_step = abs(z_step)
    step_sign = 1 if step > 0 else -1 if step < 0 else 0
    repeat = step == 0.0
    run = s.run + 1 if repeat else 0
    zero = 1.0 if x == 0.0 else 0.0
    hour = (ts_ms // HOUR_MS) % HOURS
    tail_level, tail_step = _exp(s.tail_level), _exp(s.tail_step)
    z_log = _slog(z)
    scored = n >= WARMUP
    features = None
    daily_dev = 0.0  # (value - this hour's mean) / this hour's spread, once the hour has a learned profile
    known = 0.0
    daily = s.daily
    if daily is not None and daily[2 * HOURS + hour] >= DAILY_MIN:
        mean = daily[hour]
        var = daily[HOURS + hour] - mean * mean
        sd = _sqrt(var) if var > 0.0 else 0.0
        if sd < 0.25 * spread:
            sd = 0.25 * spread
        daily_dev = (x - mean) / (sd if sd > floor else floor)
        known = 1.0
    if scored:
        z_daily = _slog(daily_dev)
        steps = s.steps
        signs = s.signs
        z1 = s.z1
        az1, az2, azl = abs(z1), abs(s.z2), abs(z_log)
        features = (
            z_log,
            _slog(z_step),
            _slog((s.fast - level) / spread),
            _log((s.noise_fast if s.noise_fast > floor else floor) / noise),
            _log(spread / noise),
            _log1p(run),
            run * (1.0 - s.repeat_rate),
            zero,
            zero * (1.0 - s.zero_rate),
            _slog(abs(level) / spread),
            z_daily,
            known,
            _slog(az / tail_level),
            _slog(az_step / tail_step),
            _slog((x - s.fast) / spread),
            z1,
            az1 if az1 >= az2 and az1 >= azl else az2 if az2 >= azl else azl,
            _slog((az_step + steps[0] + steps[1] + steps[2]) / 4.0),
            abs(step_sign + signs[0] + signs[1] + signs[2]) / 4.0,
        )
    u = x
    # Far off the level but where this hour of the day usually is (a working day's load, a night's cold) is normal
    # for this series: it teaches the level and spread, or a daily swing shorter than HOLD would never be learned.
    far = az > CLIP and not (known and -CLIP <= daily_dev <= CLIP)
    if scored and (far or (zero and s.zero_rate < 0.05) or (run >= 3 and s.repeat_rate < 0.3)):
        s.held += 1
    else:
        s.held = 0
    if s.held == 0 or s.held > HOLD:  # a suspect value is judged, not learned from, unless it has become the rule
        if scored:  # clipped, so one wild value moves the statistics only so far
            if z > CLIP:
                u = level + CLIP * spread
            elif z < -CLIP:
                u = level - CLIP * spread
        d = u - level
        s.level = level + _A_SLOW * d
        s.var = (1.0 - _A_SLOW) * (s.var + _A_SLOW * d * d)
        s.fast += _A_FAST * (u - s.fast)
        du = abs(u - last)
        s.noise += _A_SLOW * (du - s.noise)
        s.noise_fast += _A_FAST * (du - s.noise_fast)
    # Every value teaches the rates of repeats and zeros: learned only from values deemed normal, a series whose
    # zeros or repeats are frequent but scattered never learned that they are routine for it (each one looked
    # suspect), and flagged every one of them. A long run still stands out: repeat_run grows with it (repeat_rarity
    # peaks about SLOW / 2 values in, as the run itself teaches the rate).
    s.repeat_rate += _A_SLOW * ((1.0 if repeat else 0.0) - s.repeat_rate)
    s.zero_rate += _A_SLOW * (zero - s.zero_rate)
    if n >= WARMUP // 2:
        s.tail_level += _TAIL_STEP * ((1.0 if az > tail_level else 0.0) - TAIL_P)
        s.tail_step += _TAIL_STEP * ((1.0 if az_step > tail_step else 0.0) - TAIL_P)
    s.run = run
    s.last = x
    s.n = n + 1
    s.z2 = s.z1
    s.z1 = z_log
    steps = s.steps
    s.steps = (az_step, steps[0], steps[1])
    signs = s.signs
    s.signs = (step_sign, signs[0], signs[1])
    if ts_ms // DAY_MS > s.first_day:  # a second day: the daily profile starts, and stays for the series' life
        daily = s.daily
        if daily is None:
            daily = s.daily = array("d", [0.0] * (3 * HOURS))
        count = daily[2 * HOURS + hour]
        a = _A_DAILY if count >= 1.0 / _A_DAILY else 1.0 / (count + 1.0)
        daily[hour] += a * (u - daily[hour])
        daily[HOURS + hour] += a * (u * u - daily[HOURS + hour])
        daily[2 * HOURS + hour] = count + 1.0
    return features


def series_features(values: list[float], timestamps: list[int]) -> tuple[list[tuple[float, ...]], list[int]]:
    """A whole recorded series as the detector sees it value by value: the features of every scored value, and the
    index of each (the training script's view)."""
    s = Series()
    rows: list[tuple[float, ...]] = []
    at: list[int] = []
    for i, (x, ts) in enumerate(zip(values, timestamps)):
        f = observe(s, x, ts)
        if f is not None:
            rows.append(f)
            at.append(i)
    return rows, at
