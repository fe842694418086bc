"""The learning-rate controller: features -> bounded change of log LR.

An :class:`LRController` owns three things that together define an LR policy and that all go into the
checkpoint: the :class:`~metalr.features.FeatureSpec` it reads, a :class:`PolicyConfig` (LR bounds, base
schedule, guardrail) and the network (``mlp`` [64, 32] by default, or a recurrent ``lstm`` variant).

The policy, per step ``t`` (identical in meta-training and deployment)::

    features, fstate   = compute_features(spec, fstate, observation_t)
    u, hidden          = net(features, hidden)
    log_factor_{t+1}   = clamp(log_factor_t + max_log_step * tanh(u), log(min_factor), log(max_factor))
                         - log(guard_cut) if the step diverged (alarm)
    lr_{t+1}           = clamp(base_lr * base_schedule(t+1, T) * exp(log_factor_{t+1}), min_lr, max_lr)

Learning in log space with a bounded per-step change means no output can make the LR negative, zero or
explode, and the zero-initialised head makes an untrained controller exactly its base schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from metalr.features import FeatureSpec, FeatureState, Observation, compute_features, init_feature_state
from metalr.schedules import BASE_SCHEDULES

NetFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class PolicyConfig:
    """How controller outputs become learning rates (stored in the checkpoint).

    Attributes:
        min_lr, max_lr: absolute LR bounds applied last (defaults 1e-6 and 1.0).
        min_factor, max_factor: bounds on the learned multiplier of ``base_lr * base_schedule``.
        max_log_step: largest change of log LR per step (0.1 = at most ~10% per step).
        base_schedule: schedule the learned factor multiplies (``constant`` or ``cosine``), so an untrained
            controller is exactly that schedule.
        guard_cut: divergence guardrail - the LR is divided by this at once when a step raises ``alarm``
            (non-finite loss/gradient or loss spike; see ``FeatureSpec.guard_ratio``). 1 disables it.
    """

    min_lr: float = 1e-6
    max_lr: float = 1.0
    min_factor: float = 1e-4
    max_factor: float = 1e2
    max_log_step: float = 0.1
    base_schedule: str = "constant"
    guard_cut: float = 10.0

    def __post_init__(self) -> None:
        numbers = {k: v for k, v in vars(self).items() if k != "base_schedule"}
        bad = [f"{k}={v!r}" for k, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)]
        if bad:
            raise ValueError(f"policy values must be finite numbers, got {', '.join(bad)}")
        if not 0 < self.min_lr < self.max_lr:
            raise ValueError(f"need 0 < min_lr < max_lr, got min_lr={self.min_lr}, max_lr={self.max_lr}")
        if not 0 < self.min_factor <= 1 <= self.max_factor:
            raise ValueError(f"need 0 < min_factor <= 1 <= max_factor, got {self.min_factor}, {self.max_factor}")
        if not self.max_log_step > 0:
            raise ValueError(f"max_log_step must be > 0, got {self.max_log_step}")
        if self.base_schedule not in BASE_SCHEDULES:
            raise ValueError(f"unknown base_schedule {self.base_schedule!r}; expected one of {sorted(BASE_SCHEDULES)}")
        if not self.guard_cut >= 1:
            raise ValueError(f"guard_cut must be >= 1, got {self.guard_cut}")

    def lr_scale(self, log_factor: Tensor, step: Tensor | float, total_steps: Tensor | float) -> Tensor:
        """Multiplier of the base LR at ``step`` (before the absolute bounds)."""
        return BASE_SCHEDULES[self.base_schedule](step, total_steps) * torch.exp(log_factor)

    def clamp_lr(self, lr: Tensor) -> Tensor:
        return lr.clamp(self.min_lr, self.max_lr)


class MLPNet(nn.Module):
    """Feed-forward controller body: hidden layers with ReLU, linear head, no recurrent state."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (64, 32)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = input_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, 1)

    def initial_hidden(self, like: Tensor) -> Tensor:
        return like.new_zeros(0)

    def forward(self, features: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        return self.head(self.body(features)).reshape(()), hidden


class LSTMNet(nn.Module):
    """Recurrent variant (published learned LR schedules such as MLR-SNet are recurrent).

    The hidden and cell states travel as one tensor ``[2, hidden]`` so they are carried, detached and
    checkpointed exactly like the feature state.
    """

    def __init__(self, input_dim: int, hidden: tuple[int, ...] = (32,)) -> None:
        super().__init__()
        if len(hidden) != 1:
            raise ValueError(f"the lstm controller takes one hidden size, got hidden={list(hidden)}")
        self.cell = nn.LSTMCell(input_dim, hidden[0])
        self.head = nn.Linear(hidden[0], 1)

    def initial_hidden(self, like: Tensor) -> Tensor:
        return like.new_zeros(2, self.cell.hidden_size)

    def forward(self, features: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        # nn.LSTMCell's equations written out with its own weights: aten::lstm_cell has no vmap batching rule,
        # and ES/PES run the controller of every particle in one vmap.
        cell = self.cell
        h, c = hidden[0], hidden[1]
        gates = features @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
        i, f, g, o = gates.chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        return self.head(h).reshape(()), torch.stack([h, c])


NETWORKS: dict[str, type[MLPNet] | type[LSTMNet]] = {"mlp": MLPNet, "lstm": LSTMNet}


@dataclass(frozen=True)
class ArchConfig:
    """Network architecture: ``kind`` in ``NETWORKS`` and its hidden sizes."""

    kind: str = "mlp"
    hidden: tuple[int, ...] = (64, 32)

    def __post_init__(self) -> None:
        if self.kind not in NETWORKS:
            raise ValueError(f"unknown controller kind {self.kind!r}; expected one of {sorted(NETWORKS)}")
        if not 0 < len(self.hidden) <= 8 or not all(isinstance(h, int) and not isinstance(h, bool) and 0 < h <= 4096 for h in self.hidden):
            raise ValueError(f"hidden must be 1 to 8 layer widths, each an integer in [1, 4096], got {list(self.hidden)}")
        if self.kind == "lstm" and len(self.hidden) != 1:
            raise ValueError(f"the lstm controller takes one hidden size (e.g. hidden: [32]), got {list(self.hidden)}")


class PolicyState(NamedTuple):
    """Everything a running policy carries between steps (a pytree of tensors: one ``tree_map`` detaches,
    stacks or saves it)."""

    features: FeatureState
    log_factor: Tensor  # log of the learned multiplier of base_lr * base_schedule
    hidden: Tensor  # recurrent state (empty for the MLP)


def policy_update(
    spec: FeatureSpec, policy: PolicyConfig, net: NetFn, state: PolicyState, obs: Observation
) -> tuple[Tensor, PolicyState]:
    """One step of the policy as a pure function of its inputs: ``(log_factor_next, next_state)``.

    ``net`` maps ``(features, hidden)`` to ``(u, hidden)``: the controller's network called directly
    (deployment) or through ``functional_call`` with weights ``theta`` (meta-training, ES/PES particles).
    """
    features, fstate = compute_features(spec, state.features, obs)
    u, hidden = net(features, state.hidden)
    delta = (policy.max_log_step * torch.tanh(u)).to(state.log_factor.dtype)
    log_factor = (state.log_factor + delta).clamp(math.log(policy.min_factor), math.log(policy.max_factor))
    # Guardrail: cut at once when the step diverged; part of the policy, so meta-training learns with it.
    log_factor = log_factor - fstate.alarm * math.log(policy.guard_cut)
    log_factor = log_factor.clamp_min(math.log(policy.min_factor))
    return log_factor, PolicyState(fstate, log_factor, hidden)


class LRController(nn.Module):
    """A complete LR policy: feature spec + policy config + network.

    The policy is a pure function of the network weights ``theta``: :meth:`init` builds the state for a
    model's parameters and :meth:`apply` advances it one step with the given weights (a ``dict`` of
    tensors, e.g. perturbed or batched under ``torch.func.vmap``). :meth:`step` is :meth:`apply` with the
    controller's own weights.

    Example:
        >>> controller = LRController()                      # untrained: behaves like its base schedule
        >>> state = controller.init(list(model.parameters()))
    """

    def __init__(
        self,
        feature_spec: FeatureSpec | None = None,
        policy: PolicyConfig | None = None,
        arch: ArchConfig | None = None,
    ) -> None:
        super().__init__()
        self.feature_spec = feature_spec or FeatureSpec()
        self.policy = policy or PolicyConfig()
        self.arch = arch or ArchConfig()
        self.net: MLPNet | LSTMNet = NETWORKS[self.arch.kind](self.feature_spec.dim, tuple(self.arch.hidden))
        # Zero head: an untrained controller outputs tanh(0) = 0, i.e. exactly the base schedule.
        nn.init.zeros_(self.net.head.weight)
        nn.init.zeros_(self.net.head.bias)

    def describe(self) -> dict:
        """JSON-serialisable description (the checkpoint metadata minus provenance)."""
        return {
            "architecture": {"kind": self.arch.kind, "hidden": list(self.arch.hidden), "input_dim": self.feature_spec.dim},
            "feature_spec": self.feature_spec.to_dict(),
            "policy": asdict(self.policy),
        }

    def theta(self) -> dict[str, Tensor]:
        """The network weights as a ``dict`` (the keys :meth:`apply` takes)."""
        return dict(self.net.named_parameters())

    def init(self, params: Sequence[Tensor]) -> PolicyState:
        """State before the first step of training ``params`` (theta_0)."""
        fstate = init_feature_state(self.feature_spec, params)
        return PolicyState(fstate, torch.zeros_like(fstate.step), self.net.initial_hidden(fstate.step))

    def apply(  # type: ignore[override]  # nn.Module.apply(fn) is not used on controllers
        self, theta: Mapping[str, Tensor], state: PolicyState, obs: Observation
    ) -> tuple[Tensor, PolicyState]:
        """Observe one step with network weights ``theta``; returns ``(log_factor_next, next_state)``."""
        weights = dict(theta)

        def net(features: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
            dtype = next(iter(weights.values())).dtype
            return functional_call(self.net, weights, (features.to(dtype), hidden))

        return policy_update(self.feature_spec, self.policy, net, state, obs)

    def step(self, state: PolicyState, obs: Observation) -> tuple[Tensor, PolicyState]:
        """Observe one step with the controller's own weights, return ``(log_factor_next, next_state)``.

        The LR for the next step is ``policy.clamp_lr(base_lr * policy.lr_scale(log_factor, t + 1, T))``.
        """
        dtype = self.net.head.weight.dtype

        def net(features: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
            return self.net(features.to(dtype), hidden)

        return policy_update(self.feature_spec, self.policy, net, state, obs)


def detach_tree(tree: Any) -> Any:
    """Every tensor of a pytree (a policy state, an inner run's carry) without autograd history."""
    return tree_map(Tensor.detach, tree)
