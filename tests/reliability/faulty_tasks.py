"""A test-only task family that injects numerical faults (issue 10, point 2).

``reliability_poisoned_linear``: linear regression on Gaussian inputs where a sampled fraction of tasks has
ONE poisoned training example. Whenever the batch stream draws it, the inner step sees

* ``nan_loss`` / ``inf_loss``: a NaN / +inf training loss (a poisoned batch);
* ``nan_grad``: a finite loss whose gradient is NaN (the ``torch.where`` trap: the unselected
  ``sqrt`` of a negative number gives a value of 0 and a gradient of NaN);
* ``lr_spike``: no poisoned example, but a base LR far past the stability edge, so the inner loss
  overflows to inf within a few steps.

Clean examples contribute exactly ``+ 0.0`` so the loss of an unpoisoned batch is bit-identical to plain
MSE. Imported by the tests and by ``fault_harness.py`` (so CLI subprocesses know the family too).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalr.tasks import SamplingConfig, Task, TaskSpec, list_task_families, register_task_family
from metalr.tasks.base import Batch, ModelCall, sample_common, split_indices

FAMILY = "reliability_poisoned_linear"
POISONS = ("none", "nan_loss", "inf_loss", "nan_grad", "lr_spike")
FRACTIONS = {"train": 0.6, "inner_valid": 0.1, "outer_valid": 0.1, "test": 0.2}


def _poisoned_loss(kind: str, model_call: ModelCall, batch: Batch) -> Tensor:
    out = model_call(batch["x"])
    loss = F.mse_loss(out, batch["y"])
    mask = batch["poison"] > 0
    if not bool(mask.any()):
        return loss
    # Scaling the loss (not adding a constant) makes its gradient non-finite too, as a real bad batch does.
    if kind == "nan_loss":
        return loss * float("nan")
    if kind == "inf_loss":
        return loss * float("inf")
    # nan_grad: value + 0.0, gradient NaN (the masked-out branch is sqrt of a negative number).
    selected = out[mask]
    trap = torch.where(torch.zeros_like(selected, dtype=torch.bool), torch.sqrt(-selected.square() - 1.0), torch.zeros_like(selected))
    return loss + trap.sum()


@dataclass
class PoisonedLinearFamily:
    # Defaults give a clean task, so a registry-wide smoke test that meets this family sees nothing odd.
    poison: str = "none"
    poison_probability: float = 0.0  # fraction of sampled tasks that carry the fault
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(optimizers=("sgd",), steps=(20, 30), batch_sizes=(8,))
    )
    dim: int = 3
    examples: int = 80
    name: str = FAMILY
    description: str = "test-only: linear regression with an injected NaN/inf fault"
    dataset: str = "synthetic"
    model: str = "linear"

    def __post_init__(self) -> None:
        if self.poison not in POISONS:
            raise ValueError(f"poison must be one of {POISONS}, got {self.poison!r}")

    @property
    def budget(self) -> str:
        return f"{self.sampling.steps[0]}-{self.sampling.steps[1]} steps"

    def sample(self, generator: torch.Generator) -> TaskSpec:
        poisoned = bool(torch.rand((), generator=generator).item() < self.poison_probability)
        spec = sample_common(generator, self.sampling, self.name, {"poisoned": poisoned, "kind": self.poison})
        if poisoned and self.poison == "lr_spike":
            spec = spec.replace(base_lr=1e6)  # clamped to the controller's max_lr, still far past stable
        return spec

    def build(self, spec: TaskSpec) -> Task:
        g = torch.Generator().manual_seed(spec.seed)
        n, d = self.examples, self.dim
        # Large inputs make an lr_spike task overflow within a few steps.
        scale = 30.0 if spec.options["kind"] == "lr_spike" and spec.options["poisoned"] else 1.0
        x = torch.randn(n, d, generator=g) * scale
        y = (x @ torch.randn(d, 1, generator=g)) + 0.1 * torch.randn(n, 1, generator=g)
        poison = torch.zeros(n)
        idx = split_indices(n, FRACTIONS, spec.seed, fixed_test_seed=spec.seed)
        if spec.options["poisoned"] and spec.options["kind"] != "lr_spike":
            poison[idx["train"][0]] = 1.0  # one training example; validation and test stay clean
        splits = {name: {"x": x[i], "y": y[i], "poison": poison[i]} for name, i in idx.items()}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = nn.Linear(d, 1)
        kind = spec.options["kind"] if spec.options["kind"] in ("nan_loss", "inf_loss", "nan_grad") else "none"
        return Task(spec, model, splits, functools.partial(_poisoned_loss, kind))


def register() -> None:
    """Register the family once per process (the registry refuses a second registration)."""
    if FAMILY not in list_task_families():
        register_task_family(FAMILY)(PoisonedLinearFamily)


register()

__all__ = ["FAMILY", "POISONS", "PoisonedLinearFamily", "register"]
