"""Tabular datasets: Kaggle Titanic (``train.csv``) and UCI Adult (``adult.data`` / ``adult.test``).

Rows keep the original columns (missing values as nulls) plus ``label`` (int64); feature encoding
(one-hot, imputation, standardisation) needs training statistics and lives in
:mod:`metalr.tasks.datasets.tensors`. Titanic's Kaggle ``test.csv`` has no labels, so ``test`` is a fixed
fifth of ``train.csv`` (seed 0); Adult's ``test`` is the official ``adult.test``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

from metalr.tasks.datasets.base import (
    FileLayout,
    LoaderSpec,
    check_field_counts,
    load_with_fallback,
    malformed,
    require_columns,
)

if TYPE_CHECKING:
    import pandas as pd
    from datasets import DatasetDict

TITANIC = LoaderSpec(
    "titanic",
    ("titanic",),
    (FileLayout(("train.csv",), "Kaggle 'Titanic - Machine Learning from Disaster'"),),
    search_root=False,
)
ADULT = LoaderSpec(
    "adult",
    ("adult", "uci_adult", "census_income"),
    (FileLayout(("adult.data", "adult.test"), "UCI repository files"),),
)

TITANIC_COLUMNS = (
    "PassengerId",
    "Survived",
    "Pclass",
    "Name",
    "Sex",
    "Age",
    "SibSp",
    "Parch",
    "Ticket",
    "Fare",
    "Cabin",
    "Embarked",
)
ADULT_COLUMNS = (
    "age", "workclass", "fnlwgt", "education", "education_num", "marital_status", "occupation", "relationship",
    "race", "sex", "capital_gain", "capital_loss", "hours_per_week", "native_country", "income",
)  # fmt: skip
ADULT_NUMERIC = ("age", "fnlwgt", "education_num", "capital_gain", "capital_loss", "hours_per_week")
TITANIC_TEST_FRACTION = 0.2


def _read_titanic(folder: Path, layout: FileLayout) -> DatasetDict:
    import pandas as pd
    from datasets import Dataset, DatasetDict

    path = folder / "train.csv"
    check_field_counts("titanic", path, len(TITANIC_COLUMNS))
    try:
        frame = pd.read_csv(path)
    except Exception as err:  # pandas raises several parser error types
        raise malformed("titanic", path, f"cannot parse CSV ({type(err).__name__}: {err})") from None
    require_columns("titanic", path, list(frame.columns), TITANIC_COLUMNS)
    survived = pd.to_numeric(frame["Survived"], errors="coerce")
    if survived.isna().any() or not survived.isin([0, 1]).all():
        raise malformed(
            "titanic",
            path,
            f"'Survived' must be 0/1 on every row; row {int(survived.isna().idxmax()) + 2} is not (truncated file?)",
        )
    frame = frame.assign(label=survived.astype("int64"))
    order = list(range(len(frame)))
    random.Random(0).shuffle(order)
    test_n = max(1, round(len(frame) * TITANIC_TEST_FRACTION))
    test_rows, train_rows = sorted(order[:test_n]), sorted(order[test_n:])
    return DatasetDict(
        {
            "train": Dataset.from_pandas(frame.iloc[train_rows].reset_index(drop=True)),
            "test": Dataset.from_pandas(frame.iloc[test_rows].reset_index(drop=True)),
        }
    )


def _read_adult_file(path: Path, test: bool) -> pd.DataFrame:
    import pandas as pd

    check_field_counts("adult", path, len(ADULT_COLUMNS))
    try:
        # adult.test starts with "|1x3 Cross validator" and ends its labels with "."; "?" marks missing values.
        frame = pd.read_csv(
            path,
            header=None,
            names=list(ADULT_COLUMNS),
            skipinitialspace=True,
            na_values="?",
            comment="|",
            skip_blank_lines=True,
        )
    except Exception as err:
        raise malformed("adult", path, f"cannot parse CSV ({type(err).__name__}: {err})") from None
    raw_income = frame["income"].astype("string")
    if test and not raw_income.str.endswith(".").fillna(False).all():
        # Every label of adult.test ends with "."; one without it is a cut-off last line.
        row = int((~raw_income.str.endswith(".").fillna(False)).to_numpy().argmax())
        raise malformed(
            "adult",
            path,
            f"data row {row + 1} has income {raw_income.iloc[row]!r}; every adult.test label ends with '.' (truncated file?)",
        )
    income = raw_income.str.rstrip(".")
    bad = ~income.isin(["<=50K", ">50K"])
    if bad.any():
        row = int(bad.to_numpy().argmax())
        raise malformed(
            "adult",
            path,
            f"data row {row + 1} has income {frame['income'].iloc[row]!r}, expected '<=50K' or '>50K' in column 15 (truncated file?)",
        )
    for column in ADULT_NUMERIC:
        values = pd.to_numeric(frame[column], errors="coerce")
        if values.isna().any():
            raise malformed(
                "adult",
                path,
                f"column {column!r} has a non-numeric value on data row {int(values.isna().to_numpy().argmax()) + 1}",
            )
        frame[column] = values.astype("float64")
    return frame.assign(label=(income == ">50K").astype("int64"))


def _read_adult(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    return DatasetDict(
        {
            split: Dataset.from_pandas(_read_adult_file(folder / name, split == "test"))
            for split, name in (("train", "adult.data"), ("test", "adult.test"))
        }
    )


def load_titanic(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """Titanic: 891 labelled passengers; ``test`` is a fixed fifth of them (178)."""
    return load_with_fallback(TITANIC, data_dir, _read_titanic)


def load_adult(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """UCI Adult (census income > $50K): 32,561 train + 16,281 test."""
    return load_with_fallback(ADULT, data_dir, _read_adult)
