"""The functional, differentiable inner loop.

One :class:`InnerRun` is a task being trained (parameters as a tuple of tensors, optimizer state, the
controller's policy state, the data streams). :func:`unroll` advances it ``length`` steps:

    loss_t  = task.loss(functional_call(model, theta_t), batch_t)
    g_t     = autograd.grad(loss_t, theta_t, create_graph=differentiable)
    theta_{t+1}, opt_state = inner_optimizer.update(g_t, opt_state, theta_t, lr_t)      # no in-place ops
    log_factor_{t+1}       = controller.apply(theta, state, reductions(g_t, theta_t, theta_{t+1}))  # one feature fn
    meta_loss += log(L_outer_valid(theta_{t+1}) / L_outer_valid(theta_0))

One loop serves every backend and estimator (:func:`unroll`); a backend supplies only how the parameter
update is computed (:class:`Stepper`: the native functional optimizers here, ``higher`` in
:mod:`metalr.meta.higher_backend`). The controller runs with the weights ``theta`` it is given (its own by
default), so ES/PES evaluate perturbed controllers through the same loop. Per-step values (LRs, losses,
guard events, meta-objective terms) stay tensors and are read back once per truncation.

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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils._pytree import tree_map

from metalr.config import MetaConfig
from metalr.controller import LRController, PolicyState, detach_tree
from metalr.features import Observation, Tensors, predictive_entropy
from metalr.meta.inner import InnerOptimizer, make_inner_optimizer
from metalr.tasks.base import BatchStream, Task

NAN = float("nan")


class Carry(NamedTuple):
    """Parameters, optimizer state, previous update and policy state: what one inner step maps to the next."""

    params: Tensors
    opt_state: Tensors
    prev_update: Tensors
    policy: PolicyState


@dataclass
class InnerRun:
    """A task in the middle of training (one slot of the meta-batch)."""

    task: Task
    names: tuple[str, ...]
    params: Tensors
    opt_state: Tensors
    policy: PolicyState
    step: int
    train_stream: BatchStream
    valid_stream: BatchStream
    initial_valid_loss: float
    optimizer: InnerOptimizer
    # u_{t-1} = theta_{t-1} - theta_t, one tensor per parameter: the parameter-sized state the features
    # read (zeros at step 0)
    prev_update: Tensors = ()
    # inner_valid batches for the validation-gap feature (None: the task is never validated in the unroll)
    inner_valid_stream: BatchStream | None = None

    @property
    def done(self) -> bool:
        return self.step >= self.task.spec.steps

    @property
    def carry(self) -> Carry:
        """The tensors that training carries from step to step (a pytree; batched for particles)."""
        return Carry(self.params, self.opt_state, self.prev_update, self.policy)

    def with_carry(self, carry: Carry) -> InnerRun:
        return replace(
            self, params=carry.params, opt_state=carry.opt_state, prev_update=carry.prev_update, policy=carry.policy
        )

    def detached(self) -> InnerRun:
        """Truncation boundary: the carried state loses its autograd history."""
        return self.with_carry(detach_tree(self.carry))

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
        )

    def model_call(self, params: Tensors) -> Any:
        param_dict = dict(zip(self.names, params, strict=True))
        return lambda *args, **kwargs: functional_call(self.task.model, param_dict, args, kwargs)

    @property
    def clock(self) -> Clock:
        return Clock(float(self.step), float(self.task.spec.steps), self.task.spec.base_lr, self.initial_valid_loss)

    def lr(self, controller: LRController, policy: PolicyState | None = None) -> Tensor:
        """The learning rate for the next step under ``controller``."""
        return lr_at(controller, (policy or self.policy).log_factor, self.clock)


class Clock(NamedTuple):
    """The per-run scalars an inner step reads: Python floats for one run, tensors ``[M]`` for a population."""

    step: Tensor | float
    steps: Tensor | float
    base_lr: Tensor | float
    initial_valid_loss: Tensor | float

    def tick(self) -> Clock:
        return self._replace(step=self.step + 1)


class Objective(NamedTuple):
    """How an unroll is scored: the mean of weighted, capped terms log(L_outer_valid(theta_t) / L_0).

    Attributes:
        every: measure the outer-valid loss every N inner steps (and always at the last one).
        cap: clamp each term at this value and count a non-finite one (a diverged run) as it, so a diverged
            particle scores the cap instead of voiding the truncation, and no single blow-up dominates the
            meta-gradient. A loss of exactly 0 (``-inf``, e.g. a float32 cross-entropy underflow) is not a
            divergence: it stays ``-inf``, and the trainer skips that truncation as it skips every
            non-finite one. ``None``: no cap. A capped term has no gradient, so this is meant for ES/PES.
        power: weight the term measured at step ``t`` of a ``T``-step task by ``(p + 1) (t / T)^p``, after
            the cap. The weights average to 1 over a whole horizon, so the scale of the objective stays the
            same. ``0`` weights every term equally (the mean loss over training); a larger ``p`` moves the
            weight to the end of training, where the final loss is measured.
    """

    every: int = 1
    cap: float | None = None
    power: float = 0.0

    @classmethod
    def of(cls, meta: MetaConfig) -> Objective:
        """The meta-training objective a recipe's ``meta`` settings describe."""
        return cls(meta.objective_every, meta.objective_cap, meta.objective_power)

    def term(self, log_ratio: Tensor, clock: Clock) -> Tensor:
        """One measurement's contribution, from ``log(L / L_0)`` at ``clock`` (after the step)."""
        if self.cap is not None:  # a zero loss (-inf) stays non-finite, so its truncation is skipped
            log_ratio = torch.nan_to_num(log_ratio, nan=self.cap, posinf=self.cap, neginf=-math.inf)
            log_ratio = log_ratio.clamp(max=self.cap)
        if self.power:
            log_ratio = log_ratio * ((self.power + 1) * (clock.step / clock.steps) ** self.power)
        return log_ratio


