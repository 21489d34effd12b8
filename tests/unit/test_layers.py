"""The sidecar's packages import only downward, as each package's docstring says.

Read from the source (every ``import`` and ``from ... import``, at any depth of a module), so a
function-level import counts as much as one at the top.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SIDECAR = Path(__file__).resolve().parents[2] / "sidecar"

#: package -> the sidecar packages it must not import (see each package's docstring).
FORBIDDEN = {
    "offsets": {"observability", "store", "kafka", "engine", "publish", "api", "process", "config"},
    "observability": {"offsets", "store", "kafka", "engine", "publish", "api", "process"},
    "store": {"offsets", "kafka", "engine", "publish", "api", "process"},
    "kafka": {"offsets", "store", "engine", "publish", "api", "process"},
    "engine": {"publish", "api", "process"},
    "publish": {"api", "process"},
    "api": {"process", "kafka"},
    # The foundations every package may import import no package themselves.
    "config": {"offsets", "observability", "store", "kafka", "engine", "publish", "api", "process"},
    "errors": {"offsets", "observability", "store", "kafka", "engine", "publish", "api", "process"},
    "groupcommit": {"offsets", "observability", "store", "kafka", "engine", "publish", "api", "process"},
    "testing_hooks": {"offsets", "observability", "store", "kafka", "engine", "publish", "api", "process"},
}


def imports(path: Path) -> set[str]:
    """Every module a file names in an absolute import, at any depth: ``a.b`` for ``import a.b``,
    and ``a.b.c`` for each name of ``from a.b import c``."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def imported_packages(path: Path) -> set[str]:
    """The sidecar packages (or top-level modules) a module imports."""
    return {name.split(".")[1] for name in imports(path) if name.startswith("sidecar.")}


def modules_of(name: str) -> list[Path]:
    package = SIDECAR / name
    return sorted(package.rglob("*.py")) if package.is_dir() else [SIDECAR / f"{name}.py"]  # one or more


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_a_package_imports_only_downward(name: str) -> None:
    modules = modules_of(name)
    assert all(m.exists() for m in modules), f"sidecar/{name} is gone: update FORBIDDEN"
    wrong = {
        f"{m.relative_to(SIDECAR)} imports sidecar.{p}"
        for m in modules
        for p in imported_packages(m) & FORBIDDEN[name]
    }
    assert not wrong, sorted(wrong)


def test_every_package_opens_with_a_docstring() -> None:
    for init in sorted(SIDECAR.rglob("__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc, f"{init.relative_to(SIDECAR.parent)} has no docstring"


def test_the_checker_sees_a_function_level_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from sidecar.process import app\n    import sidecar.api.server\n")
    assert imported_packages(module) == {"process", "api"}


@pytest.mark.parametrize(
    ("folder", "forbidden"),
    [
        ("clients/python/dedup_client", {"sidecar", "bench", "services"}),  # apps install it alone
        ("deploy/local/services", {"sidecar", "dedup_client", "bench"}),  # runs before the venv exists
    ],
)
def test_what_stands_alone_imports_nothing_of_the_rest(folder: str, forbidden: set[str]) -> None:
    root = SIDECAR.parent / folder
    wrong = {
        f"{m.relative_to(root)} imports {name}"
        for m in sorted(root.rglob("*.py"))
        for name in {i.split(".")[0] for i in imports(m)} & forbidden
    }
    assert not wrong, sorted(wrong)


def test_the_architecture_map_names_every_module_and_only_those() -> None:
    """docs/ARCHITECTURE.md's table of the pieces matches the tree, module for module: a row's
    first cell names modules of the package in the bold row above it."""
    text = (SIDECAR.parent / "docs" / "ARCHITECTURE.md").read_text()
    start = text.index("| package / module |")
    named: set[str] = set()
    package = ""
    for line in text[start : text.index("\n## ", start)].splitlines()[2:]:
        first = line.split(" | ")[0]
        if "**" in first:
            if "around it" in first:
                break
            heading = re.search(r"`(\w+)/`", first)
            package = f"{heading.group(1)}/" if heading else ""
            continue
        named.update(package + name for name in re.findall(r"`([\w/]+\.py)`", first))
    modules = {
        str(p.relative_to(SIDECAR))
        for p in SIDECAR.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and "_proto" not in p.parts
    }
    assert sorted(modules - named) == [], "modules the map does not name"
    assert sorted(named - modules) == [], "names in the map that are not modules"
