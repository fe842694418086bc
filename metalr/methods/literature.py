"""Optimizer-replacing LR methods from the literature.

Each builds its own optimizer (``owns_optimizer = True``) and runs with its authors' default settings. The
maintained packages are used where they exist (``schedulefree``, ``prodigyopt``, ``dadaptation``,
``dog-optimizer``); hypergradient descent is short and is written here. Where a method has an SGD and an Adam
form, the form follows the task's base optimizer (``sgd``/``momentum`` -> SGD form, ``adam``/``adamw`` -> Adam
form), so e.g. a momentum-SGD task is compared with SGD-HD with momentum 0.9, not with Adam-HD; the form used
is recorded in ``MethodRun.info["variant"]``.

``tuned``: LR-free methods (Prodigy, D-Adaptation, DoG) and hypergradient descent (whose point is adapting
its LR from the task's initial LR) run once per seed. Schedule-Free still has a peak LR that its authors tune
like any other optimizer's, so it goes through the same LR grid as the schedules.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from metalr.methods.base import MethodContext, MethodRun, register_method
from metalr.methods.policies import SelfTuningLR, model_owning, require_list
from metalr.schedules import Schedule, constant_schedule, cosine_schedule
from metalr.tasks.optimizers import OptimizerHyper

ADAM_FAMILY = ("adam", "adamw")
SGD_FAMILY = ("sgd", "momentum")


def _family(context: MethodContext) -> str:
    if context.optimizer in ADAM_FAMILY:
        return "adam"
    if context.optimizer in SGD_FAMILY:
        return "sgd"
    raise ValueError(
        f"unknown base optimizer {context.optimizer!r}; expected one of {[*SGD_FAMILY, *ADAM_FAMILY]}"
    )


def _task_weight_decay(context: MethodContext) -> float:
    """Decoupled weight decay of the task's base optimizer (AdamW tasks only), kept so runs compare alike."""
    return OptimizerHyper().weight_decay if context.optimizer == "adamw" else 0.0


# Schedules the self-tuning optimizers may run under (their authors recommend cosine or none).
SELF_TUNING_SCHEDULES: dict[str, Callable[[int], Schedule]] = {
    "constant": lambda total_steps: constant_schedule(),
    "cosine": lambda total_steps: cosine_schedule(total_steps),
}


def _schedule(name: str) -> Callable[[int], Schedule]:
    if name not in SELF_TUNING_SCHEDULES:
        raise ValueError(f"schedule must be one of {sorted(SELF_TUNING_SCHEDULES)}, got schedule={name!r}")
    return SELF_TUNING_SCHEDULES[name]


# ----------------------------------------------------------------------------------------------------------
# Hypergradient descent (Baydin, Cornish, Martinez Rubio, Schmidt & Wood, ICLR 2018).


