"""The cells of the protocol and the one run loop every method goes through."""

from __future__ import annotations

import ast
import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import metalr.evaluation as evaluation_package
import metalr.methods.base as methods_base
from metalr.checkpoint import load_controller
from metalr.config import ConfigError, EvalConfig, MethodEntry, read_eval_config
from metalr.evaluation.harness import Cell, count_transfer_cells, plan_cells, plan_transfer_cells, run_cell
from metalr.evaluation.suite import held_out_specs
from metalr.methods import MethodContext, MethodRun, create_method, list_methods
from metalr.tasks import TaskSpec, build_task

SPEC = TaskSpec(
    "iris_mlp",
    seed=3,
    optimizer="adam",
    base_lr=3e-3,
    steps=20,
    batch_size=16,
    options={
        "dataset": "iris",
        "width": 16,
        "depth": 1,
        "activation": "relu",
        "init_scale": 1.0,
        "train_fraction": 1.0,
        "label_noise": 0.0,
    },
)


def test_held_out_specs_are_fixed_by_the_suite_and_task_seed(tiny_config: EvalConfig) -> None:
    specs = held_out_specs(tiny_config)
    assert [s.family for s in specs] == ["iris_mlp", "teacher_student"]
    assert all(s.steps == 30 for s in specs)
    assert [s.key for s in held_out_specs(tiny_config)] == [s.key for s in specs]


def test_step_scale_lengthens_the_same_sampled_tasks_before_the_cap(tiny_config: EvalConfig) -> None:
    base = held_out_specs(tiny_config)
    longer = held_out_specs(dataclasses.replace(tiny_config, step_scale=10.0))
    capped = held_out_specs(dataclasses.replace(tiny_config, step_scale=10.0, max_steps=200))
    assert [s.steps for s in longer] == [300, 300] and [s.steps for s in capped] == [200, 200]
    assert [s.replace(steps=30) for s in longer] == base  # the same seeds, LRs and batch sizes
    with pytest.raises(ConfigError, match="step_scale must be > 0"):
        read_eval_config(Path(__file__).parents[2] / "evaluate" / "demo-quick.yaml", ["step_scale=0"])


def test_plan_covers_default_grid_and_horizons(tiny_config: EvalConfig) -> None:
    specs = held_out_specs(tiny_config)
    cells = plan_cells(tiny_config, specs)
    by_source = {source: [c for c in cells if c.lr_source == source] for source in ("default", "grid")}
    # default: 2 tasks x 3 methods x 2 seeds at 1x, + the self-tuning `learned` at 2x.
    assert len(by_source["default"]) == 12 + 4
    # grid: 2 tasks x 3 methods (learned too: sensitivity) x 2 LRs x 2 seeds.
    assert len(by_source["grid"]) == 24
    assert {c.horizon for c in cells if c.entry.method != "learned"} == {1.0}
    assert {c.steps for c in cells if c.horizon == 2.0} == {60}
    assert len({c.key for c in cells}) == len(cells)
    # Phase 2: the two tuned methods at 2x at their tuned LR.
    tuned_lrs = {(s.key, m): 1e-3 for s in specs for m in ("constant", "cosine")}
    transfer = plan_transfer_cells(tiny_config, specs, tuned_lrs)
    assert len(transfer) == count_transfer_cells(tiny_config, specs) == 8
    assert {(c.lr, c.horizon, c.lr_source) for c in transfer} == {(1e-3, 2.0, "transfer")}


def test_a_default_lr_on_the_grid_is_planned_once_as_the_grid_run(tiny_config: EvalConfig) -> None:
    specs = held_out_specs(tiny_config)
    on_grid = {s.optimizer: (s.base_lr, 0.5) for s in specs}
    assert len(on_grid) == 2  # the two tasks draw different optimizers
    config = dataclasses.replace(tiny_config, lr_grid=on_grid, horizon_scales=())
    cells = plan_cells(config, specs)
    # Every method runs the grid (constant, cosine tuned; learned by sensitivity): no separate default run.
    assert {c.lr_source for c in cells} == {"grid"}
    assert len(cells) == len({c.key for c in cells}) == 2 * 3 * 2 * 2
    off_grid = dataclasses.replace(config, lr_grid={s.optimizer: (0.25, 0.5) for s in specs})
    assert len([c for c in plan_cells(off_grid, specs) if c.lr_source == "default"]) == 2 * 3 * 2


