"""The outer loop: sample tasks, estimate meta-gradients over truncations, update the controller.

Wired in plain sight (as in learned_optimization's ``simple_lopt_train.py``)::

    sampler   = TaskSampler(suite.meta_train, seed)             # family -> TaskSpec -> Task
    runs      = [start_run(sampler.next(), controller) ...]      # meta-batch, staggered offsets
    estimator = create_estimator(config.meta)                    # tbptt | ... (see ESTIMATORS)
    for each meta-step:  grads = mean(estimator(controller, run, K).grads for run in runs)
                         clip, skip if non-finite, Adam step on the controller

A truncation whose meta-loss or meta-gradient is NaN/inf is skipped and counted, never applied; when more
than ``max_skip_fraction`` of them were skipped the run stops with a clear message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from metalr.checkpoint import save_controller
from metalr.config import ControllerConfig, FamilyEntry, MetaTrainConfig, dump_config, load_suite
from metalr.controller import ArchConfig, LRController, PolicyConfig
from metalr.features import FeatureSpec
from metalr.io import append_jsonl
from metalr.meta.estimators import create_estimator
from metalr.meta.unroll import InnerRun, start_run, unroll
from metalr.tasks import TaskSpec, build_task, create_task_family
from metalr.tasks.registry import sample_specs


class MetaTrainingError(RuntimeError):
    """Meta-training cannot continue (too many non-finite truncations, ...)."""


def build_controller(config: ControllerConfig) -> LRController:
    """A fresh controller as a recipe describes it."""
    spec = FeatureSpec(groups=tuple(config.features), guard_ratio=config.guard_ratio)
    policy = PolicyConfig(
        min_lr=config.min_lr,
        max_lr=config.max_lr,
        min_factor=config.min_factor,
        max_factor=config.max_factor,
        max_log_step=config.max_log_step,
        base_schedule=config.base_schedule,
        guard_cut=config.guard_cut,
    )
    return LRController(spec, policy, ArchConfig(kind=config.kind, hidden=tuple(config.hidden)))


@dataclass
class TaskSampler:
    """Draws specs from a list of families (uniformly over families) with its own generator."""

    entries: tuple[FamilyEntry, ...]
    seed: int
    generator: torch.Generator = field(init=False)

    def __post_init__(self) -> None:
        if not self.entries:
            raise ValueError("the task suite lists no families to sample from")
        self.families = [create_task_family(e.family, **e.overrides) for e in self.entries]
        self.generator = torch.Generator().manual_seed(self.seed)

    def next_spec(self) -> TaskSpec:
        index = int(torch.randint(len(self.families), (), generator=self.generator))
        return self.families[index].sample(self.generator)


def rollout_score(controller: LRController, spec: TaskSpec, device: str = "cpu", every: int = 10) -> float:
    """Meta-objective of a whole training run under a frozen controller (no meta-gradient)."""
    run = start_run(build_task(spec, device), controller)
    result = unroll(controller, run, spec.steps, differentiable=False, objective_every=every)
    value = float(result.meta_loss)
    return value if math.isfinite(value) else 10.0


def meta_validate(controller: LRController, specs: list[TaskSpec], device: str = "cpu") -> float:
    """Mean full-horizon meta-objective over validation tasks (lower is better)."""
    return sum(rollout_score(controller, s, device) for s in specs) / max(1, len(specs))


def _new_run(sampler: TaskSampler, controller: LRController, config: MetaTrainConfig, offset: bool) -> InnerRun:
    spec = sampler.next_spec()
    run = start_run(build_task(spec, config.device), controller, config.meta.valid_batch_size)
    if offset:
        # Stagger the meta-batch: start at a random point of the horizon so tasks are not in lockstep.
        skip = int(torch.randint(spec.steps, (), generator=sampler.generator))
        run = unroll(controller, run, skip, differentiable=False, objective_every=max(1, skip)).run
    return run


def meta_train(config: MetaTrainConfig, run_dir: str | Path, progress: bool = True) -> LRController:
    """Meta-train a controller as ``config`` says; write everything into ``run_dir``.

    The run directory receives ``config.yaml`` (resolved), ``metrics.jsonl``, periodic
    ``checkpoint-<step>.safetensors``, ``best.safetensors`` (by meta-validation on held-out families of the
    suite, when it lists ``meta_valid``) and ``final.safetensors``.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, run_dir / "config.yaml")
    suite = load_suite(config.suite)
    meta = config.meta
    torch.manual_seed(config.seed)
    controller = build_controller(config.controller)
    meta_optimizer = torch.optim.Adam(controller.parameters(), lr=meta.meta_lr)
    estimator = create_estimator(meta)
    sampler = TaskSampler(suite.meta_train, config.seed)
    valid_specs = sample_specs(suite.meta_valid, 2, config.seed + 1) if suite.meta_valid else []
    provenance: dict[str, Any] = {"recipe": config.name, "suite": suite.name, "seed": config.seed}

    runs = [_new_run(sampler, controller, config, offset=True) for _ in range(meta.meta_batch)]
    metrics_path = run_dir / "metrics.jsonl"
    attempted = skipped = 0
    best = math.inf
    window: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(meta.meta_steps), desc="meta-train", disable=not progress, dynamic_ncols=True)
    for meta_step in bar:
        summed = [torch.zeros_like(p) for p in controller.parameters()]
        used = 0
        lr_ratios: list[float] = []
        for i, run in enumerate(runs):
            attempted += 1
            estimate = estimator(controller, run, meta.unroll_length)
            finite = math.isfinite(estimate.meta_loss) and all(bool(torch.isfinite(g).all()) for g in estimate.grads)
            if not finite:
                skipped += 1
                runs[i] = _new_run(sampler, controller, config, offset=False)
                continue
            used += 1
            window.append(estimate.meta_loss)
            torch._foreach_add_(summed, list(estimate.grads))
            lr_ratios += [lr / run.task.spec.base_lr for lr in estimate.lrs]
            runs[i] = _new_run(sampler, controller, config, offset=False) if estimate.run.done else estimate.run
        if attempted >= 10 and skipped / attempted > meta.max_skip_fraction:
            raise MetaTrainingError(
                f"{skipped} of {attempted} truncations had a non-finite meta-loss or meta-gradient "
                f"(more than max_skip_fraction={meta.max_skip_fraction}); lower the base-LR ranges or the meta_lr"
            )
        grad_norm = 0.0
        if used:
            for p, g in zip(controller.parameters(), summed, strict=True):
                p.grad = g / used
            grad_norm = float(torch.nn.utils.clip_grad_norm_(controller.parameters(), meta.meta_grad_clip))
            meta_optimizer.step()
            meta_optimizer.zero_grad(set_to_none=True)
        step = meta_step + 1
        if window:
            bar.set_postfix(meta_loss=f"{sum(window[-20:]) / len(window[-20:]):.4f}", skipped=skipped)
        record: dict[str, Any] = {}
        if meta.checkpoint_every and step % meta.checkpoint_every == 0:
            save_controller(controller, run_dir / f"checkpoint-{step}.safetensors", {**provenance, "meta_steps": step})
            if valid_specs:
                score = meta_validate(controller, valid_specs, config.device)
                record["meta_valid"] = score
                if score < best:
                    best = score
                    save_controller(
                        controller, run_dir / "best.safetensors", {**provenance, "meta_steps": step, "meta_valid": score}
                    )
        if record or step % meta.log_every == 0 or step == meta.meta_steps:
            record |= {
                "meta_step": step,
                "meta_loss": sum(window) / len(window) if window else None,
                "meta_grad_norm": grad_norm,
                "skipped_truncations": skipped,
                "attempted_truncations": attempted,
                "mean_lr_ratio": sum(lr_ratios) / len(lr_ratios) if lr_ratios else None,
                "seconds": time.perf_counter() - start,
            }
            window = []
            append_jsonl(metrics_path, record)
    save_controller(controller, run_dir / "final.safetensors", {**provenance, "meta_steps": meta.meta_steps})
    return controller
