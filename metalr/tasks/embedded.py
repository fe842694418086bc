"""Task families that need no network: scikit-learn's embedded datasets and synthetic problems.

* ``digits_mlp``, ``breast_cancer_mlp``, ``wine_mlp``, ``iris_mlp``: MLP classifiers on the small real
  datasets that ship inside scikit-learn (width, depth, activation, init scale, data subset, label noise).
* ``noisy_quadratic``: the noisy quadratic model of Wu et al. (ICLR 2018) / Zhang et al. (2019), the
  classic testbed for short-horizon bias: ill-conditioned diagonal curvature, noisy minima per example.
* ``linear_regression``, ``logistic_regression``: convex problems with a linear teacher.
* ``teacher_student``: a random MLP teacher produces regression targets for an MLP student.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalr.tasks.base import (
    Batch,
    ModelCall,
    SamplingConfig,
    Task,
    TaskSpec,
    choice,
    classification_metrics,
    classify_x,
    forward_x,
    log_uniform,
    redraw_labels,
    sample_common,
    seeded_model,
    split_indices,
)
from metalr.tasks.models import mlp
from metalr.tasks.registry import register_task_family

FRACTIONS = {"train": 0.6, "inner_valid": 0.1, "outer_valid": 0.1, "test": 0.2}


def _mse_loss(model_call: ModelCall, batch: Batch) -> Tensor:
    return F.mse_loss(model_call(batch["x"]), batch["y"])


def _splits(x: Tensor, y: Tensor, seed: int, train_fraction: float = 1.0) -> dict[str, Batch]:
    idx = split_indices(len(x), FRACTIONS, seed)
    keep = max(1, int(round(len(idx["train"]) * train_fraction)))
    idx["train"] = idx["train"][:keep]
    # Standardise with statistics of the training split only.
    mean, std = x[idx["train"]].mean(0), x[idx["train"]].std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    return {name: {"x": xs[i], "y": y[i]} for name, i in idx.items()}


@functools.cache
def _sklearn_data(name: str) -> tuple[Tensor, Tensor]:
    from sklearn import datasets

    loader = {
        "digits": datasets.load_digits,
        "breast_cancer": datasets.load_breast_cancer,
        "wine": datasets.load_wine,
        "iris": datasets.load_iris,
    }[name]
    bunch = loader()
    return torch.tensor(bunch.data, dtype=torch.float32), torch.tensor(bunch.target, dtype=torch.long)


@dataclass
class SklearnMLPFamily:
    """MLP classifiers on one of scikit-learn's embedded datasets."""

    dataset: str
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=(100, 1000)))
    widths: tuple[int, int] = (16, 128)
    depths: tuple[int, ...] = (1, 2, 3)
    activations: tuple[str, ...] = ("relu", "tanh", "gelu")
    max_label_noise: float = 0.2
    model: str = "MLP (1-3 hidden layers, 16-128 wide)"

    @property
    def name(self) -> str:
        return f"{self.dataset}_mlp"

    @property
    def description(self) -> str:
        return f"MLP classifier on scikit-learn's embedded {self.dataset} dataset"

    @property
    def budget(self) -> str:
        return f"{self.sampling.steps[0]}-{self.sampling.steps[1]} steps"

    def sample(self, generator: torch.Generator) -> TaskSpec:
        options = {
            "dataset": self.dataset,
            "width": int(round(log_uniform(generator, *self.widths))),
            "depth": int(choice(generator, self.depths)),
            "activation": str(choice(generator, self.activations)),
            "init_scale": log_uniform(generator, 0.5, 2.0),
            "train_fraction": float(0.5 + 0.5 * torch.rand((), generator=generator).item()),
            # Half the tasks are clean; the rest get up to max_label_noise of labels flipped.
            "label_noise": float(choice(generator, (0.0, 1.0)) * torch.rand((), generator=generator).item())
            * self.max_label_noise,
        }
        return sample_common(generator, self.sampling, self.name, options)

    def build(self, spec: TaskSpec) -> Task:
        o = spec.options
        x, y = _sklearn_data(o["dataset"])
        num_classes = int(y.max()) + 1
        splits = _splits(x, y, spec.seed, o.get("train_fraction", 1.0))
        noise = float(o.get("label_noise", 0.0))
        if noise > 0:  # flip labels of the training split only: validation and test stay clean
            splits["train"]["y"] = redraw_labels(splits["train"]["y"], noise, num_classes, spec.seed + 1)
        model = seeded_model(
            spec.seed,
            lambda: mlp(x.shape[1], num_classes, o["width"], o["depth"], o["activation"], o["init_scale"]),
        )
        return Task(spec, model, splits, classify_x, forward_x, classification_metrics, num_classes)


