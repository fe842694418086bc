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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call

from metalr.controller import LRController, PolicyState, detach_policy_state
from metalr.features import Observation
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

    def model_call(self, params: tuple[Tensor, ...]) -> Any:
        param_dict = dict(zip(self.names, params, strict=True))
        return lambda *args, **kwargs: functional_call(self.task.model, param_dict, args, kwargs)

    def lr(self, controller: LRController, policy: PolicyState | None = None) -> Tensor:
        """The learning rate for the next step under ``controller``."""
        p = controller.policy
        log_factor = (policy or self.policy).log_factor
        spec = self.task.spec
        return p.clamp_lr(spec.base_lr * p.lr_scale(log_factor, float(self.step), float(spec.steps)))


def start_run(task: Task, controller: LRController, valid_batch_size: int = 128, dtype: torch.dtype | None = None) -> InnerRun:
    """Initial state of training ``task`` under ``controller``."""
    if dtype is not None:
        task.model.to(dtype)
        task.splits = {
            s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in cols.items()} for s, cols in task.splits.items()
        }
    named = dict(task.model.named_parameters())
    names = tuple(named)
    params = tuple(p.detach().clone() for p in named.values())
    optimizer = make_inner_optimizer(task.spec.optimizer)
    valid_stream = task.batches("outer_valid", batch_size=valid_batch_size)
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
    )
    with torch.no_grad():
        first = float(task.loss(run.model_call(params), next(task.batches("outer_valid", batch_size=valid_batch_size))))
    run.initial_valid_loss = first if math.isfinite(first) and first > 0 else 1.0
    return run


@dataclass
class UnrollResult:
    meta_loss: Tensor  # mean log relative outer-valid loss over the unroll (differentiable when asked)
    run: InnerRun  # state after the unroll, detached
    lrs: list[float]
    train_losses: list[float]
    alarms: int


def inner_step(
    controller: LRController,
    run: InnerRun,
    differentiable: bool,
    detach_features: bool = False,
) -> tuple[InnerRun, Tensor, Tensor]:
    """One inner training step. Returns ``(next_run, train_loss, lr_used)`` (next_run not detached)."""
    params = tuple(p if p.requires_grad else p.requires_grad_(True) for p in run.params)
    batch = next(run.train_stream)
    loss = run.task.loss(run.model_call(params), batch)
    grads = torch.autograd.grad(loss, params, create_graph=differentiable)
    lr = run.lr(controller)
    new_params, opt_state = run.optimizer.update(grads, run.opt_state, params, lr)
    spec = run.task.spec
    obs = Observation(
        loss=loss,
        grads=grads,
        params=new_params,
        lr=lr,
        lr_rel=lr / spec.base_lr,
        total_steps=torch.tensor(float(spec.steps)),
        valid_loss=torch.tensor(NAN),
        entropy=torch.tensor(NAN),
        budget_used=torch.tensor(NAN),
    )
    if detach_features or not differentiable:
        obs = Observation(*(tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach() for v in obs))
    _, policy = controller.step(run.policy, obs)
    if not differentiable:
        new_params = tuple(p.detach() for p in new_params)
        opt_state = tuple(s.detach() for s in opt_state)
        policy = detach_policy_state(policy)
    return replace(run, params=new_params, opt_state=opt_state, policy=policy, step=run.step + 1), loss, lr


def unroll(
    controller: LRController,
    run: InnerRun,
    length: int,
    differentiable: bool = True,
    detach_features: bool = False,
    objective_every: int = 1,
) -> UnrollResult:
    """Advance ``run`` by up to ``length`` steps (stops at the task's horizon) and score it.

    Args:
        controller: the policy (its parameters receive the meta-gradient when ``differentiable``).
        run: where training stands; it is not modified.
        length: truncation length K.
        differentiable: build the second-order graph (``create_graph=True``); False for plain rollouts.
        detach_features: stop gradients through the controller's inputs (cheaper, biased); default keeps
            the exact meta-gradient (checked against finite differences in the tests).
        objective_every: measure the outer-valid loss every N inner steps (and always at the last one).
    """
    terms: list[Tensor] = []
    lrs: list[float] = []
    train_losses: list[float] = []
    alarms = 0
    steps = min(length, run.task.spec.steps - run.step)
    with torch.enable_grad():
        for k in range(steps):
            run, loss, lr = inner_step(controller, run, differentiable, detach_features)
            lrs.append(float(lr))
            train_losses.append(float(loss))
            alarms += int(run.policy.features.alarm.item() > 0)
            if (k + 1) % objective_every == 0 or k == steps - 1:
                batch = next(run.valid_stream)
                valid = run.task.loss(run.model_call(run.params), batch)
                terms.append(torch.log(valid / run.initial_valid_loss))
    meta_loss = torch.stack(terms).mean() if terms else torch.zeros(())
    return UnrollResult(meta_loss, run, lrs, train_losses, alarms)
