"""Tabular models: a fully connected net with dropout and batch norm, and logistic regression."""

from __future__ import annotations

from torch import nn

from metalr.tasks.models import mlp


def tabular_mlp(
    in_dim: int,
    num_classes: int,
    width: int = 64,
    depth: int = 2,
    dropout: float = 0.1,
    batch_norm: bool = True,
    activation: str = "relu",
) -> nn.Sequential:
    """``depth`` blocks of Linear -> BatchNorm -> activation -> Dropout, then a linear head."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout=}")
    return mlp(in_dim, num_classes, width, depth, activation, dropout=dropout, batch_norm=batch_norm)


def logistic_regression(in_dim: int, num_classes: int = 2) -> nn.Linear:
    """Multinomial logistic regression: one linear layer trained with cross-entropy (two logits for a
    binary task, so every classifier in the package has the same output contract)."""
    if in_dim <= 0 or num_classes < 2:
        raise ValueError(f"need in_dim >= 1 and num_classes >= 2, got {in_dim=}, {num_classes=}")
    return nn.Linear(in_dim, num_classes)
