"""Faust records of the stream's internal topics, and JSON bodies of its public ones.

The public topics (purchases, persona-updates, label-requests, labels, purchases-dlq) carry
plain JSON so any client can read or write them; `purchases` is read as raw bytes because
`core.events.parse_purchase` is the only validator and the dead-letter topic keeps the exact
bytes it rejected. Internal topics carry `faust.Record`s converted to `core.incremental`
messages at the edge, so agents only ever call core with core types.
"""
from __future__ import annotations

import base64
import hashlib
import time
import traceback
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import faust
import numpy as np
from aiokafka.partitioner import murmur2

from core.incremental import ItemValue, Membership, PersonaSnapshot
from core.personas import PersonaSet

__all__ = [
    "partition_for",
    "UserOp",
    "ItemOp",
    "encode_purchases",
    "decode_purchases",
    "encode_values",
    "decode_values",
    "encode_memberships",
    "decode_memberships",
    "split_op",
    "bounded_ops",
    "MAX_OP_BYTES",
    "encode_label",
    "dlq_record",
    "error_summary",
    "DLQ_PAYLOAD_BYTES",
    "persona_update",
    "label_request",
    "label_record",
]


@lru_cache(maxsize=1 << 17)  # the same users and items come back all the time
def partition_for(key: str, partitions: int) -> int:
    """Kafka's default (murmur2) partition of a string key: internal sends pick it explicitly."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class UserOp(faust.Record, serializer="json"):
    """One message to the user side (one per destination partition per batch, see
    `streams.agents`). kind: "purchase" (`events`: several users' events of one partition),
    "value" (`pushes`: several items' values, each addressed to its buyers in that partition),
    "label" (one user: `personas`, `scores`, `labelled_by`) or "refresh" (`users` decide again)."""

    kind: str
    users: list[str]
    events: list[list[Any]] | None = None  # purchase: PurchaseEvent fields, in field order
    pushes: list[dict[str, Any]] | None = None  # value: {item, seq, value, users, source_ts}
    personas: list[int] | None = None  # label
    scores: list[float] | None = None  # label
    labelled_by: str = ""  # label
    source_ts: float = 0.0  # ts of the purchase that caused this op (latency metric)


class ItemOp(faust.Record, serializer="json"):
    """Buyer upserts for the item side: `members` = [[user, item, version, label, source_ts], ...]
    (`core.incremental.Membership`s) for items of one partition."""

    members: list[list[Any]] | None = None


def encode_purchases(events: Sequence[Any]) -> UserOp:
    """Several validated events of one user-ops partition in one message (as field lists: a
    dict per event would repeat every field name, and `dataclasses.asdict` is slow)."""
    return _purchase_op([[e.event_id, e.user_id, e.item_id, e.item_name, e.quantity, e.price, e.ts] for e in events])


def _purchase_op(events: list[list[Any]]) -> UserOp:
    """A purchase op of events already as field lists (user id second, ts last)."""
    return UserOp(kind="purchase", users=[e[1] for e in events], events=events, source_ts=min(e[6] for e in events))


def decode_purchases(op: UserOp) -> list[tuple[str, str, str, str, int, float, float]]:
    """The purchase events of a purchase op as (event_id, user_id, item_id, item_name, quantity,
    price, ts)."""
    return [(str(e), str(u), str(i), str(n), int(q), float(p), float(t)) for e, u, i, n, q, p, t in op.events or ()]


def encode_label(user: str, personas: Sequence[int], scores: Sequence[float], labelled_by: str) -> UserOp:
    """A validated label for one user, as an op of that user's user-ops partition."""
    return UserOp(kind="label", users=[user], personas=[int(p) for p in personas],
                  scores=[float(s) for s in scores], labelled_by=labelled_by, source_ts=time.time())


def encode_values(msgs: Sequence[tuple[ItemValue, Sequence[str], float]]) -> UserOp:
    """Several items' values for buyers of one user-ops partition: (value, users, source_ts)."""
    return _value_op([{"item": m.item, "seq": m.seq, "value": [float(x) for x in m.value], "users": list(users),
                       "source_ts": ts} for m, users, ts in msgs])


def _value_op(pushes: list[dict[str, Any]]) -> UserOp:
    """A value op of pushes already as {item, seq, value, users, source_ts}."""
    return UserOp(kind="value", users=[u for p in pushes for u in p["users"]], pushes=pushes,
                  source_ts=min(p["source_ts"] for p in pushes))


def decode_values(op: UserOp) -> list[tuple[str, int, list[float], list[str], float]]:
    """(item, seq, value, users, source_ts) of a value op."""
    return [(str(p["item"]), int(p["seq"]), p["value"], list(p["users"]), float(p.get("source_ts", 0.0)))
            for p in op.pushes or ()]


def encode_memberships(msgs: Sequence[tuple[Membership, float]]) -> ItemOp:
    """Several buyer upserts for items of one item-ops partition: (membership, source_ts)."""
    return ItemOp(members=[[m.user, m.item, int(m.version), None if m.label is None else [float(x) for x in m.label],
                            ts] for m, ts in msgs])


def decode_memberships(op: ItemOp) -> list[tuple[Membership, float]]:
    """(membership, source_ts) of an item op."""
    return [(Membership(str(u), str(i), int(v), None if lab is None else np.asarray(lab, dtype=np.float64)),
             float(ts)) for u, i, v, lab, ts in op.members or ()]


#: Largest internal message (user-ops / item-ops, serialised). A batch's ops for one partition
#: go in one message, and a push of a popular item lists every buyer in that partition: at full
#: Instacart scale one grew to 1,054,998 bytes, over the producer's `max_request_size` (and Kafka's
#: default `message.max.bytes`, both ~1 MB), the worker could not send its batch's results, exited,
#: and would have replayed the same batch into the same failure. Bigger ops are split.
MAX_OP_BYTES = 256 * 1024


def _halves(items: list[Any]) -> tuple[list[Any], list[Any]]:
    half = len(items) // 2
    return items[:half], items[half:]


def split_op(op: UserOp | ItemOp) -> tuple[UserOp | ItemOp, UserOp | ItemOp] | None:
    """Two ops that together carry what `op` carries, in order (the first half first), or None
    when it cannot be split (one event, one membership, one buyer, or a label / refresh op).

    Each half is applied as the whole would be: events and memberships are idempotent per row,
    and a value reaches each buyer once, the buyers of one push shared between the halves."""
    if isinstance(op, ItemOp):
        if len(op.members or ()) < 2:
            return None
        first, second = _halves(op.members or [])
        return ItemOp(members=first), ItemOp(members=second)
    if op.kind == "purchase" and len(op.events or ()) > 1:
        first, second = _halves(op.events or [])
        return _purchase_op(first), _purchase_op(second)
    if op.kind == "value" and op.pushes:
        if len(op.pushes) > 1:
            first, second = _halves(op.pushes)
        elif len(op.pushes[0]["users"]) > 1:  # one push to many buyers: the buyers in two halves
            push = op.pushes[0]
            first, second = ([{**push, "users": users}] for users in _halves(push["users"]))
        else:
            return None
        return _value_op(first), _value_op(second)
    return None


def bounded_ops(op: Any, limit: int = MAX_OP_BYTES) -> list[Any]:
    """`op` as messages of at most `limit` serialised bytes each where it can be split
    (`split_op`), in order; an op that cannot be split, or any other value, is kept whole."""
    if not isinstance(op, (UserOp, ItemOp)) or len(op.dumps()) <= limit:
        return [op]
    halves = split_op(op)
    if halves is None:
        return [op]
    return [piece for half in halves for piece in bounded_ops(half, limit)]


#: Payload bytes a dead letter keeps verbatim; beyond it only a prefix, with the full size and
#: SHA-256 (a 1 MB record would make a dead letter the broker refuses, and the batch with it).
DLQ_PAYLOAD_BYTES = 128 * 1024


def dlq_record(payload: bytes | None, key: bytes | None, reason: str, detail: str,
               source: str = "purchases") -> dict[str, Any]:
    """Dead letter: the original bytes (text when it decodes, else base64), why, and from which
    topic. `size` and `sha256` describe the whole original; `truncated` says the payload is a prefix."""
    raw = bytes(payload or b"")
    kept = raw[:DLQ_PAYLOAD_BYTES]
    try:
        text, encoding = kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(kept).decode(), "base64"
    return {
        "reason": reason,
        "detail": detail[:2000],
        "source": source,
        "payload": text,
        "encoding": encoding,
        "size": len(raw),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "truncated": len(kept) < len(raw),
        "key": None if key is None else bytes(key)[:1024].decode("utf-8", "replace"),
        "ts": time.time(),
    }


def error_summary(exc: BaseException, frames: int = 4) -> str:
    """`Type: message` and the innermost frames (file:line in function), for an internal_error
    dead letter: enough to find the bug, bounded in size."""
    tb = traceback.extract_tb(exc.__traceback__)[-frames:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in reversed(tb))
    return f"{type(exc).__name__}: {str(exc)[:300]} at {where}"


def _named(snapshot: PersonaSnapshot | None, personas: PersonaSet,
           evidence: Mapping[int, list[dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    if snapshot is None:
        return []
    named = [{"idx": m, "name": personas[m].name, "score": round(s, 6)}
             for m, s in zip(snapshot.personas, snapshot.scores)]
    if evidence is not None:
        for entry in named:
            entry["evidence"] = evidence.get(entry["idx"], [])
    return named


def persona_update(user: str, now: PersonaSnapshot, previous: PersonaSnapshot | None,
                   personas: PersonaSet, reason: str, labelled_by: str, source_ts: float,
                   evidence: Mapping[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Body of a persona-updates record (key: user id). `evidence` (persona → up to three
    {item_id, name, share, channel}, `core.evidence.state_evidence`) goes with each current persona."""
    return {
        "user": user,
        "personas": _named(now, personas, evidence),
        "previous": _named(previous, personas),
        "reason": reason,
        "labelled_by": labelled_by,
        "ts": time.time(),
        "source_ts": source_ts,
    }


def label_request(user: str, history: Sequence[tuple[str, int]], score: float) -> dict[str, Any]:
    """Body of a label-requests record (key: user id)."""
    return {"user": user, "history": [[n, int(q)] for n, q in history], "du_score": float(score),
            "ts": time.time()}


def label_record(user: str, personas: Sequence[int], scores: Sequence[float], labelled_by: str,
                 error: str | None = None) -> dict[str, Any]:
    """Body of a labels record (key: user id); external tools may publish these too."""
    return {"user": user, "personas": [int(p) for p in personas], "scores": [float(s) for s in scores],
            "labelled_by": labelled_by, "error": error, "ts": time.time()}
