"""bench/meta_valid.py: pooled samples and the task-by-task comparison with the untrained controller."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pooled_samples_are_compared_with_the_untrained_controller_task_by_task() -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "bench/meta_valid.py", "meta_train/demo-quick.yaml", "untrained", "demo"]
    one = subprocess.run([*command, "--sample-seed", "0"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    both = subprocess.run([*command, "--sample-seed", "0,1"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)

    def terms(output: str, name: str) -> list[float]:
        line = next(line for line in output.splitlines() if line.startswith(f"{name}: "))
        return [float(t) for t in re.search(r"\[(.*)\]", line).group(1).split()]  # type: ignore[union-attr]

    assert len(terms(both.stdout, "demo")) == 2 * len(terms(one.stdout, "demo"))
    assert terms(both.stdout, "demo")[: len(terms(one.stdout, "demo"))] == terms(one.stdout, "demo")  # seed 0 first
    mine, reference = terms(both.stdout, "demo"), terms(both.stdout, "untrained")
    beaten = sum(m < r for m, r in zip(mine, reference, strict=True))
    assert f"demo vs untrained: beats it on {beaten} of {len(mine)} tasks" in both.stdout
    assert "untrained vs untrained" not in both.stdout
