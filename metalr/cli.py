"""``metalr`` command line: parse, build, call. User errors end with exit code 2 and one line."""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from metalr.checkpoint import CheckpointError
from metalr.config import ROOT, ConfigError
from metalr.hub import DEFAULT_FILENAME as HUB_FILENAME
from metalr.shipped import resolve_shipped
from metalr.tasks.datasets.base import DatasetError


class UserError(Exception):
    """A mistake in what the user asked for (printed as one line, exit code 2)."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, ConfigError, CheckpointError, DatasetError, FileNotFoundError)
DEMO_MARKER = ".metalr-demo"  # `metalr demo` only ever deletes a directory that holds this file


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + message
        self.exit(2, f"metalr: error: {message} (see `{self.prog} --help`)\n")


@dataclass(frozen=True)
class Continuation:
    """How to continue an interrupted command: its output directory and the exact command that resumes it."""

    out: Path
    command: str

    def hint(self, marker: str | None = None) -> str:
        """``"; continue with: <command>"`` once ``out`` holds work (beyond ``marker``), else ``""``."""
        held = [p.name for p in self.out.iterdir()] if self.out.is_dir() else []
        return f"; continue with: {self.command}" if set(held) - {marker} else ""


def _continuation(args: argparse.Namespace, out: Path, flag: str | None = "--resume") -> Continuation:
    tokens = list(args.argv)
    if flag and flag not in tokens:
        tokens.append(flag)
    return Continuation(out, shlex.join(["metalr", *tokens]))


def _fresh_dir(path: Path, resume: bool) -> Path:
    if path.exists() and any(path.iterdir()) and not resume:
        raise UserError(f"output directory {path} is not empty; choose another --out or pass --resume")
    if resume and not (path.is_dir() and any(path.iterdir())):
        state = "is empty" if path.is_dir() else "does not exist"
        raise UserError(f"--resume: {path} {state}, so there is nothing to resume; drop --resume to start a new run")
    return path


@contextlib.contextmanager
def _removed_on_user_error(out: Path) -> Iterator[None]:
    """A command that fails on the user's input leaves no partial output directory behind (one it created)."""
    existed = out.exists()
    try:
        yield
    except USER_ERRORS:
        if not existed:
            shutil.rmtree(out, ignore_errors=True)
        raise


