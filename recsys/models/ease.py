"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): the item–item
weights that best reconstruct each user's row from her other items, with an L2 penalty λ and a
zero diagonal. Closed form:

    P = (AᵀA + λI)⁻¹,   W = I − P · diag(1 / diag(P))   (i.e. W_ij = −P_ij / P_jj, W_jj = 0).

One Cholesky factorisation and inverse of the F × F Gram matrix, in torch so it runs on CUDA
when present. λ is chosen on validation (the model's `search_space`).
"""
from __future__ import annotations

import scipy.sparse as sp
import torch

from recsys.graph import RecGraph
from recsys.models.itemitem import ItemItemModel, weighted_gram

__all__ = ["EASE", "ease_weights"]


def ease_weights(gram: torch.Tensor, lam: float) -> torch.Tensor:
    """W from the Gram matrix AᵀA, consumed in place (its buffer is reused for P).

    Peak memory two F² matrices (the Gram/P buffer and the Cholesky factor): float32 at
    50,000 features is 2 × 10 GB.
    """
    if lam <= 0:
        raise ValueError(f"EASE needs λ > 0, got {lam}")
    gram.diagonal().add_(lam)
    factor = torch.linalg.cholesky(gram)
    del gram  # the caller's reference is all that is left; P takes its place
    p = torch.cholesky_inverse(factor)
    del factor
    p.div_(-torch.diagonal(p).clone())
    p.diagonal().zero_()
    return p


class EASE(ItemItemModel):
    name = "ease"

    def __init__(self, graph: RecGraph, lam: float = 200.0, **kwargs) -> None:
        super().__init__(graph, **kwargs)
        self.lam = lam

    def search_space(self) -> dict[str, tuple[float, ...]]:
        return {"lam": (200.0, 50.0, 100.0, 400.0, 800.0, 1600.0, 25.0), **self.persona_space()}

    def weights(self, design: sp.csr_matrix) -> torch.Tensor:
        gram = weighted_gram(design, dtype=self.dtype).to(self.solve_device)
        return ease_weights(gram, self.lam)
