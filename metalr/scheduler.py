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

``step(loss)`` is called after ``optimizer.step()`` and before ``optimizer.zero_grad()``, like
``ReduceLROnPlateau.step(metrics)``. It builds the same :class:`~metalr.features.Observation` that the
meta-training unroll (``metalr.meta.unroll.inner_step``) builds - loss and gradients at theta_t, parameters
after the update, the LR used for the step and that LR relative to the base LR - and calls the same
:func:`~metalr.features.compute_features` through :meth:`LRController.step`, so the LR trajectory is the
one the controller was trained to produce. Every param group keeps its own scale:
``lr_g = clamp(initial_lr_g * base_schedule(t) * exp(log_factor), min_lr, max_lr)``.

What the controller sees in the training stacks users run (each is tested in ``tests/integrations/``):

* **Gradient accumulation**: call ``step`` once per optimizer step. Pass the loss averaged over the
  micro-batches, or call :meth:`LearnedLR.observe_loss` after each micro-batch and ``step()`` without an
  argument (it uses the mean of the observed losses). Accumulating k micro-batches then gives the same
  features as one batch k times larger, which is what the controller saw in meta-training.
* **Gradient clipping**: clip before ``optimizer.step()`` as usual; the features then read the clipped
  gradient, because that is the gradient the optimizer applied, and in meta-training the observed gradient
  was always the applied one (the unroll does not clip). The secant-curvature and update-ratio features
  relate the gradient to the parameter change it caused, which only holds for the applied gradient.
