"""Schedule baselines: the task's base optimizer with a step-indexed LR multiplier.

Defaults follow the experiment plans, which state them per epoch; the harness runs step-budgeted tasks, so
each is converted once, at build time, with the task's ``steps_per_epoch``:

* ``step``: StepLR(step_size = 10 epochs, gamma = 0.1)  ->  step_size = 10 * steps_per_epoch steps;
* ``exponential``: ExponentialLR(gamma = 0.95 per epoch)  ->  gamma_step = 0.95 ** (1 / steps_per_epoch);
* ``cosine``: CosineAnnealingLR(T_max = budget, eta_min = 0)  (already per step);
* ``constant``: the base LR throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from metalr.methods.base import MethodContext, MethodRun, register_method
from metalr.schedules import (
    Schedule,
    constant_schedule,
    cosine_schedule,
    exponential_schedule,
    per_step_gamma,
    step_schedule,
)
from metalr.tasks.optimizers import make_torch_optimizer


class ScheduleLR(LambdaLR):
    """``LambdaLR`` over a :mod:`metalr.schedules` function, with the harness's ``step(loss)`` signature."""

    def __init__(self, optimizer: Optimizer, schedule: Schedule) -> None:
        super().__init__(optimizer, schedule)

    def step(self, loss: Tensor | float | None = None, epoch: None = None) -> None:  # type: ignore[override]
        super().step()


@dataclass(frozen=True)
class ScheduleMethod:
    """A base optimizer plus a schedule built from the run's context (``make(context) -> Schedule``)."""

    name: str
    description: str
    make: Callable[[MethodContext], Schedule]
    source: str = "PyTorch torch.optim.lr_scheduler semantics"
    tuned: bool = True
    owns_optimizer: bool = False

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        return MethodRun(optimizer, ScheduleLR(optimizer, self.make(context)))


@register_method("constant")
def constant() -> ScheduleMethod:
    return ScheduleMethod("constant", "constant learning rate (the base LR throughout)", lambda c: constant_schedule())


@register_method("step")
def step(step_size_epochs: float = 10.0, gamma: float = 0.1) -> ScheduleMethod:
    """StepLR: multiply the LR by ``gamma`` every ``step_size_epochs`` epochs (converted to steps)."""
    return ScheduleMethod(
        "step",
        f"step decay x{gamma} every {step_size_epochs:g} epochs (StepLR)",
        lambda c: step_schedule(max(1, round(step_size_epochs * c.steps_per_epoch)), gamma),
    )


@register_method("exponential")
def exponential(gamma_per_epoch: float = 0.95) -> ScheduleMethod:
    """ExponentialLR: decay by ``gamma_per_epoch`` per epoch, applied smoothly per step."""
    return ScheduleMethod(
        "exponential",
        f"exponential decay x{gamma_per_epoch} per epoch (ExponentialLR, per step)",
        lambda c: exponential_schedule(per_step_gamma(gamma_per_epoch, c.steps_per_epoch)),
    )


@register_method("cosine")
def cosine(eta_min_ratio: float = 0.0) -> ScheduleMethod:
    """CosineAnnealingLR with T_max = the step budget."""
    return ScheduleMethod(
        "cosine",
        "cosine annealing to eta_min over the step budget (CosineAnnealingLR)",
        lambda c: cosine_schedule(c.total_steps, eta_min_ratio),
    )
