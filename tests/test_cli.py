"""The `metalr` command line: user errors are one line with exit code 2; the main jobs run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
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
        (["meta-train", "meta_train/demo-quick.yaml", "--threads", "-1"], "--threads must be >= 0 (0: torch's default), got -1"),
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


def test_meta_train_threads_sets_torch_threads(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # this test process keeps its own threads
    argv = ["meta-train", str(ROOT / "meta_train" / "demo-quick.yaml"), "meta.meta_steps=1", "--no-progress"]
    assert _run([*argv, "--out", str(tmp_path / "a"), "--threads", "1"], capsys)[0] == 0
    assert calls == [1]
    assert _run([*argv, "--out", str(tmp_path / "b")], capsys)[0] == 0
    assert calls == [1], "without --threads torch keeps its default"


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


def _quick_recipe() -> str:
    return str(ROOT / "meta_train" / "demo-quick.yaml")


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_without_a_run_to_resume_is_an_error(state: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    if state == "empty":
        out.mkdir()
    code, _, err = _run(["meta-train", _quick_recipe(), "--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"--resume: {out} {'does not exist' if state == 'missing' else 'is empty'}, so there is nothing to resume" in err
    assert (out.exists(), list(out.iterdir()) if out.exists() else []) == (state == "empty", [])


def test_overrides_are_accepted_after_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    code, _, err = _run(["meta-train", _quick_recipe(), "--out", str(out), "meta.meta_steps=2", "--no-progress", "seed=1"], capsys)
    assert code == 0, err
    provenance = load_controller(out / "final.safetensors").provenance
    assert provenance["meta_steps"] == 2 and provenance["seed"] == 1
    suite = ROOT / "evaluate" / "demo-quick.yaml"
    code, _, err = _run(["evaluate", str(suite), "seeds=2", "--out", str(tmp_path / "e"), "--workers", "1", "colour=red"], capsys)
    assert code == 2 and "unknown key colour" in err, "the override after the options must reach the suite"


@pytest.mark.parametrize(
    "argv",
    [["meta-train", "r.yaml", "--out", "x", "stray"], ["evaluate", "s.yaml", "--out", "x", "--bogus"], ["methods", "list", "a=1"]],
)
def test_other_leftover_arguments_are_still_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(argv, capsys)
    assert code == 2 and f"unrecognized arguments: {argv[-1]}" in err and len(err.strip().splitlines()) == 1


def _interrupt_after(write: Callable[[Path], None]) -> Callable[..., None]:
    def interrupted(*args: object, **kwargs: object) -> None:
        out = next(a for a in (*args, *kwargs.values()) if isinstance(a, Path))
        write(out)
        raise KeyboardInterrupt

    return interrupted


def test_an_interrupted_meta_train_says_how_to_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import metalr.meta.trainer

    out = tmp_path / "my run"

    def started(run_dir: Path) -> None:
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text("name: x\n")

    monkeypatch.setattr(metalr.meta.trainer, "meta_train", _interrupt_after(started))
    code, _, err = _run(["meta-train", _quick_recipe(), "meta.meta_steps=5", "--out", str(out)], capsys)
    assert code == 130
    assert err.strip() == f"metalr: interrupted; continue with: metalr meta-train {_quick_recipe()} meta.meta_steps=5 --out '{out}' --resume"

    monkeypatch.setattr(metalr.meta.trainer, "meta_train", _interrupt_after(lambda run_dir: None))
    code, _, err = _run(["meta-train", _quick_recipe(), "--out", str(tmp_path / "other")], capsys)
    assert code == 130 and err.strip() == "metalr: interrupted", "nothing to resume yet: no resume hint"


def test_an_interrupted_demo_says_how_to_resume_and_a_failed_one_leaves_no_empty_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import metalr.demo
    from metalr.config import ConfigError

    out = tmp_path / "demo"
    monkeypatch.setattr(metalr.demo, "run_demo", _interrupt_after(lambda d: (d / "controller").mkdir()))
    code, _, err = _run(["demo", "--quick", "--out", str(out)], capsys)
    assert code == 130 and err.strip() == f"metalr: interrupted; continue with: metalr demo --quick --out {out} --resume"
    assert (out / "controller").is_dir(), "work done before the interrupt is kept for --resume"

    def fails(*args: object, **kwargs: object) -> str:
        raise ConfigError("something the user got wrong")

    monkeypatch.setattr(metalr.demo, "run_demo", fails)
    code, _, err = _run(["demo", "--quick", "--out", str(tmp_path / "fresh")], capsys)
    assert code == 2 and "something the user got wrong" in err
    assert not (tmp_path / "fresh").exists(), "a failed demo left its (empty) --out folder behind"
    code, _, err = _run(["demo", "--workers", "-1", "--out", str(tmp_path / "fresh")], capsys)
    assert code == 2 and "--workers must be a positive integer" in err and not (tmp_path / "fresh").exists()


def test_demo_help_states_the_measured_durations(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["demo", "--help"], capsys)
    assert code == 0 and "about 45 s on 2 cores instead of 3-6 minutes" in " ".join(out.split())


def test_the_demo_says_where_the_plots_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import metalr.demo
    import metalr.evaluation
    import metalr.meta.trainer
    from metalr.evaluation.report import FIGURES

    monkeypatch.setattr(metalr.meta.trainer, "meta_train", lambda *args, **kwargs: None)
    monkeypatch.setattr(metalr.evaluation, "evaluate_suite", lambda *args, **kwargs: "SUMMARY")
    text = metalr.demo.run_demo(tmp_path, quick=True, progress=False)
    assert f"plots in {tmp_path / 'evaluation' / FIGURES})" in text  # where render_report draws them


@pytest.mark.parametrize("command", ["meta-train", "evaluate"])
def test_an_empty_recipe_or_suite_file_is_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing but a comment\n")
    code, _, err = _run([command, str(empty), "--out", str(tmp_path / "run"), "--no-progress"], capsys)
    assert code == 2 and err.strip() == f"metalr: error: {empty}: the file is empty; expected a YAML mapping of settings"
    assert not (tmp_path / "run").exists()
