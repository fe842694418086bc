"""The four adaptive LR ideas of the experiment plans, each as a registered method.

1. ``gradient_variance``: an Adam/RMSprop optimizer whose step size shrinks with the smoothed gradient
   variance (smoothing 0.9, LR scaling factor 0.1).
2. ``alrs``: a 2x64 ReLU network that predicts the next epoch's LR from loss and accuracy, trained online.
3. ``uncertainty``: halve the LR when the prediction variance (> 0.01) or the gradient norm (> 0.1) is high,
   otherwise raise it by 1.05.
4. ``resource_aware``: a per-epoch LR from measured resource use (weight 0.5) and batch size + dataset
   complexity (weight 0.5), bounded in [1e-6, 1e-2].

The plans fix the quantities above; where they leave a choice open, the docstring of the method says what
was chosen and why. All four run in the harness's plain loop: ``optimizer.step(); scheduler.step(loss)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim import Optimizer

from metalr.methods.base import MethodContext, MethodRun, register_method
from metalr.methods.policies import (
    OutputTap,
    SelfTuningLR,
    as_float,
    dot,
    global_grad_norm,
    model_owning,
    require_list,
)
from metalr.tasks.base import Task
from metalr.tasks.optimizers import make_torch_optimizer


def _positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number, got {name}={value!r}")


def _unit_interval(name: str, value: float, *, closed_right: bool = False) -> None:
    ok = 0.0 <= value <= 1.0 if closed_right else 0.0 <= value < 1.0
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{']' if closed_right else ')'}, got {name}={value!r}")


def _write_lrs(optimizer: Optimizer, lrs: Sequence[float]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def _steps_per_epochs(epochs: float, context: MethodContext) -> int:
    return max(1, round(epochs * context.steps_per_epoch))


# ----------------------------------------------------------------------------------------------------------
# 1. Gradient-variance adaptive LR.


class GradientVarianceAdam(Optimizer):
    """Adam (or RMSprop) whose step size is scaled down by the smoothed relative gradient variance.

    Per param group, each step:

    * noise_t = rho * noise_{t-1} + (1 - rho) * sum ||g_t - m_hat_{t-1}||^2 (the gradient's deviation from its
      running mean; ``rho`` = ``variance_smoothing``, bias-corrected like Adam's moments);
    * r_t = noise_hat_t / (noise_hat_t + ||m_hat_t||^2), the fraction of the gradient that is noise, in [0, 1];
    * step size = lr * (1 - (1 - kappa) * r_t), ``kappa`` = ``lr_scaling``: the full LR when the gradients
      agree, ``kappa * lr`` when they are pure noise.

    The plan fixes the two factors but not how the variance enters; a *relative* variance is used because
    it is dimensionless, so the same defaults mean the same thing for every model and loss scale, and the
    LR scaling factor becomes the LR multiplier at maximal variance. The update direction is Adam's
    (``first_moment_update=True``) or RMSprop's (g / sqrt(v_hat)); the first moment is tracked either way for
    the variance estimate.

    Args:
        params: parameters to optimise.
        lr: the LR at zero variance.
        betas: (beta1, beta2) of the moment estimates; (0.9, 0.999) Adam, (0.9, 0.99) RMSprop-like.
        eps: denominator term (1e-8).
        variance_smoothing: rho (0.9, the plan's).
        lr_scaling: kappa (0.1, the plan's).
        first_moment_update: Adam direction (True) or RMSprop direction (False).
        weight_decay: decoupled weight decay (AdamW-style).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        variance_smoothing: float = 0.9,
        lr_scaling: float = 0.1,
        first_moment_update: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        _positive("lr", lr)
        _unit_interval("variance_smoothing", variance_smoothing)
        if not 0.0 < lr_scaling <= 1.0:
            raise ValueError(f"lr_scaling must be in (0, 1], got {lr_scaling=}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas=}")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            variance_smoothing=variance_smoothing,
            lr_scaling=lr_scaling,
            first_moment_update=first_moment_update,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("variance_scale", 1.0)
            group.setdefault("relative_variance", 0.0)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            beta1, beta2 = group["betas"]
            rho = group["variance_smoothing"]
            step = group["step"] = group.get("step", 0) + 1
            bias1, bias2 = 1 - beta1**step, 1 - beta2**step
            deviation = torch.zeros((), dtype=torch.float64, device=params[0].device)
            signal = torch.zeros((), dtype=torch.float64, device=params[0].device)
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if step > 1:
                    previous_mean = m / (1 - beta1 ** (step - 1))
                    deviation += (p.grad - previous_mean).square().sum(dtype=torch.float64)
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                signal += (m / bias1).square().sum(dtype=torch.float64)
            if step > 1:  # the first gradient has no running mean to deviate from
                group["noise"] = rho * group.get("noise", 0.0) + (1 - rho) * float(deviation)
                noise = group["noise"] / (1 - rho ** (step - 1))
                total = noise + float(signal)
                relative = noise / total if total > 0 and math.isfinite(total) else 0.0
                group["relative_variance"] = relative
                group["variance_scale"] = 1 - (1 - group["lr_scaling"]) * relative
            step_size = group["lr"] * group["variance_scale"]
            for p in params:
                state = self.state[p]
                denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                numerator = state["exp_avg"] / bias1 if group["first_moment_update"] else p.grad
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.addcdiv_(numerator, denom, value=-step_size)
        return loss


def _variance_scaled_lr(group: dict[str, Any]) -> float:
    return float(group["lr"]) * float(group["variance_scale"])


@dataclass(frozen=True)
class GradientVarianceMethod:
    """Gradient-variance adaptive LR (experiment plan 1): :class:`GradientVarianceAdam`.

    Adam-family tasks get the Adam direction (betas (0.9, 0.999), decoupled weight decay 0.01 on AdamW tasks);
    SGD-family tasks get the RMSprop direction (betas (0.9, 0.99), RMSprop's smoothing). Its LR is an
    Adam-scale LR, so it goes through the LR grid like the schedules.

    Hyperparameters: ``variance_smoothing`` (0.9), ``lr_scaling`` (0.1), both from the plan.
    """

    variance_smoothing: float = 0.9
    lr_scaling: float = 0.1
    name: str = "gradient_variance"
    description: str = "Adam/RMSprop with the LR scaled down by the smoothed gradient variance (plan 1)"
    source: str = "experiment plan: gradient-variance adaptive LR (variance smoothing 0.9, LR scaling 0.1)"
    tuned: bool = True
    owns_optimizer: bool = True

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        adam = context.optimizer in ("adam", "adamw")
        optimizer = GradientVarianceAdam(
            params,
            context.base_lr,
            betas=(0.9, 0.999) if adam else (0.9, 0.99),
            variance_smoothing=self.variance_smoothing,
            lr_scaling=self.lr_scaling,
            first_moment_update=adam,
            weight_decay=0.01 if context.optimizer == "adamw" else 0.0,
        )
        return MethodRun(
            optimizer,
            SelfTuningLR(optimizer, _variance_scaled_lr),
            info={"variant": "adam" if adam else "rmsprop"},
        )


@register_method("gradient_variance")
def gradient_variance(variance_smoothing: float = 0.9, lr_scaling: float = 0.1) -> GradientVarianceMethod:
    _unit_interval("variance_smoothing", variance_smoothing)
    if not 0.0 < lr_scaling <= 1.0:
        raise ValueError(f"lr_scaling must be in (0, 1], got {lr_scaling=}")
    return GradientVarianceMethod(variance_smoothing, lr_scaling)


# ----------------------------------------------------------------------------------------------------------
# 2. ALRS: a small network predicting the next epoch's LR, trained online.

Validate = Callable[[], tuple[float, float | None]]


class ALRSNet(nn.Module):
    """Features -> raw output; 2 hidden layers of 64, ReLU, linear output (the plan's architecture).

    The output layer starts at zero, so the untrained network predicts exactly the base LR.
    """

    def __init__(self, inputs: int, hidden: int = 64) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(inputs, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
        )
        last = self.layers[-1]
        assert isinstance(last, nn.Linear)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features).squeeze(-1)


class ALRS:
    """Adaptive LR scheduler (experiment plan 2): per epoch, an online-trained network sets the next LR.

    Features at the end of epoch e: log mean training loss, log ``inner_valid`` loss, ``inner_valid``
    accuracy (0 for tasks without accuracy) - the plan's real-time metrics - plus log(lr / base LR) and
    progress e/E, without which the network could not tell a decay from a warm-up.

    Online training signal (the plan names the network, the metrics and online training, not a target):
    the hypergradient of the training loss with respect to log LR (Baydin et al. 2018), accumulated over
    the epoch as sum_t g_{t+1} . (theta_{t+1} - theta_t). It is exactly d loss / d log lr to first order for
    *any* base optimizer, costs one dot product per step, and needs no extra forward passes. At each epoch
    end the network takes one Adam step on ``h * log_lr_ratio(features_{e-1})`` (h normalised by its running
    RMS), i.e. it moves the LR it predicted for the epoch just finished against the loss's hypergradient,
    then predicts the LR for the next epoch from the new features.

    The output maps to log(lr / base LR) in [log min_ratio, log max_ratio] through a sigmoid, shifted so the
    untrained network (zero output layer) gives exactly the base LR.
    """

    FEATURES = ("log_train_loss", "log_valid_loss", "valid_accuracy", "log_lr_ratio", "progress")

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        steps_per_update: int,
        total_steps: int,
        validate: Validate | None,
        *,
        net_lr: float = 1e-3,
        lr_ratio_bounds: tuple[float, float] = (1e-3, 10.0),
        seed: int = 0,
    ) -> None:
        low, high = lr_ratio_bounds
        if not 0 < low <= 1.0 <= high:
            raise ValueError(f"lr_ratio_bounds must satisfy 0 < low <= 1 <= high, got {lr_ratio_bounds=}")
        if steps_per_update <= 0:
            raise ValueError(f"steps_per_update must be positive, got {steps_per_update=}")
        self.optimizer = optimizer
        self.params = list(params)
        self.steps_per_update = steps_per_update
        self.total_updates = max(1, math.ceil(total_steps / steps_per_update))
        self.validate = validate
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.log_low, self.log_high = math.log(low), math.log(high)
        # Shift so that sigmoid(0 + shift) lands on log ratio 0.
        self._shift = math.log(-self.log_low / self.log_high) if self.log_high > 0 else 20.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = ALRSNet(len(self.FEATURES))
        self.net_optimizer = torch.optim.Adam(self.net.parameters(), lr=net_lr)
        self.last_epoch = 0
        self.updates = 0
        self.log_lr_ratio = 0.0
        self._loss_sum, self._loss_count = 0.0, 0
        self._hypergradient = 0.0
        self._hypergradient_rms = 0.0
        self._previous_features: Tensor | None = None
        self._snapshot = [p.detach().clone() for p in self.params]
        self._last_delta: list[Tensor] | None = None

    def _log_ratio(self, features: Tensor) -> Tensor:
        raw = self.net(features)
        return self.log_low + (self.log_high - self.log_low) * torch.sigmoid(raw + self._shift)

    @torch.no_grad()
    def _track_hypergradient(self) -> None:
        if self._last_delta is not None:
            pairs = [
                (p.grad, d) for p, d in zip(self.params, self._last_delta, strict=True) if p.grad is not None
            ]
            value = dot([g for g, _ in pairs], [d for _, d in pairs])
            if math.isfinite(value):
                self._hypergradient += value
        current = [p.detach() for p in self.params]
        self._last_delta = list(torch._foreach_sub(current, self._snapshot))
        torch._foreach_copy_(self._snapshot, current)

    def step(self, loss: Tensor | float | None = None) -> None:
        value = as_float(loss)
        if value is not None and math.isfinite(value):
            self._loss_sum += value
            self._loss_count += 1
        self._track_hypergradient()
        self.last_epoch += 1
        if self.last_epoch % self.steps_per_update == 0:
            self._end_epoch()

    def _features(self) -> Tensor:
        train_loss = self._loss_sum / self._loss_count if self._loss_count else float("nan")
        valid_loss, accuracy = self.validate() if self.validate is not None else (train_loss, None)

        def log_loss(x: float) -> float:  # a diverged loss reads as "very large", not NaN
            return math.log(max(x, 1e-8)) if math.isfinite(x) else math.log(1e8)

        return torch.tensor(
            [
                log_loss(train_loss),
                log_loss(valid_loss),
                accuracy if accuracy is not None else 0.0,
                self.log_lr_ratio,
                self.updates / self.total_updates,
            ]
        )

    def _end_epoch(self) -> None:
        features = self._features()
        self.updates += 1
        h = self._hypergradient
        if self._previous_features is not None and h != 0.0:
            self._hypergradient_rms = math.sqrt(0.9 * self._hypergradient_rms**2 + 0.1 * h * h)
            normalised = max(-3.0, min(3.0, h / self._hypergradient_rms))
            self.net_optimizer.zero_grad()
            (normalised * self._log_ratio(self._previous_features)).backward()
            self.net_optimizer.step()
        with torch.no_grad():
            self.log_lr_ratio = float(self._log_ratio(features))
        _write_lrs(self.optimizer, [base * math.exp(self.log_lr_ratio) for base in self.base_lrs])
        self._previous_features = features
        self._hypergradient = 0.0
        self._loss_sum, self._loss_count = 0.0, 0

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


def _inner_valid_metrics(task: Task, model: nn.Module, max_examples: int) -> Validate:
    def validate() -> tuple[float, float | None]:
        was_training = model.training
        model.eval()
        try:
            metrics = task.evaluate(model, "inner_valid", max_examples=max_examples)
        finally:
            model.train(was_training)
        return metrics["loss"], metrics.get("accuracy")

    return validate


@dataclass(frozen=True)
class ALRSMethod:
    """ALRS (experiment plan 2): the task's base optimizer with the LR set each epoch by :class:`ALRS`.

    Hyperparameters: ``update_every_epochs`` (1.0: the plan predicts the next epoch's LR), ``net_lr`` (1e-3,
    Adam on the 2x64 network), ``min_lr_ratio``/``max_lr_ratio`` (1e-3 / 10: the LR stays within those
    multiples of the base LR), ``valid_examples`` (512: cap on the ``inner_valid`` pass per epoch). If the
    task's model does not own the optimised parameters, the validation metrics fall back to the training
    loss (accuracy 0).
    """

    update_every_epochs: float = 1.0
    net_lr: float = 1e-3
    min_lr_ratio: float = 1e-3
    max_lr_ratio: float = 10.0
    valid_examples: int = 512
    name: str = "alrs"
    description: str = (
        "ALRS: 2x64 ReLU net predicts each epoch's LR from loss/accuracy, trained online (plan 2)"
    )
    source: str = (
        "experiment plan: ALRS (online LR network); training signal: hypergradient, Baydin et al. 2018"
    )
    tuned: bool = True
    owns_optimizer: bool = False

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        params = require_list(params)
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        model = model_owning(params, context)
        validate = (
            _inner_valid_metrics(context.task, model, self.valid_examples) if model is not None else None
        )
        scheduler = ALRS(
            optimizer,
            params,
            _steps_per_epochs(self.update_every_epochs, context),
            context.total_steps,
            validate,
            net_lr=self.net_lr,
            lr_ratio_bounds=(self.min_lr_ratio, self.max_lr_ratio),
            seed=context.task.spec.seed,
        )
        return MethodRun(optimizer, scheduler, info={"steps_per_update": scheduler.steps_per_update})


@register_method("alrs")
def alrs(
    update_every_epochs: float = 1.0,
    net_lr: float = 1e-3,
    min_lr_ratio: float = 1e-3,
    max_lr_ratio: float = 10.0,
    valid_examples: int = 512,
) -> ALRSMethod:
    _positive("update_every_epochs", update_every_epochs)
    _positive("net_lr", net_lr)
    if not 0 < min_lr_ratio <= 1.0 <= max_lr_ratio:
        raise ValueError(f"need 0 < min_lr_ratio <= 1 <= max_lr_ratio, got {min_lr_ratio=}, {max_lr_ratio=}")
    return ALRSMethod(update_every_epochs, net_lr, min_lr_ratio, max_lr_ratio, valid_examples)


# ----------------------------------------------------------------------------------------------------------
# 3. Uncertainty-threshold scheduler.


def categorical_variance(logits: Tensor) -> float:
    """Mean predictive variance of a categorical prediction, 1 - sum_k p_k^2 (= sum_k Var[1{y=k}]).

    0 for a certain prediction, 1 - 1/K for a uniform one.
    """
    probs = F.softmax(logits.float(), dim=-1)
    return float((1.0 - probs.square().sum(-1)).mean())


class UncertaintyThresholdLR:
    """Uncertainty-threshold scheduler (experiment plan 3).

    Each step it measures the gradient norm (all parameters together) and the prediction variance; if
    either exceeds its threshold the LR is multiplied by ``decrease`` (0.5), otherwise by ``increase`` (1.05).

    *Prediction variance*: for classifiers, the mean categorical predictive variance (:func:`categorical_variance`)
    of the outputs of the batch just trained on, read by a forward hook on the task's model (training
    forwards only, so evaluation passes do not count); ``observe_outputs`` feeds outputs explicitly where a
    harness prefers to. Where no class outputs exist (regression, or a model that is not the task's), the
    documented proxy is the variance of the training loss around its exponential moving average (smoothing
    ``loss_smoothing`` = 0.9): a noisy loss signals uncertain predictions.

    *Increase factor 1.05*: the "bold driver" rule (Vogl et al. 1988; Battiti 1989) pairs a 0.5 cut with a
    5% increase; asymmetric (AIMD-like) steps back off at once and recover over ln 2 / ln 1.05 = 14 calm
    steps, so a single noisy batch cannot make the LR oscillate.

    The LR stays within [``min_lr_ratio``, ``max_lr_ratio``] x base LR (1e-3 and 1): the floor keeps it
    positive and able to recover (thresholds this low trip often); the ceiling is the tuned base LR, so
    the rule backs off from the grid point and returns to it, never overshoots it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        params: Sequence[Tensor],
        *,
        num_classes: int | None = None,
        tap: OutputTap | None = None,
        variance_threshold: float = 0.01,
        grad_norm_threshold: float = 0.1,
        decrease: float = 0.5,
        increase: float = 1.05,
        min_lr_ratio: float = 1e-3,
        max_lr_ratio: float = 1.0,
        loss_smoothing: float = 0.9,
    ) -> None:
        _positive("variance_threshold", variance_threshold)
        _positive("grad_norm_threshold", grad_norm_threshold)
        if not 0 < decrease < 1 <= increase:
            raise ValueError(f"need 0 < decrease < 1 <= increase, got {decrease=}, {increase=}")
        if not 0 < min_lr_ratio <= max_lr_ratio:
            raise ValueError(f"need 0 < min_lr_ratio <= max_lr_ratio, got {min_lr_ratio=}, {max_lr_ratio=}")
        _unit_interval("loss_smoothing", loss_smoothing)
        self.optimizer = optimizer
        self.params = list(params)
        self.num_classes = num_classes
        self.tap = tap
        self.variance_threshold = variance_threshold
        self.grad_norm_threshold = grad_norm_threshold
        self.decrease, self.increase = decrease, increase
        self.min_lr_ratio, self.max_lr_ratio = min_lr_ratio, max_lr_ratio
        self.loss_smoothing = loss_smoothing
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.scale = 1.0
        self.last_epoch = 0
        self._loss_mean: float | None = None
        self._loss_variance = 0.0
        self._outputs: Tensor | None = None
        self.last_grad_norm = 0.0
        self.last_variance = 0.0
        self.last_variance_source = "none"

    def observe_outputs(self, outputs: Tensor) -> None:
        """Feed the model's outputs on the batch just trained on (overrides the forward hook)."""
        self._outputs = outputs.detach()

    def _loss_proxy(self, loss: float | None) -> float:
        if loss is None or not math.isfinite(loss):
            return self._loss_variance
        if self._loss_mean is None:
            self._loss_mean = loss
            return 0.0
        rho = self.loss_smoothing
        self._loss_variance = rho * self._loss_variance + (1 - rho) * (loss - self._loss_mean) ** 2
        self._loss_mean = rho * self._loss_mean + (1 - rho) * loss
        return self._loss_variance

    def _prediction_variance(self, loss: float | None) -> tuple[float, str]:
        proxy = self._loss_proxy(loss)  # kept current every step so a switch of source is seamless
        outputs = self._outputs if self._outputs is not None else (self.tap.take() if self.tap else None)
        self._outputs = None
        if (
            outputs is not None
            and self.num_classes
            and outputs.ndim >= 2
            and outputs.shape[-1] == self.num_classes
        ):
            return categorical_variance(outputs), "outputs"
        return proxy, "loss"

    def step(self, loss: Tensor | float | None = None) -> None:
        grad_norm = global_grad_norm(self.params)
        variance, source = self._prediction_variance(as_float(loss))
        # A NaN measurement counts as exceeding its threshold: back off rather than trust it.
        calm = grad_norm <= self.grad_norm_threshold and variance <= self.variance_threshold
        factor = self.increase if calm else self.decrease
        self.scale = min(max(self.scale * factor, self.min_lr_ratio), self.max_lr_ratio)
        _write_lrs(self.optimizer, [base * self.scale for base in self.base_lrs])
        self.last_grad_norm, self.last_variance, self.last_variance_source = grad_norm, variance, source
        self.last_epoch += 1

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


@dataclass(frozen=True)
class UncertaintyMethod:
    """Uncertainty-threshold scheduler (experiment plan 3) on the task's base optimizer; see
    :class:`UncertaintyThresholdLR`.

    Hyperparameters: ``variance_threshold`` (0.01), ``grad_norm_threshold`` (0.1), ``decrease`` (0.5), all from
    the plan; ``increase`` (1.05, bold driver), ``min_lr_ratio`` (1e-3), ``max_lr_ratio`` (1.0).
    """

    variance_threshold: float = 0.01
    grad_norm_threshold: float = 0.1
    decrease: float = 0.5
    increase: float = 1.05
    min_lr_ratio: float = 1e-3
    max_lr_ratio: float = 1.0
    name: str = "uncertainty"
    description: str = "halve the LR when prediction variance > 0.01 or grad norm > 0.1, else x1.05 (plan 3)"
    source: str = (
        "experiment plan: uncertainty-threshold scheduler; increase factor: bold driver, Vogl et al. 1988"
    )
    tuned: bool = True
    owns_optimizer: bool = False

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        params = require_list(params)
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        model = model_owning(params, context)
        scheduler = UncertaintyThresholdLR(
            optimizer,
            params,
            num_classes=context.task.num_classes,
            tap=OutputTap(model) if model is not None and context.task.num_classes else None,
            variance_threshold=self.variance_threshold,
            grad_norm_threshold=self.grad_norm_threshold,
            decrease=self.decrease,
            increase=self.increase,
            min_lr_ratio=self.min_lr_ratio,
            max_lr_ratio=self.max_lr_ratio,
        )
        return MethodRun(optimizer, scheduler)


@register_method("uncertainty")
def uncertainty(
    variance_threshold: float = 0.01,
    grad_norm_threshold: float = 0.1,
    decrease: float = 0.5,
    increase: float = 1.05,
    min_lr_ratio: float = 1e-3,
    max_lr_ratio: float = 1.0,
) -> UncertaintyMethod:
    return UncertaintyMethod(
        variance_threshold, grad_norm_threshold, decrease, increase, min_lr_ratio, max_lr_ratio
    )


# ----------------------------------------------------------------------------------------------------------
# 4. Resource-aware scheduler.


@dataclass(frozen=True)
class ResourceReading:
    """Fractions in [0, 1]; None where the platform cannot measure them."""

    utilisation: float | None
    memory: float | None


class ResourceProbe(Protocol):
    """Measures resource use since the previous reading."""

    def read(self) -> ResourceReading: ...


def _clip01(x: float) -> float:
    return min(max(x, 0.0), 1.0)


def _process_memory_fraction() -> float | None:
    """Resident memory of this process / physical memory (psutil if installed, else /proc, else peak RSS)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return _clip01(psutil.Process().memory_info().rss / psutil.virtual_memory().total)
    except ImportError:
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = os.sysconf("SC_PHYS_PAGES") * page
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/proc/self/statm") as statm:
            return _clip01(int(statm.read().split()[1]) * page / total)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return _clip01(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / total)  # KiB on Linux
    except (ImportError, OSError):
        return None


class CpuProbe:
    """CPU-side measurements: process CPU time over wall time per available core, and resident memory."""

    def __init__(self) -> None:
        affinity = getattr(os, "sched_getaffinity", None)
        self.cores = len(affinity(0)) if affinity is not None else (os.cpu_count() or 1)
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def read(self) -> ResourceReading:
        cpu, wall = time.process_time(), time.perf_counter()
        elapsed = wall - self._wall
        utilisation = _clip01((cpu - self._cpu) / (elapsed * self.cores)) if elapsed > 0 else None
        self._cpu, self._wall = cpu, wall
        return ResourceReading(utilisation, _process_memory_fraction())


class CudaProbe:
    """Device utilisation (``torch.cuda.utilization``, needs NVML; None without it) and device memory in use."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def read(self) -> ResourceReading:
        try:
            utilisation: float | None = torch.cuda.utilization(self.device) / 100.0
        except Exception:  # no pynvml / NVML: throughput stands in (see ResourceAwareLR)
            utilisation = None
        free, total = torch.cuda.mem_get_info(self.device)
        return ResourceReading(utilisation, _clip01(1 - free / total))


def default_probe(device: torch.device) -> ResourceProbe:
    return CudaProbe(device) if device.type == "cuda" else CpuProbe()


def data_complexity(batch_size: int, num_classes: int | None, num_features: int) -> float:
    """Dataset/batch complexity in [0, 1]: the mean of three log-scaled terms.

    * classes: log K / log 1000 (ImageNet's 1000 classes = 1; regression = 0);
    * features: log F / log (224*224*3) (an ImageNet input = 1);
    * batch: 1 - log B / log 4096 (small batches give noisier gradients; 4096 = 0).
    """
    classes = math.log(num_classes) / math.log(1000) if num_classes and num_classes > 1 else 0.0
    features = math.log(max(num_features, 1)) / math.log(224 * 224 * 3)
    batch = 1 - math.log(max(batch_size, 1)) / math.log(4096)
    return (_clip01(classes) + _clip01(features) + _clip01(batch)) / 3


class ResourceAwareLR:
    """Resource-aware scheduler (experiment plan 4): each epoch, LR = clip(base * gain^(1 - 2s), 1e-6, 1e-2).

    s = w_resource * u + w_data * d with the plan's weights 0.5 / 0.5, where u in [0, 1] is resource pressure
    and d in [0, 1] is :func:`data_complexity`. s = 0.5 keeps the base LR; s = 0 multiplies it by ``gain``
    (2), s = 1 divides it by ``gain``: high load and complex data both make the LR more conservative (a
    diverged run wastes the scarce resource; harder data wants smaller steps), light load and easy data
    allow a larger one.

    u is the mean of the available measurements: device (or process CPU) utilisation and memory in use from
    the probe; where utilisation cannot be measured, throughput stands in, as the slowdown 1 - thr / best
    thr of examples per second this epoch against the best epoch so far. The first epoch, before anything
    was measured, uses u = 0.5 (neutral). The plan's bounds [1e-6, 1e-2] are absolute and Adam-scale: on
    SGD tasks with a base LR above 1e-2 the LR is capped at 1e-2.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        probe: ResourceProbe,
        *,
        steps_per_epoch: int,
        batch_size: int,
        complexity: float,
        weights: tuple[float, float] = (0.5, 0.5),
        lr_bounds: tuple[float, float] = (1e-6, 1e-2),
        gain: float = 2.0,
    ) -> None:
        if steps_per_epoch <= 0 or batch_size <= 0:
            raise ValueError(
                f"steps_per_epoch and batch_size must be positive, got {steps_per_epoch=}, {batch_size=}"
            )
        if not (0 < lr_bounds[0] <= lr_bounds[1]):
            raise ValueError(f"lr_bounds must satisfy 0 < low <= high, got {lr_bounds=}")
        if min(weights) < 0 or not math.isclose(sum(weights), 1.0):
            raise ValueError(f"weights must be non-negative and sum to 1, got {weights=}")
        _positive("gain", gain)
        _unit_interval("complexity", complexity, closed_right=True)
        self.optimizer = optimizer
        self.probe = probe
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.complexity = complexity
        self.weights = weights
        self.lr_bounds = lr_bounds
        self.gain = gain
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_epoch = 0
        self.pressure = 0.5
        self.best_throughput = 0.0
        self.last_reading = ResourceReading(None, None)
        self._epoch_started = time.perf_counter()
        self._apply()

    def _apply(self) -> None:
        score = self.weights[0] * self.pressure + self.weights[1] * self.complexity
        multiplier = self.gain ** (1 - 2 * score)
        low, high = self.lr_bounds
        _write_lrs(self.optimizer, [min(max(base * multiplier, low), high) for base in self.base_lrs])

    def _measure(self) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._epoch_started, 1e-9)
        self._epoch_started = now
        throughput = self.steps_per_epoch * self.batch_size / elapsed
        self.best_throughput = max(self.best_throughput, throughput)
        reading = self.probe.read()
        self.last_reading = reading
        busy = (
            reading.utilisation if reading.utilisation is not None else 1 - throughput / self.best_throughput
        )
        terms = [busy] + ([reading.memory] if reading.memory is not None else [])
        self.pressure = _clip01(sum(terms) / len(terms))

    def step(self, loss: Tensor | float | None = None) -> None:
        self.last_epoch += 1
        if self.last_epoch % self.steps_per_epoch == 0:
            self._measure()
            self._apply()

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self.optimizer.param_groups]


def _feature_count(task: Task) -> int:
    """Per-example size of the training inputs (column ``x`` where there is one)."""
    columns = task.splits["train"]
    column = columns["x"] if "x" in columns else next(iter(columns.values()))
    return int(column[0].numel())


@dataclass(frozen=True)
class ResourceAwareMethod:
    """Resource-aware scheduler (experiment plan 4) on the task's base optimizer; see :class:`ResourceAwareLR`.

    Measures CUDA utilisation and memory on a GPU run, process CPU utilisation and resident memory on CPU
    (``time.process_time``, ``/proc``; psutil if installed), throughput where utilisation is unavailable.

    Hyperparameters: ``resource_weight`` (0.5; the data weight is 1 - it), ``min_lr``/``max_lr`` (1e-6 / 1e-2),
    all from the plan; ``gain`` (2: the LR moves within [base/2, 2*base] before the bounds).
    """

    resource_weight: float = 0.5
    min_lr: float = 1e-6
    max_lr: float = 1e-2
    gain: float = 2.0
    name: str = "resource_aware"
    description: str = (
        "per-epoch LR from resource use and batch/dataset complexity, 0.5/0.5, in [1e-6, 1e-2] (plan 4)"
    )
    source: str = "experiment plan: resource-aware scheduler (weights 0.5/0.5, LR bounds [1e-6, 1e-2])"
    tuned: bool = True
    owns_optimizer: bool = False

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        params = require_list(params)
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        task = context.task
        train_size = next(iter(task.splits["train"].values())).shape[0]
        batch_size = min(task.spec.batch_size, train_size)
        scheduler = ResourceAwareLR(
            optimizer,
            default_probe(params[0].device),
            steps_per_epoch=context.steps_per_epoch,
            batch_size=batch_size,
            complexity=data_complexity(batch_size, task.num_classes, _feature_count(task)),
            weights=(self.resource_weight, 1 - self.resource_weight),
            lr_bounds=(self.min_lr, self.max_lr),
            gain=self.gain,
        )
        return MethodRun(optimizer, scheduler, info={"complexity": scheduler.complexity})


@register_method("resource_aware")
def resource_aware(
    resource_weight: float = 0.5, min_lr: float = 1e-6, max_lr: float = 1e-2, gain: float = 2.0
) -> ResourceAwareMethod:
    _unit_interval("resource_weight", resource_weight, closed_right=True)
    if not 0 < min_lr <= max_lr:
        raise ValueError(f"need 0 < min_lr <= max_lr, got {min_lr=}, {max_lr=}")
    _positive("gain", gain)
    return ResourceAwareMethod(resource_weight, min_lr, max_lr, gain)
