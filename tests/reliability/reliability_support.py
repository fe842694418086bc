"""Shared helpers of the reliability tests: tiny recipes and suites, CLI subprocesses, trace files.

Everything here is sized so one meta-training run is ~1 s of compute (a few seconds with interpreter
start-up): linear/quadratic tasks with a handful of parameters, meta_batch 1, unrolls of 2-3 steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
HARNESS = HERE / "fault_harness.py"
# Record fields that measure the machine, not the run (see metalr.evaluation.harness.TIMING_FIELDS).
TIMING_FIELDS = ("seconds", "train_seconds", "eval_seconds", "peak_rss_mb", "rss_growth_mb", "peak_cuda_mb", "worker")

TINY_TASKS = {"dims": [4, 8], "examples": 256, "steps": [20, 40], "batch_sizes": [16], "optimizers": ["sgd", "adam"]}


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tiny_suite(directory: Path, name: str = "tiny", **lists: Any) -> Path:
    """A task suite of tiny noisy-quadratic tasks (``meta_train``), or the family lists given."""
    data: dict[str, Any] = {"name": name}
    data.update(lists or {"meta_train": [{"family": "noisy_quadratic", **TINY_TASKS}]})
    return write_yaml(directory / f"{name}-suite.yaml", data)


def tiny_recipe(directory: Path, suite: Path, name: str = "tiny", seed: int = 3, **meta: Any) -> Path:
    """A meta-training recipe that runs in about a second (``meta`` entries override the defaults)."""
    settings = {
        "meta_steps": 30,
        "meta_batch": 1,
        "unroll_length": 3,
        "checkpoint_every": 5,
        "state_every": 5,
        "log_every": 5,
        "valid_batch_size": 16,
        **meta,
    }
    return write_yaml(directory / f"{name}-recipe.yaml", {"name": name, "suite": str(suite), "seed": seed, "meta": settings})


def eval_suite_files(directory: Path) -> Path:
    """A tiny evaluation: 2 held-out families x 2 tasks x (constant, cosine) x 1 seed = 8 runs of 20 steps."""
    tasks = {"dims": [3, 6], "steps": [20, 40], "batch_sizes": [16]}
    suite = tiny_suite(
        directory,
        name="tiny-eval-tasks",
        held_out=[
            {"family": "noisy_quadratic", "examples": 256, **tasks},
            {"family": "linear_regression", "examples": [128, 256], **tasks},
        ],
    )
    return write_yaml(
        directory / "tiny-eval.yaml",
        {
            "name": "tiny-eval",
            "suite": str(suite),
            "split": "held_out",
            "tasks_per_family": 2,
            "seeds": 1,
            "max_steps": 20,
            "methods": ["constant", "cosine"],
            "tune": False,
            "horizon_scales": [],
            "eval_every": 5,
            "bootstrap_samples": 100,
        },
    )


def subprocess_env(fault: dict[str, Any] | None = None, trace: Path | None = None, rss_every: int = 0) -> dict[str, str]:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE)]),
        "RELIABILITY_FAULT": json.dumps(fault or {}),
        "RELIABILITY_TRACE": str(trace) if trace else "",
        "RELIABILITY_RSS_EVERY": str(rss_every),
    }
    env.pop("PYTHONWARNINGS", None)
    return env


def run_metalr(
    argv: list[str],
    fault: dict[str, Any] | None = None,
    trace: Path | None = None,
    rss_every: int = 0,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """``metalr <argv>`` in a fresh interpreter through :mod:`fault_harness` (hooks only when asked)."""
    return subprocess.run(
        [sys.executable, str(HARNESS), "--", *argv],
        env=subprocess_env(fault, trace, rss_every),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def read_trace(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (no pickle)."""
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118


def assert_same_tensors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], what: str) -> None:
    assert expected.keys() == actual.keys(), f"{what}: tensor names differ"
    for name in expected:
        assert expected[name].dtype == actual[name].dtype, f"{what}: {name} dtype differs"
        assert torch.equal(expected[name], actual[name]), f"{what}: tensor {name} is not bit-identical"


def assert_one_line_user_error(code: int, stderr: str, *, exit_code: int = 2) -> str:
    """The CLI contract for user errors: exit code 2, exactly one line on stderr, no traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert code == exit_code, f"exit code {code}, expected {exit_code}; stderr:\n{stderr[-2000:]}"
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr[-2000:]}"
    assert lines[0].startswith("metalr"), lines[0]
    return lines[0]


def jsonl_lines(path: Path) -> list[str]:
    """Raw lines of a JSONL file; fails on a torn (unterminated) last line."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path.name} ends with a torn record: {text[-200:]!r}"
    return text.splitlines()
