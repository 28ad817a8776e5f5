"""The stream's agents: validate → de-duplicate → user side → item side → user side → persona-updates.

Topology (ℓ̂ = 1, see core.incremental for the arithmetic)::

    purchases ──validate──▶ user-ops(user) ──new edge──▶ item-ops(item) ──value/push──▶ user-ops(user)
        └─invalid─▶ purchases-dlq              user-ops ──▶ persona-updates, label-requests
    labels ──▶ user-ops(user, kind=label) ──label upserts──▶ item-ops

`user-ops` carries every user-side message (purchases, item values, labels), so one agent owns
the user rows and sees a user's messages in order; `item-ops` likewise owns the item rows.
Sends to both pick the partition explicitly with Kafka's murmur2 partitioner, so values for
several buyers of one partition travel in one message and a row never depends on which client
produced its key.

Batching (throughput): each agent takes what has arrived (`stream.take_events`, up to
BATCH_MAX messages or its BATCH_WITHIN seconds) and handles it per source partition in one
synchronous call (`on_purchases_raw`, `on_user_ops`, `on_item_ops`), which runs the Faust-free
protocol of `core.stream_protocol` (`UserBatch`, `apply_item_batch`) and adds the worker's
decisions (persona updates, label requests, metrics):

* one internal message per destination partition per batch (lists of events, upserts or item
  values);
* each touched row is read once (decoded rows are cached in memory, write-through, dropped on
  rebalance and on a failed batch) and written once, so one changelog record per touched row;
* item pushes are coalesced: an item that pushed (or replays) sends only its final M̃ and seq,
  to every buyer; persona updates and label requests are decided once per changed user.

Per purchase that leaves ~1 consumed message, ~1 user-row write, a share of an item-row write,
and the persona updates; before, it was ~4 consumed and ~6 produced messages.

Crash safety (why not exactly_once): Faust here is at-least-once — after a kill -9 the messages
since the last commit are processed again, their outputs may or may not have left, and table
rows may or may not hold their effect (a batch's events are acked only after its body ran, its
results were sent and its rows' changelog records were acknowledged — `send_or_die` —, so
everything before a commit is durable and a crash replays whole batches, possibly re-cut).
Instead of broker transactions we make every state change idempotent:

* messages between the sides are absolute upserts with versions/sequence numbers
  (core.incremental), so duplicates, re-sends and coalescing are no-ops or lossless;
* purchase counts (the one non-idempotent effect) are guarded inside the user row with bounded
  state, written atomically with the counts (`core.stream_protocol`: the user's recent event
  ids; a batch also drops repeated ids before sending);
* a message at or below a row's `applied_offset` *from before the batch* is a replay: its state
  change is skipped but its outputs are sent again (an item re-tells all its buyers, a user
  re-sends its upserts and its last update), because they may have been lost with the crash,
  and its row is written again, because its changelog record may have been lost while RocksDB
  kept it.

Nothing is acked early on an error (issue 9): `take_events` acks a batch in a `finally`, so no
exception may leave an agent body — a record whose handling raises is dead-lettered as
`internal_error` (`guarded`) while the rest of its batch is applied, and a batch whose results
cannot be sent ends the process (`send_or_die`) before its offsets are committed. (Holding an
extra reference on each message until its results are sent would also cover an agent cancelled
mid-batch, but with it the worker stalled after a broker restart; see docs/operations.md.)
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import faust
import numpy as np

from core.affinity import debias_weights, label_distribution
from core.decoder import DEFAULT_RULE
from core.events import InvalidEvent, PurchaseEvent, parse_purchase
from core.evidence import state_evidence
from core.incremental import (
    ItemValue,
    Membership,
    PersonaSnapshot,
    UserState,
    decide,
    psi_raw,
    rank_personas,
    threshold,
    user_text_sum,
)
from core.personas import PersonaSet
from core.stream_protocol import UserBatch, apply_item_batch, count_labels
from streams import metrics
from streams._compat import changelog_written
from streams.config import StreamConfig
from streams.labeling import LabelPolicy
from streams.records import (
    ItemOp,
    UserOp,
    bounded_ops,
    decode_memberships,
    decode_purchases,
    decode_values,
    dlq_record,
    encode_memberships,
    encode_purchases,
    encode_values,
    error_summary,
    partition_for,
    persona_update,
)
from streams.tables import Tables, decode_state, encode_state, in_partition, label_counts
from streams.topics import Topics, register_internal

__all__ = ["StreamTopics", "StreamLogic", "Out", "partition_for", "register_agents",
           "BATCH_MAX", "BATCH_WITHIN", "USER_OPS", "ITEM_OPS", "upgrade_model"]

logger = logging.getLogger(__name__)

USER_OPS, ITEM_OPS, REFIT = "user-ops", "item-ops", "refit"
register_internal(USER_OPS, ITEM_OPS, REFIT)


@dataclass(frozen=True)
class StreamTopics:
    """The Faust topic objects of one app."""

    purchases: faust.TopicT
    dlq: faust.TopicT
    user_ops: faust.TopicT
    item_ops: faust.TopicT
    persona_updates: faust.TopicT
    label_requests: faust.TopicT
    labels: faust.TopicT
    refit: faust.TopicT

    @classmethod
    def declare(cls, app: faust.App, config: StreamConfig) -> StreamTopics:
        names = Topics(config.topic_prefix)
        n = config.partitions

        def json_topic(name: str) -> faust.TopicT:
            return app.topic(name, key_type=str, key_serializer="raw", value_serializer="json",
                             partitions=n)

        def raw_topic(name: str) -> faust.TopicT:
            return app.topic(name, key_type=bytes, key_serializer="raw", value_type=bytes,
                             value_serializer="raw", partitions=n)

        return cls(
            purchases=raw_topic(names.purchases),
            dlq=json_topic(names.purchases_dlq),
            user_ops=app.topic(names.name(USER_OPS), key_type=str, key_serializer="raw",
                               value_type=UserOp, partitions=n, internal=True),
            item_ops=app.topic(names.name(ITEM_OPS), key_type=str, key_serializer="raw",
                               value_type=ItemOp, partitions=n, internal=True),
            persona_updates=json_topic(names.persona_updates),
            label_requests=raw_topic(names.label_requests),  # anyone may write these two:
            labels=raw_topic(names.labels),  # streams.labeling validates the bytes itself
            refit=app.topic(names.name(REFIT), key_type=str, key_serializer="raw", value_serializer="json",
                            partitions=n, internal=True),
        )


@dataclass(slots=True)
class Out:
    """One record to send once the state change is done."""

    topic: str  # attribute name in StreamTopics
    key: str | None
    value: Any
    partition: int | None = None


def label_rejection(config: StreamConfig, state: UserState | None, labelled_by: str) -> str | None:
    """Why a label from `labelled_by` must not be applied to this user row, or None.

    Operator sources (GPLR_LABEL_SOURCES) are trusted; the worker's own labeler may only label a
    user the worker asked about (its row says `requested`, which the label policy sets within
    budget) and not yet labeled. Anything else on `labels` is forged or stale."""
    if labelled_by in config.label_sources:
        return None
    if not config.accepts_labels_from(labelled_by):
        return "unknown_labeler"
    if state is None or not state.requested:
        return "unrequested_label"
    if state.label is not None:
        return "already_labelled"
    return None


#: Metric updates of the batch attempt being handled (None: none is, update at once); see `_attempt`.
_DEFERRED: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None


def _count(update: Callable[..., Any], *args: Any) -> None:
    """Update a metric, or defer it to the end of the current batch attempt."""
    if _DEFERRED is None:
        update(*args)
    else:
        _DEFERRED.append((update, args))


def _attempt(handle: Callable[..., list[Out]], *args: Any) -> list[Out]:
    """Run one attempt at a batch with its metric updates held back: applied when it returns,
    dropped when it raises, so a batch retried one message at a time (`guarded`) counts each
    applied record once. (Handlers are synchronous: no other agent runs meanwhile.)"""
    global _DEFERRED
    saved, _DEFERRED = _DEFERRED, []
    try:
        result = handle(*args)
    except BaseException:
        _DEFERRED = saved
        raise
    updates, _DEFERRED = _DEFERRED, saved
    for update, update_args in updates:
        _count(update, *update_args)
    return result


def dead_letter(payload: bytes | None, key: bytes | str | None, reason: str, detail: str,
                source: str = "purchases") -> Out:
    """A dead letter for the DLQ topic, counted once in `gplr_dlq_total{reason}`."""
    _count(metrics.DLQ.labels(reason=reason).inc)
    logger.info("dead letter from %s (%s)", source, reason)
    raw_key = key.encode("utf-8", "replace") if isinstance(key, str) else key
    body = dlq_record(payload, raw_key, reason, detail, source)
    return Out("dlq", body["key"], body)


@dataclass
class StreamLogic:
    """The agents' bodies as synchronous functions over tables: (message) → records to send.

    No await between reading and writing a row, so concurrent agents never interleave a row.
    """

    config: StreamConfig
    personas: PersonaSet
    tables: Tables
    policy: LabelPolicy
    q_counts: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.m = len(self.personas)
        self.theta = threshold(self.config.eps, 1)
        self.q_counts = np.zeros(self.m)
        self._residuals: dict[str, float] = {}  # metrics only: items this worker has updated
        self._residual_total = 0.0
        self._debias_key: bytes | None = None
        self._debias = np.ones(self.m)
        self._q_key: bytes | None = None
        self._q_hat = np.zeros(self.m)
        self.frozen = metrics.FrozenWatch()
        self.model: Any = None  # core.decoder.PersonaModel once the first refit shipped
        self.model_version = 0
        self._vectors: dict[str, np.ndarray] = {}  # item name → s(v) under the current model
        self.applied_ops, self.last_applied = 0, 0.0  # user-side changes (final refit, streams.refit)
        self._final_mark: tuple[float, int] = (0.0, 0)
        self.model_lock = asyncio.Lock()  # one model upgrade at a time (`upgrade_model`)
        self.model_checked = False  # the user side looked for a shipped model since start-up

    # -- helpers -------------------------------------------------------------------------------
    def _user_part(self, user: str) -> int:
        return partition_for(user, self.config.partitions)

    def refresh_q(self) -> None:
        """Re-read the global label counts (Q̂'s numerator) from the GlobalTable."""
        try:
            self.q_counts = label_counts(self.tables.labels, self.m)
        except Exception:  # a table not yet recovered: keep the last value
            logger.debug("label counts not readable yet", exc_info=True)

    def debias(self) -> np.ndarray:
        """c_m from the current Q̂ (cached until the label counts change)."""
        key = self.q_counts.tobytes()
        if self._debias_key != key:
            self._debias = debias_weights(self.q_hat(), self.config.beta)
            self._debias_key = key
        return self._debias

    def newer_model(self) -> tuple[int, Any] | None:
        """The shipped persona model (`streams.refit`) when it is newer than the one in use, else None."""
        from streams.refit import decode_model

        if self.config.decoder != "model" or self.tables.model is None:
            return None
        try:
            version, model = decode_model(self.tables.model.get("current"))
        except Exception:  # a table not yet recovered, or a bad record: keep the last model
            logger.debug("persona model not readable yet", exc_info=True)
            return None
        if model is None or version <= self.model_version:
            return None
        if model.decoder.n_personas != self.m:
            logger.error("persona model v%d has %d personas, the stream %d: ignored", version,
                         model.decoder.n_personas, self.m)
            self.model_version = version  # not again at every tick
            return None
        return version, model

    def install_model(self, version: int, model: Any) -> None:
        """Decide with `model` from now on (its zero-shot channel must be warm: `upgrade_model`)."""
        self.model, self.model_version, self._vectors = model, version, {}
        logger.info("persona model v%d in use", version)

    def item_vectors(self, names: list[str]) -> np.ndarray:
        """s(v) rows for item names under the current model (cached per name)."""
        missing = [n for n in dict.fromkeys(names) if n not in self._vectors]
        if missing:
            for name, row in zip(missing, self.model.item_vectors(missing)):
                self._vectors[name] = row
        if not names:
            return np.zeros((0, self.model.channel.width))
        return np.vstack([self._vectors[n] for n in names])

    def refit_due(self) -> int:
        """The label-count milestone a refit is due for (0 when none is)."""
        from streams.refit import milestone

        due = milestone(float(self.q_counts.sum())) if self.config.decoder == "model" else 0
        return due if due > self.model_version else 0

    def final_refit_due(self, now: float) -> int:
        """The version of a final refit (`streams.refit`) when one is due, else 0: the user side
        has been idle for IDLE_REFIT_S and the labels or purchases it applied changed since the
        last request. Asked once per change (the fingerprint), so a quiet shop costs nothing."""
        from streams.refit import FIRST_MILESTONE, IDLE_REFIT_S

        mark = (float(self.q_counts.sum()), self.applied_ops)
        if (self.config.decoder != "model" or mark[0] < FIRST_MILESTONE or mark == self._final_mark
                or now - self.last_applied < IDLE_REFIT_S):
            return 0
        self._final_mark = mark
        return max(int(mark[0]), self.model_version + 1, getattr(self, "_refit_asked", 0) + 1)

    def snapshot(self, state: UserState, psi: np.ndarray) -> tuple[PersonaSnapshot, bool]:
        """The user's decided personas, and whether real evidence (not the prior) decided them:
        the persona model (`core.decoder`, as `gplr label`) once one is shipped, else top-k of Ψ."""
        if self.model is not None:
            text = user_text_sum(state, self.model.add_text, self.model_version)
            return self.model.decide_user(psi, text, len(state.items)), True
        reached = bool(np.any(psi > 0))
        prior = None if reached or not self.q_counts.any() else self.q_hat()
        return rank_personas(psi, self.debias(), self.config.top_k, prior), reached

    def q_hat(self) -> np.ndarray:
        """Q̂ from the current label counts (cached until they change)."""
        key = self.q_counts.tobytes()
        if self._q_key != key:
            self._q_hat = label_distribution(self.q_counts[None, :])
            self._q_key = key
        return self._q_hat

    def _stats(self, partition: int) -> dict[str, int]:
        return self.tables.stats.get(f"p{partition}") or {"seen": 0, "excluded": 0, "requested": 0}

    # -- purchases -------------------------------------------------------------------------------
    def on_purchase_raw(self, key: bytes | None, payload: bytes | None) -> list[Out]:
        """Validate; invalid → dead letter with the original bytes and the reason."""
        return self.on_purchases_raw([(key, payload)])

    def on_purchases_raw(self, batch: Sequence[tuple[bytes | None, bytes | None]]) -> list[Out]:
        """Validate a batch of (key, payload); valid events travel as one user-ops message per
        user partition (an event id repeated within the batch is sent once), invalid ones to the
        dead letters."""
        out: list[Out] = []
        groups: dict[int, dict[str, PurchaseEvent]] = {}
        for key, payload in batch:
            metrics.EVENTS_IN.inc()
            try:
                event = parse_purchase(payload if payload is not None else b"")
                group = groups.setdefault(self._user_part(event.user_id), {})
            except InvalidEvent as exc:
                out.append(dead_letter(payload, key, exc.reason, exc.detail))
                continue
            except Exception as exc:  # last resort: a bug must cost this record, not the batch
                logger.exception("purchase dead-lettered as internal_error")
                out.append(dead_letter(payload, key, "internal_error", error_summary(exc)))
                continue
            if event.event_id in group:
                metrics.DUPLICATES.inc()
                continue
            group[event.event_id] = event
        for p, events in groups.items():
            evs = list(events.values())
            out.append(Out("user_ops", evs[0].user_id if len(evs) == 1 else None, encode_purchases(evs), p))
        return out

    # -- user side -------------------------------------------------------------------------------
    def on_user_ops(self, batch: Sequence[tuple[UserOp, int]], partition: int) -> list[Out]:
        """A batch of user-ops messages of one partition, in offset order: the protocol
        (`core.stream_protocol.UserBatch`: replays, de-duplication, memberships) applied message
        by message, then persona updates and label requests decided once per changed user."""
        work = _UserBatch(self, partition)
        for op, offset in batch:
            if op.kind == "purchase":
                self._user_purchases(work, op, offset)
            elif op.kind == "value":
                for item, seq, value, users, ts in decode_values(op):
                    for user in work.value(offset, item, seq, np.asarray(value, dtype=np.float64), users, ts):
                        logger.warning("value for unknown user %s skipped", user)
            elif op.kind == "label":
                self._user_label(work, op, offset)
            elif op.kind == "refresh":  # a new persona model: decide these users again
                work.refresh(offset, op.users, op.source_ts)
            else:
                logger.warning("unknown user op kind %r skipped", op.kind)
        return work.finish()

    def _user_purchases(self, work: _UserBatch, op: UserOp, offset: int) -> None:
        for eid, user, item, name, quantity, _price, ts in decode_purchases(op):
            state = work.state(user)
            new_user = state.events == 0
            outcome = work.purchase(offset, eid, user, item, name, quantity, ts)
            if outcome == "duplicate":  # a producer duplicate or a purchases replay
                _count(metrics.DUPLICATES.inc)
            if outcome not in ("edge", "repeat"):
                continue
            if new_user:  # (a label may have created the row before any purchase)
                self.policy.count_user(user, work.stats())
            self._note_applied()
            if outcome == "edge":
                _count(metrics.EDGES.inc)
                # `random` sampling decides here, at this offset, on the counters as they stand
                request = self.policy.consider_purchase(user, state, work.stats())
                if request is not None:
                    work.request(user, state, request)

    def _note_applied(self) -> None:
        self.applied_ops += 1
        self.last_applied = time.monotonic()

    def _user_label(self, work: _UserBatch, op: UserOp, offset: int) -> None:
        user = op.users[0]
        personas = tuple(p for p in dict.fromkeys(op.personas or ()) if 0 <= p < self.m)
        if work.label_is_noop(offset, user, personas, op.source_ts):
            return
        # Side doors (issue 9): checked here, where a label takes effect, not only where it is asked for.
        rejection = label_rejection(self.config, work.state(user, create=False), op.labelled_by)
        if rejection is None and not personas:
            rejection = "no_known_persona"
        if rejection is not None:
            work.out.append(dead_letter(op.dumps(), user, rejection, f"labelled_by={op.labelled_by[:64]!r}",
                                        source=USER_OPS))
            return
        state = work.set_label(offset, user, personas, op.source_ts)
        self._note_applied()
        previous = self._published(state)
        scores = list(op.scores or [])
        scores = scores if len(scores) == len(personas) else [1.0] * len(personas)
        snap = PersonaSnapshot(personas, tuple(float(s) for s in scores))
        state.published = dict(zip(snap.personas, snap.scores))
        work.out.append(self._update(user, state, snap, previous, "labelled", op.source_ts, op.labelled_by))

    def _count_labels(self, partition: int, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        key = f"p{partition}"
        counts = count_labels(decode_state(self.tables.labels.get(key)), old, new, self.m)
        self.tables.labels[key] = encode_state(counts)
        self.q_counts = count_labels(self.q_counts, old, new, self.m)

    @staticmethod
    def _published(state: UserState) -> PersonaSnapshot | None:
        if not state.published:
            return None
        return PersonaSnapshot(tuple(state.published), tuple(state.published.values()))

    def _update(self, user: str, state: UserState, now: PersonaSnapshot | None,
                previous: PersonaSnapshot | None, reason: str, source_ts: float,
                labelled_by: str = "") -> Out:
        by = labelled_by or ("prototype" if state.label is not None else "propagation")
        now = now or PersonaSnapshot((), ())
        text = None if self.model is None else (self.item_vectors, self.model.channel.intercept)
        body = persona_update(user, now, previous, self.personas, reason, by, source_ts,
                              state_evidence(state, now.personas, *(text or ())))
        if source_ts > 0 and reason != "replay":
            _count(metrics.EVENT_TO_UPDATE.observe, max(0.0, body["ts"] - source_ts))
        _count(metrics.PERSONA_CHANGES.inc)
        return Out("persona_updates", user, body)

    def _after_change(self, user: str, state: UserState, work: _UserBatch, reason: str,
                      source_ts: float) -> list[Out]:
        """Ψ̂[u] moved: publish on a (hysteresis-filtered) change; maybe ask for a label."""
        if state.label is not None:  # prototypes keep their own labels
            return []
        psi = psi_raw(state)
        # Until some prototype reaches the user (and before the first persona model), the most
        # common labeled personas stand in (as in batch GPLR); such an update says so ("prior").
        snap, reached = self.snapshot(state, psi)
        out: list[Out] = []
        previous = self._published(state)
        frozen_before = _frozen(state)
        first = not state.publishes
        if decide(state, snap, self.config.hysteresis):
            out.append(self._update(user, state, snap, previous, reason if reached else "prior", source_ts))
        frozen_now = _frozen(state)
        _count(self.frozen.observe, first and state.publishes == 1, frozen_now and not frozen_before,
                            frozen_before and not frozen_now)
        if not state.requested and self.config.sampling == "du":  # not reproducible (see labeling)
            request = self.policy.consider(user, state, psi, self.q_hat(), work.stats())
            if request is not None:
                work.request(user, state, request)
        return out

    # -- item side -------------------------------------------------------------------------------
    def on_item_ops(self, batch: Sequence[tuple[ItemOp, int]]) -> list[Out]:
        """A batch of item-ops messages of one partition, in offset order: upserts applied and
        pushes coalesced by `core.stream_protocol.apply_item_batch`; each touched row written
        once, and one user-ops message per destination partition."""
        done = apply_item_batch(self.tables.items.get, [(offset, decode_memberships(op)) for op, offset in batch],
                                self.m, self.theta)
        for item, state in done.rows.items():
            self.tables.items.put(item, state)
            residual = state.residual
            self._residual_total += residual - self._residuals.get(item, 0.0)
            self._residuals[item] = residual
        if done.rows:
            _count(metrics.RESIDUAL_MASS.set, self._residual_total)
        for _ in range(done.pushes):
            _count(metrics.PUSHES.inc)
        groups: dict[int, list[tuple[ItemValue, list[str], float]]] = {}
        for value, ts in done.values:
            by_part: dict[int, list[str]] = {}
            for user in value.users:
                by_part.setdefault(self._user_part(user), []).append(user)
            for p, members in by_part.items():
                groups.setdefault(p, []).append((value, members, ts))
        _count(metrics.PUSH_MESSAGES.inc, len(groups))
        return [Out("user_ops", None, encode_values(msgs), p) for p, msgs in groups.items()]


def replay_reason(state: UserState, model_shipped: bool = False) -> str:
    """Reason of a re-sent update: "replay", or "prior" when what is re-sent is the prior (no
    prototype reaches the user yet and no persona model decides), so readers treat it as they
    treated the original: a re-sent prior labeled "replay" read as affinity scores off by up to
    Q̂'s largest share."""
    if state.label is None and not model_shipped and not np.any(psi_raw(state) > 0):
        return "prior"
    return "replay"


def _frozen(state: UserState) -> bool:
    """Published once, then FROZEN_AFTER+ Ψ̂ changes without a re-publication."""
    return state.publishes == 1 and state.quiet >= metrics.FROZEN_AFTER


class _UserBatch(UserBatch):
    """`core.stream_protocol.UserBatch` plus what the worker decides for it: the partition's
    labeling budget row, label requests, persona updates and dead letters to send."""

    def __init__(self, logic: StreamLogic, partition: int) -> None:
        super().__init__(logic.tables.users.get, logic.m)
        self.logic, self.partition = logic, partition
        self._stats: dict[str, int] | None = None  # the partition's budget row, read once
        self.out: list[Out] = []

    def stats(self) -> dict[str, int]:
        """The partition's budget counters ({"seen", "excluded", "requested"}), changed in offset order and
        written once by `finish`."""
        if self._stats is None:
            self._stats = dict(self.logic._stats(self.partition))
        return self._stats

    def request(self, user: str, state: UserState, body: dict[str, Any]) -> None:
        """Send a label request for u (sent after the rows are written, with the batch's records)."""
        state.requested = True
        self.stats()["requested"] += 1
        self.out.append(Out("label_requests", user, body))

    def finish(self) -> list[Out]:
        """Decide updates, write each dirty row once, then list the sends."""
        logic, out = self.logic, self.out
        for user, source_ts in self.changed.items():
            out.extend(logic._after_change(user, self.rows[user], self, "propagated", source_ts))
        for user in self.replayed - set(self.changed):
            state = self.rows[user]
            out.append(logic._update(user, state, logic._published(state), None,
                                     replay_reason(state, logic.model is not None), 0.0))
        if self._stats is not None or self.replays:  # replays rewrite the budget row too (see `replay`)
            logic.tables.stats.put(f"p{self.partition}", self.stats())
        for user, state in self.rows_to_write().items():
            logic.tables.users.put(user, state)
        if logic.tables.prototypes is not None:
            for user, personas in self.labeled.items():
                logic.tables.prototypes.put(user, list(personas))
        for old, new in self.label_moves:  # after the rows, as before batching
            logic._count_labels(self.partition, old, new)
        groups: dict[int, list[tuple[Membership, float]]] = {}
        for membership, source_ts in self.memberships():
            part = partition_for(membership.item, logic.config.partitions)
            groups.setdefault(part, []).append((membership, source_ts))
        out.extend(Out("item_ops", None, encode_memberships(msgs), p) for p, msgs in groups.items())
        return out


#: Messages per batch, and how long each agent waits to fill one (the latency its hop may add):
#: the purchases agent only regroups, so it waits little; a longer wait on the sides coalesces
#: more (one row write, one push, one persona update for several messages), which is what lets
#: a worker keep up with a live stream, at a few hundred ms of latency in all.
BATCH_MAX = 1000
BATCH_WITHIN = {"purchases": 0.02, "user-ops": 0.1, "item-ops": 0.25}
_PUBLIC_JSON = frozenset({"persona_updates", "label_requests", "dlq"})


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _send(topics: StreamTopics, outs: list[Out]) -> list[Awaitable[Any]]:
    """Hand each record to the producer; returns their delivery reports (futures) to await."""
    reports: list[Awaitable[Any]] = []
    for out in outs:
        topic = getattr(topics, out.topic)
        if out.topic in _PUBLIC_JSON:  # plain JSON bodies: the stdlib encoder, not Faust's codec
            report = await topic.send(key=out.key, value=_dumps(out.value), partition=out.partition,
                                      value_serializer="raw")
            reports.append(report)
        else:  # internal ops split where one would exceed what a broker accepts (`MAX_OP_BYTES`)
            for value in bounded_ops(out.value):
                reports.append(await topic.send(key=out.key, value=value, partition=out.partition))
    return reports


def guarded(logic: StreamLogic, group: Sequence[faust.EventT], partition: int, handle, source: str) -> list[Out]:
    """`handle` one partition's events as a batch; if it raises, again one event at a time, and
    an event that still raises becomes an `internal_error` dead letter (its raw bytes and the
    traceback summary) while the others are applied.

    Why this is safe: a handler writes rows only at its end, and a failed attempt's cached rows
    are dropped, so the retry starts from the table; rows a failed attempt did write are
    complete and newer than its offsets, which the handlers treat as a replay (idempotent)."""
    try:
        with in_partition(group[-1]):
            return _attempt(handle, [(e.value, e.message.offset) for e in group], partition)
    except Exception:
        logic.tables.clear_caches()  # rows may be mutated but unwritten
        if len(group) == 1:
            return _dead_event(group[0], source)
        logger.exception("%s batch of %d failed; retrying one message at a time", source, len(group))
    outs: list[Out] = []
    for event in group:
        try:
            with in_partition(event):
                outs.extend(_attempt(handle, [(event.value, event.message.offset)], partition))
        except Exception:
            logic.tables.clear_caches()
            outs.extend(_dead_event(event, source))
    return outs


def _dead_event(event: faust.EventT, source: str) -> list[Out]:
    exc = sys.exc_info()[1]
    assert exc is not None
    logger.exception("%s message at offset %d dead-lettered as internal_error", source, event.message.offset)
    return [dead_letter(event.message.value, event.message.key, "internal_error", error_summary(exc), source)]


#: Exit status of a worker that could not send a batch's results (see `send_or_die`).
EXIT_SEND_FAILED = 70


async def send_or_die(topics: StreamTopics, outs: list[Out]) -> None:
    """Send a batch's records, wait until the broker acknowledged each of them and until the rows
    the batch wrote are in the changelogs; if any of it fails, end the process at once.

    Why wait: Faust commits a batch's offsets once it is acked, and its own flush before a commit
    may leave changelog records unsent (`streams._compat.changelog_written`); a kill -9 then
    leaves committed input whose rows the changelog never got. Why not raise: Faust's
    `take_events` acks a batch in a `finally`, so an exception here would commit offsets of
    records whose results (or dead letters) never left — the loss the reliability tests look for.
    Exiting before the ack leaves the offsets uncommitted, and the
    restarted worker replays the batch (idempotently, see the module docstring)."""
    try:
        await asyncio.gather(*await _send(topics, outs))  # the brokers' acknowledgements, not hand-off
        await changelog_written()
    except Exception:
        logger.critical("could not send a batch's results; exiting so that it is replayed", exc_info=True)
        logging.shutdown()
        os._exit(EXIT_SEND_FAILED)


async def upgrade_model(logic: StreamLogic) -> bool:
    """Install a newer shipped persona model, if there is one; True when one was installed.

    Its zero-shot channel loads MiniLM and embeds the persona definitions and the catalogue's
    words first, in a thread: a decision must never do that on the event loop (it took 20-40 s on
    a loaded host, the worker's timers, commits and agents all frozen meanwhile)."""
    async with logic.model_lock:
        found = logic.newer_model()
        if found is None:
            return False
        version, model = found
        if model.zero_shot is not None:
            await asyncio.get_running_loop().run_in_executor(None, model.zero_shot.warm)
        logic.install_model(version, model)
        return True


async def _model_upkeep(app: faust.App, logic: StreamLogic, topics: StreamTopics) -> None:
    """Ask for a refit at a new label milestone; on a newly shipped model, have every local user
    decide again (refresh user-ops, so the rows change under the user-ops agent as always)."""
    import time as _time

    due = logic.refit_due() or logic.final_refit_due(_time.monotonic())
    if due and due > getattr(logic, "_refit_asked", 0):
        logic._refit_asked = due  # type: ignore[attr-defined]
        await topics.refit.send(key="refit", value={"milestone": due}, partition=0)
    if not await upgrade_model(logic):
        return
    groups: dict[int, list[str]] = {}
    for user in list(logic.tables.users.table.keys()):
        groups.setdefault(partition_for(str(user), logic.config.partitions), []).append(str(user))
    for p, users in groups.items():
        for start in range(0, len(users), 500):
            await topics.user_ops.send(key=None, value=UserOp(kind="refresh", users=users[start:start + 500],
                                                             source_ts=_time.time()), partition=p)


async def _refit(logic: StreamLogic, request: Any) -> None:
    """Fit the persona model for a milestone in a thread and ship it (`streams.refit`)."""
    from streams.refit import decode_model, encode_model, fit_stream_model, prototype_labels
    from streams.tables import read_table
    from streams.topic_io import read_values
    from streams.topics import Topics

    try:
        due = int(request["milestone"])
    except (KeyError, TypeError, ValueError):
        logger.warning("malformed refit request skipped: %r", request)
        return
    current, _ = decode_model(logic.tables.model.get("current"))
    if due <= current:
        return
    names, cfg = Topics(logic.config.topic_prefix), logic.config
    want = int(logic.q_counts.sum())  # label mentions applied so far (the label-count table)

    def fit() -> dict[str, Any] | None:
        purchases = read_values(cfg.kafka_bootstrap, names.purchases, timeout=120.0)
        deadline = time.monotonic() + 60.0
        while True:  # the changelog lags the table (Faust's producer buffer): wait for every applied label
            labels = prototype_labels(read_table(cfg.kafka_bootstrap, cfg.app_id, "prototypes", timeout=120.0),
                                      logic.m)
            if sum(map(len, labels.values())) >= want or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        # the zero-shot channel: every known name is voted here, in the executor thread (the
        # process-wide cache of core.zero_shot), so the worker's decisions embed only newer names
        return fit_stream_model(purchases, labels, logic.m, REFIT_RULE, cfg.top_k,
                                logic.personas if cfg.zero_shot else None)

    started = time.monotonic()
    try:
        model = await asyncio.get_running_loop().run_in_executor(None, fit)
    except Exception as exc:  # a failed fit keeps the old model; the next milestone tries again
        logger.warning("persona model refit for milestone %d failed: %s", due, exc)
        return
    if model is None:
        return
    record = encode_model(due, model)
    logic.tables.model["current"] = record
    logger.info("persona model v%d fitted in %.1fs (%d bytes)", due, time.monotonic() - started, len(record))


#: The decision rule of the stream's persona model: batch GPLR's (`gplr label`'s) default.
REFIT_RULE = DEFAULT_RULE


def _by_partition(events: Sequence[faust.EventT]) -> dict[int, list[faust.EventT]]:
    groups: dict[int, list[faust.EventT]] = {}
    for event in events:
        groups.setdefault(event.message.partition, []).append(event)
    return groups


def register_agents(app: faust.App, logic: StreamLogic, topics: StreamTopics) -> None:
    """Attach the three stream agents (purchases, user-ops, item-ops) and the Q̂ refresh timer.

    Each takes up to BATCH_MAX events at a time; tables are touched per source partition
    (`in_partition`: Faust files a table write under the partition of the current event).
    Faust acks a batch's events only after the body returned, so a crash replays whole batches.
    """

    @app.agent(topics.purchases, name="purchases")
    async def purchases(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN["purchases"]):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            await send_or_die(topics, logic.on_purchases_raw([(e.message.key, e.message.value) for e in events]))

    def per_partition(events: Sequence[faust.EventT], handle, source: str) -> list[Out]:
        outs: list[Out] = []
        for partition, group in _by_partition(events).items():
            outs.extend(guarded(logic, group, partition, handle, source))
        return outs

    @app.agent(topics.user_ops, name="user-ops")
    async def user_ops(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN["user-ops"]):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            if not logic.model_checked:  # a restarted worker decides with its recovered model, warm
                await upgrade_model(logic)
                logic.model_checked = True
            await send_or_die(topics, per_partition(events, logic.on_user_ops, USER_OPS))

    @app.agent(topics.item_ops, name="item-ops")
    async def item_ops(stream: faust.StreamT) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN["item-ops"]):  # type: ignore[attr-defined]  # not in faust's StreamT stub
            await send_or_die(topics, per_partition(events, lambda batch, _p: logic.on_item_ops(batch), ITEM_OPS))

    @app.timer(interval=1.0)
    async def refresh_label_distribution() -> None:
        logic.refresh_q()
        await _model_upkeep(app, logic, topics)

    @app.agent(topics.refit, name="refit")
    async def refit(stream: faust.StreamT) -> None:
        """Refit requests (all on partition 0: one worker serves them, in order)."""
        async for request in stream:
            await _refit(logic, request)
