"""LR schedules as functions of the step (multipliers of the base LR).

Each factory validates its arguments once and returns a pure function ``step -> multiplier`` (as optax's
``cosine_decay_schedule`` does); PyTorch's scheduler semantics are reproduced exactly, which
``tests/test_schedules.py`` checks against hand-computed arrays. This module imports only torch and math:
the controller uses :data:`BASE_SCHEDULES` inside differentiable unrolls, the baseline methods use the
factories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Schedule = Callable[[int], float]


def _positive_int(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")


def half_cosine(progress: float | Tensor) -> Any:
    """``0.5 * (1 + cos(pi * progress))``: 1 at progress 0, 0 at progress 1 (one SGDR cycle, Loshchilov &
    Hutter, ICLR 2017). The one cosine formula of metalr: the cosine and one-cycle schedules and the
    controller's cosine base all call it, for floats and (inside differentiable unrolls) tensors."""
    if isinstance(progress, Tensor):
        return 0.5 * (1 + torch.cos(math.pi * progress))
    return 0.5 * (1 + math.cos(math.pi * progress))


def constant_schedule() -> Schedule:
    """Multiplier 1 at every step."""
    return lambda step: 1.0


def cosine_schedule(total_steps: int, eta_min_ratio: float = 0.0) -> Schedule:
    """``CosineAnnealingLR(T_max=total_steps, eta_min=eta_min_ratio * base_lr)``, per step."""
    _positive_int("total_steps", total_steps)
    if not 0.0 <= eta_min_ratio <= 1.0:
        raise ValueError(f"eta_min_ratio must be in [0, 1], got {eta_min_ratio=}")

    def schedule(step: int) -> float:
        return eta_min_ratio + (1 - eta_min_ratio) * half_cosine(min(step, total_steps) / total_steps)

    return schedule


def step_schedule(step_size: int, gamma: float = 0.1) -> Schedule:
    """``StepLR(step_size, gamma)``: multiply by ``gamma`` every ``step_size`` steps."""
    _positive_int("step_size", step_size)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma=}")
    return lambda step: gamma ** (step // step_size)


def exponential_schedule(gamma: float) -> Schedule:
    """``ExponentialLR(gamma)``: multiply by ``gamma`` every step."""
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma=}")
    return lambda step: gamma**step


def warmup_cosine_schedule(total_steps: int, warmup_steps: int, eta_min_ratio: float = 0.0) -> Schedule:
    """Linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps``, then cosine to ``eta_min_ratio``."""
    _positive_int("total_steps", total_steps)
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be an integer in [0, total_steps), got {warmup_steps=}")
    cosine = cosine_schedule(total_steps - warmup_steps, eta_min_ratio)

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return cosine(step - warmup_steps)

    return schedule


def per_step_gamma(gamma_per_epoch: float, steps_per_epoch: int) -> float:
    """Convert a per-epoch decay into the per-step decay with the same effect over one epoch."""
    _positive_int("steps_per_epoch", steps_per_epoch)
    return gamma_per_epoch ** (1.0 / steps_per_epoch)


# Base schedules the controller multiplies: tensor-friendly (step may be a tensor inside an unroll).
def _constant_base(step: Tensor | float, total_steps: Tensor | float) -> Tensor:
    return torch.ones(()) if not isinstance(step, Tensor) else torch.ones_like(step)


def _cosine_base(step: Tensor | float, total_steps: Tensor | float) -> Tensor:
    progress = torch.as_tensor(step, dtype=torch.float64) / torch.as_tensor(total_steps, dtype=torch.float64)
    value = half_cosine(progress.clamp(0, 1))
    return value.to(step.dtype) if isinstance(step, Tensor) else value.float()


BASE_SCHEDULES: dict[str, Callable[[Tensor | float, Tensor | float], Tensor]] = {
    "constant": _constant_base,
    "cosine": _cosine_base,
}


_ANNEALERS: dict[str, Callable[[float, float, float], float]] = {
    # torch.optim.lr_scheduler.OneCycleLR._annealing_cos / _annealing_linear (the same values).
    "cos": lambda start, end, pct: end + (start - end) * half_cosine(pct),
    "linear": lambda start, end, pct: (end - start) * pct + start,
}


def onecycle_schedule(
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """``OneCycleLR(max_lr=base_lr, total_steps, ...)`` (Smith & Topin 2019) as a multiplier of the peak LR.

    The LR rises from ``1/div_factor`` to 1 over the first ``pct_start`` of the run, then anneals to
    ``1/(div_factor * final_div_factor)`` (``three_phase`` first anneals back to ``1/div_factor``). Phase ends
    are torch's fractional step indices, so values match ``OneCycleLR`` step for step. Two deliberate
    differences: steps past ``total_steps`` hold the final value (torch raises), and a zero-length phase
    takes its end value (torch divides by zero).
    """
    _positive_int("total_steps", total_steps)
    if not 0.0 <= pct_start <= 1.0:
        raise ValueError(f"pct_start must be in [0, 1], got {pct_start=}")
    if anneal_strategy not in _ANNEALERS:
        raise ValueError(f"anneal_strategy must be one of {sorted(_ANNEALERS)}, got {anneal_strategy=}")
    if not (div_factor > 0 and final_div_factor > 0):
        raise ValueError(f"div_factor and final_div_factor must be positive, got {div_factor=}, {final_div_factor=}")
    anneal = _ANNEALERS[anneal_strategy]
    initial, peak = 1.0 / div_factor, 1.0
    final = initial / final_div_factor
    # (end_step, start multiplier, end multiplier), exactly OneCycleLR._schedule_phases.
    phases: list[tuple[float, float, float]]
    if three_phase:
        phases = [
            (pct_start * total_steps - 1, initial, peak),
            (2 * pct_start * total_steps - 2, peak, initial),
            (total_steps - 1.0, initial, final),
        ]
    else:
        phases = [(pct_start * total_steps - 1, initial, peak), (total_steps - 1.0, peak, final)]

    def schedule(step: int) -> float:
        step = min(step, total_steps)
        start_step = 0.0
        for i, (end_step, start_value, end_value) in enumerate(phases):
            if step <= end_step or i == len(phases) - 1:
                if end_step == start_step:
                    return end_value
                return anneal(start_value, end_value, (step - start_step) / (end_step - start_step))
            start_step = end_step
        raise AssertionError("unreachable: the last phase always matches")

    return schedule
