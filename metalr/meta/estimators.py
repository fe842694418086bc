"""Meta-gradient estimators behind one interface.

An estimator takes the controller, one :class:`~metalr.meta.unroll.InnerRun`, a truncation length and a
noise seed, and returns an estimate of the gradient of the meta-objective with respect to the controller's
parameters, the (undifferentiated) meta-loss, and the advanced run. Registered by name in
:data:`ESTIMATORS`; a recipe picks one with ``meta.estimator``:

* ``tbptt``: truncated backprop through the K-step unroll (exact gradient of the truncation; biased towards
  short horizons, Wu et al., ICLR 2018).
* ``full``: backprop through the whole remaining horizon - unbiased, memory linear in the horizon, so it is
  refused above ``meta.max_full_horizon`` steps.
* ``es``: antithetic evolution strategies on each truncation (Salimans et al., 2017): gradient of the
  Gaussian-smoothed truncated objective; no second-order graph, robust to chaotic long unrolls (Metz et
  al., ICML 2019) but still truncation-biased.
* ``pes``: persistent evolution strategies (Vicol, Metz and Sohl-Dickstein, ICML 2021): each perturbation
  particle keeps its own inner state across truncations and accumulates its noise, which makes the sum of
  per-truncation estimates an unbiased estimate of the smoothed *full-horizon* gradient.

ES and PES run the unroll with ``differentiable=False`` and evaluate perturbed controllers through
``torch.func.functional_call`` (the weights are swapped in for the duration of the unroll; nothing is
copied or modified in place). Frozen controller parameters (``requires_grad=False``) are neither perturbed
nor given a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metalr.config import MetaConfig
from metalr.controller import LRController, PolicyState
from metalr.meta.unroll import InnerRun, UnrollResult, unroll

UnrollFn = Callable[..., UnrollResult]


class EstimatorError(ValueError):
    """An estimator cannot handle this task or configuration (the message says why and what to change)."""


@dataclass
class Estimate:
    grads: tuple[Tensor, ...]  # one per controller parameter (zeros for frozen ones)
    meta_loss: float
    run: InnerRun  # detached state after the truncation
    lrs: list[float]
    alarms: int  # divergence-guard events in the truncation (summed over particles for ES/PES)
    steps: int = 0  # inner steps the truncation advanced the run


class Estimator(Protocol):
    full_horizon: bool  # True: every run must start at step 0 and is unrolled to its end (no staggering)

    def __call__(self, controller: LRController, run: InnerRun, length: int, seed: int = 0) -> Estimate: ...


def get_unroll(backend: str) -> UnrollFn:
    """The unroll implementation of a backend (``native`` or ``higher``)."""
    if backend == "native":
        return unroll
    if backend == "higher":
        from metalr.meta.higher_backend import higher_unroll

        return higher_unroll
    raise EstimatorError(f"unknown meta.backend {backend!r}; expected 'native' or 'higher'")


def _grads_or_zeros(loss: Tensor, params: list[Tensor]) -> tuple[Tensor, ...]:
    trainable = [p for p in params if p.requires_grad]
    grads = iter(torch.autograd.grad(loss, trainable, allow_unused=True)) if trainable else iter(())
    out = []
    for p in params:
        g = next(grads) if p.requires_grad else None
        out.append(torch.zeros_like(p) if g is None else g)
    return tuple(out)


@dataclass
class TruncatedBackprop:
    """Truncated backpropagation through time: exact gradient of the K-step truncation.

    Biased towards short horizons (Wu et al., ICLR 2018): the truncation does not see what happens to
    the loss after it ends, nor how the controller shaped the state it started from.
    """

    config: MetaConfig
    full_horizon = False  # the trainer staggers runs across the horizon

    def __post_init__(self) -> None:
        self.unroll_fn = get_unroll(self.config.backend)

    def _backprop(self, controller: LRController, run: InnerRun, length: int) -> Estimate:
        result = self.unroll_fn(
            controller,
            run,
            length,
            differentiable=True,
            detach_features=self.config.detach_features,
            objective_every=self.config.objective_every,
            valid_every=self.config.valid_every,
        )
        meta_loss = float(result.meta_loss.detach())
        if math.isfinite(meta_loss) and result.meta_loss.requires_grad:
            grads = _grads_or_zeros(result.meta_loss, list(controller.parameters()))
        else:  # non-finite: the trainer skips it; no backward through a diverged graph
            grads = tuple(
                torch.full_like(p, math.nan if not math.isfinite(meta_loss) else 0.0)
                for p in controller.parameters()
            )
        return Estimate(grads, meta_loss, result.run.detached(), result.lrs, result.alarms, len(result.lrs))

    def __call__(self, controller: LRController, run: InnerRun, length: int, seed: int = 0) -> Estimate:
        return self._backprop(controller, run, length)


@dataclass
class FullBackprop(TruncatedBackprop):
    """Backprop through the whole remaining horizon: no truncation bias, memory linear in the horizon.

    Meant for short horizons (the trainer starts every run at step 0 and unrolls it to the end in one
    meta-step); tasks longer than ``meta.max_full_horizon`` are refused with a clear message.
    """

    full_horizon = True

    def __call__(self, controller: LRController, run: InnerRun, length: int, seed: int = 0) -> Estimate:
        horizon = run.task.spec.steps
        if horizon > self.config.max_full_horizon:
            raise EstimatorError(
                f"estimator 'full' backpropagates through the whole horizon, but task {run.task.spec.label} has "
                f"{horizon} steps > meta.max_full_horizon={self.config.max_full_horizon}; lower the horizons "
                f"(train_overrides: {{steps: [low, high]}}) or use estimator tbptt/pes"
            )
        return self._backprop(controller, run, horizon - run.step)


class _Unroller(nn.Module):
    """Wraps the controller so ``functional_call`` can swap perturbed weights in for a whole unroll."""

    def __init__(self, controller: LRController, unroll_fn: UnrollFn, config: MetaConfig) -> None:
        super().__init__()
        self.controller = controller
        self.unroll_fn = unroll_fn
        self.config = config

    def forward(self, run: InnerRun, length: int) -> UnrollResult:
        return self.unroll_fn(
            self.controller,
            run,
            length,
            differentiable=False,
            objective_every=self.config.objective_every,
            valid_every=self.config.valid_every,
        )


def _trainable(controller: LRController) -> list[tuple[str, Tensor]]:
    return [(f"controller.{n}", p) for n, p in controller.named_parameters() if p.requires_grad]


def _noise(params: Sequence[Tensor], sigma: float, generator: torch.Generator) -> tuple[Tensor, ...]:
    # Drawn on the CPU in float64 from a per-(seed, slot, meta-step) generator: the same noise on any
    # device and for any number of workers (determinism, 1-vs-2-worker agreement).
    return tuple(
        (sigma * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(
            device=p.device, dtype=p.dtype
        )
        for p in params
    )


@dataclass
class _ESBase:
    config: MetaConfig
    full_horizon = False

    def __post_init__(self) -> None:
        self.unroll_fn = get_unroll(self.config.backend)

    def _evaluate(
        self, unroller: _Unroller, names: list[str], values: Sequence[Tensor], run: InnerRun, length: int
    ) -> UnrollResult:
        with torch.no_grad():
            return functional_call(unroller, dict(zip(names, values, strict=True)), (run, length))

    def _assemble(
        self, controller: LRController, names: list[str], flat: Sequence[Tensor]
    ) -> tuple[Tensor, ...]:
        by_name = dict(zip(names, flat, strict=True))
        return tuple(
            by_name.get(f"controller.{n}", torch.zeros_like(p)).detach()
            for n, p in controller.named_parameters()
        )


@dataclass
class AntitheticES(_ESBase):
    """Antithetic ES on each truncation: g = sum_j eps_j (L(theta + eps_j) - L(theta - eps_j)) / (2 N sigma^2).

    All perturbations start from the same carried state and see the same batches (common random numbers);
    an extra unperturbed unroll carries the state forward and gives the logged meta-loss.
    """

    def __call__(self, controller: LRController, run: InnerRun, length: int, seed: int = 0) -> Estimate:
        sigma, pairs = self.config.es_sigma, self.config.es_pairs
        unroller = _Unroller(controller, self.unroll_fn, self.config)
        named = _trainable(controller)
        names, theta = [n for n, _ in named], [p.detach() for _, p in named]
        generator = torch.Generator().manual_seed(seed)
        center = self._evaluate(unroller, names, theta, run, length)
        grad = [torch.zeros_like(p) for p in theta]
        finite = math.isfinite(float(center.meta_loss))
        alarms = center.alarms
        for _ in range(pairs):
            eps = _noise(theta, sigma, generator)
            plus = self._evaluate(unroller, names, torch._foreach_add(theta, eps), run, length)
            minus = self._evaluate(unroller, names, torch._foreach_sub(theta, eps), run, length)
            difference = float(plus.meta_loss) - float(minus.meta_loss)
            finite = finite and math.isfinite(difference)
            alarms += plus.alarms + minus.alarms
            torch._foreach_add_(grad, eps, alpha=difference if math.isfinite(difference) else 0.0)
        scale = 1.0 / (2 * pairs * sigma**2)
        flat = [g * scale if finite else torch.full_like(g, math.nan) for g in grad]
        return Estimate(
            self._assemble(controller, names, flat),
            float(center.meta_loss),
            center.run.detached(),
            center.lrs,
            alarms,
            len(center.lrs),
        )


class PESState(NamedTuple):
    """Per-run PES state (lives in ``InnerRun.estimator_state['pes']``): one inner state per particle.

    Particles come in antithetic pairs (``2 * es_pairs``: +eps_j at index 2j, -eps_j at 2j+1);
    ``accumulated[j]`` is xi_j, the sum of the perturbations of pair j over all truncations so far.
    """

    params: tuple[tuple[Tensor, ...], ...]
    opt_state: tuple[tuple[Tensor, ...], ...]
    policy: tuple[PolicyState, ...]
    accumulated: tuple[tuple[Tensor, ...], ...]


@dataclass
class PersistentES(_ESBase):
    """Persistent evolution strategies (Vicol et al., ICML 2021, Algorithm 2 with antithetic pairs).

    Each truncation draws fresh eps_j, adds it to the pair's accumulated xi_j, advances the +/- particles
    from *their own* states with theta +/- eps_j, and estimates
    g = sum_j xi_j (L_j^+ - L_j^-) / (2 N sigma^2).
    Because xi_j carries the noise that shaped the particle's current state, the estimates summed over a
    whole horizon are an unbiased estimate of the gradient of the smoothed full-horizon objective, where
    truncated backprop and truncated ES are biased. The state resets when the run is replaced (new task).
    """

    def __call__(self, controller: LRController, run: InnerRun, length: int, seed: int = 0) -> Estimate:
        sigma, pairs = self.config.es_sigma, self.config.es_pairs
        unroller = _Unroller(controller, self.unroll_fn, self.config)
        named = _trainable(controller)
        names, theta = [n for n, _ in named], [p.detach() for _, p in named]
        generator = torch.Generator().manual_seed(seed)
        state: PESState | None = run.estimator_state.get("pes")
        if state is None or len(state.accumulated) != pairs:
            state = PESState(
                params=(run.params,) * (2 * pairs),
                opt_state=(run.opt_state,) * (2 * pairs),
                policy=(run.policy,) * (2 * pairs),
                accumulated=tuple(tuple(torch.zeros_like(p) for p in theta) for _ in range(pairs)),
            )
        grad = [torch.zeros_like(p) for p in theta]
        new_params, new_opt, new_policy, new_accumulated = [], [], [], []
        losses: list[float] = []
        alarms = 0
        last: UnrollResult | None = None
        first: UnrollResult | None = None
        for j in range(pairs):
            eps = _noise(theta, sigma, generator)
            xi = tuple(torch._foreach_add(list(state.accumulated[j]), eps))
            pair_losses = []
            for sign, index in ((1.0, 2 * j), (-1.0, 2 * j + 1)):
                particle = replace(
                    run,
                    params=state.params[index],
                    opt_state=state.opt_state[index],
                    policy=state.policy[index],
                )
                values = torch._foreach_add(theta, eps, alpha=sign)
                result = self._evaluate(unroller, names, values, particle, length)
                first = first or result
                last = result
                pair_losses.append(float(result.meta_loss))
                alarms += result.alarms
                new_params.append(result.run.params)
                new_opt.append(result.run.opt_state)
                new_policy.append(result.run.policy)
            losses += pair_losses
            difference = pair_losses[0] - pair_losses[1]
            torch._foreach_add_(grad, list(xi), alpha=difference if math.isfinite(difference) else 0.0)
            new_accumulated.append(xi)
        assert first is not None and last is not None
        finite = all(math.isfinite(x) for x in losses)
        scale = 1.0 / (2 * pairs * sigma**2)
        flat = [g * scale if finite else torch.full_like(g, math.nan) for g in grad]
        new_state = PESState(tuple(new_params), tuple(new_opt), tuple(new_policy), tuple(new_accumulated))
        # The run itself follows particle 0 (its streams moved exactly as every particle's did).
        advanced = replace(
            last.run.detached(),
            params=first.run.params,
            opt_state=first.run.opt_state,
            policy=first.run.policy,
            estimator_state={**run.estimator_state, "pes": new_state},
        )
        return Estimate(
            self._assemble(controller, names, flat),
            sum(losses) / len(losses),
            advanced,
            first.lrs,
            alarms,
            len(first.lrs),
        )


ESTIMATORS: dict[str, Callable[[MetaConfig], Estimator]] = {
    "tbptt": TruncatedBackprop,
    "full": FullBackprop,
    "es": AntitheticES,
    "pes": PersistentES,
}
BACKPROP_ESTIMATORS = ("tbptt", "full")


def create_estimator(config: MetaConfig) -> Estimator:
    """The estimator a recipe names (``meta.estimator``), built for its ``meta.backend``."""
    if config.estimator not in ESTIMATORS:
        raise KeyError(f"unknown estimator {config.estimator!r}; expected one of {sorted(ESTIMATORS)}")
    if config.backend != "native" and config.estimator not in BACKPROP_ESTIMATORS:
        raise EstimatorError(
            f"meta.backend={config.backend!r} applies to the backprop estimators {list(BACKPROP_ESTIMATORS)}; "
            f"estimator {config.estimator!r} needs no autograd and runs on the native unroll (set backend: native)"
        )
    return ESTIMATORS[config.estimator](config)
