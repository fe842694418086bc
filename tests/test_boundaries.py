"""Module boundaries of DESIGN.md ("Boundaries"), enforced by parsing every import in the package.

* An allowlist: each part of metalr (a top-level module or subpackage) may import only the parts listed
  for it, anywhere in the file (imports inside functions included: a lazy import still crosses the line).
* Subprocess checks: deploying a controller (``from metalr import LearnedLR``) and the evaluation harness
  (``import metalr.evaluation.harness``) load no ``metalr.meta`` module, not even through ``config``.
* No module-level import cycle anywhere in ``metalr/``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "metalr"
ROOT_PACKAGE = "metalr"  # the package itself (metalr/__init__.py: the public API)

# part -> the other parts it may import (imports within a part are always allowed). From DESIGN.md:
# features, schedules and controller import only torch and each other, in that order; deployment
# (scheduler) imports features, controller, checkpoint, never meta; meta imports features, controller,
# checkpoint, tasks; evaluation imports methods, tasks, checkpoint, scheduler, never meta; config is data
# and io a leaf, so every part may use them (besides features, schedules and controller, which need neither);
# cli imports everything and nothing imports it.
ALLOWED: dict[str, frozenset[str]] = {
    "features": frozenset(),
    "schedules": frozenset(),
    "controller": frozenset({"features", "schedules"}),
    "io": frozenset(),
    # where the shipped checkpoints, recipes and suites are (a checkout's folders or the wheel's package data)
    "shipped": frozenset(),
    "config": frozenset({"io", "shipped"}),
    # ROOT_PACKAGE: `metalr.__version__` for the provenance a checkpoint records; hub: `hf://` names (lazily)
    "checkpoint": frozenset({"features", "controller", "io", "shipped", "hub", ROOT_PACKAGE}),
    # the Hugging Face Hub: downloads go through the checkpoint's own validation
    "hub": frozenset({"checkpoint", ROOT_PACKAGE}),
    "scheduler": frozenset({"features", "controller", "checkpoint"}),
    "tasks": frozenset({"config", "io"}),
    "meta": frozenset({"features", "controller", "checkpoint", "tasks", "config", "io"}),
    # every LR method the harness runs: baseline schedules, the controller through LearnedLR, base optimizers
    "methods": frozenset({"schedules", "features", "controller", "checkpoint", "scheduler", "tasks", "config", "io"}),
    "evaluation": frozenset({"methods", "tasks", "checkpoint", "scheduler", "config", "io"}),
    "integrations": frozenset({"features", "controller", "checkpoint", "scheduler"}),
    ROOT_PACKAGE: frozenset({"features", "controller", "checkpoint", "scheduler", "hub"}),
    # `metalr demo`: the CLI's main job, wired from the entry points of both halves
    "demo": frozenset({"config", "meta", "evaluation", "tasks", "checkpoint", "io", "shipped"}),
}
SOURCES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path) for path in SOURCES}
PARTS = {name.split(".")[1] if "." in name else ROOT_PACKAGE for name in MODULES}


def part_of(module: str) -> str:
    return module.split(".")[1] if "." in module else ROOT_PACKAGE


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` reads from (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    is_package = any(module_name(p) == module and p.name == "__init__.py" for p in SOURCES)
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imported(module: str, node: ast.AST) -> Iterator[str]:
    """The metalr modules one import statement loads: ``from a import b`` is ``a.b`` where that is a module."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name.split(".")[0] == ROOT_PACKAGE)
    elif isinstance(node, ast.ImportFrom):
        source = _resolve(module, node)
        if source.split(".")[0] != ROOT_PACKAGE:
            return
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            yield submodule if submodule in MODULES else source


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def all_imports(tree: ast.Module, module: str) -> list[str]:
    """Every metalr import in a module, at any depth (functions, methods, ``TYPE_CHECKING`` blocks)."""
    return [name for node in ast.walk(tree) for name in _imported(module, node)]


def module_level_imports(statements: list[ast.stmt], module: str) -> Iterator[str]:
    """The imports that run when the module is imported: not inside functions, not under TYPE_CHECKING."""
    for node in statements:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if _is_type_checking(node):
            yield from module_level_imports(node.orelse, module)  # type: ignore[attr-defined]
            continue
        yield from _imported(module, node)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                yield from module_level_imports([child], module)
            elif isinstance(child, ast.ExceptHandler):
                yield from module_level_imports(child.body, module)


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def test_the_package_has_sources() -> None:
    assert len(SOURCES) > 10


def test_every_part_of_the_package_has_an_allowlist_entry() -> None:
    unlisted = sorted(PARTS - set(ALLOWED) - {"cli"})
    assert not unlisted, f"add {unlisted} to ALLOWED (which parts may they import, per DESIGN.md?)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_crosses_a_boundary(path: Path) -> None:
    module = module_name(path)
    part = part_of(module)
    imported = {name for name in all_imports(_parse(path), module) if part_of(name) != part}
    assert not [name for name in imported if part_of(name) == "cli"], f"{module} imports the CLI"
    if part == "cli":
        return
    crossing = sorted(name for name in imported if part_of(name) not in ALLOWED[part])
    assert not crossing, f"{module} imports {crossing}; DESIGN.md lets {part} import only {sorted(ALLOWED[part])}"


def _loaded_after(statement: str) -> list[str]:
    code = f"import sys\n{statement}\nprint('\\n'.join(sorted(m for m in sys.modules if m.startswith('metalr'))))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=PACKAGE.parent,
        env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.parametrize("statement", ["from metalr import LearnedLR", "import metalr.evaluation.harness"])
def test_deployment_and_evaluation_load_no_meta_training_code(statement: str) -> None:
    loaded = _loaded_after(statement)
    assert "metalr.scheduler" in loaded or "metalr.evaluation.harness" in loaded  # the import did happen
    meta = [name for name in loaded if name == "metalr.meta" or name.startswith("metalr.meta.")]
    assert not meta, f"`{statement}` loads {meta}"


def test_there_is_no_module_level_import_cycle() -> None:
    graph = {
        module_name(path): set(module_level_imports(_parse(path).body, module_name(path))) & MODULES for path in SOURCES
    }
    state: dict[str, str] = {}  # "active" while on the current path, "done" once explored
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "active"
        stack.append(module)
        for child in sorted(graph[module]):
            if state.get(child) == "active":
                return [*stack[stack.index(child) :], child]
            if child not in state and (cycle := visit(child)):
                return cycle
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            pytest.fail(f"module-level import cycle: {' -> '.join(cycle)}")


def test_the_parser_tells_lazy_imports_from_module_level_ones() -> None:
    tree = ast.parse(
        "import metalr.io\nfrom metalr.tasks import registry, TaskSpec\ntry:\n    import metalr.features\n"
        "except ImportError:\n    import metalr.schedules\nif TYPE_CHECKING:\n    import metalr.meta\n"
        "class C:\n    from metalr import config\n    def f(self):\n        import metalr.cli\n"
    )
    module_level = ["metalr.io", "metalr.tasks.registry", "metalr.tasks", "metalr.features", "metalr.schedules", "metalr.config"]
    assert list(module_level_imports(tree.body, "metalr.sample")) == module_level
    assert sorted(all_imports(tree, "metalr.sample")) == sorted([*module_level, "metalr.meta", "metalr.cli"])
