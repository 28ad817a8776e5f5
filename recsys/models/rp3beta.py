"""RP3β (Paudel et al., "Updatable, Accurate, Diverse, and Scalable Recommendations for
Interactive Applications", TiiS 2016; Dacrema et al., RecSys 2019, as a strong baseline): the
probability of a 3-step random walk user → item → user → item, each transition probability raised
to α, divided by the target item's popularity to the power β:

    W_ij = d_i^-α · Σ_u (A_ui^α A_uj^α / d_u^α) · d_j^-β,   W_jj = 0,

with d_u, d_i the (weighted) degrees of A. On the persona design matrix the walk also passes
through persona pseudo-users. α and β are chosen on validation.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.graph import RecGraph
from recsys.models.itemitem import ItemItemModel, weighted_gram

__all__ = ["RP3Beta"]


def _inverse_power(degree: np.ndarray, exponent: float) -> np.ndarray:
    return np.divide(1.0, degree ** exponent, out=np.zeros_like(degree), where=degree > 0)


class RP3Beta(ItemItemModel):
    name = "rp3beta"

    def __init__(self, graph: RecGraph, alpha: float = 1.0, beta: float = 0.3, **kwargs) -> None:
        super().__init__(graph, **kwargs)
        self.alpha = alpha
        self.beta = beta

    def search_space(self) -> dict[str, tuple[float, ...]]:
        return {"alpha": (1.0, 0.5, 0.75, 1.25), "beta": (0.3, 0.0, 0.15, 0.45, 0.6, 0.75), **self.persona_space()}

    def weights(self, design: sp.csr_matrix) -> torch.Tensor:
        a = sp.csr_matrix(design, dtype=np.float64)
        user_deg = np.asarray(a.sum(axis=1)).ravel()
        item_deg = np.asarray(a.sum(axis=0)).ravel()
        a.data **= self.alpha
        w = weighted_gram(a, _inverse_power(user_deg, self.alpha), dtype=self.dtype).to(self.solve_device)
        rows = torch.as_tensor(_inverse_power(item_deg, self.alpha), dtype=w.dtype, device=w.device)
        cols = torch.as_tensor(_inverse_power(item_deg, self.beta), dtype=w.dtype, device=w.device)
        w.mul_(rows[:, None]).mul_(cols[None, :])
        w.diagonal().zero_()
        return w
