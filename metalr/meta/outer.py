"""The outer learner: combine the meta-batch's estimates, all-reduce them, and update the controller.

:class:`StepTotals` names the per-meta-step statistics; :func:`all_reduce_step` sums gradients, totals,
refill flags and population costs over workers in one collective; :class:`OuterLearner` skips nothing
itself (non-finite estimates never reach it), averages, clips and takes an Adam step on the controller's
parameters.
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


class StepResult(NamedTuple):
    """A meta-step's all-reduced outcome: the summed meta-gradient, totals, refill flags and costs."""

    summed: list[Tensor]  # sum over the slots' finite meta-gradients, shaped like the controller's parameters
    totals: StepTotals
    flags: list[bool]  # per slot: needs a new task (done or non-finite)
    costs: list[float]  # per population: seconds its owner spent on its estimate


def all_reduce_step(
    slot_grads: list[list[Tensor] | None],
    like: list[Tensor],
    totals: StepTotals,
    flags: list[bool],
    costs: list[float],
    context: WorkerContext,
) -> StepResult:
    """Sum a meta-step's results over all workers (one collective; none for one worker).

    ``slot_grads[i]`` is slot ``i``'s meta-gradient on the worker that ran it (``None`` elsewhere, and for a
    skipped slot). The gradients travel as the rows of one float64 matrix, zero where a worker did not run
    the slot (exact: adding zeros rounds nothing), and every worker sums the rows in slot order. So the
    meta-gradient is bit-for-bit the same for any number of workers and any assignment of slots to workers.
    """
    size = sum(t.numel() for t in like)
    rows = torch.zeros(len(slot_grads), size, dtype=torch.float64)
    for i, grads in enumerate(slot_grads):
        if grads is not None:
            rows[i] = torch.cat([g.reshape(-1).detach().to("cpu", torch.float64) for g in grads])
    if context.world_size > 1:
        packed = torch.cat(
            [
                rows.reshape(-1),
                torch.tensor(totals, dtype=torch.float64),
                torch.tensor(flags, dtype=torch.float64),
                torch.tensor(costs, dtype=torch.float64),
            ]
        )
        device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
        packed = all_reduce_sum(packed.to(device), context).cpu()
        fields, rest = len(StepTotals._fields), packed[rows.numel() :]
        rows = packed[: rows.numel()].reshape(rows.shape)
        totals = StepTotals(*rest[:fields].tolist())
        flags = [x > 0 for x in rest[fields : fields + len(flags)].tolist()]
        costs = rest[fields + len(flags) :].tolist()
    flat, summed, offset = rows.sum(0), [], 0
    for t in like:
        summed.append(flat[offset : offset + t.numel()].reshape(t.shape).to(device=t.device, dtype=t.dtype))
        offset += t.numel()
    return StepResult(summed, totals, flags, costs)


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
