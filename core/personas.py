"""Persona sets R: an ordered list of (name, definition); the order fixes the affinity columns."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Persona", "PersonaSet", "load_personas", "read_persona_labels", "ID_COLUMNS", "PERSONA_COLUMNS"]

PERSONA_KEYS = ("idx", "name", "definition")
# Label files: `gplr label` writes user_id; recorded tables (the paper's GPT-4 labels) use CustomerID.
ID_COLUMNS = ("user_id", "CustomerID", "customer_id", "user")
PERSONA_COLUMNS = ("personas", "gplr_personas")


@dataclass(frozen=True, slots=True)
class Persona:
    name: str
    definition: str


class PersonaSet(Sequence[Persona]):
    """Immutable, indexable persona set with case-insensitive name lookup."""

    def __init__(self, personas: Iterable[Persona]) -> None:
        self._personas = tuple(personas)
        if not self._personas:
            raise ValueError("a persona set needs at least one persona")
        self._index = {p.name.strip().casefold(): i for i, p in enumerate(self._personas)}
        if len(self._index) != len(self._personas):
            raise ValueError("persona names must be unique (case-insensitive)")

    def __getitem__(self, i: Any) -> Any:  # int -> Persona, slice -> list of them
        return self._personas[i]

    def __len__(self) -> int:
        return len(self._personas)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._personas]

    def index_of(self, name: str) -> int | None:
        """Column of `name`, or None when the name is not in the set (an LLM hallucination)."""
        return self._index.get(name.strip().casefold())

    def to_json(self) -> str:
        return json.dumps(
            [{"idx": i, "name": p.name, "definition": p.definition} for i, p in enumerate(self)],
            indent=1,
        )


def load_personas(path: str | Path) -> PersonaSet:
    """Read `[{"name": ..., "definition": ...}, ...]` (an optional `idx` fixes the order).

    Any other key is an error naming it: a file that says `description` instead of `definition`
    would otherwise label with empty definitions.
    """
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"persona set {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"persona set {path}: not valid JSON ({exc})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"persona set {path}: expected a JSON list of {{name, definition}} objects")
    for i, row in enumerate(rows):
        unknown = sorted(set(row) - set(PERSONA_KEYS))
        missing = [k for k in ("name", "definition") if k not in row]
        if unknown or missing:
            hint = f"unknown key(s) {unknown}" if unknown else ""
            hint += ("; " if unknown and missing else "") + (f"missing {missing}" if missing else "")
            raise ValueError(f"persona set {path}: persona {i} has {hint}; each persona needs exactly "
                             f"'name' and 'definition' ('idx' optional)")
    if all("idx" in r for r in rows):
        rows = sorted(rows, key=lambda r: r["idx"])
    try:
        return PersonaSet(Persona(str(r["name"]), str(r["definition"])) for r in rows)
    except ValueError as exc:
        raise ValueError(f"persona set {path}: {exc}") from None


def read_persona_labels(path: str | Path, keys: Sequence[str] = ID_COLUMNS,
                        columns: Sequence[str] = PERSONA_COLUMNS, sep: str = "|") -> dict[str, tuple[str, ...]]:
    """Persona names per id, in file order, from any label file this project reads or writes.

    `gplr label` output (JSON lines `{"user_id", "personas": [names]}` or CSV with names joined
    by `sep`) and recorded tables (`CustomerID, personas`). The id column is the first of `keys`
    the file has, the persona column the first of `columns`; ids are normalised ("17850.0" ->
    "17850").
    """
    import pandas as pd

    from core.labelers.replay import normalise_id

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"label file {path}: no such file")
    if path.name.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        frame = pd.read_json(path, lines=True, dtype=False)
    else:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    key = next((k for k in keys if k in frame.columns), None)
    column = next((c for c in columns if c in frame.columns), None)
    if key is None or column is None:
        raise ValueError(f"label file {path}: needs columns id (one of {list(keys)}) and personas "
                         f"(one of {list(columns)}); the file has {list(frame.columns)}")
    table: dict[str, tuple[str, ...]] = {}
    for uid, names in zip(frame[key], frame[column]):
        if isinstance(names, list):
            parsed = tuple(str(n).strip() for n in names if str(n).strip())
        elif isinstance(names, str):
            parsed = tuple(n.strip() for n in names.split(sep) if n.strip())
        elif names is None or (isinstance(names, float) and names != names):
            parsed = ()
        else:
            raise ValueError(f"label file {path}: {column!r} of {uid} is neither a list nor text: {names!r}")
        table.setdefault(normalise_id(uid), parsed)
    return table
