"""Tiny evaluation suites for the harness tests: two held-out families at 30 steps, a fresh controller."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import metalr
from metalr.config import EvalConfig
from metalr.evaluation import load_eval_suite

TINY_SUITE = """\
name: tiny
held_out:
  - {family: iris_mlp, steps: [30, 30]}
  - {family: teacher_student, steps: [30, 30]}
"""


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    path.write_text(TINY_SUITE)
    return path


@pytest.fixture(scope="session")
def controller_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("controller") / "fresh.safetensors"
    metalr.save_controller(metalr.LRController(), path)
    return path


@pytest.fixture()
def eval_yaml(tmp_path: Path, tiny_suite: Path) -> Callable[[str], Path]:
    """Writes an evaluation suite YAML over the tiny task suite (the body is the rest of the YAML)."""

    def write(body: str) -> Path:
        path = tmp_path / "eval.yaml"
        path.write_text(f"suite: {tiny_suite}\n{body}")
        return path

    return write


@pytest.fixture()
def tiny_config(eval_yaml: Callable[[str], Path]) -> EvalConfig:
    """2 tasks x 3 methods x 2 seeds, a 2-point LR grid and one extra horizon: 48 runs of <= 60 steps."""
    path = eval_yaml(
        "name: tiny evaluation\ntasks_per_family: 1\nseeds: 2\neval_every: 10\nlr_grid_points: 2\n"
        "horizon_scales: [2.0]\nbootstrap_samples: 500\nmethods: [constant, cosine, learned]\n"
    )
    return load_eval_suite(path)
