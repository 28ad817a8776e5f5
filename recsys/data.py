"""Train/validation/test interaction matrices and persona matrices for the recommenders.

Everything is an index-aligned scipy CSR: rows are users (`user_ids`), columns items
(`item_names`). Validation is carved out of train per user and is the only split used for
model selection; test is touched once, for the final numbers.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.graph import BipartiteGraph
from core.personas import PersonaSet

__all__ = [
    "RecData",
    "interactions",
    "carve_validation",
    "load_paper_split",
    "split_frame",
    "persona_matrix",
    "load_persona_table",
]

log = logging.getLogger(__name__)


def interactions(users: np.ndarray, items: np.ndarray, n_users: int, n_items: int) -> sp.csr_matrix:
    """Binary user×item CSR from index arrays (duplicates collapse to one edge)."""
    m = sp.csr_matrix(
        (np.ones(len(users), dtype=np.float32), (np.asarray(users), np.asarray(items))),
        shape=(n_users, n_items),
    )
    m.sum_duplicates()
    m.data[:] = 1.0
    m.sort_indices()
    return m


def _holdout_mask(rows: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Mark ≈`frac` of each row's edges (at least one, never all) for holding out.

    `rows` is the row index of each edge. Vectorised: a random key per edge ranked within its
    row; ranks below `min(ceil(frac·deg), deg−1)` are held out, so single-edge rows keep theirs.
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {frac}")
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = int(rows.max()) + 1 if len(rows) else 0
    deg = np.bincount(rows, minlength=n_rows)
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(rows)), rows))  # rows ascending, random within a row
    starts = np.concatenate([[0], np.cumsum(deg)[:-1]])
    rank = np.empty(len(rows), dtype=np.int64)
    rank[order] = np.arange(len(rows)) - starts[rows[order]]
    n_out = np.minimum(np.ceil(frac * deg), np.maximum(deg - 1, 0)).astype(np.int64)
    return rank < n_out[rows]


def carve_validation(train: sp.csr_matrix, frac: float, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """Split `train` into (fit, valid): ≈`frac` of each user's edges go to validation."""
    train = sp.csr_matrix(train)
    rows = np.repeat(np.arange(train.shape[0]), np.diff(train.indptr))
    out = _holdout_mask(rows, frac, seed)
    cols = train.indices
    return interactions(rows[~out], cols[~out], *train.shape), interactions(rows[out], cols[out], *train.shape)


@dataclass(frozen=True)
class RecData:
    """Index-aligned splits. `fit` trains the model, `valid` selects it, `test` reports it.

    `train` = fit + valid: the mask applied when ranking for test (known purchases).
    """

    user_ids: np.ndarray
    item_names: np.ndarray
    fit: sp.csr_matrix
    valid: sp.csr_matrix
    test: sp.csr_matrix

    @property
    def n_users(self) -> int:
        return self.fit.shape[0]

    @property
    def n_items(self) -> int:
        return self.fit.shape[1]

    @property
    def train(self) -> sp.csr_matrix:
        m = (self.fit + self.valid).tocsr()
        m.data[:] = 1.0
        return m

    def fit_graph(self) -> BipartiteGraph:
        """The graph the models (and GPLR) may see: fit edges only, never valid or test."""
        coo = self.fit.tocoo()
        return BipartiteGraph.from_indices(
            coo.row, coo.col, self.n_users, self.n_items,
            user_ids=self.user_ids, item_ids=self.item_names, item_names=self.item_names,
        )

    def summary(self) -> dict[str, int]:
        return {"users": self.n_users, "items": self.n_items, "fit": int(self.fit.nnz),
                "valid": int(self.valid.nnz), "test": int(self.test.nnz)}


def _from_pairs(frame: pd.DataFrame, user_col: str, item_col: str, is_test: np.ndarray,
                valid_frac: float, seed: int) -> RecData:
    users, user_ids = pd.factorize(frame[user_col], sort=True)
    items, item_names = pd.factorize(frame[item_col], sort=True)
    n_u, n_i = len(user_ids), len(item_names)
    train = interactions(users[~is_test], items[~is_test], n_u, n_i)
    test = interactions(users[is_test], items[is_test], n_u, n_i)
    test = (test - test.multiply(train)).tocsr()  # a pair bought in both splits is not "new"
    test.eliminate_zeros()
    fit, valid = carve_validation(train, valid_frac, seed)
    return RecData(np.asarray(user_ids, dtype=object), np.asarray(item_names, dtype=object), fit, valid, test)


