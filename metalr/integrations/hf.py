"""``LearnedLR`` inside a Hugging Face ``transformers.Trainer``.

``Trainer`` calls ``lr_scheduler.step()`` without arguments after every optimizer step (and skips the
call when mixed precision skipped the optimizer step), so the scheduler never sees the loss through
Trainer's own API, and no callback event carries it. :class:`LearnedLRCallback` closes the gap:

* it wraps the trainer's ``training_step`` (the instance attribute; subclass overrides keep working) and
  sums the losses it returns over the micro-batches of one optimizer step. Trainer has already divided
  each micro-batch loss by the number of accumulation steps (or normalised it by the items in the whole
  accumulated batch), so the sum is the loss of the optimizer step - the number Trainer logs;
* in ``on_optimizer_step`` - after ``optimizer.step()``, after gradient clipping, before Trainer calls
  ``lr_scheduler.step()`` and before ``zero_grad`` - it hands that loss to the scheduler
  (:meth:`LearnedLR.observe_loss`), so the controller steps once per optimizer step with that step's loss
  and the (clipped, DDP-averaged) gradients still on the parameters;
* it builds the ``LearnedLR`` itself with ``total_steps`` = Trainer's number of optimizer steps, unless
  you passed one through ``Trainer(optimizers=(optimizer, LearnedLR(...)))``.

Under ``torchrun`` (DDP), the loss is averaged over the ranks inside ``LearnedLR.step``, so every rank
computes the same LR. Scheduler state is saved in Trainer checkpoints (``scheduler.pt``) and restored by
``trainer.train(resume_from_checkpoint=...)``.

Example:
    >>> from transformers import Trainer, TrainingArguments
    >>> from metalr.integrations.hf import LearnedLRCallback
    >>> trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=train)
    >>> LearnedLRCallback("demo").attach(trainer)   # a shipped name, a .safetensors path or an LRController
    >>> trainer.train()

Do not pass a ``LearnedLR`` through ``accelerate.Accelerator.prepare`` in hand-written Accelerate loops:
its ``AcceleratedScheduler`` steps a scheduler once per process per optimizer step (unless
``split_batches=True``), and the controller would observe each step several times.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from torch import Tensor

try:
    from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as err:  # an optional extra: say which one instead of a bare import error
    raise ModuleNotFoundError(
        "metalr.integrations.hf needs Hugging Face transformers (and accelerate for Trainer): "
        "pip install 'metalr[data]'",
        name=err.name,
    ) from err

from metalr.controller import LRController
from metalr.scheduler import LearnedLR

__all__ = ["LearnedLRCallback"]


class LearnedLRCallback(TrainerCallback):
    """Drive a ``Trainer`` run's learning rate with a meta-learned controller.

    Args:
        controller: the controller (or a checkpoint path / shipped name) for the ``LearnedLR`` this callback
            builds when Trainer creates its scheduler. ``None`` when the trainer was given a ``LearnedLR``
            through ``optimizers=(optimizer, scheduler)``.
        **scheduler_kwargs: further keyword arguments for :class:`LearnedLR` (e.g. ``time_budget_s``).

    Call :meth:`attach` once, before ``trainer.train()``; it registers the callback too.

    Example:
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
        >>> sched = LearnedLR(optimizer, "demo", total_steps=1000)
        >>> trainer = Trainer(model=model, args=args, train_dataset=train, optimizers=(optimizer, sched))
        >>> LearnedLRCallback().attach(trainer)
    """

    def __init__(
        self, controller: LRController | str | os.PathLike[str] | None = None, **scheduler_kwargs: Any
    ) -> None:
        self.controller = controller
        self.scheduler_kwargs = scheduler_kwargs
        self.scheduler: LearnedLR | None = None
        self._step_loss: Tensor | None = None
        self._attached_to: Trainer | None = None

    def attach(self, trainer: Trainer) -> LearnedLRCallback:
        """Route each optimizer step's loss to the scheduler and make Trainer build a ``LearnedLR``.

        Returns:
            ``self`` (so ``callback = LearnedLRCallback(c).attach(trainer)`` reads naturally).

        Raises:
            ValueError: no controller was given and the trainer has no ``LearnedLR`` of its own.
        """
        if self._attached_to is trainer:
            return self
        if self._attached_to is not None:
            raise ValueError(
                "this LearnedLRCallback is already attached to another Trainer; make one per Trainer"
            )
        given = trainer.lr_scheduler
        if given is not None and not isinstance(given, LearnedLR):
            raise ValueError(
                f"the Trainer was given a {type(given).__name__} scheduler; LearnedLRCallback drives a LearnedLR - "
                "pass optimizers=(optimizer, None) with a controller, or optimizers=(optimizer, LearnedLR(...))"
            )
        if given is None and self.controller is None:
            raise ValueError(
                "LearnedLRCallback needs a controller (checkpoint path, shipped name or LRController), or a "
                "Trainer built with optimizers=(optimizer, LearnedLR(...))"
            )
        self._attached_to = trainer
        trainer.add_callback(self)

        training_step = trainer.training_step

        @functools.wraps(training_step)
        def recording_training_step(*args: Any, **kwargs: Any) -> Tensor:
            loss = training_step(*args, **kwargs)
            # A detached tensor stays on the device: no host sync per micro-batch.
            loss = loss.detach()
            self._step_loss = loss if self._step_loss is None else self._step_loss + loss
            return loss

        trainer.training_step = recording_training_step  # type: ignore[method-assign]

        create_scheduler = trainer.create_scheduler

        @functools.wraps(create_scheduler)
        def create_learned_scheduler(num_training_steps: int, optimizer: Any = None) -> Any:
            if trainer.lr_scheduler is None:
                # Trainer's optimizer (accelerate's AcceleratedOptimizer is a torch Optimizer that proxies
                # param_groups, so LearnedLR writes the LR the wrapped optimizer uses).
                target: Any = optimizer if optimizer is not None else trainer.optimizer
                trainer.lr_scheduler = LearnedLR(  # type: ignore[assignment]
                    target,
                    self.controller,  # type: ignore[arg-type]
                    total_steps=int(num_training_steps),
                    **self.scheduler_kwargs,
                )
                # Trainer rebuilds schedulers it created itself on every train() call; so do we.
                trainer._created_lr_scheduler = True
            return create_scheduler(num_training_steps, optimizer)

        trainer.create_scheduler = create_learned_scheduler  # type: ignore[method-assign]
        return self

    # -- TrainerCallback events --------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler")
        if self._attached_to is None:
            raise RuntimeError(
                "LearnedLRCallback was added to a Trainer without attach(); call LearnedLRCallback(...).attach(trainer) "
                "so that each step's loss reaches the scheduler"
            )
        if not isinstance(scheduler, LearnedLR):
            raise RuntimeError(
                f"the Trainer's scheduler is a {type(scheduler).__name__}, not the LearnedLR this callback drives"
            )
        self.scheduler = scheduler
        self._step_loss = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._step_loss = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        scheduler = kwargs.get("lr_scheduler") or self.scheduler
        if isinstance(scheduler, LearnedLR) and self._step_loss is not None:
            scheduler.discard_observed_losses()
            scheduler.observe_loss(self._step_loss)
        self._step_loss = None

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # When mixed precision skipped the optimizer step, Trainer did not call lr_scheduler.step(): the loss
        # handed over for that step must not leak into the next one.
        scheduler = kwargs.get("lr_scheduler") or self.scheduler
        if isinstance(scheduler, LearnedLR):
            scheduler.discard_observed_losses()
