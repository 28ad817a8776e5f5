"""`gplr backfill`: start the stream warm from a purchase history instead of replaying it.

Replaying an Instacart-sized history through one worker takes most of an hour; the batch engine
computes the same state in seconds. This module:

1. groups the history and builds every row the worker keeps (`core.backfill`: user rows with
   their edges, told values, T[u], label and seen event ids; item rows with buyers, S[v], M̃[v]
   and push seq), with prototypes from a labels file (operator labels) or a fresh budget chosen
   with the stream's own `random` coin (`streams.labeling.seeded_unit`, per partition, budget ×
   users rounded half up as `LabelPolicy.allowed`) and labeled by the configured labeler;
2. decides every unlabeled user's personas with the worker's own `StreamLogic.snapshot` and
   `decide` (the persona model is fitted on the history as `streams.refit` would, and shipped
   when the labels reach the first milestone), and publishes one persona update per user
   (reason "backfill", or "prior" where no prototype reaches the user), so `gplr export` works;
3. writes the rows to the tables' changelog topics — the key as Faust serialises a str key
   (JSON), the value as the worker's `encode_state`, the partition the worker's murmur2
   `partition_for` of the key (the user-ops/item-ops partition whose agent owns the row; budget
   and label-count rows "p<n>" in partition n; the persona model in partition 0);
4. records where live consumption starts: with `--publish-history` the history is produced to
   `purchases` first (so refits and the trainer, which read that topic, see it); either way the
   worker group's offsets on `purchases` are committed at the topic's end, so a worker started
   afterwards recovers the tables from the changelogs and consumes only what arrives later.

It refuses a deployment whose users changelog already holds rows (backfill starts a stream; it
does not merge into a running one).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from streams.config import StreamConfig

if TYPE_CHECKING:  # (imported where used: `gplr --help` must not load Faust)
    import pandas as pd

    from core.backfill import HistoryIndex

__all__ = ["BackfillError", "BackfillReport", "run_backfill", "write_rows", "CountingSink", "choose_prototypes",
           "label_users", "read_labels", "end_offsets",
           "cmd_backfill", "add_parser", "TABLES", "faust_key"]

logger = logging.getLogger(__name__)

#: The worker's tables (streams.tables.define_tables) whose changelogs a backfill writes.
TABLES = ("users", "items", "stats", "label-counts", "persona-model", "prototypes")
#: Compression of the changelog batches the backfill writes (the worker reads lz4 through cramjam).
CHANGELOG_COMPRESSION = "lz4"
#: Rows per produce/flush round (bounds the backfill's memory: rows are built, sent and dropped).
CHUNK_USERS = 5_000


class BackfillError(Exception):
    """A backfill that cannot start (the CLI prints it as one line)."""


@dataclass
class BackfillReport:
    users: int
    items: int
    history_events: int
    duplicates: int
    prototypes: int
    model_version: int
    changelog_records: int
    changelog_bytes: int
    bytes_by_topic: dict[str, list[int]]  # topic → [records, bytes, largest record's bytes]
    published_history: int
    start_offsets: dict[int, int]
    last_ts: float
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def faust_key(key: str) -> bytes:
    """A table key as the worker's Faust tables serialise it (str keys with the app's JSON codec)."""
    from faust.serializers import codecs

    return codecs.dumps("json", key)


def choose_prototypes(index: HistoryIndex, config: StreamConfig, excluded: frozenset[str] = frozenset()
                      ) -> list[int]:
    """Users (codes) to label: per user partition, budget × its users rounded half up (as
    `LabelPolicy.allowed` spends it), among users with ≥ GPLR_LABEL_MIN_PURCHASES distinct items,
    the lowest `seeded_unit(user, 0)` first (the stream's reproducible `random` coin, one per user)."""
    from streams.labeling import seeded_unit
    from streams.records import partition_for

    if config.labeler == "none" or config.label_budget <= 0:
        return []
    degrees = index.degrees
    by_part: dict[int, list[int]] = {}
    users_in: dict[int, int] = {}
    for u, uid in enumerate(index.user_ids):
        p = partition_for(str(uid), config.partitions)
        users_in[p] = users_in.get(p, 0) + 1
        if degrees[u] >= config.label_min_purchases and str(uid) not in excluded:
            by_part.setdefault(p, []).append(u)
    chosen: list[int] = []
    for p, candidates in by_part.items():
        allowed = math.floor(config.label_budget * users_in[p] + 0.5 + 1e-9)
        ranked = sorted(candidates, key=lambda u: seeded_unit(str(index.user_ids[u]), 0))
        chosen.extend(ranked[:allowed])
    return sorted(chosen)


def label_users(index: HistoryIndex, users: Sequence[int], config: StreamConfig, personas
                ) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[float, ...]]]:
    """Label `users` with the configured labeler (histories as the worker's requests carry them)."""
    from streams.labeling import build_labeler, label_batch

    labeler = build_labeler(config, personas)
    if labeler is None or not len(users):
        return {}, {}
    code = {str(index.user_ids[u]): u for u in users}
    requests = [{"user": str(index.user_ids[u]), "history": index.history(u)} for u in users]
    labels, scores = {}, {}
    for start in range(0, len(requests), 256):
        for result in label_batch(labeler, requests[start:start + 256]):
            if result.ok and result.user_id in code:
                labels[code[result.user_id]] = tuple(result.personas)
                scores[code[result.user_id]] = tuple(result.scores)
    return labels, scores


