"""Schedule baselines: the task's base optimizer with a step-indexed LR multiplier.

Defaults follow the experiment plans, which state them per epoch; the harness runs step-budgeted tasks, so
each is converted once, at build time, with the task's ``steps_per_epoch``:

* ``step``: StepLR(step_size = 10 epochs, gamma = 0.1)  ->  step_size = 10 * steps_per_epoch steps;
* ``exponential``: ExponentialLR(gamma = 0.95 per epoch)  ->  gamma_step = 0.95 ** (1 / steps_per_epoch);
* ``cosine``: CosineAnnealingLR(T_max = budget, eta_min = 0)  (already per step);
* ``constant``: the base LR throughout;
* ``warmup_cosine``: linear warm-up over 5% of the budget, then cosine to 0 (``LinearLR`` + ``CosineAnnealingLR``
  chained by ``SequentialLR``), the recipe of Goyal et al. (2017) and most transformer training;
* ``onecycle``: ``OneCycleLR(max_lr = base LR, total_steps = budget)`` with torch's defaults (pct_start 0.3,
  cos annealing, div_factor 25, final_div_factor 1e4), LR only: momentum is the task's (see :func:`onecycle`);
* ``plateau``: ``ReduceLROnPlateau`` (torch defaults: factor 0.1, patience 10, threshold 1e-4 rel) stepped on
  every ``inner_valid`` loss the harness reports, so patience counts validations, not steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, ReduceLROnPlateau

from metalr.methods.base import MethodContext, MethodRun, register_method
from metalr.schedules import (
    Schedule,
    constant_schedule,
    cosine_schedule,
    exponential_schedule,
    onecycle_schedule,
    per_step_gamma,
    step_schedule,
    warmup_cosine_schedule,
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


def _warmup_steps(fraction: float, total_steps: int) -> int:
    """At least one warm-up step when the budget allows, never the whole budget."""
    return min(total_steps - 1, max(1, round(fraction * total_steps)))


@register_method("warmup_cosine")
def warmup_cosine(warmup_fraction: float = 0.05, eta_min_ratio: float = 0.0) -> ScheduleMethod:
    """Linear warm-up then cosine annealing (Goyal et al. 2017; Loshchilov & Hutter 2017).

    torch equivalent: ``SequentialLR([LinearLR(start_factor=1/W, total_iters=W-1), CosineAnnealingLR(T_max=T-W,
    eta_min)], milestones=[W])`` with W = ``warmup_fraction`` of the budget (default 5%, at least one step).
    """
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1), got {warmup_fraction=}")
    return ScheduleMethod(
        "warmup_cosine",
        f"linear warm-up over {warmup_fraction:.0%} of the budget, then cosine annealing (LinearLR + CosineAnnealingLR)",
        lambda c: warmup_cosine_schedule(c.total_steps, _warmup_steps(warmup_fraction, c.total_steps), eta_min_ratio),
        source="Goyal et al. 2017 (warm-up); Loshchilov & Hutter, ICLR 2017 (SGDR cosine)",
    )


@register_method("onecycle")
def onecycle(
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> ScheduleMethod:
    """OneCycleLR (Smith & Topin 2019) with the base LR as its peak ``max_lr`` and the budget as ``total_steps``.

    Defaults are torch's. torch also cycles momentum (0.95 -> 0.85) by default; here momentum stays the
    task's, because on a plain-SGD task torch's cycling would turn SGD into momentum SGD, and the comparison
    is between LR policies on the same base optimizer.
    """
    onecycle_schedule(2, pct_start, anneal_strategy, div_factor, final_div_factor, three_phase)  # validate now
    return ScheduleMethod(
        "onecycle",
        "one-cycle: warm up to the base LR over 30% of the budget, then cosine anneal (OneCycleLR, LR only)",
        lambda c: onecycle_schedule(c.total_steps, pct_start, anneal_strategy, div_factor, final_div_factor, three_phase),
        source="Smith & Topin 2019 (super-convergence); torch.optim.lr_scheduler.OneCycleLR",
    )


class PlateauLR(ReduceLROnPlateau):
    """``ReduceLROnPlateau`` on validation losses, with the harness's per-step ``step(loss)`` signature.

    The per-step training loss is ignored on purpose: the plateau rule of the issue watches ``inner_valid``,
    which reaches it through :meth:`observe_validation` (``MethodRun.validation_hook``).
    """

    def step(self, loss: Tensor | float | None = None, epoch: None = None) -> None:  # type: ignore[override]
        """Per-step call of the harness: nothing to do, the LR only changes on validation."""

    def observe_validation(self, valid_loss: Tensor | float) -> None:
        super().step(float(valid_loss))


@dataclass(frozen=True)
class PlateauMethod:
    """ReduceLROnPlateau on the ``inner_valid`` loss (torch defaults; patience counts validations).

    Hyperparameters: ``factor`` (0.1), ``patience`` (10 validations), ``threshold`` (1e-4, relative),
    ``cooldown`` (0), ``min_lr_ratio`` (0: min_lr = min_lr_ratio * base LR).
    """

    factor: float = 0.1
    patience: int = 10
    threshold: float = 1e-4
    cooldown: int = 0
    min_lr_ratio: float = 0.0
    name: str = "plateau"
    description: str = "reduce LR x0.1 after 10 validations without inner_valid improvement (ReduceLROnPlateau)"
    source: str = "torch.optim.lr_scheduler.ReduceLROnPlateau (Keras / PyTorch)"
    tuned: bool = True
    owns_optimizer: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.factor < 1.0:
            raise ValueError(f"factor must be in (0, 1), got factor={self.factor}")
        if self.patience < 0 or self.cooldown < 0:
            raise ValueError(f"patience and cooldown must be >= 0, got patience={self.patience}, cooldown={self.cooldown}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got min_lr_ratio={self.min_lr_ratio}")

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        scheduler = PlateauLR(
            optimizer,
            factor=self.factor,
            patience=self.patience,
            threshold=self.threshold,
            cooldown=self.cooldown,
            min_lr=self.min_lr_ratio * context.base_lr,
        )
        return MethodRun(optimizer, scheduler, validation_hook=scheduler.observe_validation)


@register_method("plateau")
def plateau(
    factor: float = 0.1, patience: int = 10, threshold: float = 1e-4, cooldown: int = 0, min_lr_ratio: float = 0.0
) -> PlateauMethod:
    return PlateauMethod(factor, patience, threshold, cooldown, min_lr_ratio)
