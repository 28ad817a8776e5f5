"""AFDGCF's adaptive feature de-correlation penalty (Wu et al., "AFDGCF: Adaptive Feature
De-correlation Graph Collaborative Filtering for Recommendations", SIGIR 2024).

Graph convolution makes embedding dimensions linearly correlated (over-correlation, the twin of
over-smoothing). The penalty is the squared Pearson correlation between embedding dimensions,
per layer, for users and items separately; layers that are more correlated get a larger share
of the penalty through weights computed from detached correlations (no gradient through them).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["dimension_correlation", "afd_loss"]


def dimension_correlation(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean squared off-diagonal Pearson correlation between the columns of `x` (rows = nodes)."""
    d = x.shape[1]
    if x.shape[0] < 2 or d < 2:
        return x.new_zeros(())
    centred = x - x.mean(dim=0, keepdim=True)
    unit = centred / (centred.norm(dim=0, keepdim=True) + eps)
    corr = unit.T @ unit
    off = corr - torch.diag(torch.diagonal(corr))
    return (off ** 2).sum() / (d * (d - 1))


def afd_loss(layers: Sequence[torch.Tensor], users: torch.Tensor, items: torch.Tensor,
             n_users: int) -> torch.Tensor:
    """Σ_l w_l (ρ(E_l[users]) + ρ(E_l[items])) with w_l = ρ_l / Σ ρ (detached), over the batch's
    unique users and items (`items` are item indices, offset by `n_users` in the node table)."""
    u = torch.unique(users)
    i = torch.unique(items) + n_users
    per_layer = torch.stack([dimension_correlation(e[u]) + dimension_correlation(e[i]) for e in layers])
    weights = per_layer.detach() / per_layer.detach().sum().clamp_min(1e-12)
    return (weights * per_layer).sum()