class CountingSink:
    """A sink that only counts (what `write_rows` would send): sizing without a broker."""

    def __init__(self) -> None:
        self.records = self.bytes = 0
        self.by_topic: dict[str, list[int]] = {}  # topic → [records, bytes, largest record's bytes]

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int) -> None:
        size = len(value) + len(key or b"")
        self.records += 1
        self.bytes += size
        entry = self.by_topic.setdefault(topic, [0, 0, 0])
        entry[0] += 1
        entry[1] += size
        entry[2] = max(entry[2], size)

    def flush(self) -> None:
        pass


class _Sink(CountingSink):
    """A confluent-kafka producer counting records and bytes, failing loudly on a lost record."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka import Producer

        super().__init__()
        # lz4 batches: a recovering worker holds a fetch response's bytes until it has applied its
        # records, so smaller batches mean less memory; gzip (3x smaller) took the consumer thread so
        # long to inflate that a worker on a loaded machine missed heartbeats (docs/RESULTS.md §9).
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20, "acks": "all",
                                  "compression.type": CHANGELOG_COMPRESSION,
                                  "batch.size": 1_000_000, "queue.buffering.max.kbytes": 512 * 1024,
                                  "message.max.bytes": 16 * 1024**2, "log_level": 2})
        self.failed: list[str] = []

    def _done(self, err, _msg) -> None:
        if err is not None:
            self.failed.append(str(err))

    def send(self, topic: str, key: bytes | None, value: bytes, partition: int) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key, partition=partition, on_delivery=self._done)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)
        super().send(topic, key, value, partition)

    def flush(self) -> None:
        left = self.producer.flush(120)
        if left or self.failed:
            raise BackfillError(f"{left + len(self.failed)} records not delivered"
                                f"{': ' + self.failed[0] if self.failed else ''}")


def _prepare_topics(config: StreamConfig) -> None:
    """The stream's topics, and the tables' changelogs compacted as Faust declares them."""
    from confluent_kafka.admin import NewTopic

    from streams.tables import CHANGELOG_TOPIC_CONFIG, changelog_topic
    from streams.topics import admin_client, create_topics, topics_for

    create_topics(config.kafka_bootstrap, topics_for(config).all(), config.partitions)
    admin = admin_client(config.kafka_bootstrap)
    existing = admin.list_topics(timeout=30).topics
    missing = [changelog_topic(config.app_id, t) for t in TABLES
               if changelog_topic(config.app_id, t) not in existing]
    if missing:
        compacted = {"cleanup.policy": "compact", **CHANGELOG_TOPIC_CONFIG}
        futures = admin.create_topics([NewTopic(n, num_partitions=config.partitions, replication_factor=1,
                                                config=compacted) for n in missing])
        for future in futures.values():
            future.result(30)
    create_topics(config.kafka_bootstrap, [changelog_topic(config.app_id, t) for t in TABLES],
                  config.partitions)  # waits until every partition is led


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    """The end offset of every partition of `topic`."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "gplr-backfill-probe", "log_level": 3})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics[topic]
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in meta.partitions}
    finally:
        consumer.close()


