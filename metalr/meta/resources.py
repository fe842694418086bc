"""Memory estimate of an unroll, taken before it starts (issue 10, resource limits).

A differentiable unroll keeps every step's graph alive until the backward pass, so its memory grows
linearly with the truncation length: ``state + K * per_step * GRAPH_OVERHEAD``. ``per_step`` is
measured, not guessed: one probe step on a fork of the run counts the bytes autograd saves for backward
(a ``saved_tensors_hooks`` pack hook sees every saved tensor, including those of the second-order graph
built by ``create_graph=True``; each storage is counted once). ES/PES unrolls keep no graph: their memory
is the particles' inner states plus one step's transient graph, independent of K.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from metalr.controller import LRController
from metalr.meta.unroll import InnerRun, unroll

MiB = 1024 * 1024
# Resident memory exceeds the bytes autograd saves (allocator slack, outputs kept alive by the graph):
# bench/bench_meta.py measured RSS growth / saved bytes of 1.0-1.6 for 40-step unrolls of digits MLPs.
# Estimates take the upper end, so a budget refuses too early rather than too late.
GRAPH_OVERHEAD = 1.6


class MemoryBudgetError(RuntimeError):
    """An unroll would exceed the configured memory budget (the message carries the estimate)."""


def _bytes(tensors: Iterable[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def state_bytes(run: InnerRun) -> int:
    """Bytes of what a run carries between steps (parameters, optimizer state, feature state)."""
    leaves, _ = tree_flatten(run.carry)
    return _bytes(leaves)


def step_graph_bytes(
    controller: LRController, run: InnerRun, differentiable: bool, valid_every: int = 10
) -> int:
    """Bytes autograd saves during one inner step (plus one meta-objective measurement) of ``run``."""
    storages: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        # Count memory, not references: tensors saved by several ops, and views, share one storage. All
        # saved tensors stay alive until the probe ends, so storage addresses are not reused meanwhile.
        storage = tensor.untyped_storage()
        storages.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    probe = run.forked()
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if differentiable:
            # One step plus its meta-objective measurement (the unroll scores the last step it takes).
            unroll(controller, probe, 1, differentiable, valid_every=valid_every)
        else:
            # A first-order step (torch.func.grad, which refuses these hooks) keeps what the loss's forward
            # saves for its backward, transiently: measure that forward.
            params = tuple(p.detach().requires_grad_(True) for p in probe.params)
            probe.task.loss(probe.model_call(params), next(probe.train_stream))
        return sum(storages.values())


def estimate_unroll_bytes(
    controller: LRController,
    run: InnerRun,
    length: int,
    differentiable: bool,
    particles: int = 1,
    valid_every: int = 10,
) -> int:
    """Estimated peak bytes of unrolling ``run`` for ``length`` steps.

    ``differentiable``: the graph of every step is kept (``state + length * per_step * GRAPH_OVERHEAD``); otherwise
    ``particles`` inner states (ES/PES) plus one step's transient graph.
    """
    per_step = step_graph_bytes(controller, run, differentiable, valid_every)
    base = state_bytes(run)
    if differentiable:
        return int(base + length * per_step * GRAPH_OVERHEAD)
    return int(particles * base + per_step * GRAPH_OVERHEAD)


def format_mib(num_bytes: float) -> str:
    """Bytes as MiB with three significant digits and no exponent (a small estimate never reads 0.0)."""
    mib = num_bytes / MiB
    if mib <= 0:
        return "0"
    decimals = min(12, max(1, 2 - math.floor(math.log10(mib))))
    return f"{mib:.{decimals}f}"


def check_memory_budget(estimate: int, budget_mb: float, what: str) -> None:
    """Refuse (raise :class:`MemoryBudgetError`) when ``estimate`` exceeds a budget of ``budget_mb`` MiB."""
    if budget_mb > 0 and estimate > budget_mb * MiB:
        raise MemoryBudgetError(
            f"{what}: estimated unroll memory {format_mib(estimate)} MiB exceeds meta.memory_budget_mb={budget_mb:g}"
        )
