"""The one interface every LR method implements, and the registry the CLI and suites name them by.

The evaluation harness runs every method through the same loop::

    run = create_method(name, **hyper).build(model.parameters(), context)
    for step in range(T):
        loss = task.loss(model, batch); loss.backward()
        run.optimizer.step(); run.scheduler.step(loss); run.optimizer.zero_grad()
        every eval_every steps: run.on_validation(valid_loss)   (ReduceLROnPlateau, validation features)
        around evaluation:      with run.evaluating(): ...      (schedule-free swaps its averaged weights)

A *schedule* method wraps the task's base optimizer (``torch.optim`` for ``context.optimizer``) with an LR
policy; an *optimizer-replacing* method (Schedule-Free, Prodigy, D-Adaptation, DoG, hypergradient descent)
declares ``owns_optimizer = True`` and builds its own optimizer. ``tuned`` methods are run over an initial-LR
grid and the best grid point is reported; self-tuning methods get one run per seed at their defaults.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from torch import Tensor
from torch.optim import Optimizer

from metalr.tasks.base import Task


class Policy(Protocol):
    """Anything with the scheduler half of the loop: ``step(loss)`` after ``optimizer.step()``."""

    def step(self, loss: Tensor | float | None = None) -> None: ...

    def get_last_lr(self) -> Sequence[float | Tensor]: ...


@dataclass(frozen=True)
class MethodContext:
    """What a method may know about the run it is built for.

    Attributes:
        task: the built task (model, splits, ``num_classes``, ``steps_per_epoch``).
        optimizer: the task's base optimizer name (``sgd``, ``momentum``, ``adam``, ``adamw``).
        base_lr: the initial LR (a grid point for tuned methods, the task's default otherwise).
        total_steps: the step budget T.
        controller: the learned controller for the ``learned`` method (None for every other method).
    """

    task: Task
    optimizer: str
    base_lr: float
    total_steps: int
    controller: Any = None

    @property
    def steps_per_epoch(self) -> int:
        return self.task.steps_per_epoch


@dataclass
class MethodRun:
    """A built method: the optimizer and policy the harness drives, plus optional hooks."""

    optimizer: Optimizer
    scheduler: Policy
    validation_hook: Callable[[float], None] | None = None
    eval_enter: Callable[[], None] | None = None
    eval_exit: Callable[[], None] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def on_validation(self, valid_loss: float) -> None:
        if self.validation_hook is not None:
            self.validation_hook(valid_loss)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Context for evaluation (schedule-free evaluates at its averaged iterate)."""
        if self.eval_enter is not None:
            self.eval_enter()
        try:
            yield
        finally:
            if self.eval_exit is not None:
                self.eval_exit()


class Method(Protocol):
    """A named LR method. ``build`` is called once per run, with the method's hyperparameters bound."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def source(self) -> str: ...

    @property
    def tuned(self) -> bool: ...  # True: run over the initial-LR grid; False: self-tuning, one run per seed

    @property
    def owns_optimizer(self) -> bool: ...  # True: builds its own optimizer instead of the task's base one

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun: ...


# A leaf registry: the package (metalr/methods/__init__.py) imports every method module, which registers
# itself, so importing anything under metalr.methods completes it and nothing here imports a method.
_METHODS: dict[str, Callable[..., Method]] = {}
M = TypeVar("M", bound=Callable[..., Method])


def register_method(name: str) -> Callable[[M], M]:
    """Register a method factory; its keyword arguments are the method's hyperparameters."""

    def decorator(factory: M) -> M:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = factory
        return factory

    return decorator


def list_methods() -> list[str]:
    return sorted(_METHODS)


def create_method(name: str, **hyper: Any) -> Method:
    """Instantiate a registered method with hyperparameters (unknown name or argument -> clear error)."""
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; registered methods: {', '.join(sorted(_METHODS))}")
    try:
        return _METHODS[name](**hyper)
    except TypeError as err:
        raise ValueError(f"method {name!r} does not accept {sorted(hyper)}: {err}") from None
