"""From run records to the protocol's numbers: tuning selection, targets, time-to-target, profiles, scores.

Everything is computed from ``results.jsonl`` alone (each record carries the protocol it was run under),
so ``metalr report DIR`` can re-derive every number without the suite file.

Definitions (issue 7, after MLCommons AlgoPerf, Dahl et al. 2023, "Benchmarking Neural Network Training
Algorithms"):

* *reported runs* of a method on a task: for a tuned method, the grid point with the lowest median final
  ``inner_valid`` loss over seeds (nothing selects on ``test``); for a self-tuning method, its default runs;
  with tuning off, every method's default runs;
* *target* of a task: the reference method's (tuned cosine's) median final ``inner_valid`` loss, or the best
  such median over the tuned baselines (``target: best_baseline``);
* *time-to-target* of a run: the first evaluation step (and training seconds) at which ``inner_valid`` loss
  is at or below the target; ``inf`` when never; per (task, method): the lower median over seeds (the time by
  which half of the seeds got there);
* *performance profile*: ``rho_m(tau)`` = fraction of tasks where ``t_m / min_m' t_m' <= tau``;
  *AlgoPerf-style score*: the integral of ``rho_m`` over ``[1, r_max]`` divided by ``r_max - 1``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from metalr.evaluation.records import ReportProtocol, RunRecord, same_lr
from metalr.evaluation.statistics import (
    PairedComparison,
    compare_paired,
    finite_median,
    geometric_mean,
    lower_median,
)

Record = RunRecord  # the analysis reads typed records (metalr.evaluation.records)
RunKey = tuple[str, str, float]  # (task key, method label, horizon)


@dataclass(frozen=True)
class Resources:
    """What a method cost, medians over its reported runs (NaN where not measured, e.g. version-1 records)."""

    seconds_per_1k_steps: float  # training seconds per 1000 steps
    optimizer_state_mb: float  # tensor bytes of the optimizer state at the end of a run
    rss_growth_mb: float  # peak RSS during a run's training loop minus RSS at its start
    peak_rss_mb: float  # the worker's peak RSS (imports and cached datasets included)
    peak_cuda_mb: float  # the largest peak CUDA memory of any reported run


# ----------------------------------------------------------------------------------------------------------
# Single runs


def final_valid_loss(record: Record) -> float:
    value = float(record.final_valid.get("loss", math.inf))
    return value if math.isfinite(value) else math.inf


def final_test(record: Record, metric: str = "loss") -> float:
    value = record.final_test.get(metric)
    if value is None:
        return math.nan
    value = float(value)
    return value if math.isfinite(value) or metric != "loss" else math.inf


def is_diverged(record: Record, ratio: float = 1.0) -> bool:
    """Non-finite loss, or final validation loss above ``ratio`` x the initial one (issue 7's definition)."""
    return record.nonfinite or final_valid_loss(record) > ratio * record.initial_valid_loss


def time_to_target(record: Record, target: float) -> tuple[float, float]:
    """``(steps, training seconds)`` at the first evaluation with ``inner_valid`` loss <= ``target``.

    The evaluation before the first step does not count: the target must be reached by training (and a
    time of 0 would make every ratio undefined).
    """
    if not math.isfinite(target):
        return math.inf, math.inf
    for point in record.valid:
        loss = point.get("loss")
        if point["step"] <= 0:
            continue
        if loss is not None and math.isfinite(loss) and loss <= target:
            return float(point["step"]), float(point["train_seconds"])
    return math.inf, math.inf


def lr_roughness(record: Record) -> float:
    """Mean |change of ln LR| per step: 0 for a constant LR, small for smooth decay, large for jitter."""
    trace = np.asarray(record.lr_trace, dtype=float)
    trace = trace[np.isfinite(trace) & (trace > 0)]
    return float(np.abs(np.diff(np.log(trace))).mean()) if trace.size > 1 else 0.0


def select_lr(grid_runs: Iterable[Record]) -> float | None:
    """The grid LR with the lowest median final ``inner_valid`` loss over seeds (ties: the lower LR)."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for record in grid_runs:
        by_lr[record.lr].append(final_valid_loss(record))
    if not by_lr:
        return None
    return min(sorted(by_lr), key=lambda lr: finite_median(by_lr[lr]))


# ----------------------------------------------------------------------------------------------------------
# Profiles and scores (pure functions of time-to-target tables, tested on hand-made numbers)


def performance_ratios(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``times[method][task]`` -> ``ratio[method][task]`` = time / fastest method's time on that task.

    A task no method reaches gives every method ``inf``.
    """
    tasks = sorted({task for per_task in times.values() for task in per_task})
    ratios: dict[str, dict[str, float]] = {method: {} for method in times}
    for task in tasks:
        best = min((per_task.get(task, math.inf) for per_task in times.values()), default=math.inf)
        for method, per_task in times.items():
            elapsed = per_task.get(task, math.inf)
            reached = math.isfinite(best) and math.isfinite(elapsed)
            ratios[method][task] = elapsed / best if reached else math.inf
    return ratios


def performance_profile(ratios: dict[str, float], taus: Sequence[float]) -> np.ndarray:
    """``rho(tau)``: the fraction of tasks whose ratio is at most ``tau``, for each ``tau``."""
    values = np.asarray(list(ratios.values()), dtype=float)
    if values.size == 0:
        return np.full(len(taus), math.nan)
    return np.asarray([(values <= tau).mean() for tau in taus])


def algoperf_score(ratios: dict[str, float], max_ratio: float = 4.0) -> float:
    """Integral of the performance profile over ``[1, max_ratio]``, divided by ``max_ratio - 1``.

    ``rho`` is a step function, so the integral is exact: a task with ratio ``r <= max_ratio`` contributes
    ``(max_ratio - r) / (max_ratio - 1)`` (1 for the fastest method), a slower or failed task 0.
    """
    values = np.asarray(list(ratios.values()), dtype=float)
    if values.size == 0:
        return math.nan
    within = np.where(values <= max_ratio, (max_ratio - values) / (max_ratio - 1), 0.0)
    return float(within.mean())


# ----------------------------------------------------------------------------------------------------------
# The whole analysis


def latest_protocol(records: Sequence[Record]) -> ReportProtocol:
    """The protocol of the most recently written record (a suite may have changed between re-runs)."""
    return records[-1].protocol if records else ReportProtocol()


@dataclass
class Analysis:
    """Indexes the records once and answers every question the report asks.

    Attributes:
        records: every run, deduplicated by cell key.
        protocol: the protocol of the most recent run.
        methods: method labels, in the suite's order.
        tuned: method label -> tuned over the LR grid.
        tasks: task keys, in the order they first appear.
        task_labels: task key -> short label.
        horizons: step-budget scales present (1.0 first).
    """

    records: list[Record]
    protocol: ReportProtocol = field(init=False)
    methods: list[str] = field(init=False)
    tuned: dict[str, bool] = field(init=False)
    tasks: list[str] = field(init=False)
    task_labels: dict[str, str] = field(init=False)
    horizons: list[float] = field(init=False)

    def __post_init__(self) -> None:
        self.protocol = latest_protocol(self.records)
        seen = [r.method for r in self.records]
        self.methods = [m for m in self.protocol.methods if m in seen] + sorted(
            set(seen) - set(self.protocol.methods)
        )
        self.tuned = {r.method: r.tuned for r in self.records}
        self.tasks = list(dict.fromkeys(r.task_key for r in self.records))
        self.task_labels = _unique_labels({r.task_key: r.task_label for r in self.records}, self.tasks)
        self.horizons = sorted({r.horizon for r in self.records}, key=lambda h: (h != 1.0, h))
        self._runs: dict[tuple[str, str, float, str], list[Record]] = defaultdict(list)
        for record in self.records:
            self._runs[(record.task_key, record.method, record.horizon, record.lr_source)].append(record)
        for record in self.records:
            # The grid run at the task's default LR is also its default-LR run (planned once: plan_cells).
            # Results from before that rule hold both runs of a seed; the default-LR one is kept.
            default = (record.task_key, record.method, record.horizon, "default")
            if (
                record.lr_source == "grid"
                and same_lr(record.lr, record.default_lr)
                and all(r.seed != record.seed for r in self._runs.get(default, []))
            ):
                self._runs[default].append(record)
        for runs in self._runs.values():
            runs.sort(key=lambda r: (r.lr, r.seed))
        self._reported: dict[RunKey, tuple[list[Record], float | None]] = {}
        self._targets: dict[tuple[str, float], float] = {}
        self._times: dict[str, tuple[float, float]] = {}
        self._tables: dict[tuple[float, bool], dict[str, dict[str, float]]] = {}

    # -- runs -------------------------------------------------------------------------------------------

    def runs(self, task: str, method: str, horizon: float, source: str) -> list[Record]:
        return self._runs.get((task, method, horizon, source), [])

    def grid_runs(self, task: str, method: str, horizon: float = 1.0) -> list[Record]:
        return self.runs(task, method, horizon, "grid")

    def selected_lr(self, task: str, method: str, horizon: float = 1.0) -> float | None:
        """The LR tuned on ``inner_valid`` (None for untuned reporting)."""
        return self.reported(task, method, horizon)[1]

    def reported(self, task: str, method: str, horizon: float = 1.0) -> tuple[list[Record], float | None]:
        """The runs reported for a method on a task, and the tuned LR they used (None: default LR).

        A partial evaluation (interrupted before the grid finished) falls back to the default-LR runs, so a
        report can always be drawn; the selection itself only ever looks at ``inner_valid``.
        """
        index = (task, method, horizon)
        if index not in self._reported:
            chosen: tuple[list[Record], float | None] = (
                _one_per_seed(self.runs(task, method, horizon, "default")),
                None,
            )
            if self.protocol.tune and self.tuned.get(method, False):
                lr = select_lr(self.grid_runs(task, method, horizon))
                if lr is not None:
                    chosen = (
                        _one_per_seed([r for r in self.grid_runs(task, method, horizon) if r.lr == lr]),
                        lr,
                    )
                elif horizon != 1.0:
                    # Other horizons reuse the LR tuned at 1x; runs at any other LR are from an older suite.
                    lr = select_lr(self.grid_runs(task, method))
                    transfer = [r for r in self.runs(task, method, horizon, "transfer") if r.lr == lr]
                    if transfer:
                        chosen = (_one_per_seed(transfer), lr)
            self._reported[index] = chosen
        return self._reported[index]

    def reported_runs(self, task: str, method: str, horizon: float = 1.0) -> list[Record]:
        return self.reported(task, method, horizon)[0]

    def tuning_cost(self, method: str) -> float:
        """Runs per task that produced the reported result (grid points x seeds, or just the seeds)."""
        counts = []
        for task in self.tasks:
            if self.protocol.tune and self.tuned.get(method, False) and self.grid_runs(task, method):
                counts.append(len(self.grid_runs(task, method)))
            else:
                counts.append(len(self.reported_runs(task, method)))
        return float(np.mean(counts)) if counts else math.nan

    # -- targets and time-to-target ---------------------------------------------------------------------

    def target(self, task: str, horizon: float = 1.0) -> float:
        index = (task, horizon)
        if index not in self._targets:
            if self.protocol.target == "best_baseline":
                baselines = [m for m in self.methods if self.tuned.get(m, False)] or [self.protocol.reference]
            else:
                baselines = [self.protocol.reference]
            medians = [
                finite_median([final_valid_loss(r) for r in self.reported_runs(task, m, horizon)])
                for m in baselines
            ]
            finite = [v for v in medians if math.isfinite(v)]
            self._targets[index] = min(finite) if finite else math.nan
        return self._targets[index]

    def run_time_to_target(self, record: Record) -> tuple[float, float]:
        key = record.key
        if key not in self._times:
            self._times[key] = time_to_target(record, self.target(record.task_key, record.horizon))
        return self._times[key]

    def median_time_to_target(self, runs: Sequence[Record]) -> tuple[float, float]:
        """(steps, seconds) by which at least half of the seeds reached the target (the lower median).

        ``inf`` when more than half never reach it.
        """
        if not runs:
            return math.inf, math.inf
        times = [self.run_time_to_target(r) for r in runs]
        return lower_median([t[0] for t in times]), lower_median([t[1] for t in times])

    def steps_table(self, horizon: float = 1.0, seconds: bool = False) -> dict[str, dict[str, float]]:
        """``method -> task -> median steps (or seconds) to target`` at ``horizon``."""
        if (horizon, seconds) not in self._tables:
            column = 1 if seconds else 0
            self._tables[horizon, seconds] = {
                m: {
                    t: self.median_time_to_target(self.reported_runs(t, m, horizon))[column]
                    for t in self.tasks
                }
                for m in self.methods
            }
        return self._tables[horizon, seconds]

    def ratios(self, horizon: float = 1.0) -> dict[str, dict[str, float]]:
        return performance_ratios(self.steps_table(horizon))

    def scores(self, horizon: float = 1.0) -> dict[str, float]:
        return {
            m: algoperf_score(r, self.protocol.profile_max_ratio) for m, r in self.ratios(horizon).items()
        }

    def reached(self, method: str, horizon: float = 1.0) -> int:
        """Tasks on which the method's median time-to-target is finite."""
        return sum(math.isfinite(v) for v in self.steps_table(horizon)[method].values())

    def speedup(
        self, method: str, reference_source: str = "tuned", horizon: float = 1.0
    ) -> tuple[float, int]:
        """Geometric-mean speed-up in steps-to-target over the reference, over tasks both reach.

        Args:
            method: the method label.
            reference_source: ``"tuned"`` (the reference's reported runs) or ``"default"`` (its default LR).
            horizon: step-budget scale.

        Returns:
            ``(geometric mean of t_reference / t_method, number of tasks it averages over)``.
        """
        reference = self.protocol.reference
        values = []
        for task in self.tasks:
            ref_runs = (
                self.reported_runs(task, reference, horizon)
                if reference_source == "tuned"
                else self.runs(task, reference, horizon, "default")
            )
            ref_steps = self.median_time_to_target(ref_runs)[0]
            steps = self.median_time_to_target(self.reported_runs(task, method, horizon))[0]
            if math.isfinite(ref_steps) and math.isfinite(steps) and steps > 0:
                values.append(ref_steps / steps)
        return geometric_mean(values), len(values)

    # -- paired comparisons -----------------------------------------------------------------------------

    def paired_losses_on(
        self, task: str, method: str, baseline: str, horizon: float = 1.0
    ) -> tuple[list[float], list[float]]:
        """Final test losses of two methods' reported runs on one task, paired by seed."""
        baseline_by_seed = {r.seed: r for r in self.reported_runs(task, baseline, horizon)}
        ours: list[float] = []
        theirs: list[float] = []
        for record in self.reported_runs(task, method, horizon):
            other = baseline_by_seed.get(record.seed)
            if other is not None:
                ours.append(final_test(record))
                theirs.append(final_test(other))
        return ours, theirs

    def paired_losses(
        self, method: str, baseline: str, horizon: float = 1.0
    ) -> tuple[list[float], list[float]]:
        """Final test losses of the two methods' reported runs, paired by (task, seed) over all tasks."""
        ours: list[float] = []
        theirs: list[float] = []
        for task in self.tasks:
            task_ours, task_theirs = self.paired_losses_on(task, method, baseline, horizon)
            ours += task_ours
            theirs += task_theirs
        return ours, theirs

    def compare(self, method: str, baseline: str, horizon: float = 1.0) -> PairedComparison:
        ours, theirs = self.paired_losses(method, baseline, horizon)
        return compare_paired(
            ours,
            theirs,
            self.protocol.confidence,
            self.protocol.bootstrap_samples,
            seed=_stable_seed(method, baseline),
        )

    # -- sensitivity, stability, resources --------------------------------------------------------------

    def sensitivity_curve(self, task: str, method: str) -> list[tuple[float, float]]:
        """``(initial LR, median final inner_valid loss over seeds)`` over the grid (sorted by LR)."""
        by_lr: dict[float, list[float]] = defaultdict(list)
        for record in self.grid_runs(task, method):
            by_lr[record.lr].append(final_valid_loss(record))
        return [(lr, finite_median(losses)) for lr, losses in sorted(by_lr.items())]

    def sensitivity_spread(self, method: str) -> float:
        """Median over tasks of max/min final validation loss across the LR grid (inf if a grid point diverged)."""
        spreads = []
        for task in self.tasks:
            losses = [loss for _, loss in self.sensitivity_curve(task, method)]
            if len(losses) > 1:
                low = min(losses)
                spreads.append(max(losses) / low if low > 0 else math.inf)
        return finite_median(spreads) if spreads else math.nan

    def diverged_runs(self, method: str, source: str = "grid") -> tuple[int, int]:
        """``(diverged, total)`` runs of the method with the given ``lr_source`` at 1x."""
        runs = [r for t in self.tasks for r in self.runs(t, method, 1.0, source)]
        return sum(is_diverged(r, self.protocol.divergence_ratio) for r in runs), len(runs)

    def lr_stability(self, method: str) -> tuple[float, float]:
        """``(median per-step |d ln LR| of the reported runs, median across-seed CV of the LR trace)``.

        The second number says how much the LR policy depends on the data order: 0 for any fixed schedule.
        """
        roughness = []
        spread = []
        for task in self.tasks:
            runs = self.reported_runs(task, method)
            roughness += [lr_roughness(r) for r in runs]
            traces = [np.asarray(r.lr_trace, dtype=float) for r in runs]
            length = min((len(t) for t in traces), default=0)
            if len(traces) > 1 and length:
                stacked = np.stack([t[:length] for t in traces])
                with np.errstate(invalid="ignore", divide="ignore"):
                    spread.append(float(np.nanmean(stacked.std(0) / stacked.mean(0))))
        return finite_median(roughness) if roughness else math.nan, finite_median(
            spread
        ) if spread else math.nan

    def resources(self, method: str) -> Resources:
        """What the method cost over its reported runs (see :class:`Resources`)."""
        runs = [r for t in self.tasks for r in self.reported_runs(t, method)]
        per_k = [1000 * r.train_seconds / r.steps_done for r in runs if r.steps_done]

        def median(values: list[float]) -> float:
            finite = [v for v in values if math.isfinite(v)]
            return float(np.median(finite)) if finite else math.nan

        return Resources(
            seconds_per_1k_steps=median(per_k),
            optimizer_state_mb=median([r.optimizer_state_mb for r in runs]),
            rss_growth_mb=median([r.rss_growth_mb for r in runs]),
            peak_rss_mb=median([r.peak_rss_mb for r in runs]),
            peak_cuda_mb=max((r.peak_cuda_mb for r in runs), default=math.nan),
        )

    def horizon_loss_ratio(self, method: str, horizon: float) -> float:
        """Geometric mean over tasks of (method's median final valid loss / the reference's) at ``horizon``."""
        ratios = []
        for task in self.tasks:
            ours = finite_median([final_valid_loss(r) for r in self.reported_runs(task, method, horizon)])
            reference = finite_median(
                [final_valid_loss(r) for r in self.reported_runs(task, self.protocol.reference, horizon)]
            )
            if math.isfinite(ours) and math.isfinite(reference) and reference > 0:
                ratios.append(ours / reference)
        return geometric_mean(ratios)

    def runs_of(self, method: str) -> int:
        return sum(1 for r in self.records if r.method == method)


def _one_per_seed(runs: Sequence[Record]) -> list[Record]:
    """One run per seed, the most recently written (runs of an older suite version may share a directory)."""
    return sorted({r.seed: r for r in runs}.values(), key=lambda r: r.seed)


def _unique_labels(labels: dict[str, str], order: Sequence[str]) -> dict[str, str]:
    """Task labels for tables; two tasks with the same short label get ``a``, ``b`` suffixes."""
    counts: dict[str, int] = defaultdict(int)
    for key in order:
        counts[labels[key]] += 1
    seen: dict[str, int] = defaultdict(int)
    out = {}
    for key in order:
        label = labels[key]
        if counts[label] > 1:
            out[key] = f"{label}{chr(ord('a') + seen[label])}"
            seen[label] += 1
        else:
            out[key] = label
    return out


def _stable_seed(*names: str) -> int:
    # Deterministic across processes (unlike hash()), so re-rendering a report gives the same CIs.
    return sum((i + 1) * ord(c) for name in names for i, c in enumerate(name)) % (2**31)
