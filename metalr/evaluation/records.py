"""The record of one evaluation run: what ``results.jsonl`` holds, one JSON object per line.

:class:`RunRecord` is frozen and versioned, like :class:`~metalr.evaluation.harness.Cell` whose run it
records. Version history:

* 1: the first format;
* 2: adds ``rss_growth_mb`` and ``optimizer_state_mb`` (memory per run; ``peak_rss_mb`` is the worker's).

:meth:`RunRecord.from_json` reads both (a version-1 record's missing memory fields are NaN: not measured)
and refuses any other version, or a record whose fields do not match its version, naming the version.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from metalr.config import EvalConfig, grid_lr

RECORD_VERSION = 2
# Fields that measure the machine rather than the training run: they differ between two executions of the
# same cell (process pool vs Ray, one machine vs another) and are ignored when records are compared.
TIMING_FIELDS = ("seconds", "train_seconds", "eval_seconds", "peak_rss_mb", "rss_growth_mb", "peak_cuda_mb", "worker")
# version -> fields it lacks, with the value a reader gives them
_MISSING_IN: dict[int, dict[str, Any]] = {1: {"rss_growth_mb": math.nan, "optimizer_state_mb": math.nan}, 2: {}}
_DEFAULTS = EvalConfig()


class RecordError(ValueError):
    """A ``results.jsonl`` line this version of metalr cannot read (the message names the record version)."""


def same_lr(a: float, b: float) -> bool:
    """Whether two LRs name the same grid point (both rounded as the grid is: ``config.grid_lr``)."""
    return grid_lr(a) == grid_lr(b)


@dataclass(frozen=True)
class ReportProtocol:
    """The protocol settings a report needs, stored in every record (see ``EvalConfig`` for meanings)."""

    name: str = _DEFAULTS.name
    suite: str = _DEFAULTS.suite
    split: str = _DEFAULTS.split
    methods: tuple[str, ...] = ()
    reference: str = _DEFAULTS.reference
    target: str = _DEFAULTS.target
    tune: bool = _DEFAULTS.tune
    seeds: int = 0
    lr_grid_points: int = 0
    horizon_scales: tuple[float, ...] = ()
    profile_max_ratio: float = _DEFAULTS.profile_max_ratio
    confidence: float = _DEFAULTS.confidence
    bootstrap_samples: int = _DEFAULTS.bootstrap_samples
    divergence_ratio: float = _DEFAULTS.divergence_ratio

    @classmethod
    def of(cls, config: EvalConfig) -> ReportProtocol:
        """The protocol an evaluation runs under."""
        return cls(
            name=config.name,
            suite=config.suite,
            split=config.split,
            methods=tuple(entry.display for entry in config.methods),
            reference=config.reference,
            target=config.target,
            tune=config.tune,
            seeds=config.seeds,
            lr_grid_points=config.lr_grid_points,
            horizon_scales=tuple(config.horizon_scales),
            profile_max_ratio=config.profile_max_ratio,
            confidence=config.confidence,
            bootstrap_samples=config.bootstrap_samples,
            divergence_ratio=config.divergence_ratio,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ReportProtocol:
        """From the JSON of a record; keys it does not know are ignored (older and newer writers differ)."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known
        }
        return cls(**values)


@dataclass(frozen=True)
class RunRecord:
    """One finished training run: the cell's identity, what was measured, and the protocol it ran under.

    Losses and metrics are rounded to six significant digits; ``inf`` marks a run that went non-finite.
    """

    # -- identity (``Cell.describe``) -------------------------------------------------------------------
    key: str  # the cell key: identifies the run independently of where it ran
    task: dict[str, Any]  # the TaskSpec as data
    task_key: str  # identifies the task across horizons
    task_label: str  # short name for tables
    family: str  # task family
    optimizer: str  # the task's base optimizer
    default_lr: float  # the task's default (sampled) base LR
    method: str  # the method's label in the suite (what the report calls it)
    method_name: str  # the registered method name
    options: dict[str, Any]  # the method's hyperparameters
    tuned: bool  # run over the LR grid (method.tuned)
    seed: int  # training seed
    lr: float  # initial (base) LR of this run
    lr_source: str  # "default" | "grid" | "transfer" (the LR tuned at 1x, at another horizon)
    horizon: float  # step budget relative to the 1x budget
    steps: int  # step budget of this run
    eval_every: int  # steps between inner_valid evaluations
    # -- measurements -----------------------------------------------------------------------------------
    train_loss: list[float]  # per step (stops at the first non-finite loss)
    lr_trace: list[float]  # the LR each step was taken with
    valid: list[dict[str, float]]  # inner_valid metrics with "step" and "train_seconds", every eval_every steps
    initial_valid_loss: float  # inner_valid loss before the first step
    final_valid: dict[str, float]  # final inner_valid metrics (tuning and targets)
    final_test: dict[str, float]  # final test metrics (reporting only)
    steps_done: int  # steps taken
    nonfinite_step: int | None  # the step whose loss was NaN/inf, if any
    nonfinite: bool  # the run went non-finite
    seconds: float  # wall time of the whole run (build, training, evaluations)
    train_seconds: float  # training time only (what time-to-target counts)
    eval_seconds: float  # evaluation time
    peak_rss_mb: float  # the worker process's peak RSS during the run (imports and cached data included)
    rss_growth_mb: float  # peak RSS during the training loop minus RSS at its start (NaN: not measured)
    optimizer_state_mb: float  # tensor bytes of the optimizer's state at the end (NaN: not measured)
    peak_cuda_mb: float  # peak CUDA memory allocated during the run (0 on CPU)
    worker: str  # host:pid that ran it
    protocol: ReportProtocol = field(default_factory=ReportProtocol)  # set by the parent when it is written
    version: int = RECORD_VERSION

    def with_protocol(self, protocol: ReportProtocol) -> RunRecord:
        return dataclasses.replace(self, protocol=protocol)

    def to_json(self) -> dict[str, Any]:
        """The record as the JSON object of one ``results.jsonl`` line."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRecord:
        """Read a ``results.jsonl`` object of any version this metalr reads.

        Raises:
            RecordError: an unknown version, or fields that do not match the record's version.
        """
        version = data.get("version")
        if version not in _MISSING_IN:
            raise RecordError(
                f"results.jsonl record {data.get('key', '?')!r} has record version {version!r}; this metalr reads "
                f"versions {sorted(_MISSING_IN)} (a newer metalr wrote it: re-render the report with that version)"
            )
        names = {f.name for f in fields(cls)}
        values = {**_MISSING_IN[version], **data}
        missing, unknown = sorted(names - set(values) - {"protocol"}), sorted(set(values) - names)
        if missing or unknown:
            raise RecordError(
                f"results.jsonl record {data.get('key', '?')!r} (record version {version}) does not match that "
                f"version: missing {missing}, unknown {unknown}"
            )
        values["protocol"] = ReportProtocol.from_dict(values.get("protocol") or {})
        return cls(**values)


__all__ = ["RECORD_VERSION", "TIMING_FIELDS", "RecordError", "ReportProtocol", "RunRecord"]
