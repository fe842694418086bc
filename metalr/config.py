"""Typed configuration: frozen dataclasses, YAML + ``key=value`` overrides, strict validation.

Every field carries a comment with its meaning and unit. :func:`load_config` rejects unknown keys (naming
the allowed ones) and wrong types (naming the expected type), strictly:
so ``steps: "100"`` is an error rather than a silent coercion (ints are accepted where floats are
expected, nothing else is converted). The resolved config is written into
each run directory (:func:`dump_config`).

Config is data: this module imports no other part of metalr (``io`` aside), so loading an evaluation
suite never pulls in the meta-training code. Values checked here are the ones a dataclass can check by
itself (ranges, types, plain names); a *name* of something registered elsewhere (estimator, truncation
schedule, task family, method, base schedule, feature group, controller kind) is checked by the package
that owns it, through the loaders the CLI uses: :func:`metalr.meta.recipe.load_recipe`,
:func:`metalr.tasks.load_suite` and :func:`metalr.evaluation.load_eval_suite`, all before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin

import yaml

from metalr.io import atomic_write_text
from metalr.shipped import resolve_shipped

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # what a recipe's `name` may be (it names a folder)


class ConfigError(ValueError):
    """A user's configuration is wrong; the message is one line naming the key and what was expected."""


# metalr.features.DEFAULT_GROUPS, spelled out because config imports no subsystem (a test keeps them equal).
DEFAULT_FEATURE_GROUPS = ("loss", "grad", "alignment", "update", "progress", "lr", "stability", "distance")


@dataclasses.dataclass(frozen=True)
class ControllerConfig:
    """What a recipe says about the controller; ``metalr.meta.recipe.check_recipe`` builds it to validate."""

    kind: str = "mlp"  # network: "mlp" (hidden [64, 32]) or "lstm" (recurrent, hidden [32])
    hidden: tuple[int, ...] = (64, 32)  # hidden layer widths
    features: tuple[str, ...] = DEFAULT_FEATURE_GROUPS  # feature groups the controller reads (ablation switches)
    base_schedule: str = "constant"  # schedule the learned factor multiplies: "constant" | "cosine"
    min_lr: float = 1e-6  # absolute lower LR bound
    max_lr: float = 1.0  # absolute upper LR bound
    min_factor: float = 1e-4  # lower bound of the learned multiplier of the base LR
    max_factor: float = 100.0  # upper bound of the learned multiplier
    max_log_step: float = 0.1  # largest change of log LR per step
    guard_ratio: float = 5.0  # loss > guard_ratio x its slow EMA counts as divergence
    guard_cut: float = 10.0  # divergence guardrail divides the LR by this at once (1 = off)


