"""Every evaluation suite and task suite in the repository loads and passes its checks (recipes:
tests/test_config.py).

They are the commands README and the research log tell users to run; a typo in one (an unknown key, a
family a suite does not have, an override a family rejects) must fail here, not an hour into a run.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from metalr.evaluation.suite import held_out_specs, load_eval_suite
from metalr.tasks.registry import load_suite, sample_specs

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: str) -> list[Path]:
    files = sorted((ROOT / folder).glob("*.yaml"))
    assert files, f"no YAML files in {folder}/"
    return files


@pytest.mark.parametrize("path", _files("tasks"), ids=lambda p: p.stem)
def test_every_task_suite_loads_and_samples_its_families(path: Path) -> None:
    suite = load_suite(str(path))  # checks that every family exists and takes its overrides
    entries = [*suite.meta_train, *suite.meta_valid, *suite.held_out]
    assert entries, f"{path.name} lists no families"
    assert [s.family for s in sample_specs(entries, 1, 0)] == [e.family for e in entries]


@pytest.mark.parametrize("path", _files("evaluate"), ids=lambda p: p.stem)
def test_every_evaluation_suite_loads_and_samples_its_tasks(path: Path) -> None:
    config = load_eval_suite(path)
    specs = held_out_specs(config)
    assert specs and all(not config.families or s.family in config.families for s in specs)
