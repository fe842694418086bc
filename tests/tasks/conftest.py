"""Fixtures for the real-dataset tests: offline Hugging Face, a private cache, the generated data files.

The offline flags are set at import time, before any test imports ``datasets`` (which reads them once).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("METALR_DATA_DIR", None)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    # Arrow caches and tokenizers go to a throw-away folder, never to the user's ~/.cache/metalr.
    cache = tmp_path_factory.mktemp("metalr-cache")
    previous = os.environ.get("METALR_CACHE_DIR")
    os.environ["METALR_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("METALR_CACHE_DIR", None)
    else:
        os.environ["METALR_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def _fresh_tensor_caches() -> Iterator[None]:
    # In-process caches are keyed by folder; tests that rewrite files in a tmp folder must not see stale rows.
    from metalr.tasks.datasets.tensors import clear_caches

    clear_caches()
    yield
    clear_caches()


@pytest.fixture
def fixture_dir() -> Path:
    """The committed fixtures (read-only by convention: copy before changing anything)."""
    return FIXTURES


@pytest.fixture
def data_copy(tmp_path: Path) -> Path:
    """A writable copy of the fixtures, for tests that delete or truncate files."""
    target = tmp_path / "data"
    shutil.copytree(FIXTURES, target)
    return target