EVERY_STEP = Objective()  # measured after every inner step, uncapped, unweighted


def lr_at(controller: LRController, log_factor: Tensor, clock: Clock) -> Tensor:
    """The learning rate of the step at ``clock`` for the controller output ``log_factor``."""
    p = controller.policy
    return p.clamp_lr(clock.base_lr * p.lr_scale(log_factor, clock.step, clock.steps))


def _scalar(value: Tensor | float, like: Tensor) -> Tensor:
    """``value`` as a tensor of ``like``'s dtype and device (a population's clock is a tensor already)."""
    if isinstance(value, Tensor):
        return value.to(like.dtype)
    return torch.full((), value, dtype=like.dtype, device=like.device)


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
        policy=controller.init(list(params)),
        step=0,
        train_stream=task.batches("train"),
        valid_stream=valid_stream,
        initial_valid_loss=1.0,
        optimizer=optimizer,
        prev_update=tuple(torch.zeros_like(p) for p in params),
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
    run: InnerRun  # state after the unroll (detached unless it was differentiable)
    lrs: list[float]
    train_losses: list[float]
    alarms: int


class StepOutcome(NamedTuple):
    """What a backend's inner update returns for one step theta_t -> theta_{t+1}."""

    params: Tensors  # theta_t, as differentiated (requires_grad leaves or graph nodes)
    loss: Tensor
    grads: Tensors
    new_params: Tensors
    opt_state: Tensors
    output: Any  # the model's last forward output (logits for the uncertainty feature), or None


class Stepper(Protocol):
    """A backend's inner update for the duration of one unroll (``begin`` builds it, ``end`` closes it)."""

    records_graph: bool  # outputs may carry autograd history even when not differentiable (then detached)

    def step(self, run: InnerRun, batch: Any, lr: Tensor, differentiable: bool) -> StepOutcome: ...

    def end(self, run: InnerRun, steps: int) -> InnerRun: ...


class Backend(Protocol):
    def begin(self, run: InnerRun, differentiable: bool, vectorised: bool = False) -> Stepper:
        """The stepper of one unroll; ``vectorised``: it will run under ``torch.func.vmap``."""
        ...


