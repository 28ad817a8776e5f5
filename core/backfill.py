"""Backfill: the stream's state for a purchase history, computed in batch (no Kafka).

Why: replaying years of purchases through one worker takes most of an hour at Instacart scale,
while the same graph's exact Ψ takes a second. `HistoryIndex` groups a history once (vectorised:
edges, counts, quantities, first names, event-id hashes per user) and `StateBuilder` turns it
into the worker's rows — as its own objects (`core.incremental.UserState` / `ItemState`, the
reference) or, for many rows at once, as the packed columns those objects encode to
(`user_columns`, `item_columns`; see `streams.tables.user_tuple`) — in the state a worker
reaches once every push has landed with M̃[v] = M[v] (so Ψ̂ = exact Ψ; with the worker's θ, M̃[v]
is M[v] rounded to float32 as its items tell it): every item told its buyers M[v] (seq 1, or
seq 0 for an item no prototype reaches: the shared reply the worker sends a new buyer), every
user counted each item's value once. `streams.backfill` decides
the personas with the worker's own functions and writes the rows to the tables' changelogs.

What is per-row exact, as in the worker: purchase counts and quantities per (user, item) after
event-id de-duplication (first occurrence in time order wins, as the worker counts the first
offset), the item names a user first bought them under, the insertion order of a user's items
(the text channel sums them in that order), and the event ids a row has seen (`remember_events`).
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.event_hash import event_keys
from core.incremental import ItemState, UserItem, UserState, label_vector, told_value
from core.row_codec import narrow_int_rows, sparse_float_rows
from core.stream_protocol import RECENT_IDS

__all__ = ["HistoryIndex", "StateBuilder", "UserColumns", "ItemColumns", "remember_events", "HISTORY_OFFSET"]

#: The row's `applied_offset` after a backfill: below any user-ops offset a live worker will see
#: (its user-ops topic starts empty), so no live message is mistaken for a replay.
HISTORY_OFFSET = -1


def remember_events(state: UserState, keys: np.ndarray) -> None:
    """Record a user's history event ids (their `event_key`s, time order) in the row's
    de-duplication state as the worker would have. The window is `_window`'s, which
    `StateBuilder.user_columns` cuts the same way."""
    state.recent_ids = keys[_window(0, len(keys)):].tolist()
    state.applied_offset = HISTORY_OFFSET


def _window(first: int, end: int) -> int:
    """Start of the remembered ids among a user's events first..end (the last RECENT_IDS)."""
    return max(first, end - RECENT_IDS)


def _slices(blob: bytes, ptr: Sequence[int], width: int) -> list[bytes]:
    """`blob` cut at `ptr` (record boundaries, relative to ptr[0]) into one bytes per range."""
    base = ptr[0]
    return [blob[(a - base) * width:(b - base) * width] for a, b in zip(ptr[:-1], ptr[1:])]


def _first_positions(codes: np.ndarray) -> np.ndarray:
    """Where each code first occurs, for codes numbered in order of first appearance
    (`pd.factorize(sort=False)`): a code first occurs where it exceeds every code before it."""
    if not len(codes):
        return np.zeros(0, dtype=np.int64)
    new = np.empty(len(codes), dtype=bool)
    new[0] = True
    new[1:] = codes[1:] > np.maximum.accumulate(codes)[:-1]
    positions: np.ndarray = np.flatnonzero(new)
    return positions


def _repeated(hashed: np.ndarray, ids: pd.Series) -> np.ndarray:
    """Rows whose event id occurred before (the worker counts the first): found on the 64-bit
    hashes, confirmed on the ids (on a hash collision between distinct ids, on the ids alone)."""
    repeated: np.ndarray = pd.Series(hashed).duplicated(keep="first").to_numpy()
    if repeated.any():
        codes, _ = pd.factorize(hashed, sort=False)
        at = np.flatnonzero(repeated)
        earlier = _first_positions(codes)[codes[at]]
        if not np.array_equal(ids.iloc[at].to_numpy(dtype=object), ids.iloc[earlier].to_numpy(dtype=object)):
            repeated = ids.duplicated(keep="first").to_numpy()
    return repeated


class UserColumns(NamedTuple):
    """Users lo..lo+n−1 as the raw columns of their packed rows (`streams.tables.user_tuple`),
    built for a whole chunk at once: no per-item objects, one bytes per user and column."""

    lo: int
    keys: list[list[str]]  # item ids, in first-purchase order
    names: list[list[str]]
    ints: list[bytes]  # (count, seq, quantity) per item (`core.row_codec.narrow_ints`)
    value_masks: list[bytes]  # told values × m per item (`core.row_codec.sparse_floats`)
    values: list[bytes]
    total: list[bytes]  # T[u]
    recent: list[bytes]  # remembered event-id hashes (int64)
    events: list[int]
    psi: np.ndarray  # Ψ_raw = T / d_u, one row per user


