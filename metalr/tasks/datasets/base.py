"""Shared machinery of the dataset loaders: where files are looked for, the Arrow cache, the hub fallback.

Every loader returns a :class:`datasets.DatasetDict` with exactly two splits, ``train`` and ``test``
(``test`` is the labelled evaluation split the dataset's authors publish; where there is none, the loader
carves one with a fixed seed and says so in its docstring). Turning rows into tensors, carving
``inner_valid``/``outer_valid`` from ``train`` and tokenising happen in :mod:`metalr.tasks.datasets.tensors`.

Resolution order, per dataset:

1. the data directory (``data_dir`` argument, else ``$METALR_DATA_DIR``) holding the *original
   distribution files*, read with ``datasets`` and cached as Arrow under ``$METALR_CACHE_DIR``
   (default ``~/.cache/metalr``), keyed by the files' names, sizes and modification times;
2. the Hugging Face hub id, only when the directory lacks the files and neither ``HF_HUB_OFFLINE`` nor
   ``HF_DATASETS_OFFLINE`` is set; a short connection probe runs first so a machine without network fails
   in seconds instead of hanging in retries;
3. otherwise a :class:`DatasetError` naming the dataset, the directories searched and the files expected.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # `datasets` is an optional extra: imported inside functions only
    from datasets import DatasetDict

DATA_DIR_ENV = "METALR_DATA_DIR"
CACHE_DIR_ENV = "METALR_CACHE_DIR"
# Bumped whenever a loader changes what it writes, so stale Arrow caches are never read.
CACHE_VERSION = 1
_HUB_HOST = ("huggingface.co", 443)
_PROBE_TIMEOUT_S = 5.0


class DatasetError(ValueError):
    """A dataset cannot be loaded: files missing or malformed, or the hub unreachable."""


@dataclass(frozen=True)
class FileLayout:
    """One accepted on-disk layout of a dataset: the files that must all exist in one folder.

    Attributes:
        files: relative paths that must all be present (a folder name counts if it exists as a folder).
        description: how the error message names this layout.
    """

    files: tuple[str, ...]
    description: str = ""

    def describe(self) -> str:
        return " + ".join(self.files) + (f" ({self.description})" if self.description else "")


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """``data_dir`` if given, else ``$METALR_DATA_DIR``, else None (no local files)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen).expanduser() if chosen else None


