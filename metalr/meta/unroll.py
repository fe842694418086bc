"""The functional, differentiable inner loop.

One :class:`InnerRun` is a task being trained (parameters as a tuple of tensors, optimizer state, the
controller's policy state, the data streams). :func:`unroll` advances it ``length`` steps:

    loss_t  = task.loss(functional_call(model, theta_t), batch_t)
    g_t     = autograd.grad(loss_t, theta_t, create_graph=differentiable)
    theta_{t+1}, opt_state = inner_optimizer.update(g_t, opt_state, theta_t, lr_t)      # no in-place ops
    log_factor_{t+1}       = controller.step(features(observation_t))                    # one feature fn
    meta_loss += log(L_outer_valid(theta_{t+1}) / L_outer_valid(theta_0))

The meta-objective is the mean over the unroll of the log outer-validation loss relative to the task's
initial validation loss: the log makes tasks whose losses differ by orders of magnitude weigh alike, and
averaging over steps (an area under the learning curve) rewards reaching a low loss early, which is what
time-to-target measures at evaluation. Truncation is an explicit detach of the carried state
(:meth:`InnerRun.detached`).

Extra features are fed only when the controller's feature spec enables their group (so an ablated
controller costs nothing extra):

* ``validation``: the ``inner_valid`` loss at theta_t, measured every ``valid_every`` steps (the feature
  function holds the last gap between measurements, exactly as ``LearnedLR.observe_validation`` does);
* ``uncertainty``: predictive entropy of the outputs of the training forward pass (captured from the loss
  computation, so no second forward) when the task has ``forward_fn`` and ``num_classes``;
* ``resource``: in meta-training the budget is the *step* budget, so ``budget_used = (t + 1) / T``; a
  wall-clock fraction would make meta-gradients depend on machine load and break determinism.
  (Deployment may feed the wall-clock fraction through ``LearnedLR(time_budget_s=...)``.)
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from metalr.controller import LRController, PolicyState, detach_policy_state
from metalr.features import Observation, predictive_entropy
from metalr.meta.inner import InnerOptimizer, make_inner_optimizer
from metalr.tasks.base import BatchStream, Task

NAN = float("nan")


@dataclass
class InnerRun:
    """A task in the middle of training (one slot of the meta-batch)."""

    task: Task
    names: tuple[str, ...]
    params: tuple[Tensor, ...]
    opt_state: tuple[Tensor, ...]
    policy: PolicyState
    step: int
    train_stream: BatchStream
    valid_stream: BatchStream
    initial_valid_loss: float
    optimizer: InnerOptimizer
    # inner_valid batches for the validation-gap feature (None: the task is never validated in the unroll)
    inner_valid_stream: BatchStream | None = None
    # per-run state of a gradient estimator (PES keeps its particles and accumulated noise here)
    estimator_state: dict[str, Any] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.step >= self.task.spec.steps

    def detached(self) -> InnerRun:
        """Truncation boundary: the carried state loses its autograd history."""
        return replace(
            self,
            params=tuple(p.detach() for p in self.params),
            opt_state=tuple(s.detach() for s in self.opt_state),
            policy=detach_policy_state(self.policy),
        )

    def forked(self) -> InnerRun:
        """A copy whose batch streams advance independently (same position, same future batches).

        Unrolling a fork leaves this run untouched, which is what lets ES evaluate several perturbed
        controllers from one state and makes :func:`unroll` free of side effects on its argument.
        """
        return replace(
            self,
            train_stream=copy.copy(self.train_stream),
            valid_stream=copy.copy(self.valid_stream),
            inner_valid_stream=copy.copy(self.inner_valid_stream)
            if self.inner_valid_stream is not None
            else None,
            estimator_state=dict(self.estimator_state),
        )

    def model_call(self, params: tuple[Tensor, ...]) -> Any:
        param_dict = dict(zip(self.names, params, strict=True))
        return lambda *args, **kwargs: functional_call(self.task.model, param_dict, args, kwargs)

    def lr(self, controller: LRController, policy: PolicyState | None = None) -> Tensor:
        """The learning rate for the next step under ``controller``."""
        p = controller.policy
        log_factor = (policy or self.policy).log_factor
        spec = self.task.spec
        return p.clamp_lr(spec.base_lr * p.lr_scale(log_factor, float(self.step), float(spec.steps)))


def start_run(
    task: Task, controller: LRController, valid_batch_size: int = 128, dtype: torch.dtype | None = None
) -> InnerRun:
    """Initial state of training ``task`` under ``controller``."""
    if dtype is not None:
        task.model.to(dtype)
        task.splits = {
            s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in cols.items()}
            for s, cols in task.splits.items()
        }
    named = dict(task.model.named_parameters())
    names = tuple(named)
    params = tuple(p.detach().clone() for p in named.values())
    optimizer = make_inner_optimizer(task.spec.optimizer)
    valid_stream = task.batches("outer_valid", batch_size=valid_batch_size)
    inner_valid = (
        task.batches("inner_valid", batch_size=valid_batch_size)
        if "validation" in controller.feature_spec.groups and "inner_valid" in task.splits
        else None
    )
    run = InnerRun(
        task=task,
        names=names,
        params=params,
        opt_state=optimizer.init(params),
        policy=controller.initial_state(list(params)),
        step=0,
        train_stream=task.batches("train"),
        valid_stream=valid_stream,
        initial_valid_loss=1.0,
        optimizer=optimizer,
        inner_valid_stream=inner_valid,
    )
    with torch.no_grad():
        first = float(
            task.loss(run.model_call(params), next(task.batches("outer_valid", batch_size=valid_batch_size)))
        )
    run.initial_valid_loss = first if math.isfinite(first) and first > 0 else 1.0
    return run


@dataclass
class UnrollResult:
    meta_loss: Tensor  # mean log relative outer-valid loss over the unroll (differentiable when asked)
    run: InnerRun  # state after the unroll, detached
    lrs: list[float]
    train_losses: list[float]
    alarms: int


class _CapturingCall:
    """Wraps a model call and keeps its last output (the logits the predictive-entropy feature reads)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.output: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.output = self.call(*args, **kwargs)
        return self.output