def _commit_start(config: StreamConfig, topic: str, ends: Mapping[int, int]) -> None:
    """Commit the worker group's offsets on `topic` at `ends`: where live consumption starts."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": config.app_id,
                         "enable.auto.commit": False, "log_level": 3})
    try:
        consumer.commit(offsets=[TopicPartition(topic, p, o) for p, o in ends.items()], asynchronous=False)
    finally:
        consumer.close()


def _fit_model(frame: pd.DataFrame, index: HistoryIndex, labels: Mapping[int, Sequence[int]],
               config: StreamConfig, n_personas: int):
    """(version, PersonaModel, encoded record) as the worker's first refit would ship them, or None
    (graph decoder, or fewer labels than the first milestone)."""
    from core.decoder import PersonaModel
    from streams.agents import REFIT_RULE
    from streams.refit import encode_model, fit_graph_model, history_graph, milestone

    mentions = sum(len(p) for p in labels.values())
    version = milestone(float(mentions))
    if config.decoder != "model" or not version:
        return None
    body = fit_graph_model(history_graph(frame), {str(index.user_ids[u]): p for u, p in labels.items()},
                           n_personas, REFIT_RULE, config.top_k, config.personas() if config.zero_shot else None)
    if body is None:
        return None
    return version, PersonaModel.from_dict(body), encode_model(version, body)


def _laps() -> tuple[dict[str, float], Callable[[str], None]]:
    """Seconds per stage (wall), and "<stage>_cpu" the process's CPU seconds in it: on a shared
    machine the wall time says how busy the others were, the CPU time what the stage costs."""
    seconds: dict[str, float] = {}
    clock = [time.monotonic(), time.process_time()]

    def lap(name: str) -> None:
        now, cpu = time.monotonic(), time.process_time()
        seconds[name] = round(seconds.get(name, 0.0) + now - clock[0], 3)
        seconds[f"{name}_cpu"] = round(seconds.get(f"{name}_cpu", 0.0) + cpu - clock[1], 3)
        clock[:] = [now, cpu]

    return seconds, lap


def write_rows(config: StreamConfig, frame: pd.DataFrame, labels: Mapping[str, Sequence[int]] | None, sink: Any,
               updates: bool = True, say: Callable[[str], None] = lambda _m: None,
               lap: Callable[[str], None] = lambda _n: None) -> dict[str, Any]:
    """Build every table row for `frame` and send it to `sink` (`send(topic, key, value,
    partition)`, `flush()`); the history's summary. See `run_backfill`."""
    from core.backfill import HISTORY_OFFSET, HistoryIndex, StateBuilder
    from core.incremental import threshold
    from streams.agents import StreamLogic
    from streams.labeling import LabelPolicy
    from streams.records import partition_for
    from streams.tables import changelog_topic, encode_packed, encode_state, item_tuple
    from streams.topics import topics_for

    personas = config.personas()
    m = len(personas)
    index = HistoryIndex.from_frame(frame)
    lap("index")
    say(f"history: {index.events} purchases, {index.n_users} users, {index.n_items} items, "
        f"{index.n_edges} edges ({index.duplicates} repeated event ids dropped)")
    policy = LabelPolicy(config)  # who is held out, and the worker's own budget counting
    scores: dict[int, tuple[float, ...]] = {}
    requested: set[int] = set()
    if labels is not None:
        code = {str(uid): u for u, uid in enumerate(index.user_ids)}
        prototypes = {code[str(k)]: tuple(int(p) for p in v) for k, v in labels.items() if str(k) in code}
    else:
        chosen = choose_prototypes(index, config, policy.excluded)
        prototypes, scores = label_users(index, chosen, config, personas)
        requested = set(chosen)
    builder = StateBuilder(index, prototypes, m, threshold(config.eps, 1))
    lap("labels")
    say(f"prototypes: {len(builder.labels)}")

    fitted = _fit_model(frame, index, builder.labels, config, m)
    lap("model")
    logic = StreamLogic(config, personas, tables=None, policy=None)  # type: ignore[arg-type]
    logic.q_counts = builder.label_counts()
    if fitted is not None:
        logic.model_version, logic.model = fitted[0], fitted[1]

    items_log, users_log = changelog_topic(config.app_id, "items"), changelog_topic(config.app_id, "users")
    for c in builder.item_columns():
        row = item_tuple(m, c.users, c.versions, c.labeled, c.label_mask, c.labels, c.s, c.told, c.seq,
                         HISTORY_OFFSET)
        sink.send(items_log, faust_key(c.item), encode_packed(row), partition_for(c.item, config.partitions))
    sink.flush()
    lap("items")

    stats: dict[int, dict[str, int]] = {}
    counts: dict[int, np.ndarray] = {}
    updates_topic = topics_for(config).persona_updates
    bulk = logic.model is None and not updates  # graph decoder, no update bodies: rows built in bulk
    user_ids = index.user_ids.tolist()
    for start in range(0, index.n_users, CHUNK_USERS):
        stop = min(start + CHUNK_USERS, index.n_users)
        rows = (_bulk_rows(builder, logic, start, stop, scores, requested) if bulk
                else _object_rows(builder, logic, start, stop, scores, requested, index.last_ts, updates))
        for u, value, update in rows:
            uid = str(user_ids[u])
            p = partition_for(uid, config.partitions)
            row_stats = stats.setdefault(p, {"seen": 0, "excluded": 0, "requested": 0})
            policy.count_user(uid, row_stats)
            row_stats["requested"] += u in requested
            label_personas = builder.labels.get(u)
            if label_personas:
                counts.setdefault(p, np.zeros(m))[list(label_personas)] += 1
                sink.send(changelog_topic(config.app_id, "prototypes"), faust_key(uid),
                          encode_state(list(label_personas)), p)
            sink.send(users_log, faust_key(uid), value, p)
            if update is not None:
                sink.send(updates_topic, uid.encode(), _json(update), p)
        sink.flush()
        say(f"users: {stop}/{index.n_users}")
    for p in range(config.partitions):
        key = faust_key(f"p{p}")
        sink.send(changelog_topic(config.app_id, "stats"), key,
                  encode_state(stats.get(p, {"seen": 0, "excluded": 0, "requested": 0})), p)
        if p in counts:
            sink.send(changelog_topic(config.app_id, "label-counts"), key, encode_state(counts[p]), p)
    if fitted is not None:
        sink.send(changelog_topic(config.app_id, "persona-model"), faust_key("current"), fitted[2], 0)
    sink.flush()
    lap("users")
    return {"users": index.n_users, "items": index.n_items, "history_events": index.events,
            "edges": index.n_edges, "duplicates": index.duplicates, "prototypes": len(builder.labels),
            "model_version": logic.model_version, "last_ts": index.last_ts}


