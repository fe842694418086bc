"""The controller's policy: untrained = base schedule, bounded LRs whatever the network says, guardrail."""

from __future__ import annotations

import math

import pytest
import torch

from metalr.controller import ArchConfig, LRController, PolicyConfig
from metalr.features import Observation


def _obs(loss: float, params) -> Observation:
    grads = [torch.ones_like(p) for p in params]
    obs, _ = Observation.of_step(
        torch.tensor(loss), grads, params, params, tuple(torch.zeros_like(p) for p in params),
        lr=torch.tensor(0.1), lr_rel=torch.tensor(1.0), total_steps=torch.tensor(100.0),
    )
    return obs


@pytest.mark.parametrize("kind,hidden", [("mlp", (64, 32)), ("lstm", (32,))])
def test_untrained_controller_keeps_the_base_lr(kind: str, hidden: tuple[int, ...]) -> None:
    controller = LRController(arch=ArchConfig(kind, hidden))
    params = [torch.zeros(3)]
    state = controller.init(params)
    for i in range(10):
        log_factor, state = controller.step(state, _obs(1.0 / (i + 1), params))
        assert float(log_factor) == 0.0


def test_default_architecture_is_64_32() -> None:
    net = LRController().net
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [64, 32, 1]


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_per_step_change_and_factor_are_bounded_for_any_network_output(sign: float) -> None:
    policy = PolicyConfig(max_log_step=0.1, min_factor=1e-2, max_factor=10.0)
    controller = LRController(policy=policy)
    with torch.no_grad():
        controller.net.head.bias.fill_(sign * 1e6)  # saturate the output
    params = [torch.zeros(3)]
    state = controller.init(params)
    previous = 0.0
    for _ in range(100):
        log_factor, state = controller.step(state, _obs(1.0, params))
        assert abs(float(log_factor) - previous) <= 0.1 + 1e-6
        assert math.log(1e-2) - 1e-6 <= float(log_factor) <= math.log(10.0) + 1e-6
        previous = float(log_factor)
    assert previous == pytest.approx(sign * math.log(10.0) if sign > 0 else math.log(1e-2), abs=1e-5)


def test_guardrail_cuts_the_lr_at_once_when_the_loss_explodes() -> None:
    controller = LRController(policy=PolicyConfig(guard_cut=10.0))
    params = [torch.zeros(3)]
    state = controller.init(params)
    for _ in range(5):
        log_factor, state = controller.step(state, _obs(1.0, params))
    log_factor, state = controller.step(state, _obs(1e6, params))
    assert float(log_factor) == pytest.approx(-math.log(10.0), abs=1e-6)
    log_factor, state = controller.step(state, _obs(float("inf"), params))
    assert float(log_factor) == pytest.approx(-2 * math.log(10.0), abs=1e-6)


def test_cosine_base_schedule() -> None:
    policy = PolicyConfig(base_schedule="cosine")
    scale = policy.lr_scale(torch.tensor(0.0), 50.0, 100.0)
    assert float(scale) == pytest.approx(0.5)
    assert float(policy.clamp_lr(torch.tensor(0.0))) == pytest.approx(policy.min_lr)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_lr": 0.0}, "need 0 < min_lr < max_lr"),
        ({"min_factor": 2.0}, "min_factor <= 1 <= max_factor"),
        ({"base_schedule": "linear"}, "unknown base_schedule 'linear'"),
        ({"guard_cut": 0.5}, "guard_cut must be >= 1"),
    ],
)
def test_policy_config_errors_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PolicyConfig(**kwargs)


def test_lstm_controller_computes_what_nn_lstmcell_computes() -> None:
    """The LSTM body writes the cell's equations out (vmap has no lstm_cell rule): same weights, same result."""
    from metalr.controller import LSTMNet

    torch.manual_seed(0)
    net = LSTMNet(6, (8,))
    features, hidden = torch.randn(6), torch.randn(2, 8)
    _, new_hidden = net(features, hidden)
    h, c = net.cell(features.unsqueeze(0), (hidden[0:1], hidden[1:2]))
    torch.testing.assert_close(new_hidden, torch.cat([h, c]))