for _dataset in ("digits", "breast_cancer", "wine", "iris"):
    register_task_family(f"{_dataset}_mlp")(functools.partial(SklearnMLPFamily, _dataset))


class QuadraticModel(nn.Module):
    """theta in R^d; loss 0.5 * sum_i h_i (theta_i - c_i)^2 with per-example noisy minima c."""

    curvature: Tensor

    def __init__(self, curvature: Tensor, init: Tensor) -> None:
        super().__init__()
        self.theta = nn.Parameter(init.clone())
        self.register_buffer("curvature", curvature)

    def forward(self, centers: Tensor) -> Tensor:
        return 0.5 * ((self.theta - centers).square() * self.curvature).sum(-1).mean()


def _quadratic_loss(model_call: ModelCall, batch: Batch) -> Tensor:
    return model_call(batch["c"])


@register_task_family("noisy_quadratic")
@dataclass
class NoisyQuadraticFamily:
    """Noisy quadratic model (Wu et al., ICLR 2018): the testbed where short-horizon bias was shown."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=(100, 1000)))
    dims: tuple[int, int] = (10, 100)
    condition: tuple[float, float] = (10.0, 1e4)
    noise: tuple[float, float] = (0.01, 1.0)
    examples: int = 2048
    name: str = "noisy_quadratic"
    description: str = "noisy quadratic model, diagonal curvature with a log-uniform spectrum"
    dataset: str = "synthetic"
    model: str = "parameter vector"

    @property
    def budget(self) -> str:
        return f"{self.sampling.steps[0]}-{self.sampling.steps[1]} steps"

    def sample(self, generator: torch.Generator) -> TaskSpec:
        options = {
            "dim": int(round(log_uniform(generator, *self.dims))),
            "condition": log_uniform(generator, *self.condition),
            "noise": log_uniform(generator, *self.noise),
        }
        return sample_common(generator, self.sampling, self.name, options)

    def build(self, spec: TaskSpec) -> Task:
        o = spec.options
        g = torch.Generator().manual_seed(spec.seed)
        dim = int(o["dim"])
        curvature = torch.logspace(0, -torch.log10(torch.tensor(float(o["condition"]))).item(), dim)
        centers = torch.randn(self.examples, dim, generator=g) * float(o["noise"]) / curvature.sqrt()
        idx = split_indices(self.examples, FRACTIONS, spec.seed, fixed_test_seed=spec.seed)
        splits = {name: {"c": centers[i]} for name, i in idx.items()}
        init = torch.randn(dim, generator=g)
        return Task(spec, QuadraticModel(curvature, init), splits, _quadratic_loss)


@dataclass
class _LinearTeacherFamily:
    """Shared sampling for the linear-teacher families."""

    kind: str
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=(100, 1000)))
    dims: tuple[int, int] = (5, 50)
    examples: tuple[int, int] = (512, 4096)
    dataset: str = "synthetic"
    model: str = "linear"

    @property
    def name(self) -> str:
        return f"{self.kind}_regression"

    @property
    def description(self) -> str:
        target = "real targets, MSE" if self.kind == "linear" else "binary labels, cross-entropy"
        return f"{self.kind} regression on Gaussian inputs with a linear teacher ({target})"

    @property
    def budget(self) -> str:
        return f"{self.sampling.steps[0]}-{self.sampling.steps[1]} steps"

    def sample(self, generator: torch.Generator) -> TaskSpec:
        options = {
            "dim": int(round(log_uniform(generator, *self.dims))),
            "examples": int(round(log_uniform(generator, *self.examples))),
            "noise": log_uniform(generator, 0.01, 1.0),
            "input_scale": log_uniform(generator, 0.3, 3.0),
        }
        return sample_common(generator, self.sampling, self.name, options)

    def build(self, spec: TaskSpec) -> Task:
        o = spec.options
        g = torch.Generator().manual_seed(spec.seed)
        n, d = int(o["examples"]), int(o["dim"])
        x = torch.randn(n, d, generator=g) * float(o["input_scale"])
        w = torch.randn(d, generator=g) / d**0.5
        score = x @ w + float(o["noise"]) * torch.randn(n, generator=g)
        idx = split_indices(n, FRACTIONS, spec.seed, fixed_test_seed=spec.seed)
        if self.kind == "linear":
            y: Tensor = score.unsqueeze(-1)
            model = seeded_model(spec.seed, lambda: nn.Linear(d, 1))
            splits = {name: {"x": x[i], "y": y[i]} for name, i in idx.items()}
            return Task(spec, model, splits, _mse_loss)
        y = (score > 0).long()
        model = seeded_model(spec.seed, lambda: nn.Linear(d, 2))
        splits = {name: {"x": x[i], "y": y[i]} for name, i in idx.items()}
        return Task(spec, model, splits, classify_x, forward_x, classification_metrics, 2)


register_task_family("linear_regression")(functools.partial(_LinearTeacherFamily, "linear"))
register_task_family("logistic_regression")(functools.partial(_LinearTeacherFamily, "logistic"))


@register_task_family("teacher_student")
@dataclass
class TeacherStudentFamily:
    """A random tanh MLP teacher labels Gaussian inputs; an MLP student regresses them."""

    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(steps=(100, 1000)))
    name: str = "teacher_student"
    description: str = "MLP student regressing a random MLP teacher's outputs"
    dataset: str = "synthetic"
    model: str = "MLP student (1-3 hidden layers)"
    examples: int = 2048

    @property
    def budget(self) -> str:
        return f"{self.sampling.steps[0]}-{self.sampling.steps[1]} steps"

    def sample(self, generator: torch.Generator) -> TaskSpec:
        options = {
            "dim": int(round(log_uniform(generator, 4, 32))),
            "teacher_width": int(round(log_uniform(generator, 8, 64))),
            "width": int(round(log_uniform(generator, 16, 128))),
            "depth": int(choice(generator, (1, 2, 3))),
            "activation": str(choice(generator, ("relu", "tanh", "gelu"))),
            "noise": log_uniform(generator, 0.01, 0.3),
        }
        return sample_common(generator, self.sampling, self.name, options)

    def build(self, spec: TaskSpec) -> Task:
        o = spec.options
        g = torch.Generator().manual_seed(spec.seed)
        d = int(o["dim"])
        x = torch.randn(self.examples, d, generator=g)
        w1 = torch.randn(d, int(o["teacher_width"]), generator=g) / d**0.5
        w2 = torch.randn(int(o["teacher_width"]), 1, generator=g)
        y = torch.tanh(x @ w1) @ w2 / int(o["teacher_width"]) ** 0.5
        y = y + float(o["noise"]) * torch.randn(y.shape, generator=g)
        idx = split_indices(self.examples, FRACTIONS, spec.seed, fixed_test_seed=spec.seed)
        splits = {name: {"x": x[i], "y": y[i]} for name, i in idx.items()}
        model = seeded_model(spec.seed, lambda: mlp(d, 1, int(o["width"]), int(o["depth"]), str(o["activation"])))
        return Task(spec, model, splits, _mse_loss)
