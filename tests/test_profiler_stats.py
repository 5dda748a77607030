"""Trial statistics: median, p5/p95, the noisy flag, and the minimum number of trials."""

import math

import pytest

from profilers.trial_stats import MIN_TRIALS, NOISY_SPREAD, repeat, summarize


def test_median_and_percentiles_of_known_samples():
    stats = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    assert stats.median == 3.0
    assert stats.p5 == pytest.approx(1.2)
    assert stats.p95 == pytest.approx(4.8)
    assert stats.trials == 5


def test_tight_samples_are_not_noisy():
    assert not summarize([100.0, 101.0, 99.0, 100.5, 100.2]).noisy


def test_spread_above_threshold_is_noisy():
    # p95 - p5 about 40% of the median, twice the threshold.
    stats = summarize([80.0, 90.0, 100.0, 110.0, 120.0])
    assert stats.spread > NOISY_SPREAD
    assert stats.noisy


def test_fewer_than_min_trials_is_refused():
    with pytest.raises(ValueError, match="at least 5"):
        summarize([1.0] * (MIN_TRIALS - 1))


def test_non_finite_sample_is_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        summarize([1.0, 2.0, math.inf, 3.0, 4.0])


def test_repeat_discards_warmup_calls():
    calls = iter([1000.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    stats = repeat(lambda: next(calls), trials=5, warmup=1)
    assert stats.median == 1.0 and stats.p95 == 1.0


def test_repeat_refuses_too_few_trials():
    with pytest.raises(ValueError, match="at least 5"):
        repeat(lambda: 1.0, trials=3)
