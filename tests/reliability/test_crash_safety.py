"""Issue 10, point 1: crash safety of meta-training (SIGKILL + ``--resume``) and of evaluation (re-run).

Kills are deterministic: ``fault_harness.py`` SIGKILLs the ``metalr`` process at a chosen seam - in the middle
of a checkpoint or resume-state write (the temporary file torn, before the atomic rename), right after a
rename, in the middle of a JSONL append, or at the start of a meta-step drawn by a seeded RNG. After every
kill the run directory must hold only valid files, and resuming must lose at most one state interval;
the resumed run must end with the bit-identical controller (and checkpoints and metrics) of an
uninterrupted run. The meta engineer's ``tests/meta/test_resume_distributed.py`` covers wall-clock kills.
Evaluations are killed between two records and in the middle of one; the re-run must finish the grid
without repeating a finished run, and a killed parallel evaluation must not leave its workers behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from reliability_support import (
    HARNESS,
    ROOT,
    TIMING_FIELDS,
    assert_same_tensors,
    jsonl_lines,
    read_trace,
    run_metalr,
    subprocess_env,
    tensors,
)

from metalr import load_controller
from metalr.meta.state import available_steps, read_state

STATE_EVERY = 5  # the tiny recipe's state_every (== checkpoint_every == log_every)


def _meta_faults() -> list[dict[str, Any]]:
    rng = random.Random(20261123)  # fixed seed: the "random" kill points are the same on every run
    first_random = rng.randint(11, 14)
    second_random = rng.randint(21, 24)
    return [
        # 1. in the middle of a periodic checkpoint write (checkpoint-10 precedes the step-10 state)
        {"kill_on_replace": "checkpoint-10.safetensors", "phase": "torn"},
        # 2. at a random meta-step
        {"kill_at_step": first_random},
        # 3. right after a resume state landed, before older states are pruned
        {"kill_on_replace": "state-rank0-step00000020", "phase": "after"},
        # 4. at another random meta-step
        {"kill_at_step": second_random},
        # 5. in the middle of a metrics.jsonl append (torn record)
        {"kill_on_append": "metrics.jsonl", "nth": 1, "torn": True},
        # 6. in the middle of writing final.safetensors
        {"kill_on_replace": "final.safetensors", "phase": "torn"},
    ]


def _completed_steps(events: list[dict[str, Any]]) -> int:
    """Meta-steps the killed process had finished (the index of the last step it started)."""
    steps = [e["meta_step"] for e in events if e["event"] == "step"]
    kill = next(e for e in events if e["event"] == "kill")
    if kill.get("where") == "step":
        return kill["meta_step"]
    return max(steps) + 1 if steps else 0


def _assert_directory_valid(out: Path, reference: Path) -> None:
    """Every checkpoint under its final name loads and equals the uninterrupted run's; every state reads."""
    for path in sorted(out.glob("*.safetensors")):
        load_controller(path)  # raises CheckpointError on a torn or invalid file
        assert_same_tensors(tensors(reference / path.name), tensors(path), f"{path.name} after a kill")
    for step in available_steps(out / "resume", 0):
        read_state(out / "resume" / f"state-rank0-step{step:08d}.safetensors")
    if (out / "metrics.jsonl").exists():
        text = (out / "metrics.jsonl").read_text()
        complete = text[: text.rfind("\n") + 1]
        for line in complete.splitlines():
            json.loads(line)  # only the last line may be torn, and only by the kill itself


