"""Shipped files (suites, recipes, evaluation suites, controllers) resolve by name in a checkout and after a
normal (non-editable) install of the wheel, from any directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metalr.cli import main
from metalr.shipped import CHECKPOINTS_ENV, KINDS, list_shipped, resolve_shipped, shipped_dir, source_checkout

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_shipped_name_resolves_to_its_file(kind: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # names never depend on the working directory
    monkeypatch.delenv(CHECKPOINTS_ENV, raising=False)
    suffix = KINDS[kind][0]
    expected = sorted(p.stem for p in (ROOT / kind).glob(f"*{suffix}"))
    assert expected and list_shipped(kind) == expected
    for name in expected:
        assert resolve_shipped(kind, name) == ROOT / kind / f"{name}{suffix}"


def test_a_checkout_uses_its_own_top_level_folders() -> None:
    assert source_checkout() == ROOT
    assert shipped_dir("tasks") == ROOT / "tasks"


def test_an_installed_copy_uses_its_package_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    packaged = tmp_path / "metalr" / "_shipped" / "evaluate"
    packaged.mkdir(parents=True)
    (packaged / "only-here.yaml").write_text("name: x\n")
    monkeypatch.setattr("metalr.shipped.files", lambda package: tmp_path / package)
    assert shipped_dir("evaluate") == packaged
    assert resolve_shipped("evaluate", "only-here") == packaged / "only-here.yaml"


def test_a_path_that_exists_wins_over_a_name(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    Path("embedded").write_text("name: mine\n")
    assert resolve_shipped("tasks", "embedded") == Path("embedded")
    assert resolve_shipped("tasks", str(tmp_path / "embedded")) == tmp_path / "embedded"


@pytest.mark.parametrize("name", ["nope", "../tasks/embedded", "tasks/embedded", ".embedded", ""])
def test_unknown_names_and_paths_list_the_shipped_ones(name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # where ../tasks/embedded.yaml does not exist
    with pytest.raises(FileNotFoundError, match=rf"no task suite at '{name}'.*\(shipped: adam-long, adam-long-mlp, cpu-heldout, cpu-small, embedded"):
        resolve_shipped("tasks", name)


def test_unknown_controller_names_mention_the_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    (tmp_path / "mine.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"shipped: mine; names are looked up in {tmp_path}, which \${CHECKPOINTS_ENV}"):
        resolve_shipped("checkpoints", "theirs", ValueError)


def test_an_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind of shipped file 'recipes'"):
        shipped_dir("recipes")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # Each command gets past reading the named file and stops at the next check, so nothing runs.
        (["meta-train", "demo-quick", "meta.nope=1"], "unknown key meta.nope"),
        (["evaluate", "demo-quick", "--seeds", "0"], "--seeds must be a positive integer"),
        (["meta-train", "demo-quik"], "no meta-training recipe at 'demo-quik': not a file, and not a shipped name (shipped: adam-cpu"),
        (["evaluate", "demo-quik"], "no evaluation suite at 'demo-quik': not a file, and not a shipped name (shipped: cpu-heldout"),
    ],
)
def test_the_cli_takes_recipes_and_evaluation_suites_by_name(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_every_code_package_is_listed_in_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metalr").rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert {f"metalr._shipped.{kind}" for kind in KINDS} <= listed


# ---------------------------------------------------------------------------------------------------------
# The real thing: build the wheel, install it (not editable) and use it from a directory outside the repo.

_INSTALLED_CHECK = """
import sys
from pathlib import Path

import metalr
from metalr import load_controller
from metalr.shipped import KINDS, list_shipped, resolve_shipped

target = Path(sys.argv[1]).resolve()
assert Path(metalr.__file__).resolve().is_relative_to(target), f"imported {metalr.__file__}, not the installed copy"
for kind in KINDS:
    names = list_shipped(kind)
    assert names, f"no shipped {kind}"
    for name in names:
        assert resolve_shipped(kind, name).resolve().is_relative_to(target), (kind, name)
controller = load_controller("adam-cpu")
assert Path(controller.source_path).resolve().is_relative_to(target), controller.source_path
print("installed copy OK")
"""


# README's "Use it in your training loop" block, run as written on a small model, for Adam and for SGD.
_README_PRELUDE = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
loss_fn = nn.MSELoss()
x, y = torch.randn(32, 8), torch.randn(32, 1)
T = 30
"""
_README_EPILOGUE = """
assert sched.last_epoch == T and 0 < optimizer.param_groups[0]["lr"] < 1
print("readme OK", type(optimizer).__name__, sched.controller.source_path)
"""


def readme_snippet() -> str:
    """The first Python block of README's "Use it in your training loop" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Use it in your training loop", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{argv}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_installed_wheel_finds_everything_from_any_directory(tmp_path: Path) -> None:
    pytest.importorskip("setuptools", minversion="77")  # the build backend, used without network
    source = tmp_path / "source"  # a copy, so the build leaves nothing in the repository
    for folder in ("metalr", *KINDS):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", CHECKPOINTS_ENV)}
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source)], tmp_path, env, 600)
    (wheel,) = wheels.glob("metalr-*.whl")
    _run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], tmp_path, env, 600)

    env["PYTHONPATH"] = str(target)  # shadows the editable install of the checkout
    assert "installed copy OK" in _run([sys.executable, "-c", _INSTALLED_CHECK, str(target)], elsewhere, env, 300).stdout
    for optimizer, family in (("torch.optim.Adam(model.parameters(), lr=1e-3)", "adam-cpu"), ("torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)", "sgd-cpu")):
        program = f"{_README_PRELUDE}optimizer = {optimizer}\n{readme_snippet()}{_README_EPILOGUE}"
        out = _run([sys.executable, "-W", "error::UserWarning", "-c", program], elsewhere, env, 300).stdout
        assert "readme OK" in out and f"{family}.safetensors" in out and str(target) in out, out
    cli = [sys.executable, "-m", "metalr.cli"]
    _run([*cli, "meta-train", "demo-quick", "meta.meta_steps=2", "--out", "recipe-run", "--no-progress"], elsewhere, env, 300)
    assert (elsewhere / "recipe-run" / "final.safetensors").is_file()
    _run([*cli, "demo", "--quick", "--out", "demo", "--no-progress", "--workers", "2"], elsewhere, env, 900)
    assert (elsewhere / "demo" / "evaluation" / "report.md").is_file()
