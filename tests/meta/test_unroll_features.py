"""The extra feature groups (validation gap, predictive entropy, budget) are fed during unrolls when the
controller reads them, the meta-gradient through them stays exact, and ablated controllers pay nothing."""

from __future__ import annotations

import torch

from metalr.controller import LRController
from metalr.features import DEFAULT_GROUPS, FeatureSpec
from metalr.meta.unroll import start_run, unroll
from metalr.tasks import build_task, create_task_family

EXTRA = (*DEFAULT_GROUPS, "validation", "uncertainty", "resource")


def _controller(groups: tuple[str, ...]) -> LRController:
    torch.manual_seed(0)
    controller = LRController(FeatureSpec(groups=groups)).double()
    with torch.no_grad():
        controller.net.head.weight.normal_(0, 0.3)
        controller.net.head.bias.fill_(0.1)
    return controller


def _spec(steps: int = 40):
    spec = create_task_family("digits_mlp").sample(torch.Generator().manual_seed(2))
    return spec.replace(steps=steps, optimizer="momentum", base_lr=0.05)


def test_extra_features_are_measured_when_the_spec_enables_them() -> None:
    controller = _controller(EXTRA)
    run = start_run(build_task(_spec()), controller, valid_batch_size=32, dtype=torch.float64)
    assert run.inner_valid_stream is not None
    result = unroll(controller, run, 12, differentiable=False, valid_every=5)
    state = result.run.policy.features
    assert float(state.valid_gap) != 0.0, "inner_valid measured: the gap feature moved"
    assert 0.0 < float(state.entropy) <= 1.0, "normalised predictive entropy of a 10-class softmax"
    # inner_valid is drawn every valid_every steps: at steps 0, 5, 10.
    assert result.run.inner_valid_stream.position == 3


def test_ablated_controller_skips_the_extra_measurements() -> None:
    controller = _controller(DEFAULT_GROUPS)
    run = start_run(build_task(_spec()), controller)
    assert run.inner_valid_stream is None
    result = unroll(controller, run, 5, differentiable=False)
    assert float(result.run.policy.features.valid_gap) == 0.0
    assert float(result.run.policy.features.entropy) == 0.0


def test_meta_gradient_through_the_validation_feature_matches_finite_differences() -> None:
    controller = _controller(EXTRA)
    run = start_run(build_task(_spec()), controller, valid_batch_size=32, dtype=torch.float64)
    run = unroll(controller, run, 4, differentiable=False, valid_every=2).run

    def meta_loss() -> torch.Tensor:
        return unroll(controller, run, 6, differentiable=True, valid_every=2).meta_loss

    params = list(controller.parameters())
    grads = torch.autograd.grad(meta_loss(), params)
    direction = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(i), dtype=p.dtype)
        for i, p in enumerate(params)
    ]
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))
    eps = 1e-6
    with torch.no_grad():
        torch._foreach_add_(params, direction, alpha=eps)
        plus = float(meta_loss())
        torch._foreach_add_(params, direction, alpha=-2 * eps)
        minus = float(meta_loss())
        torch._foreach_add_(params, direction, alpha=eps)
    numeric = (plus - minus) / (2 * eps)
    assert abs(analytic) > 1e-6
    assert abs(analytic - numeric) / abs(numeric) < 1e-4, (analytic, numeric)
