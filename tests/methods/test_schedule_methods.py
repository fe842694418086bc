"""Schedule methods built through MethodRun follow torch's schedulers step for step."""

from __future__ import annotations

import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

from metalr.methods import MethodContext, create_method
from metalr.methods.schedules import PlateauLR
from metalr.tasks import build_task, create_task_family


def _context(total_steps: int, optimizer: str = "sgd", base_lr: float = 0.1) -> MethodContext:
    spec = create_task_family("iris_mlp").sample(torch.Generator().manual_seed(0))
    task = build_task(spec.replace(steps=total_steps, optimizer=optimizer, base_lr=base_lr))
    return MethodContext(task, optimizer, base_lr, total_steps)


def _trajectory(name: str, context: MethodContext, **hyper: object) -> list[float]:
    run = create_method(name, **hyper).build(context.task.model.parameters(), context)
    out = []
    for _ in range(context.total_steps):
        out.append(run.scheduler.get_last_lr()[0])
        run.optimizer.step()
        run.scheduler.step(1.0)
    return out


def test_onecycle_method_matches_torch_onecycle() -> None:
    context = _context(40, "adam", 3e-3)
    optimizer = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=3e-3)
    scheduler = OneCycleLR(optimizer, max_lr=3e-3, total_steps=40, cycle_momentum=False)
    expected = []
    for step in range(40):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if step < 39:
            scheduler.step()
    assert _trajectory("onecycle", context) == pytest.approx(expected, rel=1e-9)


def test_warmup_cosine_method_warms_up_over_five_percent() -> None:
    trajectory = _trajectory("warmup_cosine", _context(100))
    # W = 5 steps: 0.1 * (1..5)/5, then cosine from the base LR.
    assert trajectory[:6] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1])
    assert trajectory[-1] < 0.001


def _plateau_pair(
    **kwargs: float,
) -> tuple[PlateauLR, ReduceLROnPlateau, torch.optim.Optimizer, torch.optim.Optimizer]:
    ours_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return PlateauLR(ours_opt, **kwargs), ReduceLROnPlateau(ref_opt, **kwargs), ours_opt, ref_opt  # type: ignore[arg-type]


def test_plateau_by_hand() -> None:
    ours, _, optimizer, _ = _plateau_pair(factor=0.5, patience=2)
    valid = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5]
    lrs = []
    for loss in valid:
        for _ in range(3):  # per-step calls with the training loss never move the LR
            ours.step(123.0)
        ours.observe_validation(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    # 3 validations without improvement (> patience 2) -> halve; the counter restarts.
    assert lrs == [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_plateau_matches_torch_on_a_noisy_validation_curve() -> None:
    generator = torch.Generator().manual_seed(0)
    curve = (torch.linspace(2, 1, 60) + 0.05 * torch.randn(60, generator=generator)).tolist()
    ours, ref, ours_opt, ref_opt = _plateau_pair(factor=0.3, patience=3, threshold=1e-3, cooldown=2)
    for loss in curve:
        ours.observe_validation(loss)
        ref.step(loss)
        assert ours_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        assert ours.get_last_lr() == ref.get_last_lr()


def test_plateau_method_is_driven_by_the_validation_hook() -> None:
    context = _context(20)
    run = create_method("plateau", patience=0, factor=0.5).build(context.task.model.parameters(), context)
    run.on_validation(1.0)
    run.on_validation(1.0)  # no improvement, patience 0 -> halve
    assert run.scheduler.get_last_lr() == [pytest.approx(0.05)]


def test_plateau_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="factor"):
        create_method("plateau", factor=1.5)
