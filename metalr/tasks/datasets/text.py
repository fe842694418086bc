"""Text classification datasets: IMDB (``aclImdb`` folder or tarball), SST-2 (GLUE TSV), AG News (CSV).

Rows carry ``text`` (str) and ``label`` (int64 class index).
"""

from __future__ import annotations

import csv
import os
import re
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalr.tasks.datasets.base import (
    FileLayout,
    LoaderSpec,
    cache_root,
    cached_arrow,
    check_field_counts,
    load_with_fallback,
    malformed,
)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

IMDB_CLASSES = ("neg", "pos")
SST2_CLASSES = ("negative", "positive")
AG_NEWS_CLASSES = ("World", "Sports", "Business", "Sci/Tech")

IMDB = LoaderSpec(
    "imdb",
    ("imdb", "IMDB"),
    (
        FileLayout(("aclImdb",), "the extracted aclImdb folder"),
        FileLayout(("aclImdb_v1_labeled.tar.gz",), "the labelled part of the archive"),
        FileLayout(("aclImdb_v1.tar.gz",), "the original archive"),
    ),
    hub_id="imdb",
)
# GLUE's file names (train.tsv, dev.tsv) are generic, so the data directory itself is not searched.
SST2 = LoaderSpec(
    "sst2",
    ("SST-2", "sst2", "sst-2"),
    (FileLayout(("train.tsv", "dev.tsv"), "GLUE SST-2"),),
    hub_id="glue",
    hub_config="sst2",
    search_root=False,
)
AG_NEWS = LoaderSpec(
    "ag_news",
    ("ag_news", "ag_news_csv", "agnews"),
    (FileLayout(("train.csv", "test.csv"), "Zhang et al. 2015 CSVs"),),
    hub_id="ag_news",
    search_root=False,
)

_IMDB_MEMBER = re.compile(r"(?:^|/)aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _text_dataset(
    texts: list[str], labels: list[int], classes: tuple[str, ...], extra: dict[str, list[Any]] | None = None
) -> Dataset:
    from datasets import ClassLabel, Dataset, Features, Value

    columns: dict[str, list[Any]] = {"text": texts, "label": labels, **(extra or {})}
    features = {"text": Value("string"), "label": ClassLabel(names=list(classes))}
    features.update({k: Value("int64") for k in (extra or {})})
    return Dataset.from_dict(columns, features=Features(features))


def _imdb_rows(folder: Path, layout: FileLayout) -> Iterator[tuple[str, str, int, int, bytes]]:
    """(split, sentiment, review id, rating, raw bytes) for every labelled review."""
    source = folder / layout.files[0]
    if source.is_dir():
        for path in sorted(source.rglob("*.txt")):
            match = _IMDB_MEMBER.search(path.as_posix())
            if match:
                yield match[1], match[2], int(match[3]), int(match[4]), path.read_bytes()
        return
    try:
        with tarfile.open(source, "r:gz") as tar:
            for member in tar:
                match = _IMDB_MEMBER.search(member.name)
                if match and member.isfile():
                    handle = tar.extractfile(member)
                    if handle is not None:
                        yield match[1], match[2], int(match[3]), int(match[4]), handle.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise malformed("imdb", source, f"unreadable archive ({type(err).__name__}: {err})") from None


def _imdb_split(rows: list[tuple[int, int, int, str]]) -> Dataset:
    # Files come grouped by sentiment; a fixed shuffle keeps any prefix of a split class-balanced.
    import random

    rows = sorted(rows)
    random.Random(0).shuffle(rows)
    return _text_dataset(
        [r[3] for r in rows], [r[0] for r in rows], IMDB_CLASSES, {"rating": [r[2] for r in rows]}
    )