def cmd_meta_train(args: argparse.Namespace) -> int:
    from metalr.meta.recipe import load_recipe
    from metalr.meta.trainer import MetaTrainingError, meta_train

    if args.threads < 0:
        raise UserError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    config = load_recipe(resolve_shipped("meta_train", args.recipe, UserError), args.overrides)  # every name checked before anything is on disk
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path(config.out_dir) / config.name
    _fresh_dir(out, args.resume)
    args.continuation = _continuation(args, out)
    with _removed_on_user_error(out):
        try:
            meta_train(config, out, progress=not args.no_progress, resume=args.resume)
        except MetaTrainingError as err:  # the run's settings cannot work: one line, exit code 2
            raise UserError(str(err)) from None
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every worker gets here; say it once
        print(f"controller written to {out / 'final.safetensors'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from metalr.evaluation import evaluate_suite, load_eval_suite
    from metalr.evaluation.records import RecordError

    config = load_eval_suite(resolve_shipped("evaluate", args.suite, UserError), args.overrides)
    if args.seeds is not None:
        if args.seeds <= 0:
            raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
        config = config.__class__(**{**config.__dict__, "seeds": args.seeds})
    if args.controller is not None:
        from metalr.checkpoint import load_controller

        load_controller(args.controller)  # fail before any run starts
    out = Path(args.out)
    if args.workers < 0:
        raise UserError(f"--workers must be a positive integer (or 0 for all CPUs), got {args.workers}")
    args.continuation = _continuation(args, out, flag=None)  # re-running the same command skips finished runs
    with _removed_on_user_error(out):
        try:
            summary = evaluate_suite(
                config,
                controller=args.controller,
                out_dir=out,
                workers=args.workers,
                backend=args.backend,
                address=args.address,
                progress=not args.no_progress,
            )
        except RecordError as err:  # --out holds records of a version this metalr cannot read
            raise UserError(str(err)) from None
    print(summary)
    print(f"\nreport: {out / 'report.md'} (and report.html); records: {out / 'results.jsonl'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    directory = Path(args.run_dir)
    if not (directory / "results.jsonl").is_file():
        raise UserError(f"{directory} has no results.jsonl; point `metalr report` at an evaluation output directory")
    from metalr.evaluation.records import RecordError
    from metalr.evaluation.suite import report_directory

    try:
        print(report_directory(directory))
    except RecordError as err:  # records of a version this metalr cannot read
        raise UserError(str(err)) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from metalr.demo import run_demo

    out = Path(args.out)
    if args.workers < 0:
        raise UserError(f"--workers must be a positive integer (or 0 for all CPUs), got {args.workers}")
    if out.exists() and any(out.iterdir()) and not args.resume:
        if not (out / DEMO_MARKER).is_file():
            raise UserError(f"{out} is not empty and was not written by `metalr demo`; choose another --out")
        shutil.rmtree(out)  # a previous demo's output: start afresh
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).touch()
    args.continuation = _continuation(args, out)
    try:
        print(run_demo(out, quick=args.quick, progress=not args.no_progress, workers=args.workers))
    except BaseException:
        # A demo that failed (or was interrupted) before writing anything leaves no empty folder behind.
        if created and out.is_dir() and {p.name for p in out.iterdir()} <= {DEMO_MARKER}:
            shutil.rmtree(out, ignore_errors=True)
        raise
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from metalr.hub import push_controller

    try:
        url = push_controller(args.checkpoint, args.repo_id, filename=args.filename, private=args.private or None)
    except OSError as err:  # the Hub refused or could not be reached (not logged in, no network, ...)
        raise UserError(f"pushing {args.checkpoint} to {args.repo_id} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    print(f"pushed {args.checkpoint} to {args.repo_id}: {url}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    import json

    import torch

    from metalr.tasks import create_task_family, list_task_families

    if args.action == "list":
        rows = [("family", "dataset", "model", "budget")]
        for name in list_task_families():
            family = create_task_family(name)
            rows.append((name, family.dataset, family.model, family.budget))
        _print_table(rows)
        return 0
    if not args.name:
        raise UserError("`metalr tasks show` needs a family name (see `metalr tasks list`)")
    try:
        family = create_task_family(args.name)
    except KeyError as err:
        raise UserError(err.args[0]) from None
    if args.sample <= 0:
        raise UserError(f"--sample must be a positive integer, got {args.sample}")
    print(f"{args.name}: {family.description}\n  dataset: {family.dataset}\n  model: {family.model}\n  budget: {family.budget}")
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(args.sample):
        print(json.dumps(family.sample(generator).to_dict(), sort_keys=True))
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from metalr.methods import create_method, list_methods

    rows = [("method", "tuning", "description", "source")]
    for name in list_methods():
        method = create_method(name)
        rows.append((name, "LR grid" if method.tuned else "self-tuning", method.description, method.source))
    _print_table(rows)
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="metalr", description="Meta-learned learning-rate controllers for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("meta-train", help="meta-train a controller from a recipe (meta_train/*.yaml)")
    p.add_argument("recipe", help="recipe YAML, e.g. meta_train/demo.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. meta.meta_steps=50 seed=1")
    p.add_argument("--out", help="run directory (default: <out_dir>/<name> from the recipe)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default 0: torch's default, all cores); give 1 to each of several runs side by side "
        "(two 2-thread PES runs on 2 cores take 3.5-4.4x as long as two 1-thread ones: BENCHMARKS.md)",
    )
    p.set_defaults(func=cmd_meta_train)

    p = sub.add_parser("evaluate", help="run held-out tasks x methods x seeds and write a report")
    p.add_argument("suite", help="evaluation suite YAML, e.g. evaluate/embedded.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the suite")
    p.add_argument("--controller", help="checkpoint path or shipped name for the 'learned' method")
    p.add_argument("--seeds", type=int, help="training seeds per cell (overrides the suite)")
    p.add_argument("--workers", type=int, default=0, help="parallel worker processes (default: all CPUs this process may use)")
    p.add_argument("--out", required=True, help="output directory; re-running into it skips finished runs")
    p.add_argument("--backend", choices=("process", "ray"), default="process", help="where runs execute")
    p.add_argument("--address", help="Ray cluster address (with --backend ray; local when omitted)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("report", help="re-render report.md/report.html of an evaluation directory (its config.yaml plan, else every record)")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="meta-train a small controller on embedded tasks and evaluate it")
    p.add_argument(
        "--quick", action="store_true", help="about 45 s on 2 cores instead of 3-6 minutes (the tests run it)"
    )
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--resume", action="store_true", help="keep finished work in --out")
    p.add_argument("--workers", type=int, default=0, help="evaluation worker processes (default: all CPUs this process may use)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    # The token comes from `hf auth login` or $HF_TOKEN, never from the command line (shell history).
    p = sub.add_parser("push", help="upload a controller checkpoint and its model card to the Hugging Face Hub")
    p.add_argument("checkpoint", help="checkpoint path or shipped name")
    p.add_argument("repo_id", help="Hub model repository, owner/name (created when missing)")
    p.add_argument("--filename", default=HUB_FILENAME, help=f"file name in the repository (default {HUB_FILENAME})")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("tasks", help="list task families or show sampled specs")
    p.add_argument("action", choices=("list", "show"))
    p.add_argument("name", nargs="?", help="family name (for show)")
    p.add_argument("--sample", type=int, default=3, help="specs to sample (for show)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (for show)")
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("methods", help="list every LR method the harness can run")
    p.add_argument("action", choices=("list",))
    p.set_defaults(func=cmd_methods)
    return parser


def _is_override(token: str) -> bool:
    return "=" in token and not token.startswith("-")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides anywhere (after options too), not only after the file.

    argparse's ``parse_intermixed_args`` does not support subparsers, so the leftovers that look like
    overrides are collected instead; any other leftover is still an error.
    """
    args, extras = parser.parse_known_args(argv)
    leftovers = [token for token in extras if not (_is_override(token) and hasattr(args, "overrides"))]
    if leftovers:
        parser.error(f"unrecognized arguments: {' '.join(leftovers)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *(token for token in extras if _is_override(token))]
    args.argv = list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, sys.argv[1:] if argv is None else argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except USER_ERRORS as err:
        message = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        print(f"metalr: error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        continuation: Continuation | None = getattr(args, "continuation", None)
        hint = continuation.hint(DEMO_MARKER) if continuation is not None else ""
        print(f"metalr: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["ROOT", "main"]
