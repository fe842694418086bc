"""The meta-batch's tasks: sampling, staggering, populations, refills and the memory refusal.

A :class:`TaskPool` holds ``meta.meta_batch`` slots, grouped into populations of ``meta.population``
consecutive slots. The members of a population share one architecture, data shapes, optimizer, horizon and
start offset, and differ in seed (data order and subset, label noise, initialisation) and base LR (drawn
from the family's range for that optimizer), so ES/PES can vmap them as one unroll
(:func:`~metalr.meta.unroll.unroll_population`). With ``population: 1`` (the default) every slot is its own
task, exactly as before populations existed.

Every worker draws every task (the samplers stay in step); only the worker that owns a population builds
and trains it. A newly drawn population goes to the worker whose other populations cost least, by the
measured (all-reduced) seconds of their last truncation (:func:`least_loaded`), so a worker that drew costly
tasks is not also handed the next one; every worker computes the same assignment. A finished population is
refilled as a whole with a newly drawn architecture; a member whose truncation was non-finite is replaced by
a fresh member of the same population, brought to the population's step with a frozen-controller unroll.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from metalr.config import AugmentConfig, FamilyEntry, MetaConfig
from metalr.controller import LRController
from metalr.meta.distributed import WorkerContext
from metalr.meta.estimators import BACKPROP_ESTIMATORS, Estimator
from metalr.meta.resources import MemoryBudgetError, check_memory_budget, estimate_unroll_bytes
from metalr.meta.unroll import InnerRun, Objective, start_run, unroll
from metalr.tasks import TaskSpec, build_task, create_task_family
from metalr.tasks.augment import Augmentation
from metalr.tasks.base import DEFAULT_LR_RANGES, log_uniform


class MetaTrainingError(RuntimeError):
    """Meta-training cannot continue (too many non-finite truncations, refused tasks, ...)."""


@dataclass
class TaskSampler:
    """Draws specs from a list of families (uniformly over families) with its own generator."""

    entries: tuple[FamilyEntry, ...]
    seed: int
    augment: AugmentConfig = AugmentConfig()  # each population's augmentation is drawn from these ranges
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("the task suite lists no families to sample from")
        self.families = [create_task_family(e.family, **e.overrides) for e in self.entries]
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_spec(self) -> TaskSpec:
        return self.families[self._next_index()].sample(self.generator)

    def next_population(self, size: int) -> list[TaskSpec]:
        """``size`` specs of one architecture: the first as :meth:`next_spec` draws it, the others with their
        own seed and a base LR from the family's range for the spec's optimizer."""
        first = self.next_spec()
        if self.augment.enabled:  # an identity config draws nothing, so recipes without one sample as before
            first = self.next_augmentation().on(first)
        return [first] + [self.member_of(first, self.member_draw()) for _ in range(size - 1)]

    def next_augmentation(self) -> Augmentation:
        """One population's augmentation (its members share it, so they stay one vmappable architecture)."""
        a, g = self.augment, self.generator
        noise_low, noise_high = a.label_noise
        label_noise = noise_low + (noise_high - noise_low) * torch.rand((), generator=g, dtype=torch.float64).item()
        return Augmentation(log_uniform(g, *a.param_scale), log_uniform(g, *a.loss_scale), label_noise)

    def member_draw(self) -> tuple[int, float]:
        """The random choices of a new population member: a task seed and a uniform for its base LR. Drawn
        on every worker (so the generators stay in step) whether or not it owns the population."""
        seed = int(torch.randint(2**31 - 1, (), generator=self.generator))
        return seed, torch.rand((), generator=self.generator, dtype=torch.float64).item()

    def member_of(self, spec: TaskSpec, draw: tuple[int, float]) -> TaskSpec:
        family = next(f for f in self.families if f.name == spec.family)
        sampling = getattr(family, "sampling", None)
        ranges = sampling.lr_ranges if sampling else DEFAULT_LR_RANGES
        low, high = ranges.get(spec.optimizer, DEFAULT_LR_RANGES[spec.optimizer])
        seed, u = draw
        return spec.replace(seed=seed, base_lr=math.exp(math.log(low) + u * (math.log(high) - math.log(low))))

    def _next_index(self) -> int:
        return int(torch.randint(len(self.families), (), generator=self.generator))


def least_loaded(owners: Sequence[int], costs: Sequence[float], world_size: int, group: int) -> int:
    """The worker to run population ``group``: the one whose other populations cost least (``costs``: measured
    seconds per truncation, 0 before the first), then the one with fewest, then the lowest rank.
    ``owners[g]`` is population ``g``'s worker, -1 while it is unassigned."""
    load = [0.0] * world_size
    count = [0] * world_size
    for g, (owner, cost) in enumerate(zip(owners, costs, strict=True)):
        if g != group and owner >= 0:
            load[owner] += cost
            count[owner] += 1
    return min(range(world_size), key=lambda w: (load[w], count[w], w))


