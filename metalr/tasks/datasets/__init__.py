"""Real datasets, offline from their original distribution files or online from the Hugging Face hub.

Example:
    >>> from metalr.tasks.datasets import load_dataset
    >>> mnist = load_dataset("mnist", data_dir="../shared/data")  # a datasets.DatasetDict: train, test
    >>> mnist["train"].features["image"].shape
    (1, 28, 28)

``LOADERS`` maps each name to a ``loader(data_dir=None) -> datasets.DatasetDict``; see
:mod:`metalr.tasks.datasets.base` for where files are looked for, and
:mod:`metalr.tasks.datasets.tensors` for the task splits built from them. Importing this package does
not import ``datasets``: every loader imports it when called.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from metalr.tasks.datasets.base import DATA_DIR_ENV, DatasetError, LoaderSpec, resolve_data_dir
from metalr.tasks.datasets.squad import SQUAD, load_squad
from metalr.tasks.datasets.tabular import ADULT, TITANIC, load_adult, load_titanic
from metalr.tasks.datasets.text import AG_NEWS, IMDB, SST2, load_ag_news, load_imdb, load_sst2
from metalr.tasks.datasets.vision import (
    CIFAR10,
    FASHION_MNIST,
    MNIST,
    load_cifar10,
    load_fashion_mnist,
    load_mnist,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

LOADERS: dict[str, Callable[..., DatasetDict]] = {
    "mnist": load_mnist,
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
    "imdb": load_imdb,
    "sst2": load_sst2,
    "ag_news": load_ag_news,
    "squad": load_squad,
    "titanic": load_titanic,
    "adult": load_adult,
}
SPECS: dict[str, LoaderSpec] = {
    s.name: s for s in (MNIST, FASHION_MNIST, CIFAR10, IMDB, SST2, AG_NEWS, SQUAD, TITANIC, ADULT)
}


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """Load a dataset by name (``train`` and ``test`` splits); unknown names list the known ones."""
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[name](data_dir)


def list_datasets() -> list[str]:
    return sorted(LOADERS)


__all__ = [
    "DATA_DIR_ENV",
    "LOADERS",
    "SPECS",
    "DatasetError",
    "list_datasets",
    "load_dataset",
    "resolve_data_dir",
]
