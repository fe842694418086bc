"""The ``higher`` backend gives the native backend's meta-gradient (float64, to 1e-6) on SGD, momentum and
Adam inner loops, across a truncation boundary (optimizer state converted both ways)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("higher")

from metalr.config import MetaConfig, MetaTrainConfig, build_config  # noqa: E402
from metalr.controller import LRController  # noqa: E402
from metalr.features import DEFAULT_GROUPS, FeatureSpec  # noqa: E402
from metalr.meta.estimators import create_estimator  # noqa: E402
from metalr.meta.higher_backend import HIGHER, HigherBackendError, higher_unroll  # noqa: E402
from metalr.meta.trainer import meta_train  # noqa: E402
from metalr.meta.unroll import start_run, unroll  # noqa: E402
from metalr.tasks import build_task, create_task_family  # noqa: E402


def _controller() -> LRController:
    torch.manual_seed(0)
    spec = FeatureSpec(groups=(*DEFAULT_GROUPS, "validation", "uncertainty", "resource"))
    controller = LRController(spec).double()
    with torch.no_grad():
        controller.net.head.weight.normal_(0, 0.3)
        controller.net.head.bias.fill_(0.1)
    return controller


def _run(controller: LRController, optimizer: str):
    spec = create_task_family("wine_mlp").sample(torch.Generator().manual_seed(1))
    spec = spec.replace(steps=30, optimizer=optimizer, base_lr=0.01 if optimizer.startswith("adam") else 0.1)
    run = start_run(build_task(spec), controller, valid_batch_size=16, dtype=torch.float64)
    return unroll(
        controller, run, 3, differentiable=False
    ).run  # mid-training: optimizer state is non-trivial


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_higher_and_native_meta_gradients_agree(optimizer: str) -> None:
    controller = _controller()
    start = _run(controller, optimizer)
    params = list(controller.parameters())
    results = {}
    for name, unroll_fn in (("native", unroll), ("higher", higher_unroll)):
        first = unroll_fn(controller, start, 6, differentiable=True, valid_every=2)
        grads_first = torch.autograd.grad(first.meta_loss, params)
        second = unroll_fn(controller, first.run.detached(), 4, differentiable=True, valid_every=2)
        grads_second = torch.autograd.grad(second.meta_loss, params)
        results[name] = (first, second, grads_first, grads_second)
    native, high = results["native"], results["higher"]
    for k in (2, 3):
        flat_native = torch.cat([g.flatten() for g in native[k]])
        flat_higher = torch.cat([g.flatten() for g in high[k]])
        assert float(flat_native.abs().max()) > 1e-4, "the meta-gradient must not be trivially zero"
        torch.testing.assert_close(flat_higher, flat_native, rtol=1e-6, atol=1e-9)
    assert native[1].lrs == pytest.approx(high[1].lrs, rel=1e-12)
    for a, b in zip(native[1].run.opt_state, high[1].run.opt_state, strict=True):
        torch.testing.assert_close(a.detach().to(b.dtype), b.detach(), rtol=1e-10, atol=1e-12)


def test_higher_backend_has_no_adamw_and_says_so() -> None:
    controller = _controller()
    start = _run(controller, "adamw")
    with pytest.raises(HigherBackendError, match="higher lacks AdamW"):
        higher_unroll(controller, start, 3)


def test_meta_training_with_the_higher_backend(tmp_path) -> None:
    config = build_config(
        MetaTrainConfig,
        {
            "name": "h",
            "seed": 1,
            "meta": {
                "backend": "higher",
                "meta_steps": 2,
                "meta_batch": 2,
                "unroll_length": 3,
                "checkpoint_every": 0,
                "state_every": 0,
            },
        },
    )
    controller = meta_train(config, tmp_path, progress=False)
    assert (tmp_path / "final.safetensors").exists()
    assert all(torch.isfinite(p).all() for p in controller.parameters())
    assert create_estimator(MetaConfig(backend="higher")).backend is HIGHER
