"""The four experiment-plan methods, each on a problem where its defining behaviour is known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metalr.methods import MethodContext, create_method
from metalr.methods.adaptive import (
    ALRS,
    CpuProbe,
    CudaProbe,
    GradientVarianceAdam,
    ResourceAwareLR,
    ResourceReading,
    UncertaintyThresholdLR,
    categorical_variance,
    data_complexity,
    default_probe,
)
from metalr.methods.policies import OutputTap
from metalr.tasks import build_task, create_task_family


def _param(value: list[float]) -> nn.Parameter:
    return nn.Parameter(torch.tensor(value))


# -- uncertainty threshold -----------------------------------------------------------------------------------


def _uncertainty(base_lr: float = 0.1, **kwargs: object) -> tuple[UncertaintyThresholdLR, nn.Parameter]:
    p = _param([0.0, 0.0])
    optimizer = torch.optim.SGD([p], lr=base_lr)
    return UncertaintyThresholdLR(optimizer, [p], num_classes=3, **kwargs), p  # type: ignore[arg-type]


def test_uncertainty_halves_the_lr_when_the_grad_norm_exceeds_threshold() -> None:
    scheduler, p = _uncertainty()
    p.grad = torch.tensor([0.3, 0.4])  # norm 0.5 > 0.1
    scheduler.step(1.0)
    assert scheduler.get_last_lr() == [pytest.approx(0.05)]
    scheduler.step(1.0)
    assert scheduler.get_last_lr() == [pytest.approx(0.025)]
    assert scheduler.last_grad_norm == pytest.approx(0.5)


def test_uncertainty_raises_the_lr_by_1_05_when_calm_and_never_above_base() -> None:
    scheduler, p = _uncertainty()
    p.grad = torch.tensor([0.3, 0.4])
    scheduler.step(1.0)  # 0.05
    p.grad = torch.tensor([0.03, 0.04])  # norm 0.05 <= 0.1; constant loss -> loss variance 0
    scheduler.step(1.0)
    assert scheduler.get_last_lr() == [pytest.approx(0.05 * 1.05)]
    for _ in range(30):
        scheduler.step(1.0)
    assert scheduler.get_last_lr() == [pytest.approx(0.1)]  # capped at the base LR


def test_uncertainty_halves_on_prediction_variance_with_small_gradients() -> None:
    scheduler, p = _uncertainty()
    p.grad = torch.tensor([0.0, 0.01])
    scheduler.observe_outputs(torch.zeros(8, 3))  # uniform over 3 classes: variance 1 - 1/3
    scheduler.step(1.0)
    assert scheduler.last_variance == pytest.approx(2 / 3)
    assert scheduler.last_variance_source == "outputs"
    assert scheduler.get_last_lr() == [pytest.approx(0.05)]
    scheduler.observe_outputs(torch.tensor([[30.0, 0.0, 0.0]]).repeat(8, 1))  # certain: variance ~ 0
    scheduler.step(1.0)
    assert scheduler.get_last_lr() == [pytest.approx(0.05 * 1.05)]


def test_uncertainty_loss_variance_proxy_and_floor() -> None:
    scheduler, p = _uncertainty(min_lr_ratio=0.01)
    p.grad = torch.zeros(2)
    for loss in [1.0, 2.0, 0.5, 3.0] * 10:  # a noisy loss: EMA variance far above 0.01
        scheduler.step(loss)
    assert scheduler.last_variance_source == "loss"
    assert scheduler.last_variance > 0.01
    assert scheduler.get_last_lr() == [pytest.approx(0.1 * 0.01)]  # floor, still positive


def test_categorical_variance_by_hand() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1.0, 1e-30, 1e-30]]))
    # 1 - (0.25 + 0.0625 + 0.0625) = 0.625 and 0 -> mean 0.3125
    assert categorical_variance(logits) == pytest.approx(0.3125, abs=1e-6)


def test_output_tap_sees_training_forwards_only() -> None:
    model = nn.Linear(2, 3)
    tap = OutputTap(model)
    with torch.no_grad():
        model(torch.ones(4, 2))
    assert tap.take() is None
    out = model(torch.ones(4, 2))
    taken = tap.take()
    assert taken is not None and torch.equal(taken, out.detach()) and tap.take() is None


def test_uncertainty_method_reads_outputs_through_the_task_model() -> None:
    spec = create_task_family("iris_mlp").sample(torch.Generator().manual_seed(0))
    task = build_task(spec.replace(optimizer="sgd", base_lr=0.1, steps=3))
    run = create_method("uncertainty").build(task.model.parameters(), MethodContext(task, "sgd", 0.1, 3))
    loss = task.loss(task.model, next(task.batches("train")))
    loss.backward()
    run.optimizer.step()
    run.scheduler.step(loss)
    assert run.scheduler.last_variance_source == "outputs"  # type: ignore[attr-defined]


# -- gradient variance ---------------------------------------------------------------------------------------


def _drive_gradient_variance(gradients: list[torch.Tensor]) -> GradientVarianceAdam:
    p = nn.Parameter(torch.zeros(gradients[0].shape))
    optimizer = GradientVarianceAdam([p], lr=0.01)
    for g in gradients:
        p.grad = g.clone()
        optimizer.step()
    return optimizer


def test_gradient_variance_keeps_the_lr_when_gradients_agree() -> None:
    optimizer = _drive_gradient_variance([torch.ones(100)] * 30)
    assert optimizer.param_groups[0]["variance_scale"] == pytest.approx(1.0)


def test_gradient_variance_scales_the_lr_down_under_high_variance() -> None:
    generator = torch.Generator().manual_seed(0)
    noise = [torch.randn(1000, generator=generator) for _ in range(60)]
    group = _drive_gradient_variance(noise).param_groups[0]
    # Pure noise: relative variance near 1, step size near lr_scaling * lr (never below it).
    assert group["relative_variance"] > 0.85
    assert 0.1 <= group["variance_scale"] < 0.25
    mixed = [torch.ones(1000) + 0.3 * n for n in noise]
    assert 0.9 < _drive_gradient_variance(mixed).param_groups[0]["variance_scale"] < 1.0


def test_gradient_variance_first_step_is_plain_adam() -> None:
    p = _param([1.0, -2.0])
    reference = _param([1.0, -2.0])
    ours, adam = GradientVarianceAdam([p], lr=0.1), torch.optim.Adam([reference], lr=0.1)
    p.grad = reference.grad = torch.tensor([0.5, 0.25])
    ours.step()
    adam.step()
    assert torch.allclose(p, reference)


# -- ALRS ----------------------------------------------------------------------------------------------------


def test_alrs_network_is_two_hidden_layers_of_64_relu() -> None:
    p = _param([1.0])
    scheduler = ALRS(torch.optim.SGD([p], lr=0.1), [p], 1, 10, None)
    layers = list(scheduler.net.layers)
    assert [type(m) for m in layers] == [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear]
    assert [(m.in_features, m.out_features) for m in layers if isinstance(m, nn.Linear)] == [
        (5, 64),
        (64, 64),
        (64, 1),
    ]


def test_alrs_trains_online_and_raises_a_too_small_lr_on_a_quadratic() -> None:
    theta = nn.Parameter(torch.ones(10))
    optimizer = torch.optim.SGD([theta], lr=0.01)  # far below the optimal 1.0 for f = |theta|^2 / 2
    scheduler = ALRS(optimizer, [theta], 2, 60, None, net_lr=1e-2)
    before = [w.detach().clone() for w in scheduler.net.parameters()]
    for _ in range(60):
        optimizer.zero_grad()
        loss = 0.5 * theta.square().sum()
        loss.backward()
        optimizer.step()
        scheduler.step(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, scheduler.net.parameters(), strict=True))
    assert scheduler.updates == 30
    assert scheduler.get_last_lr()[0] > 0.01 * 1.5


def test_alrs_untrained_network_predicts_the_base_lr() -> None:
    p = _param([1.0])
    optimizer = torch.optim.SGD([p], lr=0.1)
    scheduler = ALRS(optimizer, [p], 1, 10, lambda: (1.0, 0.5))
    p.grad = torch.ones(1)
    scheduler.step(1.0)  # first epoch end: no previous features, no training, prediction from zero output
    assert scheduler.get_last_lr() == [pytest.approx(0.1)]


# -- resource aware ------------------------------------------------------------------------------------------


class FixedProbe:
    def __init__(self, reading: ResourceReading) -> None:
        self.reading = reading

    def read(self) -> ResourceReading:
        return self.reading


def _resource(base_lr: float, reading: ResourceReading, complexity: float = 0.5) -> ResourceAwareLR:
    optimizer = torch.optim.SGD([_param([0.0])], lr=base_lr)
    return ResourceAwareLR(
        optimizer, FixedProbe(reading), steps_per_epoch=2, batch_size=32, complexity=complexity
    )


def test_resource_aware_lowers_the_lr_under_load_and_raises_it_when_idle() -> None:
    busy = _resource(1e-3, ResourceReading(1.0, 1.0))
    idle = _resource(1e-3, ResourceReading(0.0, 0.0))
    for scheduler in (busy, idle):
        assert scheduler.get_last_lr() == [pytest.approx(1e-3)]  # first epoch: neutral pressure, s = 0.5
        scheduler.step()
        scheduler.step()  # epoch end
    # s = 0.5 * 1 + 0.5 * 0.5 = 0.75 -> x 2^-0.5; s = 0.25 -> x 2^0.5
    assert busy.get_last_lr() == [pytest.approx(1e-3 / math.sqrt(2))]
    assert idle.get_last_lr() == [pytest.approx(1e-3 * math.sqrt(2))]


def test_resource_aware_stays_within_bounds() -> None:
    high = _resource(0.5, ResourceReading(0.0, 0.0), complexity=0.0)
    low = _resource(1e-7, ResourceReading(1.0, 1.0), complexity=1.0)
    for _ in range(4):
        high.step()
        low.step()
    assert high.get_last_lr() == [1e-2]
    assert low.get_last_lr() == [1e-6]


def test_resource_aware_uses_throughput_when_utilisation_is_unavailable() -> None:
    scheduler = _resource(1e-3, ResourceReading(None, None))
    scheduler.step()
    scheduler.step()
    assert 0.0 <= scheduler.pressure <= 1.0  # slowdown against the best epoch so far (0 on the first)


def test_cpu_probe_measures_without_failing() -> None:
    probe = CpuProbe()
    sum(i * i for i in range(20000))
    reading = probe.read()
    assert reading.utilisation is None or 0.0 <= reading.utilisation <= 1.0
    assert reading.memory is None or 0.0 < reading.memory <= 1.0


def test_probe_follows_the_parameters_device() -> None:
    assert isinstance(default_probe(torch.device("cpu")), CpuProbe)
    assert isinstance(default_probe(torch.device("cuda", 0)), CudaProbe)  # constructing touches no GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_probe_measures_device_memory() -> None:
    reading = CudaProbe(torch.device("cuda", 0)).read()
    assert reading.memory is not None and 0.0 <= reading.memory <= 1.0
    assert reading.utilisation is None or 0.0 <= reading.utilisation <= 1.0


def test_data_complexity_by_hand() -> None:
    assert data_complexity(64, 1000, 224 * 224 * 3) == pytest.approx((1 + 1 + 0.5) / 3)
    assert data_complexity(4096, None, 1) == 0.0


@pytest.mark.parametrize("base_lr", [1e-4, 0.5])
def test_resource_aware_method_on_cpu_stays_within_bounds(base_lr: float) -> None:
    spec = create_task_family("digits_mlp").sample(torch.Generator().manual_seed(0))
    task = build_task(spec.replace(optimizer="sgd", base_lr=base_lr, steps=3 * 8, batch_size=128))
    context = MethodContext(task, "sgd", base_lr, spec.steps)
    run = create_method("resource_aware").build(task.model.parameters(), context)
    batches = task.batches("train")
    for _ in range(3 * task.steps_per_epoch):
        loss = task.loss(task.model, next(batches))
        loss.backward()
        run.optimizer.step()
        run.scheduler.step(loss)
        run.optimizer.zero_grad()
        assert all(1e-6 <= lr <= 1e-2 for lr in run.scheduler.get_last_lr())