class ItemColumns(NamedTuple):
    """One item's packed row columns (`streams.tables.item_tuple`)."""

    item: str
    users: list[str]
    versions: bytes  # per buyer (`core.row_codec.narrow_ints`)
    labeled: list[int]  # positions of the labeled buyers
    label_mask: bytes  # their labels × m (`core.row_codec.sparse_floats`)
    labels: bytes
    s: bytes
    told: bytes
    seq: int


@dataclass(frozen=True)
class HistoryIndex:
    """A de-duplicated purchase history grouped by user and by (user, item) edge.

    Users and items are numbered in order of first appearance (time order); each user's edges are
    contiguous (`edge_ptr`) and in the order the user first bought them."""

    user_ids: np.ndarray  # object: user code → id
    item_ids: np.ndarray  # object: item code → id
    edge_ptr: np.ndarray  # user u's edges are edge_ptr[u]:edge_ptr[u + 1]
    edge_item: np.ndarray  # item code per edge
    edge_count: np.ndarray  # purchase events per edge
    edge_quantity: np.ndarray  # summed quantity per edge
    edge_name: np.ndarray  # object: item name at the edge's first event
    event_ptr: np.ndarray  # user u's events are event_keys[event_ptr[u]:event_ptr[u + 1]]
    event_keys: np.ndarray  # int64 `event_key` of each event id, grouped by user, time order within a user
    last_ts: float
    events: int
    duplicates: int

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> HistoryIndex:
        """Group a canonical purchases frame (`core.data`). Rows in time order (stable), a
        repeated event id counted once (its first occurrence), as the worker counts them."""
        ordered = frame if frame["ts"].is_monotonic_increasing else frame.sort_values("ts", kind="stable")
        ids = ordered["event_id"].astype(str)
        hashed = event_keys(ids)
        first = ~_repeated(hashed, ids)
        ordered, hashed = ordered[first], hashed[first]
        user_code, user_ids = pd.factorize(ordered["user_id"].astype(str), sort=False)
        item_code, item_ids = pd.factorize(ordered["item_id"].astype(str), sort=False)
        n_users, n_items = len(user_ids), len(item_ids)
        edge_key = user_code.astype(np.int64) * n_items + item_code
        edge_code, edge_keys = pd.factorize(edge_key, sort=False)  # edges in first-purchase order
        n_edges = len(edge_keys)
        first_row = _first_positions(edge_code)
        edge_user = (np.asarray(edge_keys) // n_items).astype(np.int64)
        order = np.argsort(edge_user, kind="stable")  # group by user, first-purchase order within
        names = ordered["item_name"].iloc[first_row].astype(str).to_numpy(dtype=object)
        qty = ordered["quantity"].to_numpy(dtype=np.int64)
        by_user = np.argsort(user_code, kind="stable")
        return cls(
            user_ids=np.asarray(user_ids, dtype=object),
            item_ids=np.asarray(item_ids, dtype=object),
            edge_ptr=np.concatenate([[0], np.cumsum(np.bincount(edge_user, minlength=n_users))]),
            edge_item=(np.asarray(edge_keys) % n_items).astype(np.int64)[order],
            edge_count=np.bincount(edge_code, minlength=n_edges).astype(np.int64)[order],
            edge_quantity=np.bincount(edge_code, weights=qty, minlength=n_edges).astype(np.int64)[order],
            edge_name=names[order],
            event_ptr=np.concatenate([[0], np.cumsum(np.bincount(user_code, minlength=n_users))]),
            event_keys=hashed[by_user],
            last_ts=float(ordered["ts"].max()),
            events=int(len(ordered)),
            duplicates=int((~first).sum()),
        )

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_edges(self) -> int:
        return len(self.edge_item)

    @property
    def degrees(self) -> np.ndarray:
        """Distinct items per user (d_u)."""
        return np.diff(self.edge_ptr)

    @property
    def edge_user(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), self.degrees)

    def history(self, u: int) -> list[tuple[str, int]]:
        """(item name, quantity) most bought first: `core.incremental.user_history` of u's row."""
        lo, hi = self.edge_ptr[u], self.edge_ptr[u + 1]
        order = np.argsort(-self.edge_quantity[lo:hi], kind="stable")
        return [(str(self.edge_name[lo + k]), int(self.edge_quantity[lo + k])) for k in order]


