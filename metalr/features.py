"""Observation -> feature vector: the one function that meta-training and deployment share.

Every step the inner trainer (the differentiable unroll in ``metalr.meta`` or ``LearnedLR`` in a user's
loop) hands :func:`compute_features` an :class:`Observation` of the step that was just taken and the
previous :class:`FeatureState`; it returns the feature vector for the controller and the next state.
Nothing else computes features, so a controller sees exactly the same inputs in both places
(``tests/test_scheduler.py`` checks the LR trajectories agree).

Design choices (why, not what):

* Every feature is a dimensionless ratio or a log of one (loss relative to the first loss, gradient norm
  relative to its running level, ...), scaled by a constant and clipped to ``[-clip, clip]``. That makes
  them O(1) on any task without statistics that would have to be estimated per task. The scales are data
  in :class:`FeatureSpec` and travel inside the checkpoint.
* Per-parameter work is done with fused multi-tensor kernels (``torch._foreach_*``) - no Python loop
  over elements, one small loop-free pass per step (the deployment overhead target is <= 2%).
* Non-finite losses or gradients never propagate: they set ``alarm`` (the divergence guardrail reads it),
  leave the running statistics untouched and saturate the affected features at ``+clip``.
* The function is written with tensor ops only (no ``.item()``), so it is differentiable and works
  inside ``torch.autograd.grad(..., create_graph=True)`` unrolls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

FEATURE_FORMAT = 1
"""Version of the feature definitions below; a checkpoint records the version it was trained with."""

# Feature groups, in canonical order. A spec enables groups (ablation switches); names follow.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "loss": ("log_loss_rel", "loss_trend_fast", "loss_trend_slow"),
    "grad": ("log_grad_norm_rel", "grad_norm_trend"),
    "variance": ("grad_noise_fraction",),
    "update": ("log_update_ratio",),
    "progress": ("progress", "tanh_steps_10", "tanh_steps_100", "tanh_steps_1000"),
    "lr": ("log_lr_rel",),
    "stability": ("log_lr_curvature",),
    "validation": ("log_valid_gap",),
    "uncertainty": ("predictive_entropy",),
    "resource": ("budget_used",),
}
DEFAULT_GROUPS: tuple[str, ...] = ("loss", "grad", "variance", "update", "progress", "lr", "stability")

# Multiplier applied to each raw feature before clipping: natural logs of ratios that span a few
# decades are divided by ln(10) so one decade = 1.0; log-ratio trends are already O(0.1-1).
_LN10 = math.log(10.0)
DEFAULT_SCALES: dict[str, float] = {
    "log_loss_rel": 1.0 / _LN10,
    "loss_trend_fast": 10.0,  # log(EMA_fast / EMA_mid): a 10% move in loss level -> ~1
    "loss_trend_slow": 10.0,
    "log_grad_norm_rel": 1.0 / _LN10,
    "grad_norm_trend": 1.0,
    "grad_noise_fraction": 1.0,
    "log_update_ratio": 1.0 / _LN10,  # typical |dtheta|/|theta| = 1e-3 -> -3
    "progress": 1.0,
    "tanh_steps_10": 1.0,
    "tanh_steps_100": 1.0,
    "tanh_steps_1000": 1.0,
    "log_lr_rel": 1.0 / _LN10,
    "log_lr_curvature": 1.0 / _LN10,  # log10(lr * L): 0.3 = lr*L of 2, the GD stability edge
    "log_valid_gap": 10.0,
    "predictive_entropy": 1.0,
    "budget_used": 1.0,
}
# The log_update_ratio is shifted so that its typical value is near 0 rather than -3.
DEFAULT_OFFSETS: dict[str, float] = {"log_update_ratio": 3.0}


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a controller reads, in which order, and how they are normalised.

    This is data: it is written into every checkpoint and validated on load.

    Attributes:
        groups: enabled feature groups, a subset of ``FEATURE_GROUPS`` (ablation switches).
        ema_betas: EMA decay factors (fast, mid, slow) for loss and gradient-norm statistics.
        clip: every normalised feature is clipped to ``[-clip, clip]``.
        guard_ratio: a train loss above ``guard_ratio`` x its slow EMA (or a non-finite loss or gradient)
            raises ``alarm``, which the divergence guardrail turns into an LR cut.
        scales / offsets: per-feature normalisation, ``(raw + offset) * scale``.
        format: feature-definition version (``FEATURE_FORMAT`` at training time).
    """

    groups: tuple[str, ...] = DEFAULT_GROUPS
    ema_betas: tuple[float, float, float] = (0.5, 0.9, 0.99)
    clip: float = 5.0
    guard_ratio: float = 5.0
    scales: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SCALES))
    offsets: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_OFFSETS))
    format: int = FEATURE_FORMAT

    def __post_init__(self) -> None:
        unknown = [g for g in self.groups if g not in FEATURE_GROUPS]
        if unknown:
            raise ValueError(f"unknown feature group(s) {unknown}; expected a subset of {list(FEATURE_GROUPS)}")
        if len(set(self.groups)) != len(self.groups):
            raise ValueError(f"feature groups repeat: {list(self.groups)}")
        if len(self.ema_betas) != 3 or not all(0.0 <= b < 1.0 for b in self.ema_betas):
            raise ValueError(f"ema_betas must be three decays in [0, 1), got {self.ema_betas}")
        if not 0 < self.clip < 1e6:
            raise ValueError(f"clip must be in (0, 1e6), got {self.clip}")
        if not 1 < self.guard_ratio < 1e12:
            raise ValueError(f"guard_ratio must be in (1, 1e12), got {self.guard_ratio}")
        missing = [n for n in self.names if n not in self.scales]
        if missing:
            raise ValueError(f"feature scales missing for {missing}")
        constants = [*self.scales.values(), *self.offsets.values()]
        if not all(isinstance(c, (int, float)) and math.isfinite(c) for c in constants):
            raise ValueError("feature scales and offsets must be finite numbers")
        # Keep only the enabled features' constants: the spec is data, equal specs compare equal.
        object.__setattr__(self, "scales", {n: float(self.scales[n]) for n in self.names})
        object.__setattr__(self, "offsets", {n: float(self.offsets.get(n, 0.0)) for n in self.names})
        if self.format != FEATURE_FORMAT:
            raise ValueError(
                f"feature format {self.format} cannot be computed by this version of metalr "
                f"(it computes format {FEATURE_FORMAT})"
            )

    @property
    def names(self) -> tuple[str, ...]:
        """Feature names in the order the controller sees them (canonical group order)."""
        return tuple(name for group in FEATURE_GROUPS if group in self.groups for name in FEATURE_GROUPS[group])

    @property
    def dim(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict:
        return {
            "format": self.format,
            "groups": list(self.groups),
            "names": list(self.names),
            "ema_betas": list(self.ema_betas),
            "clip": self.clip,
            "guard_ratio": self.guard_ratio,
            "scales": dict(self.scales),
            "offsets": dict(self.offsets),
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureSpec:
        """Rebuild a spec from checkpoint metadata, refusing anything this version cannot compute."""
        if not isinstance(data, dict):
            raise ValueError(f"feature spec must be a mapping, got {type(data).__name__}")
        expected = {"format", "groups", "names", "ema_betas", "clip", "guard_ratio", "scales", "offsets"}
        if set(data) != expected:
            raise ValueError(f"feature spec keys {sorted(data)} differ from the expected {sorted(expected)}")
        groups = data["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"feature spec 'groups' must be a list of names, got {groups!r}")
        spec = cls(
            groups=tuple(groups),
            ema_betas=tuple(float(b) for b in data["ema_betas"]),  # type: ignore[arg-type]
            clip=float(data["clip"]),
            guard_ratio=float(data["guard_ratio"]),
            scales={str(k): float(v) for k, v in dict(data["scales"]).items()},
            offsets={str(k): float(v) for k, v in dict(data["offsets"]).items()},
            format=int(data["format"]),
        )
        if list(spec.names) != list(data["names"]):
            raise ValueError(
                f"feature names {data['names']} do not match what groups {list(groups)} compute in this "
                f"version ({list(spec.names)})"
            )
        return spec


class Observation(NamedTuple):
    """What the trainer saw in the step that was just taken (theta_t -> theta_{t+1}).

    Attributes:
        loss: scalar train loss at theta_t (the minibatch loss the gradient came from).
        grads: gradients at theta_t, one tensor per parameter (the gradient the optimizer applied).
        params: parameters after the update, theta_{t+1}.
        lr: scalar, the LR used for this step (reference param group).
        lr_rel: scalar, that LR divided by the base LR.
        total_steps: scalar, the step budget T.
        valid_loss: scalar ``inner_valid`` loss measured at this step, or NaN when not measured.
        entropy: scalar predictive entropy / log(num_classes) on this batch, or NaN when not measured.
        budget_used: scalar fraction of the wall-clock budget used, or NaN to use the step fraction.
    """

    loss: Tensor
    grads: Sequence[Tensor]
    params: Sequence[Tensor]
    lr: Tensor
    lr_rel: Tensor
    total_steps: Tensor
    valid_loss: Tensor
    entropy: Tensor
    budget_used: Tensor


class FeatureState(NamedTuple):
    """Running statistics carried from step to step (tensors only: checkpointable and detachable)."""

    step: Tensor  # observations so far
    loss_first: Tensor  # first finite train loss
    loss_ema: Tensor  # [3] EMAs of the train loss at ema_betas
    grad_norm_first: Tensor
    log_grad_norm_ema: Tensor  # [3] EMAs of log |g|
    grad_sq_ema: Tensor  # EMA (slow) of |g|^2
    grad_mean: tuple[Tensor, ...]  # EMA (slow) of g, per parameter
    prev_grads: tuple[Tensor, ...]  # g_{t-1}
    prev_params: tuple[Tensor, ...]  # theta_t before this step's update
    prev_update_norm: Tensor  # |theta_t - theta_{t-1}|
    valid_gap: Tensor  # last measured log(valid / train EMA), held between measurements
    entropy: Tensor  # last measured predictive entropy, held
    alarm: Tensor  # 1.0 when this step diverged (non-finite, or loss > guard_ratio x slow EMA)
    grad_norm: Tensor  # |g_t| of the last step (NaN/inf when the gradient was not finite)


def init_feature_state(spec: FeatureSpec, params: Sequence[Tensor]) -> FeatureState:
    """State before the first step; ``params`` are the initial parameters theta_0."""
    ref = params[0] if len(params) else torch.zeros(())
    zero = torch.zeros((), dtype=_scalar_dtype(ref), device=ref.device)
    return FeatureState(
        step=zero,
        loss_first=zero,
        loss_ema=zero.expand(3).clone(),
        grad_norm_first=zero,
        log_grad_norm_ema=zero.expand(3).clone(),
        grad_sq_ema=zero,
        grad_mean=tuple(torch.zeros_like(p) for p in params),
        prev_grads=tuple(torch.zeros_like(p) for p in params),
        prev_params=tuple(p.detach().clone() for p in params),
        prev_update_norm=zero,
        valid_gap=zero,
        entropy=zero,
        alarm=zero,
        grad_norm=zero,
    )


def _scalar_dtype(t: Tensor) -> torch.dtype:
    # Statistics in at least float32, float64 when the model is float64 (finite-difference tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _global_norm(tensors: Sequence[Tensor], like: Tensor) -> Tensor:
    if len(tensors) == 0:
        return torch.zeros_like(like)
    norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack(norms).to(like.dtype))


def _ema(old: Tensor, new: Tensor, betas: Tensor, first: Tensor) -> Tensor:
    return torch.where(first, new, betas * old + (1 - betas) * new)


def compute_features(spec: FeatureSpec, state: FeatureState, obs: Observation) -> tuple[Tensor, FeatureState]:
    """Turn one step's observation into the controller's feature vector and the next state.

    Args:
        spec: which features and how to normalise them.
        state: running statistics after the previous step.
        obs: what the step that was just taken saw.

    Returns:
        ``(features, next_state)``: ``features`` has shape ``[spec.dim]`` in the order of ``spec.names``,
        each entry finite and within ``[-spec.clip, spec.clip]``.
    """
    ref = state.loss_ema
    tiny = torch.finfo(ref.dtype).tiny
    big = torch.tensor(1e30, dtype=ref.dtype, device=ref.device)
    betas = torch.tensor(spec.ema_betas, dtype=ref.dtype, device=ref.device)
    first = state.step == 0

    loss = obs.loss.to(ref.dtype).reshape(())
    grad_norm = _global_norm(obs.grads, ref)
    loss_ok = torch.isfinite(loss)
    grad_ok = torch.isfinite(grad_norm)
    loss_used = torch.where(loss_ok, loss, big).clamp_min(tiny)
    grad_norm_used = torch.where(grad_ok, grad_norm, big).clamp_min(tiny)

    # Running statistics move only on finite observations.
    loss_first = torch.where(first & loss_ok, loss_used, state.loss_first)
    loss_first = torch.where(loss_first > 0, loss_first, loss_used)
    loss_ema = torch.where(loss_ok, _ema(state.loss_ema, loss_used, betas, first), state.loss_ema)
    loss_ema = loss_ema.clamp_min(tiny)
    log_gn = torch.log(grad_norm_used)
    gn_first = torch.where(first & grad_ok, grad_norm_used, state.grad_norm_first)
    gn_first = torch.where(gn_first > 0, gn_first, grad_norm_used)
    log_gn_ema = torch.where(grad_ok, _ema(state.log_grad_norm_ema, log_gn, betas, first), state.log_grad_norm_ema)
    slow = betas[2]
    grad_sq = grad_norm_used.square()
    grad_sq_ema = torch.where(
        grad_ok, torch.where(first, grad_sq, slow * state.grad_sq_ema + (1 - slow) * grad_sq), state.grad_sq_ema
    )

    # Per-parameter statistics: fused kernels over the parameter list.
    grads = [g.to(m.dtype) for g, m in zip(obs.grads, state.grad_mean, strict=True)]
    if grads:
        grad_mean = tuple(torch._foreach_lerp(list(state.grad_mean), grads, float(1 - spec.ema_betas[2])))
        mean_norm = _global_norm(grad_mean, ref)
        grad_change = _global_norm(torch._foreach_sub(grads, list(state.prev_grads)), ref)
        update_norm = _global_norm(torch._foreach_sub(list(obs.params), list(state.prev_params)), ref)
        param_norm = _global_norm(obs.params, ref)
    else:
        grad_mean = ()
        mean_norm = grad_change = update_norm = param_norm = torch.zeros_like(ref[0])
    # Noise fraction 1 - |E g|^2 / E|g|^2 in [0, 1]: 0 = deterministic gradient. E g starts from zero and is
    # bias-corrected (Adam-style); E|g|^2 starts from the first value and needs no correction.
    debias = 1 - slow ** (state.step + 1)
    noise_fraction = (1 - (mean_norm / debias).square() / grad_sq_ema.clamp_min(tiny)).clamp(0, 1)

    # Secant curvature along the last step, L = |g_t - g_{t-1}| / |theta_t - theta_{t-1}|. Branches that
    # torch.where discards still get gradients, so their inputs are made safe first (no 0/0, no log 0).
    has_secant = (state.step > 0) & (state.prev_update_norm > tiny)
    one = torch.ones_like(grad_change)
    curvature = grad_change / torch.where(has_secant, state.prev_update_norm, one)
    lr = obs.lr.to(ref.dtype).reshape(())
    lr_curv = torch.where(has_secant, (lr * curvature).clamp_min(tiny), one)
    log_lr_curv = torch.where(has_secant, torch.log(lr_curv), torch.zeros_like(lr))

    step_next = state.step + 1
    total = obs.total_steps.to(ref.dtype).clamp_min(1)
    progress = (step_next / total).clamp(0, 1)

    valid = obs.valid_loss.to(ref.dtype).reshape(())
    valid_seen = torch.isfinite(valid)
    valid_safe = torch.where(valid_seen, valid.clamp_min(tiny), loss_ema[1])
    valid_gap = torch.where(valid_seen, torch.log(valid_safe / loss_ema[1]), state.valid_gap)
    entropy_obs = obs.entropy.to(ref.dtype).reshape(())
    entropy = torch.where(torch.isfinite(entropy_obs), entropy_obs, state.entropy)
    budget = obs.budget_used.to(ref.dtype).reshape(())
    budget = torch.where(torch.isfinite(budget), budget, progress)

    alarm = (~loss_ok) | (~grad_ok) | ((state.step > 0) & (loss_used > spec.guard_ratio * state.loss_ema[2]))

    raw = {
        "log_loss_rel": torch.log(loss_used / loss_first),
        "loss_trend_fast": torch.log(loss_ema[0] / loss_ema[1]),
        "loss_trend_slow": torch.log(loss_ema[1] / loss_ema[2]),
        "log_grad_norm_rel": log_gn - torch.log(gn_first),
        "grad_norm_trend": log_gn - log_gn_ema[2],
        "grad_noise_fraction": noise_fraction,
        "log_update_ratio": torch.log(update_norm.clamp_min(tiny) / param_norm.clamp_min(tiny)),
        "progress": progress,
        "tanh_steps_10": torch.tanh(step_next / 10),
        "tanh_steps_100": torch.tanh(step_next / 100),
        "tanh_steps_1000": torch.tanh(step_next / 1000),
        "log_lr_rel": torch.log(obs.lr_rel.to(ref.dtype).reshape(()).clamp_min(tiny)),
        "log_lr_curvature": log_lr_curv,
        "log_valid_gap": valid_gap,
        "predictive_entropy": entropy,
        "budget_used": budget,
    }
    # One add and one multiply over the stacked vector instead of two 0-dim ops per feature (per-op dispatch
    # dominates deployment cost on CPU). Bit-identical: `+` and `*` are exactly rounded either way, and a
    # Python float operand is rounded to the tensor's dtype just as these constant tensors are.
    offsets = torch.tensor([spec.offsets.get(n, 0.0) for n in spec.names], dtype=ref.dtype, device=ref.device)
    scales = torch.tensor([spec.scales[n] for n in spec.names], dtype=ref.dtype, device=ref.device)
    values = (torch.stack([raw[n] for n in spec.names]) + offsets) * scales
    features = torch.nan_to_num(values, nan=0.0, posinf=spec.clip, neginf=-spec.clip).clamp(-spec.clip, spec.clip)

    next_state = FeatureState(
        step=step_next,
        loss_first=loss_first,
        loss_ema=loss_ema,
        grad_norm_first=gn_first,
        log_grad_norm_ema=log_gn_ema,
        grad_sq_ema=grad_sq_ema,
        grad_mean=grad_mean,
        prev_grads=tuple(grads),
        prev_params=tuple(obs.params),
        prev_update_norm=torch.where(torch.isfinite(update_norm), update_norm, state.prev_update_norm),
        valid_gap=valid_gap,
        entropy=entropy,
        alarm=alarm.to(ref.dtype),
        grad_norm=grad_norm,
    )
    return features, next_state


def detach_state(state: FeatureState) -> FeatureState:
    """Cut the autograd history (truncation boundary of an unroll)."""
    fields: list = [tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach() for v in state]
    return FeatureState(*fields)


def predictive_entropy(logits: Tensor) -> Tensor:
    """Mean entropy of softmax(logits) over the batch, divided by log(num_classes) (so in [0, 1])."""
    num_classes = logits.shape[-1]
    if num_classes < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=logits.device)
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return entropy / math.log(num_classes)
