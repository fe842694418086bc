"""The plain training loop the scheduler tests drive ``LearnedLR`` with (imported by name, like
``tests/reliability/reliability_support.py``)."""

from __future__ import annotations

import torch
from torch import nn

from metalr.scheduler import LearnedLR


def train(model: nn.Module, optimizer: torch.optim.Optimizer, sched: LearnedLR, data: list) -> list[list[float]]:
    """MSE on ``data``; returns the LRs of every group after each step."""
    lrs = []
    for x, y in data:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        sched.step(loss)
        optimizer.zero_grad()
        lrs.append(sched.get_last_lr())
    return lrs
