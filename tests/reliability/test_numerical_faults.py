"""Issue 10, point 2: NaN/inf in inner training never reaches the controller's weights.

Faults are injected by the test-only family of ``faulty_tasks.py`` (a poisoned training example giving a
NaN or inf loss, a finite loss with a NaN gradient, or an LR far past the stability edge). A meta-step
whose only truncation is non-finite must leave the controller and its meta-optimizer exactly as they were
(bit for bit: the same as a run that skipped the truncation), be counted in ``metrics.jsonl``
(``skipped_truncations``), and when more than ``meta.max_skip_fraction`` of the truncations were skipped
the run stops with :class:`MetaTrainingError` - one line and exit code 2 from the CLI.

The deployment half of point 2 (``LearnedLR`` never emits a NaN, zero, negative or out-of-bounds LR) is
the integrations engineer's hypothesis property test in ``tests/test_scheduler.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from faulty_tasks import FAMILY
from reliability_support import assert_one_line_user_error, run_metalr, tiny_suite, write_yaml

from metalr import load_controller
from metalr.config import MetaTrainConfig, build_config
from metalr.meta.trainer import MetaTrainer, MetaTrainingError


def _config(suite: Path, **meta: Any) -> MetaTrainConfig:
    settings = {
        "meta_steps": 24,
        "meta_batch": 1,
        "unroll_length": 3,
        "checkpoint_every": 0,
        "state_every": 0,
        "log_every": 1,
        "valid_batch_size": 8,
        "max_skip_fraction": 1.0,
        **meta,
    }
    return build_config(MetaTrainConfig, {"name": "faults", "suite": str(suite), "seed": 5, "meta": settings})


def _poisoned_suite(directory: Path, poison: str, probability: float) -> Path:
    entry = {"family": FAMILY, "poison": poison, "poison_probability": probability}
    return tiny_suite(directory, name=f"poisoned-{poison}", meta_train=[entry])


def _optimizer_state(trainer: MetaTrainer) -> list[torch.Tensor]:
    state = trainer.meta_optimizer.state_dict()["state"]
    return [t.clone() for values in state.values() for t in values.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("poison", ["nan_loss", "inf_loss", "nan_grad", "lr_spike"])
def test_non_finite_truncations_are_skipped_counted_and_never_applied(poison: str, tmp_path: Path) -> None:
    trainer = MetaTrainer(_config(_poisoned_suite(tmp_path, poison, 0.5)), tmp_path / "run", progress=False)
    step = trainer.step
    outcomes = {"skipped": 0, "applied": 0}

    def checked_step() -> dict[str, Any]:
        weights = copy.deepcopy(trainer.controller.state_dict())
        optimizer = _optimizer_state(trainer)
        skipped = trainer.state.skipped
        stats = step()
        after = trainer.controller.state_dict()
        for name, tensor in after.items():
            assert torch.isfinite(tensor).all(), f"non-finite controller weight {name} after meta-step {trainer.state.meta_step}"
        if trainer.state.skipped > skipped:  # meta_batch 1: the step's only truncation was non-finite
            outcomes["skipped"] += 1
            for name, tensor in after.items():
                assert torch.equal(tensor, weights[name]), f"a skipped truncation changed {name}"
            new_optimizer = _optimizer_state(trainer)
            assert len(new_optimizer) == len(optimizer)
            assert all(torch.equal(a, b) for a, b in zip(optimizer, new_optimizer, strict=True)), "Adam state moved"
        else:
            outcomes["applied"] += 1
        return stats

    trainer.step = checked_step  # type: ignore[method-assign]
    controller = trainer.train()
    assert outcomes["skipped"] >= 1, f"the {poison} fault was never hit; the test does not test anything"
    assert outcomes["applied"] >= 1, "no clean truncation was applied; the test does not test anything"
    assert all(torch.isfinite(p).all() for p in controller.parameters())
    load_controller(tmp_path / "run" / "final.safetensors")  # refuses NaN/inf weights
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["skipped_truncations"] == outcomes["skipped"] == trainer.state.skipped
    assert last["attempted_truncations"] == outcomes["skipped"] + outcomes["applied"]


def test_too_many_skipped_truncations_stop_the_run_with_a_clear_message(tmp_path: Path) -> None:
    config = _config(_poisoned_suite(tmp_path, "nan_loss", 1.0), meta_steps=60, max_skip_fraction=0.2)
    with pytest.raises(MetaTrainingError, match=r"max_skip_fraction=0\.2") as caught:
        MetaTrainer(config, tmp_path / "run", progress=False).train()
    assert "non-finite" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_cli_stops_a_run_with_too_many_skipped_truncations_in_one_line(tmp_path: Path) -> None:
    suite = _poisoned_suite(tmp_path, "nan_loss", 1.0)
    recipe = write_yaml(
        tmp_path / "recipe.yaml",
        {"name": "faults", "suite": str(suite), "seed": 5,
         "meta": {"meta_steps": 60, "meta_batch": 1, "unroll_length": 3, "checkpoint_every": 5, "state_every": 0,
                  "log_every": 5, "valid_batch_size": 8, "max_skip_fraction": 0.2}},
    )
    out = tmp_path / "run"
    result = run_metalr(["meta-train", str(recipe), "--out", str(out), "--no-progress"])
    line = assert_one_line_user_error(result.returncode, result.stderr)
    assert "max_skip_fraction=0.2" in line and "non-finite" in line
    assert not (out / "final.safetensors").exists()
    for path in out.glob("*.safetensors"):  # periodic checkpoints written before the stop are clean
        load_controller(path)
