"""Deployment: a frozen controller as a ``torch.optim.lr_scheduler.LRScheduler``.

Example:
    >>> from metalr import LearnedLR
    >>> sched = LearnedLR(optimizer, total_steps=T)   # the shipped controller for this optimizer family
    >>> for step in range(T):
    ...     loss = loss_fn(model(x), y); loss.backward()
    ...     optimizer.step()
    ...     sched.step(loss)
    ...     optimizer.zero_grad()

``step(loss)`` is called after ``optimizer.step()``, like ``ReduceLROnPlateau.step(metrics)``. What the
controller sees of the step comes from two hooks on the optimizer (``register_step_pre_hook`` /
``register_step_post_hook``): around ``optimizer.step()`` they reduce the applied gradient, the parameters
and the update to the scalars of a feature-format-2 :class:`~metalr.features.Observation` - the same
reductions the meta-training unroll computes (``metalr.features.step_reductions``) - and ``step(loss)``
feeds them with the loss to the same :func:`~metalr.features.compute_features` through
:meth:`LRController.step`, so the LR trajectory is the one the controller was trained to produce. Every
param group keeps its own scale: ``lr_g = clamp(initial_lr_g * base_schedule(t) * exp(log_factor), min_lr,
max_lr)``.

Cost and memory (``bench/bench_overhead.py``): one parameter-sized buffer, the previous update
``u = theta_t - theta_{t+1}``, updated in place (lerp, copy, subtract; two fused multi-tensor norm calls;
no temporaries); the per-step scalar work runs on a stacked vector; one device-to-host transfer per step.
The buffer lives in the optimizer's state (key ``"metalr_update"``), so ``optimizer.state_dict()`` carries it
and a resumed run continues exactly, while ``LearnedLR.state_dict()`` holds scalars only. During
``optimizer.step()`` the key is taken out, so an optimizer that initialises its state lazily
(``len(state) == 0``) never sees it.

What the controller sees in the training stacks users run (each is tested in ``tests/integrations/``):

* **Gradient accumulation**: call ``step`` once per optimizer step. Pass the loss averaged over the
  micro-batches, or call :meth:`LearnedLR.observe_loss` after each micro-batch and ``step()`` without an
  argument (it uses the mean of the observed losses).
* **Gradient clipping**: clip before ``optimizer.step()`` as usual; the hooks read the clipped gradient,
  because that is the gradient the optimizer applied, as in meta-training.
* **Mixed precision**: with a ``torch.amp.GradScaler`` pass ``scaler=`` so that steps the scaler skipped
  (inf/NaN gradients) leave the controller's state, the step count and the LR untouched - the optimizer did
  not step either. The hooks run inside ``scaler.step``, after it unscaled the gradients.
* **DistributedDataParallel**: gradients are already averaged across ranks by DDP; the loss is averaged
  with one ``all_reduce`` inside ``step`` (``sync_loss``), so every rank computes the same LR, bit for bit.
* **torch.compile**: the hooks and features run eagerly, outside the user's compiled graph.

This module imports nothing from ``metalr.meta``: deploying a controller never loads differentiation code.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torch.utils._pytree import tree_flatten

from metalr.checkpoint import load_controller
from metalr.controller import LRController, PolicyState
from metalr.features import FeatureState, Observation, predictive_entropy

_NAN = float("nan")
UPDATE_KEY = "metalr_update"
"""Key of the previous update ``theta_t - theta_{t+1}`` in ``optimizer.state[p]`` (the one buffer)."""



def _validate_optimizer(optimizer: Any) -> None:
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"LearnedLR needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
    for i, group in enumerate(optimizer.param_groups):
        _validate_group_lr(optimizer, i, group)


def _validate_group_lr(optimizer: Optimizer, index: int, group: dict[str, Any]) -> None:
    lr = group.get("lr")
    if isinstance(lr, Tensor):
        lr = float(lr)
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not (lr > 0 and math.isfinite(lr)):
        raise ValueError(
            f"param group {index} of {type(optimizer).__name__} has lr={group.get('lr')!r}; LearnedLR scales each "
            "group's initial learning rate, so every group needs a positive finite 'lr'"
        )


def _distributed_world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_TORCH_DIR = os.path.dirname(torch.__file__)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the user's line (past this module's and torch's frames)."""
    frame, level = sys._getframe(2), 2
    while frame is not None and (frame.f_code.co_filename == __file__ or frame.f_code.co_filename.startswith(_TORCH_DIR)):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _weak_hook(scheduler: LearnedLR, method: Callable[..., None]) -> Callable[..., None]:
    """An optimizer hook that does not keep the scheduler alive (the optimizer usually outlives it)."""
    ref = weakref.WeakMethod(method)  # type: ignore[arg-type]

    def hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        bound = ref()
        if bound is not None:
            bound()

    return hook


