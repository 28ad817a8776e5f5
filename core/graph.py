"""The purchase graph G=(U,V,E) in CSR form, built without a Python loop per edge.

Rows of `user_item` are users, columns items; `data` counts purchase events per (user, item)
pair and `quantity` (aligned with `data`) sums the units. A repeat purchase raises the count,
it never adds an edge.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["BipartiteGraph", "EdgeWeight", "row_normalise"]

EdgeWeight = Literal["binary", "count", "log"]


def _ids(n: int) -> np.ndarray:
    """Default ids "0", "1", ... (object dtype, as ids read from data are)."""
    return np.arange(n).astype(str).astype(object)


def row_normalise(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """Divide each row by its sum; empty rows stay zero (no division by zero)."""
    sums = np.asarray(matrix.sum(axis=1)).ravel()
    inv = np.divide(1.0, sums, out=np.zeros_like(sums, dtype=np.float64), where=sums > 0)
    return sp.csr_matrix(sp.diags(inv) @ matrix)


@dataclass(frozen=True)
class BipartiteGraph:
    """User→item CSR plus its item→user transpose; ids map rows/columns back to the data."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    item_names: np.ndarray
    user_item: sp.csr_matrix
    quantity: np.ndarray
    item_user: sp.csr_matrix = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ui = self.user_item
        if ui.shape != (len(self.user_ids), len(self.item_ids)):
            raise ValueError(f"matrix shape {ui.shape} does not match ids")
        if len(self.quantity) != ui.nnz:
            raise ValueError("quantity must align with user_item.data")
        object.__setattr__(self, "item_user", ui.T.tocsr())

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_indices(
        cls,
        user_idx: np.ndarray,
        item_idx: np.ndarray,
        n_users: int,
        n_items: int,
        quantity: np.ndarray | None = None,
        user_ids: np.ndarray | None = None,
        item_ids: np.ndarray | None = None,
        item_names: np.ndarray | None = None,
    ) -> BipartiteGraph:
        """Build from integer purchase arrays (one entry per purchase event; repeats merge)."""
        user_idx = np.asarray(user_idx, dtype=np.int64)
        item_idx = np.asarray(item_idx, dtype=np.int64)
        if user_idx.shape != item_idx.shape:
            raise ValueError("user_idx and item_idx must have the same length")
        for name, idx, n in (("user", user_idx, n_users), ("item", item_idx, n_items)):
            if len(idx) and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"{name} index out of range 0..{n - 1}")
        qty = np.ones(len(user_idx)) if quantity is None else np.asarray(quantity, dtype=np.float64)
        if qty.shape != user_idx.shape:
            raise ValueError("quantity must have one entry per purchase")
        # One COO->CSR conversion merges counts (real part) and quantities (imaginary part) at
        # once; int32 indices avoid scipy's copies. 13M events: ~4 s instead of ~14 s.
        idx_t = np.int32 if max(n_users, n_items) < np.iinfo(np.int32).max else np.int64
        merged = sp.coo_matrix(
            (np.ones(len(user_idx)) + 1j * qty, (user_idx.astype(idx_t), item_idx.astype(idx_t))),
            shape=(n_users, n_items),
        ).tocsr()
        merged.sum_duplicates()
        merged.sort_indices()
        counts = sp.csr_matrix((merged.data.real.copy(), merged.indices, merged.indptr), shape=merged.shape)
        qmat = sp.csr_matrix((merged.data.imag.copy(), merged.indices, merged.indptr), shape=merged.shape)
        ids_u = _ids(n_users) if user_ids is None else np.asarray(user_ids, dtype=object)
        ids_i = _ids(n_items) if item_ids is None else np.asarray(item_ids, dtype=object)
        names = ids_i if item_names is None else np.asarray(item_names, dtype=object)
        return cls(ids_u, ids_i, names, counts, qmat.data.copy())

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> BipartiteGraph:
        """Build from a purchases frame with columns user_id, item_id[, item_name, quantity]."""
        users, user_ids = pd.factorize(frame["user_id"], sort=True)
        items, item_ids = pd.factorize(frame["item_id"], sort=True)
        if "item_name" in frame:
            first = pd.Series(frame["item_name"].to_numpy()).groupby(items).first()
            names = first.reindex(range(len(item_ids))).to_numpy(dtype=object)
        else:
            names = None
        qty = frame["quantity"].to_numpy(dtype=np.float64) if "quantity" in frame else None
        return cls.from_indices(
            users, items, len(user_ids), len(item_ids), qty,
            np.asarray(user_ids, dtype=object), np.asarray(item_ids, dtype=object), names,
        )

    # -- views -------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return int(self.user_item.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.user_item.shape[1])

    @property
    def n_edges(self) -> int:
        return int(self.user_item.nnz)

    @property
    def user_degree(self) -> np.ndarray:
        return np.diff(self.user_item.indptr)

    @property
    def item_degree(self) -> np.ndarray:
        return np.diff(self.item_user.indptr)

    def weighted(self, weight: EdgeWeight = "binary") -> sp.csr_matrix:
        """User→item matrix with edge weights: 1, the purchase count, or 1 + log(count)."""
        w = self.user_item.copy()
        if weight == "binary":
            w.data = np.ones_like(w.data)
        elif weight == "log":
            w.data = 1.0 + np.log(w.data)
        elif weight != "count":
            raise ValueError(f"unknown edge weight {weight!r}")
        return w

    def transitions(self, weight: EdgeWeight = "binary") -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(P, P'): row-stochastic user→item and item→user transition matrices."""
        w = self.weighted(weight)
        return row_normalise(w), row_normalise(w.T.tocsr())

    def history(self, user: int) -> list[tuple[str, int]]:
        """(item name, total quantity) of one user's purchases, most bought first."""
        lo, hi = self.user_item.indptr[user], self.user_item.indptr[user + 1]
        items = self.user_item.indices[lo:hi]
        qty = self.quantity[lo:hi]
        order = np.argsort(-qty, kind="stable")
        return [(str(self.item_names[items[k]]), int(qty[k])) for k in order]
