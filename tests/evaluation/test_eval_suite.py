"""End to end on a tiny suite: resumable evaluation, the report, bad input, process pool vs Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import metalr.evaluation.executors as executors
import metalr.evaluation.suite as suite_module
from metalr.cli import main
from metalr.config import ConfigError, EvalConfig
from metalr.evaluation import evaluate_suite, load_eval_suite, render_report
from metalr.evaluation.harness import plan_cells, run_cell
from metalr.evaluation.records import TIMING_FIELDS, RunRecord
from metalr.evaluation.report import load_records
from metalr.evaluation.suite import held_out_specs

ROOT = Path(__file__).resolve().parents[2]


def _count_runs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []

    def counting(cell: Any, controller: Any = None) -> dict[str, Any]:
        calls.append(cell.key)
        return run_cell(cell, controller)

    monkeypatch.setattr(executors, "run_cell", counting)
    return calls


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_evaluate_is_resumable_and_the_report_lists_every_method(
    tiny_config: EvalConfig, controller_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    summary = evaluate_suite(tiny_config, str(controller_path), out, workers=1, progress=False)
    records = load_records(out / "results.jsonl")
    assert len(records) == len(_lines(out / "results.jsonl")) == 48
    assert {r.lr_source for r in records} == {"default", "grid", "transfer"}

    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for method in ("constant", "cosine", "learned"):
        assert f"| {method} |" in summary
        assert f"| {method} |" in report
        assert f"<td>{method}</td>" in html
    assert "src='data:image/png;base64," in html and "<link" not in html and "<script" not in html
    assert "Horizon transfer" in report and "Sensitivity to the initial LR" in report

    calls = _count_runs(monkeypatch)
    again = evaluate_suite(tiny_config, str(controller_path), out, workers=1, progress=False)
    assert calls == []  # the second run does no work
    assert len(_lines(out / "results.jsonl")) == 48
    assert again == summary

    # `metalr report DIR` re-renders from results.jsonl alone.
    for name in ("report.md", "report.html", "config.yaml"):
        (out / name).unlink()
    assert render_report(out) == summary
    assert (out / "report.md").read_text() == report


def test_a_torn_last_record_is_rerun_and_duplicates_are_ignored(
    tiny_config: EvalConfig, controller_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = EvalConfig(**{**tiny_config.__dict__, "tune": False, "horizon_scales": ()})
    out = tmp_path / "run"
    evaluate_suite(config, str(controller_path), out, workers=1, progress=False)
    results = out / "results.jsonl"
    lines = _lines(results)
    # A crash mid-append leaves half a line; a retried append may leave a duplicate.
    results.write_text("\n".join([*lines[:-1], lines[0]]) + "\n" + lines[-1][: len(lines[-1]) // 2])

    calls = _count_runs(monkeypatch)
    evaluate_suite(config, str(controller_path), out, workers=1, progress=False)
    assert calls == [json.loads(lines[-1])["key"]]
    parsed = [json.loads(line) for line in _lines(results)]  # every line is a whole record again
    assert len({r["key"] for r in parsed}) == len(lines)


def test_learned_without_a_controller_fails_before_any_run(tiny_config: EvalConfig, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="learned.*controller"):
        evaluate_suite(tiny_config, None, tmp_path / "run", workers=1, progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_reports_a_missing_controller_in_one_line(
    eval_yaml: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    suite = eval_yaml("tasks_per_family: 1\nseeds: 1\nmethods: [cosine, learned]\n")
    assert main(["evaluate", str(suite), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "controller" in error and "Traceback" not in error
    assert (
        main(
            [
                "evaluate",
                str(suite),
                "--controller",
                str(tmp_path / "nope.safetensors"),
                "--out",
                str(tmp_path / "run"),
            ]
        )
        == 2
    )
    assert "nope.safetensors" in capsys.readouterr().err


def test_protocol_settings_are_validated(eval_yaml: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match="reference"):
        load_eval_suite(eval_yaml("methods: [constant]\nreference: cosine\n"))
    with pytest.raises(ConfigError, match="target"):
        load_eval_suite(eval_yaml("methods: [cosine]\ntarget: fastest\n"))
    with pytest.raises(ConfigError, match="lr_grid"):
        load_eval_suite(eval_yaml("methods: [cosine]\nlr_grid: {lion: [0.1]}\n"))
    config = load_eval_suite(
        eval_yaml("methods: [cosine]\nlr_grid: {adam: [0.001, 0.01]}\nlr_grid_points: 3\n")
    )
    assert config.grid_for("adam") == (0.001, 0.01)
    assert config.grid_for("sgd") == (0.001, 0.0316227766017, 1.0)
    with pytest.raises(ConfigError, match="families"):
        held_out_specs(load_eval_suite(eval_yaml("methods: [cosine]\nfamilies: [digits_mlp]\n")))


def _without_timing(records: list[RunRecord]) -> list[dict[str, Any]]:
    stripped = []
    for record in sorted(records, key=lambda r: r.key):
        clean = {k: v for k, v in record.to_json().items() if k not in TIMING_FIELDS}
        clean["valid"] = [{k: v for k, v in p.items() if k != "train_seconds"} for p in record.valid]
        stripped.append(clean)
    return stripped


@pytest.mark.slow
def test_ray_backend_writes_the_same_results_as_the_process_pool(
    tiny_config: EvalConfig, controller_path: Path, tmp_path: Path
) -> None:
    pytest.importorskip("ray")
    config = EvalConfig(**{**tiny_config.__dict__, "horizon_scales": (), "lr_grid_points": 1})
    expected_runs = len(plan_cells(config, held_out_specs(config)))
    evaluate_suite(config, str(controller_path), tmp_path / "pool", workers=2, progress=False)
    evaluate_suite(config, str(controller_path), tmp_path / "ray", workers=2, backend="ray", progress=False)
    pool = load_records(tmp_path / "pool" / "results.jsonl")
    ray = load_records(tmp_path / "ray" / "results.jsonl")
    assert len(pool) == len(ray) == expected_runs
    assert _without_timing(pool) == _without_timing(ray)


def test_more_workers_than_cpus_is_said_once_the_suite_is_valid(
    eval_yaml: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load_eval_suite(eval_yaml("tasks_per_family: 1\nseeds: 1\nmethods: [constant]\nreference: constant\ntune: false\nhorizon_scales: []\n"))
    # Run inline whatever the worker count: the warning is what is tested, not a pool of 64 processes.
    monkeypatch.setattr(suite_module, "create_executor", lambda backend, workers, path, address: executors.InlineExecutor(path))
    evaluate_suite(config, None, tmp_path / "many", workers=executors.available_cpus() + 1, progress=False)
    assert f"workers on the {executors.available_cpus()} CPUs this process may use" in capsys.readouterr().err
    evaluate_suite(config, None, tmp_path / "fits", workers=executors.available_cpus(), progress=False)
    evaluate_suite(config, None, tmp_path / "remote", workers=64, backend="ray", address="cluster:1", progress=False)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_tasks_are_prepared_visibly_and_library_output_stays_out(tmp_path: Path) -> None:
    """A real text task on the committed fixtures with a fresh cache: its dataset is converted and its tokenizer
    trained before the first run. That phase names each task on stderr; Hugging Face's bars and the tokenizer
    trainer's blank lines on stdout do not appear."""
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "data"
    suite = tmp_path / "suite.yaml"
    suite.write_text("name: sst\nheld_out:\n  - {family: sst2_lstm, steps: [5, 5], batch_sizes: [8], fixed: {train_examples: 40}}\n")
    evaluation = tmp_path / "eval.yaml"
    evaluation.write_text(
        f"name: sst-eval\nsuite: {suite}\ntasks_per_family: 1\nseeds: 1\nmethods: [constant]\nreference: constant\n"
        "tune: false\nhorizon_scales: []\neval_every: 5\nbootstrap_samples: 50\n"
    )
    env = {**os.environ, "METALR_DATA_DIR": str(fixtures), "METALR_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # fmt: skip
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "metalr.cli", "evaluate", str(evaluation), "--out", str(tmp_path / "run"), "--workers", "1"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("sst-eval: 1 held-out tasks"), repr(result.stdout[:200])
    stderr = result.stderr.replace("\r", "\n")
    assert "preparing task 1/1: sst2_lstm" in stderr
    assert stderr.index("preparing task 1/1") < stderr.index("evaluate sst-eval")
    assert "Generating" not in stderr and "Saving the dataset" not in stderr, stderr[-3000:]


def test_report_of_records_from_a_newer_metalr_is_one_line(
    tiny_config: EvalConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = EvalConfig(**{**tiny_config.__dict__, "tune": False, "horizon_scales": (), "methods": tiny_config.methods[:1],
                           "reference": tiny_config.methods[0].display})  # fmt: skip
    out = tmp_path / "run"
    evaluate_suite(config, None, out, workers=1, progress=False)
    lines = _lines(out / "results.jsonl")
    (out / "results.jsonl").write_text("\n".join([lines[0], json.dumps({**json.loads(lines[1]), "version": 9})]) + "\n")
    assert main(["report", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "record version 9" in error and "reads versions [1, 2]" in error


def test_the_report_covers_the_evaluations_plan_and_says_what_it_left_out(
    tiny_config: EvalConfig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    methods = tuple(m for m in tiny_config.methods if m.method != "learned")
    both = EvalConfig(**{**tiny_config.__dict__, "tune": False, "horizon_scales": (), "methods": methods})
    out = tmp_path / "run"
    evaluate_suite(both, None, out, workers=1, progress=False)
    assert f"| {methods[1].display} |" in (out / "report.md").read_text()
    assert load_eval_suite(out / "config.yaml").methods == both.methods  # the output's config reads back
    # An evaluation of one method in a directory that holds records of another (copied in to reuse runs):
    one = EvalConfig(**{**both.__dict__, "methods": methods[:1], "reference": methods[0].display})
    summary = evaluate_suite(one, None, out, workers=1, progress=False)
    foreign = sum(r.method == methods[1].display for r in load_records(out / "results.jsonl"))
    assert foreign > 0
    note = f"{foreign} records in results.jsonl are outside this evaluation's plan and not reported"
    report = (out / "report.md").read_text()
    assert note in summary and note in report
    assert f"| {methods[1].display} |" not in summary and f"| {methods[1].display} |" not in report
    capsys.readouterr()
    assert main(["report", str(out)]) == 0  # re-rendering follows the directory's config.yaml
    assert capsys.readouterr().out.strip() == summary
    (out / "config.yaml").unlink()  # without one, every record is reported
    assert f"| {methods[1].display} |" in render_report(out)