def run_backfill(config: StreamConfig, frame: pd.DataFrame, labels: Mapping[str, Sequence[int]] | None = None,
                 publish_history: bool = False, progress: Callable[[str], None] | None = None,
                 updates: bool = True) -> BackfillReport:
    """Backfill the deployment `config` points at from `frame` (canonical purchases).

    `labels`: operator labels (user id → persona indices) used as the prototypes; None → a fresh
    budget through the configured labeler (`choose_prototypes`). `updates=False` skips the
    persona update per user (half the backfill's time: their evidence; the rows are the same)."""
    from streams.tables import changelog_topic
    from streams.topics import topics_for

    say = progress or (lambda _msg: None)
    seconds, lap = _laps()
    topics = topics_for(config)
    _prepare_topics(config)
    users_log = changelog_topic(config.app_id, "users")
    if any(end_offsets(config.kafka_bootstrap, users_log).values()):
        raise BackfillError(f"{users_log} already holds rows: backfill starts a new deployment "
                            f"(use another GPLR_APP_ID, or delete the app's topics first)")
    lap("prepare")
    sink = _Sink(config.kafka_bootstrap)
    summary = write_rows(config, frame, labels, sink, updates, say, lap)
    published = 0
    if publish_history:
        from core.data import iter_events
        from streams.topic_io import publish_events

        published = publish_events(config.kafka_bootstrap, topics.purchases, iter_events(frame), timeout=120.0)
        lap("publish_history")
    ends = end_offsets(config.kafka_bootstrap, topics.purchases)
    _commit_start(config, topics.purchases, ends)
    lap("commit")
    return BackfillReport(users=summary["users"], items=summary["items"], history_events=summary["history_events"],
                          duplicates=summary["duplicates"], prototypes=summary["prototypes"],
                          model_version=summary["model_version"], changelog_records=sink.records,
                          changelog_bytes=sink.bytes,
                          bytes_by_topic=sink.by_topic, published_history=published, start_offsets=ends,
                          last_ts=summary["last_ts"], seconds=seconds)


