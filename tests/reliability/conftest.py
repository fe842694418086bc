"""Fixtures of the reliability tests: uninterrupted reference runs shared by the crash and determinism tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faulty_tasks  # noqa: F401  (registers the test-only family in this process too)
import pytest
from reliability_support import eval_suite_files, run_metalr, tiny_recipe, tiny_suite


@dataclass(frozen=True)
class Run:
    recipe: Path
    out: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def reliability_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reliability")


@pytest.fixture(scope="session")
def meta_reference(reliability_dir: Path) -> Run:
    """``metalr meta-train`` of the tiny recipe, uninterrupted (30 meta-steps, checkpoint/state every 5)."""
    suite = tiny_suite(reliability_dir)
    recipe = tiny_recipe(reliability_dir, suite)
    out = reliability_dir / "meta-reference"
    result = run_metalr(["meta-train", str(recipe), "--out", str(out), "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(recipe, out, result.stdout, result.stderr)


@pytest.fixture(scope="session")
def eval_reference(reliability_dir: Path) -> Run:
    """``metalr evaluate`` of the tiny evaluation suite, uninterrupted, one worker."""
    suite = eval_suite_files(reliability_dir)
    out = reliability_dir / "eval-reference"
    result = run_metalr(["evaluate", str(suite), "--out", str(out), "--workers", "1", "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    return Run(suite, out, result.stdout, result.stderr)
