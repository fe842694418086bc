"""Run ``metalr`` (``metalr.cli.main``) in a subprocess with deterministic fault injection and a trace.

Usage: ``python fault_harness.py -- <metalr argv>``, configured by environment variables:

* ``RELIABILITY_FAULT``: JSON, one of
    - ``{"kill_at_step": K}``: SIGKILL at the start of meta-step K+1 (when ``state.meta_step == K``);
    - ``{"kill_on_replace": "NAME", "phase": "torn" | "after"}``: on the atomic rename of a file whose
      name contains NAME: ``torn`` truncates the temporary file to half its size and dies before the
      rename (a crash in the middle of a checkpoint write), ``after`` dies right after the rename;
    - ``{"kill_on_append": "NAME", "nth": N, "torn": bool}``: on the N-th JSONL append to a file whose name
      contains NAME: dies before writing, or after writing half the line (a torn record).
* ``RELIABILITY_TRACE``: a JSONL file receiving ``{"event": "step", "meta_step": k}`` before every meta-step,
  ``{"event": "cell", "key": ...}`` before every evaluation run (inline executor), and
  ``{"event": "rss", "meta_step": k, "rss": bytes}`` every ``RELIABILITY_RSS_EVERY`` meta-steps;
  ``{"event": "kill", ...}`` right before a SIGKILL.

The hooks wrap the public seams (``os.replace`` under ``metalr.io.atomic_write``, ``append_jsonl``,
``MetaTrainer.step``, the executor's ``run_cell``) and never change what the wrapped code computes.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch

torch.set_num_threads(1)

import faulty_tasks  # noqa: E402,F401  (registers the test-only task family)

import metalr.io as metalr_io  # noqa: E402
import metalr.meta.trainer as trainer  # noqa: E402
from metalr.cli import main  # noqa: E402

TRACE = os.environ.get("RELIABILITY_TRACE")
FAULT: dict[str, Any] = json.loads(os.environ.get("RELIABILITY_FAULT") or "{}")
EVALUATE = "evaluate" in sys.argv[1:3]  # the evaluation modules are heavy (scipy): import them only when used
if EVALUATE:
    import metalr.evaluation.executors as executors
    import metalr.evaluation.suite  # noqa: F401
RSS_EVERY = int(os.environ.get("RELIABILITY_RSS_EVERY") or 0)


def trace(**event: Any) -> None:
    if TRACE:
        with open(TRACE, "a") as handle:
            handle.write(json.dumps(event) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def die(**why: Any) -> None:
    trace(event="kill", **why)
    os.kill(os.getpid(), signal.SIGKILL)


def rss_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


_step = trainer.MetaTrainer.step


def step(self: trainer.MetaTrainer) -> dict[str, Any]:
    meta_step = self.state.meta_step
    if FAULT.get("kill_at_step") == meta_step:
        die(meta_step=meta_step, where="step")
    trace(event="step", meta_step=meta_step)
    if RSS_EVERY and meta_step % RSS_EVERY == 0:
        trace(event="rss", meta_step=meta_step, rss=rss_bytes())
    return _step(self)


trainer.MetaTrainer.step = step  # type: ignore[method-assign]

_replace = os.replace


def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    name = FAULT.get("kill_on_replace")
    if name and name in Path(dst).name:
        if FAULT.get("phase", "torn") == "torn":
            data = Path(src).read_bytes()
            Path(src).write_bytes(data[: len(data) // 2])
            die(file=Path(dst).name, where="replace-torn")
        _replace(src, dst, *args, **kwargs)
        die(file=Path(dst).name, where="replace-after")
    _replace(src, dst, *args, **kwargs)


os.replace = replace

_append = metalr_io.append_jsonl
_appends = {"count": 0}


def append_jsonl(path: Any, record: dict[str, Any]) -> None:
    name = FAULT.get("kill_on_append")
    if name and name in Path(path).name:
        _appends["count"] += 1
        if _appends["count"] == FAULT.get("nth", 1):
            if FAULT.get("torn"):
                line = json.dumps(record, sort_keys=True, allow_nan=True) + "\n"
                with open(path, "a") as handle:
                    handle.write(line[: len(line) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
            die(file=Path(path).name, where="append", nth=_appends["count"])
    _append(path, record)


for module in list(sys.modules.values()):
    if getattr(module, "__name__", "").startswith("metalr") and getattr(module, "append_jsonl", None) is _append:
        module.append_jsonl = append_jsonl  # type: ignore[attr-defined]

if EVALUATE:
    _run_cell = executors.run_cell

    def run_cell(cell: Any, controller: Any = None) -> dict[str, Any]:
        trace(event="cell", key=cell.key)
        return _run_cell(cell, controller)

    executors.run_cell = run_cell  # type: ignore[assignment]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    sys.exit(main(argv))
