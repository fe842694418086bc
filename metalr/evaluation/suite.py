"""``evaluate_suite``: sample the held-out tasks, plan the cells, run the missing ones, write the report.

Wired in plain sight::

    specs   = held_out_specs(config)                      # fixed by (suite, split, task_seed) before any result
    prepare_tasks(specs, device)                          # datasets read and cached once, one line per task
    preflight(config, specs, controller)                  # every method builds, or one clear error
    cells   = plan_cells(config, specs)                   # phase 1: default LRs, LR grids, horizons
    run the cells not yet in results.jsonl                # executor: process pool or Ray
    cells   = plan_transfer_cells(config, specs, tuned)   # phase 2: tuned LRs at the other horizons
    run them; render_report(out_dir, planned)              # the report covers this plan's cells only

Only this (parent) process appends to ``results.jsonl``, one whole line per finished run, so a killed
evaluation loses at most the runs in flight, and re-running the same command skips every finished cell.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from metalr.checkpoint import load_controller, resolve_checkpoint
from metalr.config import ConfigError, EvalConfig, dump_config, read_eval_config
from metalr.evaluation.executors import Executor, available_cpus, create_executor
from metalr.evaluation.harness import Cell, count_transfer_cells, plan_cells, plan_transfer_cells
from metalr.evaluation.metrics import select_lr
from metalr.evaluation.records import ReportProtocol, RunRecord
from metalr.evaluation.report import RESULTS, load_records, render_report
from metalr.io import append_jsonl
from metalr.methods import MethodContext, create_method
from metalr.tasks import TaskSpec, build_task, load_suite
from metalr.tasks.registry import sample_specs


def check_eval_config(config: EvalConfig, where: str = "evaluation suite") -> None:
    """Raise :class:`ConfigError` when a method or the task suite ``config`` names cannot be built: each
    name is checked by its registry (methods, task families), before any task is sampled."""
    for entry in config.methods:
        try:
            create_method(entry.method, **entry.options)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"{where}: {err.args[0]}") from None
    load_suite(config.suite)


def load_eval_suite(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """An evaluation suite (``evaluate/*.yaml`` plus ``key=value`` overrides), every name in it checked.

    Example:
        >>> config = load_eval_suite("evaluate/demo-quick.yaml", ["seeds=1"])
    """
    config = read_eval_config(path, overrides)
    check_eval_config(config, str(path))
    return config


def held_out_specs(config: EvalConfig) -> list[TaskSpec]:
    """The tasks to evaluate: ``tasks_per_family`` per family of the suite's ``split``, seeded by ``task_seed``."""
    suite = load_suite(config.suite)
    entries = list(getattr(suite, config.split))
    if config.families:
        available = [e.family for e in entries]
        unknown = sorted(set(config.families) - set(available))
        if unknown:
            raise ConfigError(
                f"families {unknown} are not in the {config.split} list of suite {suite.name!r}: {available}"
            )
        entries = [e for e in entries if e.family in config.families]
    if not entries:
        raise ConfigError(f"suite {suite.name!r} lists no {config.split} families to evaluate")
    specs = sample_specs(entries, config.tasks_per_family, config.task_seed)
    if config.step_scale != 1.0:  # the same sampled tasks (seeds, LRs, batch sizes), trained for longer
        specs = [s.replace(steps=max(1, round(s.steps * config.step_scale))) for s in specs]
    if config.max_steps:
        specs = [s.replace(steps=min(s.steps, config.max_steps)) for s in specs]
    return specs


def quiet_libraries() -> None:
    """Silence the progress bars and info logs of ``datasets`` and ``transformers``, here and in the workers.

    The harness shows its own progress; their bars (``Generating train split``, ``Saving the dataset``)
    would interleave with it on stderr. An explicit setting of the environment variables is kept.
    """
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # read when `datasets` is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "datasets" in sys.modules:  # already imported: the variable above came too late for this process
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """Discard what native code writes to file descriptor 1 (the ``tokenizers`` trainer prints blank lines).

    Python's own ``sys.stdout`` is flushed first and nothing of ours is printed meanwhile, so stdout keeps
    only the report.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def prepare_tasks(specs: Sequence[TaskSpec], device: str, progress: bool = True) -> None:
    """Build every task once before any run, saying which (stderr): datasets are read, converted and cached
    and tokenizers trained here, visibly, instead of silently before the progress bar or in every worker."""
    quiet_libraries()
    with _native_stdout_silenced():
        for i, spec in enumerate(specs, 1):
            if progress:
                print(f"preparing task {i}/{len(specs)}: {spec.label}", file=sys.stderr, flush=True)
            build_task(spec, device)


def warn_if_oversubscribed(workers: int, local: bool) -> None:
    """Say so when more local workers than CPUs were asked for: runs share cores and their timings inflate."""
    cpus = available_cpus()
    if local and workers > cpus:
        print(
            f"metalr: warning: {workers} workers on the {cpus} CPUs this process may use: runs share cores, so "
            "each is slower and its seconds (time-to-target, resources) are not comparable to a run on its own core",
            file=sys.stderr,
        )


def preflight(config: EvalConfig, specs: Sequence[TaskSpec], controller: Any) -> None:
    """Build every method once on the first task, so a missing controller or a bad option is one clear
    error before any run starts (no method is special-cased: each says itself what it lacks)."""
    spec = specs[0]
    for entry in config.methods:
        task = build_task(spec, config.device)
        context = MethodContext(task, spec.optimizer, spec.base_lr, spec.steps, controller)
        try:
            create_method(entry.method, **entry.options).build(task.model.parameters(), context)
        except (KeyError, ValueError) as err:
            message = err.args[0] if err.args else str(err)
            raise ConfigError(f"method {entry.display!r} cannot run: {message}") from None


def _repair_torn_tail(path: Path) -> None:
    """Cut a torn last line (a crash mid-append) so the next append starts on a fresh line."""
    if not path.is_file():
        return
    with open(path, "rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            handle.truncate(data.rfind(b"\n") + 1)


def _run(
    executor: Executor, cells: Sequence[Cell], results: Path, protocol: ReportProtocol, bar: tqdm[Any]
) -> None:
    for record in executor.run(cells):
        append_jsonl(results, record.with_protocol(protocol).to_json())
        bar.update(1)


def evaluate_suite(
    config: EvalConfig,
    controller: str | None = None,
    out_dir: Path | str = Path("runs/evaluate"),
    workers: int = 0,
    backend: str = "process",
    address: str | None = None,
    progress: bool = True,
) -> str:
    """Run every cell of ``config`` that ``out_dir/results.jsonl`` does not hold yet, then write the report.

    Args:
        config: the evaluation suite.
        controller: checkpoint path or shipped name handed to every method's context (the ``learned`` method).
        out_dir: run directory (``results.jsonl``, ``config.yaml``, ``report.md``, ``report.html``, figures).
        workers: parallel runs (0 = all CPUs this process may use; more than that is allowed, with a warning).
        backend: ``"process"`` (local pool) or ``"ray"``.
        address: Ray cluster address (``None``: a local Ray instance).
        progress: show progress (a line per task being prepared, then a bar of runs done / total with ETA).

    Returns:
        The summary tables as Markdown.

    Raises:
        ConfigError: unknown families, a method that cannot be built (e.g. ``learned`` without a controller).
        CheckpointError: the controller cannot be loaded.
    """
    out_dir = Path(out_dir)
    workers = workers or available_cpus()
    specs = held_out_specs(config)
    controller_path = str(resolve_checkpoint(controller)) if controller is not None else None
    loaded = load_controller(controller_path) if controller_path else None
    prepare_tasks(specs, config.device, progress)
    preflight(config, specs, loaded)
    warn_if_oversubscribed(workers, local=address is None)

    out_dir.mkdir(parents=True, exist_ok=True)
    dump_config(config, out_dir / "config.yaml")
    results = out_dir / RESULTS
    _repair_torn_tail(results)
    protocol = ReportProtocol.of(config)

    phase1 = plan_cells(config, specs)
    done = {record.key for record in load_records(results)}
    todo = [cell for cell in phase1 if cell.key not in done]
    total = len(phase1) + count_transfer_cells(config, specs)
    finished_before = len(phase1) - len(todo)
    executor: Executor | None = None
    with tqdm(
        total=total,
        initial=finished_before,
        unit="run",
        desc=f"evaluate {config.name}",
        disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        try:
            executor = create_executor(backend, workers, controller_path, address)
            _run(executor, todo, results, protocol, bar)

            records = load_records(results)
            phase2 = _transfer_cells(config, specs, phase1, records)
            done = {record.key for record in records}
            todo2 = [cell for cell in phase2 if cell.key not in done]
            bar.update(len(phase2) - len(todo2))
            _run(executor, todo2, results, protocol, bar)
        finally:
            if executor is not None:
                executor.close()
    return render_report(out_dir, {cell.key for cell in (*phase1, *phase2)})


def _transfer_cells(
    config: EvalConfig, specs: Sequence[TaskSpec], phase1: Sequence[Cell], records: Sequence[RunRecord]
) -> list[Cell]:
    """Phase 2 of the plan: each tuned method's LR, selected on its phase-1 grid runs, at the other horizons."""
    planned = {cell.key for cell in phase1}
    grid = [r for r in records if r.key in planned and r.lr_source == "grid"]
    tuned_lrs = {}
    for spec in specs:
        for entry in config.methods:
            lr = select_lr(r for r in grid if r.task_key == spec.key and r.method == entry.display)
            if lr is not None:
                tuned_lrs[spec.key, entry.display] = lr
    return plan_transfer_cells(config, specs, tuned_lrs)


def report_directory(out_dir: Path | str) -> str:
    """Re-render an evaluation directory's report, limited to the plan of its ``config.yaml`` when it has one.

    Records that are in ``results.jsonl`` but outside that plan (e.g. copied from another evaluation) stay
    in the file, and the report says how many it left out. A directory without ``config.yaml`` reports
    every record.

    Raises:
        ConfigError: ``config.yaml`` names a task suite or method this metalr cannot build.
        FileNotFoundError: no finished run of the plan.
    """
    out_dir = Path(out_dir)
    if not (out_dir / "config.yaml").is_file():
        return render_report(out_dir)
    config = load_eval_suite(out_dir / "config.yaml")
    specs = held_out_specs(config)
    phase1 = plan_cells(config, specs)
    phase2 = _transfer_cells(config, specs, phase1, load_records(out_dir / RESULTS))
    return render_report(out_dir, {cell.key for cell in (*phase1, *phase2)})


__all__ = [
    "check_eval_config",
    "evaluate_suite",
    "held_out_specs",
    "load_eval_suite",
    "preflight",
    "prepare_tasks",
    "quiet_libraries",
    "report_directory",
]
