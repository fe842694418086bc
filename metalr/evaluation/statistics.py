"""Statistics of the report: confidence intervals over seeds, paired comparisons, geometric means.

Everything here is a pure function of arrays, so each can be checked against scipy on fixed data
(``tests/evaluation/test_statistics.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Paired log-ratios are clipped here before ranking: a diverged run (loss = inf) must count as a large
# loss, not make every rank infinite. e^10 ~ 2e4x worse is far beyond any ratio between converged runs.
LOG_RATIO_CLIP = 10.0
Values = Sequence[float] | np.ndarray


def mean_ci(values: Values, confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval over seeds.

    Non-finite values (diverged runs) make the mean infinite rather than being dropped silently.

    Returns:
        ``(mean, half_width)``; the half-width is ``nan`` for fewer than two values.
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    if not np.all(np.isfinite(data)):
        return math.inf, math.nan
    mean = float(data.mean())
    if data.size < 2:
        return mean, math.nan
    sem = float(data.std(ddof=1)) / math.sqrt(data.size)
    return mean, float(stats.t.ppf(0.5 + confidence / 2, data.size - 1)) * sem


def bootstrap_ci(
    values: Values,
    statistic: Callable[[np.ndarray], np.ndarray] = lambda x: x.mean(axis=-1),
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``statistic`` (vectorised over the last axis).

    The same estimator as ``scipy.stats.bootstrap(..., method="percentile")``; written out so the
    resampling is seeded and cheap for the many small samples of a report.

    Example:
        >>> bootstrap_ci([1.0, 0.0, 1.0, 1.0], n_resamples=2000)   # win rate 0.75, CI around it
    """
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    resampled = data[rng.integers(0, data.size, size=(n_resamples, data.size))]
    estimates = statistic(resampled)
    alpha = (1 - confidence) / 2
    low, high = np.percentile(estimates, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def wilcoxon_p(differences: Values) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences (scipy's default method).

    All-zero differences (identical methods) give p = 1 instead of scipy's warning and ``nan``.
    """
    data = np.asarray(differences, dtype=float)
    if data.size == 0:
        return math.nan
    if np.all(data == 0):
        return 1.0
    return float(stats.wilcoxon(data, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_log_ratios(losses: Values, baseline_losses: Values) -> np.ndarray:
    """``log(loss / baseline_loss)`` per pair, scale-free across tasks; negative means better.

    Non-finite losses count as infinitely bad (two diverged runs tie), and the result is clipped to
    ``+-LOG_RATIO_CLIP`` so it can be ranked.
    """
    ours = _as_loss(losses)
    theirs = _as_loss(baseline_losses)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.log(ours) - np.log(theirs)
    ratio = np.where(np.isinf(ours) & np.isinf(theirs), 0.0, ratio)
    return np.clip(ratio, -LOG_RATIO_CLIP, LOG_RATIO_CLIP)


def _as_loss(values: Values) -> np.ndarray:
    data = np.asarray(values, dtype=float)
    data = np.where(np.isfinite(data), data, np.inf)
    # A loss of exactly 0 would make the log-ratio infinite; 1e-12 is below any loss a float32 run reports.
    return np.maximum(data, 1e-12)


@dataclass(frozen=True)
class PairedComparison:
    """A method against one baseline over paired (task, seed) runs.

    Attributes:
        pairs: number of paired runs.
        win_rate: fraction of pairs where the method's loss is lower (ties count one half).
        ci_low: lower end of the bootstrap confidence interval of the win rate.
        ci_high: upper end of that interval.
        p_value: two-sided Wilcoxon signed-rank p-value of the paired log-ratios.
        median_log_ratio: median of ``log(loss / baseline_loss)`` (negative = better).
    """

    pairs: int
    win_rate: float
    ci_low: float
    ci_high: float
    p_value: float
    median_log_ratio: float


def compare_paired(
    losses: Values,
    baseline_losses: Values,
    confidence: float = 0.95,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Win rate with a bootstrap CI and a Wilcoxon p-value for paired losses (lower is better)."""
    if len(losses) != len(baseline_losses):
        raise ValueError(f"paired samples differ in length: {len(losses)} vs {len(baseline_losses)}")
    ratios = paired_log_ratios(losses, baseline_losses)
    if ratios.size == 0:
        return PairedComparison(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    wins = np.where(ratios < 0, 1.0, np.where(ratios == 0, 0.5, 0.0))
    low, high = bootstrap_ci(wins, confidence=confidence, n_resamples=n_resamples, seed=seed)
    return PairedComparison(
        pairs=int(ratios.size),
        win_rate=float(wins.mean()),
        ci_low=low,
        ci_high=high,
        p_value=wilcoxon_p(ratios),
        median_log_ratio=float(np.median(ratios)),
    )


def geometric_mean(values: Values) -> float:
    """Geometric mean of positive finite values (``nan`` when there are none)."""
    data = np.asarray([v for v in values if math.isfinite(v) and v > 0], dtype=float)
    return float(np.exp(np.log(data).mean())) if data.size else math.nan


def finite_median(values: Values) -> float:
    """Median where non-finite values count as +infinity (a diverged or never-finishing run)."""
    data = np.asarray(values, dtype=float)
    if data.size == 0:
        return math.nan
    return float(np.median(np.where(np.isnan(data), np.inf, data)))


def lower_median(values: Values) -> float:
    """The lower middle value (an element of the data; non-finite counts as +infinity).

    For times-to-target over seeds this is "the time by which at least half of the seeds got there": with an
    even number of seeds the ordinary median of ``[40, inf]`` would be ``inf`` although one seed succeeded.
    """
    data = np.sort(
        np.where(np.isnan(np.asarray(values, dtype=float)), np.inf, np.asarray(values, dtype=float))
    )
    return float(data[(data.size - 1) // 2]) if data.size else math.nan
