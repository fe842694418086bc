"""Module boundaries of DESIGN.md, enforced by parsing every import in the package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "metalr"

# module prefix -> metalr modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "metalr.features": ("metalr.",),  # torch only
    "metalr.schedules": ("metalr.",),
    "metalr.controller": ("metalr.meta", "metalr.evaluation", "metalr.methods", "metalr.scheduler", "metalr.tasks", "metalr.checkpoint"),
    "metalr.checkpoint": ("metalr.meta", "metalr.evaluation", "metalr.methods", "metalr.scheduler", "metalr.tasks"),
    "metalr.scheduler": ("metalr.meta", "metalr.evaluation", "metalr.methods", "metalr.tasks", "metalr.cli"),
    "metalr.integrations": ("metalr.meta", "metalr.evaluation", "metalr.cli"),
    "metalr.meta": ("metalr.evaluation", "metalr.scheduler", "metalr.methods", "metalr.cli", "metalr.integrations"),
    "metalr.evaluation": ("metalr.meta", "metalr.cli"),
    "metalr.methods": ("metalr.meta", "metalr.evaluation", "metalr.cli"),
    "metalr.tasks": ("metalr.meta", "metalr.evaluation", "metalr.methods", "metalr.scheduler", "metalr.controller", "metalr.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_sources() -> None:
    assert len(SOURCES) > 10


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_import_crosses_a_boundary(path: Path) -> None:
    module = _module_name(path)
    imported = _imports(path)
    for prefix, forbidden in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = [name for name in imported if any(name == f or name.startswith(f if f.endswith(".") else f + ".") or name == f.rstrip(".") for f in forbidden)]
            assert not bad, f"{module} imports {bad}, which DESIGN.md forbids"
    if module != "metalr.cli":
        assert not [n for n in imported if n == "metalr.cli" or n.startswith("metalr.cli.")], f"{module} imports the CLI"
