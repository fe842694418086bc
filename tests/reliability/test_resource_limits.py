"""Issue 10, point 6: resource limits.

* A task whose unroll is estimated above ``meta.memory_budget_mb`` is refused before any unroll of it
  runs, and the refusal carries the estimate (in ``metrics.jsonl`` and, when every task is refused, in
  the one-line CLI error). The meta engineer's ``tests/meta/test_trainer_ops.py`` checks the estimate is
  linear in K and the in-process error; here: the CLI contract, nothing-ran, and a budget that refuses
  only the large tasks of a suite.
* Meta-training memory stays flat: no tensor that still carries an autograd graph (``grad_fn``) survives a
  meta-step, counted every 50 of 1,000 meta-steps (periodic checkpoints and resume states included). A
  leaked unroll graph is exactly such a tensor; counting them is deterministic, where RSS growth depends on
  the allocator.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from reliability_support import (
    assert_one_line_user_error,
    read_trace,
    run_metalr,
    tiny_recipe,
    tiny_suite,
)

from metalr.config import MetaTrainConfig, build_config, load_config
from metalr.meta.resources import MemoryBudgetError, check_memory_budget
from metalr.meta.trainer import MetaTrainer, MetaTrainingError

ESTIMATE = re.compile(r"estimated unroll memory ([0-9.]+) MiB exceeds meta.memory_budget_mb=([0-9.e+-]+)")


def test_cli_refuses_tasks_over_the_memory_budget_before_they_start(tmp_path: Path) -> None:
    suite = tiny_suite(tmp_path)
    recipe = tiny_recipe(tmp_path, suite, memory_budget_mb=0.001, max_refused=3)
    trace = tmp_path / "trace.jsonl"
    result = run_metalr(["meta-train", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"], trace=trace)
    line = assert_one_line_user_error(result.returncode, result.stderr)
    assert ESTIMATE.search(line), line
    assert not [e for e in read_trace(trace) if e["event"] == "step"], "a meta-step ran although every task was refused"
    assert not list((tmp_path / "run").glob("*.safetensors"))


def test_a_budget_refuses_only_the_tasks_above_it(tmp_path: Path) -> None:
    # One family whose sizes span three orders of magnitude; a budget in between.
    suite = tiny_suite(tmp_path, meta_train=[{"family": "noisy_quadratic", "dims": [2, 5000], "examples": 256,
                                              "steps": [6, 9], "batch_sizes": [16], "optimizers": ["sgd"]}])
    data = {"name": "budget", "suite": str(suite), "seed": 2,
            "meta": {"meta_steps": 15, "meta_batch": 1, "unroll_length": 3, "checkpoint_every": 0, "state_every": 0,
                     "log_every": 15, "valid_batch_size": 16, "memory_budget_mb": 0.5, "max_refused": 50}}
    trainer = MetaTrainer(build_config(MetaTrainConfig, data), tmp_path / "run", progress=False)
    before = [p.detach().clone() for p in trainer.controller.parameters()]
    controller = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    refusals = [r for r in records if r.get("event") == "refused_task"]
    assert refusals, "the budget refused nothing; the test does not test anything"
    for refusal in refusals:
        match = ESTIMATE.search(refusal["reason"])
        assert match and float(match.group(1)) > 0.5, refusal
    assert records[-1]["refused_tasks"] == len(refusals)
    assert records[-1]["attempted_truncations"] == 15
    assert any(not torch.equal(a, b) for a, b in zip(before, controller.parameters(), strict=True)), "nothing was trained"


def test_the_refusal_message_shows_an_estimate_above_the_budget() -> None:
    with pytest.raises(MemoryBudgetError) as caught:
        check_memory_budget(50_000, 0.01, "task")
    match = ESTIMATE.search(str(caught.value))
    assert match and float(match.group(1)) > float(match.group(2)), str(caught.value)


def test_in_process_refusal_raises_before_the_first_meta_step(tmp_path: Path) -> None:
    data = {"name": "budget", "suite": str(tiny_suite(tmp_path)), "seed": 0,
            "meta": {"meta_steps": 5, "meta_batch": 2, "unroll_length": 3, "memory_budget_mb": 1e-4, "max_refused": 2}}
    with pytest.raises(MetaTrainingError, match=ESTIMATE.pattern):
        MetaTrainer(build_config(MetaTrainConfig, data), tmp_path / "run", progress=False)


def _tensors_with_a_graph() -> int:
    gc.collect()
    # type() rather than isinstance(): isinstance reads __class__, which warns on some lazy torch objects.
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor) and obj.grad_fn is not None)


@pytest.mark.slow
def test_meta_training_memory_stays_flat_over_1000_meta_steps(tmp_path: Path) -> None:
    suite = tiny_suite(tmp_path, meta_train=[{"family": "noisy_quadratic", "dims": [2, 4], "examples": 64,
                                              "steps": [10, 20], "batch_sizes": [8], "optimizers": ["sgd", "adam"]}])
    recipe = tiny_recipe(tmp_path, suite, meta_steps=1000, unroll_length=2, checkpoint_every=250, state_every=250,
                         log_every=100, valid_batch_size=8)
    trainer = MetaTrainer(load_config(MetaTrainConfig, recipe), tmp_path / "run", progress=False)
    counts: dict[int, int] = {}
    step = trainer.step

    def counted_step() -> dict[str, Any]:
        stats = step()
        if trainer.state.meta_step % 50 == 0:
            counts[trainer.state.meta_step] = _tensors_with_a_graph()
        return stats

    trainer.step = counted_step  # type: ignore[method-assign]
    before = _tensors_with_a_graph()  # what earlier tests in this process left alive (0 when run alone)
    trainer.train()
    assert sorted(counts) == list(range(50, 1001, 50))
    assert set(counts.values()) == {before}, f"{before} tensors with a live graph before, after meta-steps: {counts}"
    leaked = [p * 2 for p in trainer.controller.parameters()]  # what a leak looks like: the count sees it
    assert _tensors_with_a_graph() == before + len(leaked)