def test_sensitivity_methods_limit_the_self_tuning_grid(tiny_config: EvalConfig) -> None:
    specs = held_out_specs(tiny_config)
    entries = (*tiny_config.methods, MethodEntry("prodigy"))
    both = EvalConfig(**{**tiny_config.__dict__, "methods": entries})
    only_learned = EvalConfig(**{**both.__dict__, "sensitivity_methods": ("learned",)})
    grid_methods = {c.entry.display for c in plan_cells(only_learned, specs) if c.lr_source == "grid"}
    assert grid_methods == {"constant", "cosine", "learned"}
    assert "prodigy" in {c.entry.display for c in plan_cells(both, specs) if c.lr_source == "grid"}


def test_tuning_off_runs_defaults_only(tiny_config: EvalConfig) -> None:
    config = EvalConfig(**{**tiny_config.__dict__, "tune": False})
    specs = held_out_specs(config)
    cells = plan_cells(config, specs)
    assert {c.lr_source for c in cells} == {"default"}
    assert len(cells) == 2 * 3 * 2 * 2  # tasks x methods x seeds x horizons
    assert count_transfer_cells(config, specs) == 0


def test_cell_key_ignores_nothing_that_changes_the_run() -> None:
    cell = Cell(SPEC, MethodEntry("cosine"), True, 0, 1e-3, "grid", 1.0, 20, 10)
    changed = [
        Cell(SPEC, MethodEntry("cosine"), True, 1, 1e-3, "grid", 1.0, 20, 10),
        Cell(SPEC, MethodEntry("cosine"), True, 0, 3e-3, "grid", 1.0, 20, 10),
        Cell(SPEC, MethodEntry("cosine", {"eta_min_ratio": 0.1}), True, 0, 1e-3, "grid", 1.0, 20, 10),
        Cell(SPEC, MethodEntry("cosine"), True, 0, 1e-3, "grid", 2.0, 40, 10),
        Cell(SPEC.replace(seed=4), MethodEntry("cosine"), True, 0, 1e-3, "grid", 1.0, 20, 10),
    ]
    assert len({cell.key, *(c.key for c in changed)}) == 1 + len(changed)
    assert Cell(SPEC, MethodEntry("cosine"), True, 0, 1e-3, "grid", 1.0, 20, 10).key == cell.key


@pytest.mark.parametrize("method", list_methods())
def test_every_registered_method_runs_through_the_one_loop(method: str, controller_path: Path) -> None:
    cell = Cell(SPEC, MethodEntry(method), False, 0, SPEC.base_lr, "default", 1.0, 20, 10)
    result = run_cell(cell, load_controller(controller_path))
    assert result.method == method and result.key == cell.key
    assert len(result.train_loss) == len(result.lr_trace) == result.steps_done == 20
    assert [p["step"] for p in result.valid] == [0, 10, 20]
    assert math.isfinite(result.final_test["loss"]) and "accuracy" in result.final_test
    assert result.final_valid["loss"] == result.valid[-1]["loss"]
    assert all(lr > 0 and math.isfinite(lr) for lr in result.lr_trace)
    assert result.peak_rss_mb > 0 and result.train_seconds > 0


