"""Item–item models solved in closed form (EASE, RP3β): a user's scores are her history row times
a dense feature × feature weight matrix W, read off at the item columns. No gradient training:
`recsys.train.fit` searches the model's `search_space()` on validation.

Features are the items and, on a graph with persona nodes, the personas too — the tripartite
user–item–persona graph in item–item form. The design matrix is

    A = [[ X        , a·Φ_u ],     users: purchases and (weighted) personas
         [ b·Φ_iᵀ   , b·I_R ]]     one pseudo-user per persona: the items that carry it

(X users × items, Φ_u users × personas, Φ_i items × personas; a = `persona_weight`,
b = `pseudo_weight`, both searched on validation). W then also links items with personas, which
gives persona cold start: a user known only by personas is the row [0 | a·Φ_u], and a new item
known only by personas is scored for each user through W's persona columns.

Memory: W is F² floats (F = items + personas), computed in `dtype` (float32 by default) on the
solve device; a solve holds about two F² matrices there at its peak (see `ease_weights`), after
the Gram matrix is assembled on the host (one F² array, from sparse products F × 4,096 columns at
a time): 59 MB per matrix for OnlineRetail's 3,846 items, 10 GB for a 50,000-item catalogue, so
20 GB on the device and 10 GB on the host (fits an H200 with a 32 GB host, or a 32 GB CPU box).
An incremental EASE update (`EASE.solve_from`) works on a copy of W: one more F² matrix.
Scoring multiplies sparse history rows by W, batch by batch, so users do not add to the peak.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Self

import numpy as np
import scipy.sparse as sp
import torch

from recsys.graph import RecGraph
from recsys.models.base import RankingModel, check_personas, pick_device

__all__ = ["ItemItemModel", "design_matrix", "weighted_gram"]

log = logging.getLogger(__name__)


def design_matrix(interactions: sp.spmatrix, graph: RecGraph, persona_weight: float,
                  pseudo_weight: float) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(A, H): the design matrix above and the users' history rows H = [X | a·Φ_u] (A's first
    rows). A plain graph gives A = H = X."""
    x = sp.csr_matrix(interactions, dtype=np.float32)
    if x.shape != (graph.n_users, graph.n_items):
        raise ValueError(f"interactions {x.shape} do not match the graph "
                         f"({graph.n_users} users, {graph.n_items} items)")
    x.data[:] = 1.0
    if graph.n_personas == 0:
        return x, x
    up, ip = graph.user_personas, graph.item_personas
    history = sp.hstack([x, persona_weight * up], format="csr", dtype=np.float32)
    pseudo = sp.hstack([pseudo_weight * ip.T, pseudo_weight * sp.identity(graph.n_personas)],
                       format="csr", dtype=np.float32)
    design = sp.vstack([history, pseudo], format="csr") if pseudo_weight > 0 else history
    return design, history


def weighted_gram(a: sp.csr_matrix, row_weights: np.ndarray | None = None, dtype: torch.dtype = torch.float32,
                  chunk: int = 4096) -> torch.Tensor:
    """Dense Aᵀ diag(w) A (F × F) on the CPU, built chunk of columns by chunk of columns so the
    sparse intermediate never exceeds F × `chunk`."""
    a = sp.csr_matrix(a, dtype=np.float64)
    left = (a if row_weights is None else sp.diags(row_weights) @ a).T.tocsr()
    a_csc = a.tocsc()
    n = a.shape[1]
    out = torch.empty((n, n), dtype=dtype)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        out[:, lo:hi] = torch.from_numpy((left @ a_csc[:, lo:hi]).toarray())
    return out