class _CapturingCall:
    """Wraps a model call and keeps its last output (the logits the predictive-entropy feature reads)."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.output: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.output = self.call(*args, **kwargs)
        return self.output


class NativeStepper:
    """``torch.func.functional_call`` + the functional optimizers of ``meta.inner``.

    Differentiable: ``torch.autograd.grad(..., create_graph=True)``, so the meta-gradient flows through the
    inner updates. Vectorised (ES/PES particles, populations): ``torch.func.grad``, which ``vmap`` batches
    and which records no graph. Otherwise (plain rollouts, staggering): a first-order ``autograd.grad`` on
    detached leaves, which also serves models that functorch cannot transform (the packed-sequence LSTM).
    """

    records_graph = False  # without differentiable=True its outputs carry no autograd history

    def __init__(self, vectorised: bool = False) -> None:
        self.vectorised = vectorised

    def step(self, run: InnerRun, batch: Any, lr: Tensor, differentiable: bool) -> StepOutcome:
        if self.vectorised:

            def loss_and_output(params: Tensors) -> tuple[Tensor, Any]:
                call = _CapturingCall(run.model_call(params))
                loss = run.task.loss(call, batch)
                return loss, (loss, call.output if isinstance(call.output, Tensor) else None)

            params = run.params
            grads, (loss, output) = torch.func.grad(loss_and_output, has_aux=True)(params)
        else:
            with torch.enable_grad():
                if differentiable:
                    params = tuple(p if p.requires_grad else p.requires_grad_(True) for p in run.params)
                else:
                    params = tuple(p.detach().requires_grad_(True) for p in run.params)
                call = _CapturingCall(run.model_call(params))
                loss = run.task.loss(call, batch)
                grads = torch.autograd.grad(loss, params, create_graph=differentiable)
            output = call.output
            if not differentiable:
                params, loss, grads = detach_tree((params, loss, grads))
                output = output.detach() if isinstance(output, Tensor) else None
        new_params, opt_state = run.optimizer.update(grads, run.opt_state, params, lr)
        return StepOutcome(params, loss, grads, new_params, opt_state, output)

    def end(self, run: InnerRun, steps: int) -> InnerRun:
        return run


class NativeBackend:
    def begin(self, run: InnerRun, differentiable: bool, vectorised: bool = False) -> Stepper:
        return NativeStepper(vectorised)


NATIVE = NativeBackend()


def extra_observations(
    controller: LRController, run: InnerRun, clock: Clock, params: Tensors, outputs: Any, valid_every: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``(valid_loss, entropy, budget_used)`` for the observation of the step at ``clock`` (NaN = not measured)."""
    groups = controller.feature_spec.groups
    device = params[0].device if params else torch.device("cpu")
    nan = torch.full((), NAN, device=device)
    valid_loss = entropy = nan
    if (
        "validation" in groups
        and run.inner_valid_stream is not None
        and valid_every > 0
        and int(clock.step) % valid_every == 0
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
    budget = _scalar((clock.step + 1) / clock.steps, params[0] if params else nan)
    return valid_loss, entropy, budget


def observe_step(
    controller: LRController,
    theta: Mapping[str, Tensor] | None,
    run: InnerRun,
    clock: Clock,
    outcome: StepOutcome,
    lr: Tensor,
    valid_every: int,
    differentiable: bool,
    detach_features: bool,
) -> tuple[PolicyState, Tensors]:
    """Observe the step ``outcome`` (theta_t -> theta_{t+1}) at ``clock`` and advance ``run.policy``.

    Returns ``(policy, update)``; ``update`` is u_t (per parameter), the next step's ``prev_update``.
    """
    valid_loss, entropy, budget = extra_observations(controller, run, clock, outcome.params, outcome.output, valid_every)
    obs, update = Observation.of_step(
        outcome.loss,
        outcome.grads,
        outcome.params,
        outcome.new_params,
        run.prev_update,
        lr=lr,
        lr_rel=lr / clock.base_lr,
        total_steps=_scalar(clock.steps, lr),
        valid_loss=valid_loss,
        entropy=entropy,
        budget_used=budget,
    )
    if detach_features or not differentiable:
        obs = detach_tree(obs)
    if theta is None:
        _, policy = controller.step(run.policy, obs)
    else:
        _, policy = controller.apply(theta, run.policy, obs)
    return policy, update


def stack_trees(items: Sequence[Any]) -> Any:
    """Stack same-shaped pytrees along a new leading dimension (particles, population members)."""
    return tree_map(lambda *leaves: torch.stack(leaves), *items)


def index_tree(tree: Any, i: int) -> Any:
    return tree_map(lambda t: t[i], tree)


def population_key(run: InnerRun) -> tuple[Any, ...]:
    """What the members of a population must share: one architecture, data shapes, optimizer and horizon.

    Members differ in seed (data order and subset, label noise, initialisation) and base LR, and are
    trained in lockstep (the same step), so their carries and batches stack along one leading dimension.
    """
    spec = run.task.spec
    options = tuple(sorted((k, repr(v)) for k, v in spec.options.items()))
    shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in zip(run.names, run.params, strict=True))
    return (spec.family, options, spec.optimizer, spec.batch_size, spec.steps, run.step, shapes)


def check_population(runs: Sequence[InnerRun], controller: LRController) -> None:
    keys = {population_key(r) for r in runs}
    if len(keys) > 1:
        raise ValueError(
            f"a population trains tasks of one architecture in lockstep, got {len(keys)} different "
            f"(family, options, optimizer, batch size, horizon, step) among {[r.task.spec.label for r in runs]}"
        )
    if "validation" in controller.feature_spec.groups:
        raise ValueError(
            "the validation feature group measures inner_valid on each task's own schedule, which a vmapped "
            "population cannot do; use population 1 for controllers that read it"
        )


