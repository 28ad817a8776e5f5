"""The worker's state: Faust tables (RocksDB via rocksdict, changelogged to Kafka).

Every user-side table is written only by the user-ops agent and every item-side table only by
the item-ops agent, so each row lives in exactly one partition's store (Faust writes a key to
the changelog partition of the event being processed). Rows hold whole `core.incremental`
states, pickled (arrays as raw bytes; the per-item and per-buyer ones compacted by
`core.row_codec`): one write per row per batch keeps a row's update atomic, which is what the
idempotence argument in `streams.agents` relies on.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import faust
import numpy as np
from faust.types.tables import GlobalTableT, TableT

from core.incremental import ItemState, UserItem, UserState
from core.row_codec import dense_floats, narrow_ints, sparse_floats, wide_ints
from streams._compat import current_event

__all__ = ["in_partition", "StateTable", "Tables", "define_tables", "encode_state", "decode_state", "encode_packed",
           "user_tuple", "item_tuple", "label_counts",
           "changelog_entry", "changelog_topic", "read_table"]

logger = logging.getLogger(__name__)
S = TypeVar("S")

#: RocksDB options of every table (one database per table partition). Faust's defaults are
#: sized for one big table per process: a 2 GiB block cache and 3 × 64 MiB memtables *per
#: database*, so with 4 tables × P partitions the worker's RSS grew with the data and never came
#: back (334 MB → 1,058 MB over 100k events). Rows are read through the decoded-row cache, so a
#: small block cache costs little; small memtables flush to disk sooner.
ROCKSDB_OPTIONS = {"write_buffer_size": 4 * 1024**2, "max_write_buffer_number": 2,
                   "block_cache_size": 8 * 1024**2, "block_cache_compressed_size": 8 * 1024**2,
                   "target_file_size_base": 16 * 1024**2}
#: Topic configuration of every table's changelog, beside the compaction Faust declares. A broker
#: compacts only closed segments; with Kafka's 1 GiB default a changelog keeps every version of a
#: row until a segment that large fills, and a live worker writes ~2.5 user rows (~19 kB) per
#: purchase at grocery density, so recovery time and broker storage would grow with every
#: purchase rather than with the rows (docs/operations.md, Sizing). `gplr backfill` creates the
#: changelogs with the same settings.
CHANGELOG_TOPIC_CONFIG = {"segment.bytes": str(16 * 1024**2)}
#: Decoded rows kept per table (see `StateTable`): what a batch touches again soon, bounded by
#: count and by the memory the decoded rows hold (`row_footprint`) — at grocery density a decoded
#: user row is ~20-100 kB, so 50,000 rows alone let a worker pass 4 GiB at 1/2 Instacart scale.
#: 192 MiB per table is about what the former bound (64 MiB of first-layout encoded rows) held.
ROW_CACHE_ROWS = 50_000
ROW_CACHE_BYTES = 192 * 1024**2


def row_footprint(state: Any, encoded: int) -> int:
    """Bytes a decoded row holds in memory, estimated (tracemalloc, 16 personas: ≈ 470 per user
    item, 150 per item buyer). Why not the encoded size: compact rows decode to 6-14 times their
    bytes, so a bound on encoded bytes would let the cache's memory grow with every encoding gain."""
    if isinstance(state, UserState):
        return 1400 + (340 + 8 * state.n_personas) * len(state.items) + 8 * len(state.recent_ids)
    if isinstance(state, ItemState):
        return 1800 + 150 * len(state.buyers)
    return encoded


def _raw(arr: np.ndarray | None) -> bytes | None:
    """Arrays travel as raw float64/int64 bytes: pickling bytes is far cheaper than an ndarray."""
    return None if arr is None else np.ascontiguousarray(arr).tobytes()


@overload
def _arr(raw: bytes, dtype: type = ..., cols: int | None = ...) -> np.ndarray: ...
@overload
def _arr(raw: None, dtype: type = ..., cols: int | None = ...) -> None: ...
def _arr(raw: bytes | None, dtype: type = np.float64, cols: int | None = None) -> np.ndarray | None:
    """Inverse of `_raw` (a writable copy)."""
    if raw is None:
        return None
    arr: np.ndarray = np.frombuffer(raw, dtype=dtype).copy()
    return arr if cols is None else arr.reshape(-1, cols)


#: Tags of the packed rows. Rows of the first layout ("user", "item": every array float64/int64)
#: may still sit in a changelog written before the compact one; they decode as they were.
USER_TAG, ITEM_TAG = "user/2", "item/2"