def load_paper_split(path: str | Path, valid_frac: float = 0.1, seed: int = 0) -> RecData:
    """The paper's exact split file (`CustomerID, Description, split` with train/test)."""
    frame = pd.read_csv(path, dtype={"CustomerID": str, "Description": str})
    missing = {"CustomerID", "Description", "split"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    bad = ~frame["split"].isin(["train", "test"])
    if bad.any():
        raise ValueError(f"{path}: {int(bad.sum())} rows with a split other than train/test")
    frame["CustomerID"] = frame["CustomerID"].str.replace(r"\.0$", "", regex=True)
    return _from_pairs(frame, "CustomerID", "Description", frame["split"].eq("test").to_numpy(),
                       valid_frac, seed)


def split_frame(frame: pd.DataFrame, test_frac: float = 0.2, valid_frac: float = 0.1,
                seed: int = 0) -> RecData:
    """Per-user random split of the unique (user_id, item_id) pairs of a canonical purchases frame.

    `item_names` are the frame's `item_name` (first seen per item_id) when present, so item
    persona tables keyed by product name line up; otherwise the item ids.
    """
    missing = {"user_id", "item_id"} - set(frame.columns)
    if missing:
        raise ValueError(f"purchases frame lacks columns {sorted(missing)}")
    pairs = frame[["user_id", "item_id"]].astype(str).drop_duplicates().reset_index(drop=True)
    users, _ = pd.factorize(pairs["user_id"], sort=True)
    is_test = _holdout_mask(users, test_frac, seed + 1)
    data = _from_pairs(pairs, "user_id", "item_id", is_test, valid_frac, seed)
    if "item_name" in frame:
        first = frame.assign(item_id=frame["item_id"].astype(str)).groupby("item_id")["item_name"].first()
        names = first.reindex(data.item_names).fillna(pd.Series(data.item_names, index=data.item_names))
        data = RecData(data.user_ids, names.to_numpy(dtype=object), data.fit, data.valid, data.test)
    return data


def persona_matrix(rows: Sequence[Sequence[int]], n_personas: int) -> sp.csr_matrix:
    """Binary entity×persona CSR from per-row persona index lists."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    cols = np.fromiter((c for r in rows for c in r), dtype=np.int64, count=int(lengths.sum()))
    if len(cols) and (cols.min() < 0 or cols.max() >= n_personas):
        raise ValueError(f"persona index out of range [0, {n_personas})")
    return interactions(np.repeat(np.arange(len(rows)), lengths), cols, len(rows), n_personas)


def load_persona_table(path: str | Path, key_column: str, keys: np.ndarray, personas: PersonaSet,
                       persona_column: str = "personas") -> sp.csr_matrix:
    """Read `key, personas('|'-joined names)` (or `gplr label` JSON lines) and align it with
    `keys` (missing keys: no personas).

    Names outside the persona set are dropped and counted in the log, never invented.
    """
    from core.personas import ID_COLUMNS, read_persona_labels

    # a user table may be `gplr label` output (.jsonl or .csv, keyed by user_id) or a recorded one
    keys_to_try = (key_column, *ID_COLUMNS) if key_column in ("CustomerID", "user_id") else (key_column,)
    table = read_persona_labels(path, keys_to_try, (persona_column,))
    aligned = [table.get(k, ()) for k in np.asarray(keys, dtype=str)]
    unknown = 0
    rows: list[list[int]] = []
    for names in aligned:
        idx = [personas.index_of(n) for n in names]
        unknown += sum(i is None for i in idx)
        rows.append(sorted({i for i in idx if i is not None}))
    if unknown:
        log.warning("%s: dropped %d persona names outside the persona set", path, unknown)
    covered = int(sum(bool(r) for r in rows))
    log.info("%s: personas for %d of %d %s values", Path(path).name, covered, len(rows), key_column)
    return persona_matrix(rows, len(personas))