def unroll(
    controller: LRController,
    run: InnerRun,
    length: int,
    differentiable: bool = True,
    detach_features: bool = False,
    objective: Objective = EVERY_STEP,
    valid_every: int = 10,
    theta: Mapping[str, Tensor] | None = None,
    backend: Backend = NATIVE,
    particles: int = 0,
) -> UnrollResult:
    """Advance ``run`` by up to ``length`` steps (stops at the task's horizon) and score it.

    Args:
        controller: the policy (its parameters receive the meta-gradient when ``differentiable``).
        run: where training stands; it is not modified (its batch streams are forked).
        length: truncation length K.
        differentiable: build the second-order graph (``create_graph=True``); False for plain rollouts.
        detach_features: stop gradients through the controller's inputs (cheaper, biased); default keeps
            the exact meta-gradient (checked against finite differences in the tests).
        objective: how the unroll is scored (:class:`Objective`: measurement period, cap, weighting).
        valid_every: inner_valid measurement period for the validation feature (when the spec reads it).
        theta: controller weights to run with (``controller.theta()`` keys), e.g. an ES/PES perturbation;
            ``None`` runs the controller's own.
        backend: how the inner update is computed (native functional optimizers, or ``higher``).
        particles: ``P > 0`` runs ``P`` copies of the task at once with ``torch.func.vmap``: ``run.carry`` and
            every ``theta`` tensor have a leading dimension ``P``, all particles see the same batches, and the
            result's ``meta_loss`` has shape ``[P]`` (``lrs``/``train_losses`` follow particle 0, ``alarms``
            sums over particles). Needs ``differentiable=False`` and the native backend.
    """
    return _unroll(
        controller,
        [run],
        length,
        population=False,
        differentiable=differentiable,
        detach_features=detach_features,
        objective=objective,
        valid_every=valid_every,
        theta=theta,
        backend=backend,
        particles=particles,
    )[0]


def unroll_population(
    controller: LRController,
    runs: Sequence[InnerRun],
    length: int,
    objective: Objective = EVERY_STEP,
    valid_every: int = 10,
    theta: Mapping[str, Tensor] | None = None,
    particles: int = 0,
) -> list[UnrollResult]:
    """:func:`unroll` of a *population*: tasks of one architecture in lockstep (:func:`population_key`).

    All members (and their ``particles``) run as one ``torch.func.vmap``-ed first-order unroll; the result
    is what unrolling each member on its own would give, one :class:`UnrollResult` per member. The members'
    carries are stacked along a leading dimension ``M`` (before the particles'), and so is ``theta`` when
    given (each member has its own perturbations); ``None`` runs the controller's own weights for all.
    """
    if not runs:
        return []
    return _unroll(
        controller,
        list(runs),
        length,
        population=True,
        differentiable=False,
        detach_features=False,
        objective=objective,
        valid_every=valid_every,
        theta=theta,
        backend=NATIVE,
        particles=particles,
    )


