"""Every registered method, built and driven exactly as the evaluation harness drives it (5 steps, iris)."""

from __future__ import annotations

import math

import pytest
import torch

from metalr.controller import LRController
from metalr.methods import MethodContext, create_method, list_methods
from metalr.tasks import build_task, create_task_family

BASE_LRS = {"sgd": 0.1, "momentum": 0.05, "adam": 1e-3, "adamw": 1e-3}
STEPS = 5


def _task(optimizer: str):
    spec = create_task_family("iris_mlp").sample(torch.Generator().manual_seed(0))
    return build_task(spec.replace(steps=STEPS, optimizer=optimizer, base_lr=BASE_LRS[optimizer]))


def test_every_method_has_name_description_and_source() -> None:
    for name in list_methods():
        method = create_method(name)
        assert method.name == name
        assert method.description and "\n" not in method.description
        assert method.source
        assert isinstance(method.tuned, bool) and isinstance(method.owns_optimizer, bool)


@pytest.mark.parametrize("optimizer", sorted(BASE_LRS))
@pytest.mark.parametrize("name", list_methods())
def test_method_runs_through_the_harness_loop(name: str, optimizer: str) -> None:
    task = _task(optimizer)
    model = task.model
    context = MethodContext(task, optimizer, BASE_LRS[optimizer], STEPS, controller=LRController())
    run = create_method(name).build(model.parameters(), context)
    batches = task.batches("train")
    losses = []
    for step in range(STEPS):
        # The LR in effect for this step (after the last step a schedule may legitimately reach 0).
        lrs = run.scheduler.get_last_lr()
        assert lrs and all(math.isfinite(lr) and lr > 0 for lr in lrs), f"{name} step {step}: lrs={lrs}"
        loss = task.loss(model, next(batches))
        loss.backward()
        run.optimizer.step()
        run.scheduler.step(loss)
        run.optimizer.zero_grad()
        losses.append(float(loss.detach()))
        if step == 2:
            live = [p.detach().clone() for p in model.parameters()]
            with run.evaluating():
                valid_loss = task.evaluate(model, "inner_valid")["loss"]
            # Schedule-Free recomputes y from x and z on train(): equal up to rounding.
            restored = all(
                torch.allclose(a, b, atol=1e-6) for a, b in zip(live, model.parameters(), strict=True)
            )
            assert restored, f"{name}: eval_exit must restore the training weights"
            assert math.isfinite(valid_loss)
            run.on_validation(valid_loss)
    assert all(math.isfinite(x) for x in losses), f"{name}: losses={losses}"
    final_lrs = run.scheduler.get_last_lr()
    assert all(math.isfinite(lr) and lr >= 0 for lr in final_lrs), f"{name}: final lrs={final_lrs}"
