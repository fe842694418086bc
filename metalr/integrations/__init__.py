"""Adapters that put :class:`~metalr.scheduler.LearnedLR` into training stacks users already run.

* :mod:`metalr.integrations.hf` - Hugging Face ``transformers.Trainer`` (``LearnedLRCallback``).

Plain PyTorch loops need no adapter: mixed precision (``LearnedLR(..., scaler=scaler)``), gradient
accumulation (``sched.observe_loss``), clipping, ``DistributedDataParallel`` and ``torch.compile`` are
handled by ``LearnedLR`` itself; see the module docstring of :mod:`metalr.scheduler`.

Submodules are imported on use, so ``import metalr.integrations`` never pulls in ``transformers``.
"""