def detach_observation(obs: Observation) -> Observation:
    """The observation without autograd history (controller inputs carry no meta-gradient)."""
    return Observation(
        loss=obs.loss.detach(),
        grads=tuple(g.detach() for g in obs.grads),
        params=tuple(p.detach() for p in obs.params),
        lr=obs.lr.detach(),
        lr_rel=obs.lr_rel.detach(),
        total_steps=obs.total_steps.detach(),
        valid_loss=obs.valid_loss.detach(),
        entropy=obs.entropy.detach(),
        budget_used=obs.budget_used.detach(),
    )


def extra_observations(
    controller: LRController,
    run: InnerRun,
    params: tuple[Tensor, ...],
    outputs: Any,
    valid_every: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid_loss, entropy, budget_used)`` for the observation of step ``run.step`` (NaN = not measured).

    Shared by the native and the ``higher`` unrolls so both feed the controller identical inputs.
    """
    groups = controller.feature_spec.groups
    device = params[0].device if params else torch.device("cpu")
    nan = torch.full((), NAN, device=device)
    valid_loss = entropy = nan
    if (
        "validation" in groups
        and run.inner_valid_stream is not None
        and valid_every > 0
        and run.step % valid_every == 0
    ):
        valid_loss = run.task.loss(run.model_call(params), next(run.inner_valid_stream))
    task = run.task
    if (
        "uncertainty" in groups
        and task.num_classes
        and isinstance(outputs, Tensor)
        and outputs.dim() >= 1
        and outputs.shape[-1] == task.num_classes
    ):
        entropy = predictive_entropy(outputs).to(device)
    # Step fraction of the budget (see the module docstring for why not wall-clock time).
    budget = torch.full((), (run.step + 1) / run.task.spec.steps, device=device)
    return valid_loss, entropy, budget


def observe_step(
    controller: LRController,
    run: InnerRun,
    params: tuple[Tensor, ...],
    loss: Tensor,
    grads: tuple[Tensor, ...],
    new_params: tuple[Tensor, ...],
    lr: Tensor,
    output: Any,
    valid_every: int,
    differentiable: bool,
    detach_features: bool,
) -> PolicyState:
    """Observe the step theta_t (``params``) -> theta_{t+1} (``new_params``) and advance ``run.policy``.

    Shared by every unroll backend, so the controller sees the same observation whichever one runs.
    """
    spec = run.task.spec
    valid_loss, entropy, budget = extra_observations(controller, run, params, output, valid_every)
    obs = Observation(
        loss=loss,
        grads=grads,
        params=new_params,
        lr=lr,
        lr_rel=lr / spec.base_lr,
        total_steps=torch.full((), float(spec.steps), device=loss.device),
        valid_loss=valid_loss,
        entropy=entropy,
        budget_used=budget,
    )
    if detach_features or not differentiable:
        obs = detach_observation(obs)
    _, policy = controller.step(run.policy, obs)
    return policy if differentiable else detach_policy_state(policy)


def inner_step(
    controller: LRController,
    run: InnerRun,
    differentiable: bool,
    detach_features: bool = False,
    valid_every: int = 10,
) -> tuple[InnerRun, Tensor, Tensor]:
    """One inner training step. Returns ``(next_run, train_loss, lr_used)`` (next_run not detached).

    ``valid_every``: measure the ``inner_valid`` loss every N steps for the validation feature (only
    when the controller reads it).
    """
    params = tuple(p if p.requires_grad else p.requires_grad_(True) for p in run.params)
    batch = next(run.train_stream)
    call = _CapturingCall(run.model_call(params))
    loss = run.task.loss(call, batch)
    grads = torch.autograd.grad(loss, params, create_graph=differentiable)
    lr = run.lr(controller)
    new_params, opt_state = run.optimizer.update(grads, run.opt_state, params, lr)
    policy = observe_step(
        controller, run, params, loss, grads, new_params, lr, call.output, valid_every, differentiable, detach_features
    )
    if not differentiable:
        new_params = tuple(p.detach() for p in new_params)
        opt_state = tuple(s.detach() for s in opt_state)
    return replace(run, params=new_params, opt_state=opt_state, policy=policy, step=run.step + 1), loss, lr


def unroll(
    controller: LRController,
    run: InnerRun,
    length: int,
    differentiable: bool = True,
    detach_features: bool = False,
    objective_every: int = 1,
    valid_every: int = 10,
) -> UnrollResult:
    """Advance ``run`` by up to ``length`` steps (stops at the task's horizon) and score it.

    Args:
        controller: the policy (its parameters receive the meta-gradient when ``differentiable``).
        run: where training stands; it is not modified (its batch streams are forked).
        length: truncation length K.
        differentiable: build the second-order graph (``create_graph=True``); False for plain rollouts.
        detach_features: stop gradients through the controller's inputs (cheaper, biased); default keeps
            the exact meta-gradient (checked against finite differences in the tests).
        objective_every: measure the outer-valid loss every N inner steps (and always at the last one).
        valid_every: inner_valid measurement period for the validation feature (when the spec reads it).
    """
    # Private copies of the data streams: unrolling the same run twice (finite differences, antithetic
    # ES pairs) must see the same batches, and the caller's run must not move.
    run = replace(run, train_stream=copy.copy(run.train_stream), valid_stream=copy.copy(run.valid_stream))
    terms: list[Tensor] = []
    lrs: list[float] = []
    train_losses: list[float] = []
    alarms = 0
    steps = min(length, run.task.spec.steps - run.step)
    run = run.forked()
    with torch.enable_grad():
        for k in range(steps):
            run, loss, lr = inner_step(controller, run, differentiable, detach_features, valid_every)
            lrs.append(float(lr.detach()))
            train_losses.append(float(loss.detach()))
            alarms += int(run.policy.features.alarm.item() > 0)
            if (k + 1) % objective_every == 0 or k == steps - 1:
                batch = next(run.valid_stream)
                valid = run.task.loss(run.model_call(run.params), batch)
                terms.append(torch.log(valid / run.initial_valid_loss))
    meta_loss = torch.stack(terms).mean() if terms else torch.zeros(())
    return UnrollResult(meta_loss, run, lrs, train_losses, alarms)