class _HypergradientOptimizer(Optimizer):
    """Shared update of SGD-HD and Adam-HD: one scalar LR per group moved by its hypergradient.

    With theta_t = theta_{t-1} - alpha * u_{t-1}, the derivative of f(theta_t) w.r.t. alpha is
    -g_t . u_{t-1}, so gradient descent on alpha is alpha_t = alpha_{t-1} + beta * g_t . u_{t-1}
    (Baydin et al. 2018, eq. 3). Nothing in that rule keeps alpha positive: a run of anti-aligned
    gradients drives it below zero, where the update climbs the loss. The guard clamps alpha to
    ``min_lr_ratio * alpha_0`` (a tiny positive floor, so the LR stays positive and the hypergradient can
    pull it back up).
    """

    def _direction(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            previous = [self.state[p]["direction"] for p in params if "direction" in self.state[p]]
            if previous and len(previous) == len(params):
                grads = [p.grad for p in params]
                hypergradient = float(
                    torch.stack(
                        [(g * u).sum(dtype=torch.float64) for g, u in zip(grads, previous, strict=True)]
                    ).sum()
                )
                if hypergradient == hypergradient and abs(hypergradient) != float("inf"):  # skip NaN/inf
                    floor = group["min_lr_ratio"] * group["initial_hd_lr"]
                    group["lr"] = max(group["lr"] + group["hypergrad_lr"] * hypergradient, floor)
            for p in params:
                state = self.state[p]
                direction = self._direction(p, p.grad, state, group)
                p.add_(direction, alpha=-group["lr"])
                state["direction"] = direction
        return loss


class SGDHD(_HypergradientOptimizer):
    """SGD-HD / SGDN-HD: SGD (optionally with momentum or Nesterov momentum) with a hypergradient LR.

    Args:
        params: parameters to optimise.
        lr: initial LR alpha_0.
        hypergrad_lr: beta, the hypergradient step size (paper: 0.001 for SGD-HD and SGDN-HD).
        momentum: heavy-ball momentum (0 = plain SGD-HD); the hypergradient uses the momentum direction,
            as in the authors' reference implementation.
        nesterov: Nesterov momentum (SGDN-HD).
        min_lr_ratio: guard, alpha >= min_lr_ratio * alpha_0.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        hypergrad_lr: float = 1e-3,
        momentum: float = 0.0,
        nesterov: bool = False,
        min_lr_ratio: float = 1e-6,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr=}")
        if not hypergrad_lr >= 0:
            raise ValueError(f"hypergrad_lr must be >= 0, got {hypergrad_lr=}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum=}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        defaults = dict(
            lr=lr,
            initial_hd_lr=lr,
            hypergrad_lr=hypergrad_lr,
            momentum=momentum,
            nesterov=nesterov,
            min_lr_ratio=min_lr_ratio,
        )
        super().__init__(params, defaults)

    def _direction(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        momentum = group["momentum"]
        if momentum == 0:
            return grad.clone()
        buffer = state.get("momentum_buffer")
        if buffer is None:
            buffer = state["momentum_buffer"] = grad.clone()
        else:
            buffer.mul_(momentum).add_(grad)
        return grad.add(buffer, alpha=momentum) if group["nesterov"] else buffer.clone()


class AdamHD(_HypergradientOptimizer):
    """Adam-HD: Adam with a hypergradient LR (u = bias-corrected m / (sqrt(v) + eps)).

    Args:
        params: parameters to optimise.
        lr: initial LR alpha_0.
        hypergrad_lr: beta (paper: 1e-7 for Adam-HD).
        betas, eps: Adam's (0.9, 0.999) and 1e-8.
        min_lr_ratio: guard, alpha >= min_lr_ratio * alpha_0.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        hypergrad_lr: float = 1e-7,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        min_lr_ratio: float = 1e-6,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr=}")
        if not hypergrad_lr >= 0:
            raise ValueError(f"hypergrad_lr must be >= 0, got {hypergrad_lr=}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas=}")
        defaults = dict(
            lr=lr,
            initial_hd_lr=lr,
            hypergrad_lr=hypergrad_lr,
            betas=betas,
            eps=eps,
            min_lr_ratio=min_lr_ratio,
        )
        super().__init__(params, defaults)

    def _direction(self, p: Tensor, grad: Tensor, state: dict[str, Any], group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        if "exp_avg" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias1 = 1 - beta1 ** state["step"]
        bias2 = 1 - beta2 ** state["step"]
        return (state["exp_avg"] / bias1) / ((state["exp_avg_sq"] / bias2).sqrt() + group["eps"])


@dataclass(frozen=True)
class HypergradientMethod:
    """Hypergradient descent (Baydin et al., ICLR 2018): the LR itself is learned online by gradient descent.

    SGD-family tasks get SGD-HD (momentum 0.9 on ``momentum`` tasks, as SGDN-HD's heavy-ball sibling), Adam-
    family tasks get Adam-HD. Starts from the task's base LR.

    Hyperparameters: ``sgd_hypergrad_lr`` (beta for SGD-HD, 1e-3, the paper's), ``adam_hypergrad_lr`` (beta for
    Adam-HD, 1e-7, the paper's), ``min_lr_ratio`` (1e-6: the guard against the negative LRs the raw rule can
    produce, alpha >= 1e-6 * alpha_0).
    """

    sgd_hypergrad_lr: float = 1e-3
    adam_hypergrad_lr: float = 1e-7
    min_lr_ratio: float = 1e-6
    name: str = "hypergradient"
    description: str = "hypergradient descent: SGD-HD / Adam-HD (by base optimizer) learn the LR online"
    source: str = "Baydin et al., ICLR 2018 (Online learning rate adaptation with hypergradient descent)"
    tuned: bool = False
    owns_optimizer: bool = True

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        family = _family(context)
        optimizer: Optimizer
        if family == "adam":
            optimizer = AdamHD(
                params, context.base_lr, self.adam_hypergrad_lr, min_lr_ratio=self.min_lr_ratio
            )
            variant = "Adam-HD"
        else:
            momentum = OptimizerHyper().momentum if context.optimizer == "momentum" else 0.0
            optimizer = SGDHD(
                params, context.base_lr, self.sgd_hypergrad_lr, momentum, min_lr_ratio=self.min_lr_ratio
            )
            variant = "SGD-HD" + (" (momentum 0.9)" if momentum else "")
        return MethodRun(optimizer, SelfTuningLR(optimizer), info={"variant": variant})


@register_method("hypergradient")
def hypergradient(
    sgd_hypergrad_lr: float = 1e-3, adam_hypergrad_lr: float = 1e-7, min_lr_ratio: float = 1e-6
) -> HypergradientMethod:
    return HypergradientMethod(sgd_hypergrad_lr, adam_hypergrad_lr, min_lr_ratio)


# ----------------------------------------------------------------------------------------------------------
# Schedule-Free (Defazio, Yang, Mehta, Mishchenko, Khaled & Cutkosky, NeurIPS 2024).


def _scheduled_lr(group: dict[str, Any]) -> float:
    # schedulefree logs the warm-up-scaled LR it applied; before the first step it is 0.
    return float(group["scheduled_lr"]) or float(group["lr"])


@dataclass(frozen=True)
class ScheduleFreeMethod:
    """Schedule-Free SGD / AdamW (``schedulefree`` package): no schedule, interpolated + averaged iterates.

    SGD-family tasks get ``SGDScheduleFree(momentum=0.9)``, Adam-family tasks ``AdamWScheduleFree(betas=(0.9,
    0.999))`` (weight decay 0.01 on AdamW tasks, else 0). The peak LR is the task's base LR (the LR grid
    tunes it: Schedule-Free still needs its LR tuned). Evaluation happens at the averaged iterate x: the
    optimizer is put in ``train()`` mode at build and switched by ``eval_enter``/``eval_exit``.

    Hyperparameters: ``warmup_fraction`` (0.05: the authors recommend linear warm-up; 5% of the budget),
    ``momentum`` (0.9, SGD form), ``beta1`` (0.9, AdamW form).
    """

    warmup_fraction: float = 0.05
    momentum: float = 0.9
    beta1: float = 0.9
    name: str = "schedulefree"
    description: str = "Schedule-Free SGD / AdamW (by base optimizer), evaluated at the averaged iterate"
    source: str = "Defazio et al., NeurIPS 2024 (The Road Less Scheduled); package schedulefree"
    tuned: bool = True
    owns_optimizer: bool = True

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        import schedulefree

        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction must be in [0, 1), got warmup_fraction={self.warmup_fraction}")
        warmup = round(self.warmup_fraction * context.total_steps)
        optimizer: Any
        if _family(context) == "adam":
            optimizer = schedulefree.AdamWScheduleFree(
                params,
                lr=context.base_lr,
                betas=(self.beta1, 0.999),
                warmup_steps=warmup,
                weight_decay=_task_weight_decay(context),
            )
            variant = "AdamWScheduleFree"
        else:
            optimizer = schedulefree.SGDScheduleFree(
                params, lr=context.base_lr, momentum=self.momentum, warmup_steps=warmup
            )
            variant = "SGDScheduleFree"
        optimizer.train()
        return MethodRun(
            optimizer,
            SelfTuningLR(optimizer, _scheduled_lr),
            eval_enter=optimizer.eval,
            eval_exit=optimizer.train,
            info={"variant": variant, "warmup_steps": warmup},
        )


@register_method("schedulefree")
def schedule_free(
    warmup_fraction: float = 0.05, momentum: float = 0.9, beta1: float = 0.9
) -> ScheduleFreeMethod:
    return ScheduleFreeMethod(warmup_fraction, momentum, beta1)


# ----------------------------------------------------------------------------------------------------------
# Prodigy (Mishchenko & Defazio, ICML 2024) and D-Adaptation Adam (Defazio & Mishchenko, ICML 2023).


def _d_times_lr(group: dict[str, Any]) -> float:
    """Step size Prodigy / D-Adaptation apply: the distance estimate d times the (scheduled) lr."""
    return float(group["d"]) * float(group["lr"])


@dataclass(frozen=True)
class DistanceAdaptiveMethod:
    """An LR-free Adam that estimates its step size from the distance to the solution (Prodigy, D-Adapt).

    ``lr`` is 1.0, the authors' recommended value (it multiplies the estimated step size); ``schedule``
    'cosine' (default) anneals it over the budget, as both READMEs recommend, 'constant' does not. Weight
    decay is decoupled 0.01 on AdamW tasks, else 0.
    """

    name: str
    description: str
    source: str
    make: Callable[[list[Tensor], float, float], Optimizer]
    schedule: str = "cosine"
    lr: float = 1.0
    tuned: bool = False
    owns_optimizer: bool = True

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        schedule = _schedule(self.schedule)(context.total_steps)
        optimizer = self.make(require_list(params), self.lr, _task_weight_decay(context))
        return MethodRun(
            optimizer, SelfTuningLR(optimizer, _d_times_lr, schedule), info={"schedule": self.schedule}
        )


def _prodigy(params: list[Tensor], lr: float, weight_decay: float) -> Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, weight_decay=weight_decay, decouple=True)


