"""metalr: meta-learned learning-rate controllers for PyTorch.

Deploy a controller in any training loop::

    from metalr import load_controller, LearnedLR
    controller = load_controller("demo")                       # a shipped name or a .safetensors path
    sched = LearnedLR(optimizer, controller, total_steps=T)
    ...  optimizer.step(); sched.step(loss)
"""

__version__ = "0.1.0"

from metalr.checkpoint import CheckpointError, load_controller, save_controller
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
    "load_controller",
    "save_controller",
]


def __getattr__(name: str):  # LearnedLR lives in scheduler.py, imported on first use
    if name == "LearnedLR":
        from metalr.scheduler import LearnedLR

        return LearnedLR
    raise AttributeError(f"module 'metalr' has no attribute {name!r}")
