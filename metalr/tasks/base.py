"""Task contract: ``TaskSpec`` (what to build, serialisable), ``Task`` (built), ``TaskFamily`` (sampler).

A :class:`Task` is a model factory's product plus data splits plus a loss: everything an inner loop needs,
whether that loop is the differentiable unroll of meta-training or a plain ``torch.optim`` loop in the
evaluation harness. Both call :meth:`Task.loss` with a *model call* - the module itself, or a
``functional_call`` closure over a parameter dict - so there is one definition of the loss.

Splits: ``train`` (inner updates), ``inner_valid`` (features and tuning), ``outer_valid`` (meta-objective
only), ``test`` (evaluation only). Nothing selects on ``test``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLITS = ("train", "inner_valid", "outer_valid", "test")
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")
Batch = dict[str, Tensor]
ModelCall = Callable[..., Any]


@dataclass(frozen=True)
class TaskSpec:
    """A concrete, serialisable task: family + seed + every sampled choice.

    Attributes:
        family: registered family name.
        seed: seeds the data subset, label noise and model initialisation.
        optimizer: base optimizer, one of ``OPTIMIZERS``.
        base_lr: initial learning rate the schedule or controller starts from.
        steps: step budget (inner horizon T).
        batch_size: examples per training step.
        options: family-specific choices (dataset, width, depth, ...), JSON-serialisable.
    """

    family: str
    seed: int
    optimizer: str
    base_lr: float
    steps: int
    batch_size: int
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; expected one of {list(OPTIMIZERS)}")
        if not (self.base_lr > 0 and math.isfinite(self.base_lr)):
            raise ValueError(f"base_lr must be a positive finite number, got {self.base_lr=}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps=}, {self.batch_size=}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskSpec:
        return cls(**dict(data))

    def replace(self, **changes: Any) -> TaskSpec:
        return replace(self, **changes)

    @property
    def key(self) -> str:
        """Stable identifier (for result records and resumption)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @property
    def label(self) -> str:
        """Short human-readable name for tables."""
        dataset = self.options.get("dataset")
        return f"{self.family}" + (f"[{dataset}]" if dataset and dataset not in self.family else "") + f"#{self.seed}"


class BatchStream:
    """Deterministic minibatches: a fresh permutation per epoch, seeded by ``(seed, epoch)``.

    The stream is a pure function of ``(seed, position)``, so it can be checkpointed as one integer and
    two consumers with the same seed see the same batches (meta-training and deployment parity).
    """

    def __init__(self, data: Batch, batch_size: int, seed: int, position: int = 0) -> None:
        sizes = {k: v.shape[0] for k, v in data.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"split columns differ in length: {sizes}")
        self.data = data
        self.size = next(iter(sizes.values()))
        if self.size == 0:
            raise ValueError("cannot draw batches from an empty split")
        self.batch_size = min(batch_size, self.size)
        self.per_epoch = self.size // self.batch_size
        self.seed = seed
        self.position = position
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        epoch, index = divmod(self.position, self.per_epoch)
        if epoch != self._perm_epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.size, generator=generator)
            self._perm_epoch = epoch
        idx = self._perm[index * self.batch_size : (index + 1) * self.batch_size]
        self.position += 1
        device = next(iter(self.data.values())).device
        idx = idx.to(device)
        return {k: v.index_select(0, idx) for k, v in self.data.items()}


