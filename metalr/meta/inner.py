"""Differentiable inner optimizers (SGD, SGD+momentum, Adam, AdamW) in optax's init/update style.

Parameters, gradients and optimizer state are tuples of tensors; no update is in place, so the whole
inner trajectory stays on the autograd tape and the meta-gradient flows through the learning rates.
Their update rules are PyTorch's (``torch.optim.SGD(momentum=0.9)``, ``torch.optim.Adam`` defaults) so a
controller trained through them behaves the same when deployed with the real optimizers; the deployment
parity test checks this step for step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from metalr.tasks.optimizers import OptimizerHyper as InnerHyper

Tensors = tuple[Tensor, ...]


class InnerOptimizer(NamedTuple):
    """``init(params) -> state``; ``update(grads, state, params, lr) -> (new_params, new_state)``."""

    init: Callable[[Tensors], Tensors]
    update: Callable[[Tensors, Tensors, Tensors, Tensor], tuple[Tensors, Tensors]]


def _sgd(h: InnerHyper) -> InnerOptimizer:
    def init(params: Tensors) -> Tensors:
        return ()

    def update(grads: Tensors, state: Tensors, params: Tensors, lr: Tensor) -> tuple[Tensors, Tensors]:
        return tuple(p - lr * g for p, g in zip(params, grads, strict=True)), state

    return InnerOptimizer(init, update)


def _momentum(h: InnerHyper) -> InnerOptimizer:
    # torch.optim.SGD: buf = momentum * buf + g (buf = g at the first step); p -= lr * buf
    def init(params: Tensors) -> Tensors:
        return (torch.zeros((), dtype=params[0].dtype, device=params[0].device),) + tuple(
            torch.zeros_like(p) for p in params
        )

    def update(grads: Tensors, state: Tensors, params: Tensors, lr: Tensor) -> tuple[Tensors, Tensors]:
        count, bufs = state[0], state[1:]
        first = count == 0
        new_bufs = tuple(torch.where(first, g, h.momentum * b + g) for b, g in zip(bufs, grads, strict=True))
        new_params = tuple(p - lr * b for p, b in zip(params, new_bufs, strict=True))
        return new_params, (count + 1,) + new_bufs

    return InnerOptimizer(init, update)


def _adam(h: InnerHyper, decoupled_decay: float = 0.0) -> InnerOptimizer:
    def init(params: Tensors) -> Tensors:
        zeros = tuple(torch.zeros_like(p) for p in params)
        return (torch.zeros((), dtype=params[0].dtype, device=params[0].device),) + zeros + zeros

    def update(grads: Tensors, state: Tensors, params: Tensors, lr: Tensor) -> tuple[Tensors, Tensors]:
        # torch.optim.Adam's single-tensor arithmetic, op for op (lerp, addcmul, sqrt / sqrt(bc2) + eps,
        # p - step * m / denom): every op is a pass over parameter-sized memory, which bounds a vmapped step.
        n = len(params)
        count, m, v = state[0] + 1, state[1 : 1 + n], state[1 + n :]
        new_m = tuple(torch.lerp(mi, g, 1 - h.beta1) for mi, g in zip(m, grads, strict=True))
        new_v = tuple(torch.addcmul(vi * h.beta2, g, g, value=1 - h.beta2) for vi, g in zip(v, grads, strict=True))
        step_size = lr / (1 - h.beta1**count)
        bc2_sqrt = (1 - h.beta2**count).sqrt()
        # sqrt has an infinite derivative at 0, and a parameter whose gradient is exactly zero (an embedding
        # row absent from every batch so far) has v = 0: its meta-gradient would be inf * 0 = NaN. Adding
        # the dtype's smallest normal number keeps the derivative finite and changes no value (it is ~1e-19
        # after the square root, far below eps).
        tiny = torch.finfo(params[0].dtype).tiny
        if decoupled_decay:
            params = tuple(p * (1 - lr * decoupled_decay) for p in params)
        new_params = tuple(
            p - step_size * (mi / ((vi + tiny).sqrt() / bc2_sqrt + h.eps))
            for p, mi, vi in zip(params, new_m, new_v, strict=True)
        )
        return new_params, (count,) + new_m + new_v

    return InnerOptimizer(init, update)


INNER_OPTIMIZERS: dict[str, Callable[[InnerHyper], InnerOptimizer]] = {
    "sgd": _sgd,
    "momentum": _momentum,
    "adam": _adam,
    "adamw": lambda h: _adam(h, h.weight_decay),
}


def make_inner_optimizer(name: str, hyper: InnerHyper | None = None) -> InnerOptimizer:
    if name not in INNER_OPTIMIZERS:
        raise KeyError(f"unknown inner optimizer {name!r}; expected one of {sorted(INNER_OPTIMIZERS)}")
    return INNER_OPTIMIZERS[name](hyper or InnerHyper())
