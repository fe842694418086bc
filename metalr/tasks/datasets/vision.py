"""Image datasets: MNIST and Fashion-MNIST (IDX ``.gz``), CIFAR-10 (python batches, folder or ``.tar.gz``).

Rows carry ``image`` (uint8, channels x height x width, as an ``Array3D``) and ``label`` (int64).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from metalr.tasks.datasets.base import (
    DatasetError,
    FileLayout,
    LoaderSpec,
    cached_arrow,
    load_with_fallback,
    malformed,
)

if TYPE_CHECKING:
    from datasets import DatasetDict

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_GZ = FileLayout(
    tuple(f"{f}.gz" for pair in _IDX_FILES.values() for f in pair), "IDX, gzipped as distributed"
)
_IDX_RAW = FileLayout(tuple(f for pair in _IDX_FILES.values() for f in pair), "IDX, decompressed")

MNIST = LoaderSpec("mnist", ("mnist", "MNIST"), (_IDX_GZ, _IDX_RAW), hub_id="mnist")
# Fashion-MNIST reuses MNIST's file names, so only its own folders are searched, never the root.
FASHION_MNIST = LoaderSpec(
    "fashion_mnist",
    ("fashion_mnist", "fashion-mnist", "FashionMNIST"),
    (_IDX_GZ, _IDX_RAW),
    hub_id="fashion_mnist",
    search_root=False,
)
_CIFAR_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6)) + ("test_batch",)
CIFAR10 = LoaderSpec(
    "cifar10",
    ("cifar10", "cifar-10", "CIFAR10"),
    (
        FileLayout(("cifar-10-batches-py",), "the extracted python-version folder"),
        FileLayout(("cifar-10-python.tar.gz",), "the python-version archive"),
        FileLayout(_CIFAR_BATCHES, "the python batches themselves"),
    ),
    hub_id="cifar10",
)


def read_idx(name: str, path: Path, expected_dims: int) -> np.ndarray:
    """Parse one IDX file (LeCun's format: magic ``0x0000 08 <ndim>``, big-endian sizes, uint8 data)."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as err:
        raise malformed(name, path, f"cannot decompress/read ({type(err).__name__}: {err})") from None
    if len(raw) < 4:
        raise malformed(name, path, f"{len(raw)} bytes, too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise malformed(
            name,
            path,
            f"IDX magic {raw[:4].hex()}, expected 000008{expected_dims:02x} (uint8, {expected_dims} dims)",
        )
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise malformed(
            name, path, f"{len(raw) - header} data bytes, header {dims} says {expected} (truncated?)"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _image_dataset(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> Any:
    from datasets import Array3D, ClassLabel, Dataset, Features

    features = Features(
        {"image": Array3D(images.shape[1:], "uint8"), "label": ClassLabel(names=list(classes))}
    )
    return Dataset.from_dict({"image": images, "label": labels.astype(np.int64)}, features=features)


def _read_idx_pair(
    spec: LoaderSpec, folder: Path, layout: FileLayout, classes: tuple[str, ...]
) -> DatasetDict:
    from datasets import DatasetDict

    suffix = ".gz" if layout is _IDX_GZ else ""
    out = {}
    for split, (image_file, label_file) in _IDX_FILES.items():
        images = read_idx(spec.name, folder / f"{image_file}{suffix}", 3)
        labels = read_idx(spec.name, folder / f"{label_file}{suffix}", 1)
        if len(images) != len(labels):
            raise malformed(
                spec.name, folder / f"{label_file}{suffix}", f"{len(labels)} labels for {len(images)} images"
            )
        if labels.size and labels.max() >= len(classes):
            raise malformed(
                spec.name,
                folder / f"{label_file}{suffix}",
                f"label {labels.max()} outside 0..{len(classes) - 1}",
            )
        out[split] = _image_dataset(images[:, None], labels, classes)
    return DatasetDict(out)


def _normalise_hub_images(image_column: str, classes: tuple[str, ...]) -> Any:
    def normalise(loaded: DatasetDict) -> DatasetDict:
        from datasets import DatasetDict

        out = {}
        for split in ("train", "test"):
            rows = loaded[split]
            images = np.stack([np.asarray(img, dtype=np.uint8) for img in rows[image_column]])
            images = images[:, None] if images.ndim == 3 else images.transpose(0, 3, 1, 2)
            out[split] = _image_dataset(images, np.asarray(rows["label"]), classes)
        return DatasetDict(out)

    return normalise


class _CifarUnpickler(pickle.Unpickler):
    """CIFAR-10's python batches are pickles; only the globals numpy arrays need may be resolved, so a
    tampered batch cannot run code (the same rule as loading checkpoints: never unpickle arbitrary objects)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: str | Path, payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(payload), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as err:  # any corruption of the pickle is the same user error
        raise malformed(
            "cifar10", Path(path), f"not a CIFAR-10 python batch ({type(err).__name__}: {err})"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise malformed(
            "cifar10",
            Path(path),
            f"data shape {data.shape} with {len(labels)} labels, expected (N, 3072) and N labels",
        )
    return data.reshape(-1, 3, 32, 32), labels


def _read_cifar(folder: Path, layout: FileLayout) -> DatasetDict:
    from datasets import DatasetDict

    payloads: dict[str, tuple[str, bytes]] = {}
    if layout.files == ("cifar-10-python.tar.gz",):
        archive = folder / layout.files[0]
        try:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    base = os.path.basename(member.name)
                    if member.isfile() and base in _CIFAR_BATCHES:
                        handle = tar.extractfile(member)
                        if handle is not None:
                            payloads[base] = (f"{archive}:{member.name}", handle.read())
        except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
            raise malformed("cifar10", archive, f"unreadable archive ({type(err).__name__}: {err})") from None
        missing = [b for b in _CIFAR_BATCHES if b not in payloads]
        if missing:
            raise malformed(
                "cifar10",
                archive,
                f"archive lacks {missing}; expected cifar-10-batches-py/{{{', '.join(_CIFAR_BATCHES)}}}",
            )
    else:
        batch_dir = folder / "cifar-10-batches-py" if layout.files == ("cifar-10-batches-py",) else folder
        missing = [b for b in _CIFAR_BATCHES if not (batch_dir / b).is_file()]
        if missing:
            raise DatasetError(f"cifar10: {batch_dir} lacks {missing}; expected {list(_CIFAR_BATCHES)}")
        payloads = {b: (str(batch_dir / b), (batch_dir / b).read_bytes()) for b in _CIFAR_BATCHES}
    train = [_read_cifar_batch(*payloads[b]) for b in _CIFAR_BATCHES[:-1]]
    test = _read_cifar_batch(*payloads["test_batch"])
    return DatasetDict(
        {
            "train": _image_dataset(
                np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), CIFAR10_CLASSES
            ),
            "test": _image_dataset(test[0], test[1], CIFAR10_CLASSES),
        }
    )


def _local(spec: LoaderSpec, read: Any) -> Any:
    def read_local(folder: Path, layout: FileLayout) -> DatasetDict:
        inputs = [folder / f for f in layout.files]
        return cached_arrow(spec.name, inputs, lambda: read(folder, layout))

    return read_local


def load_mnist(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """MNIST: 60,000 train + 10,000 test digits, 1x28x28."""
    return load_with_fallback(
        MNIST,
        data_dir,
        _local(MNIST, lambda f, lay: _read_idx_pair(MNIST, f, lay, MNIST_CLASSES)),
        _normalise_hub_images("image", MNIST_CLASSES),
    )


def load_fashion_mnist(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """Fashion-MNIST: 60,000 train + 10,000 test clothing images, 1x28x28, in MNIST's file format."""
    return load_with_fallback(
        FASHION_MNIST,
        data_dir,
        _local(FASHION_MNIST, lambda f, lay: _read_idx_pair(FASHION_MNIST, f, lay, FASHION_MNIST_CLASSES)),
        _normalise_hub_images("image", FASHION_MNIST_CLASSES),
    )


def load_cifar10(data_dir: str | os.PathLike[str] | None = None) -> DatasetDict:
    """CIFAR-10: 50,000 train + 10,000 test colour images, 3x32x32."""
    return load_with_fallback(
        CIFAR10, data_dir, _local(CIFAR10, _read_cifar), _normalise_hub_images("img", CIFAR10_CLASSES)
    )
