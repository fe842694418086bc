"""Loading a meta-training recipe: the config as data, then every name in it checked by its owner.

``metalr.config`` is data and imports no subsystem, so the names a recipe gives are checked here, when
the recipe is loaded and before anything runs: the estimator, truncation schedule, backend and selection against
meta's own registries, the controller by building it (feature groups, base schedule, kind, LR bounds:
``metalr.features`` and ``metalr.controller`` reject what they cannot build), the task suite and
``train_overrides`` by the task registry. Every failure is a one-line :class:`ConfigError`.

Example:
    >>> config = load_recipe("meta_train/demo.yaml", ["meta.meta_steps=10"])
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from metalr.config import ConfigError, MetaTrainConfig, load_config
from metalr.meta.estimators import ESTIMATORS
from metalr.meta.trainer import build_controller, train_entries
from metalr.meta.truncation import TRUNCATION_SCHEDULES
from metalr.meta.validation import SELECTIONS
from metalr.tasks import load_suite

BACKENDS = ("native", "higher")  # the unroll implementations of metalr.meta.estimators.get_unroll


def _check_name(where: str, key: str, value: str, names: Collection[str]) -> None:
    if value not in names:
        raise ConfigError(f"{where}: meta: unknown {key} {value!r}; expected one of {sorted(names)}")


def check_recipe(config: MetaTrainConfig, where: str = "recipe") -> None:
    """Raise :class:`ConfigError` naming the first thing in ``config`` that cannot run (``where``: the file)."""
    _check_name(where, "estimator", config.meta.estimator, ESTIMATORS)
    _check_name(where, "truncation", config.meta.truncation, TRUNCATION_SCHEDULES)
    _check_name(where, "backend", config.meta.backend, BACKENDS)
    _check_name(where, "selection", config.meta.selection, SELECTIONS)
    try:
        build_controller(config.controller)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where}: controller: {err}") from None
    suite = load_suite(config.suite)
    train_entries(config, suite.meta_train)
    train_entries(config, suite.meta_valid)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> MetaTrainConfig:
    """A recipe (YAML plus ``key=value`` overrides), checked by every package that owns a name in it."""
    config = load_config(MetaTrainConfig, path, overrides)
    check_recipe(config, str(path) if path is not None else "config")
    return config


__all__ = ["BACKENDS", "check_recipe", "load_recipe"]
