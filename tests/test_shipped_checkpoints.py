"""Every controller shipped in checkpoints/ loads by name and drives 20 steps of a real training loop."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch

from metalr import load_controller
from metalr.checkpoint import list_shipped, read_metadata, resolve_checkpoint
from metalr.scheduler import LearnedLR
from metalr.tasks import build_task, create_task_family
from metalr.tasks.optimizers import make_torch_optimizer

SHIPPED = list_shipped()
CARDS = (Path(__file__).resolve().parent.parent / "checkpoints" / "README.md").read_text()


def test_the_documented_controllers_are_shipped() -> None:
    assert {"demo", "adam-cpu", "sgd-cpu"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_each_shipped_controller_has_a_model_card(name: str) -> None:
    assert re.search(rf"^## `{re.escape(name)}`", CARDS, re.MULTILINE), f"no model card section for {name}"
    meta = read_metadata(resolve_checkpoint(name))
    assert meta["provenance"]["recipe"], f"{name} does not record its recipe"


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("optimizer", ["adam", "momentum"])
def test_shipped_controller_runs_20_steps_on_an_embedded_task(name: str, optimizer: str) -> None:
    controller = load_controller(name)
    base_lr = {"adam": 3e-3, "momentum": 3e-2}[optimizer]
    spec = create_task_family("digits_mlp").sample(torch.Generator().manual_seed(3))
    task = build_task(dataclasses.replace(spec, optimizer=optimizer, base_lr=base_lr, steps=20))
    model = task.model
    optimizer_ = make_torch_optimizer(optimizer, model.parameters(), base_lr)
    scheduler = LearnedLR(optimizer_, controller, total_steps=20)
    batches = task.batches("train")
    policy = controller.policy
    first = last = None
    lrs = []
    for _ in range(20):
        loss = task.loss(model, next(batches))
        optimizer_.zero_grad()
        loss.backward()
        optimizer_.step()
        scheduler.step(loss)
        (lr,) = scheduler.get_last_lr()
        lrs.append(lr)
        first = loss.item() if first is None else first
        last = loss.item()
    assert all(math.isfinite(lr) and policy.min_lr <= lr <= policy.max_lr for lr in lrs)
    # The LR stays within the factor bounds of the base schedule times the base LR.
    assert max(lrs) <= base_lr * policy.max_factor * (1 + 1e-6)
    assert optimizer_.param_groups[0]["lr"] == pytest.approx(lrs[-1])
    assert last is not None and first is not None and last < first, f"{name}: loss went {first} -> {last}"
