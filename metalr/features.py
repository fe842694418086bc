"""Observation -> feature vector: the one function that meta-training and deployment share.

Every step the inner trainer (the differentiable unroll in ``metalr.meta`` or ``LearnedLR`` in a user's
loop) reduces what it saw to a handful of scalars, an :class:`Observation`, and hands it with the previous
:class:`FeatureState` to :func:`compute_features`, which returns the controller's feature vector and the next
state. Nothing else computes features, so a controller sees the same inputs in both places
(``tests/test_scheduler.py`` checks that the LR trajectories agree, also through an inf gradient and a loss
spike).

Feature format 2 (why, not what):

* **Scalars only between steps.** An observation is a few global reductions of the step just taken
  (:func:`step_reductions`): ``|g|^2``, ``|theta|^2``, ``|u|^2`` of the update ``u = theta_t - theta_{t+1}`` and
  the projection ``g_t . u_{t-1}`` of the new gradient on the previous update. The running state is a few
  dozen numbers, so deployment holds at most one parameter-sized buffer (the previous update) and a
  scheduler's ``state_dict`` holds none. Format 1 kept three (a gradient EMA, the previous gradient and
  parameters): 2.8x the model's bytes.
* **Scale-free LR signals.** ``g_t . u_{t-1} / (|g_{t-1}| |u_{t-1}|)`` is ``1 - lr * L`` for gradient descent on
  a quadratic, with ``L`` the curvature along the step: ``lr_curvature = 1 - that`` is the secant curvature
  along the update in units of the LR (the edge of stability is 2), and its cosine form
  ``update_alignment`` says whether the last step undershot (> 0: the gradient still points along it, the
  hypergradient sign of Baydin et al., 2018) or overshot (< 0). ``log_dog_ratio`` compares the LR with the
  step size DoG (Ivgi et al., 2023) would take, ``distance / sqrt(sum |g|^2)``, from running sums of the
  update and gradient norms (the path length stands in for the distance from theta_0: no copy of theta_0).
* Every feature is a dimensionless ratio or a log of one, scaled by a constant and clipped to
  ``[-clip, clip]``; the scales are data in :class:`FeatureSpec` and travel inside the checkpoint.
* **This function owns the whole state transition**, also for non-finite inputs: a NaN/inf loss or gradient
  raises ``alarm`` (the divergence guardrail reads it), leaves every running statistic untouched and
  saturates the affected features, whoever calls it.
* Tensor ops only, no ``.item()`` and no data-dependent Python branches: differentiable inside
  ``torch.autograd.grad(..., create_graph=True)`` unrolls, and ``torch.func.vmap``-able over particles and
  task populations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

Tensors = tuple[Tensor, ...]

FEATURE_FORMAT = 2
"""Version of the feature definitions below; a checkpoint records the version it was trained with."""

# Feature groups, in canonical order. A spec enables groups (ablation switches); names follow.
FEATURE_GROUPS: dict[str, tuple[str, ...]] = {
    "loss": ("log_loss_rel", "loss_trend_fast", "loss_trend_slow"),
    "grad": ("log_grad_norm_rel", "grad_norm_trend"),
    "alignment": ("update_alignment", "update_alignment_ema"),
    "update": ("log_update_ratio",),
    "progress": ("progress", "tanh_steps_10", "tanh_steps_100", "tanh_steps_1000"),
    "lr": ("log_lr_rel",),
    "stability": ("lr_curvature",),
    "distance": ("log_dog_ratio",),
    "validation": ("log_valid_gap",),
    "uncertainty": ("predictive_entropy",),
    "resource": ("budget_used",),
}
DEFAULT_GROUPS: tuple[str, ...] = ("loss", "grad", "alignment", "update", "progress", "lr", "stability", "distance")

# Multiplier applied to each raw feature before clipping: natural logs of ratios that span a few
# decades are divided by ln(10) so one decade = 1.0; log-ratio trends are already O(0.1-1).
_LN10 = math.log(10.0)
DEFAULT_SCALES: dict[str, float] = {
    "log_loss_rel": 1.0 / _LN10,
    "loss_trend_fast": 10.0,  # log(EMA_fast / EMA_mid): a 10% move in loss level -> ~1
    "loss_trend_slow": 10.0,
    "log_grad_norm_rel": 1.0 / _LN10,
    "grad_norm_trend": 1.0,
    "update_alignment": 1.0,  # a cosine, in [-1, 1]
    "update_alignment_ema": 1.0,
    "log_update_ratio": 1.0 / _LN10,  # typical |u|/|theta| = 1e-3 -> -3 (+ offset 3 -> 0)
    "progress": 1.0,
    "tanh_steps_10": 1.0,
    "tanh_steps_100": 1.0,
    "tanh_steps_1000": 1.0,
    "log_lr_rel": 1.0 / _LN10,
    "lr_curvature": 1.0,  # lr * L along the update: 1 = the quadratic's optimal step, 2 = the stability edge
    "log_dog_ratio": 1.0 / _LN10,  # decades above (+) or below (-) DoG's step size
    "log_valid_gap": 10.0,
    "predictive_entropy": 1.0,
    "budget_used": 1.0,
}
DEFAULT_OFFSETS: dict[str, float] = {"log_update_ratio": 3.0}

# Slots of the stacked reduction vector (see step_reductions); Observation names the same slots.
REDUCTIONS = ("grad_sq", "param_sq", "update_sq", "grad_dot_prev_update")


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
        if self.format != FEATURE_FORMAT:
            raise ValueError(
                f"feature format {self.format} cannot be computed by this version of metalr "
                f"(it computes format {FEATURE_FORMAT}); meta-train the controller again with this version"
            )
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
        if data.get("format") != FEATURE_FORMAT:
            # Checked first: an older format also has other groups, and the format is what the user must fix.
            raise ValueError(
                f"the controller was meta-trained on feature format {data.get('format')!r}; this version of "
                f"metalr computes feature format {FEATURE_FORMAT} only (meta-train it again with this version)"
            )
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
    """What the trainer saw in the step just taken (theta_t -> theta_{t+1}), as scalars.

    Attributes:
        loss: train loss at theta_t (the minibatch loss the gradient came from).
        grad_sq: ``|g_t|^2``, the squared global norm of the gradient the optimizer applied.
        param_sq: ``|theta_{t+1}|^2``.
        update_sq: ``|u_t|^2`` with ``u_t = theta_t - theta_{t+1}``.
        grad_dot_prev_update: ``g_t . u_{t-1}`` (any value at the first step: it is not read there).
        lr: the LR used for this step (reference param group).
        lr_rel: that LR divided by the base LR.
        total_steps: the step budget T.
        valid_loss: ``inner_valid`` loss measured at this step, or NaN when not measured.
        entropy: predictive entropy / log(num_classes) on this batch, or NaN when not measured.
        budget_used: fraction of the wall-clock budget used, or NaN to use the step fraction.
    """

    loss: Tensor
    grad_sq: Tensor
    param_sq: Tensor
    update_sq: Tensor
    grad_dot_prev_update: Tensor
    lr: Tensor
    lr_rel: Tensor
    total_steps: Tensor
    valid_loss: Tensor
    entropy: Tensor
    budget_used: Tensor

    @classmethod
    def of_reductions(
        cls,
        loss: Tensor,
        reductions: Tensor,
        lr: Tensor,
        lr_rel: Tensor,
        total_steps: Tensor,
        valid_loss: Tensor,
        entropy: Tensor,
        budget_used: Tensor,
    ) -> Observation:
        """The observation from a stacked ``REDUCTIONS`` vector (:func:`step_reductions`, or ``LearnedLR``'s hooks)."""
        grad_sq, param_sq, update_sq, cross = reductions.unbind()
        return cls(loss, grad_sq, param_sq, update_sq, cross, lr, lr_rel, total_steps, valid_loss, entropy, budget_used)

    @classmethod
    def of_step(
        cls,
        loss: Tensor,
        grads: Sequence[Tensor],
        params_before: Sequence[Tensor],
        params_after: Sequence[Tensor],
        prev_update: Sequence[Tensor],
        lr: Tensor,
        lr_rel: Tensor,
        total_steps: Tensor,
        valid_loss: Tensor | None = None,
        entropy: Tensor | None = None,
        budget_used: Tensor | None = None,
    ) -> tuple[Observation, Tensors]:
        """The observation of the step ``params_before -> params_after``, and its update ``u_t``.

        ``prev_update`` is ``u_{t-1}``, one tensor per parameter (zeros at the first step); the returned
        update has the same layout. Unset optional values are NaN (not measured).
        """
        like = torch.zeros((), dtype=_scalar_dtype(loss), device=loss.device)
        reductions, update = step_reductions(grads, params_before, params_after, prev_update, like)
        nan = torch.full((), math.nan, dtype=like.dtype, device=like.device)
        observation = cls.of_reductions(
            loss,
            reductions,
            lr=lr,
            lr_rel=lr_rel,
            total_steps=total_steps,
            valid_loss=nan if valid_loss is None else valid_loss,
            entropy=nan if entropy is None else entropy,
            budget_used=nan if budget_used is None else budget_used,
        )
        return observation, update


class FeatureState(NamedTuple):
    """Running statistics carried from step to step: 0-dim and ``[3]`` tensors only (no parameter copies)."""

    step: Tensor  # observations so far
    loss_first: Tensor  # first finite train loss
    loss_ema: Tensor  # [3] EMAs of the train loss at ema_betas
    grad_norm_first: Tensor
    log_grad_norm_ema: Tensor  # [3] EMAs of log |g|
    grad_norm: Tensor  # |g| of the last step (NaN/inf when it was not finite)
    update_norm: Tensor  # |u| of the last finite step
    alignment_ema: Tensor  # EMA (mid) of update_alignment
    grad_sq_sum: Tensor  # sum of |g|^2 over finite steps (DoG's denominator)
    param_norm_first: Tensor  # |theta_0|
    distance: Tensor  # path length sum |u| over finite steps (bounds the distance travelled from theta_0)
    valid_gap: Tensor  # last measured log(valid / train EMA), held between measurements
    entropy: Tensor  # last measured predictive entropy, held
    alarm: Tensor  # 1.0 when this step diverged (non-finite, or loss > guard_ratio x slow EMA)


def global_norm_sq(tensors: Sequence[Tensor], like: Tensor) -> Tensor:
    """``sum_i |t_i|^2`` over a list of tensors, with one fused multi-tensor kernel, in ``like``'s dtype."""
    if len(tensors) == 0:
        return torch.zeros_like(like)
    return torch.stack(torch._foreach_norm(list(tensors))).to(like.dtype).square().sum()


def _dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """``sum_i x_i . y_i`` over matching lists of tensors, without concatenating them into flat copies."""
    return torch.stack([(x * y).sum() for x, y in zip(xs, ys, strict=True)]).sum()


def step_reductions(
    grads: Sequence[Tensor],
    params_before: Sequence[Tensor],
    params_after: Sequence[Tensor],
    prev_update: Sequence[Tensor],
    like: Tensor,
) -> tuple[Tensor, Tensors]:
    """The reductions an :class:`Observation` needs, and the update ``u_t`` (the unroll's reference path).

    ``prev_update`` and the returned update are per-parameter tensors shaped like the parameters. Returns
    ``(stacked, update)``, ``stacked`` holding ``REDUCTIONS`` in order. One dot product per tensor and
    reduction, stacked and summed: no flat copies of the parameters (each would be a pass over memory the
    size of the model, which is what bounds a vmapped step), differentiable, and ``vmap``-able (the
    ``_foreach`` kernels are not). ``LearnedLR`` computes the same numbers in place around
    ``optimizer.step()`` (one persistent buffer, no temporaries); the parity tests check the two agree.
    """
    if len(grads) == 0:
        return torch.zeros(len(REDUCTIONS), dtype=like.dtype, device=like.device), ()
    update = tuple(b - a for b, a in zip(params_before, params_after, strict=True))
    previous = tuple(u.to(g.dtype) for u, g in zip(prev_update, grads, strict=True))
    dots = torch.stack(
        [_dot(grads, grads), _dot(params_after, params_after), _dot(update, update), _dot(grads, previous)]
    )
    return dots.to(like.dtype), update


def init_feature_state(spec: FeatureSpec, params: Sequence[Tensor]) -> FeatureState:
    """State before the first step; ``params`` are the initial parameters theta_0 (only their norm is kept)."""
    ref = params[0] if len(params) else torch.zeros(())
    zero = torch.zeros((), dtype=_scalar_dtype(ref), device=ref.device)
    param_norm = global_norm_sq([p.detach() for p in params], zero).sqrt()
    return FeatureState(
        step=zero,
        loss_first=zero,
        loss_ema=zero.expand(3).clone(),
        grad_norm_first=zero,
        log_grad_norm_ema=zero.expand(3).clone(),
        grad_norm=zero,
        update_norm=zero,
        alignment_ema=zero,
        grad_sq_sum=zero,
        param_norm_first=torch.where(torch.isfinite(param_norm), param_norm, zero),
        distance=zero,
        valid_gap=zero,
        entropy=zero,
        alarm=zero,
    )


def _scalar_dtype(t: Tensor) -> torch.dtype:
    # Statistics in at least float32, float64 when the model is float64 (finite-difference tests).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _ema(old: Tensor, new: Tensor, betas: Tensor, first: Tensor) -> Tensor:
    return torch.where(first, new, betas * old + (1 - betas) * new)


def _safe_div(numerator: Tensor, denominator: Tensor, ok: Tensor) -> Tensor:
    # Branches that torch.where discards still get gradients, so a discarded 0/0 would poison them with NaN.
    return numerator / torch.where(ok, denominator, torch.ones_like(denominator))


def compute_features(spec: FeatureSpec, state: FeatureState, obs: Observation) -> tuple[Tensor, FeatureState]:
    """Turn one step's observation into the controller's feature vector and the next state.

    Args:
        spec: which features and how to normalise them.
        state: running statistics after the previous step.
        obs: the reductions of the step that was just taken.

    Returns:
        ``(features, next_state)``: ``features`` has shape ``[spec.dim]`` in the order of ``spec.names``,
        each entry finite and within ``[-spec.clip, spec.clip]``.
    """
    ref = state.loss_ema
    dtype = ref.dtype
    tiny = torch.finfo(dtype).tiny
    big = torch.tensor(1e30, dtype=dtype, device=ref.device)
    betas = torch.tensor(spec.ema_betas, dtype=dtype, device=ref.device)
    first = state.step == 0

    loss = obs.loss.to(dtype).reshape(())
    grad_sq = obs.grad_sq.to(dtype).reshape(())
    grad_norm = grad_sq.clamp_min(0).sqrt()
    param_norm = obs.param_sq.to(dtype).reshape(()).clamp_min(0).sqrt()
    update_norm = obs.update_sq.to(dtype).reshape(()).clamp_min(0).sqrt()
    cross = obs.grad_dot_prev_update.to(dtype).reshape(())
    lr = obs.lr.to(dtype).reshape(())
    loss_ok = torch.isfinite(loss)
    grad_ok = torch.isfinite(grad_norm)
    # A step is "finite" when both what it saw and where it went are: only such steps move the statistics.
    step_ok = loss_ok & grad_ok & torch.isfinite(update_norm) & torch.isfinite(param_norm)
    loss_used = torch.where(loss_ok, loss, big).clamp_min(tiny)
    grad_norm_used = torch.where(grad_ok, grad_norm, big).clamp_min(tiny)

    # Loss and gradient-norm levels move only on finite observations.
    loss_first = torch.where(first & loss_ok, loss_used, state.loss_first)
    loss_first = torch.where(loss_first > 0, loss_first, loss_used)
    loss_ema = torch.where(loss_ok, _ema(state.loss_ema, loss_used, betas, first), state.loss_ema)
    loss_ema = loss_ema.clamp_min(tiny)
    log_gn = torch.log(grad_norm_used)
    gn_first = torch.where(first & grad_ok, grad_norm_used, state.grad_norm_first)
    gn_first = torch.where(gn_first > 0, gn_first, grad_norm_used)
    log_gn_ema = torch.where(grad_ok, _ema(state.log_grad_norm_ema, log_gn, betas, first), state.log_grad_norm_ema)

    # Projection of the new gradient on the previous update, u_{t-1} (read from the carried |g_{t-1}|, |u_{t-1}|).
    prev_product = state.grad_norm * state.update_norm
    has_prev = (state.step > 0) & (prev_product > tiny) & torch.isfinite(prev_product) & torch.isfinite(cross)
    has_prev = has_prev & grad_ok & (grad_norm > tiny)
    # 1 - lr * L (secant curvature along u_{t-1}, exact for gradient descent on a quadratic); the cosine form.
    projection = _safe_div(cross, prev_product, has_prev)
    lr_curvature = torch.where(has_prev, 1 - projection, torch.zeros_like(cross))
    alignment = torch.where(has_prev, _safe_div(cross, grad_norm * state.update_norm, has_prev), torch.zeros_like(cross))
    alignment = alignment.clamp(-1, 1)
    mid = betas[1]
    alignment_ema = torch.where(
        has_prev & step_ok,
        torch.where(state.step > 1, mid * state.alignment_ema + (1 - mid) * alignment, alignment),
        state.alignment_ema,
    )

    # DoG's step size distance / sqrt(sum |g|^2) (Ivgi et al., 2023), with the path length sum |u| as the
    # distance (an upper bound on DoG's distance from theta_0, which would need a copy of theta_0) and DoG's
    # r_eps = 1e-6 (1 + |theta_0|) as its floor.
    grad_sq_sum = torch.where(step_ok, state.grad_sq_sum + grad_sq, state.grad_sq_sum)
    distance = torch.where(step_ok, state.distance + update_norm, state.distance)
    r_eps = 1e-6 * (1 + state.param_norm_first)
    dog_step = torch.maximum(distance, r_eps) / grad_sq_sum.clamp_min(tiny).sqrt()
    dog_ok = grad_sq_sum > tiny

    step_next = state.step + 1
    total = obs.total_steps.to(dtype).clamp_min(1)
    progress = (step_next / total).clamp(0, 1)

    valid = obs.valid_loss.to(dtype).reshape(())
    valid_seen = torch.isfinite(valid)
    valid_safe = torch.where(valid_seen, valid.clamp_min(tiny), loss_ema[1])
    valid_gap = torch.where(valid_seen, torch.log(valid_safe / loss_ema[1]), state.valid_gap)
    entropy_obs = obs.entropy.to(dtype).reshape(())
    entropy = torch.where(torch.isfinite(entropy_obs), entropy_obs, state.entropy)
    budget = obs.budget_used.to(dtype).reshape(())
    budget = torch.where(torch.isfinite(budget), budget, progress)

    alarm = (~loss_ok) | (~grad_ok) | ((state.step > 0) & (loss_used > spec.guard_ratio * state.loss_ema[2]))

    raw = {
        "log_loss_rel": torch.log(loss_used / loss_first),
        "loss_trend_fast": torch.log(loss_ema[0] / loss_ema[1]),
        "loss_trend_slow": torch.log(loss_ema[1] / loss_ema[2]),
        "log_grad_norm_rel": log_gn - torch.log(gn_first),
        "grad_norm_trend": log_gn - log_gn_ema[2],
        "update_alignment": alignment,
        "update_alignment_ema": alignment_ema,
        "log_update_ratio": torch.log(update_norm.clamp_min(tiny) / param_norm.clamp_min(tiny)),
        "progress": progress,
        "tanh_steps_10": torch.tanh(step_next / 10),
        "tanh_steps_100": torch.tanh(step_next / 100),
        "tanh_steps_1000": torch.tanh(step_next / 1000),
        "log_lr_rel": torch.log(obs.lr_rel.to(dtype).reshape(()).clamp_min(tiny)),
        "lr_curvature": lr_curvature,
        "log_dog_ratio": torch.where(dog_ok, torch.log(lr.clamp_min(tiny) / dog_step), torch.zeros_like(lr)),
        "log_valid_gap": valid_gap,
        "predictive_entropy": entropy,
        "budget_used": budget,
    }
    # One add and one multiply over the stacked vector instead of two 0-dim ops per feature (per-op dispatch
    # dominates deployment cost on CPU).
    offsets = torch.tensor([spec.offsets.get(n, 0.0) for n in spec.names], dtype=dtype, device=ref.device)
    scales = torch.tensor([spec.scales[n] for n in spec.names], dtype=dtype, device=ref.device)
    values = (torch.stack([raw[n] for n in spec.names]) + offsets) * scales
    features = torch.nan_to_num(values, nan=0.0, posinf=spec.clip, neginf=-spec.clip).clamp(-spec.clip, spec.clip)

    next_state = FeatureState(
        step=step_next,
        loss_first=loss_first,
        loss_ema=loss_ema,
        grad_norm_first=gn_first,
        log_grad_norm_ema=log_gn_ema,
        grad_norm=torch.where(step_ok, grad_norm, torch.zeros_like(grad_norm)),
        update_norm=torch.where(step_ok, update_norm, torch.zeros_like(update_norm)),
        alignment_ema=alignment_ema,
        grad_sq_sum=grad_sq_sum,
        param_norm_first=state.param_norm_first,
        distance=distance,
        valid_gap=valid_gap,
        entropy=entropy,
        alarm=alarm.to(dtype),
    )
    return features, next_state


def predictive_entropy(logits: Tensor) -> Tensor:
    """Mean entropy of softmax(logits) over the batch, divided by log(num_classes) (so in [0, 1])."""
    num_classes = logits.shape[-1]
    if num_classes < 2:
        return torch.full((), float("nan"), dtype=torch.float32, device=logits.device)
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    entropy = -(logp.exp() * logp).sum(-1).mean()
    return entropy / math.log(num_classes)
