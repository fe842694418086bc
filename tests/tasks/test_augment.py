"""Task augmentation (metalr.tasks.augment): each augmentation does to training what its docstring says,
it travels in the spec, only the meta-training sampler draws it, and augmented populations meta-train."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from metalr.config import AugmentConfig, ConfigError, FamilyEntry, MetaTrainConfig, build_config
from metalr.meta.pool import TaskSampler
from metalr.tasks import TaskSpec, build_task, create_task_family
from metalr.tasks.augment import Augmentation, Reparameterized


def _spec(**options: object) -> TaskSpec:
    spec = create_task_family("digits_mlp").sample(torch.Generator().manual_seed(3))
    return spec.replace(optimizer="sgd", base_lr=0.1, options={**spec.options, "label_noise": 0.0, **options})


def _loss_and_grads(task, batch):  # type: ignore[no-untyped-def]
    loss = task.loss(task.model, batch)
    return loss, torch.autograd.grad(loss, list(task.model.parameters()))


def test_param_scale_keeps_the_function_and_scales_an_sgd_step_by_its_square() -> None:
    plain_spec = _spec()
    plain, scaled = build_task(plain_spec), build_task(Augmentation(param_scale=4.0).on(plain_spec))
    assert isinstance(scaled.model, Reparameterized)
    batch = next(plain.batches("train"))
    plain_loss, plain_grads = _loss_and_grads(plain, batch)
    scaled_loss, scaled_grads = _loss_and_grads(scaled, batch)
    torch.testing.assert_close(scaled_loss, plain_loss)  # same initial function
    for g_theta, g_phi in zip(plain_grads, scaled_grads, strict=True):
        torch.testing.assert_close(g_phi, 4.0 * g_theta)  # d/d phi = s d/d theta
    # One SGD step at lr on phi moves theta = s phi as an SGD step at s^2 lr moves theta.
    for task, lr in ((scaled, 0.01), (plain, 0.16)):
        optimizer = torch.optim.SGD(task.model.parameters(), lr=lr)
        task.loss(task.model, batch).backward()
        optimizer.step()
    for (key, phi), theta in zip(scaled.model.named_parameters(), plain.model.parameters(), strict=True):
        assert scaled.model.theta_names[key] in dict(plain.model.named_parameters())
        torch.testing.assert_close(4.0 * phi, theta)
    scaled.model.to(torch.float64)  # the wrapped model's tensors follow phi's dtype
    assert {p.dtype for p in scaled.model.inner.parameters()} == {torch.float64}
    assert scaled.model(batch["x"].double()).dtype == torch.float64


def test_loss_scale_multiplies_the_training_loss() -> None:
    plain_spec = _spec()
    plain, scaled = build_task(plain_spec), build_task(Augmentation(loss_scale=0.25).on(plain_spec))
    batch = next(plain.batches("train"))
    torch.testing.assert_close(scaled.loss(scaled.model, batch), 0.25 * plain.loss(plain.model, batch))
    assert not isinstance(scaled.model, Reparameterized)


def test_label_noise_redraws_training_labels_only_and_is_seeded_by_the_task() -> None:
    plain_spec = _spec()
    augmented_spec = Augmentation(label_noise=0.5).on(plain_spec)
    plain, noisy, again = build_task(plain_spec), build_task(augmented_spec), build_task(augmented_spec)
    changed = (noisy.splits["train"]["y"] != plain.splits["train"]["y"]).float().mean().item()
    assert 0.3 < changed < 0.6  # half redrawn, of which 1 in 10 lands on its own digit again
    torch.testing.assert_close(noisy.splits["train"]["y"], again.splits["train"]["y"])
    for split in ("inner_valid", "outer_valid", "test"):
        torch.testing.assert_close(noisy.splits[split]["y"], plain.splits[split]["y"])
    quadratic = create_task_family("noisy_quadratic").sample(torch.Generator().manual_seed(0))
    assert build_task(Augmentation(label_noise=0.5).on(quadratic)).num_classes is None  # no labels: untouched


def test_the_spec_carries_its_augmentation_and_an_identity_changes_nothing() -> None:
    spec = _spec()
    augmented = Augmentation(param_scale=2.0, loss_scale=3.0).on(spec)
    task = build_task(TaskSpec.from_dict(augmented.to_dict()))
    assert task.spec == augmented and Augmentation.of(task.spec) == Augmentation(2.0, 3.0, 0.0)
    assert Augmentation.of(spec) == Augmentation()
    plain, identity = build_task(spec), build_task(Augmentation().on(spec))
    batch = next(plain.batches("train"))
    assert not isinstance(identity.model, Reparameterized)
    torch.testing.assert_close(identity.loss(identity.model, batch), plain.loss(plain.model, batch))
    torch.testing.assert_close(identity.splits["train"]["y"], plain.splits["train"]["y"])
    with pytest.raises(ValueError, match="param_scale > 0"):
        Augmentation(param_scale=0.0)
    with pytest.raises(ValueError, match="label_noise"):
        Augmentation(label_noise=1.0)


def test_the_sampler_draws_one_augmentation_per_population_within_the_ranges() -> None:
    entries = (FamilyEntry("digits_mlp"), FamilyEntry("noisy_quadratic"))
    ranges = AugmentConfig(param_scale=(0.5, 2.0), loss_scale=(0.1, 10.0), label_noise=(0.0, 0.2))
    sampler = TaskSampler(entries, seed=1, augment=ranges)
    draws = []
    for _ in range(6):
        population = sampler.next_population(3)
        augmentations = {Augmentation.of(s) for s in population}
        assert len(augmentations) == 1 and len({s.seed for s in population}) == 3
        draws.append(augmentations.pop())
    for a in draws:
        assert 0.5 <= a.param_scale <= 2.0 and 0.1 <= a.loss_scale <= 10.0 and 0.0 <= a.label_noise <= 0.2
    assert len({a.param_scale for a in draws}) == 6
    # The identity config draws nothing: the same specs as a sampler without augmentation.
    plain, identity = TaskSampler(entries, seed=1), TaskSampler(entries, seed=1, augment=AugmentConfig())
    assert [plain.next_population(2) for _ in range(3)] == [identity.next_population(2) for _ in range(3)]


def test_augment_ranges_are_checked_when_the_recipe_loads() -> None:
    with pytest.raises(ConfigError, match=r"augment.param_scale must be a \[low, high\] pair"):
        build_config(MetaTrainConfig, {"name": "x", "augment": {"param_scale": [2.0, 1.0]}})
    with pytest.raises(ConfigError, match="label_noise must lie in"):
        build_config(MetaTrainConfig, {"name": "x", "augment": {"label_noise": [0.0, 1.5]}})
    with pytest.raises(ConfigError, match="unknown"):
        build_config(MetaTrainConfig, {"name": "x", "augment": {"grad_noise": [0.0, 1.0]}})


def test_augmented_populations_meta_train_and_validation_tasks_stay_plain(tmp_path: Path) -> None:
    from metalr.meta.trainer import MetaTrainer

    config = build_config(
        MetaTrainConfig,
        {
            "name": "aug",
            "seed": 2,
            "train_overrides": {"steps": [10, 14]},
            "augment": {"param_scale": [0.3, 3.0], "loss_scale": [0.1, 10.0], "label_noise": [0.0, 0.2]},
            "meta": {"estimator": "pes", "es_pairs": 2, "population": 2, "meta_batch": 4, "meta_steps": 2,
                     "unroll_length": 4, "checkpoint_every": 0, "log_every": 1, "state_every": 0},
        },
    )
    trainer = MetaTrainer(config, tmp_path, progress=False)
    specs = [r.task.spec for r in trainer.pool.runs if r is not None]
    assert all(Augmentation.of(s) != Augmentation() for s in specs)
    assert trainer.valid_specs and all(Augmentation.of(s) == Augmentation() for s in trainer.valid_specs)
    before = [p.detach().clone() for p in trainer.controller.parameters()]
    trainer.train()
    after = list(trainer.controller.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert all(math.isfinite(p.sum().item()) for p in after)
