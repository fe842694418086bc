"""Typed configs: unknown keys and wrong types rejected with the key and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalr.config import (
    DEFAULT_FEATURE_GROUPS,
    ConfigError,
    MetaTrainConfig,
    dump_config,
    load_config,
    parse_overrides,
    read_eval_config,
    read_yaml,
)
from metalr.features import DEFAULT_GROUPS
from metalr.meta.recipe import load_recipe
from metalr.tasks import load_suite

ROOT = Path(__file__).resolve().parent.parent


def test_recipe_loads_with_overrides() -> None:
    config = load_config(MetaTrainConfig, ROOT / "meta_train" / "demo.yaml", ["meta.meta_steps=7", "seed=3", "controller.hidden=[8, 4]"])
    assert config.meta.meta_steps == 7 and config.seed == 3 and config.controller.hidden == (8, 4)


def test_every_recipe_starts_with_the_command_that_runs_it() -> None:
    for recipe in sorted((ROOT / "meta_train").glob("*.yaml")):
        first = recipe.read_text().splitlines()[0]
        assert first.startswith("# metalr meta-train meta_train/" + recipe.name), recipe
        load_recipe(recipe)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["meta.meta_stepz=5"], r"unknown key meta.meta_stepz; allowed keys: .*meta_steps"),
        (["colour=red"], r"unknown key colour; allowed keys: augment, controller, device"),
        (["meta.meta_steps=abc"], r"meta.meta_steps: expected int, got str 'abc'"),
        (["meta.meta_steps=1.5"], r"meta.meta_steps: expected int, got float"),
        (["meta.meta_lr=true"], r"meta.meta_lr: expected float, got bool"),
        (["controller.hidden=7"], r"controller.hidden: expected a list, got 7"),
        (["controller.base_schedule=linear"], r"unknown base_schedule 'linear'"),
        (["meta"], r"override 'meta' is not of the form key=value"),
        (["meta=1", "meta.seed=2"], r"conflicts with an earlier override"),
    ],
)
def test_bad_values_are_rejected_naming_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "meta_train" / "demo.yaml", overrides)


def test_ints_are_accepted_for_floats() -> None:
    assert load_config(MetaTrainConfig, None, ["meta.meta_lr=1"]).meta.meta_lr == 1.0


def test_yaml_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        read_yaml(bad)
    assert "\n" not in str(info.value)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a YAML mapping"):
        read_yaml(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_yaml(tmp_path / "missing.yaml")


def test_overrides_parse_yaml_scalars() -> None:
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=x"]) == {"a": {"b": 3, "c": [1, 2]}, "d": "x"}


def test_resolved_config_round_trips_through_yaml(tmp_path: Path) -> None:
    config = load_config(MetaTrainConfig, ROOT / "meta_train" / "demo.yaml")
    dump_config(config, tmp_path / "config.yaml")
    assert load_config(MetaTrainConfig, tmp_path / "config.yaml") == config


def test_suites_name_registered_families(tmp_path: Path) -> None:
    suite = load_suite("embedded")
    assert suite.meta_train and suite.held_out
    assert not {e.family for e in suite.meta_train} & {e.family for e in suite.held_out}
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nmeta_train: [digits_mlp, nonexistent]\n")
    with pytest.raises(ConfigError, match="unknown task family 'nonexistent'; registered families: .*digits_mlp"):
        load_suite(str(bad))
    bad.write_text("name: bad\nmeta_train: [{family: digits_mlp, steps: [10, 5]}]\n")
    with pytest.raises(ConfigError, match="steps range must satisfy 0 < low <= high"):
        load_suite(str(bad))
    bad.write_text("name: bad\nmeta_train: [{family: digits_mlp, colour: red}]\n")
    with pytest.raises(ConfigError, match="does not take \\['colour'\\]"):
        load_suite(str(bad))


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_an_empty_file_is_rejected_not_read_as_all_defaults(tmp_path: Path, text: str) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text(text)
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty; expected a YAML mapping"):
        load_config(MetaTrainConfig, empty)
    with pytest.raises(ConfigError, match=r"empty.yaml: the file is empty; expected a YAML mapping"):
        read_eval_config(empty)


@pytest.mark.parametrize("name", ["../../escape", "a/b", "/abs", "..", ".hidden", "", "a\\b", "tab name"])
def test_a_run_name_must_be_a_plain_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"name must be a plain name .*got"):
        load_config(MetaTrainConfig, ROOT / "meta_train" / "demo.yaml", [f"name={name!r}" if name else "name="])


def test_plain_run_names_are_accepted() -> None:
    for name in ("demo", "adam-cpu", "run_2.b"):
        assert load_config(MetaTrainConfig, None, [f"name={name}"]).name == name


def test_the_recipe_table_names_each_recipes_estimator() -> None:
    rows = [line.split("|") for line in (ROOT / "meta_train" / "README.md").read_text().splitlines() if line.startswith("| `")]
    listed = {name.strip(" `"): cells[2].strip() for cells in rows for name in cells[1].split(",")}
    assert set(listed) == {p.name for p in (ROOT / "meta_train").glob("*.yaml")}
    for name, estimator in listed.items():
        assert load_config(MetaTrainConfig, ROOT / "meta_train" / name).meta.estimator == estimator, name


def test_the_default_feature_groups_are_the_feature_modules_defaults() -> None:
    # config.py spells them out (it imports no subsystem); they must stay what metalr.features uses.
    assert DEFAULT_FEATURE_GROUPS == DEFAULT_GROUPS == MetaTrainConfig().controller.features


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["meta.estimator=reinforce"], r"demo.yaml: meta: unknown estimator 'reinforce'; expected one of \['es', 'full', 'pes', 'tbptt'\]"),
        (["meta.truncation=bogus"], r"demo.yaml: meta: unknown truncation 'bogus'; expected one of \['constant', 'curriculum', 'log_uniform'\]"),
        (["meta.backend=jax"], r"demo.yaml: meta: unknown backend 'jax'; expected one of \['higher', 'native'\]"),
        (["controller.features=[telepathy]"], r"demo.yaml: controller: unknown feature group\(s\) \['telepathy'\]"),
        (["controller.kind=transformer"], r"demo.yaml: controller: unknown controller kind 'transformer'"),
        (["controller.kind=lstm"], r"demo.yaml: controller: the lstm controller takes one hidden size"),
        (["suite=nowhere"], r"no task suite at 'nowhere': not a file, and not a shipped name \(shipped: "),
        (["train_overrides={colour: red}"], r"train_overrides: task family .* does not take \['colour'\]"),
    ],
)
def test_names_are_checked_by_their_owners_when_the_recipe_loads(overrides: list[str], message: str) -> None:
    recipe = ROOT / "meta_train" / "demo.yaml"
    config = load_config(MetaTrainConfig, recipe, overrides)  # as data, the recipe is fine ...
    assert isinstance(config, MetaTrainConfig)
    with pytest.raises(ConfigError, match=message):  # ... its names are not
        load_recipe(recipe, overrides)