class LearnedLR(LRScheduler):
    """Per-step learning rates from a meta-learned controller.

    Args:
        optimizer: any ``torch.optim`` optimizer; every param group needs a positive ``lr`` (its base LR).
        controller: an :class:`LRController`, a checkpoint path, a shipped name or ``hf://owner/repo``
            (:func:`load_controller`); ``None`` (default) picks the shipped controller meta-trained for this
            optimizer's family (Adam/AdamW, SGD with or without momentum), from the checkpoints' metadata.
        total_steps: the step budget T, in optimizer steps (the controller sees progress t/T).
        time_budget_s: optional wall-clock budget; feeds the ``resource`` feature when the controller reads it.
        scaler: the ``torch.amp.GradScaler`` that steps ``optimizer``, if any. Steps it skipped because of
            inf/NaN gradients are not observed (``skipped_steps`` counts them).
        sync_loss: average the loss over the ranks of the default process group before computing features,
            so that every rank computes the same LR. ``None`` (default): when ``torch.distributed`` is
            initialised with more than one rank. Every rank must then call ``step`` (it is a collective).
        last_epoch: as in every torch scheduler (-1 = fresh start).

    Call ``step(loss)`` once per optimizer step, after ``optimizer.step()``. ``step()`` without a loss uses
    the micro-batch losses given to :meth:`observe_loss` since the last step; if there are none it holds the
    loss features at their last value (and warns once). :meth:`observe_validation` and
    :meth:`observe_outputs` feed the optional validation and uncertainty features. Every LR written is
    finite and within the controller's ``[min_lr, max_lr]``.

    Warnings (each once): ``step`` before ``optimizer.step`` or an overridden ``optimizer.step`` (as torch's
    schedulers), an optimizer step with no gradients at all, stepping past ``total_steps``, a controller
    meta-trained for another optimizer family, and parameters that stopped being finite.
    ``optimizer.add_param_group`` is supported: the new group gets its own LR from the next step on.

    Example:
        >>> scaler = torch.amp.GradScaler("cuda")
        >>> sched = LearnedLR(optimizer, total_steps=10_000, scaler=scaler)
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
        controller: LRController | str | os.PathLike[str] | None = None,
        total_steps: int | None = None,
        *,
        time_budget_s: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
        sync_loss: bool | None = None,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None or not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps <= 0:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps=!r}")
        if time_budget_s is not None and not time_budget_s > 0:
            raise ValueError(f"time_budget_s must be positive when given, got {time_budget_s=!r}")
        if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
        _validate_optimizer(optimizer)
        if controller is None:
            from metalr.checkpoint import default_controller_name

            controller = default_controller_name(optimizer)
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
            self._state: PolicyState = controller.init([p.detach() for p in self._params])
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
        self._warned: set[str] = set()
        self._scale_seen: float | None = float(scaler.get_scale()) if scaler is not None else None
        self._started = time.perf_counter()
        self._lr_scale = 1.0
        # Host copies of |g_{t-1}| and |u_{t-1}| (they choose the lerp weight of the next reduction).
        self._host_norms = (0.0, 0.0)
        self._buffers: list[Tensor] | None = None  # theta_t, between the two hooks
        self._pre_reductions: tuple[Tensor, Tensor] | None = None
        self._reductions: Tensor | None = None  # REDUCTIONS of the optimizer step not yet observed
        # Wrappers (accelerate's AcceleratedOptimizer) forward step() to the optimizer they wrap: hook that one.
        self._hooked = optimizer
        while not hasattr(self._hooked, "_optimizer_step_pre_hooks") and isinstance(
            getattr(self._hooked, "optimizer", None), Optimizer
        ):
            self._hooked = self._hooked.optimizer  # type: ignore[attr-defined]
        self._hooks = (
            self._hooked.register_step_pre_hook(_weak_hook(self, self._before_optimizer_step)),
            self._hooked.register_step_post_hook(_weak_hook(self, self._after_optimizer_step)),
        )
        self._check_optimizer_family(optimizer)
        self._initializing = True
        super().__init__(optimizer, last_epoch)
        self._initializing = False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=_user_stacklevel())

    def _check_optimizer_family(self, optimizer: Optimizer) -> None:
        trained_for = getattr(self.controller, "optimizer_family", None)
        if trained_for is None:
            return
        from metalr.checkpoint import optimizer_family

        try:
            family = optimizer_family(optimizer)
        except ValueError:
            family = type(optimizer).__name__
        if family != trained_for:
            self._warn_once(
                "family",
                f"this controller was meta-trained for {trained_for!r} optimizers, but it is driving "
                f"{type(optimizer).__name__} ({family!r}): its LR policy may not transfer; load the shipped "
                f"controller of that family (LearnedLR(optimizer, total_steps=T) picks it)",
            )

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
        if self._initializing:  # torch's constructor calls step() once to write the step-0 LR
            self._step_count += 1
            self.last_epoch += 1
            self._lr_scale = self._host_scale(self._state.log_factor, self.last_epoch)
            self._write(self.get_lr())
            return
        self._adopt_new_param_groups()
        if self._step_count == 1:
            self._check_call_order()
        self._step_count += 1
        loss_tensor = self._loss_for_step(loss)
        if self._scaler_skipped():
            self.skipped_steps += 1
            self._loss_sum, self._loss_count = None, 0
            self._pending_valid = self._pending_entropy = _NAN
            self._reductions = None
            return
        self._observe(loss_tensor)
        self.last_epoch += 1
        if self.last_epoch > self.total_steps:
            self._warn_once(
                "past_end",
                f"LearnedLR was stepped past total_steps={self.total_steps}: the controller saw progress 1 "
                "from here on and its base schedule has ended; pass the real number of optimizer steps",
            )
        self._write(self.get_lr())

    def _check_call_order(self) -> None:
        # The same two checks as torch's LRScheduler.step (which this class does not call).
        if not hasattr(self.optimizer.step, "_wrapped_by_lr_sched"):
            self._warn_once(
                "order",
                "Seems like `optimizer.step()` has been overridden after learning rate scheduler initialization. "
                "Please, make sure to call `optimizer.step()` before `lr_scheduler.step()`. LearnedLR reads the "
                "update through optimizer step hooks; without them its update features are unavailable.",
            )
        elif not getattr(self.optimizer, "_opt_called", False):
            self._warn_once(
                "order",
                "Detected call of `lr_scheduler.step()` before `optimizer.step()`. In PyTorch 1.1.0 and later, "
                "you should call them in the opposite order: `optimizer.step()` before `lr_scheduler.step()`. "
                "LearnedLR observes the optimizer step that was just taken.",
            )

    def _adopt_new_param_groups(self) -> None:
        """Give groups added with ``optimizer.add_param_group`` their base LR, before any state changes."""
        groups = self.optimizer.param_groups
        if len(groups) == len(self.base_lrs):
            return
        if len(groups) < len(self.base_lrs):
            raise ValueError(
                f"the optimizer has {len(groups)} param groups, fewer than the {len(self.base_lrs)} LearnedLR "
                "was built for; param groups can be added (add_param_group), not removed"
            )
        for index in range(len(self.base_lrs), len(groups)):
            group = groups[index]
            _validate_group_lr(self.optimizer, index, group)
            group.setdefault("initial_lr", group["lr"])
            self.base_lrs.append(group["initial_lr"])
            self._params.extend(group["params"])

    def _write(self, lrs: list[float]) -> None:
        last: list[float | Tensor] = []
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            if isinstance(group["lr"], Tensor):
                group["lr"].fill_(lr)
                last.append(group["lr"].clone())
            else:
                group["lr"] = lr
                last.append(lr)
        self._last_lr = last

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
            self._warn_once(
                "no_loss",
                "LearnedLR.step() called without a loss: the loss features are held at their last value; "
                "pass the training loss, sched.step(loss), for the controller to see training progress",
            )
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
        missing = 0
        for i, p in enumerate(self._params):
            g = p.grad
            if g is None:
                missing += 1
                g = self._zero_grads.get(i)
                if g is None:
                    g = self._zero_grads[i] = torch.zeros_like(p)
            grads.append(g)
        if missing and missing == len(self._params):
            self._warn_once(
                "no_grads",
                "optimizer.step() ran while every parameter's .grad was None (zero_grad(set_to_none=True) before "
                "optimizer.step(), or no backward?): LearnedLR observed a zero gradient",
            )
        return grads

    # The two optimizer hooks: the parameter-sized work of a step, in place on the one buffer.

    @torch.inference_mode()
    def _before_optimizer_step(self) -> None:
        self._adopt_new_param_groups()
        params = self._params
        grads = self._grads()
        state = self._hooked.state
        buffers = []
        for p in params:
            # Out of the optimizer's state during its step: lazily initialising optimizers test len(state).
            held = state[p].pop(UPDATE_KEY, None) if p in state else None
            buffers.append(held if held is not None and held.shape == p.shape else torch.zeros_like(p))
        grad_norm, update_norm = self._host_norms
        # g_t . u_{t-1} from |(1 - w) u + w g|^2 with w balancing the two norms (no cancellation, no temporary).
        w = update_norm / (update_norm + grad_norm) if update_norm > 0 and grad_norm > 0 else 0.5
        torch._foreach_lerp_(buffers, grads, w)
        norms = torch.stack(torch._foreach_norm(grads + buffers)).to(self._dtype).square()
        grad_sq, mixed_sq = norms[: len(params)].sum(), norms[len(params) :].sum()
        cross = (mixed_sq - (1 - w) ** 2 * update_norm**2 - w**2 * grad_sq) / (2 * w * (1 - w))
        torch._foreach_copy_(buffers, params)  # theta_t, until the post-hook turns it into the update
        self._buffers = buffers
        self._pre_reductions = (grad_sq, cross)

    @torch.inference_mode()
    def _after_optimizer_step(self) -> None:
        buffers, pre = self._buffers, self._pre_reductions
        if buffers is None or pre is None:
            return
        params = self._params[: len(buffers)]
        torch._foreach_sub_(buffers, params)  # theta_t - theta_{t+1} = u_t
        norms = torch.stack(torch._foreach_norm(buffers + params)).to(self._dtype).square()
        update_sq, param_sq = norms[: len(params)].sum(), norms[len(params) :].sum()
        state = self._hooked.state
        for p, buffer in zip(params, buffers, strict=True):
            state[p][UPDATE_KEY] = buffer
        self._buffers = self._pre_reductions = None
        self._reductions = torch.stack([pre[0], param_sq, update_sq, pre[1]])

    def _fallback_reductions(self) -> Tensor:
        """Reductions when the optimizer hooks did not run (an overridden ``optimizer.step``): no update."""
        grads = self._grads()
        norms = torch.stack(torch._foreach_norm(grads + self._params)).to(self._dtype).square()
        n = len(self._params)
        nan = torch.full((), _NAN, dtype=self._dtype, device=self._device)
        return torch.stack([norms[:n].sum(), norms[n:].sum(), nan, nan])

    @torch.inference_mode()
    def _observe(self, loss: Tensor) -> None:
        reductions = self._reductions if self._reductions is not None else self._fallback_reductions()
        self._reductions = None
        lr = float(self.optimizer.param_groups[0]["lr"])
        budget = (time.perf_counter() - self._started) / self.time_budget_s if self.time_budget_s else _NAN
        # One host->device copy for the six scalars, in Observation's order (lr, lr_rel, total_steps, valid, ...).
        scalars = torch.tensor(
            [lr, lr / float(self.base_lrs[0]), float(self.total_steps), self._pending_valid, self._pending_entropy, budget],
            dtype=self._dtype,
        ).to(self._device, non_blocking=True)
        obs = Observation.of_reductions(loss, reductions, *scalars.unbind())
        log_factor, self._state = self.controller.step(self._state, obs)
        features = self._state.features
        scale = self.controller.policy.lr_scale(log_factor, float(self.last_epoch + 1), float(self.total_steps))
        # The one device->host transfer of the step.
        scale_value, grad_norm, update_norm, param_sq_value = torch.stack(
            [scale.to(self._dtype), features.grad_norm, features.update_norm, obs.param_sq]
        ).tolist()
        self._lr_scale = scale_value
        self._host_norms = (grad_norm, update_norm)
        if not math.isfinite(param_sq_value):
            self._warn_once(
                "nonfinite_params",
                f"the model's parameters are no longer finite after optimizer step {self.last_epoch + 1}: a lower "
                "learning rate cannot repair them; restore the last good checkpoint (the guardrail cut the LR, "
                "but too late)",
            )
        # The last finite loss, kept on the device, stands in when step() is called without one.
        self._last_loss = torch.where(torch.isfinite(loss), loss, self._last_loss)
        self._pending_valid = self._pending_entropy = _NAN

    def held_tensor_bytes(self) -> int:
        """Bytes of the tensors this scheduler keeps between steps, its buffer in the optimizer's state included.

        Feature format 2 keeps one parameter-sized buffer (the previous update) plus scalars: about 1x the
        parameter bytes (``bench/bench_overhead.py`` reports the ratio).
        """
        storages: dict[int, int] = {}
        tensors = [self._last_loss, *self._state, *self._zero_grads.values()]
        tensors += [state[UPDATE_KEY] for state in self._hooked.state.values() if UPDATE_KEY in state]
        for leaf in tree_flatten(tensors)[0]:
            if isinstance(leaf, Tensor):
                storages.setdefault(leaf.untyped_storage().data_ptr(), leaf.untyped_storage().nbytes())
        return sum(storages.values())

    @property
    def guard_triggered(self) -> bool:
        """Whether the last observed step tripped the divergence guardrail."""
        return bool(self._state.features.alarm > 0)

    # -- state ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Step count, base LRs and the controller's running state (scalars): not the optimizer, not the weights.

        The previous update, the one parameter-sized buffer, is in the optimizer's own state dict.
        """
        return {
            "last_epoch": self.last_epoch,
            "total_steps": self.total_steps,
            "base_lrs": [float(b) for b in self.base_lrs],
            "_last_lr": [float(lr) for lr in self._last_lr],
            "_step_count": self._step_count,
            "last_loss": float(self._last_loss),
            "warned": sorted(self._warned),
            "skipped_steps": self.skipped_steps,
            "feature_state": {name: value.clone() for name, value in self._state.features._asdict().items()},
            "log_factor": self._state.log_factor.clone(),
            "hidden": self._state.hidden.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`; the next ``step`` continues the saved trajectory.

        Works in either order with ``optimizer.load_state_dict``; it writes the saved LRs into the optimizer.

        Raises:
            ValueError: the state is not a LearnedLR state of this version, or was saved for other param groups.
        """
        saved = state_dict.get("feature_state")
        if not isinstance(saved, dict) or set(saved) != set(FeatureState._fields):
            raise ValueError(
                "not a LearnedLR state of this version: its feature state has fields "
                f"{sorted(saved) if isinstance(saved, dict) else saved!r}, expected {sorted(FeatureState._fields)} "
                "(feature format 2)"
            )
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(
                f"LearnedLR state was saved for {len(state_dict['base_lrs'])} param groups, this optimizer has "
                f"{len(self.optimizer.param_groups)}"
            )
        current = self._state.features
        features = FeatureState(
            **{name: saved[name].to(value.device, value.dtype).clone() for name, value in current._asdict().items()}
        )
        self._state = PolicyState(
            features,
            state_dict["log_factor"].to(self._device).clone(),
            state_dict["hidden"].to(self._device).clone(),
        )
        self.last_epoch = int(state_dict["last_epoch"])
        self.total_steps = int(state_dict["total_steps"])
        self.base_lrs = [float(b) for b in state_dict["base_lrs"]]  # type: ignore[assignment]
        self._step_count = int(state_dict["_step_count"])
        self._last_loss = torch.tensor(float(state_dict["last_loss"]), dtype=self._dtype, device=self._device)
        self._warned = set(state_dict["warned"])
        self.skipped_steps = int(state_dict["skipped_steps"])
        self._lr_scale = self._host_scale(self._state.log_factor, max(self.last_epoch, 0))
        self._host_norms = (float(features.grad_norm), float(features.update_norm))
        self._loss_sum, self._loss_count = None, 0
        self._reductions = None
        # Either restore order works: the optimizer may still hold the step-0 LR this constructor wrote.
        self._write([float(lr) for lr in state_dict["_last_lr"]])
