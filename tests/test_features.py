"""The one feature function (format 2): shapes, normalisation bounds, and that each feature measures what it says,
checked against hand-computed values on problems where the answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from metalr.features import (
    FEATURE_GROUPS,
    FeatureSpec,
    FeatureState,
    Observation,
    compute_features,
    init_feature_state,
    predictive_entropy,
)

ALL = FeatureSpec(groups=tuple(FEATURE_GROUPS))


class Trainer:
    """Feeds compute_features the observations of a hand-driven training run (one tensor of parameters)."""

    def __init__(self, params: torch.Tensor, spec: FeatureSpec = ALL, total: int = 100) -> None:
        self.spec, self.total = spec, total
        self.params = params
        self.prev_update: tuple[torch.Tensor, ...] = (torch.zeros_like(params),)
        self.state: FeatureState = init_feature_state(spec, [params])

    def step(self, loss: float, grad: torch.Tensor, new_params: torch.Tensor, lr: float = 0.1, **extra: torch.Tensor) -> torch.Tensor:
        obs, update = Observation.of_step(
            torch.tensor(loss, dtype=self.params.dtype),
            [grad],
            [self.params],
            [new_params],
            self.prev_update,
            lr=torch.tensor(lr),
            lr_rel=torch.tensor(1.0),
            total_steps=torch.tensor(float(self.total)),
            **extra,
        )
        features, self.state = compute_features(self.spec, self.state, obs)
        self.params, self.prev_update = new_params, update
        return features

    def value(self, features: torch.Tensor, name: str) -> float:
        return float(features[self.spec.names.index(name)])


def _gradient_descent(h: float, lr: float, steps: int) -> tuple[Trainer, torch.Tensor]:
    """Gradient descent on 0.5 * h * |x|^2 from x = (1, -2), in float64."""
    trainer = Trainer(torch.tensor([1.0, -2.0], dtype=torch.float64))
    features = torch.zeros(ALL.dim)
    for _ in range(steps):
        x = trainer.params
        g = h * x
        features = trainer.step(float(0.5 * h * (x**2).sum()), g, x - lr * g, lr=lr)
    return trainer, features


def test_names_follow_canonical_group_order_and_ablation() -> None:
    spec = FeatureSpec(groups=("progress", "loss"))
    assert spec.names == FEATURE_GROUPS["loss"] + FEATURE_GROUPS["progress"]
    assert spec.dim == 7
    assert FeatureSpec.from_dict(spec.to_dict()) == spec


def test_spec_rejects_unknown_groups_with_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown feature group\(s\) \['nope'\]; expected a subset of"):
        FeatureSpec(groups=("loss", "nope"))


def test_a_format_1_spec_is_refused_naming_the_feature_format() -> None:
    old = {**FeatureSpec().to_dict(), "format": 1, "groups": ["loss", "variance"]}
    with pytest.raises(ValueError, match=r"meta-trained on feature format 1; .* computes feature format 2"):
        FeatureSpec.from_dict(old)


def test_feature_state_holds_no_parameter_sized_tensor() -> None:
    state = init_feature_state(ALL, [torch.zeros(1000), torch.zeros(50, 50)])
    assert all(t.numel() <= 3 for t in state), "the state must be scalars (deployment memory <= 1x the model)"


@pytest.mark.parametrize("loss", [0.0, 1e-30, 1e30, float("nan"), float("inf"), -1.0])
@pytest.mark.parametrize("grad_scale", [0.0, 1e-30, 1e30, float("nan"), float("inf")])
def test_features_are_finite_and_clipped_for_extreme_inputs(loss: float, grad_scale: float) -> None:
    trainer = Trainer(torch.ones(5))
    for step in range(4):
        grad = torch.full((5,), grad_scale)
        features = trainer.step(loss, grad, trainer.params - 0.1 * (step + 1) * grad)
        assert features.shape == (ALL.dim,)
        assert torch.isfinite(features).all()
        assert features.abs().max() <= ALL.clip
    assert all(torch.isfinite(t).all() for t in trainer.state)


def test_non_finite_loss_raises_the_alarm_and_leaves_statistics_untouched() -> None:
    trainer = Trainer(torch.zeros(4))
    trainer.step(1.0, torch.ones(4), trainer.params - 0.1)
    before = trainer.state
    trainer.step(float("nan"), torch.ones(4), trainer.params - 0.1)
    assert float(trainer.state.alarm) == 1.0
    for name in ("loss_ema", "log_grad_norm_ema", "grad_sq_sum", "distance", "alignment_ema"):
        assert torch.equal(getattr(trainer.state, name), getattr(before, name)), name


def test_an_inf_gradient_raises_the_alarm_and_the_next_step_reads_no_stale_update() -> None:
    trainer = Trainer(torch.zeros(4))
    trainer.step(1.0, torch.ones(4), trainer.params - 0.1)
    trainer.step(1.0, torch.full((4,), math.inf), trainer.params - math.inf)
    assert float(trainer.state.alarm) == 1.0
    features = trainer.step(1.0, torch.ones(4), torch.zeros(4))
    assert trainer.value(features, "update_alignment") == 0.0  # the update of the inf step is not used
    assert float(trainer.state.alarm) == 0.0


def test_loss_spike_raises_the_alarm() -> None:
    trainer = Trainer(torch.zeros(4))
    for _ in range(5):
        trainer.step(1.0, torch.ones(4), trainer.params)
    assert float(trainer.state.alarm) == 0.0
    trainer.step(ALL.guard_ratio * 1.5, torch.ones(4), trainer.params)
    assert float(trainer.state.alarm) == 1.0


@pytest.mark.parametrize("lr", [0.05, 0.3, 0.45, 0.6])
def test_lr_curvature_is_lr_times_the_curvature_on_a_quadratic(lr: float) -> None:
    """Gradient descent on 0.5*h*|x|^2: g_{t+1} = (1 - lr h) g_t, so the secant estimate is exactly lr * h."""
    h = 4.0
    trainer, features = _gradient_descent(h, lr, steps=4)
    assert trainer.value(features, "lr_curvature") == pytest.approx(lr * h, rel=1e-9)
    # Under-stepping (lr h < 1): the new gradient still points along the last update; overshooting: against it.
    assert trainer.value(features, "update_alignment") == pytest.approx(1.0 if lr * h < 1 else -1.0)


def test_alignment_ema_averages_the_cosines() -> None:
    trainer, features = _gradient_descent(4.0, 0.6, steps=6)  # overshooting every step: cosine -1
    assert trainer.value(features, "update_alignment_ema") == pytest.approx(-1.0)


def test_dog_ratio_compares_the_lr_with_dogs_step_size() -> None:
    """Constant gradient norm G and LR: distance = t lr G, sqrt(sum |g|^2) = sqrt(t) G, DoG step = sqrt(t) lr."""
    trainer = Trainer(torch.zeros(4, dtype=torch.float64))
    grad = torch.full((4,), 0.5, dtype=torch.float64)
    lr = 0.02
    for _ in range(9):
        features = trainer.step(1.0, grad, trainer.params - lr * grad, lr=lr)
    assert trainer.value(features, "log_dog_ratio") == pytest.approx(-0.5 * math.log10(9), rel=1e-6)


def test_progress_and_update_ratio_are_measured() -> None:
    trainer = Trainer(torch.ones(10), total=4)
    p1 = trainer.params - 0.01
    features = trainer.step(1.0, torch.ones(10), p1)
    assert trainer.value(features, "progress") == pytest.approx(0.25)
    assert trainer.value(features, "tanh_steps_10") == pytest.approx(math.tanh(0.1))
    ratio = math.log10(0.01 * math.sqrt(10) / float(p1.norm()))
    assert trainer.value(features, "log_update_ratio") == pytest.approx(ratio + 3.0 / math.log(10), abs=1e-4)


def test_loss_and_gradient_levels_are_relative_to_the_first_step() -> None:
    trainer = Trainer(torch.zeros(3))
    trainer.step(2.0, torch.full((3,), 1.0), trainer.params)
    features = trainer.step(0.2, torch.full((3,), 0.1), trainer.params)
    assert trainer.value(features, "log_loss_rel") == pytest.approx(-1.0, abs=1e-6)  # one decade down
    assert trainer.value(features, "log_grad_norm_rel") == pytest.approx(-1.0, abs=1e-6)


def test_validation_and_uncertainty_features_hold_their_last_measurement() -> None:
    trainer = Trainer(torch.zeros(2))
    f = trainer.step(1.0, torch.ones(2), trainer.params, valid_loss=torch.tensor(1.1), entropy=torch.tensor(0.5))
    f2 = trainer.step(1.0, torch.ones(2), trainer.params)
    assert trainer.value(f, "predictive_entropy") == trainer.value(f2, "predictive_entropy") == pytest.approx(0.5)
    assert trainer.value(f2, "log_valid_gap") == pytest.approx(trainer.value(f, "log_valid_gap"))
    assert trainer.value(f, "log_valid_gap") == pytest.approx(10 * math.log(1.1), rel=1e-4)


def test_predictive_entropy_is_normalised() -> None:
    assert float(predictive_entropy(torch.zeros(4, 10))) == pytest.approx(1.0)
    assert float(predictive_entropy(torch.tensor([[100.0, 0.0, 0.0]]))) == pytest.approx(0.0, abs=1e-6)


def test_features_are_differentiable_through_the_inputs() -> None:
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    trainer = Trainer(x.detach())
    trainer.step(float((x**2).sum()), 2 * x.detach(), x.detach() * 0.8)
    loss = (x**2).sum()
    (g,) = torch.autograd.grad(loss, [x], create_graph=True)
    trainer.params = x
    features = trainer.step(1.0, g, x - 0.1 * g)
    (grad,) = torch.autograd.grad(features.sum(), [x])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_features_vectorise_over_particles() -> None:
    """vmap over a batch of observations gives what a loop over them gives (the ES/PES engine relies on it)."""
    generator = torch.Generator().manual_seed(0)
    states, observations = [], []
    for _ in range(3):
        trainer = Trainer(torch.randn(6, generator=generator))
        for _ in range(3):
            grad = torch.randn(6, generator=generator)
            trainer.step(float(torch.rand((), generator=generator)) + 0.5, grad, trainer.params - 0.1 * grad)
        grad = torch.randn(6, generator=generator)
        obs, _ = Observation.of_step(
            torch.tensor(1.0), [grad], [trainer.params], [trainer.params - 0.1 * grad], trainer.prev_update,
            lr=torch.tensor(0.1), lr_rel=torch.tensor(1.0), total_steps=torch.tensor(100.0),
        )
        states.append(trainer.state)
        observations.append(obs)
    stack = lambda items: torch.utils._pytree.tree_map(lambda *leaves: torch.stack(leaves), *items)  # noqa: E731
    batched, _ = torch.func.vmap(lambda s, o: compute_features(ALL, s, o))(stack(states), stack(observations))
    looped = torch.stack([compute_features(ALL, s, o)[0] for s, o in zip(states, observations, strict=True)])
    torch.testing.assert_close(batched, looped)
