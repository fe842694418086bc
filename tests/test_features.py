"""The one feature function: shapes, normalisation bounds, and that each feature measures what it says."""

from __future__ import annotations

import math

import pytest
import torch

from metalr.features import (
    FEATURE_GROUPS,
    FeatureSpec,
    Observation,
    compute_features,
    init_feature_state,
    predictive_entropy,
)

NAN = torch.tensor(float("nan"))
ALL = FeatureSpec(groups=tuple(FEATURE_GROUPS))


def _obs(loss: float, grads, params, lr: float = 0.1, total: int = 100, **extra) -> Observation:
    return Observation(
        loss=torch.tensor(loss),
        grads=grads,
        params=params,
        lr=torch.tensor(lr),
        lr_rel=torch.tensor(1.0),
        total_steps=torch.tensor(float(total)),
        valid_loss=extra.get("valid_loss", NAN),
        entropy=extra.get("entropy", NAN),
        budget_used=extra.get("budget_used", NAN),
    )


def _value(spec: FeatureSpec, features: torch.Tensor, name: str) -> float:
    return float(features[spec.names.index(name)])


def test_names_follow_canonical_group_order_and_ablation() -> None:
    spec = FeatureSpec(groups=("progress", "loss"))
    assert spec.names == FEATURE_GROUPS["loss"] + FEATURE_GROUPS["progress"]
    assert spec.dim == 7
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_spec_rejects_unknown_groups_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown feature group\(s\) \['nope'\]; expected a subset of"):
        FeatureSpec(groups=("loss", "nope"))


@pytest.mark.parametrize("loss", [0.0, 1e-30, 1e30, float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("grad_scale", [0.0, 1e-30, 1e30, float("nan"), float("inf")])
def test_features_are_finite_and_clipped_for_extreme_inputs(loss: float, grad_scale: float) -> None:
    params = [torch.ones(3), torch.ones(2, 2)]
    state = init_feature_state(ALL, params)
    for step in range(3):
        grads = [torch.full_like(p, grad_scale) for p in params]
        new_params = [p - 0.1 * (step + 1) for p in params]
        features, state = compute_features(ALL, state, _obs(loss, grads, new_params))
        assert features.shape == (ALL.dim,)
        assert torch.isfinite(features).all()
        assert features.abs().max() <= ALL.clip
    assert torch.isfinite(state.loss_ema).all()


def test_non_finite_loss_raises_the_alarm_and_leaves_statistics_untouched() -> None:
    params = [torch.zeros(4)]
    state = init_feature_state(ALL, params)
    _, state = compute_features(ALL, state, _obs(1.0, [torch.ones(4)], params))
    before = state.loss_ema.clone()
    _, state = compute_features(ALL, state, _obs(float("nan"), [torch.ones(4)], params))
    assert float(state.alarm) == 1.0
    assert torch.equal(state.loss_ema, before)


def test_loss_spike_raises_the_alarm() -> None:
    params = [torch.zeros(4)]
    state = init_feature_state(ALL, params)
    for _ in range(5):
        _, state = compute_features(ALL, state, _obs(1.0, [torch.ones(4)], params))
    assert float(state.alarm) == 0.0
    _, state = compute_features(ALL, state, _obs(1.0 * ALL.guard_ratio * 1.5, [torch.ones(4)], params))
    assert float(state.alarm) == 1.0


def test_gradient_noise_fraction_separates_signal_from_noise() -> None:
    generator = torch.Generator().manual_seed(0)
    params = [torch.zeros(1000)]
    constant = init_feature_state(ALL, params)
    noisy = init_feature_state(ALL, params)
    g = torch.randn(1000, generator=generator)
    for _ in range(200):
        f_const, constant = compute_features(ALL, constant, _obs(1.0, [g], params))
        f_noisy, noisy = compute_features(ALL, noisy, _obs(1.0, [torch.randn(1000, generator=generator)], params))
    assert _value(ALL, f_const, "grad_noise_fraction") < 0.01
    assert _value(ALL, f_noisy, "grad_noise_fraction") > 0.9


def test_stability_feature_recovers_lr_times_curvature_on_a_quadratic() -> None:
    """Gradient descent on 0.5*h*x^2: the secant curvature is exactly h, so the feature is log10(lr*h)."""
    h, lr = 4.0, 0.3
    x = torch.tensor([1.0, -2.0])
    state = init_feature_state(ALL, [x])
    for _ in range(3):
        g = h * x
        x = x - lr * g
        features, state = compute_features(ALL, state, _obs(float(0.5 * h * (x**2).sum()), [g], [x], lr=lr))
    assert _value(ALL, features, "log_lr_curvature") == pytest.approx(math.log10(lr * h), abs=1e-5)


def test_progress_and_update_ratio_are_measured() -> None:
    p0 = torch.ones(10)
    state = init_feature_state(ALL, [p0])
    p1 = p0 - 0.01
    features, state = compute_features(ALL, state, _obs(1.0, [torch.ones(10)], [p1], total=4))
    assert _value(ALL, features, "progress") == pytest.approx(0.25)
    assert _value(ALL, features, "tanh_steps_10") == pytest.approx(math.tanh(0.1))
    ratio = math.log10(0.01 * math.sqrt(10) / float(p1.norm()))
    assert _value(ALL, features, "log_update_ratio") == pytest.approx(ratio + 3.0 / math.log(10), abs=1e-4)


def test_validation_and_uncertainty_features_hold_their_last_measurement() -> None:
    params = [torch.zeros(2)]
    state = init_feature_state(ALL, params)
    f, state = compute_features(ALL, state, _obs(1.0, [torch.ones(2)], params, valid_loss=torch.tensor(1.1), entropy=torch.tensor(0.5)))
    f2, state = compute_features(ALL, state, _obs(1.0, [torch.ones(2)], params))
    assert _value(ALL, f, "predictive_entropy") == _value(ALL, f2, "predictive_entropy") == pytest.approx(0.5)
    assert _value(ALL, f2, "log_valid_gap") == pytest.approx(_value(ALL, f, "log_valid_gap"))
    assert _value(ALL, f, "log_valid_gap") == pytest.approx(10 * math.log(1.1), rel=1e-4)


def test_predictive_entropy_is_normalised() -> None:
    assert float(predictive_entropy(torch.zeros(4, 10))) == pytest.approx(1.0)
    assert float(predictive_entropy(torch.tensor([[100.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_features_are_differentiable_through_the_inputs() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    loss = (x**2).sum()
    (g,) = torch.autograd.grad(loss, [x], create_graph=True)
    state = init_feature_state(ALL, [x.detach()])
    features, _ = compute_features(ALL, state, _obs(1.0, [g], [x - 0.1 * g]))._replace() if False else compute_features(ALL, state, Observation(loss, [g], [x - 0.1 * g], torch.tensor(0.1, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64), torch.tensor(10.0), NAN, NAN, NAN))
    (grad,) = torch.autograd.grad(features.sum(), [x])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
