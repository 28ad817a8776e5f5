"""Replay recorded persona labels (e.g. the paper's GPT-4 labels) as if an LLM answered.

Reproducible experiments on real data need the same oracle every run: this labeler looks users
(or product names) up in a recorded table instead of calling a model. Each lookup is booked as
one call so that budgets and call counts match what a live LLM run would spend.
"""
from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from core.labelers.base import LabelerStats, LabelResult, UserHistory
from core.personas import PersonaSet

__all__ = ["ReplayLabeler", "normalise_id"]

log = logging.getLogger(__name__)
_FLOAT_ID = re.compile(r"^(\d+)\.0+$")


def normalise_id(value: object) -> str:
    """Compare ids as text, with numeric ids read as floats ("12346.0") mapped back to "12346"."""
    text = str(value).strip()
    match = _FLOAT_ID.match(text)
    return match.group(1) if match else text


class ReplayLabeler:
    """Labels from a recorded CSV (gzip ok): one row per id, persona names joined by `sep`.

    Unknown names are dropped and counted; an unknown id gives error "no_recorded_label"; a row
    with no personas (GPT answered "Unrepresentable") gives error "no_personas".

    >>> import io, gzip, tempfile, os
    >>> from core.personas import Persona
    >>> path = os.path.join(tempfile.mkdtemp(), "labels.csv")
    >>> _ = open(path, "w").write("CustomerID,personas\\n7,B|Ghost|A\\n")
    >>> ps = PersonaSet([Persona("A", ""), Persona("B", "")])
    >>> ReplayLabeler(ps, path).label([UserHistory("7", ()), UserHistory("8", ())])[0].personas
    (1, 0)
    """

    name = "replay"

    def __init__(
        self,
        personas: PersonaSet,
        path: str | Path,
        id_column: str = "CustomerID",
        personas_column: str = "personas",
        sep: str = "|",
        max_calls: int | None = None,
    ) -> None:
        self.personas = personas
        self.stats = LabelerStats()
        self.max_calls = max_calls
        self._lock = threading.Lock()
        self._table = self._read(Path(path), id_column, personas_column, sep)

    def _read(self, path: Path, id_column: str, personas_column: str, sep: str) -> dict[str, tuple[str, ...]]:
        from core.personas import ID_COLUMNS, read_persona_labels

        # by default any id column of `gplr label` output or a recorded table; a named one strictly
        keys = (id_column, *ID_COLUMNS) if id_column == "CustomerID" else (id_column,)
        table = read_persona_labels(path, keys, (personas_column,), sep)
        log.info("replay labels: %d ids from %s", len(table), path)
        return table

    def __len__(self) -> int:
        return len(self._table)

    def _reserve(self) -> bool:
        with self._lock:
            if self.max_calls is not None and self.stats.calls >= self.max_calls:
                return False
            self.stats.add(calls=1)
            return True

    def lookup(self, key: str) -> LabelResult:
        """The recorded personas of one id, as a labeler result (one call booked)."""
        if not self._reserve():
            return self._failed(key, "budget_exhausted")
        names = self._table.get(normalise_id(key))
        if names is None:
            return self._failed(key, "no_recorded_label")
        indices: list[int] = []
        dropped: list[str] = []
        for name in names:
            idx = self.personas.index_of(name)
            if idx is None:
                dropped.append(name)
            elif idx not in indices:
                indices.append(idx)
        if dropped:
            self.stats.add(dropped_personas=len(dropped))
        if not indices:
            return self._failed(key, "no_personas", tuple(dropped))
        return LabelResult(key, tuple(indices), dropped=tuple(dropped))

    def _failed(self, key: str, kind: str, dropped: tuple[str, ...] = ()) -> LabelResult:
        self.stats.add(errors=1)
        return LabelResult(key, (), dropped=dropped, error=kind)

    def label(self, histories: Sequence[UserHistory]) -> list[LabelResult]:
        return [self.lookup(h.user_id) for h in histories]

    def label_items(self, names: Sequence[str]) -> list[tuple[int, ...]]:
        """Item personas by product name (for an item table keyed by Description); () if none."""
        return [self.lookup(name).personas for name in names]
