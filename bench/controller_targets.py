"""The acceptance table of a shipped controller (issue 8), computed from an evaluation's results.jsonl.

    .venv/bin/python bench/controller_targets.py runs/eval-cpu-heldout adam-cpu sgd-cpu
    .venv/bin/python bench/controller_targets.py runs/eval-1x-seeds --seed 0 adam-cpu adam-cpu-seed1 adam-cpu-seed2

One row per target, one column per controller label; every figure comes from the records through the same
:class:`metalr.evaluation.metrics.Analysis` the report uses (medians over seeds, targets = tuned cosine's
median final ``inner_valid`` loss, default LR = the task's own). ``pass`` / ``miss`` compare against the
thresholds of the issue; nothing is tuned here.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from metalr.evaluation.metrics import Analysis, final_test, is_diverged
from metalr.evaluation.report import load_records

ADAM_FAMILY = ("adam", "adamw")
SELF_TUNING_RIVALS = ("schedulefree", "prodigy", "hypergradient")


def _mark(ok: bool) -> str:
    return "pass" if ok else "miss"


def reached_fraction(analysis: Analysis, method: str) -> tuple[str, bool]:
    """Tasks where the method reached tuned cosine's target, out of the tasks it ran on."""
    total = len({r.task_key for r in analysis.records if r.method == method})
    reached = analysis.reached(method)
    return f"{reached}/{total} tasks", bool(total) and reached >= 0.8 * total


def steps_vs_tuned_cosine(analysis: Analysis, method: str) -> tuple[str, bool]:
    speedup, tasks = analysis.speedup(method, "tuned")
    if not tasks:
        return "no task reached by both", False
    ratio = 1 / speedup
    return f"{ratio:.3g}x tuned cosine's steps (geo-mean over {tasks} tasks)", ratio <= 1.0


def beats_same_lr_cosine(analysis: Analysis, method: str) -> tuple[str, bool]:
    """Grid cells (task x initial LR) where the method's median final valid loss is below cosine's at that LR,
    per task, and the grid runs that diverged."""
    cells = wins = diverged = runs = 0
    per_task, ok = [], True
    for task in analysis.tasks:
        cosine = dict(analysis.sensitivity_curve(task, "cosine"))
        own = [(lr, median) for lr, median in analysis.sensitivity_curve(task, method) if lr in cosine]
        won = sum(median < cosine[lr] for lr, median in own)
        per_task.append(f"{won}/{len(own)}")
        ok = ok and bool(own) and won >= 0.75 * len(own)
        cells, wins = cells + len(own), wins + won
        grid = analysis.grid_runs(task, method)
        diverged += sum(is_diverged(r, analysis.protocol.divergence_ratio) for r in grid)
        runs += len(grid)
    text = f"{wins}/{cells} cells (per task {', '.join(per_task)}); {diverged}/{runs} grid runs diverged"
    return text, ok


def beats_default_cosine(analysis: Analysis, method: str) -> tuple[str, bool]:
    wins = pairs = 0
    for task in analysis.tasks:
        cosine = {r.seed: r for r in analysis.runs(task, "cosine", 1.0, "default")}
        for record in analysis.reported_runs(task, method):
            other = cosine.get(record.seed)
            if other is not None:
                pairs += 1
                wins += final_test(record) < final_test(other)
    return f"{wins}/{pairs} task x seed pairs ({wins / max(pairs, 1):.0%}, final test loss)", wins >= 0.9 * pairs


def lr_robustness(analysis: Analysis, method: str, low: float = 1e-4, high: float = 1e-2) -> tuple[str, bool]:
    """Worst median final valid loss over the Adam-family grid points in [low, high], relative to the
    tuned-cosine optimum of each task, plus diverged runs; constant and cosine at the same LRs beside it."""
    def in_range(lr: float) -> bool:
        return low * (1 - 1e-9) <= lr <= high * (1 + 1e-9)

    parts = []
    ok = True
    for name in (method, "constant", "cosine"):
        worst, diverged, runs = 0.0, 0, 0
        for task in analysis.tasks:
            grid = [r for r in analysis.grid_runs(task, name) if r.optimizer in ADAM_FAMILY and in_range(r.lr)]
            if not grid:
                continue
            optimum = analysis.target(task)
            for _, median in filter(lambda point: in_range(point[0]), analysis.sensitivity_curve(task, name)):
                worst = max(worst, median / optimum if math.isfinite(median) else math.inf)
            diverged += sum(is_diverged(r, analysis.protocol.divergence_ratio) for r in grid)
            runs += len(grid)
        if not runs:
            if name == method:
                return "no Adam-family grid runs", False
            continue  # a comparison method the suite did not run (cpu-heldout-1x has no constant)
        parts.append(f"{name}: worst {worst:.3g}x, {diverged}/{runs} diverged")
        if name == method:
            ok = worst <= 1.10 and diverged == 0
    return "; ".join(parts), ok


def score_vs_rivals(analysis: Analysis, method: str) -> tuple[str, bool]:
    scores = analysis.scores()
    rivals = {r: scores[r] for r in SELF_TUNING_RIVALS if r in scores}
    text = f"{scores[method]:.3f} vs " + ", ".join(f"{r} {s:.3f}" for r, s in rivals.items())
    return text, bool(rivals) and all(scores[method] > s for s in rivals.values())


TARGETS = {
    "beats cosine at the same initial LR in >= 75% of grid cells on every task": beats_same_lr_cosine,
    "reaches the tuned-cosine target on >= 80% of tasks": reached_fraction,
    "geo-mean steps-to-target <= 1.0x tuned cosine": steps_vs_tuned_cosine,
    "beats default-LR cosine on >= 90% of task x seed pairs": beats_default_cosine,
    "Adam family, base LR 1e-4..1e-2: within 10% of the tuned-cosine optimum, 0 diverged": lr_robustness,
    "AlgoPerf-style score above Schedule-Free, Prodigy, hypergradient": score_vs_rivals,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="an evaluation directory (holds results.jsonl)")
    parser.add_argument("methods", nargs="+", help="controller labels in the evaluation, e.g. adam-cpu")
    parser.add_argument("--seed", type=int, help="only this evaluation seed's runs (for methods run with fewer seeds)")
    args = parser.parse_args()
    records = load_records(args.run_dir / "results.jsonl")
    analysis = Analysis([r for r in records if args.seed is None or r.seed == args.seed])
    missing = [m for m in args.methods if m not in analysis.methods]
    if missing:
        parser.error(f"no runs of {missing} in {args.run_dir}; it has {analysis.methods}")
    print("| target | " + " | ".join(args.methods) + " |")
    print("|---|" + "---|" * len(args.methods))
    for name, check in TARGETS.items():
        cells = []
        for method in args.methods:
            text, ok = check(analysis, method)
            cells.append(f"**{_mark(ok)}**: {text}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
