"""Every registered family samples serialisable specs, builds them deterministically and trains a step."""

from __future__ import annotations

import json

import pytest
import torch

from metalr.tasks import SPLITS, TaskSpec, build_task, create_task_family, list_task_families
from metalr.tasks.embedded import FRACTIONS

EMBEDDED = [
    "digits_mlp",
    "breast_cancer_mlp",
    "wine_mlp",
    "iris_mlp",
    "noisy_quadratic",
    "linear_regression",
    "logistic_regression",
    "teacher_student",
]


def test_embedded_families_are_registered() -> None:
    assert set(EMBEDDED) <= set(list_task_families())


@pytest.mark.parametrize("name", EMBEDDED)
def test_family_samples_builds_and_trains(name: str) -> None:
    family = create_task_family(name)
    spec = family.sample(torch.Generator().manual_seed(0))
    assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    task = build_task(spec)
    assert set(task.splits) == set(SPLITS)
    batch = next(task.batches("train"))
    loss = task.loss(task.model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in task.model.parameters())
    metrics = task.evaluate(task.model, "test")
    assert "loss" in metrics and all(v == v for v in metrics.values())
    if task.num_classes:
        assert 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("name", EMBEDDED)
def test_same_spec_builds_the_same_task(name: str) -> None:
    spec = create_task_family(name).sample(torch.Generator().manual_seed(5))
    a, b = build_task(spec), build_task(spec)
    for (_, pa), (_, pb) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(pa, pb)
    for split in SPLITS:
        for column in a.splits[split]:
            assert torch.equal(a.splits[split][column], b.splits[split][column])


def test_test_split_is_fixed_across_task_seeds_and_disjoint_from_training() -> None:
    family = create_task_family("digits_mlp")
    g = torch.Generator().manual_seed(1)
    a, b = build_task(family.sample(g)), build_task(family.sample(g))
    assert torch.equal(a.splits["test"]["y"], b.splits["test"]["y"])
    n = sum(len(a.splits[s]["y"]) for s in SPLITS)
    assert len(a.splits["test"]["y"]) == round(n * FRACTIONS["test"]) or a.spec.options["train_fraction"] < 1


def test_label_noise_touches_only_the_training_split() -> None:
    family = create_task_family("wine_mlp", max_label_noise=0.5)
    spec = family.sample(torch.Generator().manual_seed(0))
    noisy = build_task(spec.replace(options={**spec.options, "label_noise": 0.5}))
    clean = build_task(spec.replace(options={**spec.options, "label_noise": 0.0}))
    assert torch.equal(noisy.splits["inner_valid"]["y"], clean.splits["inner_valid"]["y"])
    assert not torch.equal(noisy.splits["train"]["y"], clean.splits["train"]["y"])


def test_batch_stream_is_a_function_of_seed_and_position() -> None:
    task = build_task(create_task_family("iris_mlp").sample(torch.Generator().manual_seed(0)))
    first = task.batches("train")
    batches = [next(first) for _ in range(7)]
    resumed = task.batches("train")
    resumed.position = 4
    assert torch.equal(next(resumed)["x"], batches[4]["x"])


def test_sampling_overrides_are_validated() -> None:
    with pytest.raises(ValueError, match="optimizers must be a non-empty subset"):
        create_task_family("digits_mlp", optimizers=["lbfgs"])
    family = create_task_family("digits_mlp", steps=[50, 50], optimizers=["adam"], batch_sizes=[8])
    spec = family.sample(torch.Generator().manual_seed(0))
    assert (spec.steps, spec.optimizer, spec.batch_size) == (50, "adam", 8)
