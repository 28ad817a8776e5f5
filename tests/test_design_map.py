"""docs/design.md's module map matches the code: one row per module of core/, streams/ and
recsys/ (and no row for a module that is gone), and every function or class a row names as
`name(...)` or `CamelCase` is defined in that module."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "streams", "recsys")
ROW = re.compile(r"^\| `([\w/]+\.py)` \|(.*)\|\s*$")
CALLED = re.compile(r"`(\w+)\(")
CLASS = re.compile(r"`([A-Z][a-z]\w*[a-z]\w*)`")


def module_map() -> dict[str, dict[str, str]]:
    """Package → module path (relative to the package) → the row's text, from the `## pkg/` sections."""
    rows: dict[str, dict[str, str]] = {}
    package = None
    for line in (REPO / "docs" / "design.md").read_text().splitlines():
        if line.startswith("## "):
            name = line[3:].split("/")[0].strip()
            package = name if name in PACKAGES else None
            continue
        match = ROW.match(line)
        if package and match:
            rows.setdefault(package, {})[match.group(1)] = match.group(2)
    return rows


def module_files(package: str) -> set[str]:
    """Every module file of `package`, the package's own __init__.py excepted."""
    root = REPO / package
    return {str(p.relative_to(root)) for p in root.rglob("*.py")
            if "__pycache__" not in p.parts and p.relative_to(root) != Path("__init__.py")}


def defined_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add((node.asname or node.name).split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_has_one_row(package: str) -> None:
    named = set(module_map().get(package, {}))
    files = module_files(package)
    assert not files - named, f"modules missing from docs/design.md: {sorted(files - named)}"
    assert not named - files, f"docs/design.md names modules that do not exist: {sorted(named - files)}"


@pytest.mark.parametrize("package", PACKAGES)
def test_named_functions_exist(package: str) -> None:
    missing = []
    for module, text in module_map().get(package, {}).items():
        names = set(CALLED.findall(text)) | set(CLASS.findall(text))
        gone = names - defined_names(REPO / package / module)
        missing += [f"{package}/{module}: {n}" for n in sorted(gone)]
    assert not missing, "\n".join(missing)


def test_map_reader_sees_rows() -> None:
    """The reader itself: rows of each section are found (a broken parse cannot pass vacuously)."""
    rows = module_map()
    assert "events.py" in rows["core"] and "agents.py" in rows["streams"] and "models/ease.py" in rows["recsys"]
