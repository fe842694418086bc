"""Meta-gradient estimators behind one interface.

An estimator takes the controller, one :class:`~metalr.meta.unroll.InnerRun` and a truncation length, and
returns an estimate of the gradient of the meta-objective with respect to the controller's parameters,
the (undifferentiated) meta-loss, and the advanced run. Registered by name in :data:`ESTIMATORS`; a recipe
picks one with ``meta.estimator``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from metalr.config import MetaConfig
from metalr.controller import LRController
from metalr.meta.unroll import InnerRun, unroll


@dataclass
class Estimate:
    grads: tuple[Tensor, ...]  # one per controller parameter
    meta_loss: float
    run: InnerRun  # detached state after the truncation
    lrs: list[float]
    alarms: int


class Estimator(Protocol):
    def __call__(self, controller: LRController, run: InnerRun, length: int) -> Estimate: ...


def _grads_or_zeros(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True))


@dataclass
class TruncatedBackprop:
    """Truncated backpropagation through time: exact gradient of the K-step truncation.

    Biased towards short horizons (Wu et al., ICLR 2018): the truncation does not see what happens to
    the loss after it ends.
    """

    config: MetaConfig

    def __call__(self, controller: LRController, run: InnerRun, length: int) -> Estimate:
        result = unroll(
            controller,
            run,
            length,
            differentiable=True,
            detach_features=self.config.detach_features,
            objective_every=self.config.objective_every,
        )
        grads = _grads_or_zeros(result.meta_loss, list(controller.parameters()))
        return Estimate(grads, float(result.meta_loss), result.run.detached(), result.lrs, result.alarms)


ESTIMATORS: dict[str, Callable[[MetaConfig], Estimator]] = {"tbptt": TruncatedBackprop}


def create_estimator(config: MetaConfig) -> Estimator:
    if config.estimator not in ESTIMATORS:
        raise KeyError(f"unknown estimator {config.estimator!r}; expected one of {sorted(ESTIMATORS)}")
    return ESTIMATORS[config.estimator](config)
