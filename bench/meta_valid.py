"""Meta-valid score of checkpoints on one recipe's sample of validation tasks, the trainer's own scoring.

    METALR_DATA_DIR=../shared/data .venv/bin/python bench/meta_valid.py meta_train/adam-cpu.yaml --sample-seed 0 \\
        checkpoints/adam-cpu.safetensors runs/adam-cpu-seed1/best.safetensors untrained

A run's meta-valid sample is drawn from its recipe seed (``sample_specs(meta_valid, meta.valid_per_family, seed + 1)``;
``--set meta.valid_per_family=4`` scores on a larger sample whose first tasks are the default sample's), so runs
of different seeds are scored on different tasks; scoring every checkpoint on one seed's sample makes them
comparable. ``untrained`` is the controller the trainer starts from with that seed (plain base schedule).
Scores use the recipe's meta-objective (its ``meta.objective_power``); ``--set`` scores under another.
``mean:A,B,...`` scores the controller whose weights are the mean of checkpoints A, B, ... (one run's last
checkpoints: a test of whether averaging beats picking one on a noisy validation score). Each line also
shows the per-task terms whose mean is the score, to see how much of a difference one task carries.
``--sample-seed 1,2,3`` pools the samples of several seeds (e.g. the tasks a run was not selected on), and
with ``untrained`` listed each other controller is compared with it task by task (tasks beaten, the median
and mean difference): the research log's selection-noise table.

    METALR_DATA_DIR=../shared/data OMP_NUM_THREADS=1 .venv/bin/python bench/meta_valid.py \
        meta_train/adam-pes-long.yaml --sample-seed 0,1,2,3 untrained adam-cpu
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from metalr.checkpoint import load_controller  # noqa: E402
from metalr.controller import LRController  # noqa: E402
from metalr.meta.recipe import load_recipe  # noqa: E402
from metalr.meta.trainer import build_controller, train_entries  # noqa: E402
from metalr.meta.validation import mean_term, validation_objective, validation_terms, wins  # noqa: E402
from metalr.tasks import load_suite  # noqa: E402
from metalr.tasks.registry import sample_specs  # noqa: E402


def averaged(controllers: list[LRController]) -> LRController:
    """The first controller with its weights replaced by the mean of all of them (one architecture)."""
    states = [c.state_dict() for c in controllers]
    if any(s.keys() != states[0].keys() or any(s[k].shape != states[0][k].shape for k in s) for s in states):
        raise SystemExit("mean: the checkpoints have different architectures")
    controllers[0].load_state_dict({k: torch.stack([s[k] for s in states]).mean(0) for k in states[0]})
    return controllers[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("controllers", nargs="+", help="checkpoint paths or shipped names, or 'untrained'")
    parser.add_argument(
        "--sample-seed",
        type=lambda text: [int(seed) for seed in text.split(",")],
        default=[0],
        help="the recipe seed whose meta-valid sample to use, or seeds A,B,C whose samples to pool",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override, e.g. meta.objective_power=3"
    )
    args = parser.parse_args()
    config = load_recipe(args.recipe, [f"seed={args.sample_seed[0]}", *args.set])
    entries = train_entries(config, load_suite(config.suite).meta_valid)
    specs = [spec for seed in args.sample_seed for spec in sample_specs(entries, config.meta.valid_per_family, seed + 1)]
    print(f"meta-valid samples (recipe seeds {args.sample_seed}): {', '.join(s.label for s in specs)}")
    scored: dict[str, list[float]] = {}
    for name in args.controllers:
        if name.startswith("mean:"):
            controller = averaged([load_controller(path) for path in name.removeprefix("mean:").split(",")])
        elif name == "untrained":
            torch.manual_seed(args.sample_seed[0])  # as the trainer initialises it
            controller = build_controller(config.controller)
        else:
            controller = load_controller(name)
        start = time.perf_counter()
        terms = scored[name] = validation_terms(controller, specs, objective=validation_objective(config.meta))
        per_task = " ".join(f"{t:+.3f}" for t in terms)
        print(f"{name}: {mean_term(terms):.4f} [{per_task}] ({time.perf_counter() - start:.0f} s)", flush=True)
    reference = scored.get("untrained")
    for name, terms in scored.items():
        if reference is not None and name != "untrained":
            differences = [t - r for t, r in zip(terms, reference, strict=True)]
            print(
                f"{name} vs untrained: beats it on {round(wins(terms, reference) * len(terms))} of {len(terms)} tasks, "
                f"difference median {statistics.median(differences):+.3f}, mean {statistics.mean(differences):+.3f}"
            )

if __name__ == "__main__":
    main()
