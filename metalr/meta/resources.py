"""Memory estimate of an unroll, taken before it starts (issue 10, resource limits).

A differentiable unroll keeps every step's graph alive until the backward pass, so its memory grows
linearly with the truncation length: ``state + K * per_step``. ``per_step`` is measured, not guessed: one
probe step on a fork of the run counts the bytes autograd saves for backward (a
``saved_tensors_hooks`` pack hook sees every saved tensor, including those of the second-order graph
built by ``create_graph=True``). ES/PES unrolls keep no graph: their memory is the particles' inner states
plus one step's transient graph, independent of K.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from metalr.controller import LRController
from metalr.meta.unroll import InnerRun, inner_step

MiB = 1024 * 1024


class MemoryBudgetError(RuntimeError):
    """An unroll would exceed the configured memory budget (the message carries the estimate)."""


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(run: InnerRun) -> int:
    """Bytes of what a run carries between steps (parameters, optimizer state, feature state)."""
    features = run.policy.features
    carried = [*run.params, *run.opt_state, *features.grad_mean, *features.prev_grads, *features.prev_params]
    return _bytes(carried)


def step_graph_bytes(controller: LRController, run: InnerRun, differentiable: bool, valid_every: int = 10) -> int:
    """Bytes autograd saves during one inner step (plus one meta-objective measurement) of ``run``."""
    saved = 0
    seen: set[int] = set()

    def pack(tensor: Tensor) -> Tensor:
        nonlocal saved
        key = id(tensor)
        if key not in seen:  # one tensor saved by several ops is stored once
            seen.add(key)
            saved += tensor.numel() * tensor.element_size()
        return tensor

    probe = run.forked()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        after, _, _ = inner_step(controller, probe, differentiable, valid_every=valid_every)
        if differentiable:
            after.task.loss(after.model_call(after.params), next(after.valid_stream))
    return saved


def estimate_unroll_bytes(
    controller: LRController,
    run: InnerRun,
    length: int,
    differentiable: bool,
    particles: int = 1,
    valid_every: int = 10,
) -> int:
    """Estimated peak bytes of unrolling ``run`` for ``length`` steps.

    ``differentiable``: the graph of every step is kept (``state + length * per_step``); otherwise
    ``particles`` inner states (ES/PES) plus one step's transient graph.
    """
    per_step = step_graph_bytes(controller, run, differentiable, valid_every)
    base = state_bytes(run)
    if differentiable:
        return base + length * per_step
    return particles * base + per_step


def check_memory_budget(estimate: int, budget_mb: float, what: str) -> None:
    """Refuse (raise :class:`MemoryBudgetError`) when ``estimate`` exceeds a budget of ``budget_mb`` MiB."""
    if budget_mb > 0 and estimate > budget_mb * MiB:
        raise MemoryBudgetError(
            f"{what}: estimated unroll memory {estimate / MiB:.1f} MiB exceeds meta.memory_budget_mb={budget_mb:g}"
        )
