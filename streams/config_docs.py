"""The configuration tables of docs/operations.md, generated from the settings declarations.

Each table sits between `<!-- settings:NAME -->` and `<!-- /settings:NAME -->` in the document and
is rebuilt from `core.settings.table_rows` of its config class, so a variable's name, default and
doc line are written once, in the code. The stream table also shows what the compose stack sets for
the worker (read from docker-compose.yml: a literal, or the `${VAR:-default}` default).

    python -m streams.config_docs            # exit 1 and name the stale tables
    python -m streams.config_docs --write    # rewrite them in place
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

from core.embedding_cache import EmbeddingCacheConfig
from core.labelers.openai_labeler import LLMConfig
from core.settings import table_rows
from recsys.trainer import TrainerConfig
from streams.config import StreamConfig

__all__ = ["OPERATIONS", "COMPOSE", "render_tables", "stale_tables", "main"]

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = REPO / "docs" / "operations.md"
COMPOSE = REPO / "docker-compose.yml"
TABLES: dict[str, type] = {"stream": StreamConfig, "llm": LLMConfig, "trainer": TrainerConfig,
                           "embedding": EmbeddingCacheConfig}
_BLOCK = re.compile(r"(<!-- settings:(\w+) -->\n)(.*?)(<!-- /settings:\2 -->)", re.S)
_DEFAULTED = re.compile(r"^\$\{[A-Z0-9_]+:-(.*)\}$")


def compose_worker_values(compose: Path = COMPOSE) -> dict[str, str]:
    """Variable → the value the compose stack gives the worker, where it sets a non-empty one."""
    env = yaml.safe_load(compose.read_text())["services"]["worker"]["environment"]
    out = {}
    for name, raw in env.items():
        text = str(raw)
        match = _DEFAULTED.match(text)
        value = match.group(1) if match else text
        if value:
            out[name] = value
    return out


def _table(name: str, compose: dict[str, str]) -> str:
    rows = list(table_rows(TABLES[name]))
    if name == "stream":
        lines = ["| variable | default | compose stack | meaning |", "|---|---|---|---|"]
        lines += [f"| `{env}` | {default} | {f'`{compose[env]}`' if env in compose else ''} | {doc} |"
                  for env, default, doc in rows]
    else:
        lines = ["| variable | default | meaning |", "|---|---|---|"]
        lines += [f"| `{env}` | {default} | {doc} |" for env, default, doc in rows]
    return "\n".join(lines).replace("|  |", "| |") + "\n"


def render_tables(text: str, compose: Path = COMPOSE) -> str:
    """`text` with every marked settings table rebuilt from the declarations."""
    values = compose_worker_values(compose)
    return _BLOCK.sub(lambda m: m.group(1) + _table(m.group(2), values) + m.group(4), text)


def stale_tables(path: Path | None = None) -> list[str]:
    """Names of the marked tables in `path` (docs/operations.md) that differ from the declarations
    (or are missing)."""
    text = (path or OPERATIONS).read_text()
    found = {m.group(2): m.group(0) for m in _BLOCK.finditer(text)}
    fresh = {m.group(2): m.group(0) for m in _BLOCK.finditer(render_tables(text))}
    return sorted(name for name in TABLES if found.get(name) is None or found[name] != fresh[name])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m streams.config_docs", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in docs/operations.md")
    args = parser.parse_args(argv)
    if args.write:
        OPERATIONS.write_text(render_tables(OPERATIONS.read_text()))
        return 0
    stale = stale_tables()
    if stale:
        print(f"docs/operations.md: settings tables {', '.join(stale)} are stale; "
              "run `python -m streams.config_docs --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
