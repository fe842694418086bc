"""Meta-gradient estimators behind one interface.

An estimator owns its state (``init(controller, run)``; PES keeps its particles there) and, called with the
controller, one :class:`~metalr.meta.unroll.InnerRun`, that state, a truncation length and a noise seed,
returns an :class:`Estimate` of the gradient of the meta-objective with respect to the controller's
parameters, the (undifferentiated) meta-loss, the advanced run and its next state. Registered by name in
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

ES and PES evaluate perturbed controllers by passing the perturbed weights ``theta`` to the one unroll
loop (:func:`~metalr.meta.unroll.unroll`), first-order (``torch.func.grad``, no graph). With
``meta.vectorize`` (the default) all particles of a truncation run as one ``torch.func.vmap``-ed unroll;
otherwise one after another (the reference the vectorised estimate is tested against). Frozen controller
parameters (``requires_grad=False``) are neither perturbed nor given a gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from metalr.config import MetaConfig
from metalr.controller import LRController
from metalr.meta.unroll import (
    NATIVE,
    Backend,
    Carry,
    InnerRun,
    Objective,
    UnrollResult,
    index_tree,
    stack_trees,
    unroll,
    unroll_population,
)


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
    state: Any = ()  # the estimator's state for this run's next truncation


class Estimator(Protocol):
    full_horizon: bool  # True: every run must start at step 0 and is unrolled to its end (no staggering)

    def init(self, controller: LRController, run: InnerRun) -> Any:
        """The estimator's state for a fresh run (a pytree of tensors, or ``()``)."""
        ...

    def __call__(
        self, controller: LRController, run: InnerRun, length: int, seed: int = 0, state: Any = ()
    ) -> Estimate:
        """One truncation of ``length`` steps from ``run`` with this run's ``state`` (from :meth:`init`)."""
        ...

    def many(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        length: int,
        seeds: Sequence[int],
        states: Sequence[Any],
    ) -> list[Estimate]:
        """``[self(controller, r, length, seed, state) for ...]``; ES/PES vmap a population (one architecture,
        in lockstep: :func:`~metalr.meta.unroll.population_key`) as one unroll when ``meta.vectorize``."""
        ...


def get_backend(name: str) -> Backend:
    """The inner-update backend of a recipe's ``meta.backend`` (``native`` or ``higher``)."""
    if name == "native":
        return NATIVE
    if name == "higher":
        from metalr.meta.higher_backend import HIGHER

        return HIGHER
    raise EstimatorError(f"unknown meta.backend {name!r}; expected 'native' or 'higher'")


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
        self.backend = get_backend(self.config.backend)

    def init(self, controller: LRController, run: InnerRun) -> Any:
        return ()

    def _backprop(self, controller: LRController, run: InnerRun, length: int) -> Estimate:
        result = unroll(
            controller,
            run,
            length,
            differentiable=True,
            detach_features=self.config.detach_features,
            objective=Objective.of(self.config),
            valid_every=self.config.valid_every,
            backend=self.backend,
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

    def __call__(
        self, controller: LRController, run: InnerRun, length: int, seed: int = 0, state: Any = ()
    ) -> Estimate:
        return self._backprop(controller, run, length)

    def many(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        length: int,
        seeds: Sequence[int],
        states: Sequence[Any],
    ) -> list[Estimate]:
        # Backprop through a vmapped population would need a second-order graph per member: one at a time.
        return [self(controller, r, length, seed, st) for r, seed, st in zip(runs, seeds, states, strict=True)]


@dataclass
class FullBackprop(TruncatedBackprop):
    """Backprop through the whole remaining horizon: no truncation bias, memory linear in the horizon.

    Meant for short horizons (the trainer starts every run at step 0 and unrolls it to the end in one
    meta-step); tasks longer than ``meta.max_full_horizon`` are refused with a clear message.
    """

    full_horizon = True

    def __call__(
        self, controller: LRController, run: InnerRun, length: int, seed: int = 0, state: Any = ()
    ) -> Estimate:
        horizon = run.task.spec.steps
        if horizon > self.config.max_full_horizon:
            raise EstimatorError(
                f"estimator 'full' backpropagates through the whole horizon, but task {run.task.spec.label} has "
                f"{horizon} steps > meta.max_full_horizon={self.config.max_full_horizon}; lower the horizons "
                f"(train_overrides: {{steps: [low, high]}}) or use estimator tbptt/pes"
            )
        return self._backprop(controller, run, horizon - run.step)


def _trainable(controller: LRController) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in controller.theta().items() if p.requires_grad}


