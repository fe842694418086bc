"""Loaders on generated fixtures in the original formats: contents, missing files, malformed files."""

from __future__ import annotations

import gzip
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metalr.tasks.datasets import LOADERS, SPECS, DatasetError, load_dataset, tensors
from metalr.tasks.datasets import base as dataset_base

# name -> (folder under the fixtures, train rows, test rows, columns)
EXPECTED = {
    "mnist": ("mnist", 60, 20, {"image", "label"}),
    "fashion_mnist": ("fashion_mnist", 60, 20, {"image", "label"}),
    "cifar10": ("cifar10", 50, 10, {"image", "label"}),
    "imdb": ("imdb", 24, 12, {"text", "label", "rating"}),
    "sst2": ("SST-2", 60, 12, {"text", "label"}),
    "ag_news": ("ag_news", 40, 12, {"text", "label"}),
    "squad": ("squad", 24, 24, {"id", "article", "title", "context", "question", "answers"}),
    "titanic": ("titanic", 48, 12, {"label", "Survived", "Name", "Age"}),
    "adult": ("adult", 60, 30, {"label", "age", "workclass", "income"}),
}
# name -> (file to damage, how): "truncate" keeps the first half of the bytes; "corrupt" rewrites it.
DAMAGE = {
    "mnist": ("mnist/train-images-idx3-ubyte.gz", "truncate"),
    "fashion_mnist": ("fashion_mnist/t10k-labels-idx1-ubyte.gz", "idx-header"),
    "cifar10": ("cifar10/cifar-10-python.tar.gz", "truncate"),
    "imdb": ("imdb/aclImdb_v1_labeled.tar.gz", "truncate"),
    "sst2": ("SST-2/dev.tsv", "truncate"),
    "ag_news": ("ag_news/train.csv", "truncate"),
    "squad": ("squad/dev-v1.1.json", "truncate"),
    "titanic": ("titanic/train.csv", "truncate"),
    "adult": ("adult/adult.test", "truncate"),
}


def _extract(tar: tarfile.TarFile, target: Path) -> None:
    # The "data" filter exists from Python 3.10.12 / 3.11.4 on; our own fixtures are safe either way.
    try:
        tar.extractall(target, filter="data")
    except TypeError:
        tar.extractall(target)


def test_every_dataset_has_a_fixture_and_damage_case() -> None:
    assert set(EXPECTED) == set(LOADERS) == set(DAMAGE)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_loader_reads_original_format(name: str, fixture_dir: Path) -> None:
    _, train_rows, test_rows, columns = EXPECTED[name]
    loaded = load_dataset(name, fixture_dir)
    assert set(loaded) == {"train", "test"}
    assert (loaded["train"].num_rows, loaded["test"].num_rows) == (train_rows, test_rows)
    assert columns <= set(loaded["train"].column_names)
    if "label" in columns:
        labels = set(loaded["train"]["label"]) | set(loaded["test"]["label"])
        assert min(labels) == 0 and len(labels) >= 2


