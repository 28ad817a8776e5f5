"""The stream's persona model (item channel + calibrated decoder, `core.decoder`): refits and shipping.

Why here: the worker decides personas with the same fitted `PersonaModel` that `gplr label` uses,
so the model must be fitted on the stream's own prototypes and reach every worker.

* Milestones: a refit is due whenever the number of persona labels (the label-count table, Q̂'s
  numerator) reaches ⌊FIRST_MILESTONE × GROWTH^k⌋ (16, 24, 36, 54, 81, ...); any worker that sees
  one sends a request to the
  `refit` topic (always partition 0, so one worker serves them all, in order).
* Final refit: once there are FIRST_MILESTONE labels or more and a worker's user side has been
  idle for IDLE_REFIT_S after the labels or the
  purchases it applied changed since its last request, it asks for one more refit on everything
  (version: the label count, or the current version + 1 if that is not higher). A fit is a
  function of its input, so when the input ends, every deployment fed the same input (with
  `random` sampling, see `streams.labeling`) ships the same last model and ends with the same
  personas, whatever the milestone fits in between read.
* Refit: that worker reads the purchases topic and the `prototypes` table's changelog (only labels
  the worker applied, written beside the user rows: see `prototype_labels`) to their current end,
  rebuilds the
  purchase graph and the prototypes, and calls `core.decoder.fit_persona_model` — the batch
  function, with the same decision rule as `gplr label` — in a thread. A request for a milestone
  at or below the current model's version is skipped, so duplicates cost nothing.
* Shipping: the fitted model is written as JSON to the GlobalTable
  `persona-model` (key "current", written from partition 0 only: {"version": milestone, "model":
  PersonaModel.to_dict()}), which every worker reads; a worker that sees a new version asks its
  users to decide again (`refresh` user-ops).

The text channel needs no pushes: a user keeps its text state (its word counts and two running
sums, `core.item_channel.ItemChannel.add_text`) for the model version it was computed with
(`core.incremental.user_text_sum`) and recomputes it once per new version.

The zero-shot channel (`core.zero_shot`, `gplr label`'s default; `GPLR_ZERO_SHOT`) is fitted
when the caller passes the personas (the refit agent and `gplr backfill` do, by default): the
model then carries the catalogue's word statistics and mean vote (`CatalogueVotes`, 30 kB on
Online Retail), not per-item lifts, and the user's text state carries its running sum of lifts in
front of the word state (`PersonaModel.add_text`). The refit votes every known name in its
executor thread through the process-wide cache the worker then reads; a name first bought after
the refit is voted (embedded) when a user first needs it, with the refit's catalogue statistics —
as `gplr label` on the grown catalogue would vote it, up to the words' IDF — not counted neutral.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FIRST_MILESTONE", "milestone", "build_graph", "history_graph", "fit_graph_model", "applied_labels",
           "prototype_labels", "fit_stream_model", "encode_model", "decode_model"]

logger = logging.getLogger(__name__)

#: Persona labels (mentions) before the first fit; then a refit whenever they grew by GROWTH×
#: (so the model in use always has at least 1/GROWTH of the labels; a refit reads the purchases
#: topic once, so their number grows only logarithmically with the labels).
FIRST_MILESTONE, GROWTH = 16, 1.5
#: Seconds without user-side activity before a worker asks for the final refit (see above).
IDLE_REFIT_S = 3.0


def milestone(labels: float) -> int:
    """The largest ⌊FIRST_MILESTONE × GROWTH^k⌋ ≤ `labels` (0 below the first).

    >>> [milestone(x) for x in (0, 15, 16, 23, 24, 36, 100)]
    [0, 0, 16, 16, 24, 36, 81]
    """
    if labels < FIRST_MILESTONE:
        return 0
    k = int(np.floor(np.log(labels / FIRST_MILESTONE) / np.log(GROWTH) + 1e-9))
    while int(FIRST_MILESTONE * GROWTH ** k) > labels:  # floating point at a boundary
        k -= 1
    return int(FIRST_MILESTONE * GROWTH ** k)


def build_graph(purchases: list[bytes]):
    """The purchase graph of the valid, de-duplicated purchase records (as the worker counts them)."""
    from core.data import CANONICAL_COLUMNS
    from core.events import InvalidEvent, parse_purchase

    rows = []
    for raw in purchases:
        try:
            rows.append(parse_purchase(raw).to_dict())
        except InvalidEvent:
            continue
    return history_graph(pd.DataFrame(rows, columns=list(CANONICAL_COLUMNS)))


def history_graph(frame: pd.DataFrame):
    """The purchase graph of a canonical frame, de-duplicated by event id and ordered by it (not
    by read order), so every reader of the same purchases fits the same model (`gplr backfill` too)."""
    from core.graph import BipartiteGraph

    frame = frame.drop_duplicates("event_id").sort_values("event_id", kind="stable").reset_index(drop=True)
    return BipartiteGraph.from_frame(frame)


def prototype_labels(rows: Mapping[str, Any], n_personas: int) -> dict[str, tuple[int, ...]]:
    """The prototypes from the worker's `prototypes` table (user → label personas it applied):
    the refit's source, a changelog that grows with the labels only (the users changelog holds
    every row write ever made and took minutes to read on a full Online Retail replay)."""
    out: dict[str, tuple[int, ...]] = {}
    for user, personas in rows.items():
        kept = tuple(int(p) for p in (personas if isinstance(personas, (list, tuple)) else ())
                     if isinstance(p, (int, np.integer)) and 0 <= int(p) < n_personas)
        if kept:
            out[str(user)] = kept
    return out


def applied_labels(rows: Mapping[str, Any], n_personas: int) -> dict[str, tuple[int, ...]]:
    """The prototypes read from user rows (user → label personas of every row that carries a label):
    what the `prototypes` table holds, for tools that only have the users table.

    Only labels the worker applied, never the `labels` topic: a forged or refused record there
    (unknown `labelled_by`, unrequested user, see `streams.agents.label_rejection`) trains nothing."""
    return prototype_labels({user: list(getattr(state, "label_personas", ())) for user, state in rows.items()
                             if getattr(state, "label", None) is not None}, n_personas)


def fit_stream_model(purchases: list[bytes], prototypes: Mapping[str, Sequence[int]], n_personas: int,
                     rule: str, k: int, personas: Any = None) -> dict[str, Any] | None:
    """Fit the persona model on the stream's prototypes (`prototype_labels`); its JSON-able dict,
    or None when no labeled user has bought anything yet. Deterministic given its input (the
    purchases are ordered by event id first), so fits on the same input ship the same model.
    `personas` (a `PersonaSet`): also fit the zero-shot channel on the purchased item names."""
    return fit_graph_model(build_graph(purchases), prototypes, n_personas, rule, k, personas)


def fit_graph_model(graph, prototypes: Mapping[str, Sequence[int]], n_personas: int, rule: str,
                    k: int, personas: Any = None) -> dict[str, Any] | None:
    """`fit_stream_model` on a graph already built (`history_graph`)."""
    from core.decoder import fit_persona_model

    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    rows = {index[u]: tuple(p) for u, p in prototypes.items() if u in index and p}
    if not rows:
        return None
    zero_shot = None
    if personas is not None:
        from core.zero_shot import zero_shot_channel  # MiniLM only when asked for

        zero_shot = zero_shot_channel(graph.item_names, personas)
    model = fit_persona_model(graph, dict(sorted(rows.items())), n_personas, rule=rule, max_personas=k,
                              zero_shot=zero_shot)
    return model.to_dict()


def encode_model(version: int, model: Mapping[str, Any]) -> bytes:
    return json.dumps({"version": int(version), "model": model}, separators=(",", ":")).encode()


def decode_model(raw: bytes | None) -> tuple[int, Any]:
    """(version, PersonaModel) from a `persona-model` table value; (0, None) when absent."""
    from core.decoder import PersonaModel

    if not raw:
        return 0, None
    body = json.loads(raw)
    return int(body["version"]), PersonaModel.from_dict(body["model"])
