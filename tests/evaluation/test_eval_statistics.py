"""Statistics of the report against scipy (and hand-computed values) on fixed data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from metalr.evaluation.statistics import (
    LOG_RATIO_CLIP,
    bootstrap_ci,
    compare_paired,
    geometric_mean,
    lower_median,
    mean_ci,
    paired_log_ratios,
    wilcoxon_p,
)

DIFFERENCES = [0.31, -0.12, 0.45, 0.08, 0.27, -0.05, 0.52, 0.19, 0.33, -0.21, 0.14, 0.4]


def test_wilcoxon_matches_scipy_on_fixed_data() -> None:
    expected = stats.wilcoxon(DIFFERENCES, alternative="two-sided").pvalue
    assert wilcoxon_p(DIFFERENCES) == pytest.approx(expected, rel=1e-12)


def test_wilcoxon_exact_small_sample_by_hand() -> None:
    # Five positive differences: the exact two-sided p is 2 / 2^5 (only the all-positive sign pattern is as
    # extreme on each side).
    assert wilcoxon_p([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(2 / 32)


def test_wilcoxon_identical_methods_is_one_not_nan() -> None:
    assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
    assert math.isnan(wilcoxon_p([]))


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap() -> None:
    wins = np.array([1, 1, 0, 1, 0.5, 1, 0, 1, 1, 0, 1, 1, 0, 1, 1, 0.5, 1, 0, 1, 1], dtype=float)
    ours = bootstrap_ci(wins, confidence=0.95, n_resamples=20_000, seed=3)
    reference = stats.bootstrap(
        (wins,),
        np.mean,
        confidence_level=0.95,
        n_resamples=20_000,
        method="percentile",
        random_state=np.random.default_rng(7),
    ).confidence_interval
    # Two Monte-Carlo estimates of the same percentiles: equal up to resampling noise (and the 1/40 grid of
    # possible means of 20 values with half-wins).
    assert ours[0] == pytest.approx(reference.low, abs=0.03)
    assert ours[1] == pytest.approx(reference.high, abs=0.03)
    assert ours[0] <= wins.mean() <= ours[1]


def test_bootstrap_ci_is_deterministic_and_degenerate_for_constant_data() -> None:
    assert bootstrap_ci([0.3, 0.9, 0.4], seed=1) == bootstrap_ci([0.3, 0.9, 0.4], seed=1)
    assert bootstrap_ci([1.0, 1.0, 1.0]) == (1.0, 1.0)


def test_mean_ci_matches_scipy_t_interval() -> None:
    values = [0.51, 0.47, 0.55, 0.49, 0.53]
    mean, half = mean_ci(values, 0.95)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert mean - half == pytest.approx(low)
    assert mean + half == pytest.approx(high)
    assert math.isnan(mean_ci([0.5])[1])
    assert mean_ci([0.5, math.inf])[0] == math.inf


def test_paired_comparison_counts_ties_as_half_and_divergence_as_loss() -> None:
    ours = [0.5, 0.4, 1.0, math.nan, math.inf]
    theirs = [1.0, 0.4, 0.5, 0.3, math.nan]
    ratios = paired_log_ratios(ours, theirs)
    assert ratios.tolist() == pytest.approx([math.log(0.5), 0.0, math.log(2.0), LOG_RATIO_CLIP, 0.0])
    comparison = compare_paired(ours, theirs, n_resamples=1000)
    assert comparison.pairs == 5
    assert comparison.win_rate == pytest.approx((1 + 0.5 + 0 + 0 + 0.5) / 5)
    assert comparison.ci_low <= comparison.win_rate <= comparison.ci_high
    assert comparison.p_value == pytest.approx(stats.wilcoxon(ratios).pvalue)


def test_geometric_mean_and_lower_median() -> None:
    assert geometric_mean([2.0, 8.0, math.inf, math.nan]) == pytest.approx(4.0)
    assert math.isnan(geometric_mean([]))
    assert lower_median([40.0, math.inf]) == 40.0
    assert lower_median([30.0, math.inf, math.inf]) == math.inf
    assert lower_median([10.0, 30.0, 20.0]) == 20.0
