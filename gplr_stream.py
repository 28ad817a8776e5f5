"""The `gplr` console script, under the one import name that is unique to this distribution.

The project's packages keep their short names (`core`, `streams`, `recsys`; the layout is fixed),
and those names are generic: PyPI already has a `recsys`, and any project may ship a top-level
`core`. pip does not refuse to install two distributions that both write `core/` into the same
site-packages (the second overwrites the first's files), and a `core/` folder in the working
directory shadows the installed one. Either way the program would run someone else's code, or
die deep inside an import. So the entry point first checks that the three packages it is about to
import are the ones installed beside this module, and otherwise stops with one line naming the
foreign package's path (exit status 2). tests/test_top_level_names.py checks the wheel's
top-level names and this guard; docs/operations.md says to install into a virtual environment
of its own.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["PACKAGES", "foreign_packages", "main"]

PACKAGES = ("core", "streams", "recsys")
_HERE = Path(__file__).resolve().parent


def foreign_packages() -> dict[str, str]:
    """Package name → where it would be imported from, for each of ours that is not beside this
    module (not importable at all counts too). Finds specs only: nothing foreign is executed."""
    out = {}
    for name in PACKAGES:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module else None
        if origin is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        if origin is None or Path(origin).resolve().parent != _HERE / name:
            out[name] = str(origin) if origin else "(not importable)"
    return out


def main(argv: list[str] | None = None) -> int:
    foreign = foreign_packages()
    if foreign:
        where = ", ".join(f"{name} from {path}" for name, path in foreign.items())
        print(f"gplr: another distribution's package shadows gplr-stream's ({where}; expected under "
              f"{_HERE}); install gplr-stream into a virtual environment of its own", file=sys.stderr)
        return 2
    from core.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
