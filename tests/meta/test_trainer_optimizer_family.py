"""The meta-trainer records which base-optimizer family a controller was trained for in its checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest

from metalr.checkpoint import load_controller
from metalr.config import MetaTrainConfig, load_config
from metalr.meta.trainer import MetaTrainer, meta_train
from metalr.shipped import resolve_shipped


def _config(*overrides: str) -> MetaTrainConfig:
    return load_config(MetaTrainConfig, resolve_shipped("meta_train", "demo-quick"), ["meta.meta_steps=1", *overrides])


@pytest.mark.parametrize(
    ("overrides", "family"),
    [
        (["train_overrides.optimizers=[adam, adamw]"], "adam"),
        (["train_overrides.optimizers=[sgd, momentum]"], "sgd"),
        ([], None),  # the embedded families' default sgd/momentum/adam mix
    ],
)
def test_the_trainer_knows_the_family_of_its_recipe(tmp_path: Path, overrides: list[str], family: str | None) -> None:
    assert MetaTrainer(_config(*overrides), tmp_path, progress=False).controller.optimizer_family == family


def test_the_family_reaches_the_checkpoint_file(tmp_path: Path) -> None:
    meta_train(_config("train_overrides.optimizers=[adam]"), tmp_path, progress=False)
    assert load_controller(tmp_path / "final.safetensors").optimizer_family == "adam"