def _unroll(
    controller: LRController,
    runs: list[InnerRun],
    length: int,
    *,
    population: bool,
    differentiable: bool,
    detach_features: bool,
    objective: Objective,
    valid_every: int,
    theta: Mapping[str, Tensor] | None,
    backend: Backend,
    particles: int,
) -> list[UnrollResult]:
    """The one unroll loop (of one run, or vmapped over a population); see :func:`unroll`."""
    members = [r.forked() for r in runs]
    if particles and (differentiable or theta is None):
        raise ValueError("a vectorised unroll (particles > 0) is first-order and needs the particles' theta")
    if population:
        if differentiable or backend is not NATIVE:
            raise ValueError("a population unroll is first-order (differentiable=False) on the native backend")
        check_population(members, controller)
    # Private copies of the data streams (forked above): unrolling the same run twice (finite differences,
    # antithetic ES pairs) must see the same batches, and the caller's run must not move.
    template = members[0]
    steps = min(length, template.task.spec.steps - template.step)
    stepper = backend.begin(template, differentiable, vectorised=bool(particles) or population)

    def advance(
        weights: Mapping[str, Tensor] | None, carry: Carry, batch: Any, clock: Clock
    ) -> tuple[Carry, Tensor, Tensor, Tensor]:
        current = template.with_carry(carry)
        lr = lr_at(controller, carry.policy.log_factor, clock)
        outcome = stepper.step(current, batch, lr, differentiable)
        policy, update = observe_step(
            controller, weights, current, clock, outcome, lr, valid_every, differentiable, detach_features
        )
        return Carry(outcome.new_params, outcome.opt_state, update, policy), lr, outcome.loss, policy.features.alarm

    def measure(params: Tensors, batch: Any, clock: Clock) -> Tensor:
        loss = template.task.loss(template.model_call(params), batch)
        return objective.term(torch.log(loss / clock.initial_valid_loss), clock)

    # One vmap level: over particles, over members, or over members x particles flattened into M * P lanes
    # (member-major), where each member's batch and clock are repeated for its particles. Nested vmaps
    # would work in principle, but some losses' batching rules (mse_loss) fail on mixed levels.
    repeat = particles if population and particles else 1
    advance_fn, objective_fn = advance, measure
    if particles and not population:  # particles of one task share its batches and clock
        advance_fn = torch.func.vmap(advance_fn, in_dims=(0, 0, None, None), randomness="same")
        objective_fn = torch.func.vmap(objective_fn, in_dims=(0, None, None), randomness="same")
    if population:  # every lane has its own batch and clock
        advance_fn = torch.func.vmap(advance_fn, in_dims=(0 if theta is not None else None, 0, 0, 0), randomness="same")
        objective_fn = torch.func.vmap(objective_fn, in_dims=(0, 0, 0), randomness="same")
        carry = stack_trees([m.carry for m in members])
        if repeat > 1:
            carry, theta = tree_map(lambda t: t.flatten(0, 1), (carry, theta))
        like = template.params[0] if template.params else torch.zeros(())
        columns = list(zip(*(m.clock for m in members), strict=True))
        # step and steps are whole numbers (exact in float32, the dtype the base schedule gets for a single
        # run's float step), so a member's LRs are bit-for-bit those of the same run unrolled alone.
        clock = Clock(
            *(torch.tensor(c, dtype=torch.float32, device=like.device) for c in columns[:2]),
            *(torch.tensor(c, dtype=like.dtype, device=like.device) for c in columns[2:]),
        )
        clock = tree_map(lambda t: t.repeat_interleave(repeat, 0), clock)
    else:
        carry, clock = template.carry, template.clock

    def next_batch(stream: str) -> Any:
        batches = [next(getattr(m, stream)) for m in members]
        if not population:
            return batches[0]
        stacked = stack_trees(batches)
        return tree_map(lambda t: t.repeat_interleave(repeat, 0), stacked) if repeat > 1 else stacked

    terms: list[Tensor] = []
    lrs: list[Tensor] = []
    losses: list[Tensor] = []
    alarms: list[Tensor] = []
    graph_free = not differentiable and not stepper.records_graph
    with torch.no_grad() if graph_free else torch.enable_grad():
        if graph_free:
            carry = detach_tree(carry)
        for k in range(steps):
            carry, lr, loss, alarm = advance_fn(theta, carry, next_batch("train_stream"), clock)
            clock = clock.tick()
            if not (differentiable or graph_free):
                carry = detach_tree(carry)
            lrs.append(lr.detach())
            losses.append(loss.detach())
            alarms.append(alarm.detach())
            if (k + 1) % objective.every == 0 or k == steps - 1:
                terms.append(objective_fn(carry.params, next_batch("valid_stream"), clock))
        if population:
            if repeat > 1:
                carry = tree_map(lambda t: t.unflatten(0, (len(members), repeat)), carry)
            after = [replace(m, step=m.step + steps).with_carry(index_tree(carry, i)) for i, m in enumerate(members)]
        else:
            after = [stepper.end(replace(template, step=template.step + steps).with_carry(carry), steps)]
    shape = ((len(members),) if population else ()) + ((particles,) if particles else ())
    meta_loss = torch.stack(terms).mean(0).reshape(shape) if terms else torch.zeros(shape)
    if not population:
        meta_loss = meta_loss.unsqueeze(0)
    if not steps:
        return [UnrollResult(meta_loss[i], r, [], [], 0) for i, r in enumerate(after)]

    def per_member(values: list[Tensor]) -> Tensor:  # [steps, M, particles or 1]
        return torch.stack(values).reshape(steps, len(members), -1)

    # One read-back per truncation instead of three host syncs per inner step; traces follow particle 0.
    trace = torch.stack([per_member(lrs)[..., 0], per_member(losses)[..., 0]]).to(torch.float64)
    per_run = trace.transpose(1, 2).tolist()  # [2, M, steps]
    counts = (per_member(alarms) > 0).sum((0, 2)).tolist()
    return [UnrollResult(meta_loss[i], r, per_run[0][i], per_run[1][i], int(counts[i])) for i, r in enumerate(after)]