@dataclass
class Task:
    """A built task. ``loss(model_call, batch)`` is the one definition of the training loss.

    Attributes:
        spec: the spec it was built from.
        model: a freshly initialised model (initialisation seeded by ``spec.seed``).
        splits: ``SPLITS`` -> columns sharing their first dimension.
        loss_fn: ``(model_call, batch) -> scalar`` loss.
        metrics_fn: ``(outputs, batch) -> {name: value}`` summed over the batch (divided by the count later);
            ``None`` for loss-only tasks.
        forward_fn: ``(model_call, batch) -> outputs`` used for metrics and uncertainty features.
        num_classes: classes of a classification task, else None.
        steps_per_epoch: optimizer steps per pass over ``train`` (for per-epoch baselines).
    """

    spec: TaskSpec
    model: nn.Module
    splits: dict[str, Batch]
    loss_fn: Callable[[ModelCall, Batch], Tensor]
    forward_fn: Callable[[ModelCall, Batch], Tensor] | None = None
    metrics_fn: Callable[[Tensor, Batch], dict[str, float]] | None = None
    num_classes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        size = next(iter(self.splits["train"].values())).shape[0]
        return max(1, size // min(self.spec.batch_size, size))

    def loss(self, model_call: ModelCall, batch: Batch) -> Tensor:
        return self.loss_fn(model_call, batch)

    def batches(self, split: str, seed_offset: int = 0, batch_size: int | None = None) -> BatchStream:
        """Deterministic stream over ``split`` (different splits and offsets get different orders)."""
        if split not in self.splits:
            raise KeyError(f"task {self.spec.family} has no split {split!r}; it has {sorted(self.splits)}")
        seed = self.spec.seed * 7919 + SPLITS.index(split) * 104_729 + seed_offset
        return BatchStream(self.splits[split], batch_size or self.spec.batch_size, seed)

    def to(self, device: str | torch.device) -> Task:
        self.model.to(device)
        self.splits = {s: {k: v.to(device) for k, v in cols.items()} for s, cols in self.splits.items()}
        return self

    @torch.no_grad()
    def evaluate(self, model_call: ModelCall, split: str, chunk: int = 1024, max_examples: int | None = None) -> dict[str, float]:
        """Mean loss (and metrics) over a whole split, in chunks."""
        cols = self.splits[split]
        size = next(iter(cols.values())).shape[0]
        if max_examples is not None:
            size = min(size, max_examples)
        totals: dict[str, float] = {}
        for start in range(0, size, chunk):
            batch = {k: v[start : min(start + chunk, size)] for k, v in cols.items()}
            count = next(iter(batch.values())).shape[0]
            totals["loss"] = totals.get("loss", 0.0) + float(self.loss_fn(model_call, batch)) * count
            if self.metrics_fn is not None and self.forward_fn is not None:
                for name, value in self.metrics_fn(self.forward_fn(model_call, batch), batch).items():
                    totals[name] = totals.get(name, 0.0) + value
        return {name: value / size for name, value in totals.items()}


class TaskFamily(Protocol):
    """Samples concrete :class:`TaskSpec` s and builds them into :class:`Task` s."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str: ...

    @property
    def dataset(self) -> str: ...

    @property
    def model(self) -> str: ...

    @property
    def budget(self) -> str: ...

    def sample(self, generator: torch.Generator) -> TaskSpec: ...

    def build(self, spec: TaskSpec) -> Task: ...


# ----------------------------------------------------------------------------------------------------------
# Shared sampling of the choices every family makes (optimizer, base LR, horizon, batch size).

DEFAULT_LR_RANGES: dict[str, tuple[float, float]] = {
    # Wide on purpose: they include LRs past the stability edge, where a guardrail is needed.
    "sgd": (1e-3, 1.0),
    "momentum": (1e-3, 0.3),
    "adam": (1e-4, 3e-2),
    "adamw": (1e-4, 3e-2),
}


@dataclass(frozen=True)
class SamplingConfig:
    """Ranges a family samples from; task suites may override any field.

    Attributes:
        optimizers: base optimizers to draw from.
        lr_ranges: optimizer -> (low, high) for a log-uniform base LR.
        steps: (low, high) inner horizon, log-uniform.
        batch_sizes: batch sizes to draw from.
    """

    optimizers: tuple[str, ...] = ("sgd", "momentum", "adam")
    lr_ranges: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_LR_RANGES))
    steps: tuple[int, int] = (100, 1000)
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128)

    def __post_init__(self) -> None:
        bad = [o for o in self.optimizers if o not in OPTIMIZERS]
        if bad or not self.optimizers:
            raise ValueError(f"optimizers must be a non-empty subset of {list(OPTIMIZERS)}, got {list(self.optimizers)}")
        for opt in self.optimizers:
            low, high = self.lr_ranges.get(opt, DEFAULT_LR_RANGES[opt])
            if not 0 < low <= high:
                raise ValueError(f"lr range for {opt} must satisfy 0 < low <= high, got ({low}, {high})")
        if len(self.steps) != 2:
            raise ValueError(f"steps must be a [low, high] pair, got {list(self.steps)}")
        if not 0 < self.steps[0] <= self.steps[1]:
            raise ValueError(f"steps range must satisfy 0 < low <= high, got {self.steps}")
        if not self.batch_sizes or min(self.batch_sizes) <= 0:
            raise ValueError(f"batch_sizes must be positive, got {self.batch_sizes}")


def log_uniform(generator: torch.Generator, low: float, high: float) -> float:
    u = torch.rand((), generator=generator, dtype=torch.float64).item()
    return math.exp(math.log(low) + u * (math.log(high) - math.log(low)))


def choice(generator: torch.Generator, options: Sequence[Any]) -> Any:
    return options[int(torch.randint(len(options), (), generator=generator))]


def sample_common(generator: torch.Generator, config: SamplingConfig, family: str, options: dict[str, Any]) -> TaskSpec:
    """Draw the shared choices and return the spec (``options`` are the family's own draws)."""
    optimizer = choice(generator, config.optimizers)
    low, high = config.lr_ranges.get(optimizer, DEFAULT_LR_RANGES[optimizer])
    return TaskSpec(
        family=family,
        seed=int(torch.randint(2**31 - 1, (), generator=generator)),
        optimizer=optimizer,
        base_lr=log_uniform(generator, low, high),
        steps=int(round(log_uniform(generator, *config.steps))),
        batch_size=int(choice(generator, config.batch_sizes)),
        options=options,
    )


def redraw_labels(labels: Tensor, fraction: float, num_classes: int, seed: int) -> Tensor:
    """A copy of ``labels`` with each one redrawn uniformly over the classes with probability ``fraction``."""
    generator = torch.Generator().manual_seed(seed)
    labels = labels.clone()
    redraw = torch.rand(len(labels), generator=generator) < fraction
    labels[redraw] = torch.randint(num_classes, (int(redraw.sum()),), generator=generator).to(labels)
    return labels


def seeded_model(seed: int, factory: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its initialisation seeded by ``seed``, leaving the global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()


def forward_x(model_call: ModelCall, batch: Batch) -> Tensor:
    """Outputs of a model whose input is the ``x`` column."""
    return model_call(batch["x"])


def classify_x(model_call: ModelCall, batch: Batch) -> Tensor:
    """Cross-entropy of a classifier on the ``x`` column against the ``y`` labels."""
    return F.cross_entropy(model_call(batch["x"]), batch["y"])


def classification_metrics(logits: Tensor, batch: Batch) -> dict[str, float]:
    """Summed correct predictions (top-1, and top-5 where there are more than 5 classes)."""
    target = batch["y"]
    out = {"accuracy": float((logits.argmax(-1) == target).sum())}
    if logits.shape[-1] > 5:
        top5 = logits.topk(5, dim=-1).indices
        out["top5_accuracy"] = float((top5 == target.unsqueeze(-1)).any(-1).sum())
    return out


def split_indices(n: int, fractions: dict[str, float], seed: int, fixed_test_seed: int = 0) -> dict[str, Tensor]:
    """Deterministic split: ``test`` is fixed per dataset (seed ``fixed_test_seed``) so no task seed moves it;
    the remaining examples are shuffled by ``seed`` into the other splits by ``fractions``."""
    test_n = int(round(n * fractions["test"]))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(fixed_test_seed))
    test, pool = perm[:test_n], perm[test_n:]
    pool = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))]
    rest = {k: v for k, v in fractions.items() if k != "test"}
    total = sum(rest.values())
    out = {"test": test}
    start = 0
    names = [s for s in SPLITS if s in rest]
    for i, name in enumerate(names):
        count = len(pool) - start if i == len(names) - 1 else int(round(len(pool) * rest[name] / total))
        out[name] = pool[start : start + count]
        start += count
    return out
