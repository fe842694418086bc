"""``metalr demo``: the main job on the embedded default, offline and without arguments.

1. meta-train a controller with ``meta_train/demo.yaml`` on the embedded suite's meta-train families;
2. evaluate it with ``evaluate/demo.yaml`` on held-out embedded families against constant, step,
   exponential and cosine schedules (the same harness as ``metalr evaluate``);
3. print the summary table and where the report and plots are.

``--quick`` uses the ``-quick`` variants of both files (about 45 s on 2 cores instead of 3-6 minutes; the
end-to-end test runs it).
"""

from __future__ import annotations

from pathlib import Path

from metalr.shipped import shipped_dir


def run_demo(out: Path, quick: bool = False, progress: bool = True, workers: int = 0) -> str:
    """Meta-train then evaluate; returns the text to print."""
    from metalr.evaluation import evaluate_suite, load_eval_suite
    from metalr.evaluation.report import FIGURES
    from metalr.meta.recipe import load_recipe
    from metalr.meta.trainer import meta_train

    suffix = "-quick" if quick else ""
    # Always the shipped files: a file called "demo" in the working directory is not the demo.
    recipe = shipped_dir("meta_train") / f"demo{suffix}.yaml"
    suite = shipped_dir("evaluate") / f"demo{suffix}.yaml"
    config = load_recipe(recipe)
    eval_config = load_eval_suite(suite)
    controller_dir = out / "controller"
    if not (controller_dir / "final.safetensors").exists():
        print(f"[1/2] meta-training a controller (recipe {recipe.stem}) -> {controller_dir}")
        meta_train(config, controller_dir, progress=progress)
    else:
        print(f"[1/2] using the controller already in {controller_dir}")
    # Select on the suite's held-out meta-valid families, never on the evaluation tasks (DESIGN.md: meta-
    # validation on the training families did not predict held-out results). The quick recipe has no
    # validation checkpoints and uses its final controller.
    best = controller_dir / "best.safetensors"
    controller_path = best if best.exists() else controller_dir / "final.safetensors"
    print(f"[2/2] evaluating on held-out embedded tasks (suite {suite.stem}) -> {out / 'evaluation'}")
    summary = evaluate_suite(
        eval_config,
        controller=str(controller_path),
        out_dir=out / "evaluation",
        workers=workers,
        backend="process",
        address=None,
        progress=progress,
    )
    return (
        f"\n{summary}\n\nreport: {out / 'evaluation' / 'report.md'} (and report.html; plots in "
        f"{out / 'evaluation' / FIGURES})\n"
        f"controller: {controller_path} (load it with metalr.load_controller)"
    )