def user_tuple(m: int, keys: list[str], names: list[str], ints: bytes, value_mask: bytes, values: bytes,
               label: bytes | None, label_personas: tuple[int, ...], label_version: int, total: bytes | None,
               events: int, applied: int, published: tuple, requested: bool, recent: bytes | None,
               publishes: int = 0, quiet: int = 0,
               text: bytes | None = None, text_items: int = 0, text_version: int = -1) -> tuple:
    """A user row as it is pickled (the one place of its layout): `ints` are (count, seq, quantity)
    per item (`core.row_codec.narrow_ints`), `value_mask`/`values` the told values × m per item
    (`sparse_floats`; NaN: no reply yet), `recent` the event-id hashes as int64. `core.backfill`
    builds these columns for many rows at once."""
    return (USER_TAG, m, keys, names, ints, value_mask, values, label, label_personas, label_version, total, events,
            applied, published, requested, recent, publishes, quiet, text, text_items, text_version)


def _pack_user(st: UserState) -> tuple:
    keys = list(st.items)
    rows = list(st.items.values())
    ints = np.array([(it.count, it.seq, it.quantity) for it in rows], dtype=np.int64).reshape(-1, 3)
    pending = np.full(st.n_personas, np.nan)
    values = np.array([pending if it.value is None else it.value for it in rows], dtype=np.float64
                      ).reshape(len(rows), st.n_personas)
    mask, told = sparse_floats(values)
    return user_tuple(st.n_personas, keys, [it.name for it in rows], narrow_ints(ints), mask, told, _raw(st.label),
                      st.label_personas, st.label_version, _raw(st.total), st.events, st.applied_offset,
                      tuple(st.published.items()), st.requested, _raw(np.array(st.recent_ids, dtype=np.int64)),
                      st.publishes, st.quiet, _raw(st.text), st.text_items, st.text_version)


def _user_state(m: int, keys: list[str], names: list[str], ints: np.ndarray, values: np.ndarray,
                rest: tuple) -> UserState:
    (label, lp, lv, total, events, applied, published, requested, recent, publishes, quiet, text, text_items,
     text_version) = rest
    pending = np.isnan(values[:, 0]).tolist() if len(values) and values.shape[1] else [False] * len(keys)
    items = {
        k: UserItem(c, q, None if p else v, qty, n)
        for k, n, (c, q, qty), v, p in zip(keys, names, ints.tolist(), list(values), pending)
    }
    return UserState(m, items, _arr(label), tuple(lp), lv, _arr(total), events, applied, dict(published),
                     requested, _arr(recent, np.int64).tolist(), publishes, quiet, _arr(text),
                     text_items, text_version)


def _unpack_user(t: tuple) -> UserState:
    _, m, keys, names, ints, mask, values = t[:7]
    return _user_state(m, keys, names, wide_ints(ints, 3 * len(keys)).reshape(-1, 3),
                       dense_floats(mask, values, len(keys), m), t[7:])


def _unpack_user_v1(t: tuple) -> UserState:
    """A row of the first layout (float64 told values, int64 counters)."""
    _, m, keys, names, ints, values = t[:6]
    return _user_state(m, keys, names, _arr(ints, np.int64, 3), _arr(values, np.float64, m), t[6:])


def item_tuple(m: int, users: list[str], versions: bytes, labeled: list[int], label_mask: bytes, labels: bytes,
               s: bytes | None, told: bytes | None, seq: int, applied: int) -> tuple:
    """An item row as it is pickled (the one place of its layout): `versions` per buyer
    (`core.row_codec.narrow_ints`), `labeled` the positions of buyers with a label,
    `label_mask`/`labels` their labels × m (`sparse_floats`)."""
    return (ITEM_TAG, m, users, versions, labeled, label_mask, labels, s, told, seq, applied)


def _pack_item(st: ItemState) -> tuple:
    users = list(st.buyers)
    versions = np.array([v for v, _ in st.buyers.values()], dtype=np.int64)
    labeled = [i for i, (_, lab) in enumerate(st.buyers.values()) if lab is not None]
    labels = np.array([st.buyers[users[i]][1] for i in labeled]).reshape(len(labeled), st.n_personas)
    mask, packed = sparse_floats(labels)
    return item_tuple(st.n_personas, users, narrow_ints(versions), labeled, mask, packed, _raw(st.s), _raw(st.told),
                      st.seq, st.applied_offset)