def _noise(theta: dict[str, Tensor], sigma: float, generator: torch.Generator) -> dict[str, Tensor]:
    # Drawn on the CPU in float64 from a per-(seed, slot, meta-step) generator: the same noise on any
    # device and for any number of workers (determinism, 1-vs-2-worker agreement).
    return {
        n: (sigma * torch.randn(p.shape, generator=generator, dtype=torch.float64)).to(device=p.device, dtype=p.dtype)
        for n, p in theta.items()
    }


def _antithetic(theta: dict[str, Tensor], noises: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
    """theta + eps_j, theta - eps_j for each pair j (particles 2j and 2j+1)."""
    thetas = []
    for eps in noises:
        thetas += [{n: theta[n] + eps[n] for n in theta}, {n: theta[n] - eps[n] for n in theta}]
    return thetas


class _Particles(NamedTuple):
    meta_losses: list[float]  # one per particle
    carry: Carry  # stacked, leading dimension = particles
    run: InnerRun  # the run with particle 0's carry (its streams moved as every particle's did)
    lrs: list[float]  # particle 0's
    alarms: int


@dataclass
class _ESBase:
    config: MetaConfig
    full_horizon = False

    def _run_particles(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        carries: Sequence[Carry],
        thetas: Sequence[list[dict[str, Tensor]]],
        length: int,
    ) -> list[_Particles]:
        """For each run ``m``, unroll its particle ``i`` (state ``carries[m][i]``) with weights ``thetas[m][i]``.

        Particles of one run see the same batches. Vectorised: one vmap over particles (and, for more than
        one run, over the runs as a population); otherwise one unroll after another (the reference).
        """
        frozen = {n: p.detach() for n, p in controller.theta().items() if n not in thetas[0][0]}
        weights = [[{**frozen, **t} for t in member] for member in thetas]
        options = {"objective": Objective.of(self.config), "valid_every": self.config.valid_every}
        count = len(weights[0])
        if self.config.vectorize:
            starts = [r.with_carry(c) for r, c in zip(runs, carries, strict=True)]
            stacked = [stack_trees(w) for w in weights]
            if len(runs) == 1:
                results = [
                    unroll(controller, starts[0], length, differentiable=False, theta=stacked[0], particles=count, **options)  # type: ignore[arg-type]
                ]
            else:
                results = unroll_population(
                    controller, starts, length, theta=stack_trees(stacked), particles=count, **options  # type: ignore[arg-type]
                )
            return [
                _Particles(
                    [float(x) for x in r.meta_loss.tolist()],
                    r.run.carry,
                    r.run.with_carry(index_tree(r.run.carry, 0)),
                    r.lrs,
                    r.alarms,
                )
                for r in results
            ]
        out = []
        for run, carry, member in zip(runs, carries, weights, strict=True):
            each: list[UnrollResult] = [
                unroll(controller, run.with_carry(index_tree(carry, i)), length, differentiable=False, theta=w, **options)  # type: ignore[arg-type]
                for i, w in enumerate(member)
            ]
            out.append(
                _Particles(
                    [float(r.meta_loss) for r in each],
                    stack_trees([r.run.carry for r in each]),
                    each[0].run,
                    each[0].lrs,
                    sum(r.alarms for r in each),
                )
            )
        return out

    def _noises(self, theta: dict[str, Tensor], seeds: Sequence[int]) -> list[list[dict[str, Tensor]]]:
        """``es_pairs`` perturbations eps_j for each run, from that run's noise seed."""
        noises = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            noises.append([_noise(theta, self.config.es_sigma, generator) for _ in range(self.config.es_pairs)])
        return noises

    def _assemble(self, controller: LRController, grad: dict[str, Tensor], finite: bool) -> tuple[Tensor, ...]:
        scale = 1.0 / (2 * self.config.es_pairs * self.config.es_sigma**2)
        return tuple(
            (grad[n] * scale if finite else torch.full_like(p, math.nan)) if n in grad else torch.zeros_like(p)
            for n, p in controller.theta().items()
        )

    def many(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        length: int,
        seeds: Sequence[int],
        states: Sequence[Any],
    ) -> list[Estimate]:
        raise NotImplementedError

    def __call__(
        self, controller: LRController, run: InnerRun, length: int, seed: int = 0, state: Any = ()
    ) -> Estimate:
        return self.many(controller, [run], length, [seed], [state])[0]


def _repeat(carry: Carry, count: int) -> Carry:
    return tree_map(lambda t: t.detach().unsqueeze(0).expand(count, *t.shape).clone(), carry)


@dataclass
class AntitheticES(_ESBase):
    """Antithetic ES on each truncation: g = sum_j eps_j (L(theta + eps_j) - L(theta - eps_j)) / (2 N sigma^2).

    All perturbations start from the same carried state and see the same batches (common random numbers);
    an extra unperturbed particle (index 0) carries the state forward and gives the logged meta-loss.
    """

    def init(self, controller: LRController, run: InnerRun) -> Any:
        return ()

    def many(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        length: int,
        seeds: Sequence[int],
        states: Sequence[Any],
    ) -> list[Estimate]:
        theta = _trainable(controller)
        noises = self._noises(theta, seeds)
        thetas = [[theta, *_antithetic(theta, member)] for member in noises]
        carries = [_repeat(r.carry, len(thetas[0])) for r in runs]
        estimates = []
        for out, member in zip(self._run_particles(controller, runs, carries, thetas, length), noises, strict=True):
            grad = {n: torch.zeros_like(p) for n, p in theta.items()}
            finite = math.isfinite(out.meta_losses[0])
            for j, eps in enumerate(member):
                difference = out.meta_losses[1 + 2 * j] - out.meta_losses[2 + 2 * j]
                finite = finite and math.isfinite(difference)
                for n in grad:
                    grad[n] += eps[n] * (difference if math.isfinite(difference) else 0.0)
            estimates.append(
                Estimate(
                    self._assemble(controller, grad, finite),
                    out.meta_losses[0],
                    out.run.detached(),
                    out.lrs,
                    out.alarms,
                    len(out.lrs),
                )
            )
        return estimates


class PESState(NamedTuple):
    """PES state of one run: every particle's inner state, and the noise each pair has accumulated.

    Particles come in antithetic pairs (``2 * es_pairs``: +eps_j at index 2j, -eps_j at 2j+1), stacked along
    a leading dimension; ``accumulated[name][j]`` is xi_j, the sum of pair j's perturbations over all
    truncations so far. A new run (a new task) starts a new state.
    """

    carry: Carry
    accumulated: dict[str, Tensor]


@dataclass
class PersistentES(_ESBase):
    """Persistent evolution strategies (Vicol et al., ICML 2021, Algorithm 2 with antithetic pairs).

    Each truncation draws fresh eps_j, adds it to the pair's accumulated xi_j, advances the +/- particles
    from *their own* states with theta +/- eps_j, and estimates
    g = sum_j xi_j (L_j^+ - L_j^-) / (2 N sigma^2).
    Because xi_j carries the noise that shaped the particle's current state, the estimates summed over a
    whole horizon are an unbiased estimate of the gradient of the smoothed full-horizon objective, where
    truncated backprop and truncated ES are biased.
    """

    def init(self, controller: LRController, run: InnerRun) -> PESState:
        pairs = self.config.es_pairs
        theta = _trainable(controller)
        return PESState(
            carry=_repeat(run.carry, 2 * pairs),
            accumulated={n: torch.zeros((pairs, *p.shape), dtype=p.dtype, device=p.device) for n, p in theta.items()},
        )

    def many(
        self,
        controller: LRController,
        runs: Sequence[InnerRun],
        length: int,
        seeds: Sequence[int],
        states: Sequence[Any],
    ) -> list[Estimate]:
        pairs = self.config.es_pairs
        theta = _trainable(controller)
        states = [s if isinstance(s, PESState) else self.init(controller, r) for r, s in zip(runs, states, strict=True)]
        noises = self._noises(theta, seeds)
        accumulated = [
            {n: state.accumulated[n] + torch.stack([eps[n] for eps in member]) for n in theta}
            for member, state in zip(noises, states, strict=True)
        ]
        thetas = [_antithetic(theta, member) for member in noises]
        outs = self._run_particles(controller, runs, [s.carry for s in states], thetas, length)
        estimates = []
        for out, xis in zip(outs, accumulated, strict=True):
            differences = [out.meta_losses[2 * j] - out.meta_losses[2 * j + 1] for j in range(pairs)]
            finite = all(math.isfinite(x) for x in out.meta_losses)
            weights = torch.tensor([d if math.isfinite(d) else 0.0 for d in differences], dtype=torch.float64)
            grad = {n: torch.tensordot(weights.to(xi.device, xi.dtype), xi, dims=1) for n, xi in xis.items()}
            estimates.append(
                Estimate(
                    self._assemble(controller, grad, finite),
                    sum(out.meta_losses) / len(out.meta_losses),
                    out.run.detached(),
                    out.lrs,
                    out.alarms,
                    len(out.lrs),
                    PESState(out.carry, xis),
                )
            )
        return estimates


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
    if config.objective_cap is not None and config.estimator in BACKPROP_ESTIMATORS:
        raise EstimatorError(
            f"meta.objective_cap applies to the ES/PES estimators (a capped term has no gradient); "
            f"estimator {config.estimator!r} needs objective_cap: null"
        )
    return ESTIMATORS[config.estimator](config)
