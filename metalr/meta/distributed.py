"""Multi-process meta-training with ``torch.distributed`` (``torchrun``; gloo on CPU, nccl on GPU).

Every worker holds the same controller and meta-optimizer and draws the *same* task samples (the sampler
is seeded identically everywhere). Each population of the meta-batch is run by one worker: a new one goes
to the worker whose other populations cost least by measured time (:func:`metalr.meta.pool.least_loaded`).
After each meta-step the workers all-reduce one packed tensor - every slot's meta-gradient as its own row,
the counters, the "this slot needs a new task" flags and the populations' measured seconds - so every worker
applies the identical update, refills the identical slots and makes the identical assignment. Noise for
ES/PES is seeded per (seed, meta-step, slot), never per worker, and the rows are summed in slot order, so 1
and 2 workers on the same task samples end with bit-identical controllers.

Launch::

    torchrun --standalone --nproc_per_node 2 -m metalr.cli meta-train meta_train/pes.yaml --out runs/pes
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class WorkerContext:
    """Where this process stands in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "cpu") -> WorkerContext:
    """Join the process group ``torchrun`` describes in the environment (no-op for a single process).

    A group initialised by the caller (tests use ``torch.multiprocessing.spawn`` + ``init_process_group``)
    is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return WorkerContext(dist.get_rank(), dist.get_world_size())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return WorkerContext()
    backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return WorkerContext(dist.get_rank(), dist.get_world_size())


def worker_device(device: str, context: WorkerContext) -> str:
    """``cuda`` becomes ``cuda:<LOCAL_RANK>`` under torchrun so each worker drives its own GPU."""
    if device == "cuda" and context.world_size > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', context.rank))}"
    return device


def all_reduce_sum(tensor: Tensor, context: WorkerContext) -> Tensor:
    """Sum ``tensor`` over all workers (in place and returned); identity for one worker."""
    if context.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_min(value: int, context: WorkerContext) -> int:
    """Minimum of an integer over all workers (resume: the newest state every worker has)."""
    if context.world_size <= 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return int(tensor.item())