@dataclass
class PoolCounters:
    """What the pool reports to the loop (part of its JSON resume state)."""

    refused: int = 0
    consecutive_refused: int = 0
    pending_guard_events: int = 0  # guard events of staggering unrolls, reported with the next meta-step


class TaskPool:
    """The meta-batch's inner runs and their estimator states, by slot."""

    def __init__(
        self,
        sampler: TaskSampler,
        meta: MetaConfig,
        controller: LRController,
        estimator: Estimator,
        context: WorkerContext,
        device: str,
        record: Callable[[dict[str, Any]], None],
        counters: PoolCounters,
    ) -> None:
        self.sampler, self.meta, self.controller, self.estimator = sampler, meta, controller, estimator
        self.context, self.device, self.record, self.counters = context, device, record, counters
        self.size = meta.population
        self.runs: list[InnerRun | None] = [None] * meta.meta_batch
        self.states: list[Any] = [()] * meta.meta_batch
        self.groups = meta.meta_batch // self.size
        self.owners = [-1] * self.groups  # the worker of each population (identical on every worker)
        self.costs = [0.0] * self.groups  # seconds of each population's last truncation (all-reduced)

    def populations(self) -> Iterator[tuple[int, list[int]]]:
        """``(population, its slots)`` for each population this worker owns, in slot order."""
        for group in range(self.groups):
            if self.owners[group] == self.context.rank:
                yield group, list(self._slots(group))

    def fill_all(self) -> None:
        offset = not self.estimator.full_horizon
        for group in range(self.groups):
            self.fill_population(group, offset)

    def fill_population(self, group: int, offset: bool) -> None:
        """Draw population ``group`` (every worker draws; the owner builds it), staggered when ``offset``."""
        while True:
            specs = self.sampler.next_population(self.size)
            # Stagger the meta-batch: start at a random point of the horizon so tasks are not in lockstep.
            skip = int(torch.randint(specs[0].steps, (), generator=self.sampler.generator)) if offset else 0
            if self._fits(specs[0]):
                break
        self.owners[group] = least_loaded(self.owners, self.costs, self.context.world_size, group)
        self.costs[group] = 0.0
        owned = self.owners[group] == self.context.rank
        for slot, spec in zip(self._slots(group), specs, strict=True):
            self.runs[slot] = self._start(spec, skip) if owned else None
            self.states[slot] = ()

    def refill(self, flags: list[bool]) -> None:
        """Refill the flagged slots (done or non-finite), in slot order, identically on every worker.

        Members of a population finish together, so a population whose slots are all flagged is drawn
        anew; a member flagged alone (non-finite) is replaced by a fresh member at its population's step.
        The decision reads only the all-reduced flags, so every worker makes the same draws.
        """
        for group in range(self.groups):
            flagged = [s for s in self._slots(group) if flags[s]]
            if len(flagged) == self.size:
                self.fill_population(group, offset=False)
                continue
            template = next((self.runs[s] for s in self._slots(group) if not flags[s]), None)
            for slot in flagged:
                draw = self.sampler.member_draw()
                if template is not None:  # this worker owns the population
                    self.runs[slot] = self._start(self.sampler.member_of(template.task.spec, draw), template.step)
                    self.states[slot] = ()

    def _slots(self, group: int) -> range:
        return range(group * self.size, (group + 1) * self.size)

    def _start(self, spec: TaskSpec, skip: int) -> InnerRun:
        run = start_run(build_task(spec, self.device), self.controller, self.meta.valid_batch_size)
        if skip:
            result = unroll(self.controller, run, skip, differentiable=False, objective=Objective(every=max(1, skip)))
            self.counters.pending_guard_events += result.alarms  # reported with the next meta-step's counters
            run = result.run
        return run

    def _fits(self, spec: TaskSpec) -> bool:
        """Whether ``spec``'s unroll fits the memory budget; a refusal is counted and logged."""
        if self.meta.memory_budget_mb <= 0:
            return True
        try:
            self._check_memory(spec)
        except MemoryBudgetError as err:
            self.counters.refused += 1
            self.counters.consecutive_refused += 1
            self.record({"event": "refused_task", "reason": str(err)})
            if self.counters.consecutive_refused >= self.meta.max_refused:
                raise MetaTrainingError(
                    f"{self.counters.consecutive_refused} sampled tasks in a row exceed the memory budget "
                    f"(last: {err}); raise meta.memory_budget_mb or shorten unrolls/horizons"
                ) from None
            return False
        self.counters.consecutive_refused = 0
        return True

    def _check_memory(self, spec: TaskSpec) -> None:
        meta = self.meta
        differentiable = meta.estimator in BACKPROP_ESTIMATORS
        length = spec.steps if meta.estimator == "full" else meta.unroll_length
        particles = (2 * meta.es_pairs + 1) * self.size if not differentiable else 1
        run = start_run(build_task(spec, self.device), self.controller, meta.valid_batch_size)
        estimate = estimate_unroll_bytes(self.controller, run, length, differentiable, particles, meta.valid_every)
        check_memory_budget(estimate, meta.memory_budget_mb, f"task {spec.label} (unroll of {length} steps)")