class ItemItemModel(RankingModel):
    """Shared machinery: design matrix, solve on a device, batched scoring, persona cold start.
    Subclasses define `weights(design)` (F × F) and `search_space()`."""

    trainable = False

    def __init__(self, graph: RecGraph, persona_weight: float = 1.0, pseudo_weight: float = 1.0,
                 device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> None:
        super().__init__()
        del seed  # closed form: nothing random; accepted so every model builds the same way
        self.graph = graph
        self.persona_weight = persona_weight
        self.pseudo_weight = pseudo_weight
        self.solve_device = pick_device(device)
        self.dtype = dtype
        self.register_buffer("weights_", torch.zeros(0, 0, dtype=dtype), persistent=False)
        self.history: sp.csr_matrix | None = None
        self.design: sp.csr_matrix | None = None  # the rows W was solved from (for updates)

    # -- to implement -----------------------------------------------------------------
    def weights(self, design: sp.csr_matrix) -> torch.Tensor:
        """The F × F weight matrix (zero diagonal) on `self.solve_device`."""
        raise NotImplementedError

    def search_space(self) -> dict[str, tuple[float, ...]]:
        """Candidate values per hyper-parameter, the first of each the starting point."""
        raise NotImplementedError

    # -- hyper-parameters --------------------------------------------------------------
    def persona_space(self) -> dict[str, tuple[float, ...]]:
        """The persona weights' candidates (none on a plain graph). Both stay > 0 for `a`: a
        persona variant that switched its personas off would be the plain model under a new name."""
        if self.graph.n_personas == 0:
            return {}
        space: dict[str, tuple[float, ...]] = {"persona_weight": (1.0, 0.5, 2.0, 0.25)}
        if self.graph.item_personas is not None and self.graph.item_personas.nnz:
            space["pseudo_weight"] = (1.0, 0.0, 0.5, 2.0, 4.0)
        return space

    def params(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in self.search_space()}

    def configure(self, **params: float) -> Self:
        unknown = set(params) - set(self.search_space())
        if unknown:
            raise ValueError(f"{self.name} has no hyper-parameters {sorted(unknown)}")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    # -- solving and scoring ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.weights_.device

    def solve(self, interactions: sp.spmatrix) -> Self:
        """Compute W from `interactions` (users × items, binary) and the graph's personas; the
        same rows become the users' histories for scoring."""
        self.design, self.history = design_matrix(interactions, self.graph, self.persona_weight, self.pseudo_weight)
        self.weights_ = self.weights(self.design)
        return self

    def _solved(self) -> torch.Tensor:
        self._history()
        return self.weights_

    def _history(self) -> sp.csr_matrix:
        if self.history is None:
            raise RuntimeError(f"{self.name} is not solved yet: call solve() (or recsys.train.fit)")
        return self.history

    def _history_times(self, rows: sp.csr_matrix, w: torch.Tensor) -> torch.Tensor:
        """Sparse history rows × dense W: nnz × F work instead of rows × F² (75× less on
        OnlineRetail); scipy on the CPU, torch sparse CSR on CUDA."""
        rows = sp.csr_matrix(rows, dtype=np.float32 if w.dtype == torch.float32 else np.float64)
        if w.device.type == "cpu":
            return torch.from_numpy(np.asarray(rows @ w.numpy()))
        t = torch.sparse_csr_tensor(torch.from_numpy(rows.indptr.astype(np.int64)),
                                    torch.from_numpy(rows.indices.astype(np.int64)),
                                    torch.from_numpy(rows.data), size=rows.shape, device=w.device)
        return t @ w

    def full_sort_scores(self, users: torch.Tensor) -> torch.Tensor:
        w = self._solved()
        rows = self._history()[np.asarray(users.cpu(), dtype=np.int64)]
        return self._history_times(rows, w[:, :self.graph.n_items].contiguous())

    def cold_user_scores(self, personas: Sequence[int]) -> torch.Tensor:
        """[0 | a·1_P] W: the items the chosen personas predict."""
        w = self._solved()
        idx = check_personas(personas, self.graph.n_personas, self.name).to(w.device)
        rows = w[self.graph.n_items + idx, :self.graph.n_items]
        return self.persona_weight * rows.sum(dim=0)

    def cold_item_scores(self, personas: Sequence[int]) -> torch.Tensor:
        """H W[:, personas] averaged: each user's predicted affinity to the item's personas."""
        w = self._solved()
        idx = check_personas(personas, self.graph.n_personas, self.name).to(w.device)
        column = w[:, self.graph.n_items + idx].mean(dim=1, keepdim=True)
        return self._history_times(self.history, column)[:, 0]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.params().items())
