"""Every LR method the evaluation harness can run, behind one interface (see ``methods.base``).

Importing this package registers all methods.
"""

from metalr.methods import adaptive, learned, literature, schedules  # noqa: F401  (registration)
from metalr.methods.base import Method, MethodContext, MethodRun, create_method, list_methods, register_method

__all__ = ["Method", "MethodContext", "MethodRun", "create_method", "list_methods", "register_method"]
