"""Train each CPU family of metalr.tasks.real once, at its reference (full-budget) setting, with a cosine
schedule, and print a markdown table of final test metrics and seconds per run.

    .venv/bin/python bench/bench_real_tasks.py --data-dir ../shared/data mnist_cnn sst2_bilstm

With no family named, every CPU family whose dataset is found in the data directory runs. One thread
(``--threads``) so the figures do not depend on, or disturb, other work on a shared machine.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

from metalr.tasks import create_task_family
from metalr.tasks.datasets import DatasetError
from metalr.tasks.optimizers import make_torch_optimizer
from metalr.tasks.real import RealTaskFamily, evaluate_split, real_family_names

ROOT = Path(__file__).resolve().parents[1]
SHOWN = ("accuracy", "top5_accuracy", "f1", "macro_f1", "auc", "exact_match", "perplexity")


def train_reference(family: RealTaskFamily, steps: int | None, log_every: int) -> dict[str, float]:
    spec = family.reference_spec(seed=0)
    if steps is not None:
        spec = spec.replace(steps=steps)
    build_start = time.perf_counter()
    task = family.build(spec)
    build_seconds = time.perf_counter() - build_start
    model = task.model
    optimizer = make_torch_optimizer(spec.optimizer, model.parameters(), spec.base_lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.steps)
    batches = task.batches("train")
    start = time.perf_counter()
    model.train()
    for step in range(spec.steps):
        loss = task.loss(model, next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = loss.item()
        if log_every and (step + 1) % log_every == 0:
            print(
                f"  {family.name} step {step + 1}/{spec.steps} loss {value:.4f} ({time.perf_counter() - start:.0f} s)",
                file=sys.stderr,
                flush=True,
            )
        if not math.isfinite(value):
            print(f"  {family.name}: loss diverged at step {step + 1}", file=sys.stderr)
            break
    train_seconds = time.perf_counter() - start
    model.eval()
    metrics = evaluate_split(task, model, "test")
    metrics.update(
        train_s=train_seconds,
        build_s=build_seconds,
        eval_s=time.perf_counter() - start - train_seconds,
        steps=spec.steps,
    )
    metrics["config"] = f"{spec.optimizer} lr={spec.base_lr:g} bs={spec.batch_size} " + ", ".join(
        f"{k}={v}" for k, v in spec.options.items() if k not in ("dataset", "data_dir") and v is not None
    )  # type: ignore[assignment]
    metrics["train_rows"] = next(iter(task.splits["train"].values())).shape[0]
    metrics["test_rows"] = next(iter(task.splits["test"].values())).shape[0]
    return metrics


def _quiet_progress_bars() -> None:
    # Per-split progress bars of datasets/transformers would bury the table; errors still print.
    try:
        import datasets
        import transformers

        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="*", help="family names (default: every CPU family)")
    parser.add_argument(
        "--data-dir", default=str(ROOT.parent / "shared" / "data"), help="folder of original dataset files"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="override the reference step budget (smoke runs)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on shared machines)")
    parser.add_argument(
        "--log-every", type=int, default=0, help="print the training loss every N steps to stderr"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    _quiet_progress_bars()
    names = args.families or real_family_names("cpu")
    rows = []
    for name in names:
        family = create_task_family(name, data_dir=args.data_dir)
        assert isinstance(family, RealTaskFamily)
        try:
            metrics = train_reference(family, args.steps, args.log_every)
        except DatasetError as err:
            print(f"skipping {name}: {err}", file=sys.stderr)
            continue
        rows.append((name, family, metrics))
        print(
            f"{name}: "
            + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()),
            file=sys.stderr,
            flush=True,
        )
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.processor() or platform.machine()}, data {os.path.abspath(args.data_dir)}\n"
    )
    print(
        "| family | dataset | steps | train rows | test rows | test loss | "
        + " | ".join(SHOWN)
        + " | train s | total s | reference config |"
    )
    print("|---" * (9 + len(SHOWN)) + "|")
    for name, family, m in rows:
        shown = " | ".join(f"{m[k]:.4f}" if k in m and isinstance(m[k], float) else "" for k in SHOWN)
        total = m["train_s"] + m["build_s"] + m["eval_s"]
        print(
            f"| {name} | {family.dataset} | {m['steps']} | {m['train_rows']} | {m['test_rows']} | {m['loss']:.4f} | {shown} | {m['train_s']:.1f} | {total:.1f} | {m['config']} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