def _object_rows(builder: Any, logic: Any, start: int, stop: int, scores: Mapping[int, tuple[float, ...]],
                 requested: set[int], ts: float, updates: bool) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """(user code, encoded row, persona update or None) through the row objects and `_decide`:
    the reference, and the path for the persona model or update bodies (their evidence)."""
    from streams.tables import encode_state

    for u in range(start, stop):
        state = builder.user_row(u)
        state.requested = u in requested
        update = _decide(logic, str(builder.index.user_ids[u]), state, scores.get(u), ts, updates)
        yield u, encode_state(state), update


def _bulk_rows(builder: Any, logic: Any, start: int, stop: int, scores: Mapping[int, tuple[float, ...]],
               requested: set[int]) -> Iterator[tuple[int, bytes, None]]:
    """What `_object_rows` yields for the graph decoder without update bodies, byte for byte,
    from columns built for the whole chunk (`StateBuilder.user_columns`) and decisions made for
    it at once (`_bulk_published`)."""
    from core.backfill import HISTORY_OFFSET
    from streams.tables import encode_packed, user_tuple

    cols = builder.user_columns(start, stop)
    published = _bulk_published(logic, cols.psi)
    for j, u in enumerate(range(start, stop)):
        personas = builder.labels.get(u)
        if personas:
            given = tuple(scores.get(u) or ())
            given = given if len(given) == len(personas) else (1.0,) * len(personas)
            chosen = tuple(dict(zip(personas, given)).items())
            label, version, publishes = builder.phi[u].tobytes(), 1, 0
        else:
            chosen, personas, label, version = published[j], (), None, 0
            publishes = int(bool(chosen))
        row = user_tuple(builder.m, cols.keys[j], cols.names[j], cols.ints[j], cols.value_masks[j], cols.values[j],
                         label, personas, version, cols.total[j], cols.events[j], HISTORY_OFFSET, chosen,
                         u in requested, cols.recent[j], publishes, 0)
        yield u, encode_packed(row), None


def _bulk_published(logic: Any, psi: np.ndarray) -> list[tuple[tuple[int, float], ...]]:
    """Per row of Ψ_raw, the (persona, score) pairs `decide` records for a fresh row on the
    graph decoder: `rank_personas` (de-biased, Q̂ where no prototype reaches the user, top-k of
    the positive scores, ties by persona index) for all rows at once."""
    from core.incremental import top_personas, with_prior

    scores = psi * logic.debias()
    prior = logic.q_hat() if logic.q_counts.any() else None
    scores = with_prior(scores, prior, ~(psi > 0).any(axis=1) & ~(scores > 0).any(axis=1))
    rank, top = top_personas(scores, logic.config.top_k)
    return [tuple((m, s) for m, s in zip(ms, ss) if s > 0) for ms, ss in zip(rank.tolist(), top.tolist())]


