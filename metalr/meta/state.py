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
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from metalr.controller import LRController
from metalr.io import atomic_write
from metalr.meta.estimators import Estimator
from metalr.meta.unroll import InnerRun, start_run
from metalr.tasks import TaskSpec, build_task

STATE_FORMAT = 3  # 2: runs and estimator states as flattened pytrees; 3: the previous update per parameter
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


# -- runs and estimator states (pytrees: flattened leaves in the table, the structure from a template) ------


def put_tree(table: TensorTable, prefix: str, tree: Any) -> int:
    """Store the tensor leaves of a pytree (a policy state, an estimator state); returns their count."""
    leaves, _ = tree_flatten(tree)
    if not all(isinstance(leaf, Tensor) for leaf in leaves):
        raise ResumeError(f"{prefix}: state holds non-tensor leaves; cannot store it without pickle")
    return table.put_many(prefix, leaves)


def get_tree(table: TensorTable, prefix: str, count: int, template: Any, device: str) -> Any:
    """Rebuild a pytree stored by :func:`put_tree` in the structure of ``template``."""
    leaves, spec = tree_flatten(template)
    if len(leaves) != count:
        raise ResumeError(f"{prefix}: resume state has {count} tensors, the current structure needs {len(leaves)}")
    return tree_unflatten(list(table.get_many(prefix, count, device)), spec)


def put_run(table: TensorTable, prefix: str, run: InnerRun, estimator_state: Any = ()) -> dict[str, Any]:
    """Store ``run``'s tensors (and its estimator state) under ``prefix``; returns the JSON part."""
    return {
        "spec": run.task.spec.to_dict(),
        "step": run.step,
        "initial_valid_loss": run.initial_valid_loss,
        "valid_batch_size": run.valid_stream.batch_size,
        "positions": {
            "train": run.train_stream.position,
            "outer_valid": run.valid_stream.position,
            "inner_valid": run.inner_valid_stream.position if run.inner_valid_stream is not None else None,
        },
        "carry": put_tree(table, f"{prefix}.carry", run.carry),
        "estimator": put_tree(table, f"{prefix}.estimator", estimator_state),
    }


def get_run(
    table: TensorTable,
    prefix: str,
    record: dict[str, Any],
    controller: LRController,
    device: str,
    estimator: Estimator | None = None,
) -> tuple[InnerRun, Any]:
    """Rebuild an :class:`InnerRun` stored by :func:`put_run` (the task is rebuilt from its spec) and its
    estimator state (``estimator.init`` gives the structure)."""
    spec = TaskSpec.from_dict(record["spec"])
    task = build_task(spec, device)
    positions = record["positions"]
    fresh = start_run(task, controller, int(record["valid_batch_size"]))
    fresh.train_stream.position = int(positions["train"])
    fresh.valid_stream.position = int(positions["outer_valid"])
    if positions["inner_valid"] is not None and fresh.inner_valid_stream is not None:
        fresh.inner_valid_stream.position = int(positions["inner_valid"])
    carry = get_tree(table, f"{prefix}.carry", int(record["carry"]), fresh.carry, device)
    run = replace(fresh.with_carry(carry), step=int(record["step"]), initial_valid_loss=float(record["initial_valid_loss"]))
    estimator_state: Any = ()
    if int(record["estimator"]) and estimator is not None:
        template = estimator.init(controller, run)
        estimator_state = get_tree(table, f"{prefix}.estimator", int(record["estimator"]), template, device)
    return run, estimator_state


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