@dataclasses.dataclass(frozen=True)
class MetaConfig:
    estimator: str = "tbptt"  # gradient estimator (a name in `metalr.meta.estimators.ESTIMATORS`)
    backend: str = "native"  # unroll implementation for backprop estimators: "native" | "higher"
    meta_steps: int = 200  # outer (controller) updates
    meta_batch: int = 4  # inner tasks trained in parallel, one truncation each per meta-step
    population: int = 1  # meta-batch slots per population: tasks of one architecture, vmapped together (ES/PES)
    unroll_length: int = 20  # truncation length K in inner steps
    meta_lr: float = 1e-3  # Adam learning rate of the controller
    meta_grad_clip: float = 1.0  # global-norm clip of the meta-gradient
    detach_features: bool = False  # stop meta-gradients through controller inputs (cheaper, biased)
    objective_every: int = 1  # measure the outer-valid loss every N inner steps
    # ES/PES: clamp each meta-objective term log(L / L_0) at this value and score a diverged (non-finite)
    # term as it instead of skipping the truncation (None: no cap, diverged truncations are skipped)
    objective_cap: float | None = None
    # weight the term at step t of a T-step task by (p + 1) (t / T)^p (weights average to 1 over a horizon):
    # 0 = every term alike (the mean loss over training); larger p = the end of training counts more
    objective_power: float = 0.0
    valid_batch_size: int = 128  # outer-valid examples per meta-objective measurement
    max_skip_fraction: float = 0.5  # stop when more than this fraction of truncations was non-finite
    checkpoint_every: int = 50  # meta-steps between periodic checkpoints (0 = only the final one)
    log_every: int = 10  # meta-steps between metrics.jsonl records
    truncation: str = "constant"  # truncation-length schedule: "constant" | "log_uniform" | "curriculum"
    min_unroll_length: int = 5  # shortest truncation of the log_uniform / curriculum schedules (inner steps)
    curriculum_steps: int = 100  # meta-steps over which the curriculum grows K to unroll_length
    max_full_horizon: int = 300  # estimator "full" refuses tasks with a longer horizon (inner steps)
    es_sigma: float = 0.01  # ES/PES perturbation std of the controller weights
    es_pairs: int = 4  # ES/PES antithetic perturbation pairs per task and truncation
    vectorize: bool = True  # ES/PES: unroll all particles of a truncation as one torch.func.vmap (False: in turn)
    valid_every: int = 10  # inner steps between inner_valid measurements (validation feature, if enabled)
    memory_budget_mb: float = 0.0  # refuse a task whose unroll is estimated above this (MiB; 0 = no limit)
    max_refused: int = 50  # stop when this many consecutive sampled tasks were refused by the memory budget
    state_every: int = 10  # meta-steps between resume-state writes (crash safety; 0 = never)
    probe_every: int = 0  # meta-steps between probe rollouts (LR traces, short-horizon-bias ratio; 0 = off)
    probe_tasks: int = 2  # probe tasks (from meta_valid families, else meta_train), full horizon each
    # meta-valid tasks drawn per meta_valid family, scored at every checkpoint (model selection): more tasks
    # rank checkpoints less noisily (research log E2-7) at the cost of a longer scoring
    valid_per_family: int = 2
    # how the best checkpoint is picked (a name in `metalr.meta.validation.SELECTIONS`): "mean" meta-valid
    # term, or "wins": the most meta-valid tasks beaten against the untrained controller (the base schedule)
    selection: str = "mean"
    tensorboard: bool = False  # also log to TensorBoard (run_dir/tensorboard; needs the tensorboard extra)

    def __post_init__(self) -> None:
        positive = (
            "meta_steps", "meta_batch", "population", "unroll_length", "valid_batch_size", "objective_every",
            "log_every", "valid_per_family",
        )
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) <= 0]
        if bad:
            raise ValueError(f"must be positive: {', '.join(bad)}")
        if not (self.meta_lr > 0 and self.meta_grad_clip > 0 and 0 <= self.max_skip_fraction <= 1):
            raise ValueError(
                f"need meta_lr > 0, meta_grad_clip > 0 and 0 <= max_skip_fraction <= 1, got {self.meta_lr}, "
                f"{self.meta_grad_clip}, {self.max_skip_fraction}"
            )
        for name in ("min_unroll_length", "curriculum_steps", "max_full_horizon", "es_pairs", "max_refused"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value}")
        for name in ("checkpoint_every", "log_every", "valid_every", "state_every", "probe_every", "probe_tasks"):
            value = getattr(self, name)
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not self.es_sigma > 0:
            raise ValueError(f"es_sigma must be > 0, got {self.es_sigma}")
        if self.meta_batch % self.population:
            raise ValueError(
                f"meta_batch={self.meta_batch} must be a multiple of population={self.population} "
                "(the meta-batch is split into populations of that many tasks)"
            )
        if self.objective_cap is not None and not math.isfinite(self.objective_cap):
            raise ValueError(f"objective_cap must be a finite number or null, got {self.objective_cap}")
        if not (math.isfinite(self.objective_power) and self.objective_power >= 0):
            raise ValueError(f"objective_power must be a finite number >= 0, got {self.objective_power}")
        if not self.memory_budget_mb >= 0:
            raise ValueError(f"memory_budget_mb must be >= 0, got {self.memory_budget_mb}")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Task augmentation of the meta-training tasks (``metalr.tasks.augment``): each population draws its
    factors from these ``[low, high]`` ranges; meta-validation and evaluation tasks are never augmented."""

    param_scale: tuple[float, float] = (1.0, 1.0)  # log-uniform s: train phi = theta / s (Adam step x s, SGD x s^2)
    loss_scale: tuple[float, float] = (1.0, 1.0)  # log-uniform c multiplying the training loss (SGD step x c)
    label_noise: tuple[float, float] = (0.0, 0.0)  # uniform fraction of training labels redrawn (classification)

    def __post_init__(self) -> None:
        for name in ("param_scale", "loss_scale", "label_noise"):
            value = getattr(self, name)
            if len(value) != 2 or not value[0] <= value[1]:
                raise ValueError(f"augment.{name} must be a [low, high] pair with low <= high, got {list(value)}")
        if not (self.param_scale[0] > 0 and self.loss_scale[0] > 0):
            raise ValueError(f"augment scales must be > 0, got {list(self.param_scale)=}, {list(self.loss_scale)=}")
        if not 0 <= self.label_noise[0] <= self.label_noise[1] < 1:
            raise ValueError(f"augment.label_noise must lie in [0, 1), got {list(self.label_noise)}")

    @property
    def enabled(self) -> bool:
        """Whether any range is wider than the identity (an identity config draws nothing)."""
        return self != AugmentConfig()


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
    name: str = "controller"  # run and checkpoint name
    suite: str = "embedded"  # task suite: a name in tasks/ or a path to a YAML suite
    seed: int = 0  # seeds the task sampler, the controller initialisation and the data order
    device: str = "cpu"  # where inner loops run: "cpu" | "cuda"
    out_dir: str = "runs"  # parent of the run directory
    # sampling overrides applied to every meta_train family of the suite (steps, lr_ranges, optimizers, ...)
    train_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    controller: ControllerConfig = ControllerConfig()
    meta: MetaConfig = MetaConfig()
    augment: AugmentConfig = AugmentConfig()  # task augmentation of meta-training tasks (identity by default)

    def __post_init__(self) -> None:
        # The name becomes a folder under out_dir: a path in it ("../x", "a/b") would write elsewhere.
        if not RUN_NAME.fullmatch(self.name):
            raise ValueError(
                f"name must be a plain name (letters, digits, '.', '_', '-'; no path separators), got {self.name!r}"
            )
        check_device(self.device)


def check_device(device: str) -> None:
    """Refuse a device torch cannot use here, naming what is available."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected 'cpu' or 'cuda' (optionally 'cuda:N')") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; expected 'cpu' or 'cuda'")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested, but this torch build sees no CUDA device; use device=cpu")


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    family: str  # registered task-family name
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # sampling/family overrides


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    name: str  # suite name
    description: str = ""  # one line
    device: str = "cpu"  # "cpu" or "cuda" (gpu suites need --device cuda)
    meta_train: tuple[FamilyEntry, ...] = ()  # families the controller is meta-trained on
    meta_valid: tuple[FamilyEntry, ...] = ()  # held-out families of the meta-train suite (model selection)
    held_out: tuple[FamilyEntry, ...] = ()  # families for transfer evaluation only