def cache_root() -> Path:
    """Where Arrow caches and trained tokenizers live (``$METALR_CACHE_DIR`` or ``~/.cache/metalr``)."""
    root = os.environ.get(CACHE_DIR_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "metalr"


def hf_offline() -> bool:
    """True when the Hugging Face offline flags forbid network access."""
    return any(
        os.environ.get(flag, "").strip().lower() in {"1", "true", "yes", "on"}
        for flag in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def search_dirs(data_dir: Path, folder_names: Sequence[str], search_root: bool = True) -> list[Path]:
    """Folders to look in: ``data_dir/<name>`` for each conventional folder name, then ``data_dir`` itself."""
    return [data_dir / name for name in folder_names] + ([data_dir] if search_root else [])


def find_layout(
    data_dir: Path | None,
    folder_names: Sequence[str],
    layouts: Sequence[FileLayout],
    search_root: bool = True,
) -> tuple[Path, FileLayout] | None:
    """The first (folder, layout) whose files all exist, or None."""
    if data_dir is None:
        return None
    for folder in search_dirs(data_dir, folder_names, search_root):
        for layout in layouts:
            if all((folder / name).exists() for name in layout.files):
                return folder, layout
    return None


def missing_files_error(
    name: str,
    data_dir: Path | None,
    folder_names: Sequence[str],
    layouts: Sequence[FileLayout],
    reason: str,
    search_root: bool = True,
) -> DatasetError:
    searched = (
        ", ".join(str(d) for d in search_dirs(data_dir, folder_names, search_root))
        if data_dir
        else f"no data directory (pass data_dir= or set ${DATA_DIR_ENV})"
    )
    expected = " | ".join(layout.describe() for layout in layouts)
    # A half-copied folder is the common case: name what is there and what is missing.
    partial = []
    for folder in search_dirs(data_dir, folder_names, search_root) if data_dir else []:
        for layout in layouts:
            present = [f for f in layout.files if (folder / f).exists()]
            if present:
                missing = [f for f in layout.files if f not in present]
                partial.append(f"{folder} has {present} but lacks {missing}")
    found = f"; {'; '.join(partial)}" if partial else ""
    return DatasetError(
        f"{name}: dataset files not found; searched: {searched}; expected one of: {expected}{found}; {reason}"
    )


def malformed(name: str, path: Path, problem: str) -> DatasetError:
    return DatasetError(f"{name}: malformed file {path}: {problem}")


def fingerprint(paths: Sequence[Path]) -> str:
    """Cheap cache key of input files: names, sizes and modification times (not contents)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for path in sorted(paths):
        if path.is_dir():
            entries = sorted(p for p in path.rglob("*") if p.is_file())
            h.update(f"{path.name}:{len(entries)}:{path.stat().st_mtime_ns}".encode())
        else:
            stat = path.stat()
            h.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def cached_arrow(name: str, inputs: Sequence[Path], build: Callable[[], DatasetDict]) -> DatasetDict:
    """Load ``build()``'s result from the Arrow cache, building and saving it on a miss.

    The write goes to a temporary folder renamed into place, so a crash never leaves a half cache.
    """
    import datasets

    target = cache_root() / "arrow" / f"{name}-{fingerprint(inputs)}"
    if (target / "dataset_dict.json").exists():
        try:
            return datasets.load_from_disk(str(target))
        except (OSError, ValueError):  # damaged cache: rebuild it below
            pass
    built = build()
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        built.save_to_disk(str(tmp))
        if target.exists():  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.replace(target)
    except OSError:  # a read-only cache only costs the re-parse next time
        return built
    return datasets.load_from_disk(str(target))


def hub_reachable(timeout_s: float = _PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection(_HUB_HOST, timeout=timeout_s):
            return True
    except OSError:
        return False


def load_from_hub(name: str, hub_id: str, config: str | None, not_local: DatasetError) -> DatasetDict:
    """Download ``hub_id`` through ``datasets``, or raise ``not_local`` extended with why the hub failed."""
    if hf_offline():
        raise DatasetError(
            f"{not_local}; the hub id {hub_id!r} was not tried because HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set"
        )
    if not hub_reachable():
        raise DatasetError(
            f"{not_local}; the hub id {hub_id!r} was not tried: {_HUB_HOST[0]} is unreachable (no network?)"
        )
    # Bound every HTTP wait, so a flaky network ends in an error and never in a hang.
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    import datasets

    try:
        loaded = datasets.load_dataset(hub_id, config, cache_dir=str(cache_root() / "hf"))
    except Exception as err:  # network, auth, missing repo: all end as one clear error
        raise DatasetError(
            f"{not_local}; downloading {hub_id!r} failed: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(loaded, datasets.DatasetDict):
        raise DatasetError(
            f"{name}: hub id {hub_id!r} returned {type(loaded).__name__}, expected a DatasetDict"
        )
    return loaded


@dataclass(frozen=True)
class LoaderSpec:
    """How one dataset is found: conventional folder names, accepted layouts, hub id.

    Attributes:
        name: dataset name used in errors and cache keys.
        folder_names: sub-folders of the data directory searched before the directory itself.
        layouts: accepted sets of original files.
        hub_id: Hugging Face dataset id for the online fallback (None: local files only).
        hub_config: configuration name of ``hub_id`` (``sst2`` of ``glue``).
        search_root: also look in the data directory itself (off where file names are ambiguous:
            Fashion-MNIST ships under MNIST's file names).
    """

    name: str
    folder_names: tuple[str, ...]
    layouts: tuple[FileLayout, ...]
    hub_id: str | None = None
    hub_config: str | None = None
    search_root: bool = True


def load_with_fallback(
    spec: LoaderSpec,
    data_dir: str | os.PathLike[str] | None,
    read_local: Callable[[Path, FileLayout], DatasetDict],
    normalise_hub: Callable[[DatasetDict], DatasetDict] | None = None,
) -> DatasetDict:
    """Local files first, then the hub (see the module docstring)."""
    directory = resolve_data_dir(data_dir)
    found = find_layout(directory, spec.folder_names, spec.layouts, spec.search_root)
    if found is not None:
        return read_local(*found)
    reason = "no hub id to fall back to" if spec.hub_id is None else "falling back to the hub"
    not_local = missing_files_error(
        spec.name, directory, spec.folder_names, spec.layouts, reason, spec.search_root
    )
    if spec.hub_id is None:
        raise not_local
    loaded = load_from_hub(spec.name, spec.hub_id, spec.hub_config, not_local)
    return normalise_hub(loaded) if normalise_hub is not None else loaded


def require_columns(name: str, path: Path, columns: Sequence[str], expected: Sequence[str]) -> None:
    missing = [c for c in expected if c not in columns]
    if missing:
        raise malformed(
            name, path, f"missing columns {missing}; found {list(columns)}, expected {list(expected)}"
        )


def check_field_counts(
    name: str,
    path: Path,
    expected: int,
    delimiter: str = ",",
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_MINIMAL,
) -> None:
    """Every non-blank line has ``expected`` fields (lines starting with ``|`` are adult.test's comment).

    pandas pads short rows with missing values (or drops them), so without this a file cut off in
    the middle of a line would load as a shorter, valid-looking one.
    """
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for line, fields in enumerate(csv.reader(handle, delimiter=delimiter, quoting=quoting), start=1):
                if fields and not fields[0].startswith("|") and len(fields) != expected:
                    raise malformed(
                        name,
                        path,
                        f"line {line} has {len(fields)} fields, expected {expected} (truncated or not the original file?)",
                    )
    except (UnicodeDecodeError, csv.Error) as err:
        raise malformed(name, path, f"cannot parse as CSV ({type(err).__name__}: {err})") from None
