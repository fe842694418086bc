"""Protocol numbers on hand-made results files with known answers (AlgoPerf score, profile, targets)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from metalr.evaluation.metrics import (
    Analysis,
    algoperf_score,
    is_diverged,
    performance_profile,
    performance_ratios,
    select_lr,
    time_to_target,
)
from metalr.evaluation.records import RecordError, ReportProtocol, RunRecord
from metalr.evaluation.report import load_records, render_report
from metalr.io import append_jsonl

STEPS = [0, 10, 20, 30, 40]


def record(
    task: str,
    method: str,
    curve: list[float],
    *,
    seed: int = 0,
    lr: float = 0.1,
    source: str = "default",
    tuned: bool = True,
    test_loss: float | None = None,
    horizon: float = 1.0,
    protocol: dict[str, Any] | None = None,
    **measured: Any,
) -> RunRecord:
    """A run record as the harness writes it, with a given inner_valid curve at steps 0, 10, ..., 40."""
    protocol = protocol or {"methods": ["cosine", "m1", "m2"], "reference": "cosine", "tune": False}
    values: dict[str, Any] = {
        "key": f"{task}/{method}/{seed}/{lr}/{source}/{horizon}",
        "task": {"family": "hand_made"},
        "task_key": task,
        "task_label": task,
        "family": "hand_made",
        "optimizer": "sgd",
        "default_lr": 0.1,
        "method": method,
        "method_name": method,
        "options": {},
        "tuned": tuned,
        "seed": seed,
        "lr": lr,
        "lr_source": source,
        "horizon": horizon,
        "steps": 40,
        "eval_every": 10,
        "train_loss": [1.0] * 40,
        "lr_trace": [lr] * 40,
        "valid": [
            {"step": s, "train_seconds": s / 100, "loss": v} for s, v in zip(STEPS, curve, strict=True)
        ],
        "initial_valid_loss": curve[0],
        "final_valid": {"loss": curve[-1]},
        "final_test": {"loss": curve[-1] if test_loss is None else test_loss},
        "steps_done": 40,
        "nonfinite_step": None,
        "nonfinite": not math.isfinite(curve[-1]),
        "seconds": 0.5,
        "train_seconds": 0.4,
        "eval_seconds": 0.1,
        "peak_rss_mb": 100.0,
        "rss_growth_mb": 1.0,
        "optimizer_state_mb": 0.0,
        "peak_cuda_mb": 0.0,
        "worker": "here:1",
        "protocol": ReportProtocol.from_dict(protocol),
        **measured,
    }
    return RunRecord(**values)


# Task A: target 0.5 (cosine's final loss); cosine reaches it at 40, m1 at 10, m2 at 30 -> ratios 4, 1, 3.
# Task B: target 0.4; cosine dips below its final loss at 20, m1 never, m2 at 20 -> ratios 1, inf, 1.
HAND_MADE = [
    record("A", "cosine", [1.0, 0.9, 0.7, 0.6, 0.5]),
    record("A", "m1", [1.0, 0.45, 0.4, 0.35, 0.3], tuned=False),
    record("A", "m2", [1.0, 0.8, 0.6, 0.5, 0.45], tuned=False),
    record("B", "cosine", [1.0, 0.5, 0.3, 0.35, 0.4]),
    record("B", "m1", [1.0, 0.9, 0.8, 0.7, 0.6], tuned=False),
    record("B", "m2", [1.0, 0.45, 0.39, 0.38, 0.37], tuned=False),
]


def test_profile_and_score_on_hand_made_times() -> None:
    times = {"cosine": {"A": 40.0, "B": 20.0}, "m1": {"A": 10.0, "B": math.inf}, "m2": {"A": 30.0, "B": 20.0}}
    ratios = performance_ratios(times)
    assert ratios == {
        "cosine": {"A": 4.0, "B": 1.0},
        "m1": {"A": 1.0, "B": math.inf},
        "m2": {"A": 3.0, "B": 1.0},
    }
    assert performance_profile(ratios["m2"], [1.0, 2.9, 3.0, 4.0]).tolist() == [0.5, 0.5, 1.0, 1.0]
    assert performance_profile(ratios["m1"], [1.0, 4.0, 100.0]).tolist() == [0.5, 0.5, 0.5]
    # Integral of rho over [1, 4] / 3: cosine (0 + 1)/2, m1 (1 + 0)/2, m2 ((4-3)/3 + 1)/2.
    assert algoperf_score(ratios["cosine"]) == pytest.approx(0.5)
    assert algoperf_score(ratios["m1"]) == pytest.approx(0.5)
    assert algoperf_score(ratios["m2"]) == pytest.approx(2 / 3)


def test_score_equals_numerical_integral_of_profile() -> None:
    ratios = {"a": 1.0, "b": 1.7, "c": 2.5, "d": 3.99, "e": 7.0, "f": math.inf}
    taus = np.linspace(1.0, 4.0, 300_001)
    integral = np.trapezoid(performance_profile(ratios, taus), taus) / 3
    assert algoperf_score(ratios) == pytest.approx(integral, abs=1e-4)


def test_a_task_nobody_reaches_counts_against_everyone() -> None:
    ratios = performance_ratios({"x": {"A": math.inf}, "y": {"A": math.inf}})
    assert ratios == {"x": {"A": math.inf}, "y": {"A": math.inf}}
    assert algoperf_score(ratios["x"]) == 0.0


def test_hand_made_results_file_gives_the_known_scores(tmp_path: Path) -> None:
    for item in HAND_MADE:
        append_jsonl(tmp_path / "results.jsonl", item.to_json())
    analysis = Analysis(load_records(tmp_path / "results.jsonl"))
    assert analysis.target("A") == 0.5 and analysis.target("B") == 0.4
    assert analysis.steps_table() == {
        "cosine": {"A": 40.0, "B": 20.0},
        "m1": {"A": 10.0, "B": math.inf},
        "m2": {"A": 30.0, "B": 20.0},
    }
    assert analysis.scores() == pytest.approx({"cosine": 0.5, "m1": 0.5, "m2": 2 / 3})
    speedup, tasks = analysis.speedup("m2")
    assert speedup == pytest.approx(math.sqrt(40 / 30 * 20 / 20)) and tasks == 2
    assert analysis.speedup("m1") == (pytest.approx(4.0), 1)
    assert analysis.reached("m1") == 1
    summary = render_report(tmp_path)
    for method in ("cosine", "m1", "m2"):
        assert f"| {method} |" in summary
    assert "| m2 | self-tuning | 1 | 0.667 | 2/2 | 1.15x (2) |" in summary
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") >= 3


def test_best_baseline_target_takes_the_best_tuned_median() -> None:
    protocol = {
        "methods": ["cosine", "m1", "m2"],
        "reference": "cosine",
        "tune": False,
        "target": "best_baseline",
    }
    records = [
        record("A", "cosine", [1.0, 0.9, 0.7, 0.6, 0.5], protocol=protocol),
        record("A", "m1", [1.0, 0.5, 0.4, 0.3, 0.2], tuned=True, protocol=protocol),
        record(
            "A", "m2", [1.0, 0.5, 0.4, 0.3, 0.1], tuned=False, protocol=protocol
        ),  # self-tuning: not a baseline
    ]
    assert Analysis(records).target("A") == 0.2


def test_tuning_selects_on_inner_valid_median_never_on_test() -> None:
    protocol = {"methods": ["cosine"], "reference": "cosine", "tune": True}
    records = []
    for seed, (good, bad) in enumerate([(0.30, 0.35), (0.31, 0.20), (0.29, 0.36)]):
        # lr 0.01 has the better median validation loss but a much worse test loss.
        for final, lr, test_loss in ((good, 0.01, 5.0), (bad, 0.1, 0.01)):
            records.append(
                record(
                    "A",
                    "cosine",
                    [1, 0.8, 0.6, 0.4, final],
                    seed=seed,
                    lr=lr,
                    source="grid",
                    test_loss=test_loss,
                    protocol=protocol,
                )
            )
    assert select_lr(records) == 0.01
    analysis = Analysis(records)
    runs, lr = analysis.reported("A", "cosine")
    assert lr == 0.01 and len(runs) == 3 and all(r.lr == 0.01 for r in runs)
    assert analysis.tuning_cost("cosine") == 6


def test_time_to_target_ignores_the_initial_evaluation_and_divergence_rules() -> None:
    run = record("A", "m", [0.2, 0.5, 0.3, 0.25, 0.21])
    assert time_to_target(run, 0.25) == (30.0, 0.3)
    assert time_to_target(run, 0.1) == (math.inf, math.inf)
    assert time_to_target(run, math.nan) == (math.inf, math.inf)
    assert is_diverged(run)  # final 0.21 > initial 0.2
    assert not is_diverged(run, ratio=1.1)
    assert is_diverged(record("A", "m", [1.0, 0.5, math.nan, math.nan, math.inf]))


def test_duplicate_and_torn_records_change_nothing(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    for item in [*HAND_MADE, HAND_MADE[0]]:
        append_jsonl(path, item.to_json())
    with open(path, "a") as handle:
        handle.write('{"key": "torn", "method": "m1", "valid": [')
    records = load_records(path)
    assert len(records) == len(HAND_MADE)
    assert Analysis(records).scores() == pytest.approx({"cosine": 0.5, "m1": 0.5, "m2": 2 / 3})


def test_the_resources_table_labels_per_run_and_per_worker_memory() -> None:
    from metalr.evaluation.report import resources_table

    records = [dataclasses.replace(r, rss_growth_mb=float(i), optimizer_state_mb=0.5) for i, r in enumerate(HAND_MADE)]
    table = resources_table(Analysis(records))
    assert table.header[3:6] == (
        "optimizer state MB (per run)",
        "peak RSS growth MB (per run)",
        "worker peak RSS MB (incl. imports, data)",
    )
    rows = {row[0]: row for row in table.rows}
    assert rows["m2"][3:6] == ("0.5", "3.5", "100")  # medians over the reported runs (tasks A and B)
    old = {row[0]: row for row in resources_table(Analysis([_as_version_1(r) for r in HAND_MADE])).rows}
    assert old["m2"][3:5] == ("-", "-")  # version-1 records did not measure them


def _as_version_1(record: RunRecord) -> RunRecord:
    """The record as the first version of metalr wrote it (no per-run memory fields), read back."""
    data = {k: v for k, v in record.to_json().items() if k not in ("rss_growth_mb", "optimizer_state_mb")}
    return RunRecord.from_json({**data, "version": 1})


def test_records_round_trip_and_old_versions_are_read_or_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    append_jsonl(path, HAND_MADE[0].to_json())
    assert load_records(path) == [HAND_MADE[0]]
    old = _as_version_1(HAND_MADE[1])
    assert old.version == 1 and math.isnan(old.rss_growth_mb) and old.final_valid == HAND_MADE[1].final_valid
    with pytest.raises(RecordError, match=r"has record version 3; this metalr reads versions \[1, 2\]"):
        RunRecord.from_json({**HAND_MADE[0].to_json(), "version": 3})
    broken = {k: v for k, v in HAND_MADE[0].to_json().items() if k != "lr_trace"}
    with pytest.raises(RecordError, match=r"\(record version 2\) does not match that version: missing \['lr_trace'\]"):
        RunRecord.from_json(broken)
    append_jsonl(path, {**HAND_MADE[2].to_json(), "version": 7})
    with pytest.raises(RecordError, match="record version 7"):
        load_records(path)


def test_method_styles_are_distinct_for_any_number_of_methods() -> None:
    from metalr.evaluation.plots import PALETTE, method_styles

    methods = [f"method-{i}" for i in range(250)]
    styles = list(method_styles(methods).values())
    assert len({(s.color, str(s.linestyle)) for s in styles}) == len(methods)
    assert len({(s.color, s.marker) for s in styles[:100]}) == 100
    assert [s.color for s in styles[:10]] == list(PALETTE) and len(set(PALETTE)) == 10


def test_every_line_plot_draws_each_of_eleven_methods_in_its_own_colour_and_marker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cpu-heldout suite has eleven methods; with ten colours the 1st and the 11th were both blue."""
    from metalr.evaluation import plots

    methods = ["cosine", *(f"m{i}" for i in range(1, 11))]
    protocol = {"methods": methods, "reference": "cosine", "tune": True}
    records = []
    for task in ("A", "B"):
        for i, method in enumerate(methods):
            curve = [1.0, 0.8 - 0.01 * i, 0.6, 0.5, 0.45 - 0.01 * i]
            for horizon in (1.0, 2.0):
                records.append(record(task, method, curve, horizon=horizon, protocol=protocol))
            records += [record(task, method, curve, lr=lr, source="grid", protocol=protocol) for lr in (0.01, 0.1)]
    analysis = Analysis(records)
    figures: list[Any] = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.performance_profile_plot(analysis, tmp_path / "p.png")
    plots.sensitivity_plot(analysis, tmp_path / "s.png")
    plots.learning_curves_plot(analysis, "A", tmp_path / "c.png")
    plots.horizon_plot(analysis, tmp_path / "h.png")
    assert len(figures) == 4
    for figure in figures:
        lines = {}
        for line in figure.axes[0].get_lines():
            method = line.get_label().split(" (")[0]
            if method in methods:
                lines[method] = (line.get_color(), line.get_marker())
        assert sorted(lines) == sorted(methods), figure.axes[0].get_title()
        assert len(set(lines.values())) == len(methods), f"{figure.axes[0].get_title()}: {lines}"


def test_the_grid_run_at_the_default_lr_is_also_the_default_lr_run() -> None:
    on_default = [record("A", "m1", [1.0, 0.5, 0.4, 0.3, 0.2], seed=s, lr=0.1, source="grid") for s in (0, 1)]
    elsewhere = record("A", "m1", [1.0, 0.9, 0.9, 0.9, 0.9], lr=0.01, source="grid")
    analysis = Analysis([*on_default, elsewhere])
    assert analysis.runs("A", "m1", 1.0, "default") == on_default
    assert analysis.grid_runs("A", "m1") == [elsewhere, *on_default]
    # Results from before plan_cells ran that cell once hold a default-LR run of the same seed too: kept alone.
    old = record("A", "m1", [1.0, 0.5, 0.4, 0.3, 0.2], seed=0, lr=0.1, source="default")
    assert Analysis([old, *on_default]).runs("A", "m1", 1.0, "default") == [old, on_default[1]]
