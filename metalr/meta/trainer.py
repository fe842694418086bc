"""The outer loop: sample tasks, estimate meta-gradients over truncations, update the controller.

Wired in plain sight (as in learned_optimization's ``simple_lopt_train.py``; :class:`MetaTrainer`)::

    controller = build_controller(config.controller)                     # the policy being meta-trained
    estimator  = create_estimator(config.meta)                           # tbptt | full | es | pes (ESTIMATORS)
    pool       = TaskPool(TaskSampler(suite.meta_train, seed), ...)      # meta-batch: populations of tasks
    outer      = OuterLearner(controller.parameters(), meta_lr, clip)    # Adam on the controller
    for each meta-step (K = truncation schedule):
        estimates = [estimator.many(controller, population, K, seeds, states) for population in pool]
        summed, totals, flags, costs = all_reduce_step(finite slots' grads, StepTotals, done/non-finite, seconds)
        pool.refill(flags); outer.update(summed, totals)                # clip, Adam step

A truncation whose meta-loss or meta-gradient is NaN/inf is skipped and counted, never applied; when more
than ``max_skip_fraction`` of them were skipped the run stops with a clear message. Divergence-guard
events (the controller's guardrail cutting the LR) are counted and logged. Every ``state_every`` meta-steps
each worker writes a resume state (:mod:`metalr.meta.state`); ``meta_train(..., resume=True)`` continues
from the newest one all workers have, bit-identically.

``metrics.jsonl`` records (every ``log_every`` meta-steps): ``meta_loss`` (mean over the interval),
``meta_grad_norm`` (before clipping), ``estimator_variance`` (mean squared deviation of the per-task
meta-gradients from their mean in the last meta-step: the noise of the estimator plus task diversity),
``truncation_length``, ``skipped_truncations`` / ``attempted_truncations``, ``guard_events`` (total so
far), ``mean_lr_ratio`` (controller LR / task base LR), ``refused_tasks``; at checkpoints ``meta_valid``
(mean term on the meta-valid tasks), ``meta_valid_untrained`` (the untrained controller's: the base schedule)
and ``meta_valid_wins`` (the fraction of those tasks on which the checkpoint beats it; ``meta.selection``
picks best.safetensors by one or the other); at probes ``probe_shb_ratio`` (short-horizon-bias diagnostic: controller's mean LR / best constant LR on
probe tasks, geometric mean; well below 1 is the LR collapse of Wu et al., ICLR 2018) and LR traces.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalr.checkpoint import family_of_optimizer_names, git_commit, save_controller
from metalr.config import ConfigError, FamilyEntry, MetaTrainConfig, dump_config, to_plain
from metalr.controller import LRController
from metalr.io import append_jsonl, atomic_write_text, read_jsonl
from metalr.meta.distributed import WorkerContext, all_reduce_min, init_distributed, worker_device
from metalr.meta.estimators import EstimatorError, create_estimator
from metalr.meta.outer import OuterLearner, StepTotals, all_reduce_step
from metalr.meta.pool import MetaTrainingError, PoolCounters, TaskPool, TaskSampler
from metalr.meta.state import (
    TensorTable,
    available_steps,
    get_optimizer,
    get_run,
    put_optimizer,
    put_run,
    read_state,
    state_path,
    write_state,
)
from metalr.meta.truncation import make_truncation_schedule
from metalr.meta.validation import (
    SELECTIONS,
    best_constant_lr,
    build_controller,
    mean_term,
    meta_validate,
    rollout,
    rollout_score,
    validation_objective,
    validation_terms,
    wins,
)
from metalr.tasks import SamplingConfig, TaskSpec, create_task_family, load_suite
from metalr.tasks.registry import sample_specs


def train_entries(config: MetaTrainConfig, entries: tuple[FamilyEntry, ...]) -> tuple[FamilyEntry, ...]:
    """The suite's meta-train families with the recipe's ``train_overrides`` applied to each."""
    if not config.train_overrides:
        return entries
    merged = tuple(FamilyEntry(e.family, {**e.overrides, **config.train_overrides}) for e in entries)
    for entry in merged:
        try:
            create_task_family(entry.family, **entry.overrides)
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"train_overrides: {err.args[0] if err.args else err}") from None
    return merged


def noise_seed(seed: int, meta_step: int, slot: int) -> int:
    """ES/PES noise seed of one (meta-step, slot): independent of worker count and of resumption."""
    return (seed * 1_000_003 + meta_step * 4_099 + slot * 131 + 7) % (2**63 - 1)


@dataclass
class LoopState(PoolCounters):
    """Counters of the outer loop, the task pool's included (JSON in the resume state)."""

    meta_step: int = 0
    attempted: int = 0
    skipped: int = 0
    guard_events: int = 0
    best: list[float] = field(default_factory=list)  # the selection key of best.safetensors (none yet: empty)
    window_sum: float = 0.0
    window_count: int = 0
    window_lr_sum: float = 0.0
    window_lr_count: int = 0


