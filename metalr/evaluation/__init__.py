"""The evaluation harness: held-out tasks x methods x seeds x initial LRs x horizons, run through one loop.

``evaluate_suite`` runs an ``evaluate/*.yaml`` suite (process pool or Ray) into a directory with
``results.jsonl``; ``render_report`` turns that file alone into ``report.md`` and ``report.html``.

Example:
    >>> from pathlib import Path
    >>> summary = evaluate_suite(load_eval_suite("evaluate/demo-quick.yaml"), "runs/demo/final.safetensors",
    ...                          out_dir=Path("runs/eval"), workers=2)
"""

from metalr.evaluation.report import render_report
from metalr.evaluation.suite import evaluate_suite, load_eval_suite

__all__ = ["evaluate_suite", "load_eval_suite", "render_report"]
