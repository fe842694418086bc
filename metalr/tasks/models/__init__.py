"""Model factories. Every factory is seeded by the caller through ``torch.random.fork_rng``-style seeding."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


def mlp(
    in_dim: int,
    out_dim: int,
    width: int,
    depth: int,
    activation: str = "relu",
    init_scale: float = 1.0,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Fully connected net: ``depth`` hidden layers of ``width``; weights scaled by ``init_scale``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth):
        layers.append(nn.Linear(dim, width))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(ACTIVATIONS[activation]())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        dim = width
    layers.append(nn.Linear(dim, out_dim))
    net = nn.Sequential(*layers)
    if init_scale != 1.0:
        for module in net.modules():
            if isinstance(module, nn.Linear):
                module.weight.data.mul_(init_scale)
    return net
