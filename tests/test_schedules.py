"""Schedules against hand-computed arrays and against torch's own schedulers, step by step."""

from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    ExponentialLR,
    LinearLR,
    LRScheduler,
    OneCycleLR,
    SequentialLR,
    StepLR,
)

from metalr.schedules import (
    Schedule,
    constant_schedule,
    cosine_schedule,
    exponential_schedule,
    onecycle_schedule,
    step_schedule,
    warmup_cosine_schedule,
)

BASE_LR = 0.2


def _values(schedule: Schedule, steps: int) -> list[float]:
    return [schedule(t) for t in range(steps)]


def _torch_values(make: type[LRScheduler] | object, steps: int, **kwargs: object) -> list[float]:
    """LR of each step 0..steps-1 from a torch scheduler, divided by the base LR (a multiplier)."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE_LR)
    scheduler = make(optimizer, **kwargs)  # type: ignore[operator]
    out = []
    for step in range(steps):
        out.append(optimizer.param_groups[0]["lr"] / BASE_LR)
        if step < steps - 1:  # OneCycleLR refuses to step past its budget
            optimizer.step()
            scheduler.step()
    return out


def test_constant() -> None:
    assert _values(constant_schedule(), 4) == [1.0, 1.0, 1.0, 1.0]


def test_step_by_hand_and_torch() -> None:
    assert _values(step_schedule(3, 0.5), 8) == [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert _values(step_schedule(3, 0.5), 8) == pytest.approx(
        _torch_values(StepLR, 8, step_size=3, gamma=0.5)
    )


def test_exponential_by_hand_and_torch() -> None:
    assert _values(exponential_schedule(0.9), 4) == pytest.approx([1.0, 0.9, 0.81, 0.729])
    assert _values(exponential_schedule(0.9), 12) == pytest.approx(
        _torch_values(ExponentialLR, 12, gamma=0.9)
    )


def test_cosine_by_hand_and_torch() -> None:
    c = math.cos(math.pi / 4)
    expected = [1.0, (1 + c) / 2, 0.5, (1 - c) / 2, 0.0]
    assert _values(cosine_schedule(4), 5) == pytest.approx(expected, abs=1e-12)
    assert cosine_schedule(4)(9) == 0.0  # held after T_max (torch would rise again)
    assert _values(cosine_schedule(10, 0.1), 11) == pytest.approx(
        _torch_values(CosineAnnealingLR, 11, T_max=10, eta_min=0.1 * BASE_LR)
    )


def test_warmup_cosine_by_hand_and_torch() -> None:
    c = math.cos(math.pi / 4)
    # W = 2 warm-up steps at 1/2, 2/2; then cosine over T - W = 4 steps.
    expected = [0.5, 1.0, 1.0, (1 + c) / 2, 0.5, (1 - c) / 2, 0.0]
    assert _values(warmup_cosine_schedule(6, 2), 7) == pytest.approx(expected, abs=1e-12)

    def sequential(optimizer: torch.optim.Optimizer, total: int, warmup: int) -> SequentialLR:
        linear = LinearLR(optimizer, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup - 1)
        cosine = CosineAnnealingLR(optimizer, T_max=total - warmup)
        return SequentialLR(optimizer, [linear, cosine], milestones=[warmup])

    for total, warmup in [(6, 2), (20, 5), (50, 3)]:
        ours = _values(warmup_cosine_schedule(total, warmup), total + 1)
        assert ours == pytest.approx(
            _torch_values(sequential, total + 1, total=total, warmup=warmup), abs=1e-9
        )


def test_onecycle_by_hand() -> None:
    # T = 10, pct_start 0.3: phase 1 ends at step 0.3 * 10 - 1 = 2, phase 2 at step 9.
    initial, final = 1 / 25, 1 / 25 / 1e4

    def cos(start: float, end: float, pct: float) -> float:
        return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)

    expected = [initial, cos(initial, 1.0, 0.5), 1.0] + [cos(1.0, final, (t - 2) / 7) for t in range(3, 11)]
    assert expected[9] == pytest.approx(final)
    assert _values(onecycle_schedule(10), 11) == pytest.approx(expected, abs=1e-12)
    assert expected[1] == pytest.approx(0.52)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"anneal_strategy": "linear"},
        {"three_phase": True},
        {"pct_start": 0.25, "div_factor": 10.0, "final_div_factor": 100.0},
    ],
)
@pytest.mark.parametrize("total", [10, 37, 100])
def test_onecycle_matches_torch(total: int, kwargs: dict) -> None:
    ours = _values(onecycle_schedule(total, **kwargs), total + 1)
    theirs = _torch_values(
        OneCycleLR, total + 1, max_lr=BASE_LR, total_steps=total, cycle_momentum=False, **kwargs
    )
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_onecycle_holds_after_budget_and_survives_zero_length_phase() -> None:
    schedule = onecycle_schedule(10)
    assert schedule(50) == schedule(10)
    # pct_start * T - 1 = 0: torch divides by zero at step 0; the schedule takes the phase's end value.
    assert onecycle_schedule(5, pct_start=0.2)(0) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 10, "pct_start": 1.5}, "pct_start"),
        ({"total_steps": 10, "anneal_strategy": "cosine"}, "anneal_strategy"),
        ({"total_steps": 10, "div_factor": 0.0}, "div_factor"),
    ],
)
def test_onecycle_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        onecycle_schedule(**kwargs)


def test_the_cosine_formula_is_written_once() -> None:
    """The cosine and one-cycle schedules and the controller's cosine base share metalr.schedules.half_cosine."""
    import ast
    import inspect

    import metalr.schedules as schedules

    calls = [n for n in ast.walk(ast.parse(inspect.getsource(schedules))) if isinstance(n, ast.Attribute) and n.attr == "cos"]
    assert len(calls) == 2, "math.cos / torch.cos only inside half_cosine (one float and one tensor branch)"
    assert schedules.half_cosine(0.0) == 1.0 and schedules.half_cosine(1.0) == 0.0
    assert float(schedules.BASE_SCHEDULES["cosine"](torch.tensor(3.0), torch.tensor(12.0))) == pytest.approx(schedules.half_cosine(0.25))