class _Logger:
    """metrics.jsonl (and TensorBoard when asked); only the main worker writes."""

    def __init__(self, run_dir: Path, context: WorkerContext, tensorboard: bool) -> None:
        self.path = run_dir / "metrics.jsonl"
        self.enabled = context.is_main
        self.writer: Any = None
        if tensorboard and self.enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise ConfigError(
                    "meta.tensorboard: true needs the tensorboard package (pip install 'metalr[tensorboard]')"
                ) from err
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def record(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, record)
        if self.writer is not None:
            step = int(record.get("meta_step", 0))
            for key, value in record.items():
                if key != "meta_step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"meta/{key}", value, step)

    def lr_traces(self, meta_step: int, traces: dict[str, list[float]]) -> None:
        if self.writer is None:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3))
        for label, lrs in traces.items():
            axis.plot(lrs, label=label)
        axis.set_yscale("log")
        axis.set_xlabel("inner step")
        axis.set_ylabel("learning rate")
        axis.legend(fontsize=6)
        self.writer.add_figure("probe/lr_trace", figure, meta_step)
        plt.close(figure)

    def truncate_after(self, meta_step: int) -> None:
        """Drop records newer than ``meta_step`` (they will be written again by the resumed run)."""
        if not self.enabled or not self.path.exists():
            return
        import json

        kept = [r for r in read_jsonl(self.path) if int(r.get("meta_step", 0)) <= meta_step]
        atomic_write_text(
            self.path, "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in kept)
        )

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _check_resumed_config(config: MetaTrainConfig, run_dir: Path) -> None:
    """A resumed run must use the recipe it started with (only ``meta.meta_steps`` may grow)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.exists():
        return
    old = yaml.safe_load(path.read_text()) or {}
    new = to_plain(config)
    old.get("meta", {}).pop("meta_steps", None)
    new["meta"].pop("meta_steps", None)

    def differences(a: Any, b: Any, where: str) -> Iterator[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                yield from differences(a.get(key), b.get(key), f"{where}.{key}" if where else key)
        elif a != b:
            yield f"{where}: {a!r} -> {b!r}"

    changed = list(differences(old, new, ""))
    if changed:
        raise ConfigError(
            f"--resume: the config differs from the one {run_dir} was started with ({'; '.join(changed[:3])}); "
            "resume with the same recipe and overrides (only meta.meta_steps may change)"
        )


class MetaTrainer:
    """One meta-training run (built by :func:`meta_train`; kept as a class so tests and tools can step it).

    Its parts, wired below in plain sight: the :class:`~metalr.meta.pool.TaskPool` (the meta-batch's
    tasks), the estimator (:data:`~metalr.meta.estimators.ESTIMATORS`, which owns its per-run state), the
    truncation schedule and the :class:`~metalr.meta.outer.OuterLearner`; :meth:`step` is one meta-step.
    """

    def __init__(
        self, config: MetaTrainConfig, run_dir: Path, progress: bool = True, resume: bool = False
    ) -> None:
        self.config, self.meta, self.run_dir, self.progress = config, config.meta, run_dir, progress
        self.context = init_distributed(config.device)
        self.device = worker_device(config.device, self.context)
        if resume:
            _check_resumed_config(config, run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        if self.context.is_main:
            dump_config(config, run_dir / "config.yaml")
        self.suite = load_suite(config.suite)
        torch.manual_seed(config.seed)
        self.controller = build_controller(config.controller).to(self.device)
        self.outer = OuterLearner(list(self.controller.parameters()), self.meta.meta_lr, self.meta.meta_grad_clip)
        try:
            self.estimator = create_estimator(self.meta)
        except EstimatorError as err:
            raise ConfigError(str(err)) from None
        m = self.meta
        self.schedule = make_truncation_schedule(
            m.truncation, m.unroll_length, min(m.min_unroll_length, m.unroll_length), m.curriculum_steps, config.seed
        )
        self.sampler = TaskSampler(train_entries(config, self.suite.meta_train), config.seed, config.augment)
        # The checkpoints' optimizer_family: the one family trained on (no `optimizers` override = the default mix).
        self.controller.optimizer_family = family_of_optimizer_names(o for e in self.sampler.entries for o in e.overrides.get("optimizers", SamplingConfig().optimizers))  # type: ignore[assignment]
        # Validation families are drawn under the recipe's overrides too (its optimizers, LR ranges,
        # horizons), so checkpoint selection measures the task distribution the recipe trains for.
        valid_entries = train_entries(config, self.suite.meta_valid)
        self.valid_specs = sample_specs(valid_entries, m.valid_per_family, config.seed + 1) if valid_entries else []
        self.probe_specs: list[TaskSpec] = []
        if m.probe_every and m.probe_tasks:
            self.probe_specs = sample_specs(valid_entries or self.sampler.entries, 1, config.seed + 2)[: m.probe_tasks]
        self.probe_best_lrs: list[float] = []
        self.reference_terms: list[float] = []  # the untrained controller's meta-valid terms (at the first checkpoint)
        # The code that trains, taken now: HEAD when a checkpoint is written may be a later commit.
        self.provenance: dict[str, Any] = {
            "recipe": config.name, "suite": self.suite.name, "seed": config.seed, "git_commit": git_commit()
        }
        self.state = LoopState()
        self.logger = _Logger(run_dir, self.context, m.tensorboard)
        self.pool = self._pool()
        self.state_dir = run_dir / "resume"
        if not (resume and self._load_resume_state()):
            self.logger.truncate_after(-1)  # a fresh start: no records of an earlier attempt remain
            self.pool.fill_all()

    def _pool(self) -> TaskPool:
        def record(event: dict[str, Any]) -> None:
            self.logger.record({"meta_step": self.state.meta_step, **event})

        return TaskPool(
            self.sampler, self.meta, self.controller, self.estimator, self.context, self.device, record, self.state
        )

    @property
    def meta_optimizer(self) -> torch.optim.Optimizer:
        return self.outer.optimizer

    # -- one meta-step --------------------------------------------------------------------------------------

    def step(self) -> dict[str, Any]:
        """One meta-step over the meta-batch; returns the per-step statistics."""
        meta, state, pool = self.meta, self.state, self.pool
        length = self.schedule(state.meta_step)
        slot_grads: list[list[torch.Tensor] | None] = [None] * meta.meta_batch
        totals = StepTotals(guard_events=float(state.pending_guard_events))
        flags = [False] * meta.meta_batch
        costs = [0.0] * pool.groups
        state.pending_guard_events = 0
        for group, slots in pool.populations():
            seeds = [noise_seed(self.config.seed, state.meta_step, slot) for slot in slots]
            runs = [pool.runs[slot] for slot in slots]
            started = time.perf_counter()
            try:
                estimates = self.estimator.many(self.controller, runs, length, seeds, [pool.states[s] for s in slots])  # type: ignore[arg-type]
            except EstimatorError as err:
                raise MetaTrainingError(str(err)) from None
            costs[group] = time.perf_counter() - started
            for slot, run, estimate in zip(slots, runs, estimates, strict=True):
                totals = totals._replace(guard_events=totals.guard_events + estimate.alarms)
                if not (math.isfinite(estimate.meta_loss) and all(bool(torch.isfinite(g).all()) for g in estimate.grads)):
                    totals = totals._replace(skipped=totals.skipped + 1)
                    flags[slot] = True
                    continue
                slot_grads[slot] = list(estimate.grads)
                base_lr = run.task.spec.base_lr  # type: ignore[union-attr]
                totals = totals._replace(
                    used=totals.used + 1,
                    grad_sq_sum=totals.grad_sq_sum + sum(float(g.double().square().sum()) for g in estimate.grads),
                    meta_loss_sum=totals.meta_loss_sum + estimate.meta_loss,
                    lr_ratio_sum=totals.lr_ratio_sum + sum(lr / base_lr for lr in estimate.lrs),
                    lr_count=totals.lr_count + len(estimate.lrs),
                )
                pool.runs[slot], pool.states[slot] = estimate.run, estimate.state
                flags[slot] = estimate.run.done
        summed, totals, flags, pool.costs = all_reduce_step(slot_grads, self.outer.params, totals, flags, costs, self.context)
        state.attempted += meta.meta_batch
        state.skipped += int(totals.skipped)
        state.guard_events += int(totals.guard_events)
        # Counted before the refills, so their events (refused tasks) carry this step's number and a resume
        # from an earlier state drops them with the rest of the replayed steps' records.
        state.meta_step += 1
        pool.refill(flags)
        if state.attempted >= 10 and state.skipped / state.attempted > meta.max_skip_fraction:
            raise MetaTrainingError(
                f"{state.skipped} of {state.attempted} truncations had a non-finite meta-loss or meta-gradient "
                f"(more than max_skip_fraction={meta.max_skip_fraction}); lower the base-LR ranges or the meta_lr"
            )
        grad_norm, variance = self.outer.update(summed, totals)
        if totals.used:
            state.window_sum += totals.meta_loss_sum
            state.window_count += int(totals.used)
        state.window_lr_sum += totals.lr_ratio_sum
        state.window_lr_count += int(totals.lr_count)
        return {"meta_grad_norm": grad_norm, "estimator_variance": variance, "truncation_length": length}

    # -- checkpoints, probes, resume ---------------------------------------------------------------------------

    def _probe(self) -> dict[str, Any]:
        """Short-horizon-bias diagnostic and LR traces on the probe tasks (main worker only)."""
        if not self.probe_best_lrs:
            self.probe_best_lrs = [
                best_constant_lr(self.config.controller, s, self.device, validation_objective(self.meta))
                for s in self.probe_specs
            ]
        ratios, traces = [], {}
        for spec, best_lr in zip(self.probe_specs, self.probe_best_lrs, strict=True):
            _, lrs = rollout(self.controller, spec, self.device)  # the LR trace; its score is not used
            ratios.append(sum(lrs) / len(lrs) / best_lr)
            traces[spec.label] = lrs
        self.logger.lr_traces(self.state.meta_step, traces)
        stride = max(1, max(len(t) for t in traces.values()) // 50)
        return {
            "probe_shb_ratio": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
            "probe_lr_traces": {label: lrs[::stride] for label, lrs in traces.items()},
        }

    def _select(self, provenance: dict[str, Any]) -> dict[str, Any]:
        """Score the controller on meta-valid; rewrite best.safetensors when it ranks first so far."""
        objective = validation_objective(self.meta)
        if not self.reference_terms:  # the untrained controller is exactly the base schedule (any init)
            with torch.random.fork_rng(devices=[]):  # drawing its weights leaves the training RNG alone
                untrained = build_controller(self.config.controller).to(self.device)
            self.reference_terms = validation_terms(untrained, self.valid_specs, self.device, objective)
        terms = validation_terms(self.controller, self.valid_specs, self.device, objective)
        scores = {
            "meta_valid": mean_term(terms),
            "meta_valid_wins": wins(terms, self.reference_terms),
            "meta_valid_untrained": mean_term(self.reference_terms),
        }
        key = list(SELECTIONS[self.meta.selection](terms, self.reference_terms))
        if not self.state.best or key < self.state.best:
            self.state.best = key
            save_controller(self.controller, self.run_dir / "best.safetensors", {**provenance, **scores})
        return scores

    def _save_resume_state(self) -> None:
        table = TensorTable()
        for name, tensor in self.controller.state_dict().items():
            table.put(f"controller.{name}", tensor)
        table.put("rng.torch", torch.get_rng_state())
        table.put("rng.sampler", self.sampler.generator.get_state())
        runs = {
            str(slot): put_run(table, f"run.{slot}", run, self.pool.states[slot])
            for slot, run in enumerate(self.pool.runs)
            if run is not None
        }
        record = {
            "loop": self.state.__dict__,
            "optimizer": put_optimizer(table, "meta_optimizer", self.meta_optimizer),
            "runs": runs,
            "probe_best_lrs": self.probe_best_lrs,
            "reference_terms": self.reference_terms,
            "world_size": self.context.world_size,
            "owners": self.pool.owners,
            "costs": self.pool.costs,
        }
        write_state(self.state_dir, self.context.rank, self.state.meta_step, table, record)

    def _load_resume_state(self) -> bool:
        steps = available_steps(self.state_dir, self.context.rank)
        newest = all_reduce_min(steps[-1] if steps else -1, self.context)
        if newest < 0:
            return False
        table, record = read_state(state_path(self.state_dir, self.context.rank, newest))
        if record["world_size"] != self.context.world_size:
            raise ConfigError(
                f"--resume: {self.run_dir} was written by {record['world_size']} worker(s); resume with the same count"
            )
        self.controller.load_state_dict(
            {n: table.get(f"controller.{n}", self.device) for n in self.controller.state_dict()}
        )
        torch.set_rng_state(table.get("rng.torch"))
        self.sampler.generator.set_state(table.get("rng.sampler"))
        get_optimizer(table, "meta_optimizer", record["optimizer"], self.meta_optimizer)
        self.state = LoopState(**record["loop"])
        self.pool.counters = self.state  # the pool counts refusals and staggering guard events into it
        self.probe_best_lrs = list(record["probe_best_lrs"])
        self.reference_terms = list(record.get("reference_terms", []))  # states before meta.selection: none
        if not isinstance(self.state.best, list):  # states before meta.selection kept the best mean alone
            self.state.best = [] if math.isinf(self.state.best) else [self.state.best]
        self.pool.owners, self.pool.costs = list(record["owners"]), list(record["costs"])
        for slot_key, run_record in record["runs"].items():
            slot = int(slot_key)
            self.pool.runs[slot], self.pool.states[slot] = get_run(
                table, f"run.{slot}", run_record, self.controller, self.device, self.estimator
            )
        self.logger.truncate_after(self.state.meta_step)
        return True

    # -- the loop -------------------------------------------------------------------------------------------

    def train(self) -> LRController:
        meta, state = self.meta, self.state
        start = time.perf_counter()
        bar = tqdm(
            total=meta.meta_steps,
            initial=state.meta_step,
            desc="meta-train",
            disable=not (self.progress and self.context.is_main),
            dynamic_ncols=True,
        )
        while state.meta_step < meta.meta_steps:
            stats = self.step()
            step = state.meta_step
            bar.update(1)
            if state.window_count:
                bar.set_postfix(
                    meta_loss=f"{state.window_sum / state.window_count:.4f}", skipped=state.skipped
                )
            record: dict[str, Any] = {}
            if self.context.is_main and meta.checkpoint_every and step % meta.checkpoint_every == 0:
                provenance = {**self.provenance, "meta_steps": step}
                save_controller(self.controller, self.run_dir / f"checkpoint-{step}.safetensors", provenance)
                if self.valid_specs:
                    record |= self._select(provenance)
            if self.context.is_main and self.probe_specs and step % meta.probe_every == 0:
                record |= self._probe()
            if record or step % meta.log_every == 0 or step == meta.meta_steps:
                record |= {
                    "meta_step": step,
                    "meta_loss": state.window_sum / state.window_count if state.window_count else None,
                    **stats,
                    "skipped_truncations": state.skipped,
                    "attempted_truncations": state.attempted,
                    "guard_events": state.guard_events,
                    "refused_tasks": state.refused,
                    "mean_lr_ratio": state.window_lr_sum / state.window_lr_count
                    if state.window_lr_count
                    else None,
                    "seconds": time.perf_counter() - start,
                }
                state.window_sum = state.window_lr_sum = 0.0
                state.window_count = state.window_lr_count = 0
                self.logger.record(record)
            if meta.state_every and (step % meta.state_every == 0 or step == meta.meta_steps):
                self._save_resume_state()
        bar.close()
        if self.context.is_main:
            save_controller(
                self.controller,
                self.run_dir / "final.safetensors",
                {**self.provenance, "meta_steps": meta.meta_steps},
            )
        self.logger.close()
        return self.controller


def meta_train(
    config: MetaTrainConfig, run_dir: str | Path, progress: bool = True, resume: bool = False
) -> LRController:
    """Meta-train a controller as ``config`` says; write everything into ``run_dir``.

    The run directory receives ``config.yaml`` (resolved), ``metrics.jsonl``, periodic
    ``checkpoint-<step>.safetensors``, ``best.safetensors`` (by meta-validation on held-out families of the
    suite, when it lists ``meta_valid``), ``final.safetensors``, ``resume/`` (crash-safe resume states) and
    ``tensorboard/`` when enabled. With ``resume=True`` it continues from the newest resume state in
    ``run_dir`` (a fresh start when there is none) and ends with the controller an uninterrupted run would
    have produced, bit for bit. Under ``torchrun`` every worker calls this; see :mod:`metalr.meta.distributed`.
    """
    trainer = MetaTrainer(config, Path(run_dir), progress, resume)
    return trainer.train()


__all__ = [
    "MetaTrainer",
    "best_constant_lr",
    "MetaTrainingError",
    "TaskSampler",
    "build_controller",
    "meta_train",
    "meta_validate",
    "rollout",
    "rollout_score",
    "sample_specs",
]
