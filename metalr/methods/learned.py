"""The meta-learned controller as a method: the task's base optimizer driven by :class:`LearnedLR`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor

from metalr.checkpoint import load_controller
from metalr.controller import LRController
from metalr.methods.base import MethodContext, MethodRun, register_method
from metalr.scheduler import LearnedLR
from metalr.tasks.optimizers import make_torch_optimizer

AUTO = "auto"  # the controller a user gets from LearnedLR without naming one (checkpoint.default_controller_name)


@dataclass(frozen=True)
class LearnedMethod:
    """Meta-learned LR controller deployed with ``LearnedLR`` (the checkpoint comes from the context,
    or from ``controller=`` naming a checkpoint path or shipped name; ``controller="auto"`` is what
    ``LearnedLR(optimizer, total_steps=T)`` gives a user: the shipped controller of the optimizer's family)."""

    controller: str | None = None
    name: str = "learned"
    description: str = "meta-learned LR controller (metalr LearnedLR), untuned: starts at the base LR"
    source: str = "this framework (checkpoint given by --controller)"
    tuned: bool = False
    owns_optimizer: bool = False

    def build(self, params: Iterable[Tensor], context: MethodContext) -> MethodRun:
        optimizer = make_torch_optimizer(context.optimizer, params, context.base_lr)
        controller: LRController | None
        if self.controller == AUTO:
            controller = None  # LearnedLR picks the shipped controller of the optimizer's family
        else:
            controller = load_controller(self.controller) if self.controller else context.controller
            if controller is None:
                raise ValueError(
                    "the 'learned' method needs a controller: pass --controller PATH_OR_NAME, "
                    f"or controller: PATH_OR_NAME or {AUTO!r} in its entry"
                )
        scheduler = LearnedLR(optimizer, controller, total_steps=context.total_steps)
        return MethodRun(optimizer, scheduler, validation_hook=scheduler.observe_validation)


@register_method("learned")
def learned(controller: str | None = None) -> LearnedMethod:
    return LearnedMethod(controller)
