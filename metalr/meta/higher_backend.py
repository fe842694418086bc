"""The ``higher`` backend (``meta.backend: higher``) for the backprop estimators.

``higher`` (Grefenstette et al., 2019) monkey-patches a module into a stateless one with "fast weights"
and ships differentiable copies of ``torch.optim`` optimizers. :func:`higher_unroll` is a drop-in for
:func:`metalr.meta.unroll.unroll`: the same observations, the same controller step, the same
meta-objective, only the parameter update is done by ``higher``'s ``DifferentiableSGD`` /
``DifferentiableAdam`` with the controller's LR passed as an ``override`` tensor (so the meta-gradient
flows into it). The tests check both backends give the same meta-gradient to 1e-6 in float64.

Why keep it, when the native unroll is the default: it is an independent implementation of the update
rules to check the native one against, and researchers coming from MAML code know it. Why it is not the
default: it is unmaintained and has no AdamW (requests for ``adamw`` fail with a clear error).

The carried optimizer state (:attr:`InnerRun.opt_state`, in the native layout) is converted to ``higher``'s
per-parameter state dicts at the start of each truncation and back at the end, so truncations, resumption
and switching backends between runs all see one state format.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from metalr.controller import LRController
from metalr.meta.unroll import InnerRun, StepOutcome, Stepper, UnrollResult, unroll
from metalr.tasks.optimizers import OptimizerHyper, make_torch_optimizer

HIGHER_OPTIMIZERS = ("sgd", "momentum", "adam")


class HigherBackendError(ValueError):
    """The ``higher`` backend cannot run this task (missing package, unsupported optimizer)."""


def _import_higher() -> Any:
    try:
        import higher
    except ImportError as err:
        raise HigherBackendError(
            "meta.backend: higher needs the higher package (pip install 'metalr[higher]'); or use backend: native"
        ) from err
    return higher


def _load_state(
    opt: torch.optim.Optimizer, name: str, params: list[torch.nn.Parameter], opt_state: tuple[Tensor, ...]
) -> None:
    """Write the native optimizer state into a ``torch.optim`` optimizer (which ``higher`` copies from)."""
    n = len(params)
    count = int(opt_state[0]) if opt_state else 0
    if name == "momentum" and count > 0:
        for p, buf in zip(params, opt_state[1 : 1 + n], strict=True):
            opt.state[p] = {"momentum_buffer": buf}
    elif name == "adam" and count > 0:
        for p, m, v in zip(params, opt_state[1 : 1 + n], opt_state[1 + n :], strict=True):
            opt.state[p] = {"step": count, "exp_avg": m, "exp_avg_sq": v}


def _read_state(
    diffopt: Any, name: str, opt_state: tuple[Tensor, ...], n: int, steps: int
) -> tuple[Tensor, ...]:
    """``higher``'s per-parameter state back in the native layout (see ``metalr.meta.inner``)."""
    if name == "sgd" or steps == 0:
        return opt_state
    states = [diffopt.state[0][i] for i in range(n)]
    count = opt_state[0] + steps
    if name == "momentum":
        return (count, *(s["momentum_buffer"] for s in states))
    return (count, *(s["exp_avg"] for s in states), *(s["exp_avg_sq"] for s in states))


class HigherStepper:
    """One unroll's inner updates by ``higher``: a patched model and a differentiable optimizer."""

    records_graph = True

    def __init__(self, run: InnerRun, differentiable: bool) -> None:
        higher = _import_higher()
        spec = run.task.spec
        if spec.optimizer not in HIGHER_OPTIMIZERS:
            raise HigherBackendError(
                f"the higher backend has no differentiable {spec.optimizer!r} (it supports {list(HIGHER_OPTIMIZERS)}; "
                f"higher lacks AdamW); use meta.backend: native for task {spec.label}"
            )
        model = run.task.model
        self.reference = list(model.parameters())
        self.hyper = OptimizerHyper()
        self.start_count = int(run.opt_state[0]) if run.opt_state else 0
        optimizer = make_torch_optimizer(spec.optimizer, self.reference, spec.base_lr, self.hyper)
        _load_state(optimizer, spec.optimizer, self.reference, run.opt_state)
        self.fmodel = higher.monkeypatch(model, copy_initial_weights=True, track_higher_grads=differentiable)
        self.fmodel.update_params([p if p.requires_grad else p.requires_grad_(True) for p in run.params])
        self.diffopt = higher.optim.get_diff_optim(
            optimizer, self.reference, fmodel=self.fmodel, track_higher_grads=differentiable
        )
        self.steps = 0
        self.differentiable = differentiable

    def step(self, run: InnerRun, batch: Any, lr: Tensor, differentiable: bool) -> StepOutcome:
        params = tuple(self.fmodel.fast_params)
        outputs: list[Any] = []

        def call(*args: Any, **kwargs: Any) -> Any:
            outputs.append(self.fmodel(*args, **kwargs))
            return outputs[-1]

        loss = run.task.loss(call, batch)
        captured: list[tuple[Tensor, ...]] = []

        def keep(grads: Any) -> Any:
            captured.append(tuple(grads))
            return grads

        override: dict[str, list[Any]] = {"lr": [lr]}
        self.steps += 1
        if run.task.spec.optimizer == "adam":
            # higher adds eps before the bias correction (sqrt(v) + eps); torch.optim.Adam, the native
            # unroll and deployment add it after (sqrt(v / bc2) + eps). Passing eps * sqrt(bc2) per step
            # makes the two identical, so the backends agree to float64 precision, not just to ~eps.
            bias_correction2 = 1 - self.hyper.beta2 ** (self.start_count + self.steps)
            override["eps"] = [self.hyper.eps * bias_correction2**0.5]
        new_params = tuple(self.diffopt.step(loss, override=override, grad_callback=keep))
        return StepOutcome(params, loss, captured[0], new_params, run.opt_state, outputs[-1] if outputs else None)

    def end(self, run: InnerRun, steps: int) -> InnerRun:
        opt_state = _read_state(self.diffopt, run.task.spec.optimizer, run.opt_state, len(self.reference), steps)
        if not self.differentiable:
            opt_state = tuple(s.detach() for s in opt_state)
        return replace(run, opt_state=opt_state)


class HigherBackend:
    def begin(self, run: InnerRun, differentiable: bool, vectorised: bool = False) -> Stepper:
        return HigherStepper(run, differentiable)


HIGHER = HigherBackend()


def higher_unroll(controller: LRController, run: InnerRun, length: int, **kwargs: Any) -> UnrollResult:
    """:func:`metalr.meta.unroll.unroll` with ``higher`` doing the inner updates (same arguments)."""
    return unroll(controller, run, length, backend=HIGHER, **kwargs)
