"""Optimizer-replacing methods: hypergradient descent by hand, and the package wrappers' contracts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metalr.methods import MethodContext, create_method
from metalr.methods.literature import SGDHD, AdamHD
from metalr.tasks import build_task, create_task_family


def _quadratic_run(optimizer: torch.optim.Optimizer, theta: nn.Parameter, steps: int) -> list[float]:
    lrs = []
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * theta.square().sum()).backward()
        optimizer.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_sgd_hd_update_by_hand() -> None:
    theta = nn.Parameter(torch.tensor([1.0, 2.0]))
    optimizer = SGDHD([theta], lr=0.1, hypergrad_lr=0.01)
    _quadratic_run(optimizer, theta, 1)  # no previous direction: plain SGD step
    assert torch.allclose(theta, torch.tensor([0.9, 1.8]))
    _quadratic_run(optimizer, theta, 1)
    # h = g_1 . g_0 = [0.9, 1.8] . [1, 2] = 4.5 -> alpha = 0.1 + 0.01 * 4.5 = 0.145
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.145)
    assert torch.allclose(theta, torch.tensor([0.9, 1.8]) * (1 - 0.145))


def test_hypergradient_raises_a_too_small_lr_on_a_convex_quadratic() -> None:
    for make in (
        lambda p: SGDHD([p], lr=1e-3, hypergrad_lr=1e-3),
        lambda p: AdamHD([p], lr=1e-3, hypergrad_lr=1e-4),
    ):
        theta = nn.Parameter(torch.ones(20))
        lrs = _quadratic_run(make(theta), theta, 50)
        assert lrs[-1] > 2e-3
        early = lrs[:20]  # monotone while successive gradients agree (Adam later overshoots and backs off)
        assert all(b >= a for a, b in zip(early, early[1:], strict=False))


@pytest.mark.parametrize("optimizer_class", [SGDHD, AdamHD])
def test_hypergradient_lr_never_goes_negative(optimizer_class: type[torch.optim.Optimizer]) -> None:
    theta = nn.Parameter(torch.ones(4))
    optimizer = optimizer_class([theta], lr=0.1, hypergrad_lr=10.0)  # type: ignore[call-arg]
    for step in range(20):  # alternating gradients: every hypergradient is strongly negative
        theta.grad = torch.full((4,), 5.0 if step % 2 else -5.0)
        optimizer.step()
        assert optimizer.param_groups[0]["lr"] >= 0.1 * 1e-6 > 0


def _context(optimizer: str, base_lr: float, steps: int = 30) -> MethodContext:
    spec = create_task_family("iris_mlp").sample(torch.Generator().manual_seed(1))
    task = build_task(spec.replace(optimizer=optimizer, base_lr=base_lr, steps=steps))
    return MethodContext(task, optimizer, base_lr, steps)


def _train(name: str, context: MethodContext, **hyper: object):
    run = create_method(name, **hyper).build(context.task.model.parameters(), context)
    batches = context.task.batches("train")
    for _ in range(context.total_steps):
        loss = context.task.loss(context.task.model, next(batches))
        loss.backward()
        run.optimizer.step()
        run.scheduler.step(loss)
        run.optimizer.zero_grad()
    return run


@pytest.mark.parametrize(
    ("optimizer", "variant", "method"),
    [
        ("momentum", "SGD-HD (momentum 0.9)", "hypergradient"),
        ("adam", "Adam-HD", "hypergradient"),
        ("sgd", "SGDScheduleFree", "schedulefree"),
        ("adamw", "AdamWScheduleFree", "schedulefree"),
    ],
)
def test_family_follows_the_base_optimizer(optimizer: str, variant: str, method: str) -> None:
    context = _context(optimizer, 0.01, steps=2)
    run = create_method(method).build(context.task.model.parameters(), context)
    assert run.info["variant"] == variant
    assert create_method(method).owns_optimizer


def test_schedulefree_evaluates_at_the_averaged_iterate() -> None:
    context = _context("adam", 1e-2)
    run = _train("schedulefree", context)
    model = context.task.model
    live = [p.detach().clone() for p in model.parameters()]
    with run.evaluating():
        x = [p.detach().clone() for p in model.parameters()]
        assert not run.optimizer.param_groups[0]["train_mode"]
    assert run.optimizer.param_groups[0]["train_mode"]
    assert any(not torch.allclose(a, b) for a, b in zip(live, x, strict=True))  # y != x after training
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(live, model.parameters(), strict=True))


def test_dog_evaluates_at_its_polynomial_average_and_restores() -> None:
    context = _context("sgd", 0.1)
    run = _train("dog", context)
    model = context.task.model
    live = [p.detach().clone() for p in model.parameters()]
    with run.evaluating():
        averaged = [p.detach().clone() for p in model.parameters()]
    assert run.info["averaging"]
    assert any(not torch.equal(a, b) for a, b in zip(live, averaged, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(live, model.parameters(), strict=True))
    assert run.scheduler.get_last_lr()[0] > 0


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam"])
def test_distance_estimate_grows_from_d0_and_is_cosine_annealed(name: str) -> None:
    context = _context("adam", 1e-3)
    run = _train(name, context)
    group = run.optimizer.param_groups[0]
    assert group["d"] > 1e-6  # the estimate grew from d0
    assert group["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine annealed to 0 at the end of the budget
    assert run.scheduler.get_last_lr() == [pytest.approx(group["d"] * group["lr"])]
    constant = _train(name, _context("adam", 1e-3), schedule="constant")
    assert constant.optimizer.param_groups[0]["lr"] == 1.0


def test_self_tuning_methods_reject_an_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="schedule"):
        create_method("prodigy", schedule="linear")