# ----------------------------------------------------------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


_SCALARS: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against ``tp`` strictly and build nested dataclasses; unknown keys are errors."""
    origin = get_origin(tp)
    if _is_dataclass_type(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping with keys {sorted(_field_types(tp))}, got {value!r}")
        hints = _field_types(tp)
        unknown = sorted(set(value) - set(hints))
        if unknown:
            prefix = f"{where}." if where else ""
            raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys: {', '.join(sorted(hints))}")
        kwargs = {k: _convert(v, hints[k], f"{where}.{k}" if where else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{where or 'config'}: {err}") from None
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    allowed = _SCALARS.get(tp)
    if allowed is not None:
        if isinstance(value, bool) and tp is not bool or not isinstance(value, allowed):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return float(value) if tp is float else value  # type: ignore[arg-type]
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def _family_entries(value: Any, where: str) -> tuple[dict[str, Any], ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of family names or {{family: NAME, ...overrides}}, got {value!r}")
    entries = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            entries.append({"family": item, "overrides": {}})
        elif isinstance(item, dict) and isinstance(item.get("family"), str):
            entries.append({"family": item["family"], "overrides": {k: v for k, v in item.items() if k != "family"}})
        else:
            raise ConfigError(f"{where}[{i}]: expected a family name or a mapping with a 'family' key, got {item!r}")
    return tuple(entries)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["meta.meta_steps=50", "seed=1"]`` -> nested dict; values are parsed as YAML scalars/lists."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. meta.meta_steps=50)")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML") from None
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier override of {part!r}")
            node = child
        node[parts[-1]] = value
    return tree


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:  # an empty (or comments-only) file would silently mean "all defaults"
        raise ConfigError(f"{path}: the file is empty; expected a YAML mapping of settings")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level, got {type(data).__name__}")
    return data


def build_config(cls: type[T], data: dict[str, Any], source: str = "config") -> T:
    """Validate ``data`` against the dataclass ``cls`` (strict types, no unknown keys)."""
    try:
        return _convert(data, cls, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Load ``cls`` from a YAML file plus ``key=value`` overrides (types and ranges; names unchecked).

    Example:
        >>> cfg = load_config(MetaTrainConfig, "meta_train/demo.yaml", ["meta.meta_steps=10"])
    """
    data = read_yaml(path) if path is not None else {}
    data = _merge(data, parse_overrides(overrides or []))
    return build_config(cls, data, str(path) if path else "config")


