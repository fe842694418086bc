"""Tasks: specs, built tasks, families and their registry.

Importing this package registers every family: the family modules it imports register themselves with the
registry, which stays a leaf (it imports no family), so there is no import cycle.
"""

from metalr.tasks import embedded, real  # noqa: F401  (registration)
from metalr.tasks.base import SPLITS, BatchStream, SamplingConfig, Task, TaskFamily, TaskSpec
from metalr.tasks.registry import (
    build_task,
    create_task_family,
    list_task_families,
    load_suite,
    register_task_family,
)

__all__ = [
    "SPLITS",
    "BatchStream",
    "SamplingConfig",
    "Task",
    "TaskFamily",
    "TaskSpec",
    "build_task",
    "create_task_family",
    "list_task_families",
    "load_suite",
    "register_task_family",
]
