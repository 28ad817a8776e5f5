"""Labelers: turn purchase histories into personas. Look one up by name with `make_labeler`.

Implementations are imported on first use, so asking for "replay" never loads torch.
"""
from __future__ import annotations

from collections.abc import Iterable
from importlib import import_module
from typing import Any

from core.graph import BipartiteGraph
from core.labelers.base import Labeler, LabelerStats, LabelResult, UserHistory
from core.personas import PersonaSet

__all__ = [
    "LABELERS",
    "Labeler",
    "LabelerStats",
    "LabelResult",
    "UserHistory",
    "histories_for",
    "make_labeler",
]

#: name -> (module, class); options of `make_labeler` go to the class's constructor.
LABELERS: dict[str, tuple[str, str]] = {
    "openai": ("core.labelers.openai_labeler", "OpenAILabeler"),
    "embedding": ("core.labelers.embedding", "EmbeddingLabeler"),
    "replay": ("core.labelers.replay", "ReplayLabeler"),
}


def make_labeler(name: str, personas: PersonaSet, **options: Any) -> Labeler:
    """Build the labeler called `name` for `personas`.

    "openai" takes `config=LLMConfig` (default: from the environment); "embedding" takes
    `threshold`, `max_personas`, `temperature`; "replay" takes `path`, `id_column`, ...

    >>> make_labeler("oracle", None)
    Traceback (most recent call last):
    ...
    ValueError: unknown labeler 'oracle'; choose from embedding, openai, replay
    """
    try:
        module, cls = LABELERS[name]
    except KeyError:
        raise ValueError(f"unknown labeler {name!r}; choose from {', '.join(sorted(LABELERS))}") from None
    labeler: Labeler = getattr(import_module(module), cls)(personas, **options)
    return labeler


def histories_for(graph: BipartiteGraph, users: Iterable[int]) -> list[UserHistory]:
    """What a labeler sees of graph users (row indices): product names with quantities."""
    return [UserHistory(str(graph.user_ids[u]), tuple(graph.history(int(u)))) for u in users]