def resolve_suite_path(name_or_path: str) -> Path:
    """A suite YAML path, or the name of a shipped suite (``tasks/``)."""
    return resolve_shipped("tasks", name_or_path, ConfigError)


def read_suite(name_or_path: str) -> SuiteConfig:
    """A task suite as data (its family names unchecked: :func:`metalr.tasks.load_suite` checks them)."""
    path = resolve_suite_path(name_or_path)
    data = read_yaml(path)
    for key in ("meta_train", "meta_valid", "held_out"):
        if key in data:
            data[key] = [dict(e) for e in _family_entries(data[key], f"{path}: {key}")]
    return build_config(SuiteConfig, data, str(path))


def to_plain(config: Any) -> Any:
    """Dataclass -> YAML-friendly plain data (tuples become lists)."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_plain(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_plain(v) for v in config]
    if isinstance(config, dict):
        return {k: to_plain(v) for k, v in config.items()}
    return config


def dump_config(config: Any, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_plain(config), sort_keys=False))


# ----------------------------------------------------------------------------------------------------------
# Evaluation suites (evaluate/*.yaml)


@dataclasses.dataclass(frozen=True)
class MethodEntry:
    method: str  # registered method name (`metalr methods list`)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # hyperparameters of the method
    label: str = ""  # name in reports (default: the method name)

    @property
    def display(self) -> str:
        return self.label or self.method


# Default LR grids of the tuning protocol (issue 7, after AlgoPerf's external-tuning ruleset): 7 points at
# half-decade spacing per optimizer family.
DEFAULT_LR_GRID_RANGES: dict[str, tuple[float, float]] = {
    "adam": (1e-4, 1e-1),
    "adamw": (1e-4, 1e-1),
    "sgd": (1e-3, 1.0),
    "momentum": (1e-3, 1.0),
}
TARGET_RULES = ("reference", "best_baseline")


def grid_lr(lr: float) -> float:
    """An LR rounded to 12 significant digits: the same grid point is the same float on every machine."""
    return float(f"{lr:.12g}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    name: str = "evaluation"  # report title
    suite: str = "embedded"  # task suite (name in tasks/ or a YAML path)
    split: str = "held_out"  # which family list of the suite to evaluate: held_out | meta_valid | meta_train
    families: tuple[str, ...] = ()  # evaluate only these families of the split (empty = all of them)
    tasks_per_family: int = 2  # held-out tasks sampled per family (fixed before any result is seen)
    task_seed: int = 1234  # seed of that sampling
    step_scale: float = 1.0  # multiplies every task's sampled step budget (cpu-heldout-long: 10), before max_steps
    max_steps: int = 0  # cap on every task's step budget before horizon scaling (0 = the sampled budget)
    seeds: int = 3  # training seeds per (task, method, initial LR, horizon)
    methods: tuple[MethodEntry, ...] = (MethodEntry("learned"), MethodEntry("constant"), MethodEntry("cosine"))
    eval_every: int = 25  # optimizer steps between inner_valid evaluations (learning curves, time-to-target)
    device: str = "cpu"  # "cpu" | "cuda"
    tune: bool = True  # tuned methods run over the LR grid and report their best point; False = task default LRs
    sensitivity: bool = True  # also run self-tuning methods over the LR grid (sensitivity curves; with tune)
    sensitivity_methods: tuple[str, ...] = ()  # self-tuning labels run over the grid (empty = all); skip those that ignore the base LR
    lr_grid_points: int = 7  # grid points per optimizer family, log-spaced over lr_grid_ranges
    lr_grid_ranges: dict[str, tuple[float, float]] = dataclasses.field(
        default_factory=lambda: dict(DEFAULT_LR_GRID_RANGES)
    )  # optimizer -> (lowest, highest) initial LR of the grid; missing optimizers use the defaults
    lr_grid: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)  # optimizer -> explicit grid (wins over ranges)
    reference: str = "cosine"  # method label that defines targets and speed-ups ("tuned cosine" in issue 7)
    target: str = "reference"  # target per task: "reference" (its median final valid loss) | "best_baseline"
    horizon_scales: tuple[float, ...] = (0.5, 2.0)  # extra step budgets (x the 1x budget) for horizon transfer
    horizon_retune: bool = False  # re-run the LR grid at every horizon (True) or reuse the LR tuned at 1x
    profile_max_ratio: float = 4.0  # AlgoPerf r_max: the performance profile is integrated over [1, r_max]
    confidence: float = 0.95  # level of every confidence interval in the report
    bootstrap_samples: int = 10_000  # resamples of the win-rate bootstrap
    divergence_ratio: float = 1.0  # a run diverged if non-finite or final valid loss > ratio x initial

    def grid_for(self, optimizer: str) -> tuple[float, ...]:
        """The initial-LR grid for a base optimizer (explicit ``lr_grid`` first, then the log-spaced range)."""
        if optimizer in self.lr_grid:
            return tuple(float(lr) for lr in self.lr_grid[optimizer])
        low, high = self.lr_grid_ranges.get(optimizer, DEFAULT_LR_GRID_RANGES[optimizer])
        if self.lr_grid_points == 1:
            return (grid_lr((low * high) ** 0.5),)
        # Rounded so that the same grid point is the same float (and the same cell key) on every machine.
        return tuple(
            grid_lr(low * (high / low) ** (i / (self.lr_grid_points - 1))) for i in range(self.lr_grid_points)
        )


def _method_entries(value: Any, where: str) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of method names or {{method: NAME, ...options}}, got {value!r}")
    entries = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            entries.append({"method": item})
        elif isinstance(item, dict) and isinstance(item.get("method"), str):
            options = {k: v for k, v in item.items() if k not in ("method", "label")}
            if set(options) == {"options"} and isinstance(options["options"], dict):
                options = options["options"]  # the nested form dump_config writes (an output's config.yaml)
            entries.append({"method": item["method"], "options": options, "label": str(item.get("label", ""))})
        else:
            raise ConfigError(f"{where}[{i}]: expected a method name or a mapping with a 'method' key, got {item!r}")
    return entries


def read_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """An evaluation suite as data, its protocol settings checked (its method and task-suite names are
    checked by :func:`metalr.evaluation.load_eval_suite`)."""
    data = _merge(read_yaml(path), parse_overrides(overrides or []))
    if "methods" in data:
        data["methods"] = _method_entries(data["methods"], f"{path}: methods")
    config = build_config(EvalConfig, data, str(path))
    if config.split not in ("held_out", "meta_valid", "meta_train"):
        raise ConfigError(f"{path}: split must be held_out, meta_valid or meta_train, got {config.split!r}")
    _check_eval_protocol(config, str(path))
    return config


def _check_eval_protocol(config: EvalConfig, where: str) -> None:
    """Reject protocol settings that would silently produce an empty or meaningless evaluation."""
    positive = {"tasks_per_family": config.tasks_per_family, "seeds": config.seeds, "eval_every": config.eval_every,
                "lr_grid_points": config.lr_grid_points, "bootstrap_samples": config.bootstrap_samples}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: {key} must be a positive integer, got {value}")
    if not config.step_scale > 0:
        raise ConfigError(f"{where}: step_scale must be > 0 (1 = the sampled budget), got {config.step_scale}")
    if config.max_steps < 0:
        raise ConfigError(f"{where}: max_steps must be >= 0 (0 = no cap), got {config.max_steps}")
    if not config.methods:
        raise ConfigError(f"{where}: methods is empty; list at least one method")
    labels = [entry.display for entry in config.methods]
    duplicated = sorted({label for label in labels if labels.count(label) > 1})
    if duplicated:
        raise ConfigError(f"{where}: method labels must be unique, got {duplicated} twice; give one a `label:`")
    unknown_sensitivity = sorted(set(config.sensitivity_methods) - set(labels))
    if unknown_sensitivity:
        raise ConfigError(f"{where}: sensitivity_methods {unknown_sensitivity} are not method labels of the suite; labels: {labels}")
    if config.reference not in labels:
        raise ConfigError(f"{where}: reference {config.reference!r} is not a method label of the suite; labels: {labels}")
    if config.target not in TARGET_RULES:
        raise ConfigError(f"{where}: target must be one of {list(TARGET_RULES)}, got {config.target!r}")
    if any(scale <= 0 or scale == 1.0 for scale in config.horizon_scales):
        raise ConfigError(f"{where}: horizon_scales must be positive and not 1 (1x always runs), got {list(config.horizon_scales)}")
    if not 0.5 < config.confidence < 1:
        raise ConfigError(f"{where}: confidence must lie in (0.5, 1), got {config.confidence}")
    if config.profile_max_ratio <= 1:
        raise ConfigError(f"{where}: profile_max_ratio must exceed 1, got {config.profile_max_ratio}")
    if config.device not in ("cpu", "cuda"):
        raise ConfigError(f"{where}: device must be cpu or cuda, got {config.device!r}")
    for table in ("lr_grid_ranges", "lr_grid"):
        unknown = sorted(set(getattr(config, table)) - set(DEFAULT_LR_GRID_RANGES))
        if unknown:
            raise ConfigError(f"{where}: {table} names unknown optimizers {unknown}; expected {sorted(DEFAULT_LR_GRID_RANGES)}")
    for optimizer, bounds in config.lr_grid_ranges.items():
        if len(bounds) != 2 or not 0 < bounds[0] <= bounds[1]:
            raise ConfigError(f"{where}: lr_grid_ranges.{optimizer} must be [low, high] with 0 < low <= high, got {bounds}")
    for optimizer, grid in config.lr_grid.items():
        if not grid or any(not (isinstance(lr, (int, float)) and lr > 0) for lr in grid):
            raise ConfigError(f"{where}: lr_grid.{optimizer} must be a non-empty list of positive LRs, got {grid}")
