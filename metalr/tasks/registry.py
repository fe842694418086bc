"""Registry of task families: ``@register_task_family``, ``create_task_family``, ``list_task_families``.

A leaf (timm's pattern): it imports no family. ``metalr/tasks/__init__.py`` imports the family modules,
which register themselves, so the registry is complete once ``metalr.tasks`` (or anything under it) is
imported. :func:`load_suite` reads a task suite and checks every family it names against the registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import torch

from metalr.config import ConfigError, SuiteConfig, read_suite, resolve_suite_path
from metalr.tasks.augment import Augmentation, augment_task, unaugmented
from metalr.tasks.base import SamplingConfig, Task, TaskFamily, TaskSpec

_FAMILIES: dict[str, Callable[..., TaskFamily]] = {}
F = TypeVar("F", bound=Callable[..., TaskFamily])


def register_task_family(name: str) -> Callable[[F], F]:
    """Register a family factory under ``name`` (its keyword arguments are the suite-level overrides)."""

    def decorator(factory: F) -> F:
        if name in _FAMILIES:
            raise ValueError(f"task family {name!r} is registered twice")
        _FAMILIES[name] = factory
        return factory

    return decorator


def list_task_families() -> list[str]:
    return sorted(_FAMILIES)


def create_task_family(name: str, **overrides: Any) -> TaskFamily:
    """Instantiate a registered family; ``overrides`` set its sampling ranges (``steps=[100, 500]``, ...).

    Raises:
        KeyError: unknown name (the message lists the registered ones).
        ValueError: an override the family does not take.
    """
    if name not in _FAMILIES:
        raise KeyError(f"unknown task family {name!r}; registered families: {', '.join(sorted(_FAMILIES))}")
    sampling_fields = {f.name for f in dataclasses.fields(SamplingConfig)}
    sampling = {k: v for k, v in overrides.items() if k in sampling_fields}
    own = {k: v for k, v in overrides.items() if k not in sampling_fields}
    if sampling:
        for key in ("optimizers", "batch_sizes", "steps"):
            if key in sampling:
                sampling[key] = tuple(sampling[key])
        if "lr_ranges" in sampling:
            sampling["lr_ranges"] = {k: tuple(v) for k, v in dict(sampling["lr_ranges"]).items()}
        own["sampling"] = SamplingConfig(**sampling)
    try:
        family = _FAMILIES[name](**own)
    except TypeError as err:
        raise ValueError(
            f"task family {name!r} does not take {sorted(own)} ({err}); sampling overrides: {sorted(sampling_fields)}"
        ) from None
    _check_ranges(name, family, own)
    return family


def _check_ranges(name: str, family: Any, overrides: dict[str, Any]) -> None:
    """An override of a ``(low, high)`` range field must itself be a ``[low, high]`` pair with low <= high."""
    if not dataclasses.is_dataclass(family):
        return
    for f in dataclasses.fields(family):
        default = f.default
        is_range = isinstance(default, tuple) and len(default) == 2 and all(isinstance(v, (int, float)) for v in default)
        if not is_range or f.name not in overrides:
            continue
        value = overrides[f.name]
        if (
            not isinstance(value, (list, tuple))
            or len(value) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            or not value[0] <= value[1]
        ):
            raise ValueError(f"task family {name!r}: {f.name} must be a [low, high] pair with low <= high, got {value!r}")


def load_suite(name_or_path: str) -> SuiteConfig:
    """Read a task suite and check that every family it names exists and takes its overrides.

    Raises:
        ConfigError: the file, a key, an unknown family or a bad override (one line, naming it).
    """
    suite = read_suite(name_or_path)
    for entry in (*suite.meta_train, *suite.meta_valid, *suite.held_out):
        try:
            create_task_family(entry.family, **entry.overrides)
        except (KeyError, ValueError, TypeError) as err:
            raise ConfigError(f"{resolve_suite_path(name_or_path)}: {err.args[0] if err.args else err}") from None
    return suite


def build_task(spec: TaskSpec, device: str = "cpu") -> Task:
    """Build the task a spec describes (on ``device``), with the augmentation it carries applied."""
    task = create_task_family(spec.family).build(unaugmented(spec))
    task.spec = spec
    return augment_task(task, Augmentation.of(spec)).to(device)


class FamilyEntryLike(Protocol):
    """A suite's family entry (``metalr.config.FamilyEntry``): a family name plus its overrides."""

    @property
    def family(self) -> str: ...

    @property
    def overrides(self) -> Mapping[str, Any]: ...


def sample_specs(entries: Sequence[FamilyEntryLike], per_family: int, seed: int) -> list[TaskSpec]:
    """``per_family`` specs from each family, deterministic in ``seed`` (evaluation and validation sets).

    Shared by meta-validation and the evaluation harness, so both draw held-out tasks the same way.
    """
    specs = []
    for i, entry in enumerate(entries):
        family = create_task_family(entry.family, **entry.overrides)
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        specs += [family.sample(generator) for _ in range(per_family)]
    return specs
