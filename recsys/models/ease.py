"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the item–item
weights that best reconstruct each user's row from her other items, with an L2 penalty λ and a
zero diagonal. Closed form:

    P = (AᵀA + λI)⁻¹,   W = I − P · diag(1 / diag(P))   (i.e. W_ij = −P_ij / P_jj, W_jj = 0).

One Cholesky factorisation and inverse of the F × F Gram matrix, in torch so it runs on CUDA
when present. λ is chosen on validation (the model's `search_space`).

Retraining after a few changed users need not invert again (`solve_from`): P is recovered from W
and diag(P) (kept, F floats), and the Gram change from m changed design rows is a rank-m update,
applied with the Woodbury identity in O(F²·m) instead of O(F³).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.graph import RecGraph
from recsys.models.itemitem import ItemItemModel, design_matrix, weighted_gram

__all__ = ["EASE", "ease_weights", "ease_solution", "changed_rows", "woodbury_update"]


def ease_weights(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """W from the Gram matrix AᵀA (see `ease_solution`)."""
    return ease_solution(gram, lam)[0]


def ease_solution(gram: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, diag P) from the Gram matrix AᵀA, which is overwritten by its Cholesky factor.

    Peak memory two F² matrices (the Gram/factor buffer and P, which becomes W): float32 at
    50,000 features is 2 × 10 GB.
    """
    if lam <= 0:
        raise ValueError(f"EASE needs λ > 0, got {lam}")
    gram.diagonal().add_(lam)
    factor = torch.linalg.cholesky(gram, out=gram)  # in place: the Gram buffer becomes L
    p = torch.cholesky_inverse(factor)  # reads L's lower triangle only
    return inverse_to_weights(p)


def inverse_to_weights(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, diag P): W = −P / diag(P) column-wise with a zero diagonal, in place on P."""
    d = torch.diagonal(p).clone()
    p.div_(-d)
    p.diagonal().zero_()
    return p, d


def woodbury_update(w: torch.Tensor, pdiag: torch.Tensor, added: sp.csr_matrix, removed: sp.csr_matrix
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The W of Gram + AᵀA − RᵀR from the W (and diag P) of Gram, in place on a copy of `w`:

        P' = P − P V (S + Vᵀ P V)⁻¹ Vᵀ P,   V = [Aᵀ Rᵀ],  S = diag(+1 for A, −1 for R).
    """
    p = w.clone()
    p.mul_(-pdiag)
    p.diagonal().copy_(pdiag)
    v = sp.vstack([added, removed], format="csr").T.toarray()
    sign = np.concatenate([np.ones(added.shape[0]), -np.ones(removed.shape[0])])
    v_t = torch.as_tensor(v, dtype=p.dtype, device=p.device)
    pv = p @ v_t
    inner = torch.diag(torch.as_tensor(sign, dtype=torch.float64, device=p.device)) + (v_t.T @ pv).double()
    p.sub_(pv @ torch.linalg.solve(inner, pv.T.double()).to(p.dtype))
    return inverse_to_weights(p)


def changed_rows(old: sp.csr_matrix, old_users: int, new: sp.csr_matrix, new_users: int
                 ) -> tuple[sp.csr_matrix, sp.csr_matrix] | None:
    """(rows to add, rows to remove) that turn design `old` into `new` (the first `*_users` rows
    are users, the rest persona pseudo-users); None when users were dropped."""
    if new_users < old_users or old.shape[0] - old_users != new.shape[0] - new_users:
        return None
    old_rows = sp.vstack([old[:old_users], old[old_users:]], format="csr")
    same_shape_new = sp.vstack([new[:old_users], new[new_users:]], format="csr")
    diff = (same_shape_new - old_rows).tocsr()
    diff.eliminate_zeros()
    idx = np.flatnonzero(np.diff(diff.indptr) > 0)
    fresh = new[old_users:new_users]
    added = sp.vstack([same_shape_new[idx], fresh], format="csr")
    return added, old_rows[idx]


class EASE(ItemItemModel):
    name = "ease"

    def __init__(self, graph: RecGraph, lam: float = 200.0, **kwargs) -> None:
        super().__init__(graph, **kwargs)
        self.lam = lam
        self.pdiag: torch.Tensor | None = None  # diag of P = (AᵀA + λI)⁻¹, for incremental updates

    def search_space(self) -> dict[str, tuple[float, ...]]:
        return {"lam": (200.0, 50.0, 100.0, 400.0, 800.0, 1600.0, 25.0), **self.persona_space()}

    def weights(self, design: sp.csr_matrix) -> torch.Tensor:
        gram = weighted_gram(design, dtype=self.dtype).to(self.solve_device)
        w, self.pdiag = ease_solution(gram, self.lam)
        return w

    def solve_from(self, previous: EASE | None, interactions: sp.spmatrix, max_rank: float = 0.125) -> EASE:
        """`solve(interactions)`, by a Woodbury update of `previous` (same hyper-parameters and
        features, users only added) when fewer than `max_rank`·F design rows changed."""
        design, history = design_matrix(interactions, self.graph, self.persona_weight, self.pseudo_weight)
        usable = (previous is not None and previous.pdiag is not None and previous.design is not None
                  and previous.params() == self.params()
                  and previous.design.shape[1] == design.shape[1])
        if not usable or previous is None or previous.design is None or previous.pdiag is None:
            return self.solve(interactions)
        rows = changed_rows(previous.design, previous.graph.n_users, design, self.graph.n_users)
        if rows is None or sum(r.shape[0] for r in rows) > max_rank * design.shape[1]:
            return self.solve(interactions)
        self.design, self.history = design, history
        if rows[0].shape[0] == 0:
            self.weights_, self.pdiag = previous.weights_, previous.pdiag
        else:
            self.weights_, self.pdiag = woodbury_update(previous.weights_, previous.pdiag, *rows)
        return self