def _item_state(m: int, users: list[str], versions: np.ndarray, labeled: list[int], labels: np.ndarray,
                s: bytes, told: bytes, seq: int, applied: int) -> ItemState:
    lab: list[np.ndarray | None] = [None] * len(users)
    for i, row in zip(labeled, labels):
        lab[i] = row
    buyers = {u: (int(v), lb) for u, v, lb in zip(users, versions.tolist(), lab)}
    return ItemState(m, buyers, _arr(s), _arr(told), seq, applied)


def _unpack_item(t: tuple) -> ItemState:
    _, m, users, versions, labeled, mask, labels, s, told, seq, applied = t
    return _item_state(m, users, wide_ints(versions, len(users)), labeled,
                       dense_floats(mask, labels, len(labeled), m), s, told, seq, applied)


def _unpack_item_v1(t: tuple) -> ItemState:
    """A row of the first layout (int64 versions, float64 labels)."""
    _, m, users, versions, labeled, labels, s, told, seq, applied = t
    return _item_state(m, users, _arr(versions, np.int64), labeled, _arr(labels, np.float64, m), s, told, seq,
                       applied)


_UNPACK = {USER_TAG: _unpack_user, ITEM_TAG: _unpack_item, "user": _unpack_user_v1, "item": _unpack_item_v1}


def encode_state(state: Any) -> bytes:
    """Pickle, with user/item states packed into a few arrays first (many small arrays pickle
    slowly, and every state change writes a whole row)."""
    if isinstance(state, UserState):
        state = _pack_user(state)
    elif isinstance(state, ItemState):
        state = _pack_item(state)
    return encode_packed(state)


def encode_packed(row: Any) -> bytes:
    """The stored bytes of a packed row (`user_tuple`, `item_tuple`) or any other table value."""
    return pickle.dumps(row, protocol=pickle.HIGHEST_PROTOCOL)


def decode_state(raw: bytes | None) -> Any:
    if raw is None:
        return None
    obj = pickle.loads(raw)
    if isinstance(obj, tuple) and obj and isinstance(obj[0], str):
        unpack = _UNPACK.get(obj[0])
        if unpack is not None:
            return unpack(obj)
        if obj[0].startswith(("user/", "item/")):  # a layout newer than this code: never guess
            raise ValueError(f"table row of unknown layout {obj[0]!r}: written by a newer GPLR version")
    return obj


@contextmanager
def in_partition(event: faust.EventT) -> Iterator[None]:
    """Make `event` Faust's current event, so table reads and writes go to its partition.

    Why: a Faust table files each write (RocksDB and changelog) under the partition of the event
    being processed, which it finds in a context variable set per event by `async for`. A batch
    from `stream.take_events` is processed outside that iteration, so the agent sets it itself
    for each source partition's group of events.
    """
    with current_event(event):
        yield


class StateTable(Generic[S]):
    """A bytes-valued Faust table seen as key → state object (decode on get, encode on put).

    Decoded rows are kept in memory (write-through: every put goes to the table and its
    changelog, so the table stays the durable copy). The cache must be dropped whenever the
    table can change behind it: on every rebalance (`create_app` connects that) and when a
    batch fails half-way (its rows may be mutated but unwritten).
    """

    def __init__(self, table: Any, cache_size: int = ROW_CACHE_ROWS, cache_bytes: int = ROW_CACHE_BYTES) -> None:
        self.table = table
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._cache: dict[str, S] = {}
        self._cached_bytes = 0  # `row_footprint` of the rows in the cache (a row put twice counts twice)

    def get(self, key: str) -> S | None:
        state = self._cache.get(key)
        if state is None:
            raw = self.table.get(key)
            state = decode_state(raw)
            if state is not None:
                self._keep(key, state, row_footprint(state, len(raw)))
        return state

    def put(self, key: str, state: S) -> None:
        raw = encode_state(state)
        self.table[key] = raw
        self._keep(key, state, row_footprint(state, len(raw)))

    def _keep(self, key: str, state: S, size: int) -> None:
        """Cache a row; when the cache is full (rows or bytes), start it afresh (no LRU bookkeeping
        per access: a batch re-reads what it just touched, and a restart costs one decode)."""
        if len(self._cache) >= self.cache_size or self._cached_bytes + size > self.cache_bytes:
            self.clear_cache()
        self._cache[key] = state
        self._cached_bytes += size

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


