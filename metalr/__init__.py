"""metalr: meta-learned learning-rate controllers for PyTorch.

Deploy a controller in any training loop::

    from metalr import LearnedLR
    sched = LearnedLR(optimizer, total_steps=T)      # the shipped controller of the optimizer's family
    ...  optimizer.step(); sched.step(loss)

or name one: ``LearnedLR(optimizer, "demo", total_steps=T)``, a ``.safetensors`` path, or ``"hf://owner/repo"``.
"""

__version__ = "0.1.0"

from metalr.checkpoint import (
    CheckpointError,
    default_controller_name,
    load_controller,
    optimizer_family,
    save_controller,
)
from metalr.controller import LRController, PolicyConfig
from metalr.features import FeatureSpec, compute_features

__all__ = [
    "CheckpointError",
    "FeatureSpec",
    "LRController",
    "LearnedLR",
    "PolicyConfig",
    "__version__",
    "compute_features",
    "default_controller_name",
    "load_controller",
    "optimizer_family",
    "push_controller",
    "save_controller",
]


def __getattr__(name: str):  # LearnedLR lives in scheduler.py, imported on first use
    if name == "LearnedLR":
        from metalr.scheduler import LearnedLR

        return LearnedLR
    if name == "push_controller":  # huggingface_hub is imported only when the Hub is used
        from metalr.hub import push_controller

        return push_controller
    raise AttributeError(f"module 'metalr' has no attribute {name!r}")