@pytest.mark.slow
def test_meta_training_survives_sigkill_at_six_points(meta_reference, tmp_path: Path) -> None:
    out = tmp_path / "crashed"
    argv = ["meta-train", str(meta_reference.recipe), "--out", str(out), "--no-progress"]
    faults = _meta_faults()
    for number, fault in enumerate(faults):
        trace = tmp_path / f"trace-{number}.jsonl"
        before = available_steps(out / "resume", 0)
        result = run_metalr(argv + (["--resume"] if number else []), fault=fault, trace=trace)
        events = read_trace(trace)
        assert result.returncode == -signal.SIGKILL, f"fault {fault} did not fire: rc={result.returncode} {result.stderr[-2000:]}"
        assert any(e["event"] == "kill" for e in events)
        started = [e["meta_step"] for e in events if e["event"] == "step"]
        if number:
            # It resumed from the newest state it found (or afresh when there was none), not from scratch.
            assert started[:1] == [before[-1] if before else 0], (fault, before, started[:3])
        _assert_directory_valid(out, meta_reference.out)
        newest = max(available_steps(out / "resume", 0), default=0)
        completed = _completed_steps(events)
        assert completed - newest <= STATE_EVERY, f"{fault}: lost {completed - newest} meta-steps (> one interval)"

    final = run_metalr(argv + ["--resume"], trace=tmp_path / "trace-final.jsonl")
    assert final.returncode == 0, final.stderr[-3000:]
    _assert_directory_valid(out, meta_reference.out)
    reference_files = sorted(p.name for p in meta_reference.out.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == reference_files
    assert_same_tensors(tensors(meta_reference.out / "final.safetensors"), tensors(out / "final.safetensors"), "final")

    _assert_same_metrics(out, meta_reference.out)


def _metrics(path: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in jsonl_lines(path)]


def _assert_same_metrics(out: Path, reference: Path) -> None:
    resumed, expected = _metrics(out / "metrics.jsonl"), _metrics(reference / "metrics.jsonl")
    assert [r["meta_step"] for r in resumed] == [r["meta_step"] for r in expected], "lost or duplicated records"
    assert resumed == expected


@pytest.mark.slow
def test_kill_before_the_first_resume_state_restarts_cleanly(meta_reference, tmp_path: Path) -> None:
    """Killed in the middle of the first resume-state write: --resume finds no state and starts afresh.

    The controller is still bit-identical; the metrics records the killed process wrote must not be
    kept beside the ones the fresh start writes again.
    """
    out = tmp_path / "crashed"
    argv = ["meta-train", str(meta_reference.recipe), "--out", str(out), "--no-progress"]
    fault = {"kill_on_replace": "state-rank0-step00000005", "phase": "torn"}
    result = run_metalr(argv, fault=fault, trace=tmp_path / "trace.jsonl")
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    _assert_directory_valid(out, meta_reference.out)
    assert available_steps(out / "resume", 0) == []
    final = run_metalr(argv + ["--resume"])
    assert final.returncode == 0, final.stderr[-3000:]
    assert_same_tensors(tensors(meta_reference.out / "final.safetensors"), tensors(out / "final.safetensors"), "final")
    _assert_same_metrics(out, meta_reference.out)


def _complete_records(results: Path) -> list[dict[str, Any]]:
    if not results.exists():
        return []
    text = results.read_text()
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    out["valid"] = [{k: v for k, v in point.items() if k not in TIMING_FIELDS} for point in record.get("valid", [])]
    return out


@pytest.mark.slow
def test_killed_evaluation_completes_without_repeats_duplicates_or_torn_records(eval_reference, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    argv = ["evaluate", str(eval_reference.recipe), "--out", str(out), "--workers", "1", "--no-progress"]
    faults = [
        {"kill_on_append": "results.jsonl", "nth": 3, "torn": False},  # between records: run 3 is lost in flight
        {"kill_on_append": "results.jsonl", "nth": 3, "torn": True},  # half a record on disk
    ]
    executed: list[str] = []
    for number, fault in enumerate([*faults, None]):
        finished = {r["key"] for r in _complete_records(out / "results.jsonl")}
        trace = tmp_path / f"eval-trace-{number}.jsonl"
        result = run_metalr(argv, fault=fault, trace=trace)
        if fault is None:
            assert result.returncode == 0, result.stderr[-3000:]
        else:
            assert result.returncode == -signal.SIGKILL, f"fault {fault} did not fire: {result.stderr[-2000:]}"
        ran = [e["key"] for e in read_trace(trace) if e["event"] == "cell"]
        assert not finished & set(ran), "a finished run was run again"
        executed += ran
        keys = [r["key"] for r in _complete_records(out / "results.jsonl")]
        assert len(keys) == len(set(keys)), "duplicate records"

    lines = jsonl_lines(out / "results.jsonl")  # no torn line left at the end
    records = [json.loads(line) for line in lines]
    expected = [json.loads(line) for line in jsonl_lines(eval_reference.out / "results.jsonl")]
    assert sorted(r["key"] for r in records) == sorted(r["key"] for r in expected), "the grid is not complete"
    by_key = {r["key"]: _comparable(r) for r in expected}
    for record in records:
        assert _comparable(record) == by_key[record["key"]], f"record {record['key']} differs from the uninterrupted run"
    # Only runs whose record was lost with the process (in flight at the kill) were repeated.
    assert len(executed) - len(records) <= len(faults)
    assert (out / "report.md").is_file()


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment holds ``marker`` (the workers a test's evaluation spawned)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                environment = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in environment:
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_killed_parallel_evaluation_leaves_no_worker_processes(eval_reference, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    marker = f"RELIABILITY_TRACE={trace}"
    argv = ["evaluate", str(eval_reference.recipe), "--out", str(tmp_path / "eval"), "--workers", "2", "--no-progress"]
    # Not subprocess.run(capture_output=True): orphaned workers would hold the pipes open.
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen([sys.executable, str(HARNESS), "--", *argv], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr,
                                   env=subprocess_env({"kill_on_append": "results.jsonl", "nth": 1}, trace))
        assert process.wait(timeout=300) == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    try:
        deadline = time.monotonic() + 20
        while (left := _processes_with(marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"{len(left)} processes outlived the killed evaluation by 20 s"
    finally:
        for pid in _processes_with(marker):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