def _dadapt_adam(params: list[Tensor], lr: float, weight_decay: float) -> Optimizer:
    from dadaptation import DAdaptAdam

    return DAdaptAdam(params, lr=lr, weight_decay=weight_decay, decouple=weight_decay > 0)


@register_method("prodigy")
def prodigy(schedule: str = "cosine", lr: float = 1.0) -> DistanceAdaptiveMethod:
    """Prodigy with the package defaults (d0 1e-6, betas (0.9, 0.999), no bias correction, no safeguard
    warm-up), lr 1.0 and cosine annealing (see :class:`DistanceAdaptiveMethod`)."""
    _schedule(schedule)
    return DistanceAdaptiveMethod(
        "prodigy",
        "Prodigy: LR-free Adam estimating the distance to the solution, cosine-annealed",
        "Mishchenko & Defazio, ICML 2024 (Prodigy); package prodigyopt",
        _prodigy,
        schedule,
        lr,
    )


@register_method("dadapt_adam")
def dadapt_adam(schedule: str = "cosine", lr: float = 1.0) -> DistanceAdaptiveMethod:
    """D-Adaptation Adam with the package defaults (d0 1e-6, betas (0.9, 0.999), growth rate inf), lr 1.0
    and cosine annealing (see :class:`DistanceAdaptiveMethod`)."""
    _schedule(schedule)
    return DistanceAdaptiveMethod(
        "dadapt_adam",
        "D-Adaptation Adam: LR-free Adam via dual-averaging distance estimates, cosine-annealed",
        "Defazio & Mishchenko, ICML 2023 (Learning-Rate-Free Learning by D-Adaptation); package dadaptation",
        _dadapt_adam,
        schedule,
        lr,
    )


