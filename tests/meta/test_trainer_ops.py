"""Operations of the meta-trainer: LSTM controllers, guard events, memory budget, TensorBoard and probes,
in-process resume."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from metalr.config import ConfigError, MetaTrainConfig, build_config
from metalr.meta.resources import MemoryBudgetError, check_memory_budget, estimate_unroll_bytes
from metalr.meta.trainer import MetaTrainingError, build_controller, meta_train
from metalr.meta.unroll import Objective, start_run, unroll
from metalr.tasks import TaskSpec, build_task


def _config(meta: dict | None = None, **top: object) -> MetaTrainConfig:
    base = {
        "meta_steps": 4,
        "meta_batch": 2,
        "unroll_length": 4,
        "checkpoint_every": 0,
        "log_every": 1,
        "state_every": 0,
    }
    return build_config(MetaTrainConfig, {"name": "ops", "seed": 5, **top, "meta": {**base, **(meta or {})}})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_lstm_controller_meta_trains(tmp_path: Path, estimator: str) -> None:
    config = _config(
        {"estimator": estimator, "es_pairs": 2, "meta_lr": 1e-2}, controller={"kind": "lstm", "hidden": [32]}
    )
    torch.manual_seed(config.seed)  # the trainer's initialisation
    initial = build_controller(config.controller)
    trained = meta_train(config, tmp_path, progress=False)
    assert trained.arch.kind == "lstm" and trained.net.cell.hidden_size == 32
    moved = [
        n
        for (n, a), b in zip(trained.state_dict().items(), initial.state_dict().values(), strict=True)
        if not torch.equal(a, b)
    ]
    assert moved, "meta-training must change the LSTM controller"
    assert all(r["skipped_truncations"] == 0 for r in _records(tmp_path))


def _unstable_suite(tmp_path: Path) -> Path:
    # SGD at base LRs well past the stability edge 2 / lambda_max = 2 of the quadratic: constant LR diverges.
    suite = tmp_path / "unstable.yaml"
    suite.write_text(
        "name: unstable\nmeta_train:\n  - family: noisy_quadratic\n    optimizers: [sgd]\n"
        "    lr_ranges: {sgd: [3.0, 5.0]}\n    steps: [60, 80]\n"
    )
    return suite


def test_guard_events_are_counted_in_metrics(tmp_path: Path) -> None:
    config = _config(
        {"unroll_length": 8, "max_skip_fraction": 1.0},
        suite=str(_unstable_suite(tmp_path)),
        controller={"max_lr": 100.0},  # let the base LR through: the guard, not the clamp, must act
    )
    meta_train(config, tmp_path / "run", progress=False)
    records = _records(tmp_path / "run")
    assert records[-1]["guard_events"] > 0
    assert [r["meta_step"] for r in records] == [1, 2, 3, 4]


def _bytes_saved_for_backward(controller: torch.nn.Module, run: object, length: int) -> int:
    """What a real differentiable unroll of ``length`` steps saves for its backward pass, each storage once.

    The hook keeps every saved storage alive until the count is done, so no address is reused meanwhile.
    """
    kept: dict[int, torch.UntypedStorage] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        kept.setdefault(storage.data_ptr(), storage)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = unroll(controller, run, length, differentiable=True, objective=Objective(every=1))
    result.meta_loss.backward()  # the graph that was measured is the one the meta-gradient uses
    return sum(storage.nbytes() for storage in kept.values())


@pytest.mark.parametrize("length", [5, 20])
@pytest.mark.parametrize(
    ("family", "optimizer", "options"),
    [
        ("digits_mlp", "adam", {"dataset": "digits", "width": 32, "depth": 2, "activation": "relu", "init_scale": 1.0}),
        ("digits_mlp", "sgd", {"dataset": "digits", "width": 16, "depth": 1, "activation": "tanh", "init_scale": 1.0}),
        ("digits_mlp", "momentum", {"dataset": "digits", "width": 64, "depth": 2, "activation": "relu", "init_scale": 1.0}),
    ],
)
def test_the_memory_estimate_bounds_what_a_real_unroll_saves(family: str, optimizer: str, options: dict, length: int) -> None:
    controller = build_controller(_config().controller)
    spec = TaskSpec(family, 1, optimizer, 1e-3, 100, 32, options)
    estimate = estimate_unroll_bytes(controller, start_run(build_task(spec), controller), length, differentiable=True)
    measured = _bytes_saved_for_backward(controller, start_run(build_task(spec), controller), length)
    # Measured 1.8-2.6x on these tasks: an upper bound (a budget refuses early, never late), and not a loose one.
    assert measured <= estimate <= 4 * measured, (measured, estimate)


def test_the_refusal_names_the_estimate_and_the_budget() -> None:
    with pytest.raises(
        MemoryBudgetError, match=r"task: estimated unroll memory 0.0954 MiB exceeds meta.memory_budget_mb=0.01"
    ):
        check_memory_budget(100_000, 0.01, "task")


def test_tasks_over_the_memory_budget_are_refused_before_they_start(tmp_path: Path) -> None:
    config = _config({"memory_budget_mb": 0.001, "max_refused": 3})
    with pytest.raises(
        MetaTrainingError,
        match=r"3 sampled tasks in a row exceed the memory budget .*estimated unroll memory",
    ):
        meta_train(config, tmp_path, progress=False)
    refused = [r for r in _records(tmp_path) if r.get("event") == "refused_task"]
    assert len(refused) == 3 and "MiB exceeds meta.memory_budget_mb" in refused[0]["reason"]


def test_tensorboard_probes_and_short_horizon_bias_ratio(tmp_path: Path) -> None:
    pytest.importorskip("torch.utils.tensorboard")
    config = _config(
        {"meta_steps": 2, "probe_every": 2, "probe_tasks": 1, "tensorboard": True},
        train_overrides={"steps": [30, 40]},
        suite=str(_probe_suite(tmp_path)),
    )
    meta_train(config, tmp_path / "run", progress=False)
    last = _records(tmp_path / "run")[-1]
    assert last["probe_shb_ratio"] > 0 and len(next(iter(last["probe_lr_traces"].values()))) > 1
    assert {
        "meta_loss",
        "estimator_variance",
        "skipped_truncations",
        "guard_events",
        "truncation_length",
    } <= set(last)
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def _probe_suite(tmp_path: Path) -> Path:
    suite = tmp_path / "probe.yaml"
    suite.write_text(
        "name: probe\nmeta_train:\n  - linear_regression\nmeta_valid:\n  - family: logistic_regression\n    steps: [30, 30]\n"
    )
    return suite


def test_resume_continues_bit_identically_and_rewrites_no_duplicate_records(tmp_path: Path) -> None:
    def config(steps: int) -> MetaTrainConfig:
        return _config(
            {
                "estimator": "pes",
                "es_pairs": 2,
                "meta_steps": steps,
                "state_every": 2,
                "truncation": "log_uniform",
                "min_unroll_length": 2,
            },
            controller={"features": ["loss", "grad", "progress", "validation", "uncertainty", "resource"]},
        )

    uninterrupted = meta_train(config(7), tmp_path / "a", progress=False)
    meta_train(config(4), tmp_path / "b", progress=False)
    resumed = meta_train(config(7), tmp_path / "b", progress=False, resume=True)
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    steps = [r["meta_step"] for r in _records(tmp_path / "b")]
    assert steps == list(range(1, 8))
    assert [r["meta_loss"] for r in _records(tmp_path / "a")] == [
        r["meta_loss"] for r in _records(tmp_path / "b")
    ]


def test_a_resumed_pool_counts_into_the_resumed_loop_state(tmp_path: Path) -> None:
    """The task pool's refusal and guard-event counters are the loop state's, also after a resume
    replaced that state with the saved one (they would otherwise go to a discarded object)."""
    from metalr.meta.trainer import MetaTrainer

    config = _config({"meta_steps": 2, "state_every": 1})
    meta_train(config, tmp_path, progress=False)
    trainer = MetaTrainer(replace(config, meta=replace(config.meta, meta_steps=3)), tmp_path, progress=False, resume=True)
    assert trainer.state.meta_step == 2
    trainer.pool.counters.refused += 1
    assert trainer.state.refused == 1


def test_resume_refuses_a_changed_recipe(tmp_path: Path) -> None:
    meta_train(_config({"meta_steps": 1, "state_every": 1}), tmp_path, progress=False)
    with pytest.raises(ConfigError, match=r"--resume: the config differs .*unroll_length: 4 -> 6"):
        meta_train(
            _config({"meta_steps": 2, "state_every": 1, "unroll_length": 6}),
            tmp_path,
            progress=False,
            resume=True,
        )


def test_full_estimator_with_too_long_horizons_stops_with_a_clear_message(tmp_path: Path) -> None:
    config = _config({"estimator": "full", "max_full_horizon": 50}, train_overrides={"steps": [100, 200]})
    with pytest.raises(MetaTrainingError, match="meta.max_full_horizon=50"):
        meta_train(config, tmp_path, progress=False)


def test_validation_and_probe_tasks_follow_the_recipe_overrides(tmp_path: Path) -> None:
    # A recipe for one optimizer family must select its checkpoints on that family, not on the suite's.
    from metalr.meta.trainer import MetaTrainer

    overrides = {"optimizers": ["adam"], "lr_ranges": {"adam": [1e-3, 2e-3]}, "steps": [20, 30]}
    config = _config({"probe_every": 1, "probe_tasks": 2}, train_overrides=overrides)
    trainer = MetaTrainer(config, tmp_path / "run", progress=False)
    specs = trainer.valid_specs + trainer.probe_specs
    assert {s.family for s in trainer.valid_specs} == {"logistic_regression"}  # the embedded meta_valid
    assert specs and all(s.optimizer == "adam" and 1e-3 <= s.base_lr <= 2e-3 and 20 <= s.steps <= 30 for s in specs)


def test_valid_per_family_sets_the_selection_sample_and_keeps_its_first_tasks(tmp_path: Path) -> None:
    from metalr.meta.trainer import MetaTrainer

    small = MetaTrainer(_config({"valid_per_family": 2}), tmp_path / "small", progress=False).valid_specs
    large = MetaTrainer(_config({"valid_per_family": 3}), tmp_path / "large", progress=False).valid_specs
    families = {s.family for s in small}
    assert len(small) == 2 * len(families) and len(large) == 3 * len(families)
    for family in families:  # the larger sample extends the smaller one, family by family
        assert [s for s in large if s.family == family][:2] == [s for s in small if s.family == family]
    with pytest.raises(ValueError, match="valid_per_family=0"):
        _config({"valid_per_family": 0})


def _population_config(vectorize: bool) -> MetaTrainConfig:
    return _config(
        {"estimator": "pes", "es_pairs": 2, "population": 2, "meta_batch": 4, "vectorize": vectorize, "meta_steps": 3},
        train_overrides={"steps": [10, 14]},  # populations finish and are drawn anew within the run
    )


def test_populations_share_an_architecture_and_train_like_separate_slots(tmp_path: Path) -> None:
    from metalr.meta.trainer import MetaTrainer
    from metalr.meta.unroll import population_key

    trainer = MetaTrainer(_population_config(True), tmp_path / "v", progress=False)
    runs = trainer.pool.runs
    assert [population_key(r) for r in runs[:2]] == [population_key(runs[0])] * 2  # type: ignore[arg-type]
    first, second = (r.task.spec for r in runs[:2])  # type: ignore[union-attr]
    assert first.seed != second.seed and first.base_lr != second.base_lr
    vectorised = trainer.train()
    sequential = meta_train(_population_config(False), tmp_path / "s", progress=False)
    for a, b in zip(vectorised.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert all(r["skipped_truncations"] == 0 for r in _records(tmp_path / "v"))


def test_a_non_finite_member_is_replaced_at_its_populations_step(tmp_path: Path) -> None:
    from metalr.meta.trainer import MetaTrainer

    trainer = MetaTrainer(_population_config(True), tmp_path, progress=False)
    trainer.step()
    pool = trainer.pool
    kept, replaced = pool.runs[0], pool.runs[1]
    pool.refill([False, True, False, False])
    assert pool.runs[0] is kept and pool.runs[1] is not replaced
    assert pool.runs[1].step == kept.step and pool.runs[1].task.spec.seed != replaced.task.spec.seed  # type: ignore[union-attr]
    assert pool.states[1] == ()
    trainer.step()  # the population still vmaps as one


def test_meta_batch_must_split_into_populations() -> None:
    with pytest.raises(ConfigError, match="multiple of population=3"):
        build_config(MetaTrainConfig, {"name": "x", "meta": {"meta_batch": 4, "population": 3}})


def test_a_new_population_goes_to_the_worker_whose_other_populations_cost_least() -> None:
    from metalr.meta.pool import least_loaded

    owners: list[int] = [-1] * 4
    for group in range(4):  # nothing measured yet: one population per worker in turn
        owners[group] = least_loaded(owners, [0.0] * 4, 2, group)
    assert owners == [0, 1, 0, 1]
    # worker 0's remaining population is the costly one, so population 2's replacement goes to worker 1,
    # and its own old assignment (population 2 itself) does not count
    assert least_loaded([0, 1, 0, 1], [5.0, 1.0, 9.0, 1.0], 2, group=2) == 1
    assert least_loaded([0, 1, 0, 1], [1.0, 5.0, 9.0, 1.0], 2, group=2) == 0
    assert least_loaded([0, 0, 0], [1.0, 1.0, 1.0], 3, group=0) in (1, 2)  # idle workers first
    assert least_loaded([0, 0, 0], [1.0, 1.0, 1.0], 3, group=0) == 1  # then the lowest rank


def test_wins_counts_tasks_beaten_and_ranks_before_the_mean() -> None:
    from metalr.meta.validation import SELECTIONS, wins

    reference = [0.0, 0.0, -1.0]
    many_small = [-0.1, -0.1, 0.5]  # beats 2 of 3 tasks, mean +0.1: one bad task decides the mean
    one_large = [-3.0, 0.1, -0.9]  # beats 1 of 3, mean -1.27
    assert wins(many_small, reference) == pytest.approx(2 / 3) and wins(one_large, reference) == pytest.approx(1 / 3)
    assert wins(reference, reference) == 0  # a tie is not a win: the untrained controller beats nothing
    assert SELECTIONS["wins"](many_small, reference) < SELECTIONS["wins"](one_large, reference)
    assert SELECTIONS["mean"](one_large, reference) < SELECTIONS["mean"](many_small, reference)


@pytest.mark.parametrize("selection", ["mean", "wins"])
def test_best_checkpoint_is_the_one_its_selection_ranks_first(tmp_path: Path, selection: str) -> None:
    from metalr import load_controller
    from metalr.meta.trainer import MetaTrainer
    from metalr.meta.validation import meta_validate, validation_objective

    config = _config({"meta_steps": 6, "checkpoint_every": 2, "meta_lr": 3e-2, "selection": selection})
    meta_train(config, tmp_path, progress=False)
    checkpoints = [r for r in _records(tmp_path) if "meta_valid" in r]
    assert [r["meta_step"] for r in checkpoints] == [2, 4, 6]
    # the untrained reference is scored once and is what a fresh controller (the base schedule) scores
    specs = MetaTrainer(config, tmp_path / "again", progress=False).valid_specs
    untrained = meta_validate(build_controller(config.controller), specs, objective=validation_objective(config.meta))
    assert [r["meta_valid_untrained"] for r in checkpoints] == [pytest.approx(untrained)] * 3
    assert all(0 <= r["meta_valid_wins"] <= 1 for r in checkpoints)
    rank = {"mean": lambda r: (r["meta_valid"],), "wins": lambda r: (-r["meta_valid_wins"], r["meta_valid"])}
    first = min(checkpoints, key=rank[selection])  # min keeps the earliest of equal keys, as the trainer does
    best = load_controller(tmp_path / "best.safetensors")
    assert best.provenance["meta_steps"] == first["meta_step"]
    assert best.provenance["meta_valid_wins"] == first["meta_valid_wins"]
    chosen = load_controller(tmp_path / f"checkpoint-{first['meta_step']}.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(best.state_dict().values(), chosen.state_dict().values(), strict=True))


def test_an_unknown_selection_is_a_recipe_error() -> None:
    from metalr.meta.recipe import load_recipe

    with pytest.raises(ConfigError, match="unknown selection 'median'; expected one of \\['mean', 'wins'\\]"):
        load_recipe("meta_train/demo-quick.yaml", ["meta.selection=median"])
