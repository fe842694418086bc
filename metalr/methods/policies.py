"""Pieces shared by the adaptive and literature methods: the policy of an optimizer that sets its own LR,
read-only taps on the task's model, and cheap whole-model gradient statistics.

A method receives ``params`` and a :class:`~metalr.methods.base.MethodContext`; the context's task owns the
model being trained. Methods that need the model itself (outputs for an uncertainty signal, a validation
pass, an averaged copy of the weights) get it through :func:`model_owning`, which returns it only when its
parameters are exactly the ones being optimised, so no method ever watches a model it does not train.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from metalr.methods.base import MethodContext
from metalr.schedules import Schedule

EffectiveLR = Callable[[dict[str, Any]], float]


def group_lr(group: dict[str, Any]) -> float:
    """The LR a plain optimizer applies: ``group["lr"]``."""
    return float(group["lr"])


class SelfTuningLR:
    """Policy of an optimizer-replacing method: reports the LR the optimizer actually applies.

    Args:
        optimizer: the method's own optimizer.
        effective_lr: ``param_group -> LR applied`` (Prodigy and D-Adaptation apply ``d * lr``, DoG ``eta``).
        schedule: optional multiplier of each group's initial ``lr`` per step (Prodigy's authors recommend
            cosine annealing on top of the estimated step size).
        after_step: called once per step after the optimizer's update (DoG's iterate averaging).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        effective_lr: EffectiveLR = group_lr,
        schedule: Schedule | None = None,
        after_step: Callable[[], None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.effective_lr = effective_lr
        self.schedule = schedule
        self.after_step = after_step
        self.initial_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_epoch = 0
        self._write_schedule()

    def _write_schedule(self) -> None:
        if self.schedule is None:
            return
        multiplier = self.schedule(self.last_epoch)
        for group, initial in zip(self.optimizer.param_groups, self.initial_lrs, strict=True):
            group["lr"] = initial * multiplier

    def step(self, loss: Tensor | float | None = None) -> None:
        if self.after_step is not None:
            self.after_step()
        self.last_epoch += 1
        self._write_schedule()

    def get_last_lr(self) -> list[float]:
        return [self.effective_lr(group) for group in self.optimizer.param_groups]


def model_owning(params: Sequence[Tensor], context: MethodContext) -> nn.Module | None:
    """The task's model if its parameters are exactly ``params`` (same tensors, same order), else None."""
    model = getattr(context.task, "model", None)
    if not isinstance(model, nn.Module):
        return None
    own = list(model.parameters())
    if len(own) != len(params) or any(a is not b for a, b in zip(own, params, strict=True)):
        return None
    return model


class OutputTap:
    """Keeps the model's latest *training* output (a grad-enabled forward in train mode), detached.

    Evaluation passes run under ``no_grad`` and are ignored, so between two ``scheduler.step`` calls the tap
    holds the output of the batch the optimizer just stepped on. The hook holds the tap weakly and removes
    itself when the tap is collected, so a model reused across runs does not accumulate live hooks.
    """

    def __init__(self, model: nn.Module) -> None:
        self.latest: Tensor | None = None
        ref = weakref.ref(self)

        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            tap = ref()
            if tap is not None and isinstance(output, Tensor) and torch.is_grad_enabled() and module.training:
                tap.latest = output.detach()

        handle = model.register_forward_hook(hook)
        weakref.finalize(self, handle.remove)

    def take(self) -> Tensor | None:
        """The latest training output, once (None if no new training forward happened since)."""
        output, self.latest = self.latest, None
        return output


def grads_of(params: Sequence[Tensor]) -> list[Tensor]:
    return [p.grad.detach() for p in params if p.grad is not None]


@torch.no_grad()
def global_grad_norm(params: Sequence[Tensor]) -> float:
    """L2 norm of all gradients together (one fused reduction per device and dtype)."""
    grads = grads_of(params)
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))


@torch.no_grad()
def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> float:
    """Sum of elementwise products over matching tensor lists."""
    if not xs:
        return 0.0
    products = torch._foreach_mul(list(xs), list(ys))
    return float(torch.stack([p.sum(dtype=torch.float64) for p in products]).sum())


def finite_or(value: float, fallback: float) -> float:
    return value if math.isfinite(value) else fallback


def as_float(loss: Tensor | float | None) -> float | None:
    if loss is None:
        return None
    return float(loss.detach()) if isinstance(loss, Tensor) else float(loss)


def require_list(params: Iterable[Tensor]) -> list[Tensor]:
    out = list(params)
    if not out:
        raise ValueError("the method got no parameters to optimise")
    return out
