"""Task augmentation: one sampled task turned into a family of tasks that want different learning rates.

learned_optimization's ``tasks/task_augmentation.py`` and Celo (Moudgil et al., 2025) meta-train on tasks
whose parameters and losses are randomly rescaled, so a learned optimizer cannot key on the absolute scale
of one benchmark. The three augmentations here change what the right learning rate is while every feature
of format 2 stays meaningful:

* ``param_scale`` s: the model is trained in the coordinates phi = theta / s and computes with s * phi.
  The initial function is unchanged; an Adam step moves theta s times as far, an SGD step s^2 times. The
  controller sees the base LR it is given, so it must judge the effective LR from the loss and the
  gradients, as it must on a user's task.
* ``loss_scale`` c: the training loss (and so every gradient) is multiplied by c. SGD's effective LR scales
  by c; Adam's barely moves (only through epsilon). The meta-objective, a log ratio of losses, is unchanged.
* ``label_noise`` f: a fraction f of the training labels of a classification task is redrawn uniformly
  (seeded by the task seed); validation and test labels stay clean. Noisier labels reward annealing.

An augmentation lives in ``TaskSpec.options["augment"]``, so it is serialised with the spec, and
:func:`metalr.tasks.build_task` applies it after the family builds the task. Only the meta-training sampler
draws augmentations; meta-validation and evaluation tasks are never augmented.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.func import functional_call

from metalr.tasks.base import Task, TaskSpec, redraw_labels

AUGMENT_KEY = "augment"  # the TaskSpec option that holds an augmentation


@dataclass(frozen=True)
class Augmentation:
    """The augmentation drawn for one task (identity by default).

    Attributes:
        param_scale: s > 0, the model computes with s * phi and is trained in phi.
        loss_scale: c > 0, multiplies the training loss.
        label_noise: fraction in [0, 1) of training labels redrawn uniformly (classification tasks only).
    """

    param_scale: float = 1.0
    loss_scale: float = 1.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        if not (self.param_scale > 0 and self.loss_scale > 0 and 0 <= self.label_noise < 1):
            raise ValueError(
                "augmentation needs param_scale > 0, loss_scale > 0 and 0 <= label_noise < 1, got "
                f"{self.param_scale=}, {self.loss_scale=}, {self.label_noise=}"
            )

    @classmethod
    def of(cls, spec: TaskSpec) -> Augmentation:
        """The augmentation ``spec`` carries (identity when it carries none)."""
        return cls(**spec.options.get(AUGMENT_KEY, {}))

    def on(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` carrying this augmentation."""
        return spec.replace(options={**spec.options, AUGMENT_KEY: dataclasses.asdict(self)})


def unaugmented(spec: TaskSpec) -> TaskSpec:
    """``spec`` without its augmentation: what the family itself builds."""
    return spec.replace(options={k: v for k, v in spec.options.items() if k != AUGMENT_KEY})


class Reparameterized(nn.Module):
    """``model`` trained in the coordinates phi = theta / scale: the forward pass computes with scale * phi.

    The wrapped model is not a submodule, so this module's parameters are exactly the phi tensors (named
    after theta's, with ``.`` written ``__``); ``functional_call`` and ``torch.func.vmap`` over this module
    therefore see phi, and the gradient they take is d loss / d phi = scale * d loss / d theta.
    """

    inner: nn.Module  # the wrapped model (set past nn.Module.__setattr__, so it is not a submodule)

    def __init__(self, model: nn.Module, scale: float) -> None:
        super().__init__()
        object.__setattr__(self, "inner", model)
        self.scale = scale
        self.theta_names: dict[str, str] = {}
        for name, param in model.named_parameters():
            key = name.replace(".", "__")
            self.register_parameter(key, nn.Parameter(param.detach() / scale))
            self.theta_names[key] = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        theta = {self.theta_names[key]: self.scale * phi for key, phi in self.named_parameters()}
        return functional_call(self.inner, theta, args, kwargs)

    def _apply(self, fn: Any, recurse: bool = True) -> Reparameterized:
        self.inner._apply(fn, recurse)  # the wrapped model's buffers move (and change dtype) with phi
        return super()._apply(fn, recurse)


def augment_task(task: Task, augmentation: Augmentation) -> Task:
    """``task`` with ``augmentation`` applied (the task itself when it is the identity)."""
    if augmentation == Augmentation():
        return task
    if augmentation.label_noise > 0 and task.num_classes is not None:
        # task seed + 1 is the embedded families' own label noise
        labels = redraw_labels(task.splits["train"]["y"], augmentation.label_noise, task.num_classes, task.spec.seed + 2)
        task.splits["train"] = {**task.splits["train"], "y": labels}
    if augmentation.param_scale != 1.0:
        task.model = Reparameterized(task.model, augmentation.param_scale)
    if augmentation.loss_scale != 1.0:
        loss_fn, scale = task.loss_fn, augmentation.loss_scale
        task.loss_fn = lambda model_call, batch: scale * loss_fn(model_call, batch)
    return task


__all__ = ["AUGMENT_KEY", "Augmentation", "Reparameterized", "augment_task", "unaugmented"]