* **Mixed precision**: autocast needs nothing (gradients live in the parameters' dtype). With a
  ``torch.amp.GradScaler`` pass ``scaler=`` so that steps the scaler skipped (inf/NaN gradients) leave the
  controller's state, the step count and the LR untouched - the optimizer did not step either. Features
  always read unscaled gradients: ``scaler.step`` unscales the ``.grad`` tensors in place (or
  ``scaler.unscale_`` did, for clipping) before ``sched.step`` runs.
* **DistributedDataParallel**: gradients are already averaged across ranks by DDP; the loss is averaged
  with one ``all_reduce`` inside ``step`` (``sync_loss``, on by default when a process group with more than
  one rank is initialised), so every rank computes the same LR, bit for bit.
* **torch.compile**: the features are computed eagerly in ``step``, outside the user's compiled graph;
  nothing in the model's forward/backward changes.

Cost per step: fused multi-tensor reductions over the gradients and parameters (no Python loop over
elements), persistent buffers for the previous parameters and gradients, and one device-to-host transfer
(the new LR must reach the optimizer's ``param_group["lr"]`` as a Python float). ``bench/bench_overhead.py``
measures it against ``CosineAnnealingLR``.

This module imports nothing from ``metalr.meta``: deploying a controller never loads differentiation code.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from metalr.checkpoint import load_controller
from metalr.controller import LRController, PolicyState
from metalr.features import FeatureState, Observation, predictive_entropy

_NAN = float("nan")

# Slots of the packed host->device scalar vector built once per step (one transfer instead of six).
_LR, _LR_REL, _TOTAL, _VALID, _ENTROPY, _BUDGET = range(6)


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


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class LearnedLR(LRScheduler):
    """Per-step learning rates from a meta-learned controller.

    Args:
        optimizer: any ``torch.optim`` optimizer; every param group needs a positive ``lr`` (its base LR).
        controller: an :class:`LRController`, or a checkpoint path / shipped name for :func:`load_controller`.
        total_steps: the step budget T, in optimizer steps (the controller sees progress t/T).
        time_budget_s: optional wall-clock budget; feeds the ``resource`` feature when the controller reads it.
        scaler: the ``torch.amp.GradScaler`` that steps ``optimizer``, if any. Steps it skipped because of
            inf/NaN gradients are not observed: the controller's state, the step count and the LR stay as
            they were (``skipped_steps`` counts them). Reading the scaler's verdict costs one more host
            sync per step on CUDA.
        sync_loss: average the loss over the ranks of the default process group before computing features,
            so that every rank computes the same LR. ``None`` (default): when ``torch.distributed`` is
            initialised with more than one rank. Every rank must then call ``step`` (it is a collective).
        last_epoch: as in every torch scheduler (-1 = fresh start).

    Call ``step(loss)`` once per optimizer step, after ``optimizer.step()`` and before ``zero_grad()``.
    ``step()`` without a loss uses the micro-batch losses given to :meth:`observe_loss` since the last step;
    if there are none it holds the loss features at their last value (and warns once).
    :meth:`observe_validation` and :meth:`observe_outputs` feed the optional validation and uncertainty
    features. Every LR written is finite and within the controller's ``[min_lr, max_lr]``.

    Example:
        >>> scaler = torch.amp.GradScaler("cuda")
        >>> sched = LearnedLR(optimizer, "demo", total_steps=10_000, scaler=scaler)
        >>> with torch.autocast("cuda", dtype=torch.float16):
        ...     loss = loss_fn(model(x), y)
        >>> scaler.scale(loss).backward()
        >>> scaler.step(optimizer); scaler.update()
        >>> sched.step(loss)
        >>> optimizer.zero_grad()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        controller: LRController | str | os.PathLike[str],
        total_steps: int,
        *,
        time_budget_s: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        sync_loss: bool | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps=!r}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive when given, got {time_budget_s=!r}")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        _validate_optimizer(optimizer)
        if not isinstance(controller, LRController):
            controller = load_controller(controller)
        self.controller = controller
        self.total_steps = total_steps
        self.time_budget_s = time_budget_s
        self.scaler = scaler
        self.sync_loss = sync_loss
        self.skipped_steps = 0
        self._params: list[Tensor] = [p for group in optimizer.param_groups for p in group["params"]]
        net_param = next(controller.net.parameters())
        self._device = self._params[0].device if self._params else net_param.device
        if net_param.device != self._device:
            controller.to(self._device)
        with torch.no_grad():
            self._state: PolicyState = controller.initial_state([p.detach() for p in self._params])
        self._dtype = self._state.features.loss_ema.dtype
        # Stand-ins for parameters that received no gradient this step (frozen layers, unused branches):
        # the unroll always sees a gradient for every parameter, and zero is what autograd would give.
        self._zero_grads: dict[int, Tensor] = {}
        # Until a loss is seen, a constant stands in: the loss features read "flat", not "diverged".
        self._last_loss = torch.ones((), dtype=self._dtype, device=self._device)
        self._loss_sum: Tensor | None = None
        self._loss_count = 0
        self._pending_valid = _NAN
        self._pending_entropy = _NAN
        self._warned_no_loss = False
        self._scale_seen: float | None = float(scaler.get_scale()) if scaler is not None else None
        self._started = time.perf_counter()
        self._lr_scale = 1.0
        self._initializing = True
        super().__init__(optimizer, last_epoch)
        self._initializing = False

    # -- the LRScheduler contract ------------------------------------------------------------------------

    def _host_scale(self, log_factor: Tensor, step: int) -> float:
        policy = self.controller.policy
        return float(policy.lr_scale(log_factor, float(step), float(self.total_steps)))

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The LR of every param group for the current step (finite, within ``[min_lr, max_lr]``)."""
        policy = self.controller.policy
        scale = self._lr_scale
        lrs = []
        for base in self.base_lrs:
            lr = float(base) * scale
            # NaN compares false with everything, so min/max alone would let it through. A NaN scale (only a
            # corrupted controller produces one) takes the safe side, the lower bound; an overflow to +inf
            # of a finite scale times a huge base LR is clamped to the upper bound like any large LR.
            if not math.isfinite(lr):
                lr = policy.max_lr if lr == math.inf else policy.min_lr
            lr = min(max(lr, policy.min_lr), policy.max_lr)
            # Last line of defence against a policy whose bounds are themselves infinite (PolicyConfig should
            # refuse them): an infinite LR is never written; the group's own base LR stands in.
            lrs.append(lr if math.isfinite(lr) else float(base))
        return lrs

    def step(self, loss: Tensor | float | None = None, epoch: None = None) -> None:  # type: ignore[override]
        """Observe the optimizer step just taken and write the LR for the next one.

        Args:
            loss: the training loss of the step (a scalar tensor, on any device, or a float): the loss the
                gradients came from, averaged over micro-batches when accumulating. ``None`` uses the losses
                recorded with :meth:`observe_loss`, or holds the last loss (with a one-time warning).
            epoch: not supported (torch's deprecated ``epoch`` argument); raises ``TypeError``.
        """
        if epoch is not None:
            raise TypeError("LearnedLR.step takes the training loss, not an epoch number")
        self._step_count += 1
        if self._initializing:  # torch's constructor calls step() once to write the step-0 LR
            self.last_epoch += 1
            self._lr_scale = self._host_scale(self._state.log_factor, self.last_epoch)
            self._write(self.get_lr())
            return
        loss_tensor = self._loss_for_step(loss)
        if self._scaler_skipped():
            self.skipped_steps += 1
            self._loss_sum, self._loss_count = None, 0
            self._pending_valid = self._pending_entropy = _NAN
            return
        self._observe(loss_tensor)
        self.last_epoch += 1
        self._write(self.get_lr())

    def _write(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr
        self._last_lr = lrs  # type: ignore[assignment]  # torch annotates it list[float | Tensor]

    # -- observing -----------------------------------------------------------------------------------------

    def observe_loss(self, loss: Tensor | float) -> None:
        """Record the loss of one micro-batch; the next ``step()`` without a loss uses their mean.

        Example (4 micro-batches per optimizer step):
            >>> for x, y in chunks:
            ...     loss = loss_fn(model(x), y)
            ...     (loss / 4).backward()
            ...     sched.observe_loss(loss)
            >>> optimizer.step(); sched.step(); optimizer.zero_grad()
        """
        value = self._as_scalar(loss)
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_count += 1

    def discard_observed_losses(self) -> None:
        """Forget the micro-batch losses recorded since the last step (an optimizer step that did not happen)."""
        self._loss_sum, self._loss_count = None, 0

    def observe_validation(self, valid_loss: Tensor | float) -> None:
        """Feed an ``inner_valid`` loss measured since the last step (validation features)."""
        self._pending_valid = float(valid_loss)

    def observe_outputs(self, logits: Tensor) -> None:
        """Feed the model's outputs on the current batch (uncertainty feature)."""
        self._pending_entropy = float(predictive_entropy(logits))

    def _as_scalar(self, loss: Tensor | float) -> Tensor:
        if isinstance(loss, Tensor):
            if loss.numel() != 1:
                raise ValueError(
                    f"LearnedLR needs the scalar training loss, got a tensor of shape {tuple(loss.shape)}; "
                    "reduce it (e.g. loss.mean()) first"
                )
            # Stays on the device: no host sync for the loss.
            return loss.detach().reshape(()).to(device=self._device, dtype=self._dtype)
        if isinstance(loss, bool) or not isinstance(loss, (int, float)):
            raise TypeError(f"loss must be a tensor or a number, got {type(loss).__name__}")
        return torch.tensor(float(loss), dtype=self._dtype, device=self._device)

    def _loss_for_step(self, loss: Tensor | float | None) -> Tensor:
        if loss is not None:
            value = self._as_scalar(loss)
        elif self._loss_sum is not None:
            value = self._loss_sum / self._loss_count
        else:
            if not self._warned_no_loss:
                warnings.warn(
                    "LearnedLR.step() called without a loss: the loss features are held at their last value; "
                    "pass the training loss, sched.step(loss), for the controller to see training progress",
                    stacklevel=3,
                )
                self._warned_no_loss = True
            value = self._last_loss
        self._loss_sum, self._loss_count = None, 0
        if self.sync_loss or (self.sync_loss is None and _distributed_world() > 1):
            # Gloo has no AVG reduction: sum, then divide; every rank receives the same sum, so the same mean.
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / _distributed_world()
        return value

    def _scaler_skipped(self) -> bool:
        """Whether the GradScaler skipped the optimizer step just taken (inf/NaN gradients)."""
        scaler = self.scaler
        if scaler is None or not scaler.is_enabled():
            return False
        # Between scaler.step() and scaler.update() the scaler still holds its verdict for this optimizer.
        per_optimizer = getattr(scaler, "_per_optimizer_states", {}).get(id(self.optimizer), {})
        found = per_optimizer.get("found_inf_per_device", {})
        if found:
            self._scale_seen = None  # update() is still to come; re-read the scale at the next step
            return bool(sum(float(v) for v in found.values()) > 0)
        # After update() that record is reset, but the scale tells: update() multiplies it by
        # backoff_factor < 1 exactly when it found inf/NaN gradients, and otherwise keeps or grows it.
        scale = float(scaler.get_scale())
        skipped = self._scale_seen is not None and scale < self._scale_seen
        self._scale_seen = scale
        return skipped

    def _grads(self) -> list[Tensor]:
        grads = []
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                g = self._zero_grads.get(i)
                if g is None:
                    g = self._zero_grads[i] = torch.zeros_like(p)
            grads.append(g)
        return grads

    @torch.inference_mode()
    def _observe(self, loss: Tensor) -> None:
        state = self._state
        fstate = state.features
        grads = self._grads()
        lr = float(self.optimizer.param_groups[0]["lr"])
        budget = (time.perf_counter() - self._started) / self.time_budget_s if self.time_budget_s else _NAN
        scalars = torch.tensor(
            [
                lr,
                lr / float(self.base_lrs[0]),
                float(self.total_steps),
                self._pending_valid,
                self._pending_entropy,
                budget,
            ],
            dtype=self._dtype,
        ).to(self._device, non_blocking=True)
        obs = Observation(
            loss=loss,
            grads=grads,
            params=self._params,  # read-only here (inference mode): no need for detached aliases
            lr=scalars[_LR],
            lr_rel=scalars[_LR_REL],
            total_steps=scalars[_TOTAL],
            valid_loss=scalars[_VALID],
            entropy=scalars[_ENTROPY],
            budget_used=scalars[_BUDGET],
        )
        log_factor, new_state = self.controller.step(state, obs)
        new_f = new_state.features
        next_step = self.last_epoch + 1
        scale = self.controller.policy.lr_scale(log_factor, float(next_step), float(self.total_steps))
        # The one device->host transfer of the step: the new LR scale and whether the gradient was finite.
        scale_value, grad_norm = torch.stack(
            [scale.to(self._dtype), new_f.grad_norm.to(self._dtype)]
        ).tolist()
        # The feature state keeps references to what it was given; keep private copies (persistent buffers)
        # of the tensors the user's loop overwrites in place (parameters, gradients).
        prev_params = fstate.prev_params
        torch._foreach_copy_(list(prev_params), self._params)
        if math.isfinite(grad_norm):
            prev_grads = fstate.prev_grads
            torch._foreach_copy_(list(prev_grads), grads)
            grad_mean = new_f.grad_mean
        else:  # a poisoned gradient must not contaminate the running statistics
            prev_grads, grad_mean = fstate.prev_grads, fstate.grad_mean
        new_f = new_f._replace(prev_params=prev_params, prev_grads=prev_grads, grad_mean=grad_mean)
        self._state = PolicyState(new_f, new_state.log_factor, new_state.hidden)
        self._lr_scale = scale_value
        # The last finite loss, kept on the device, stands in when step() is called without one.
        self._last_loss = torch.where(torch.isfinite(loss), loss, self._last_loss)
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
            "base_lrs": [float(b) for b in self.base_lrs],
            "_last_lr": list(self._last_lr),
            "_step_count": self._step_count,
            "last_loss": float(self._last_loss),
            "warned_no_loss": self._warned_no_loss,
            "skipped_steps": self.skipped_steps,
            "feature_state": {
                name: [t.clone() for t in value] if isinstance(value, tuple) else value.clone()
                for name, value in fstate._asdict().items()
            },
            "log_factor": self._state.log_factor.clone(),
            "hidden": self._state.hidden.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; the next ``step`` continues the saved trajectory.

        Raises:
            ValueError: the state was saved for parameters of other shapes.
        """
        fields = state_dict["feature_state"]
        current = self._state.features
        restored: dict[str, Any] = {}
        for name, value in current._asdict().items():
            saved = fields[name]
            if isinstance(value, tuple):
                if len(saved) != len(value) or any(
                    s.shape != v.shape for s, v in zip(saved, value, strict=True)
                ):
                    raise ValueError(
                        f"LearnedLR state was saved for parameters of shapes {[tuple(s.shape) for s in saved]}, "
                        f"this optimizer has {[tuple(v.shape) for v in value]}"
                    )
                restored[name] = tuple(
                    s.to(v.device, v.dtype).clone() for s, v in zip(saved, value, strict=True)
                )
            else:
                restored[name] = saved.to(value.device, value.dtype).clone()
        self._state = PolicyState(
            FeatureState(**restored),
            state_dict["log_factor"].to(self._device).clone(),
            state_dict["hidden"].to(self._device).clone(),
        )
        self.last_epoch = int(state_dict["last_epoch"])
        self.total_steps = int(state_dict["total_steps"])
        self.base_lrs = [float(b) for b in state_dict["base_lrs"]]  # type: ignore[assignment]
        self._last_lr = list(state_dict["_last_lr"])
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self._last_loss = torch.tensor(float(state_dict["last_loss"]), dtype=self._dtype, device=self._device)
        self._warned_no_loss = bool(state_dict["warned_no_loss"])
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self._lr_scale = self._host_scale(self._state.log_factor, max(self.last_epoch, 0))
        self._loss_sum, self._loss_count = None, 0