def _read_imdb(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import DatasetDict

    splits: dict[str, list[tuple[int, int, int, str]]] = {"train": [], "test": []}
    for split, sentiment, review_id, rating, raw in _imdb_rows(folder, layout):
        text = _BREAK.sub(" ", raw.decode("utf-8", errors="replace"))
        splits[split].append((IMDB_CLASSES.index(sentiment), review_id, rating, text))
    for split, rows in splits.items():
        labels = {r[0] for r in rows}
        if labels != {0, 1}:
            raise malformed(
                "imdb",
                folder / layout.files[0],
                f"{split} has {len(rows)} reviews with labels {sorted(labels)}; expected aclImdb/{split}/{{pos,neg}}/<id>_<rating>.txt",
            )
    return DatasetDict({split: _imdb_split(rows) for split, rows in splits.items()})


def _normalise_imdb_hub(loaded: DatasetDict) -> DatasetDict:
    from datasets import DatasetDict

    out = {}
    for split in ("train", "test"):
        rows = [
            (int(label), i, -1, _BREAK.sub(" ", text))
            for i, (text, label) in enumerate(zip(loaded[split]["text"], loaded[split]["label"], strict=True))
        ]
        out[split] = _imdb_split(rows)
    return DatasetDict(out)


def _read_csv(name: str, files: dict[str, Path], **csv_options: Any) -> DatasetDict:
    """``load_dataset("csv")`` (Arrow-cached by ``datasets`` itself) with any parse failure as a DatasetError."""
    import datasets

    try:
        return datasets.load_dataset(
            "csv",
            data_files={k: str(v) for k, v in files.items()},
            cache_dir=str(cache_root() / "hf"),
            **csv_options,
        )
    except Exception as err:  # pandas/pyarrow parse errors surface as DatasetGenerationError and friends
        raise malformed(
            name,
            next(iter(files.values())).parent,
            f"cannot parse {sorted(p.name for p in files.values())}: {type(err).__name__}: {err}",
        ) from None


def _checked_labels(
    name: str, path: Path, labels: list[Any], classes: tuple[str, ...], offset: int = 0
) -> list[int]:
    try:
        values = [int(v) - offset for v in labels]
    except (TypeError, ValueError):
        bad = next(v for v in labels if not str(v).lstrip("-").isdigit())
        raise malformed(name, path, f"label {bad!r} is not an integer") from None
    bad_values = sorted({v + offset for v in values if not 0 <= v < len(classes)})
    if bad_values:
        raise malformed(name, path, f"labels {bad_values[:5]} outside {offset}..{len(classes) - 1 + offset}")
    return values


def _read_sst2(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import DatasetDict

    # GLUE's dev set is the labelled evaluation split (its test.tsv has no labels).
    files = {"train": folder / "train.tsv", "test": folder / "dev.tsv"}
    for path in files.values():
        check_field_counts("sst2", path, 2, delimiter="\t", quoting=csv.QUOTE_NONE)
    loaded = _read_csv("sst2", files, delimiter="\t", quoting=csv.QUOTE_NONE, keep_default_na=False)
    out = {}
    for split, path in files.items():
        rows = loaded[split]
        if not {"sentence", "label"} <= set(rows.column_names):
            raise malformed(
                "sst2", path, f"columns {rows.column_names}, expected the GLUE header 'sentence<TAB>label'"
            )
        labels = _checked_labels("sst2", path, rows["label"], SST2_CLASSES)
        out[split] = _text_dataset([s.strip() for s in rows["sentence"]], labels, SST2_CLASSES)
    return DatasetDict(out)


def _normalise_sst2_hub(loaded: DatasetDict) -> DatasetDict:
    from datasets import DatasetDict

    return DatasetDict(
        {
            ours: _text_dataset(loaded[theirs]["sentence"], loaded[theirs]["label"], SST2_CLASSES)
            for ours, theirs in (("train", "train"), ("test", "validation"))
        }
    )


def _read_ag_news(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import DatasetDict

    files = {"train": folder / "train.csv", "test": folder / "test.csv"}
    for path in files.values():
        check_field_counts("ag_news", path, 3)
    loaded = _read_csv(
        "ag_news", files, header=None, column_names=["label", "title", "description"], keep_default_na=False
    )
    out = {}
    for split, path in files.items():
        rows = loaded[split]
        labels = _checked_labels(
            "ag_news", path, rows["label"], AG_NEWS_CLASSES, offset=1
        )  # classes are 1..4 on disk
        # The original CSVs encode line breaks inside descriptions as a literal backslash.
        texts = [
            f"{t} {d}".replace("\\", " ") for t, d in zip(rows["title"], rows["description"], strict=True)
        ]
        out[split] = _text_dataset(texts, labels, AG_NEWS_CLASSES)
    return DatasetDict(out)


def _normalise_ag_news_hub(loaded: DatasetDict) -> DatasetDict:
    from datasets import DatasetDict

    return DatasetDict(
        {s: _text_dataset(loaded[s]["text"], loaded[s]["label"], AG_NEWS_CLASSES) for s in ("train", "test")}
    )


def load_imdb(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """IMDB reviews (Maas et al. 2011): 25,000 train + 25,000 test, binary; ``<br />`` becomes a space."""
    return load_with_fallback(
        IMDB,
        data_dir,
        lambda f, lay: cached_arrow("imdb", [f / lay.files[0]], lambda: _read_imdb(f, lay)),
        _normalise_imdb_hub,
    )


def load_sst2(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """SST-2 from GLUE: 67,349 train sentences/phrases; ``test`` is GLUE's labelled dev set (872)."""
    return load_with_fallback(SST2, data_dir, _read_sst2, _normalise_sst2_hub)


def load_ag_news(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """AG News (Zhang et al. 2015): 120,000 train + 7,600 test, four topics; text is title + description."""
    return load_with_fallback(AG_NEWS, data_dir, _read_ag_news, _normalise_ag_news_hub)
