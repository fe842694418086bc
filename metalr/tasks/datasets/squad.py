"""SQuAD v1.1 extractive question answering (``train-v1.1.json`` / ``dev-v1.1.json``).

Rows carry ``id``, ``article`` (index of the Wikipedia article, for grouped splits), ``title``, ``context``,
``question`` and ``answers`` (``{"text": [...], "answer_start": [...]}``, several gold answers in dev).
With both files, ``test`` is the official dev set. With ``dev-v1.1.json`` alone (the shared data folder
has only that), ``test`` is a fixed fifth of dev's *articles* and ``train`` the rest: splitting by article
keeps paragraphs of one article from sitting on both sides.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metalr.tasks.datasets.base import FileLayout, LoaderSpec, cached_arrow, load_with_fallback, malformed

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

SQUAD = LoaderSpec(
    "squad",
    ("squad", "SQuAD"),
    (
        FileLayout(("train-v1.1.json", "dev-v1.1.json"), "official train and dev"),
        FileLayout(("dev-v1.1.json",), "dev only: train/test carved by article"),
    ),
    hub_id="squad",
)
DEV_ONLY_TEST_FRACTION = 0.2


def _squad_dataset(rows: list[dict[str, Any]]) -> Dataset:
    from datasets import Dataset, Features, Sequence, Value

    features = Features(
        {
            "id": Value("string"),
            "article": Value("int64"),
            "title": Value("string"),
            "context": Value("string"),
            "question": Value("string"),
            "answers": Sequence({"text": Value("string"), "answer_start": Value("int64")}),
        }
    )
    return Dataset.from_list(rows, features=features)


def read_squad_json(path: Path) -> list[dict[str, Any]]:
    """Flatten SQuAD's article -> paragraph -> question nesting into one row per question."""
    try:
        with open(path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise malformed(
            "squad", path, f"not valid JSON ({type(err).__name__}: {err}); truncated download?"
        ) from None
    if not isinstance(payload, dict) or not isinstance(payload.get("data"), list):
        raise malformed(
            "squad", path, "expected a JSON object with a 'data' list of articles (SQuAD v1.1 format)"
        )
    rows = []
    try:
        for article_index, article in enumerate(payload["data"]):
            for paragraph in article["paragraphs"]:
                context = paragraph["context"]
                for qa in paragraph["qas"]:
                    answers = qa["answers"]
                    for answer in answers:
                        start, text = int(answer["answer_start"]), str(answer["text"])
                        if context[start : start + len(text)] != text:
                            raise ValueError(
                                f"answer {text!r} of question {qa['id']} is not at offset {start} of its context"
                            )
                    rows.append(
                        {
                            "id": str(qa["id"]),
                            "article": article_index,
                            "title": str(article.get("title", "")),
                            "context": context,
                            "question": qa["question"],
                            "answers": {
                                "text": [a["text"] for a in answers],
                                "answer_start": [int(a["answer_start"]) for a in answers],
                            },
                        }
                    )
    except (KeyError, TypeError, ValueError) as err:
        raise malformed("squad", path, f"unexpected structure: {type(err).__name__}: {err}") from None
    if not rows:
        raise malformed("squad", path, "no questions found")
    return rows


def _read_squad(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import DatasetDict

    dev = read_squad_json(folder / "dev-v1.1.json")
    if "train-v1.1.json" in layout.files:
        return DatasetDict(
            {
                "train": _squad_dataset(read_squad_json(folder / "train-v1.1.json")),
                "test": _squad_dataset(dev),
            }
        )
    articles = sorted({r["article"] for r in dev})
    random.Random(0).shuffle(articles)
    test_articles = set(articles[: max(1, round(len(articles) * DEV_ONLY_TEST_FRACTION))])
    if len(test_articles) == len(articles):
        raise malformed(
            "squad",
            folder / "dev-v1.1.json",
            f"{len(articles)} article(s): need at least 2 to carve train and test",
        )
    return DatasetDict(
        {
            "train": _squad_dataset([r for r in dev if r["article"] not in test_articles]),
            "test": _squad_dataset([r for r in dev if r["article"] in test_articles]),
        }
    )


def _normalise_hub(loaded: DatasetDict) -> DatasetDict:
    from datasets import DatasetDict

    out = {}
    for ours, theirs in (("train", "train"), ("test", "validation")):
        titles: dict[str, int] = {}
        rows = [
            {**row, "article": titles.setdefault(row["title"], len(titles)), "answers": dict(row["answers"])}
            for row in loaded[theirs]
        ]
        out[ours] = _squad_dataset(rows)
    return DatasetDict(out)


def load_squad(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """SQuAD v1.1: 87,599 train + 10,570 dev questions (or dev alone, carved by article)."""
    return load_with_fallback(
        SQUAD,
        data_dir,
        lambda f, lay: cached_arrow(
            f"squad-{len(lay.files)}", [f / n for n in lay.files], lambda: _read_squad(f, lay)
        ),
        _normalise_hub,
    )