def test_learned_auto_deploys_the_shipped_controller_of_the_optimizer_family() -> None:
    """``controller: auto`` is what ``LearnedLR(optimizer, total_steps=T)`` gives a user (adam -> adam-cpu)."""

    def learned(controller: str, spec: TaskSpec = SPEC) -> Any:
        entry = MethodEntry("learned", {"controller": controller})
        return run_cell(Cell(spec, entry, False, 0, 3e-3, "default", 1.0, 20, 10))

    auto, named = learned("auto"), learned("adam-cpu")
    assert auto.lr_trace == named.lr_trace and auto.train_loss == named.train_loss
    sgd = SPEC.replace(optimizer="sgd")
    assert learned("auto", sgd).lr_trace == learned("sgd-cpu", sgd).lr_trace
    with pytest.warns(UserWarning, match="meta-trained for 'sgd'"):
        assert auto.lr_trace != learned("sgd-cpu").lr_trace  # the family decides: not one fixed controller


def test_run_is_deterministic_in_the_seed(controller_path: Path) -> None:
    cell = Cell(SPEC, MethodEntry("cosine"), True, 1, 1e-2, "grid", 1.0, 20, 10)
    first, second = run_cell(cell), run_cell(cell)
    assert first.train_loss == second.train_loss and first.final_test == second.final_test
    other_seed = run_cell(Cell(SPEC, MethodEntry("cosine"), True, 2, 1e-2, "grid", 1.0, 20, 10))
    assert other_seed.train_loss != first.train_loss


def test_a_diverging_run_stops_and_is_recorded_as_non_finite() -> None:
    spec = SPEC.replace(optimizer="sgd")
    cell = Cell(spec, MethodEntry("constant"), True, 0, 1e6, "grid", 1.0, 20, 10)
    result = run_cell(cell)
    assert result.nonfinite and result.nonfinite_step is not None
    assert result.steps_done == result.nonfinite_step <= 20
    assert result.final_test["loss"] == math.inf


def test_no_module_of_the_harness_names_a_method() -> None:
    """Every method goes through the same code: no string literal in the harness is a method name."""
    # "step" is also the name of a record field (the step of a validation point), not a method reference.
    names = set(list_methods()) - {"step"}
    package = Path(evaluation_package.__file__).parent
    for path in package.glob("*.py"):
        literals = {
            node.value
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
        }
        assert not literals & names, f"{path.name} special-cases {sorted(literals & names)}"


@dataclass(frozen=True)
class _MemoryHog:
    """The constant schedule, plus 64 MiB that its scheduler allocates at the first step and holds."""

    name: str = "test-memory-hog"
    description: str = "constant LR holding 64 MiB (test only)"
    source: str = "tests"
    tuned: bool = False
    owns_optimizer: bool = False

    def build(self, params: Any, context: MethodContext) -> MethodRun:
        run = create_method("constant").build(params, context)
        inner, held = run.scheduler, []

        class Holding:
            def step(self, loss: Any = None) -> None:
                if not held:
                    held.append(torch.ones(16 * 2**20))  # 64 MiB, written, so resident
                inner.step(loss)

            def get_last_lr(self) -> Any:
                return inner.get_last_lr()

        run.scheduler = Holding()
        return run


def test_memory_is_measured_per_run_not_per_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(methods_base._METHODS, _MemoryHog.name, _MemoryHog)  # registered for this test only
    hog = run_cell(Cell(SPEC, MethodEntry(_MemoryHog.name), False, 0, SPEC.base_lr, "default", 1.0, 20, 10))
    plain = run_cell(Cell(SPEC, MethodEntry("constant"), False, 0, SPEC.base_lr, "default", 1.0, 20, 10))
    # The worker's peak includes everything the process holds; the per-run growth tells the two apart.
    assert hog.rss_growth_mb >= 60 and plain.rss_growth_mb < 30, (hog.rss_growth_mb, plain.rss_growth_mb)
    assert plain.peak_rss_mb > plain.rss_growth_mb
    sgd = run_cell(Cell(SPEC.replace(optimizer="sgd"), MethodEntry("constant"), False, 0, 0.1, "default", 1.0, 20, 10))
    parameters = sum(p.numel() * 4 for p in build_task(SPEC).model.parameters()) / 2**20
    # Adam keeps two moments per parameter (plus a scalar step each); plain SGD keeps nothing.
    assert plain.optimizer_state_mb == pytest.approx(2 * parameters, rel=0.02) and sgd.optimizer_state_mb == 0
