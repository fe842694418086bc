"""``LearnedLR`` honours torch's ``LRScheduler`` contract, rejects bad input clearly and never emits a bad LR.

The contract tests follow PyTorch's own ``test/optim/test_lrscheduler.py``: the LR written at construction,
``get_last_lr()``, a ``state_dict`` round trip into a scheduler built with different settings, several
param groups. The property test (issue 10, point 2) drives the scheduler with extreme losses and gradients.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scheduler_support import train
from torch import nn

from metalr import CheckpointError, LRController, PolicyConfig
from metalr.scheduler import LearnedLR


def active_controller(seed: int = 0, weight_scale: float = 1.0, **policy: float | str) -> LRController:
    """A controller with random non-zero weights, so that the LR actually moves (an untrained one is flat)."""
    controller = LRController(policy=PolicyConfig(**policy))  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * weight_scale)
    return controller.requires_grad_(False)


def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)) for _ in range(n)
    ]


def test_construction_writes_step0_lr_and_get_last_lr() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = LearnedLR(optimizer, active_controller(base_schedule="cosine"), total_steps=20)
    # Step 0 of any base schedule is the base LR itself, and the learned factor starts at 1.
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    assert sched.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    assert sched.last_epoch == 0
    lrs = train(model, optimizer, sched, batches(5))
    assert sched.last_epoch == 5
    assert sched.get_last_lr() == [g["lr"] for g in optimizer.param_groups]
    assert len({lr[0] for lr in lrs}) > 1, "an active controller should move the LR"


def test_state_dict_round_trip_continues_the_same_trajectory() -> None:
    data = batches(20)
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = LearnedLR(optimizer, active_controller(), total_steps=20)
    train(model, optimizer, sched, data[:8])
    saved = (
        {k: v.clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.state_dict()),  # torch returns live references to its state tensors
        copy.deepcopy(sched.state_dict()),
    )
    assert "controller" not in saved[2] and "optimizer" not in saved[2]
    reference = train(model, optimizer, sched, data[8:])

    # A scheduler built with different settings (other base LR, other budget) picks up the saved trajectory.
    model2 = tiny_model(seed=5)
    optimizer2 = torch.optim.Adam(model2.parameters(), lr=0.3)
    sched2 = LearnedLR(optimizer2, active_controller(), total_steps=999)
    model2.load_state_dict(saved[0])
    optimizer2.load_state_dict(saved[1])
    sched2.load_state_dict(saved[2])
    assert sched2.total_steps == 20 and sched2.last_epoch == 8
    resumed = train(model2, optimizer2, sched2, data[8:])
    assert resumed == reference


def test_state_dict_rejects_other_param_groups_and_other_versions() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = LearnedLR(optimizer, active_controller(), total_steps=5).state_dict()
    other = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[2].parameters()}], lr=0.1)
    with pytest.raises(ValueError, match="saved for 1 param groups, this optimizer has 2"):
        LearnedLR(other, active_controller(), total_steps=5).load_state_dict(state)
    old = {**state, "feature_state": {**state["feature_state"], "grad_mean": []}}
    with pytest.raises(ValueError, match=r"not a LearnedLR state of this version.*feature format 2"):
        LearnedLR(optimizer, active_controller(), total_steps=5).load_state_dict(old)


def test_param_groups_scale_from_their_own_initial_lr() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.001}], lr=0.5
    )
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    assert sched.get_last_lr() == pytest.approx([0.1, 0.001])
    for lr_a, lr_b in train(model, optimizer, sched, batches(10)):
        assert lr_a / lr_b == pytest.approx(100.0, rel=1e-9)


def test_step_without_loss_warns_once_and_observe_loss_averages() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10)
    with pytest.warns(UserWarning, match="without a loss"):
        sched.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()  # second time: silent
        sched.observe_loss(torch.tensor(1.0))
        sched.observe_loss(3.0)
        sched.step()  # observed micro-batch losses: no warning
    # The observed losses are averaged: the same as passing the mean directly.
    twin_optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    twin = LearnedLR(twin_optimizer, active_controller(), total_steps=10)
    with pytest.warns(UserWarning):
        twin.step()
    twin.step()
    twin.step(2.0)
    assert twin.get_last_lr() == sched.get_last_lr()


def test_scaler_skip_does_not_advance_state() -> None:
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sched = LearnedLR(optimizer, active_controller(), total_steps=10, scaler=scaler)
    x, y = batches(1)[0]
    loss = nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0] = float("inf")  # the scaler will skip this step
    scaler.step(optimizer)
    scaler.update()
    before = sched.state_dict()
    sched.step(loss)
    assert sched.skipped_steps == 1 and sched.last_epoch == before["last_epoch"]
    assert sched.get_last_lr() == before["_last_lr"]
    assert torch.equal(sched.state_dict()["log_factor"], before["log_factor"])


@pytest.mark.parametrize("total_steps", [0, -3, 2.5, True, None])
def test_bad_total_steps(total_steps: object) -> None:
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="total_steps must be a positive integer"):
        LearnedLR(optimizer, active_controller(), total_steps=total_steps)  # type: ignore[arg-type]


@pytest.mark.parametrize("lr", [None, 0.0, -1.0, float("nan")])
def test_optimizer_without_usable_lr(lr: object) -> None:
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    if lr is None:
        del optimizer.param_groups[0]["lr"]
    else:
        optimizer.param_groups[0]["lr"] = lr
    with pytest.raises(ValueError, match="param group 0 .* needs a positive finite 'lr'"):
        LearnedLR(optimizer, active_controller(), total_steps=5)


def test_not_an_optimizer_and_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(TypeError, match="needs a torch.optim.Optimizer"):
        LearnedLR(object(), active_controller(), total_steps=5)  # type: ignore[arg-type]
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="no controller checkpoint at .*nope.safetensors"):
        LearnedLR(optimizer, str(missing), total_steps=5)


def test_bad_loss_and_epoch_arguments() -> None:
    optimizer = torch.optim.SGD(tiny_model().parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=5)
    with pytest.raises(ValueError, match="scalar training loss"):
        sched.step(torch.ones(3))
    with pytest.raises(TypeError, match="not an epoch"):
        sched.step(1.0, epoch=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="tensor or a number"):
        sched.step("0.5")  # type: ignore[arg-type]


# -- issue 10, point 2: whatever the inputs, the LR is finite, positive and within the policy's bounds ----

EXTREME = [0.0, 1e-30, -1e-30, 1e30, -1e30, 1.0, float("nan"), float("inf"), float("-inf")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    losses=st.lists(st.sampled_from(EXTREME), min_size=1, max_size=12),
    grad_values=st.lists(st.sampled_from(EXTREME), min_size=1, max_size=12),
    base_lr=st.sampled_from([1e-12, 1e-3, 1.0, 1e6]),
    seed=st.integers(0, 3),
    weight_scale=st.sampled_from([0.0, 1.0, 100.0]),
    base_schedule=st.sampled_from(["constant", "cosine"]),
    empty_group=st.booleans(),
    drop_grads=st.booleans(),
)
def test_lr_always_finite_positive_and_in_bounds(
    losses: list[float],
    grad_values: list[float],
    base_lr: float,
    seed: int,
    weight_scale: float,
    base_schedule: str,
    empty_group: bool,
    drop_grads: bool,
) -> None:
    controller = active_controller(seed, weight_scale, base_schedule=base_schedule, min_lr=1e-7, max_lr=10.0)
    model = tiny_model()
    groups: list[dict] = [{"params": list(model.parameters())}]
    if empty_group:
        groups.append({"params": [], "lr": base_lr * 10})
    optimizer = torch.optim.SGD(groups, lr=base_lr)
    total_steps = max(len(losses), len(grad_values))
    sched = LearnedLR(optimizer, controller, total_steps=total_steps)

    def check() -> None:
        for lr in [g["lr"] for g in optimizer.param_groups] + list(sched.get_last_lr()):
            assert math.isfinite(lr) and 1e-7 <= lr <= 10.0, lr

    check()
    for t in range(total_steps):
        for p in model.parameters():
            p.grad = None if drop_grads and t % 2 else torch.full_like(p, grad_values[t % len(grad_values)])
        optimizer.step()
        sched.step(torch.tensor(losses[t % len(losses)]))
        check()
        # The optimizer may have produced non-finite parameters from the poisoned gradients; restore them
        # so that the next step again tests the scheduler, not an already-broken model.
        with torch.no_grad():
            for p in model.parameters():
                p.nan_to_num_(0.0, 1.0, -1.0)


def test_only_empty_param_groups_and_a_loss_of_every_kind() -> None:
    weight = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([{"params": [weight]}, {"params": [], "lr": 0.5}], lr=0.01)
    sched = LearnedLR(optimizer, active_controller(weight_scale=50.0), total_steps=4)
    for loss in (
        float("nan"),
        torch.tensor(float("inf")),
        torch.tensor([0.0]),
        torch.tensor(1e30, dtype=torch.float64),
    ):
        optimizer.step()  # no gradient at all: the scheduler stands in zeros
        sched.step(loss)
        assert all(math.isfinite(lr) and lr > 0 for lr in sched.get_last_lr())


def test_tensor_lr_is_updated_in_place() -> None:
    """A tensor LR (what a compiled ``optimizer.step`` wants, so a new LR does not recompile) stays the same
    tensor; LearnedLR fills it."""
    model = tiny_model()
    lr = torch.tensor(0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    sched = LearnedLR(optimizer, active_controller(), total_steps=5)
    lrs = train(model, optimizer, sched, batches(5))
    assert optimizer.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(lrs[-1][0])
    assert len({row[0] for row in lrs}) > 1


def test_state_dict_loads_with_weights_only(tmp_path) -> None:
    """Trainer (and careful users) reload scheduler state with ``torch.load(..., weights_only=True)``."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = LearnedLR(optimizer, active_controller(), total_steps=6)
    train(model, optimizer, sched, batches(3))
    torch.save(sched.state_dict(), tmp_path / "scheduler.pt")
    restored = LearnedLR(
        torch.optim.SGD(tiny_model().parameters(), lr=0.1), active_controller(), total_steps=6
    )
    restored.load_state_dict(torch.load(tmp_path / "scheduler.pt", weights_only=True))
    assert restored.last_epoch == 3 and restored.get_last_lr() == sched.get_last_lr()
