"""Scoring a frozen controller on whole training runs: meta-validation, probes, the best constant LR."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import replace

from metalr.config import ControllerConfig, MetaConfig
from metalr.controller import ArchConfig, LRController, PolicyConfig
from metalr.features import FeatureSpec
from metalr.meta.unroll import Objective, start_run, unroll
from metalr.tasks import TaskSpec, build_task


def build_controller(config: ControllerConfig) -> LRController:
    """A fresh controller as a recipe describes it."""
    spec = FeatureSpec(groups=tuple(config.features), guard_ratio=config.guard_ratio)
    policy = PolicyConfig(
        min_lr=config.min_lr,
        max_lr=config.max_lr,
        min_factor=config.min_factor,
        max_factor=config.max_factor,
        max_log_step=config.max_log_step,
        base_schedule=config.base_schedule,
        guard_cut=config.guard_cut,
    )
    return LRController(spec, policy, ArchConfig(kind=config.kind, hidden=tuple(config.hidden)))


# Validation measures every 10 inner steps and is never capped: a diverged run scores 10 (see rollout).
VALIDATION = Objective(every=10)


def validation_objective(meta: MetaConfig) -> Objective:
    """How meta-validation scores a checkpoint under a recipe: :data:`VALIDATION`, weighted as its training."""
    return VALIDATION._replace(power=meta.objective_power)


def rollout_score(
    controller: LRController, spec: TaskSpec, device: str = "cpu", objective: Objective = VALIDATION
) -> float:
    """Meta-objective of a whole training run under a frozen controller (no meta-gradient)."""
    return rollout(controller, spec, device, objective)[0]


def rollout(
    controller: LRController, spec: TaskSpec, device: str = "cpu", objective: Objective = VALIDATION
) -> tuple[float, list[float]]:
    """``(score, lr_trace)`` of a whole training run under a frozen controller; non-finite scores -> 10."""
    run = start_run(build_task(spec, device), controller)
    result = unroll(controller, run, spec.steps, differentiable=False, objective=objective)
    value = float(result.meta_loss)
    return (value if math.isfinite(value) else 10.0), result.lrs


def validation_terms(
    controller: LRController, specs: Sequence[TaskSpec], device: str = "cpu", objective: Objective = VALIDATION
) -> list[float]:
    """The full-horizon meta-objective of each validation task (lower is better)."""
    return [rollout_score(controller, s, device, objective) for s in specs]


def meta_validate(
    controller: LRController, specs: Sequence[TaskSpec], device: str = "cpu", objective: Objective = VALIDATION
) -> float:
    """Mean full-horizon meta-objective over validation tasks (lower is better)."""
    return mean_term(validation_terms(controller, specs, device, objective))


def mean_term(terms: Sequence[float]) -> float:
    """The meta-valid score: the mean of the per-task terms."""
    return sum(terms) / max(1, len(terms))


def wins(terms: Sequence[float], reference: Sequence[float]) -> float:
    """The fraction of tasks on which ``terms`` beat ``reference`` (the untrained controller: the base schedule)."""
    return sum(t < r for t, r in zip(terms, reference, strict=True)) / max(1, len(terms))


# How checkpoints are ranked on meta-valid (``meta.selection``): a key of (terms, the untrained controller's
# terms on the same tasks); the lowest key is best.safetensors. "mean" is the meta-objective itself, which one
# task with large log-ratios can decide (research log, selection noise); "wins" ranks by how many tasks beat
# the base schedule at the same LR, the first controllers-v2 target, with the mean breaking ties.
SELECTIONS: dict[str, Callable[[Sequence[float], Sequence[float]], tuple[float, ...]]] = {
    "mean": lambda terms, reference: (mean_term(terms),),
    "wins": lambda terms, reference: (-wins(terms, reference), mean_term(terms)),
}


def best_constant_lr(
    controller_config: ControllerConfig, spec: TaskSpec, device: str = "cpu", objective: Objective = VALIDATION
) -> float:
    """The best constant LR for ``spec`` on a grid of base_lr x 2^k, k = -4..4 (full-horizon ``objective``).

    An untrained controller with the guardrail off is exactly a constant schedule at its base LR.
    """
    constant = build_controller(replace(controller_config, base_schedule="constant", guard_cut=1.0)).to(
        device
    )
    scored = []
    for k in range(-4, 5):
        lr = min(controller_config.max_lr, max(controller_config.min_lr, spec.base_lr * 2.0**k))
        scored.append((rollout_score(constant, spec.replace(base_lr=lr), device, objective), lr))
    return min(scored)[1]