def test_data_dir_from_environment(fixture_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METALR_DATA_DIR", str(fixture_dir))
    assert load_dataset("titanic")["train"].num_rows == 48


def test_idx_images_decode_exactly(fixture_dir: Path) -> None:
    loaded = load_dataset("mnist", fixture_dir)
    images = tensors._numpy_column(loaded["train"], "image")
    assert images.shape == (60, 1, 28, 28) and images.dtype == np.uint8
    with gzip.open(fixture_dir / "mnist" / "train-images-idx3-ubyte.gz") as handle:
        raw = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(60, 1, 28, 28)
    np.testing.assert_array_equal(images, raw)
    assert loaded["train"]["label"][:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_cifar_extracted_folder_and_archive_agree(fixture_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(fixture_dir / "cifar10" / "cifar-10-python.tar.gz") as tar:
        _extract(tar, tmp_path / "cifar10")
    from_folder = tensors._numpy_column(load_dataset("cifar10", tmp_path)["train"], "image")
    from_archive = tensors._numpy_column(load_dataset("cifar10", fixture_dir)["train"], "image")
    np.testing.assert_array_equal(from_folder, from_archive)
    assert from_folder.shape == (50, 3, 32, 32)


def test_cifar_refuses_pickles_that_run_code(data_copy: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("pwned",))

    folder = data_copy / "cifar10" / "cifar-10-batches-py"
    folder.mkdir()
    (data_copy / "cifar10" / "cifar-10-python.tar.gz").unlink()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": [0]}))
    with pytest.raises(DatasetError, match=r"cifar10: malformed file .*data_batch_1.*not allowed"):
        load_dataset("cifar10", data_copy)


def test_imdb_folder_layout_and_line_breaks(fixture_dir: Path, tmp_path: Path) -> None:
    with tarfile.open(fixture_dir / "imdb" / "aclImdb_v1_labeled.tar.gz") as tar:
        _extract(tar, tmp_path)
    loaded = load_dataset("imdb", tmp_path)  # tmp_path/aclImdb, found in the data directory itself
    assert loaded["train"].num_rows == 24
    assert not any("<br" in text for text in loaded["train"]["text"])
    assert set(loaded["train"]["rating"]) <= {1, 2, 3, 4, 7, 8, 9, 10}


def test_sst2_lowercase_folder_name_and_dev_as_test(fixture_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(fixture_dir / "SST-2", tmp_path / "sst2")
    loaded = load_dataset("sst2", tmp_path)
    assert loaded["test"].num_rows == 12  # dev.tsv, the labelled evaluation split
    assert all(not t.endswith(" ") for t in loaded["train"]["text"])


def test_ag_news_labels_shift_and_backslashes(fixture_dir: Path) -> None:
    loaded = load_dataset("ag_news", fixture_dir)
    assert sorted(set(loaded["train"]["label"])) == [0, 1, 2, 3]
    assert not any("\\" in t for t in loaded["train"]["text"])


def test_squad_dev_only_is_carved_by_article(data_copy: Path) -> None:
    (data_copy / "squad" / "train-v1.1.json").unlink()
    loaded = load_dataset("squad", data_copy)
    train_articles, test_articles = set(loaded["train"]["article"]), set(loaded["test"]["article"])
    assert train_articles and test_articles and not train_articles & test_articles
    assert loaded["train"].num_rows + loaded["test"].num_rows == 24
    row = loaded["test"][0]
    start, text = row["answers"]["answer_start"][0], row["answers"]["text"][0]
    assert row["context"][start : start + len(text)] == text


def test_adult_test_file_quirks(fixture_dir: Path) -> None:
    loaded = load_dataset("adult", fixture_dir)
    frame = loaded["test"].to_pandas()
    assert set(frame["label"]) <= {0, 1} and frame["workclass"].isna().any()  # "?" is missing


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_missing_files_error_names_dataset_directory_and_files(name: str, tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, tmp_path)
    message = str(info.value)
    assert message.startswith(f"{name}:") and str(tmp_path) in message and "expected" in message
    assert SPECS[name].layouts[0].files[0] in message
    if SPECS[name].hub_id is not None:
        assert "HF_HUB_OFFLINE" in message  # offline flags: the hub was not tried, and the error says so


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_malformed_file_error_names_the_file(name: str, data_copy: Path) -> None:
    relative, how = DAMAGE[name]
    path = data_copy / relative
    raw = path.read_bytes()
    if how == "truncate":
        # Cut a few bytes into a line: a cut at a line end looks like a shorter, valid file.
        cut = raw.rfind(b"\n", 0, len(raw) // 2) + 5
        path.write_bytes(raw[:cut])
    else:
        path.write_bytes(gzip.compress(b"\x00\x00\x08\x07" + raw[4:]))  # wrong dimension count
    with pytest.raises(DatasetError) as info:
        load_dataset(name, data_copy)
    message = str(info.value)
    assert message.startswith(f"{name}: malformed file")
    assert path.name in message or str(path.parent) in message


def test_missing_one_file_of_a_layout(data_copy: Path) -> None:
    (data_copy / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(
        DatasetError, match=r"mnist: dataset files not found.*lacks \['t10k-labels-idx1-ubyte.gz'\]"
    ):
        load_dataset("mnist", data_copy)


def test_unreachable_hub_fails_fast_with_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(dataset_base, "hub_reachable", lambda timeout_s=5.0: False)
    with pytest.raises(
        DatasetError,
        match=r"mnist: dataset files not found.*'mnist' was not tried: huggingface.co is unreachable",
    ):
        load_dataset("mnist", tmp_path)


def test_hub_download_error_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def fail(*args: object, **kwargs: object) -> None:
        raise ConnectionError("connection reset")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(dataset_base, "hub_reachable", lambda timeout_s=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DatasetError, match=r"downloading 'glue' failed: ConnectionError: connection reset"):
        load_dataset("sst2", tmp_path)


def test_hub_rows_are_normalised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    hub = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence": ["good", "bad"], "label": [1, 0], "idx": [0, 1]}
            ),
            "validation": datasets.Dataset.from_dict({"sentence": ["fine"], "label": [1], "idx": [0]}),
            "test": datasets.Dataset.from_dict({"sentence": ["?"], "label": [-1], "idx": [0]}),
        }
    )
    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.setattr(dataset_base, "hub_reachable", lambda timeout_s=5.0: True)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append(a) or hub)
    loaded = load_dataset("sst2", tmp_path)
    assert calls == [("glue", "sst2")]
    assert loaded["test"]["text"] == ["fine"] and loaded["train"].column_names == ["text", "label"]


def test_arrow_cache_is_reused(fixture_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from metalr.tasks.datasets import vision

    load_dataset("mnist", fixture_dir)
    monkeypatch.setattr(vision, "read_idx", lambda *a: pytest.fail("the Arrow cache should have been read"))
    assert load_dataset("mnist", fixture_dir)["train"].num_rows == 60


# ----------------------------------------------------------------------------------------------------------
# Task splits


def test_carved_validation_is_fixed_and_disjoint() -> None:
    first = tensors.carve_validation(1000)
    again = tensors.carve_validation(1000)
    for name in first:
        np.testing.assert_array_equal(first[name], again[name])
    together = np.concatenate(list(first.values()))
    assert len(together) == len(set(together.tolist())) == 1000
    assert len(first["inner_valid"]) == len(first["outer_valid"]) == 100
    assert len(tensors.carve_validation(200_000)["inner_valid"]) == tensors.VALID_CAP


def test_carving_by_group_keeps_groups_together() -> None:
    groups = [i // 7 for i in range(140)]
    carved = tensors.carve_validation(140, groups=groups)
    owner = {}
    for name, rows in carved.items():
        for row in rows:
            assert owner.setdefault(groups[row], name) == name


def test_image_data_keeps_test_untouched(fixture_dir: Path) -> None:
    data = tensors.image_data("mnist", fixture_dir)
    sizes = {k: len(v["y"]) for k, v in data.splits.items()}
    assert sizes == {"train": 48, "inner_valid": 6, "outer_valid": 6, "test": 20}
    assert data.splits["test"]["x"].dtype == torch.uint8
    assert torch.equal(data.splits["test"]["y"], torch.arange(20) % 10)
    assert 0 < data.mean[0] < 1 and data.std[0] > 0


def test_tokenizer_is_trained_on_train_and_cached(fixture_dir: Path) -> None:
    texts = tensors.text_data("sst2", fixture_dir).texts["train"]
    first = tensors.train_tokenizer(texts, 400, "wordpiece", "sst2")
    files = list((dataset_base.cache_root() / "tokenizers").glob("sst2-wordpiece-400-*.json"))
    assert len(files) == 1
    second = tensors.train_tokenizer(texts, 400, "wordpiece", "sst2")
    assert first.get_vocab() == second.get_vocab() and first.pad_token_id == 0
    encoded = tensors.encode(first, ["the film was great"], 16)
    assert encoded["input_ids"][0, 0] == first.cls_token_id


def test_text_splits_pad_and_truncate(fixture_dir: Path) -> None:
    splits = tensors.text_classification_splits("sst2", fixture_dir, 400, max_length=6)
    assert splits["train"]["input_ids"].shape[1] <= 6
    assert splits["test"]["y"].tolist() == [i % 2 for i in range(12)]


def test_language_model_blocks(fixture_dir: Path) -> None:
    splits = tensors.language_model_splits("imdb", fixture_dir, 400, block=16)
    assert splits["train"]["input_ids"].shape[1] == 16 and splits["test"]["input_ids"].shape[0] > 0


def test_qa_gold_spans_decode_to_answers(fixture_dir: Path) -> None:
    data = tensors.qa_data("squad", fixture_dir, 400, max_length=64)
    test = data.splits["test"]
    for row in range(len(test["start"])):
        start, end = int(test["start"][row]), int(test["end"][row])
        assert start > 0  # every fixture answer fits in 64 tokens
        begin, finish = int(test["offsets"][row, start, 0]), int(test["offsets"][row, end, 1])
        example = int(test["example_id"][row])
        assert data.contexts[example][begin:finish] in data.answers[example]


def test_tabular_encoding_uses_train_statistics(fixture_dir: Path) -> None:
    data = tensors.tabular_data("titanic", fixture_dir)
    train = data.splits["train"]["x"]
    assert torch.isfinite(train).all() and not torch.isnan(data.splits["test"]["x"]).any()
    age = data.feature_names.index("Age")
    assert abs(float(train[:, age].mean())) < 1e-5
    assert "Age_missing" in data.feature_names and "Title=Master" in data.feature_names
    adult = tensors.tabular_data("adult", fixture_dir)
    assert adult.splits["test"]["x"].shape[1] == len(adult.feature_names)