@dataclass(frozen=True)
class Tables:
    users: StateTable  # user id → core.incremental.UserState
    items: StateTable  # item id → core.incremental.ItemState
    stats: StateTable  # "p<partition>" → {"seen": users, "excluded": held out among them, "requested": label requests}
    labels: GlobalTableT  # "p<partition>" → persona label counts (Q̂), read by every worker
    model: Any = None  # GlobalTable "current" → persona model JSON (streams.refit), only in partition 0
    #: user id → the label personas the worker applied: what refits train on. A table of its own so
    #: that a refit reads a changelog that grows with the labels, not with every user-row write.
    prototypes: Any = None

    def clear_caches(self) -> None:
        """Forget decoded rows (after a rebalance or a failed batch)."""
        for table in (self.users, self.items, self.stats):
            table.clear_cache()


def _bytes_table(app: faust.App, name: str, partitions: int, help: str) -> TableT:
    return app.Table(name, key_type=str, value_type=bytes, partitions=partitions, help=help,
                     options=dict(ROCKSDB_OPTIONS), extra_topic_configs=dict(CHANGELOG_TOPIC_CONFIG))


def define_tables(app: faust.App, partitions: int) -> Tables:
    """Declare the tables on `app` (call once, before the worker starts)."""
    return Tables(
        users=StateTable(_bytes_table(app, "users", partitions, "user-side push state")),
        items=StateTable(_bytes_table(app, "items", partitions, "item-side push state")),
        stats=StateTable(_bytes_table(app, "stats", partitions, "per-partition labeling budget")),
        labels=app.GlobalTable("label-counts", key_type=str, value_type=bytes, options=dict(ROCKSDB_OPTIONS),
                               extra_topic_configs=dict(CHANGELOG_TOPIC_CONFIG),
                               partitions=partitions, help="persona label counts per partition"),
        model=app.GlobalTable("persona-model", key_type=str, value_type=bytes, partitions=partitions,
                              options=dict(ROCKSDB_OPTIONS), extra_topic_configs=dict(CHANGELOG_TOPIC_CONFIG),
                              help="the fitted persona model (streams.refit; written from partition 0 only)"),
        prototypes=StateTable(_bytes_table(app, "prototypes", partitions, "the label personas applied per user")),
    )


def label_counts(table: GlobalTableT, n_personas: int) -> np.ndarray:
    """Q̂ numerator: label counts summed over every partition's row."""
    total = np.zeros(n_personas)
    for raw in list(table.values()):
        counts = decode_state(raw)
        if counts is not None and len(counts) == n_personas:
            total += counts
    return total


def changelog_entry(key: str, state: Any) -> tuple[bytes, bytes]:
    """(key, value) bytes of the changelog record a worker writes for one table row — what a
    tool that writes the stream's state itself (a backfill) must produce, byte for byte.

    The record goes to partition `streams.records.partition_for(key, partitions)` of
    `changelog_topic(app_id, "users" | "items")` (a row lives in its user-ops / item-ops
    partition); `stats` and `label-counts` rows are keyed "p<partition>" and live in that
    partition. Values: `encode_state(UserState | ItemState | dict | counts array)`."""
    from faust.serializers import codecs

    return codecs.dumps("json", key), encode_state(state)  # Faust's table_key_serializer is json


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's changelog topic of `table` (its durable copy in Kafka)."""
    return f"{app_id}-{table}-changelog"


def read_table(bootstrap: str, app_id: str, table: str, timeout: float = 30.0) -> dict[str, Any]:
    """Latest decoded value per key of a table, read from its changelog (no worker needed).

    What tests, `watch`-style tools and benchmarks use to inspect the stream's state; it sees
    every partition whichever worker owns it.
    """
    from confluent_kafka import Consumer, TopicPartition

    from streams.topic_io import READER_CONFIG

    topic = changelog_topic(app_id, table)
    consumer = Consumer({**READER_CONFIG, "bootstrap.servers": bootstrap, "group.id": f"gplr-read-{table}"})
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return {}
        parts = [TopicPartition(topic, p, 0) for p in meta.partitions]
        ends = {p.partition: consumer.get_watermark_offsets(p, timeout=10)[1] for p in parts}
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign(parts)
        out: dict[str, Any] = {}
        deadline = time.monotonic() + timeout
        while todo and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                offset, part, raw_key = msg.offset(), msg.partition(), msg.key()
                if msg.error() or offset is None or part is None or raw_key is None:
                    continue
                key = json.loads(raw_key)  # Faust's json key serializer
                raw = msg.value()
                if raw is None:
                    out.pop(key, None)
                else:
                    out[key] = decode_state(raw) if raw[:1] == b"\x80" else json.loads(raw)
                if offset + 1 >= ends[part]:
                    todo.discard(part)
        if todo:
            raise TimeoutError(f"{topic}: partitions {sorted(todo)} not read within {timeout}s")
        return out
    finally:
        consumer.close()
