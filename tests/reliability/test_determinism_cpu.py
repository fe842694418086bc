"""Issue 10, point 5: same seed and config => identical controller and identical evaluation records on CPU.

Both sides run through the CLI in separate processes (``conftest.py`` holds the first run of each).
Provenance that names the machine or the moment (the git commit, wall-clock and memory fields) is left
out of the comparison; everything else must match bit for bit. Sources of GPU nondeterminism are
documented in RELIABILITY.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from reliability_support import TIMING_FIELDS, assert_same_tensors, jsonl_lines, run_metalr, tensors
from safetensors import safe_open

from metalr.checkpoint import METADATA_KEY
from metalr.cli import main
from metalr.config import MetaTrainConfig, load_config
from metalr.meta.trainer import meta_train


def _metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()[METADATA_KEY])
    meta["provenance"].pop("git_commit", None)  # the lead may commit between two runs
    return meta


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in jsonl_lines(path)]


@pytest.mark.slow
def test_same_seed_and_config_give_a_bit_identical_controller_from_the_cli(meta_reference, tmp_path: Path) -> None:
    out = tmp_path / "again"
    result = run_metalr(["meta-train", str(meta_reference.recipe), "--out", str(out), "--no-progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in meta_reference.out.glob("*.safetensors"))
    assert names == sorted(p.name for p in out.glob("*.safetensors")) and "final.safetensors" in names
    for name in names:
        assert_same_tensors(tensors(meta_reference.out / name), tensors(out / name), name)
        assert _metadata(meta_reference.out / name) == _metadata(out / name), name
    assert _metrics(out / "metrics.jsonl") == _metrics(meta_reference.out / "metrics.jsonl")
    assert (out / "config.yaml").read_text() == (meta_reference.out / "config.yaml").read_text()


def test_another_seed_gives_another_controller(meta_reference, tmp_path: Path) -> None:
    """The comparison above can fail: a different seed changes the weights."""
    config = load_config(MetaTrainConfig, meta_reference.recipe, ["seed=4", "meta.meta_steps=10"])
    other = meta_train(config, tmp_path / "other", progress=False).net.state_dict()
    reference = tensors(meta_reference.out / "checkpoint-10.safetensors")
    assert any(not other[name].equal(reference[name]) for name in reference)


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    out["valid"] = [{k: v for k, v in point.items() if k not in TIMING_FIELDS} for point in record["valid"]]
    return out


@pytest.mark.slow
def test_two_evaluations_write_identical_records(eval_reference, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The reference ran in a subprocess; this one runs in the test process (one torch thread in both)."""
    out = tmp_path / "again"
    assert main(["evaluate", str(eval_reference.recipe), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    first = [_comparable(json.loads(line)) for line in jsonl_lines(eval_reference.out / "results.jsonl")]
    second = [_comparable(json.loads(line)) for line in jsonl_lines(out / "results.jsonl")]
    assert len(first) == 8
    assert first == second  # same records in the same order
