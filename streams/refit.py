"""The stream's persona model (item channel + calibrated decoder, `core.decoder`): refits and shipping.

Why here: the worker decides personas with the same fitted `PersonaModel` that `gplr label` uses,
so the model must be fitted on the stream's own prototypes and reach every worker.

* Milestones: a refit is due whenever the number of persona labels (the label-count table, Q̂'s
  numerator) reaches FIRST_MILESTONE × 2^k; any worker that sees one sends a request to the
  `refit` topic (always partition 0, so one worker serves them all, in order).
* Refit: that worker reads the purchases and labels topics to their current end, rebuilds the
  purchase graph and the prototypes, and calls `core.decoder.fit_persona_model` — the batch
  function, with the same decision rule as `gplr label` — in a thread. A request for a milestone
  at or below the current model's version is skipped, so duplicates cost nothing.
* Shipping: the fitted model is written as JSON to the GlobalTable
  `persona-model` (key "current", written from partition 0 only: {"version": milestone, "model":
  PersonaModel.to_dict()}), which every worker reads; a worker that sees a new version asks its
  users to decide again (`refresh` user-ops).

The text channel needs no pushes: a user keeps Σ s(v) over its items for the model version it
was computed with (`core.incremental.user_text_sum`) and recomputes it once per new version.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Mapping

import numpy as np
import pandas as pd

__all__ = ["FIRST_MILESTONE", "milestone", "read_topic", "build_graph", "fit_stream_model",
           "encode_model", "decode_model"]

logger = logging.getLogger(__name__)

#: Persona labels (mentions) before the first fit; then a refit at every doubling.
FIRST_MILESTONE = 16


def milestone(labels: float) -> int:
    """The largest FIRST_MILESTONE × 2^k ≤ `labels` (0 below the first).

    >>> [milestone(x) for x in (0, 15, 16, 31, 32, 100)]
    [0, 0, 16, 16, 32, 64]
    """
    if labels < FIRST_MILESTONE:
        return 0
    return FIRST_MILESTONE * 2 ** int(np.floor(np.log2(labels / FIRST_MILESTONE) + 1e-12))


def read_topic(bootstrap: str, topic: str, timeout: float = 120.0) -> list[bytes]:
    """Every record value of `topic`, all partitions, from the beginning to the current end."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"gplr-read-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "log_level": 3})
    out: list[bytes] = []
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return out
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign(parts)
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(5000, 0.5):
                if msg.error() or msg.offset() >= ends[msg.partition()]:
                    continue
                if msg.value() is not None:
                    out.append(msg.value())
                if msg.offset() + 1 >= ends[msg.partition()]:
                    todo.discard(msg.partition())
        if todo:
            raise TimeoutError(f"{topic}: partitions {sorted(todo)} not read within {timeout}s")
    finally:
        consumer.close()
    return out


def build_graph(purchases: list[bytes]):
    """The purchase graph of the valid, de-duplicated purchase records (as the worker counts them)."""
    from core.data import CANONICAL_COLUMNS
    from core.events import InvalidEvent, parse_purchase
    from core.graph import BipartiteGraph

    rows = []
    for raw in purchases:
        try:
            rows.append(parse_purchase(raw).to_dict())
        except InvalidEvent:
            continue
    frame = pd.DataFrame(rows, columns=list(CANONICAL_COLUMNS)).drop_duplicates("event_id")
    return BipartiteGraph.from_frame(frame)


def fit_stream_model(purchases: list[bytes], labels: list[bytes], n_personas: int, rule: str, k: int
                     ) -> dict[str, Any] | None:
    """Fit the persona model on the stream's prototypes (last successful label per user); its
    JSON-able dict, or None when no labelled user has bought anything yet."""
    from core.decoder import fit_persona_model

    graph = build_graph(purchases)
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    prototypes: dict[int, tuple[int, ...]] = {}
    for raw in labels:
        try:
            record = json.loads(raw)
            user, personas = str(record["user"]), [int(p) for p in record.get("personas") or []]
        except (ValueError, KeyError, TypeError):
            continue
        personas = [p for p in dict.fromkeys(personas) if 0 <= p < n_personas]
        if user in index and personas and not record.get("error"):
            prototypes[index[user]] = tuple(personas)
    if not prototypes:
        return None
    model = fit_persona_model(graph, dict(sorted(prototypes.items())), n_personas, rule=rule, max_personas=k)
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