class StateBuilder:
    """The worker's rows for a history and a set of prototypes (user code → label personas).

    Item v: buyers {user: (label version, L[user] or None)}, S[v] = Σ L, M̃[v] = M[v] = S[v]/d_v,
    seq 1 when M[v] has mass (it pushed) else 0 (the shared reply); user u: its edges with the
    value they counted, T[u] = Σ_v M̃[v], its label (version 1), events and seen event ids.
    With `theta` (the worker's push threshold) M̃[v] is told as the worker's items tell it
    (`core.incremental.told_value`: float32-rounded); without, M̃[v] = M[v] exactly."""

    def __init__(self, index: HistoryIndex, prototypes: Mapping[int, Sequence[int]], n_personas: int,
                 theta: float | None = None) -> None:
        self.index, self.m = index, n_personas
        self.labels = {int(u): tuple(int(p) for p in dict.fromkeys(ps) if 0 <= int(p) < n_personas)
                       for u, ps in prototypes.items()}
        self.labels = {u: ps for u, ps in self.labels.items() if ps}
        phi = np.zeros((index.n_users, n_personas))
        for u, ps in self.labels.items():
            phi[u] = label_vector(ps, n_personas)
        self.phi = phi
        # the user × item incidence (edges are grouped by user: CSR as they stand); sums as sparse
        # products, not per-edge (E × m) arrays (1.7 GB each at 13M edges and 16 personas)
        incidence = sp.csr_matrix((np.ones(index.n_edges), index.edge_item, index.edge_ptr),
                                  shape=(index.n_users, index.n_items))
        rows = np.fromiter(self.labels, dtype=np.int64, count=len(self.labels))
        s = np.asarray(incidence[rows].T @ phi[rows]).reshape(index.n_items, n_personas)
        degree = np.bincount(index.edge_item, minlength=index.n_items)
        self.item_s = s
        exact = s / np.maximum(degree, 1)[:, None]
        self.told = exact if theta is None else told_value(exact, theta)
        self.seq = (self.told.sum(axis=1) > 0).astype(np.int64)
        self.total = np.asarray(incidence @ self.told).reshape(index.n_users, n_personas)
        self._edges: tuple[Any, ...] | None = None
        self._item_names: list[str] | None = None

    def psi_raw(self) -> np.ndarray:
        """Ψ_raw = T / d_u per user code (the exact one-hop affinity the rows hold)."""
        psi: np.ndarray = self.total / np.maximum(self.index.degrees, 1)[:, None]
        return psi

    def label_counts(self, users: np.ndarray | None = None) -> np.ndarray:
        """Label mentions per persona (Q̂'s numerator) over `users` (codes; all when None)."""
        counts = np.zeros(self.m)
        chosen = self.labels if users is None else {int(u): self.labels[int(u)] for u in users
                                                    if int(u) in self.labels}
        for ps in chosen.values():
            counts[list(ps)] += 1
        return counts

    def _buyers(self) -> tuple[list[int], list[str], list[int], np.ndarray, np.ndarray]:
        """Buyers grouped by item (user-code order): item ptr, buyer ids and codes, positions of
        the labeled buyers and their ptr per item."""
        index = self.index
        order = np.argsort(index.edge_item, kind="stable")
        ptr = np.concatenate([[0], np.cumsum(np.bincount(index.edge_item, minlength=index.n_items))])
        buyer_codes = index.edge_user[order]
        labeled = np.zeros(index.n_users, dtype=bool)
        labeled[list(self.labels)] = True
        marked = np.flatnonzero(labeled[buyer_codes])  # buyer positions that are prototypes
        return (ptr.tolist(), index.user_ids[buyer_codes].tolist(), buyer_codes.tolist(), marked,
                np.searchsorted(marked, ptr))

    def item_rows(self) -> Iterator[tuple[str, ItemState]]:
        """(item id, row) as objects (the reference `item_columns` is checked against)."""
        ptr, buyer_ids, codes, marked, mark_ptr = self._buyers()
        for v in range(self.index.n_items):
            lo, hi = ptr[v], ptr[v + 1]
            buyers: dict[str, tuple[int, np.ndarray | None]] = dict.fromkeys(buyer_ids[lo:hi], (0, None))
            for k in marked[mark_ptr[v]:mark_ptr[v + 1]].tolist():
                buyers[buyer_ids[k]] = (1, self.phi[codes[k]].copy())
            yield str(self.index.item_ids[v]), ItemState(self.m, buyers, self.item_s[v].copy(), self.told[v].copy(),
                                                         int(self.seq[v]), HISTORY_OFFSET)

    def item_columns(self) -> Iterator[ItemColumns]:
        """Every item's row as packed columns (what `item_rows` encodes to, built in bulk)."""
        ptr, buyer_ids, codes, marked, mark_ptr = self._buyers()
        versions = np.zeros(len(codes), dtype=np.int64)
        versions[marked] = 1
        w = 8 * self.m
        vrows = narrow_int_rows(versions, ptr)
        lmasks, lrows = sparse_float_rows(self.phi[np.asarray(codes, dtype=np.int64)[marked]], mark_ptr)
        sblob, tblob = np.ascontiguousarray(self.item_s).tobytes(), np.ascontiguousarray(self.told).tobytes()
        mptr, seq = mark_ptr.tolist(), self.seq.tolist()
        for v, item in enumerate(self.index.item_ids.tolist()):
            lo, hi, a, b = ptr[v], ptr[v + 1], mptr[v], mptr[v + 1]
            yield ItemColumns(str(item), buyer_ids[lo:hi], vrows[v], (marked[a:b] - lo).tolist(), lmasks[v], lrows[v],
                              sblob[w * v:w * (v + 1)], tblob[w * v:w * (v + 1)], seq[v])

    def user_columns(self, lo: int, hi: int) -> UserColumns:
        """Users lo..hi−1 as packed columns (what `user_row` encodes to, built in bulk)."""
        index = self.index
        eptr, vptr = index.edge_ptr[lo:hi + 1].tolist(), index.event_ptr[lo:hi + 1].tolist()
        e0, e1 = eptr[0], eptr[-1]
        items = index.edge_item[e0:e1]
        if self._item_names is None:
            self._item_names = [str(x) for x in index.item_ids]
        keys = [self._item_names[i] for i in items.tolist()]
        edge_names = index.edge_name[e0:e1].tolist()
        ints = np.empty((e1 - e0, 3), dtype=np.int64)
        ints[:, 0], ints[:, 1], ints[:, 2] = index.edge_count[e0:e1], self.seq[items], index.edge_quantity[e0:e1]
        w = 8 * self.m
        hashes = index.event_keys[vptr[0]:vptr[-1]].tobytes()
        total = np.ascontiguousarray(self.total[lo:hi])
        masks, values = sparse_float_rows(self.told[items], eptr)
        return UserColumns(
            lo, [keys[a - e0:b - e0] for a, b in zip(eptr[:-1], eptr[1:])],
            [edge_names[a - e0:b - e0] for a, b in zip(eptr[:-1], eptr[1:])],
            narrow_int_rows(ints, eptr), masks, values,
            _slices(total.tobytes(), list(range(hi - lo + 1)), w),
            [hashes[8 * (_window(a, b) - vptr[0]):8 * (b - vptr[0])] for a, b in zip(vptr[:-1], vptr[1:])],
            np.diff(vptr).tolist(), total / np.maximum(index.degrees[lo:hi], 1)[:, None])

    def _edge_lists(self) -> tuple[Any, ...]:
        """Per-edge plain Python values, converted once (per-user slices of numpy arrays and
        scalar conversions cost more than the rows themselves at millions of edges)."""
        if self._edges is None:
            index = self.index
            told = list(self.told)  # row views, shared: a row's encoder copies them
            item_names = [str(x) for x in index.item_ids]
            seq = self.seq.tolist()
            self._edges = ([item_names[i] for i in index.edge_item.tolist()], index.edge_count.tolist(),
                           [seq[i] for i in index.edge_item.tolist()], [told[i] for i in index.edge_item.tolist()],
                           index.edge_quantity.tolist(), [str(n) for n in index.edge_name],
                           index.edge_ptr.tolist(), index.event_ptr.tolist(), index.event_keys)
        return self._edges

    def user_row(self, u: int) -> UserState:
        ids, counts, seqs, values, qty, names, eptr, vptr, events = self._edge_lists()
        lo, hi = eptr[u], eptr[u + 1]
        items = dict(zip(ids[lo:hi], map(UserItem, counts[lo:hi], seqs[lo:hi], values[lo:hi], qty[lo:hi],
                                         names[lo:hi])))
        state = UserState(self.m, items, total=self.total[u].copy(), events=vptr[u + 1] - vptr[u])
        remember_events(state, events[vptr[u]:vptr[u + 1]])
        personas = self.labels.get(u)
        if personas:
            state.label, state.label_personas, state.label_version = self.phi[u].copy(), personas, 1
        return state
