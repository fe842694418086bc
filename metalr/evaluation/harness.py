"""Cells of an evaluation and the ONE training loop every method runs through.

A *cell* is one training run: (held-out task x method entry x seed x initial LR x horizon). The loop in
:func:`run_cell` knows nothing about any particular method: it builds whatever ``create_method`` returns
and drives its ``MethodRun`` (optimizer, scheduler, validation hook, evaluation context). Baselines and the
learned controller are therefore measured by the same code, overheads included.

Which cells exist is the protocol of issue 7 (after AlgoPerf's external-tuning ruleset):

* every method gets one run per seed at the task's default LR (``lr_source="default"``); where that LR is a
  point of the method's grid, the grid run is that run (planned once, indexed under both sources);
* tuned methods (``method.tuned``) run over the LR grid (``"grid"``); with ``sensitivity`` the self-tuning
  methods do too (or those in ``sensitivity_methods``), given the grid LR as base LR, so every method has a
  loss-vs-initial-LR curve;
* the extra horizons (0.5x, 2x) rerun the reported configuration: self-tuning methods at their default,
  tuned methods at the LR tuned at 1x (``"transfer"``, a second phase that depends on results) or over
  the whole grid again (``horizon_retune``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from metalr.checkpoint import load_controller
from metalr.config import EvalConfig, MethodEntry, grid_lr
from metalr.evaluation.records import RunRecord, same_lr
from metalr.methods import MethodContext, create_method
from metalr.tasks import TaskSpec, build_task

LR_SOURCES = ("default", "grid", "transfer")


@dataclass(frozen=True)
class Cell:
    """One training run of the evaluation.

    Attributes:
        spec: the held-out task at its 1x budget (its ``key`` identifies the task across horizons).
        entry: the method entry of the suite (registered name, options, report label).
        tuned: whether the method is tuned over the LR grid (``method.tuned``).
        seed: training seed (data order and any randomness of the method).
        lr: initial (base) learning rate.
        lr_source: ``"default"`` (the task's base LR), ``"grid"`` or ``"transfer"`` (tuned at 1x).
        horizon: step budget relative to the 1x budget.
        steps: the step budget of this run.
        eval_every: steps between ``inner_valid`` evaluations.
        device: ``"cpu"`` or ``"cuda"``.
    """

    spec: TaskSpec
    entry: MethodEntry
    tuned: bool
    seed: int
    lr: float
    lr_source: str
    horizon: float
    steps: int
    eval_every: int
    device: str = "cpu"

    @property
    def key(self) -> str:
        """Identifies the run (and so whether it is finished) independently of where it ran."""
        identity = {
            "task": self.spec.key,
            "method": self.entry.method,
            "options": self.entry.options,
            "label": self.entry.display,
            "seed": self.seed,
            "lr": grid_lr(self.lr),
            "lr_source": self.lr_source,
            "horizon": self.horizon,
            "steps": self.steps,
            "eval_every": self.eval_every,
            "device": self.device,
        }
        return hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def describe(self) -> dict[str, Any]:
        """The cell's identity as :class:`RunRecord` fields."""
        return {
            "key": self.key,
            "task": self.spec.to_dict(),
            "task_key": self.spec.key,
            "task_label": self.spec.label,
            "family": self.spec.family,
            "optimizer": self.spec.optimizer,
            "default_lr": self.spec.base_lr,
            "method": self.entry.display,
            "method_name": self.entry.method,
            "options": self.entry.options,
            "tuned": self.tuned,
            "seed": self.seed,
            "lr": self.lr,
            "lr_source": self.lr_source,
            "horizon": self.horizon,
            "steps": self.steps,
            "eval_every": self.eval_every,
        }


# ----------------------------------------------------------------------------------------------------------
# Planning


def horizon_steps(spec: TaskSpec, horizon: float) -> int:
    """The step budget of ``spec`` scaled by ``horizon`` (at least one step)."""
    return max(1, int(round(spec.steps * horizon)))


def method_tuned(entry: MethodEntry) -> bool:
    return bool(create_method(entry.method, **entry.options).tuned)


def _cell(
    config: EvalConfig,
    spec: TaskSpec,
    entry: MethodEntry,
    tuned: bool,
    seed: int,
    lr: float,
    source: str,
    horizon: float,
) -> Cell:
    return Cell(
        spec,
        entry,
        tuned,
        seed,
        lr,
        source,
        horizon,
        horizon_steps(spec, horizon),
        config.eval_every,
        config.device,
    )


def plan_cells(config: EvalConfig, specs: Sequence[TaskSpec]) -> list[Cell]:
    """Every cell known before any result exists (phase 1), in a deterministic order.

    Default-LR runs come first so a partial evaluation already has a complete (untuned) comparison.
    """
    cells: list[Cell] = []
    tuned = {entry.display: method_tuned(entry) for entry in config.methods}
    seeds = range(config.seeds)
    for horizon in (1.0, *config.horizon_scales):
        for spec in specs:
            for entry in config.methods:
                is_tuned = tuned[entry.display]
                grid_here = config.tune and (horizon == 1.0 or (is_tuned and config.horizon_retune))
                sensitivity = config.sensitivity and (
                    not config.sensitivity_methods or entry.display in config.sensitivity_methods
                )
                runs_grid = grid_here and (is_tuned or (sensitivity and horizon == 1.0))
                # At other horizons a tuned method's reported LR is the one tuned at 1x (phase 2).
                default_here = horizon == 1.0 or not (config.tune and is_tuned)
                grid = config.grid_for(spec.optimizer) if runs_grid else ()
                # A default LR on the grid is the grid run itself (same task, seed, LR and steps): run it once.
                if default_here and not any(same_lr(lr, spec.base_lr) for lr in grid):
                    cells += [
                        _cell(config, spec, entry, is_tuned, s, spec.base_lr, "default", horizon)
                        for s in seeds
                    ]
                if runs_grid:
                    cells += [
                        _cell(config, spec, entry, is_tuned, s, lr, "grid", horizon)
                        for lr in grid
                        for s in seeds
                    ]
    return cells


def count_transfer_cells(config: EvalConfig, specs: Sequence[TaskSpec]) -> int:
    """How many phase-2 cells :func:`plan_transfer_cells` will return (known before results, for the ETA)."""
    if not config.tune or config.horizon_retune:
        return 0
    tuned = sum(method_tuned(entry) for entry in config.methods)
    return tuned * len(specs) * len(config.horizon_scales) * config.seeds


def plan_transfer_cells(
    config: EvalConfig, specs: Sequence[TaskSpec], tuned_lrs: dict[tuple[str, str], float]
) -> list[Cell]:
    """Phase 2: tuned methods at the other horizons, at the LR selected at 1x.

    Args:
        config: the evaluation config.
        specs: the held-out tasks.
        tuned_lrs: ``(task_key, method label) -> LR`` selected on ``inner_valid`` at 1x.
    """
    if not config.tune or config.horizon_retune:
        return []
    cells = []
    for horizon in config.horizon_scales:
        for spec in specs:
            for entry in config.methods:
                lr = tuned_lrs.get((spec.key, entry.display))
                if lr is None or not method_tuned(entry):
                    continue
                cells += [
                    _cell(config, spec, entry, True, s, lr, "transfer", horizon) for s in range(config.seeds)
                ]
    return cells


# ----------------------------------------------------------------------------------------------------------
# The run loop

_CONTROLLERS: dict[str, Any] = {}


def cached_controller(path: str | None) -> Any:
    """The controller at ``path``, loaded once per worker process (``None`` when no controller is given)."""
    if path is None:
        return None
    if path not in _CONTROLLERS:
        _CONTROLLERS[path] = load_controller(path)
    return _CONTROLLERS[path]


def _status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB; NaN where there is no procfs."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


def _reset_peak_memory(device: str) -> bool:
    """Reset the peak counters so they measure this run alone; False where the kernel does not allow it.

    Writing 5 to ``clear_refs`` resets the kernel's peak-RSS counter (VmHWM) to the current RSS.
    """
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _peak_memory(device: str) -> tuple[float, float]:
    """``(peak RSS of this worker process, peak CUDA memory allocated)`` in MB since the last reset."""
    rss_mb = _status_mb("VmHWM")
    if math.isnan(rss_mb):
        import resource

        rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda_mb = (
        torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" and torch.cuda.is_available() else 0.0
    )
    return rss_mb, cuda_mb


def _optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of the tensors in the optimizer's state (moments, averaged iterates, ...), each storage once."""
    storages = {
        value.untyped_storage().data_ptr(): value.untyped_storage().nbytes()
        for state in optimizer.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    }
    return sum(storages.values()) / 2**20


def _short(value: float) -> float:
    # Six significant digits keep results.jsonl small (per-step traces) and lose nothing a plot shows.
    return float(f"{value:.6g}")


def _evaluate(task: Any, run: Any, split: str) -> dict[str, float]:
    task.model.eval()
    with run.evaluating():
        metrics = task.evaluate(task.model, split)
    task.model.train()
    return {name: _short(value) for name, value in metrics.items()}


def run_cell(cell: Cell, controller: Any = None) -> RunRecord:
    """Train one cell with the task's real ``torch.optim`` optimizer and the method's scheduler.

    Args:
        cell: what to run.
        controller: the frozen controller handed to every method's context (only methods that read it use it).

    Returns:
        The run's record: the cell's identity, per-step train loss and LR, periodic validation metrics,
        final ``inner_valid`` (tuning) and ``test`` (reporting) metrics, divergence, time and peak memory.
    """
    started = time.perf_counter()
    torch.manual_seed(cell.seed)
    task = build_task(cell.spec.replace(steps=cell.steps), cell.device)
    method = create_method(cell.entry.method, **cell.entry.options)
    run = method.build(
        task.model.parameters(), MethodContext(task, cell.spec.optimizer, cell.lr, cell.steps, controller)
    )
    # Memory is measured from here: loading the dataset (cached per worker, so only a worker's first run
    # pays it) is not the method's cost; the training loop's activations, gradients and state are.
    peak_is_per_run = _reset_peak_memory(cell.device)
    rss_at_start = _status_mb("VmRSS")
    task.model.train()
    batches = task.batches("train", seed_offset=cell.seed)

    train_loss: list[float] = []
    lr_trace: list[float] = []
    valid: list[dict[str, float]] = []
    train_seconds = 0.0
    eval_seconds = 0.0
    nonfinite_step: int | None = None

    def validate(step: int) -> dict[str, float]:
        nonlocal eval_seconds
        tick = time.perf_counter()
        metrics = _evaluate(task, run, "inner_valid")
        eval_seconds += time.perf_counter() - tick
        # Time-to-target counts training time only (AlgoPerf excludes evaluation), the controller included.
        valid.append({"step": step, "train_seconds": round(train_seconds, 4), **metrics})
        return metrics

    initial = validate(0)
    for step in range(1, cell.steps + 1):
        tick = time.perf_counter()
        batch = next(batches)
        # The LR this step is taken with, as the method reports it: optimizer-replacing methods (Prodigy,
        # D-Adaptation, DoG, ...) scale a nominal param-group LR internally.
        lr_trace.append(_short(float(run.scheduler.get_last_lr()[0])))
        loss = task.loss(task.model, batch)
        value = float(loss.detach())
        if not math.isfinite(value):
            # Nothing after a NaN/inf loss is informative, and no method is asked to step on one: the run
            # stops here, which also keeps a diverged grid point cheap.
            train_seconds += time.perf_counter() - tick
            train_loss.append(value)
            nonfinite_step = step
            break
        loss.backward()
        run.optimizer.step()
        run.scheduler.step(loss.detach())
        run.optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - tick
        train_loss.append(_short(value))
        if step % cell.eval_every == 0 or step == cell.steps:
            run.on_validation(validate(step)["loss"])

    if nonfinite_step is None:
        final_valid = {k: v for k, v in valid[-1].items() if k not in ("step", "train_seconds")}
        final_test = _evaluate(task, run, "test")
    else:
        final_valid = {"loss": math.inf}
        final_test = {"loss": math.inf}
    rss_mb, cuda_mb = _peak_memory(cell.device)
    rss_growth_mb = rss_mb - rss_at_start if peak_is_per_run else math.nan
    return RunRecord(
        **cell.describe(),
        train_loss=train_loss,
        lr_trace=lr_trace,
        valid=valid,
        initial_valid_loss=initial["loss"],
        final_valid=final_valid,
        final_test=final_test,
        steps_done=len(train_loss),
        nonfinite_step=nonfinite_step,
        # Divergence also covers "final loss above initial" (metrics.is_diverged), a protocol setting.
        nonfinite=nonfinite_step is not None or not math.isfinite(final_valid["loss"]),
        seconds=round(time.perf_counter() - started, 4),
        train_seconds=round(train_seconds, 4),
        eval_seconds=round(eval_seconds, 4),
        # The worker's peak RSS (its imports and cached datasets included: the same for every method) ...
        peak_rss_mb=round(rss_mb, 1),
        # ... and what this run added to it at its peak, and the optimizer state it ended with.
        rss_growth_mb=round(rss_growth_mb, 3),
        optimizer_state_mb=round(_optimizer_state_mb(run.optimizer), 4),
        peak_cuda_mb=round(cuda_mb, 1),
        worker=f"{socket.gethostname()}:{os.getpid()}",
    )
