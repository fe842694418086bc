"""Where the files metalr ships live: task suites, recipes, evaluation suites and pretrained controllers.

They are kept in the repository's top-level ``tasks/``, ``meta_train/``, ``evaluate/`` and ``checkpoints/``
folders (configuration, not code). The wheel installs them as package data under ``metalr/_shipped/``
(``pyproject.toml`` maps each folder there: ``tasks`` and ``evaluate`` are PyPI package names, so nothing may
be installed under those top-level names). This module is the one place that knows both layouts:

* installed (wheel): ``importlib.resources.files("metalr") / "_shipped" / KIND``;
* source checkout (editable install or ``PYTHONPATH``): the top-level folder beside the package. An editable
  install cannot expose a data folder inside a regular package (setuptools' editable finder does not map
  nested namespaces), so the checkout is found directly; it is recognised by its ``pyproject.toml``, never
  by a bare folder name that another installed package might own.

``$METALR_CHECKPOINTS`` replaces the folder of named controllers.

Example:
    >>> resolve_shipped("meta_train", "demo-quick")       # doctest: +SKIP
    PosixPath('.../meta_train/demo-quick.yaml')
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

# kind -> (file suffix, what a file of that kind is called in messages)
KINDS: dict[str, tuple[str, str]] = {
    "tasks": (".yaml", "task suite"),
    "meta_train": (".yaml", "meta-training recipe"),
    "evaluate": (".yaml", "evaluation suite"),
    "checkpoints": (".safetensors", "controller checkpoint"),
}
CHECKPOINTS_ENV = "METALR_CHECKPOINTS"


def source_checkout() -> Path | None:
    """The repository root when metalr is imported from a source checkout, else ``None``."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def shipped_dir(kind: str) -> Path:
    """The folder holding the shipped files of ``kind`` (one of :data:`KINDS`).

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown kind of shipped file {kind!r}; expected one of {sorted(KINDS)}")
    if kind == "checkpoints" and os.environ.get(CHECKPOINTS_ENV):
        return Path(os.environ[CHECKPOINTS_ENV])
    # A regular package on disk: files() is a pathlib.Path (pip always unpacks wheels).
    packaged = Path(str(files("metalr"))) / "_shipped" / kind
    if packaged.is_dir():
        return packaged
    checkout = source_checkout()
    return checkout / kind if checkout is not None else packaged


def list_shipped(kind: str) -> list[str]:
    """Names (file stems) of the shipped files of ``kind``, sorted."""
    directory = shipped_dir(kind)
    suffix = KINDS[kind][0]
    return sorted(p.stem for p in directory.glob(f"*{suffix}")) if directory.is_dir() else []


def resolve_shipped(
    kind: str, path_or_name: str | os.PathLike[str], error: type[Exception] = FileNotFoundError
) -> Path:
    """A path to an existing file (it wins), else the shipped file of ``kind`` with that name.

    Args:
        kind: one of :data:`KINDS`.
        path_or_name: a file path, or a shipped name without its suffix (``"embedded"``, ``"demo-quick"``).
        error: the exception class raised when neither exists (the caller's user-error type).

    Raises:
        error: with a one-line message listing the shipped names of ``kind``.
    """
    directory = shipped_dir(kind)
    suffix, what = KINDS[kind]
    candidate = Path(path_or_name)
    if candidate.is_file():
        return candidate
    name = str(path_or_name)
    # Only a bare name is looked up, so "../x" can never reach outside the shipped folder.
    if name and candidate.name == name and not name.startswith("."):
        named = directory / f"{name}{suffix}"
        if named.is_file():
            return named
    shipped = list_shipped(kind)
    hint = f"; names are looked up in {directory}, which ${CHECKPOINTS_ENV} overrides" if kind == "checkpoints" else ""
    raise error(
        f"no {what} at {name!r}: not a file, and not a shipped name "
        f"(shipped: {', '.join(shipped) if shipped else 'none'}{hint})"
    )
