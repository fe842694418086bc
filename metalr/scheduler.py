"""Deployment: a frozen controller as a ``torch.optim.lr_scheduler.LRScheduler``.

Example:
    >>> from metalr import load_controller, LearnedLR
    >>> controller = load_controller("demo")
    >>> sched = LearnedLR(optimizer, controller, total_steps=T)
    >>> for step in range(T):
    ...     loss = loss_fn(model(x), y); loss.backward()
    ...     optimizer.step()
    ...     sched.step(loss)            # reads the loss and the gradients still on the parameters
    ...     optimizer.zero_grad()

``step(loss)`` is called after ``optimizer.step()``, like ``ReduceLROnPlateau.step(metrics)``. It builds the
same :class:`~metalr.features.Observation` that the meta-training unroll builds and calls the same
:func:`~metalr.features.compute_features` through :meth:`LRController.step`, so the LR trajectory is the
one the controller was trained to produce (``tests/test_scheduler.py`` checks this against the unroll).
Every param group keeps its own scale: ``lr_g = clamp(initial_lr_g * base_schedule(t) * exp(log_factor))``.

This module imports nothing from ``metalr.meta``: deploying a controller never loads differentiation code.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from metalr.checkpoint import load_controller
from metalr.controller import LRController, PolicyState
from metalr.features import FeatureState, Observation, predictive_entropy

_NAN = float("nan")


def _validate_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"LearnedLR needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for i, group in enumerate(optimizer.param_groups):
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(
                f"param group {i} of {type(optimizer).__name__} has lr={group.get('lr')!r}; LearnedLR scales each "
                "group's initial learning rate, so every group needs a positive finite 'lr'"
            )


class LearnedLR(LRScheduler):
    """Per-step learning rates from a meta-learned controller.

    Args:
        optimizer: any ``torch.optim`` optimizer; every param group needs a positive ``lr`` (its base LR).
        controller: an :class:`LRController`, or a checkpoint path / shipped name for :func:`load_controller`.
        total_steps: the step budget T (the controller sees progress t/T).
        time_budget_s: optional wall-clock budget; feeds the ``resource`` feature when the controller reads it.
        last_epoch: as in every torch scheduler (-1 = fresh start).

    Call ``step(loss)`` once per optimizer step, after ``optimizer.step()``. ``step()`` without a loss holds
    the loss features at their last value (and warns once). ``observe_validation(loss)`` and
    ``observe_outputs(logits)`` feed the optional validation and uncertainty features.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        controller: LRController | str | os.PathLike[str],
        total_steps: int,
        *,
        time_budget_s: float | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps=!r}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive when given, got {time_budget_s=!r}")
        _validate_optimizer(optimizer)
        if not isinstance(controller, LRController):
            controller = load_controller(controller)
        self.controller = controller
        self.total_steps = total_steps
        self.time_budget_s = time_budget_s
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        net_param = next(controller.net.parameters())
        self._device = self._params[0].device if self._params else net_param.device
        if net_param.device != self._device:
            controller.to(self._device)
        with torch.no_grad():
            self._state: PolicyState = controller.initial_state([p.detach() for p in self._params])
        self._last_loss = _NAN
        self._pending_valid = _NAN
        self._pending_entropy = _NAN
        self._warned_no_loss = False
        self._started = time.perf_counter()
        self._initializing = True
        super().__init__(optimizer, last_epoch)
        self._initializing = False

    # -- the LRScheduler contract ------------------------------------------------------------------------

    def _scale(self) -> float:
        policy = self.controller.policy
        return float(policy.lr_scale(self._state.log_factor, float(max(self.last_epoch, 0)), float(self.total_steps)))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        policy = self.controller.policy
        scale = self._scale()
        return [min(max(base * scale, policy.min_lr), policy.max_lr) for base in self.base_lrs]

    def step(self, loss: Tensor | float | None = None, epoch: None = None) -> None:  # type: ignore[override]
        """Observe the step just taken (its loss and the gradients on the parameters) and set the next LR."""
        if epoch is not None:
            raise TypeError("LearnedLR.step takes the training loss, not an epoch number")
        if self._initializing:  # torch's constructor calls step() once to write the step-0 LR
            self.last_epoch += 1
            self._write(self.get_lr())
            return
        if loss is None:
            if not self._warned_no_loss:
                warnings.warn(
                    "LearnedLR.step() called without a loss: the loss features are held at their last value; "
                    "pass the training loss, sched.step(loss), for the controller to see training progress",
                    stacklevel=2,
                )
                self._warned_no_loss = True
            # No loss seen yet: a constant stands in, so the loss features read "flat", not "diverged".
            value = self._last_loss if math.isfinite(self._last_loss) else 1.0
        else:
            value = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)
        self._observe(value)
        self.last_epoch += 1
        self._write(self.get_lr())

    def _write(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = lrs

    # -- observing -----------------------------------------------------------------------------------------

    def observe_validation(self, valid_loss: Tensor | float) -> None:
        """Feed an ``inner_valid`` loss measured since the last step (validation features)."""
        self._pending_valid = float(valid_loss)

    def observe_outputs(self, logits: Tensor) -> None:
        """Feed the model's outputs on the current batch (uncertainty feature)."""
        self._pending_entropy = float(predictive_entropy(logits))

    @torch.no_grad()
    def _observe(self, loss: float) -> None:
        state = self._state
        fstate = state.features
        dtype = fstate.loss_ema.dtype
        device = self._device
        grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in self._params]
        lr = float(self.optimizer.param_groups[0]["lr"])
        budget = (time.perf_counter() - self._started) / self.time_budget_s if self.time_budget_s else _NAN

        def scalar(x: float) -> Tensor:
            return torch.tensor(x, dtype=dtype, device=device)

        obs = Observation(
            loss=scalar(loss),
            grads=grads,
            params=[p.detach() for p in self._params],
            lr=scalar(lr),
            lr_rel=scalar(lr / self.base_lrs[0]),
            total_steps=scalar(float(self.total_steps)),
            valid_loss=scalar(self._pending_valid),
            entropy=scalar(self._pending_entropy),
            budget_used=scalar(budget),
        )
        _, new_state = self.controller.step(state, obs)
        new_f = new_state.features
        # The feature state keeps references to what it was given; keep private copies of the tensors the
        # user's loop will overwrite in place (parameters, gradients).
        prev_params = fstate.prev_params
        torch._foreach_copy_(list(prev_params), list(obs.params))
        grads_finite = bool(torch.isfinite(new_f.grad_norm))
        if grads_finite:
            prev_grads = fstate.prev_grads
            torch._foreach_copy_(list(prev_grads), grads)
            grad_mean = new_f.grad_mean
        else:  # a poisoned gradient must not contaminate the running statistics
            prev_grads, grad_mean = fstate.prev_grads, fstate.grad_mean
        new_f = new_f._replace(prev_params=prev_params, prev_grads=prev_grads, grad_mean=grad_mean)
        self._state = PolicyState(new_f, new_state.log_factor, new_state.hidden)
        if math.isfinite(loss):
            self._last_loss = loss
        self._pending_valid = self._pending_entropy = _NAN

    @property
    def guard_triggered(self) -> bool:
        """Whether the last observed step tripped the divergence guardrail."""
        return bool(self._state.features.alarm > 0)

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step count, base LRs and the controller's running state; not the optimizer, not the weights."""
        fstate = self._state.features
        return {
            "last_epoch": self.last_epoch,
            "total_steps": self.total_steps,
            "base_lrs": list(self.base_lrs),
            "_last_lr": list(self._last_lr),
            "last_loss": self._last_loss,
            "warned_no_loss": self._warned_no_loss,
            "feature_state": {
                name: [t.clone() for t in value] if isinstance(value, tuple) else value.clone()
                for name, value in fstate._asdict().items()
            },
            "log_factor": self._state.log_factor.clone(),
            "hidden": self._state.hidden.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        fields = state_dict["feature_state"]
        current = self._state.features
        restored: dict[str, Any] = {}
        for name, value in current._asdict().items():
            saved = fields[name]
            if isinstance(value, tuple):
                if len(saved) != len(value) or any(s.shape != v.shape for s, v in zip(saved, value, strict=True)):
                    raise ValueError(
                        f"LearnedLR state was saved for parameters of shapes {[tuple(s.shape) for s in saved]}, "
                        f"this optimizer has {[tuple(v.shape) for v in value]}"
                    )
                restored[name] = tuple(s.to(v.device, v.dtype).clone() for s, v in zip(saved, value, strict=True))
            else:
                restored[name] = saved.to(value.device, value.dtype).clone()
        self._state = PolicyState(
            FeatureState(**restored),
            state_dict["log_factor"].to(self._device).clone(),
            state_dict["hidden"].to(self._device).clone(),
        )
        self.last_epoch = int(state_dict["last_epoch"])
        self.total_steps = int(state_dict["total_steps"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._last_lr = list(state_dict["_last_lr"])
        self._last_loss = float(state_dict["last_loss"])
        self._warned_no_loss = bool(state_dict["warned_no_loss"])
