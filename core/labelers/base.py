"""One interface for every labeler (LLM, embedding, replay).

A labeler turns purchase histories into persona indices of a fixed `PersonaSet`. Anything
outside the set is dropped and counted in `LabelerStats.dropped_personas`, never passed on.
Labelers are synchronous and thread-safe; the stream runs them off its event loop.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from core.personas import PersonaSet

__all__ = ["UserHistory", "LabelResult", "LabelerStats", "Labeler"]


@dataclass(frozen=True, slots=True)
class UserHistory:
    """What a labeler may see of a user: product names with purchase quantities."""

    user_id: str
    items: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class LabelResult:
    """Personas (indices into the set, best first) or an error; `dropped` are rejected names."""

    user_id: str
    personas: tuple[int, ...]
    scores: tuple[float, ...] = ()
    dropped: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.personas) > 0


@dataclass
class LabelerStats:
    """Accounting shared by all labelers (thread-safe increments)."""

    calls: int = 0
    errors: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    dropped_personas: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class Labeler(Protocol):
    name: str
    personas: PersonaSet
    stats: LabelerStats

    def label(self, histories: Sequence[UserHistory]) -> list[LabelResult]:
        """Label each history; the result list is aligned with the input."""
        ...