# ----------------------------------------------------------------------------------------------------------
# DoG (Ivgi, Hinder & Carmon, ICML 2023).


def _dog_eta(group: dict[str, Any]) -> float:
    # DoG computes eta at its first step; before that the nominal lr (c = 1) stands in.
    eta = group.get("eta")
    return float(eta[0]) if eta else float(group["lr"])


class IterateSwap:
    """Evaluate at an averaged copy of the model: ``enter`` loads its weights, ``exit`` restores the live ones.

    ``load_state_dict`` copies into the existing tensors, so the optimizer's references stay valid.
    """

    def __init__(self, model: torch.nn.Module, averaged: Callable[[], torch.nn.Module]) -> None:
        self.model = model
        self.averaged = averaged
        self._saved: dict[str, Tensor] | None = None

    def enter(self) -> None:
        self._saved = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.averaged().state_dict())

    def exit(self) -> None:
        if self._saved is not None:
            self.model.load_state_dict(self._saved)
            self._saved = None


@dataclass(frozen=True)
class DoGMethod:
    """DoG, "Distance over Gradients" (``dog-optimizer`` package): parameter-free SGD, eta_t =
    max_i ||x_i - x_0|| / sqrt(sum_i ||g_i||^2), with polynomial-decay iterate averaging (gamma 8) as the
    authors evaluate it.

    Used for every base optimizer (DoG is an SGD-form method with no Adam form). Evaluation swaps the
    averaged weights into the model (``eval_enter``) and back (``eval_exit``); if the task's model does not
    own the optimised parameters, averaging is impossible and the run evaluates the last iterate (warned).

    Hyperparameters: ``reps_rel`` (1e-6, initial movement r_eps relative to 1 + ||x_0||), ``averaging_gamma``
    (8, the authors' choice), ``layerwise`` (False; True uses L-DoG, one step size per tensor).
    """

    reps_rel: float = 1e-6
    averaging_gamma: float = 8.0
    layerwise: bool = False
    name: str = "dog"
    description: str = (
        "DoG: parameter-free SGD (distance over gradients), evaluated at its polynomial-decay average"
    )
    source: str = "Ivgi, Hinder & Carmon, ICML 2023 (DoG is SGD's Best Friend); package dog-optimizer"
    tuned: bool = False
    owns_optimizer: bool = True

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        from dog import DoG, LDoG, PolynomialDecayAverager

        params = require_list(params)
        optimizer = (LDoG if self.layerwise else DoG)(params, reps_rel=self.reps_rel)
        model = model_owning(params, context)
        if model is None:
            warnings.warn(
                "dog: the task's model does not own the optimised parameters, so the iterate average cannot be "
                "kept; evaluating at the last iterate",
                stacklevel=2,
            )
            return MethodRun(optimizer, SelfTuningLR(optimizer, _dog_eta), info={"averaging": False})
        averager = PolynomialDecayAverager(model, gamma=self.averaging_gamma)
        swap = IterateSwap(model, lambda: averager.averaged_model)
        policy = SelfTuningLR(optimizer, _dog_eta, after_step=averager.step)
        return MethodRun(
            optimizer, policy, eval_enter=swap.enter, eval_exit=swap.exit, info={"averaging": True}
        )


@register_method("dog")
def dog(reps_rel: float = 1e-6, averaging_gamma: float = 8.0, layerwise: bool = False) -> DoGMethod:
    return DoGMethod(reps_rel, averaging_gamma, layerwise)
