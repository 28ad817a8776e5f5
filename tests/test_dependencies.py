"""Dependencies point one way, streams → recsys → core: every import statement of a package
(at module level or inside a function) names only packages to its right, and the demo and the
command-line module of the stream do not import each other."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# package → the project packages it must never import
FORBIDDEN = {"core": {"streams", "recsys"}, "recsys": {"streams"}}


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Dotted names of every module `path` imports, at any depth (relative imports resolved
    against the file's package below `root`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.relative_to(root).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1])
                names.add(f"{base}.{node.module}" if node.module else base)
            else:
                names.add(str(node.module))
    return names


def test_imported_modules_sees_nested_and_relative_imports(tmp_path: Path) -> None:
    """The checker itself: a function-local import and a relative one are found."""
    probe = tmp_path / "recsys" / "models" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("def f():\n    from streams import metrics\n\nfrom . import base\n"
                     "from ..graph import build_graph\nimport core.events as e\n")
    assert imported_modules(probe, tmp_path) == {"streams", "recsys.models", "recsys.graph", "core.events"}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_dependencies_point_one_way(package: str) -> None:
    bad = []
    for path in sorted((REPO / package).rglob("*.py")):
        for name in imported_modules(path):
            if name.split(".")[0] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(REPO)} imports {name}")
    assert not bad, "\n".join(bad)


def test_stream_cli_and_demo_do_not_import_each_other() -> None:
    assert "streams.cli" not in imported_modules(REPO / "streams" / "demo.py")
    assert "streams.demo" in imported_modules(REPO / "streams" / "cli.py")  # the one direction kept
