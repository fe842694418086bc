"""Resume state of a meta-training run: safetensors for tensors, JSON (in its metadata) for the rest.

Everything that decides the rest of the run is captured, so a run killed with SIGKILL and resumed ends
with the *bit-identical* controller of an uninterrupted run: controller weights, the meta-optimizer's
state, the task sampler's generator, the global torch RNG, loop counters, and every inner run of the
meta-batch (parameters, optimizer state, the controller's feature/recurrent state, batch-stream positions
and the PES particles). Tasks themselves are rebuilt from their :class:`~metalr.tasks.TaskSpec` (building
is deterministic in the spec).

Loading never unpickles: safetensors is raw buffers plus a JSON header (``torch.load`` is not used). Files
are written with :func:`metalr.io.atomic_write`, so a kill during a write leaves the previous state intact;
the two newest states per worker are kept.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from metalr.controller import LRController, PolicyState
from metalr.features import FeatureState
from metalr.io import atomic_write
from metalr.meta.estimators import PESState
from metalr.meta.inner import make_inner_optimizer
from metalr.meta.unroll import InnerRun
from metalr.tasks import TaskSpec, build_task

STATE_FORMAT = 1
METADATA_KEY = "metalr_resume"
_NAME = re.compile(r"^state-rank(\d+)-step(\d+)\.safetensors$")


class ResumeError(ValueError):
    """A resume state that cannot be used (the message names the file and the problem)."""


class TensorTable:
    """Collects named tensors for one safetensors file (copies: safetensors refuses shared storage)."""

    def __init__(self, tensors: dict[str, Tensor] | None = None) -> None:
        self.tensors: dict[str, Tensor] = tensors or {}

    def put(self, name: str, tensor: Tensor) -> str:
        self.tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        return name

    def put_many(self, prefix: str, tensors: tuple[Tensor, ...] | list[Tensor]) -> int:
        for i, t in enumerate(tensors):
            self.put(f"{prefix}.{i}", t)
        return len(tensors)

    def get(self, name: str, device: str | torch.device = "cpu") -> Tensor:
        if name not in self.tensors:
            raise ResumeError(f"resume state lacks tensor {name!r}")
        return self.tensors[name].to(device)

    def get_many(self, prefix: str, count: int, device: str | torch.device = "cpu") -> tuple[Tensor, ...]:
        return tuple(self.get(f"{prefix}.{i}", device) for i in range(count))


# -- policy / runs ------------------------------------------------------------------------------------------


def _put_policy(table: TensorTable, prefix: str, policy: PolicyState) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name, value in zip(FeatureState._fields, policy.features, strict=True):
        if isinstance(value, tuple):
            counts[name] = table.put_many(f"{prefix}.features.{name}", value)
        elif isinstance(value, Tensor):
            table.put(f"{prefix}.features.{name}", value)
        else:
            raise ResumeError(f"feature state field {name!r} is neither a tensor nor a tuple of tensors")
    table.put(f"{prefix}.log_factor", policy.log_factor)
    table.put(f"{prefix}.hidden", policy.hidden)
    return counts


def _get_policy(table: TensorTable, prefix: str, counts: dict[str, int], device: str) -> PolicyState:
    values: list[Any] = []
    for name in FeatureState._fields:
        key = f"{prefix}.features.{name}"
        values.append(table.get_many(key, counts[name], device) if name in counts else table.get(key, device))
    return PolicyState(
        FeatureState(*values),
        table.get(f"{prefix}.log_factor", device),
        table.get(f"{prefix}.hidden", device),
    )


def put_run(table: TensorTable, prefix: str, run: InnerRun) -> dict[str, Any]:
    """Store ``run``'s tensors under ``prefix``; returns the JSON part."""
    record: dict[str, Any] = {
        "spec": run.task.spec.to_dict(),
        "step": run.step,
        "initial_valid_loss": run.initial_valid_loss,
        "valid_batch_size": run.valid_stream.batch_size,
        "positions": {
            "train": run.train_stream.position,
            "outer_valid": run.valid_stream.position,
            "inner_valid": run.inner_valid_stream.position if run.inner_valid_stream is not None else None,
        },
        "params": table.put_many(f"{prefix}.params", run.params),
        "opt_state": table.put_many(f"{prefix}.opt_state", run.opt_state),
        "policy": _put_policy(table, f"{prefix}.policy", run.policy),
    }
    pes: PESState | None = run.estimator_state.get("pes")
    if pes is not None:
        particles = []
        for i in range(len(pes.params)):
            particles.append(
                {
                    "params": table.put_many(f"{prefix}.pes.{i}.params", pes.params[i]),
                    "opt_state": table.put_many(f"{prefix}.pes.{i}.opt_state", pes.opt_state[i]),
                    "policy": _put_policy(table, f"{prefix}.pes.{i}.policy", pes.policy[i]),
                }
            )
        accumulated = [table.put_many(f"{prefix}.pes.xi.{j}", xi) for j, xi in enumerate(pes.accumulated)]
        record["pes"] = {"particles": particles, "accumulated": accumulated}
    return record


