"""Tasks: specs, built tasks, families and their registry."""

from metalr.tasks.base import SPLITS, BatchStream, SamplingConfig, Task, TaskFamily, TaskSpec
from metalr.tasks.registry import build_task, create_task_family, list_task_families, register_task_family

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
    "register_task_family",
]