def _decide(logic: Any, user: str, state: Any, label_scores: tuple[float, ...] | None, ts: float,
            body: bool = True) -> dict[str, Any] | None:
    """The persona update the worker would have published last for this row (and the row's
    `published`/`publishes` as `decide` leaves them): a prototype's label, else its decision.
    `body=False`: the row only (no update to send)."""
    from core.incremental import PersonaSnapshot, decide, psi_raw

    if state.label is not None:
        personas = state.label_personas
        given = tuple(label_scores or ())
        snap = PersonaSnapshot(personas, given if len(given) == len(personas) else (1.0,) * len(personas))
        state.published = dict(zip(snap.personas, snap.scores))
        return logic._update(user, state, snap, None, "labelled", ts).value if body else None
    snap, reached = logic.snapshot(state, psi_raw(state))
    if not decide(state, snap, logic.config.hysteresis) or not body:
        return None
    return logic._update(user, state, snap, None, "backfill" if reached else "prior", ts).value


def _json(body: Mapping[str, Any]) -> bytes:
    import json

    return json.dumps(body, separators=(",", ":")).encode()


def read_labels(path, personas) -> dict[str, list[int]]:
    """Operator labels (`gplr label` output or a `CustomerID,personas` CSV) as persona indices;
    ValueError for a file without them or with names outside the persona set."""
    from core.personas import read_persona_labels

    out: dict[str, list[int]] = {}
    unknown: set[str] = set()
    for user, names in read_persona_labels(path).items():
        idx = [personas.index_of(n) for n in names]
        unknown.update(n for n, i in zip(names, idx) if i is None)
        if any(i is not None for i in idx):
            out[user] = [i for i in idx if i is not None]
    if not out:
        raise ValueError(f"label file {path}: no label names a persona of the set"
                         f"{' (unknown: ' + ', '.join(sorted(unknown)[:3]) + ')' if unknown else ''}")
    return out


def cmd_backfill(args) -> int:
    """`gplr backfill --data FILE [--columns ...] [--labels FILE] [--publish-history]`."""
    import json
    import sys

    from core.data_options import load_data
    from streams.cli import _config, _need_bootstrap

    config = _config()
    _need_bootstrap(config, "backfill")
    frame, _ = load_data(args, args.data, "backfill", require_ts=True)
    try:
        labels = None if args.labels is None else read_labels(args.labels, config.personas())
        report = run_backfill(config, frame, labels, publish_history=args.publish_history, updates=not args.no_updates,
                              progress=lambda msg: print(f"backfill: {msg}", file=sys.stderr, flush=True))
    except (BackfillError, ValueError, OSError) as exc:
        raise SystemExit(f"gplr backfill: {' '.join(str(exc).split())}") from None
    print(json.dumps(report.as_dict()))
    return 0


def add_parser(subparsers) -> None:
    """Register `gplr backfill` (called from `streams.cli.register`)."""
    from pathlib import Path

    from core.data_options import add_data_options

    p = subparsers.add_parser("backfill", help="build the stream's state from a purchase history (no replay)",
                              description="Compute every table row the worker keeps from a purchases file "
                                          "with the batch engine, write them to the tables' changelogs, and "
                                          "commit the worker group's start on `purchases`; then start "
                                          "`gplr worker` (docs/operations.md, Backfill).")
    p.add_argument("--data", type=Path, required=True, help="purchases history (CSV/Parquet, with ts)")
    add_data_options(p)
    p.add_argument("--labels", type=Path, default=None,
                   help="operator labels to use as the prototypes (`gplr label` output or CustomerID,personas "
                        "CSV); default: a fresh GPLR_LABEL_BUDGET through GPLR_LABELER")
    p.add_argument("--publish-history", action="store_true",
                   help="also produce the history to `purchases` (refits and `gplr trainer` read that topic)")
    p.add_argument("--no-updates", action="store_true",
                   help="no persona update per user (faster; `gplr export` then lists only users updated live)")
    p.set_defaults(func=cmd_backfill)
