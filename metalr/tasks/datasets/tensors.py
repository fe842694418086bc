"""From loaded rows to the tensors a :class:`~metalr.tasks.base.Task` holds.

Every function here returns the four task splits. ``test`` is the loader's ``test`` untouched;
``inner_valid`` and ``outer_valid`` are carved from the loader's ``train`` with a fixed seed (the same for
every task, so no task seed moves validation examples into training); what is left is ``train``, from
which families draw their per-task subsets. Results are cached in-process (``lru_cache``) because a
meta-training run builds many tasks over the same dataset.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor

from metalr.tasks.datasets.base import DatasetError, cache_root, resolve_data_dir

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedTokenizerFast

VALID_SPLITS = ("inner_valid", "outer_valid")
# Each validation split takes 5% of the training pool (10% for pools under 10k examples), at most 5,000
# examples: enough for a stable accuracy estimate (+-0.6% at 5k) without starving small datasets.
VALID_CAP = 5000
CARVE_SEED = 0


def loader(dataset: str) -> Callable[..., DatasetDict]:
    from metalr.tasks.datasets import LOADERS

    if dataset not in LOADERS:
        raise DatasetError(f"unknown dataset {dataset!r}; expected one of {sorted(LOADERS)}")
    return LOADERS[dataset]


def _dir_key(data_dir: str | os.PathLike[str] | None) -> str | None:
    resolved = resolve_data_dir(data_dir)
    return str(resolved.resolve()) if resolved is not None else None


def validation_size(pool: int) -> int:
    return min(VALID_CAP, int(pool * (0.1 if pool < 10_000 else 0.05)))


def carve_validation(
    pool: int, groups: Sequence[int] | None = None, seed: int = CARVE_SEED
) -> dict[str, np.ndarray]:
    """Fixed ``train``/``inner_valid``/``outer_valid`` indices of a training pool of ``pool`` rows.

    With ``groups`` (one id per row, e.g. a SQuAD article), whole groups go to one split, so no group
    leaks across splits; validation splits then hold whole groups up to about the same size.
    """
    target = validation_size(pool)
    if pool < 3 or target < 1:
        raise DatasetError(f"a training pool of {pool} rows is too small to carve two validation splits from")
    rng = random.Random(seed)
    if groups is None:
        order = list(range(pool))
        rng.shuffle(order)
        out = {
            "inner_valid": order[:target],
            "outer_valid": order[target : 2 * target],
            "train": order[2 * target :],
        }
    else:
        members: dict[int, list[int]] = {}
        for row, group in enumerate(groups):
            members.setdefault(int(group), []).append(row)
        keys = sorted(members)
        rng.shuffle(keys)
        out = {"inner_valid": [], "outer_valid": [], "train": []}
        for key in keys:
            split = next((s for s in VALID_SPLITS if len(out[s]) < target), "train")
            out[split].extend(members[key])
        if not out["train"] or not out["outer_valid"]:
            raise DatasetError(f"{len(keys)} groups are too few to carve train and two validation splits")
    # Left in shuffled order: a prefix of a validation split is then itself a fixed random sample.
    return {name: np.asarray(rows, dtype=np.int64) for name, rows in out.items()}


def _flat(dataset: Dataset) -> Dataset:
    return dataset.flatten_indices() if getattr(dataset, "_indices", None) is not None else dataset


def _numpy_column(dataset: Dataset, column: str) -> np.ndarray:
    """A fixed-shape column straight from Arrow (``with_format("numpy")`` copies row by row: 100x slower)."""
    import pyarrow as pa

    dataset = _flat(dataset)
    array: Any = dataset.data.column(column).combine_chunks()
    shape = dataset.features[column].shape if hasattr(dataset.features[column], "shape") else ()
    storage = array.storage if isinstance(array, pa.ExtensionArray) else array
    while (
        pa.types.is_list(storage.type)
        or pa.types.is_fixed_size_list(storage.type)
        or pa.types.is_large_list(storage.type)
    ):
        storage = storage.flatten()
    return storage.to_numpy(zero_copy_only=False).reshape(len(dataset), *shape)


# ----------------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class ImageData:
    """Image splits as uint8 ``N x C x H x W`` plus per-channel statistics of ``train`` (in [0, 1] units)."""

    splits: dict[str, dict[str, Tensor]]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int


@functools.lru_cache(maxsize=4)
def _image_data(dataset: str, data_dir: str | None) -> ImageData:
    loaded = loader(dataset)(data_dir)
    pool_x = torch.from_numpy(_numpy_column(loaded["train"], "image").copy())
    pool_y = torch.from_numpy(_numpy_column(loaded["train"], "label").astype(np.int64))
    splits = {
        name: {"x": pool_x[idx], "y": pool_y[idx]} for name, idx in carve_validation(len(pool_x)).items()
    }
    splits["test"] = {
        "x": torch.from_numpy(_numpy_column(loaded["test"], "image").copy()),
        "y": torch.from_numpy(_numpy_column(loaded["test"], "label").astype(np.int64)),
    }
    train = splits["train"]["x"].float().div_(255)
    mean = train.mean(dim=(0, 2, 3))
    std = train.std(dim=(0, 2, 3)).clamp_min(1e-6)
    num_classes = loaded["train"].features["label"].num_classes
    return ImageData(splits, tuple(mean.tolist()), tuple(std.tolist()), num_classes)


def image_data(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> ImageData:
    """MNIST/Fashion-MNIST/CIFAR-10 as uint8 tensors (normalisation belongs to the model's input layer)."""
    return _image_data(dataset, _dir_key(data_dir))


# ----------------------------------------------------------------------------------------------------------
# Text


@dataclass(frozen=True)
class TextData:
    """Raw text splits: strings and labels."""

    texts: dict[str, list[str]]
    labels: dict[str, Tensor]
    num_classes: int


@functools.lru_cache(maxsize=4)
def _text_data(dataset: str, data_dir: str | None) -> TextData:
    loaded = loader(dataset)(data_dir)
    pool_texts = loaded["train"]["text"]
    pool_labels = np.asarray(loaded["train"]["label"], dtype=np.int64)
    texts, labels = {}, {}
    for name, idx in carve_validation(len(pool_texts)).items():
        texts[name] = [pool_texts[i] for i in idx]
        labels[name] = torch.from_numpy(pool_labels[idx])
    texts["test"] = list(loaded["test"]["text"])
    labels["test"] = torch.from_numpy(np.asarray(loaded["test"]["label"], dtype=np.int64))
    return TextData(texts, labels, loaded["train"].features["label"].num_classes)


def text_data(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> TextData:
    return _text_data(dataset, _dir_key(data_dir))


SPECIAL_WORDPIECE = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
SPECIAL_BPE = ("<pad>", "<|endoftext|>")


def _texts_digest(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode("utf-8", errors="replace"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(
    texts: Sequence[str], vocab_size: int, kind: str = "wordpiece", name: str = "corpus"
) -> PreTrainedTokenizerFast:
    """A WordPiece (BERT-style, lower-cased) or byte-level BPE (GPT-2-style) tokenizer trained on ``texts``.

    Cached on disk by the texts' digest, so every task over the same training split reuses one file.
    Special ids are fixed: WordPiece ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``; BPE ``<pad>=0 <|endoftext|>=1``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in ("wordpiece", "bpe"):
        raise ValueError(f"tokenizer kind must be 'wordpiece' or 'bpe', got {kind=}")
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be at least 300 (byte alphabet plus specials), got {vocab_size=}")
    path = cache_root() / "tokenizers" / f"{name}-{kind}-{vocab_size}-{_texts_digest(texts)}.json"
    if path.exists():
        tokenizer = Tokenizer.from_file(str(path))
    else:
        if kind == "wordpiece":
            tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
            tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
            tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
            tokenizer.decoder = decoders.WordPiece()
            trainer: Any = trainers.WordPieceTrainer(
                vocab_size=vocab_size, special_tokens=list(SPECIAL_WORDPIECE)
            )
        else:
            tokenizer = Tokenizer(models.BPE())
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
            tokenizer.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=list(SPECIAL_BPE),
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            )
        tokenizer.train_from_iterator(texts, trainer, length=len(texts))
        if kind == "wordpiece":
            cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
            tokenizer.post_processor = processors.TemplateProcessing(
                single="[CLS] $A [SEP]",
                pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tokenizer.save(str(tmp))
        tmp.replace(path)
    if kind == "wordpiece":
        return PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def pretrained_tokenizer(model_path: str | Path) -> PreTrainedTokenizerFast:
    """The fast tokenizer saved with a checkpoint folder (or a packaged model such as ``minilm``)."""
    from transformers import AutoTokenizer

    from metalr.tasks.models.text import resolve_model_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(model_path)), use_fast=True)
    except (OSError, ValueError) as err:
        raise DatasetError(f"cannot load the tokenizer of {model_path}: {err}") from None
    if not tokenizer.is_fast:
        raise DatasetError(f"the tokenizer of {model_path} is not a fast tokenizer; offsets (QA) need one")
    return cast("PreTrainedTokenizerFast", tokenizer)


@functools.lru_cache(maxsize=8)
def _dataset_tokenizer(
    dataset: str, data_dir: str | None, vocab_size: int, kind: str, model_path: str | None
) -> PreTrainedTokenizerFast:
    if model_path is not None:
        return pretrained_tokenizer(model_path)
    if dataset == "squad":
        rows = squad_rows(dataset, data_dir)
        texts = sorted(set(rows.contexts["train"])) + rows.questions["train"]
    else:
        texts = text_data(dataset, data_dir).texts["train"]
    return train_tokenizer(texts, vocab_size, kind, dataset)


def dataset_tokenizer(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    vocab_size: int,
    kind: str = "wordpiece",
    model_path: str | None = None,
) -> PreTrainedTokenizerFast:
    """The pretrained model's tokenizer when ``model_path`` is given, else one trained on ``train`` only."""
    return _dataset_tokenizer(dataset, _dir_key(data_dir), vocab_size, kind, model_path)


def encode(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str], max_length: int) -> dict[str, Tensor]:
    """``input_ids``/``attention_mask``, truncated to ``max_length`` and padded to the split's longest."""
    encoded = tokenizer(
        list(texts), max_length=max_length, truncation=True, padding="longest", return_tensors="pt"
    )
    return {
        "input_ids": encoded["input_ids"].long(),
        "attention_mask": encoded["attention_mask"].to(torch.int8),
    }


@functools.lru_cache(maxsize=8)
def _text_splits(
    dataset: str, data_dir: str | None, vocab_size: int, max_length: int, model_path: str | None
) -> dict[str, dict[str, Tensor]]:
    data = _text_data(dataset, data_dir)
    tokenizer = _dataset_tokenizer(dataset, data_dir, vocab_size, "wordpiece", model_path)
    return {
        name: {**encode(tokenizer, data.texts[name], max_length), "y": data.labels[name]}
        for name in data.texts
    }


def text_classification_splits(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    vocab_size: int,
    max_length: int,
    model_path: str | None = None,
) -> dict[str, dict[str, Tensor]]:
    """Tokenised text-classification splits: ``input_ids``, ``attention_mask`` (int8), ``y``."""
    return _text_splits(dataset, _dir_key(data_dir), vocab_size, max_length, model_path)


@functools.lru_cache(maxsize=4)
def _lm_splits(
    dataset: str, data_dir: str | None, vocab_size: int, block: int
) -> dict[str, dict[str, Tensor]]:
    data = _text_data(dataset, data_dir)
    tokenizer = _dataset_tokenizer(dataset, data_dir, vocab_size, "bpe", None)
    eos = tokenizer.eos_token_id
    out = {}
    for name, texts in data.texts.items():
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        # Documents are joined with end-of-text separators and cut into equal blocks (GPT-2's recipe):
        # no padding, so the mean token loss of a split is exactly its log-perplexity.
        stream = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
        usable = (len(stream) // block) * block
        if usable == 0:
            raise DatasetError(
                f"{dataset}: split {name} has {len(stream)} tokens, fewer than one block of {block}"
            )
        out[name] = {"input_ids": torch.from_numpy(stream[:usable].reshape(-1, block).copy())}
    return out


def language_model_splits(
    dataset: str, data_dir: str | os.PathLike[str] | None, vocab_size: int, block: int
) -> dict[str, dict[str, Tensor]]:
    """Blocks of ``block`` byte-level BPE tokens of a text dataset's reviews/sentences (labels unused)."""
    return _lm_splits(dataset, _dir_key(data_dir), vocab_size, block)


# ----------------------------------------------------------------------------------------------------------
# SQuAD


@dataclass(frozen=True)
class SquadRows:
    contexts: dict[str, list[str]]
    questions: dict[str, list[str]]
    answers: dict[str, list[list[str]]]
    answer_starts: dict[str, list[list[int]]]


@functools.lru_cache(maxsize=2)
def _squad_rows(dataset: str, data_dir: str | None) -> SquadRows:
    loaded = loader(dataset)(data_dir)
    pool = loaded["train"]
    carved = carve_validation(len(pool), groups=pool["article"])
    parts: dict[str, Any] = {
        **{name: pool.select(idx) for name, idx in carved.items()},
        "test": loaded["test"],
    }
    return SquadRows(
        contexts={n: list(d["context"]) for n, d in parts.items()},
        questions={n: list(d["question"]) for n, d in parts.items()},
        answers={n: [list(a["text"]) for a in d["answers"]] for n, d in parts.items()},
        answer_starts={n: [list(a["answer_start"]) for a in d["answers"]] for n, d in parts.items()},
    )


def squad_rows(dataset: str, data_dir: str | None) -> SquadRows:
    return _squad_rows(dataset, data_dir)


@dataclass(frozen=True)
class QAData:
    """Tokenised QA splits plus what scoring needs: each row's ``example_id`` indexes ``contexts``/``answers``.

    Columns: ``input_ids``, ``attention_mask``, ``token_type_ids``, ``start``/``end`` (gold token positions;
    0, the first token, when the answer was truncated away), ``offsets`` (character span of each context
    token, -1 elsewhere) and ``example_id``.
    """

    splits: dict[str, dict[str, Tensor]]
    contexts: list[str]
    answers: list[list[str]]


@functools.lru_cache(maxsize=4)
def _qa_data(
    dataset: str, data_dir: str | None, vocab_size: int, max_length: int, model_path: str | None
) -> QAData:
    rows = _squad_rows(dataset, data_dir)
    tokenizer = _dataset_tokenizer(dataset, data_dir, vocab_size, "wordpiece", model_path)
    contexts: list[str] = []
    answers: list[list[str]] = []
    splits = {}
    for name in rows.contexts:
        encoded = tokenizer(
            rows.questions[name], rows.contexts[name], max_length=max_length, truncation="only_second",
            padding="longest", return_offsets_mapping=True,
        )  # fmt: skip
        n, length = len(encoded["input_ids"]), len(encoded["input_ids"][0])
        offsets = np.full((n, length, 2), -1, dtype=np.int32)
        start = np.zeros(n, dtype=np.int64)
        end = np.zeros(n, dtype=np.int64)
        for i in range(n):
            sequence_ids = encoded.sequence_ids(i)
            context_tokens = [t for t, s in enumerate(sequence_ids) if s == 1]
            for t in context_tokens:
                offsets[i, t] = encoded["offset_mapping"][i][t]
            answer_start = rows.answer_starts[name][i][0]
            answer_end = answer_start + len(rows.answers[name][i][0])
            inside = [
                t for t in context_tokens if offsets[i, t, 0] < answer_end and offsets[i, t, 1] > answer_start
            ]
            if inside:
                start[i], end[i] = inside[0], inside[-1]
        first_id = len(contexts)
        contexts.extend(rows.contexts[name])
        answers.extend(rows.answers[name])
        token_types = encoded.get("token_type_ids") or [[0] * length for _ in range(n)]
        splits[name] = {
            "input_ids": torch.tensor(encoded["input_ids"], dtype=torch.long),
            "attention_mask": torch.tensor(encoded["attention_mask"], dtype=torch.int8),
            "token_type_ids": torch.tensor(token_types, dtype=torch.long),
            "start": torch.from_numpy(start),
            "end": torch.from_numpy(end),
            "offsets": torch.from_numpy(offsets),
            "example_id": torch.arange(first_id, first_id + n),
        }
    return QAData(splits, contexts, answers)


def qa_data(
    dataset: str,
    data_dir: str | os.PathLike[str] | None,
    vocab_size: int,
    max_length: int,
    model_path: str | None = None,
) -> QAData:
    return _qa_data(dataset, _dir_key(data_dir), vocab_size, max_length, model_path)


# ----------------------------------------------------------------------------------------------------------
# Tabular


@dataclass(frozen=True)
class TabularData:
    """Encoded features (float32, standardised with ``train`` statistics) and labels; ``feature_names``."""

    splits: dict[str, dict[str, Tensor]]
    feature_names: tuple[str, ...]


def _titanic_frame(frame: Any) -> Any:
    import pandas as pd

    title = frame["Name"].astype("string").str.extract(r",\s*([^.]+)\.")[0].fillna("Rare")
    title = title.replace({"Mlle": "Miss", "Ms": "Miss", "Mme": "Mrs"})
    title = title.where(title.isin(["Mr", "Mrs", "Miss", "Master"]), "Rare")
    return pd.DataFrame(
        {
            "Pclass": frame["Pclass"].astype("string"),
            "Sex": frame["Sex"].astype("string"),
            "Embarked": frame["Embarked"].astype("string").fillna("missing"),
            "Title": title,
            "Age": pd.to_numeric(frame["Age"], errors="coerce"),
            "SibSp": pd.to_numeric(frame["SibSp"], errors="coerce"),
            "Parch": pd.to_numeric(frame["Parch"], errors="coerce"),
            "Fare": np.log1p(pd.to_numeric(frame["Fare"], errors="coerce")),
            "HasCabin": frame["Cabin"].notna().astype("float64"),
        }
    )


def _adult_frame(frame: Any) -> Any:
    from metalr.tasks.datasets.tabular import ADULT_COLUMNS, ADULT_NUMERIC

    out = frame[[c for c in ADULT_COLUMNS if c != "income"]].copy()
    for column in ("capital_gain", "capital_loss"):  # heavy-tailed: mostly 0, up to 99,999
        out[column] = np.log1p(out[column].astype("float64"))
    for column in out.columns:
        if column not in ADULT_NUMERIC:
            out[column] = out[column].astype("string").fillna("missing")
    return out


def encode_tabular(
    frames: dict[str, Any], numeric_missing_indicator: bool = True
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """One-hot categoricals (categories seen in ``train``), standardised numerics with median imputation
    and a missing indicator; every statistic comes from ``frames["train"]``."""
    train = frames["train"]
    numeric = [c for c in train.columns if train[c].dtype.kind in "fi"]
    categorical = [c for c in train.columns if c not in numeric]
    names: list[str] = []
    parts: dict[str, list[np.ndarray]] = {k: [] for k in frames}
    for column in numeric:
        values = train[column].astype("float64")
        median = float(values.median()) if values.notna().any() else 0.0
        filled = values.fillna(median)
        mean, std = float(filled.mean()), float(filled.std()) or 1.0
        names.append(column)
        for split, frame in frames.items():
            parts[split].append(
                ((frame[column].astype("float64").fillna(median) - mean) / std).to_numpy()[:, None]
            )
        if numeric_missing_indicator and values.isna().any():
            names.append(f"{column}_missing")
            for split, frame in frames.items():
                parts[split].append(frame[column].isna().to_numpy(dtype=np.float64)[:, None])
    for column in categorical:
        categories = sorted(train[column].dropna().unique().tolist())
        names.extend(f"{column}={c}" for c in categories)
        for split, frame in frames.items():
            values = frame[column].to_numpy()
            parts[split].append(np.stack([values == c for c in categories], axis=1).astype(np.float64))
    return {split: np.concatenate(p, axis=1).astype(np.float32) for split, p in parts.items()}, tuple(names)


@functools.lru_cache(maxsize=4)
def _tabular_data(dataset: str, data_dir: str | None) -> TabularData:
    loaded = loader(dataset)(data_dir)
    pool = loaded["train"].to_pandas()
    test = loaded["test"].to_pandas()
    to_features = {"titanic": _titanic_frame, "adult": _adult_frame}.get(dataset)
    if to_features is None:
        raise DatasetError(f"{dataset!r} is not a tabular dataset; expected 'titanic' or 'adult'")
    carved = carve_validation(len(pool))
    frames = {name: to_features(pool.iloc[idx].reset_index(drop=True)) for name, idx in carved.items()}
    frames["test"] = to_features(test)
    features, names = encode_tabular(frames)
    labels = {name: pool["label"].to_numpy()[idx] for name, idx in carved.items()}
    labels["test"] = test["label"].to_numpy()
    splits = {
        name: {"x": torch.from_numpy(features[name]), "y": torch.from_numpy(labels[name].astype(np.int64))}
        for name in frames
    }
    return TabularData(splits, names)


def tabular_data(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> TabularData:
    return _tabular_data(dataset, _dir_key(data_dir))


def subset(columns: dict[str, Tensor], count: int | None, seed: int) -> dict[str, Tensor]:
    """A seeded random subset of ``count`` rows (all rows when ``count`` is None or too large)."""
    size = next(iter(columns.values())).shape[0]
    if count is None or count >= size:
        return columns
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[: max(1, count)]
    idx = idx.sort().values
    return {k: v[idx] for k, v in columns.items()}


def prefix(columns: dict[str, Tensor], count: int | None) -> dict[str, Tensor]:
    """The first ``count`` rows (splits are stored in a fixed shuffled order, so a prefix is a fixed sample)."""
    if count is None:
        return columns
    return {k: v[: max(1, count)] for k, v in columns.items()}


def clear_caches() -> None:
    """Drop every in-process cache (tests use it after rewriting fixture files)."""
    for cached in (
        _image_data,
        _text_data,
        _dataset_tokenizer,
        _text_splits,
        _lm_splits,
        _squad_rows,
        _qa_data,
        _tabular_data,
    ):
        cached.cache_clear()
