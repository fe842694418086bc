"""Base optimizers by name: the real ``torch.optim`` objects the evaluation harness uses.

``metalr.meta.inner`` reimplements the same update rules functionally for differentiable unrolls, with the
same :class:`OptimizerHyper`, so meta-training and deployment optimise with identical rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimizerHyper:
    """Fixed hyperparameters of the base optimizers (PyTorch defaults; SGD momentum 0.9, AdamW decay 0.01)."""

    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # AdamW only


def make_torch_optimizer(name: str, params: Iterable, lr: float, hyper: OptimizerHyper | None = None) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer for a task's base-optimizer name (``sgd``, ``momentum``, ``adam``, ``adamw``)."""
    h = hyper or OptimizerHyper()
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "sgd": lambda: torch.optim.SGD(params, lr=lr),
        "momentum": lambda: torch.optim.SGD(params, lr=lr, momentum=h.momentum),
        "adam": lambda: torch.optim.Adam(params, lr=lr, betas=(h.beta1, h.beta2), eps=h.eps),
        "adamw": lambda: torch.optim.AdamW(params, lr=lr, betas=(h.beta1, h.beta2), eps=h.eps, weight_decay=h.weight_decay),
    }
    if name not in factories:
        raise KeyError(f"unknown optimizer {name!r}; expected one of {sorted(factories)}")
    return factories[name]()
