"""Repeated measurements reduced to median, p5 and p95, with a flag when the spread is large.

Only the arithmetic of trials lives here; it must not know what is being measured or how.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_TRIALS = 5
# A run is called noisy when the p5..p95 band is wider than 20% of the median: on a quiet machine
# repeated bandwidth and latency trials agree within a few percent, so a wider band means another
# process, frequency scaling or page migration interfered and the number should be rerun.
NOISY_SPREAD = 0.20


@dataclass(frozen=True)
class TrialStats:
    """Median and 5th/95th percentiles of ``trials`` samples, in the caller's unit.

    ``noisy`` is True when ``(p95 - p5) / median > NOISY_SPREAD`` (0.20).

    >>> s = summarize([10.0, 11.0, 9.0, 10.0, 10.0])
    >>> (s.median, s.trials, s.noisy)
    (10.0, 5, False)
    """

    median: float
    p5: float
    p95: float
    trials: int
    noisy: bool

    @property
    def spread(self) -> float:
        """``(p95 - p5) / median``; infinite when the median is 0."""
        if self.median == 0:
            return math.inf
        return (self.p95 - self.p5) / abs(self.median)


def summarize(samples: Sequence[float]) -> TrialStats:
    """Reduce samples (at least MIN_TRIALS finite numbers) to a TrialStats.

    >>> summarize([1, 2, 3, 4, 100]).noisy
    True
    >>> summarize([1.0, 2.0])
    Traceback (most recent call last):
    ...
    ValueError: 2 trials given; a statistic needs at least 5 (raise --trials)
    """
    values = np.asarray(samples, dtype=np.float64)
    if values.size < MIN_TRIALS:
        raise ValueError(
            f"{values.size} trials given; a statistic needs at least {MIN_TRIALS} (raise --trials)"
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"trial samples {values.tolist()} include NaN or inf; the timer failed")
    median = float(np.median(values))
    p5, p95 = (float(x) for x in np.percentile(values, [5, 95]))
    spread = math.inf if median == 0 else (p95 - p5) / abs(median)
    return TrialStats(
        median=median, p5=p5, p95=p95, trials=int(values.size), noisy=spread > NOISY_SPREAD
    )


def repeat(
    measure: Callable[[], float], *, trials: int = MIN_TRIALS, warmup: int = 1
) -> TrialStats:
    """Call ``measure`` ``warmup`` times (discarded), then ``trials`` times, and summarize.

    >>> repeat(lambda: 2.5, trials=5).median
    2.5
    """
    if trials < MIN_TRIALS:
        raise ValueError(f"trials = {trials}; write at least {MIN_TRIALS}")
    if warmup < 0:
        raise ValueError(f"warmup = {warmup}; write 0 or more")
    for _ in range(warmup):
        measure()
    return summarize([measure() for _ in range(trials)])
