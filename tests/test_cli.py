"""The `metalr` command line: user errors are one line with exit code 2; the main jobs run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from metalr import load_controller
from metalr.cli import main

ROOT = Path(__file__).resolve().parent.parent


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["tasks", "list"], capsys)
    assert code == 0 and "digits_mlp" in out and "noisy_quadratic" in out and "budget" in out
    code, out, _ = _run(["tasks", "show", "wine_mlp", "--sample", "3"], capsys)
    specs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert code == 0 and len(specs) == 3 and all(s["family"] == "wine_mlp" for s in specs)


def test_methods_list(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["methods", "list"], capsys)
    assert code == 0
    for name in ("constant", "step", "exponential", "cosine", "learned"):
        assert f"\n{name} " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["meta-train", "missing.yaml"], "no meta-training recipe at 'missing.yaml': not a file, and not a shipped name"),
        (["meta-train", "meta_train/demo-quick.yaml", "meta.nope=1"], "unknown key meta.nope; allowed keys:"),
        (["meta-train", "meta_train/demo-quick.yaml", "suite=nowhere"], "no task suite at 'nowhere': not a file, and not a shipped name"),
        (["tasks", "show", "nope"], "unknown task family 'nope'"),
        (["tasks", "show", "wine_mlp", "--sample", "0"], "--sample must be a positive integer"),
        (["report", "/nonexistent"], "has no results.jsonl"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["tasks", "show", "wine_mlp", "--sample", "x"], "invalid int value: 'x'"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    code, out, err = _run([*argv, *(["--out", str(tmp_path / "run")] if argv[0] == "meta-train" else [])], capsys)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a failed command must not leave a partial run directory"


def test_meta_train_writes_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, stdout, _ = _run(
        ["meta-train", str(ROOT / "meta_train" / "demo-quick.yaml"), "meta.meta_steps=3", "--out", str(out), "--no-progress"], capsys
    )
    assert code == 0, stdout
    assert {"config.yaml", "metrics.jsonl", "final.safetensors"} <= {p.name for p in out.iterdir()}
    controller = load_controller(out / "final.safetensors")
    assert controller.provenance["recipe"] == "demo-quick" and controller.provenance["meta_steps"] == 3
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["meta_step"] == 3
    code, _, err = _run(["meta-train", str(ROOT / "meta_train" / "demo-quick.yaml"), "--out", str(out)], capsys)
    assert code == 2 and "is not empty" in err


def test_console_script_is_installed() -> None:
    result = subprocess.run([str(Path(sys.executable).parent / "metalr"), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "meta-train" in result.stdout and "demo" in result.stdout


@pytest.mark.slow
def test_demo_quick_end_to_end(tmp_path: Path) -> None:
    """`metalr demo --quick`: meta-trains, evaluates against the baselines, prints a table with real numbers."""
    out = tmp_path / "demo"
    result = subprocess.run(
        [str(Path(sys.executable).parent / "metalr"), "demo", "--quick", "--out", str(out), "--no-progress", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for method in ("learned", "constant", "step", "exponential", "cosine"):
        assert method in result.stdout
    assert (out / "evaluation" / "report.md").is_file() and (out / "evaluation" / "results.jsonl").is_file()
    assert (out / "controller" / "final.safetensors").is_file()
