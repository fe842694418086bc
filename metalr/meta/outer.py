"""The outer learner: combine the meta-batch's estimates, all-reduce them, and update the controller.

:class:`StepTotals` names the per-meta-step statistics; :func:`all_reduce_step` sums gradients, totals and
refill flags over workers in one collective; :class:`OuterLearner` skips nothing itself (non-finite
estimates never reach it), averages, clips and takes an Adam step on the controller's parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from metalr.meta.distributed import WorkerContext, all_reduce_sum


class StepTotals(NamedTuple):
    """Per-meta-step sums over the meta-batch slots a worker ran; all-reduced by field, in this order."""

    used: float = 0.0  # truncations whose estimate was finite (averaged into the meta-gradient)
    grad_sq_sum: float = 0.0  # sum over used truncations of |g_i|^2 (estimator variance)
    meta_loss_sum: float = 0.0
    guard_events: float = 0.0  # divergence-guard cuts (incl. those of staggering unrolls)
    skipped: float = 0.0  # truncations with a non-finite meta-loss or meta-gradient
    lr_ratio_sum: float = 0.0  # sum over inner steps of lr / base_lr
    lr_count: float = 0.0


def all_reduce_step(
    summed: list[Tensor], totals: StepTotals, flags: list[bool], context: WorkerContext
) -> tuple[list[Tensor], StepTotals, list[bool]]:
    """Sum gradients, totals and refill flags over all workers (one collective; identity for one worker)."""
    if context.world_size == 1:
        return summed, totals, flags
    packed = torch.cat(
        [
            *(g.reshape(-1).double().cpu() for g in summed),
            torch.tensor(totals, dtype=torch.float64),
            torch.tensor(flags, dtype=torch.float64),
        ]
    )
    device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
    packed = all_reduce_sum(packed.to(device), context).cpu()
    grads, offset = [], 0
    for g in summed:
        grads.append(packed[offset : offset + g.numel()].reshape(g.shape).to(device=g.device, dtype=g.dtype))
        offset += g.numel()
    reduced = StepTotals(*packed[offset : offset + len(StepTotals._fields)].tolist())
    return grads, reduced, [x > 0 for x in packed[offset + len(StepTotals._fields) :].tolist()]


class OuterLearner:
    """Adam on the controller's parameters, with global-norm clipping of the mean meta-gradient."""

    def __init__(self, params: list[Tensor], lr: float, clip: float) -> None:
        self.params = params
        self.clip = clip
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def update(self, summed: list[Tensor], totals: StepTotals) -> tuple[float, float]:
        """Step on the mean of ``summed`` over ``totals.used`` estimates; ``(grad_norm, variance)``.

        ``variance`` is the mean squared deviation of the per-task meta-gradients from their mean (the
        estimator's noise plus task diversity). Nothing happens when no estimate was usable.
        """
        used = int(totals.used)
        if not used:
            return 0.0, 0.0
        mean = [g / used for g in summed]
        variance = max(0.0, totals.grad_sq_sum / used - sum(float(g.double().square().sum()) for g in mean))
        for p, g in zip(self.params, mean, strict=True):
            p.grad = g
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, variance