def get_run(
    table: TensorTable, prefix: str, record: dict[str, Any], controller: LRController, device: str
) -> InnerRun:
    """Rebuild an :class:`InnerRun` stored by :func:`put_run` (the task is rebuilt from its spec)."""
    spec = TaskSpec.from_dict(record["spec"])
    task = build_task(spec, device)
    positions = record["positions"]
    train = task.batches("train")
    train.position = int(positions["train"])
    valid = task.batches("outer_valid", batch_size=int(record["valid_batch_size"]))
    valid.position = int(positions["outer_valid"])
    inner_valid = None
    if positions["inner_valid"] is not None:
        inner_valid = task.batches("inner_valid", batch_size=int(record["valid_batch_size"]))
        inner_valid.position = int(positions["inner_valid"])
    estimator_state: dict[str, Any] = {}
    if "pes" in record:
        pes = record["pes"]
        particles = pes["particles"]
        estimator_state["pes"] = PESState(
            params=tuple(
                table.get_many(f"{prefix}.pes.{i}.params", p["params"], device)
                for i, p in enumerate(particles)
            ),
            opt_state=tuple(
                table.get_many(f"{prefix}.pes.{i}.opt_state", p["opt_state"], device)
                for i, p in enumerate(particles)
            ),
            policy=tuple(
                _get_policy(table, f"{prefix}.pes.{i}.policy", p["policy"], device)
                for i, p in enumerate(particles)
            ),
            accumulated=tuple(
                table.get_many(f"{prefix}.pes.xi.{j}", n, device) for j, n in enumerate(pes["accumulated"])
            ),
        )
    return InnerRun(
        task=task,
        names=tuple(dict(task.model.named_parameters())),
        params=table.get_many(f"{prefix}.params", record["params"], device),
        opt_state=table.get_many(f"{prefix}.opt_state", record["opt_state"], device),
        policy=_get_policy(table, f"{prefix}.policy", record["policy"], device),
        step=int(record["step"]),
        train_stream=train,
        valid_stream=valid,
        initial_valid_loss=float(record["initial_valid_loss"]),
        optimizer=make_inner_optimizer(spec.optimizer),
        inner_valid_stream=inner_valid,
        estimator_state=estimator_state,
    )


# -- meta-optimizer -------------------------------------------------------------------------------------------


def put_optimizer(table: TensorTable, prefix: str, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    state_dict = optimizer.state_dict()
    entries: dict[str, list[str]] = {}
    for index, values in state_dict["state"].items():
        entries[str(index)] = []
        for key, value in values.items():
            if not isinstance(value, Tensor):
                raise ResumeError(
                    f"meta-optimizer state {key!r} is not a tensor; cannot store it without pickle"
                )
            table.put(f"{prefix}.{index}.{key}", value)
            entries[str(index)].append(key)
    return {"state": entries, "param_groups": state_dict["param_groups"]}


def get_optimizer(
    table: TensorTable, prefix: str, record: dict[str, Any], optimizer: torch.optim.Optimizer
) -> None:
    state = {
        int(index): {key: table.get(f"{prefix}.{index}.{key}") for key in keys}
        for index, keys in record["state"].items()
    }
    optimizer.load_state_dict({"state": state, "param_groups": record["param_groups"]})


# -- files ---------------------------------------------------------------------------------------------------


def state_path(directory: Path, rank: int, step: int) -> Path:
    return directory / f"state-rank{rank}-step{step:08d}.safetensors"


def write_state(
    directory: Path, rank: int, step: int, table: TensorTable, record: dict[str, Any], keep: int = 2
) -> Path:
    """Atomically write one worker's state for ``step``; keep the ``keep`` newest of this worker."""
    directory.mkdir(parents=True, exist_ok=True)
    path = state_path(directory, rank, step)
    metadata = {METADATA_KEY: json.dumps({"format": STATE_FORMAT, **record}, allow_nan=True)}
    atomic_write(path, lambda tmp: save_file(table.tensors, tmp, metadata=metadata))
    mine = sorted(available_steps(directory, rank))
    for old in mine[:-keep]:
        state_path(directory, rank, old).unlink(missing_ok=True)
    return path


def available_steps(directory: Path, rank: int) -> list[int]:
    """Meta-steps for which worker ``rank`` has a complete state file."""
    if not directory.is_dir():
        return []
    steps = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match and int(match.group(1)) == rank:
            steps.append(int(match.group(2)))
    return sorted(steps)


def read_state(path: Path) -> tuple[TensorTable, dict[str, Any]]:
    """Tensors and JSON record of a state file (validated: format version, metadata present)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several types for corrupt files
        raise ResumeError(f"{path}: not a readable resume state ({err})") from None
    if METADATA_KEY not in metadata:
        raise ResumeError(f"{path}: not a metalr resume state (no {METADATA_KEY!r} metadata)")
    record = json.loads(metadata[METADATA_KEY])
    if record.get("format") != STATE_FORMAT:
        raise ResumeError(
            f"{path}: resume-state format {record.get('format')!r}; this version reads {STATE_FORMAT}"
        )
    return TensorTable(tensors), record
