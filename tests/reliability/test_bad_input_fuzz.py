"""Issue 10, point 4: bad input everywhere ends in exit code 2 and one line, with no run directory left.

``hypothesis`` fuzzes the YAML config loaders (recipes, task suites, evaluation suites: random documents
over the real keys plus junk, random ``key=value`` overrides, random text) and the CLI argument parser
(random argv over the real subcommands, flags and values plus junk). Every input must either work or end
with ``ConfigError`` / exit code 2 and a one-line message; never another exception, never a traceback,
and a failed ``meta-train`` or ``evaluate`` leaves no run directory behind. Runs that would work are kept
tiny (a 1-meta-step recipe on 4-8 parameter tasks, an 8-run evaluation of 20 steps; ``metalr demo`` is
stubbed), so a successful example costs about a second.

Inputs that exposed bugs (since fixed) are listed in ``FORMER_BUGS``: each is an explicit regression case
below and part of the fuzz vocabulary.

Corrupt data directories (truncated or wrong-format files) are the datasets engineer's tests:
``tests/tasks/test_datasets.py::test_malformed_file_error_names_the_file`` and
``::test_missing_files_error_names_dataset_directory_and_files`` (``DatasetError``).
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import (
    assert_one_line_user_error,
    eval_suite_files,
    run_metalr,
    tiny_recipe,
    tiny_suite,
    write_yaml,
)

from metalr.cli import main
from metalr.config import ConfigError, EvalConfig, MetaTrainConfig, parse_overrides, read_yaml
from metalr.evaluation import load_eval_suite
from metalr.meta.recipe import load_recipe
from metalr.tasks import load_suite

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# override -> the bug it exposes (owner: the meta-training engineer unless said otherwise)
FORMER_BUGS: dict[str, str] = {
    "meta.estimator=bogus": "KeyError traceback (exit 1) from metalr/meta/estimators.py create_estimator; config.yaml left behind",
    "meta.truncation=bogus": "ValueError traceback (exit 1) from metalr/meta/truncation.py make_truncation_schedule; config.yaml left behind",
    "device=tpu": "RuntimeError traceback (exit 1) from torch when MetaTrainer moves the controller; config.yaml left behind",
    "device=cuda": "AssertionError 'Torch not compiled with CUDA' traceback on a CPU-only torch; config.yaml left behind",
    "controller.kind=lstm": "ValueError traceback: the lstm needs one hidden size but ControllerConfig accepts [64, 32]; config.yaml left behind",
    "meta.backend=bogus": "one line, exit 2, but MetaTrainer has already written config.yaml into --out",
    "train_overrides={nope: 1}": "one line, exit 2, but MetaTrainer has already written config.yaml into --out",
    "train_overrides={steps: [0, 5]}": "one line, exit 2, but MetaTrainer has already written config.yaml into --out",
    "train_overrides={steps: [5]}": "IndexError traceback from metalr/tasks/base.py SamplingConfig.__post_init__ (owner: lead)",
    "train_overrides={dims: [5]}": "TypeError traceback at sampling: metalr/tasks/embedded.py families do not validate their own overrides (owner: lead)",
}

VALID_OVERRIDES = [
    "meta.meta_steps=1",
    "meta.meta_steps=2",
    "meta.unroll_length=2",
    "meta.meta_batch=1",
    "meta.estimator=tbptt",
    "meta.estimator=es",
    "meta.truncation=log_uniform",
    "meta.memory_budget_mb=0",
    "seed=1",
    "seed=-3",
    "controller.hidden=[8]",
    "controller.base_schedule=cosine",
    "train_overrides={steps: [20, 30]}",
]
INVALID_OVERRIDES = [
    "meta.meta_steps=0",
    "meta.meta_steps=-1",
    "meta.meta_steps=x",
    "meta.meta_steps=1.5",
    "meta.meta_steps=[1]",
    "meta.meta_batch=0",
    "meta.unroll_length=0",
    "meta.meta_lr=-1",
    "meta.meta_lr=.nan",
    "meta.max_skip_fraction=2",
    "meta.memory_budget_mb=-1",
    "meta.es_pairs=0",
    "meta.nope=1",
    "meta={a: 1}",
    "meta=3",
    "controller.hidden=[]",
    "controller.hidden=[0]",
    "controller.hidden=[100000]",
    "controller.hidden=7",
    "controller.kind=transformer",
    "controller.features=[telepathy]",
    "controller.min_lr=2",
    "controller.base_schedule=linear",
    "suite=nowhere",
    "suite=",
    "seed=x",
    "name=[1, 2]",
    "train_overrides=5",
    "train_overrides={optimizers: [lion]}",
    "colour=red",
    "=",
    "=1",
    "meta",
    "meta.=1",
    "a..b=1",
    "meta.meta_steps=[",
    "meta.meta_steps={",
    "x=y=z",
    "meta=1",
]
JUNK = ["", "-", "--", "--bogus", "-x", "--out=", "--resume=1", "nan", "1e309", "é", "\x00", "--no-progress"]


@contextlib.contextmanager
def _fresh_cwd() -> Iterator[Path]:
    """Run in an empty temporary directory (relative --out paths land there, and are checked there)."""
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="metalr-fuzz-") as directory:
        os.chdir(directory)
        try:
            yield Path(directory)
        finally:
            os.chdir(previous)


def _call(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse (errors: 2, --help: 0)
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def _out_dirs(argv: list[str]) -> list[str]:
    dirs = [argv[i + 1] for i, token in enumerate(argv[:-1]) if token == "--out"]
    return dirs + [token.split("=", 1)[1] for token in argv if token.startswith("--out=")]


def _check_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    outs = [cwd / d for d in _out_dirs(argv) if d]
    existed = {d: d.exists() for d in outs}
    code, _, err = _call(argv)
    if code == 0:
        return code, err
    line = assert_one_line_user_error(code, err)
    if argv and argv[0] in ("meta-train", "evaluate"):
        for directory in outs:
            if not existed[directory]:
                assert not directory.exists(), f"{argv}: failed ({line}) but left {sorted(os.listdir(directory))} in {directory}"
    return code, line


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("bad-input")
    suite = tiny_suite(directory)
    recipe = tiny_recipe(directory, suite, meta_steps=1, checkpoint_every=0, state_every=0, log_every=1)
    (directory / "binary.yaml").write_bytes(b"\x80\x81\xfe\xff")
    (directory / "list.yaml").write_text("- 1\n- 2\n")
    (directory / "tabs.yaml").write_text("meta:\n\tmeta_steps: 1\n")
    (directory / "a-directory.yaml").mkdir()
    return {
        "recipe": str(recipe),
        "suite": str(suite),
        "eval": str(eval_suite_files(directory)),
        "binary": str(directory / "binary.yaml"),
        "list": str(directory / "list.yaml"),
        "tabs": str(directory / "tabs.yaml"),
        "dir": str(directory / "a-directory.yaml"),
        "missing": str(directory / "missing.yaml"),
    }


# ---------------------------------------------------------------------------------------------------------
# Explicit cases (one per known bug, plus the user errors that already work)


@pytest.mark.parametrize(
    "override",
    [
        *INVALID_OVERRIDES[:12],
        *(pytest.param(o, id=o) for o in FORMER_BUGS),
    ],
)
def test_invalid_meta_train_overrides_fail_in_one_line_without_a_run_directory(override: str, inputs: dict[str, str]) -> None:
    with _fresh_cwd() as cwd:
        code, line = _check_cli(["meta-train", inputs["recipe"], override, "--out", "run", "--no-progress"], cwd)
    assert code == 2, f"{override} was accepted"


def test_demo_never_deletes_an_existing_directory_it_did_not_create(tmp_path: Path) -> None:
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("years of work")
    with mock.patch("metalr.demo.run_demo", return_value="stubbed"):
        code, _, err = _call(["demo", "--quick", "--out", str(precious), "--no-progress"])
    assert (precious / "chapter1.tex").exists(), "metalr demo deleted a directory it did not create"
    if code:
        assert_one_line_user_error(code, err)


# ---------------------------------------------------------------------------------------------------------
# Config loaders


_scalars = st.none() | st.booleans() | st.integers(-5, 10**12) | st.floats(allow_nan=True) | st.text(max_size=10)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
_meta_keys = [f.name for f in MetaTrainConfig.__dataclass_fields__["meta"].default.__dataclass_fields__.values()]
_controller_keys = list(MetaTrainConfig.__dataclass_fields__["controller"].default.__dataclass_fields__)


def _document(top_keys: list[str], nested: dict[str, list[str]]) -> st.SearchStrategy[dict[str, Any]]:
    keys = st.sampled_from([*top_keys, "junk", "Meta", ""])
    nested_docs = {k: st.dictionaries(st.sampled_from([*v, "junk"]), _values, max_size=4) for k, v in nested.items()}
    value = st.one_of(_values, *nested_docs.values())
    return st.dictionaries(keys, value, max_size=5)


_override_strings = st.one_of(
    st.sampled_from(VALID_OVERRIDES + INVALID_OVERRIDES + list(FORMER_BUGS)),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from([*(f"meta.{k}" for k in _meta_keys), *(f"controller.{k}" for k in _controller_keys), "seed", "name", "suite", "x"]), st.text(max_size=8)),
    st.text(max_size=12),
)


def _load_or_config_error(load: Any) -> Any:
    try:
        return load()
    except ConfigError as err:
        message = str(err)
        assert message and "\n" not in message, repr(message)
        return None


@FUZZ
@given(
    document=_document(["name", "suite", "seed", "device", "out_dir", "train_overrides", "controller", "meta"],
                       {"meta": _meta_keys, "controller": _controller_keys}),
    overrides=st.lists(_override_strings, max_size=4),
)
def test_fuzz_meta_train_config_loader(document: dict[str, Any], overrides: list[str], inputs: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write_yaml(Path(directory) / "recipe.yaml", document)
        config = _load_or_config_error(lambda: load_recipe(path, overrides))
    assert config is None or isinstance(config, MetaTrainConfig)


@FUZZ
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
def test_fuzz_yaml_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "any.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogateescape")
        _load_or_config_error(lambda: read_yaml(path))
        _load_or_config_error(lambda: load_recipe(path))
    _load_or_config_error(lambda: parse_overrides([text]))


_family_override_keys = ["steps", "lr_ranges", "optimizers", "batch_sizes", "examples", "noise", "condition", "junk"]
_family_values = st.one_of(
    _values,
    st.lists(st.integers(-5, 500), min_size=2, max_size=2),
    st.fixed_dictionaries({"sgd": st.lists(st.floats(-1, 2), min_size=2, max_size=2)}),
    st.lists(st.sampled_from(["sgd", "adam", "lion"]), max_size=3),
)
_entries = st.lists(
    st.sampled_from(["noisy_quadratic", "linear_regression", "wine_mlp", "nope", ""])
    | st.builds(lambda name, extra: {"family": name, **extra}, st.sampled_from(["noisy_quadratic", "logistic_regression", "nope"]),
                st.dictionaries(st.sampled_from(_family_override_keys), _family_values, max_size=2))
    | _values,
    max_size=3,
)


@FUZZ
@given(document=st.fixed_dictionaries({"name": st.just("fuzz")}, optional={"meta_train": _entries | _values, "held_out": _entries, "description": _values, "device": _values, "junk": _values}))
def test_fuzz_task_suite_loader(document: dict[str, Any]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write_yaml(Path(directory) / "suite.yaml", document)
        _load_or_config_error(lambda: load_suite(str(path)))


_eval_keys = list(EvalConfig.__dataclass_fields__)
_eval_values = st.one_of(
    _values,
    st.sampled_from([["constant", "cosine"], ["bogus"], [{"method": "constant", "label": "c"}], [], ["cosine", "cosine"]]),
)


@FUZZ
@given(
    document=st.dictionaries(st.sampled_from([*_eval_keys, "junk"]), _eval_values, max_size=5),
    overrides=st.lists(st.sampled_from(["seeds=0", "seeds=x", "tasks_per_family=-1", "methods=[]", "methods=[bogus]", "split=test",
                                        "reference=nope", "confidence=2", "horizon_scales=[1]", "lr_grid={lion: [1]}", "device=tpu",
                                        "max_steps=-1", "seeds=1", "tune=false", "nope=1", "="]), max_size=2),
)
def test_fuzz_evaluation_config_loader(document: dict[str, Any], overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = write_yaml(Path(directory) / "eval.yaml", document)
        config = _load_or_config_error(lambda: load_eval_suite(path, overrides))
    assert config is None or isinstance(config, EvalConfig)


# ---------------------------------------------------------------------------------------------------------
# The argument parser, end to end through main(argv)


def _argv_strategy(inputs: dict[str, str]) -> st.SearchStrategy[list[str]]:
    files = st.sampled_from([inputs["recipe"]] * 4 + [inputs[k] for k in ("binary", "list", "tabs", "dir", "missing")] + ["", "-"])
    meta_train = st.tuples(
        st.just(["meta-train"]),
        files.map(lambda f: [f]),
        st.lists(st.sampled_from(VALID_OVERRIDES) | st.sampled_from(INVALID_OVERRIDES + list(FORMER_BUGS)), max_size=3),
        st.lists(st.sampled_from([["--out", "run"], ["--out", "run"], ["--resume"], ["--no-progress"], ["--out"], ["--out", "occupied"], ["--bogus"]]), max_size=3)
        .map(lambda groups: [t for g in groups for t in g]),
    )
    evaluate = st.tuples(
        st.just(["evaluate"]),
        st.sampled_from([inputs["eval"], inputs["recipe"], inputs["missing"], inputs["binary"]]).map(lambda f: [f]),
        st.lists(st.sampled_from(["seeds=0", "methods=[bogus]", "max_steps=5", "tasks_per_family=1", "nope=1", "="]), max_size=2),
        st.just(["--workers"]),
        st.sampled_from(["1", "-1", "x", "1.5"]).map(lambda w: [w]),
        st.lists(st.sampled_from([["--out", "run"], ["--controller", inputs["binary"]], ["--controller", "nope"], ["--seeds", "0"],
                                  ["--seeds", "x"], ["--backend", "bogus"], ["--address", "x:1"], ["--no-progress"]]), max_size=3)
        .map(lambda groups: [t for g in groups for t in g]),
    )
    other = st.tuples(
        st.sampled_from([["tasks"], ["tasks", "list"], ["tasks", "show"], ["tasks", "show", "wine_mlp"], ["tasks", "show", "nope"],
                         ["methods"], ["methods", "list"], ["report"], ["report", "run"], ["report", inputs["dir"]],
                         ["demo"], ["demo", "--quick"], ["frobnicate"], []]),
        st.lists(st.sampled_from([["--sample", "2"], ["--sample", "0"], ["--sample", "-1"], ["--sample", "x"], ["--seed", "x"],
                                  ["--out", "occupied"], ["--out", "run"], ["--resume"], ["--workers", "x"], ["--help"], ["-h"]]), max_size=2)
        .map(lambda groups: [t for g in groups for t in g]),
    )
    structured = (meta_train | evaluate | other).map(lambda parts: [t for part in parts for t in part])
    # Junk tokens are never path-like ("/", "..", "~"): the fuzz must not write outside its scratch folder.
    junk = st.lists(st.sampled_from(JUNK + ["meta-train", "evaluate", "tasks", "report", "--out", "run", "--seeds", "--workers"]), max_size=5)
    return st.one_of(structured, junk, st.tuples(structured, junk).map(lambda p: p[0] + p[1]))


def test_fuzz_cli_arguments(inputs: dict[str, str]) -> None:
    seen: dict[int, int] = {}

    @FUZZ
    @given(argv=_argv_strategy(inputs))
    def fuzz(argv: list[str]) -> None:
        with _fresh_cwd() as cwd:
            (cwd / "occupied").mkdir()
            (cwd / "occupied" / "keep.txt").write_text("not a run")
            code, _ = _check_cli(argv, cwd)
            seen[code] = seen.get(code, 0) + 1
            assert (cwd / "occupied" / "keep.txt").exists() or argv[:1] == ["demo"], "a command deleted an unrelated file"

    # No real evaluation may start a process pool, and `metalr demo` must not run for minutes (nor rmtree).
    with mock.patch("os.cpu_count", return_value=1), mock.patch("metalr.demo.run_demo", return_value="stubbed"), \
            mock.patch("metalr.cli.shutil.rmtree"):
        fuzz()
    assert seen.get(2, 0) > 0 and seen.get(0, 0) > 0, seen  # the vocabulary reaches both outcomes


def test_valid_yaml_that_is_not_a_mapping_is_one_line(inputs: dict[str, str]) -> None:
    for key in ("list", "binary", "tabs", "dir", "missing"):
        with pytest.raises(ConfigError) as caught:
            load_recipe(inputs[key])
        assert "\n" not in str(caught.value)
    assert yaml.safe_load(Path(inputs["list"]).read_text()) == [1, 2]


# ---------------------------------------------------------------------------------------------------------
# Damaged data directories through the CLI (the loaders' own errors are tests/tasks/test_datasets.py's)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["meta-train", "evaluate"])
def test_a_truncated_data_file_is_one_line_from_the_cli(command: str, tmp_path: Path) -> None:
    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "data" / "titanic"
    data = tmp_path / "data" / "titanic"
    data.mkdir(parents=True)
    raw = (fixtures / "train.csv").read_bytes()
    (data / "train.csv").write_bytes(raw[: raw.rfind(b"\n", 0, len(raw) // 2) + 5])  # cut inside a line
    suite = tiny_suite(tmp_path, name="titanic", meta_train=["titanic_mlp"], held_out=["titanic_mlp"])
    if command == "meta-train":
        argv = [command, str(tiny_recipe(tmp_path, suite, meta_steps=1)), "--out", str(tmp_path / "run")]
    else:
        evaluation = write_yaml(tmp_path / "eval.yaml", {"suite": str(suite), "tasks_per_family": 1, "seeds": 1, "max_steps": 5,
                                                          "methods": ["constant", "cosine"], "tune": False, "horizon_scales": []})
        argv = [command, str(evaluation), "--out", str(tmp_path / "run"), "--workers", "1"]
    env = {"METALR_DATA_DIR": str(tmp_path / "data"), "METALR_CACHE_DIR": str(tmp_path / "cache")}
    with mock.patch.dict(os.environ, env):
        result = run_metalr([*argv, "--no-progress"])
    line = assert_one_line_user_error(result.returncode, result.stderr)
    assert "titanic: malformed file" in line and "train.csv" in line
    assert not (tmp_path / "run").exists()
