"""The contract every recommender follows (RecBole-like): `full_sort_scores(users)` for ranking
all items, plus persona cold start for graphs with persona nodes (`RankingModel`). Trained models
(`Recommender`, `trainable = True`) add `calculate_loss(batch)` for the BPR loop; closed-form
models (`recsys.models.itemitem`, `trainable = False`) are solved instead, their
hyper-parameters chosen on validation by the same `recsys.train.fit`.

A trained model owns one embedding table over all graph nodes (users, items, personas) and defines
`layers()` — the per-layer node embeddings — and `combine(layers)`, the final representation.
Scores are dot products of final user and item embeddings.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from recsys.graph import RecGraph
from recsys.models.afd import afd_loss

__all__ = ["BPRBatch", "RankingModel", "Recommender", "pick_device", "check_personas"]

log = logging.getLogger(__name__)


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present (or asked for), else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class BPRBatch:
    """Aligned user, positive-item and negative-item indices (LongTensors on the model's device)."""

    users: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


def check_personas(personas: Sequence[int], n_personas: int, model: str) -> torch.Tensor:
    """The chosen persona indices as a LongTensor; one clear error for a model without persona
    nodes, an empty choice or an index out of range."""
    if n_personas == 0:
        raise ValueError(f"{model} was built without persona nodes: no persona cold start")
    idx = torch.as_tensor(list(personas), dtype=torch.long)
    if idx.numel() == 0:
        raise ValueError("cold start needs at least one persona")
    if idx.min() < 0 or idx.max() >= n_personas:
        raise ValueError(f"persona index out of range [0, {n_personas})")
    return idx


class RankingModel(nn.Module):
    """What evaluation, the benchmark and the trainer use: all-item scores per user, and (on a
    graph with persona nodes) scores for a user or an item known only by personas."""

    name = "base"
    trainable = True  # False: closed form, see recsys.models.itemitem
    graph: RecGraph

    def full_sort_scores(self, users: torch.Tensor) -> torch.Tensor:
        """Scores of every item for each user in `users` (rows aligned with `users`)."""
        raise NotImplementedError

    def cold_user_scores(self, personas: Sequence[int]) -> torch.Tensor:
        """Item scores for a new user known only by chosen personas (no purchases yet)."""
        raise NotImplementedError

    def cold_item_scores(self, personas: Sequence[int]) -> torch.Tensor:
        """User scores for a new item known only by its personas: who should see it first."""
        raise NotImplementedError


class Recommender(RankingModel):
    """Embedding-table recommender over a `RecGraph`; subclasses define `layers` and `combine`."""

    def __init__(self, graph: RecGraph, dim: int = 64, reg: float = 1e-4, afd_weight: float = 0.0,
                 seed: int = 0) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError("embedding dimension must be positive")
        self.graph = graph
        self.dim = dim
        self.reg = reg
        self.afd_weight = afd_weight
        gen = torch.Generator().manual_seed(seed)
        self.embedding = nn.Parameter(torch.randn(graph.n_nodes, dim, generator=gen) * 0.1)
        self._cache: torch.Tensor | None = None

    # -- to implement -----------------------------------------------------------------
    def layers(self) -> list[torch.Tensor]:
        """Node embeddings per propagation layer, layer 0 first."""
        return [self.embedding]

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return layers[-1]

    # -- shared ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.embedding.device

    def train(self, mode: bool = True) -> Recommender:
        self._cache = None  # parameters are about to change (or just did)
        return super().train(mode)

    def final_embeddings(self) -> torch.Tensor:
        """Final node embeddings; cached in eval mode so ranking all users propagates once."""
        if self.training:
            return self.combine(self.layers())
        if self._cache is None:
            with torch.no_grad():
                self._cache = self.combine(self.layers())
        return self._cache

    def calculate_loss(self, batch: BPRBatch) -> torch.Tensor:
        """BPR −log σ(s_up − s_un), L2 on the batch's layer-0 embeddings, optional AFD penalty."""
        layers = self.layers()
        final = self.combine(layers)
        n_u = self.graph.n_users
        u, p, n = final[batch.users], final[n_u + batch.pos], final[n_u + batch.neg]
        bpr = F.softplus(-((u * p).sum(-1) - (u * n).sum(-1))).mean()
        ego = self.embedding
        l2 = (ego[batch.users].pow(2).sum() + ego[n_u + batch.pos].pow(2).sum()
              + ego[n_u + batch.neg].pow(2).sum()) / (2 * len(batch.users))
        loss = bpr + self.reg * l2
        if self.afd_weight > 0:
            items = torch.cat([batch.pos, batch.neg])
            loss = loss + self.afd_weight * afd_loss(layers, batch.users, items, n_u)
        return loss

    def full_sort_scores(self, users: torch.Tensor) -> torch.Tensor:
        final = self.final_embeddings()
        n_u, n_i = self.graph.n_users, self.graph.n_items
        return final[users.to(self.device)] @ final[n_u:n_u + n_i].T

    # -- persona cold start ------------------------------------------------------------
    def _persona_vector(self, personas: Sequence[int]) -> torch.Tensor:
        """Mean final embedding of the chosen persona nodes minus the mean over all personas.

        Persona nodes are hubs: their raw embeddings share one shop-wide (popularity) direction,
        so without the centring every persona would recommend the same best-sellers.
        """
        g = self.graph
        idx = check_personas(personas, g.n_personas, self.name)
        table = self.final_embeddings()[g.persona_offset:g.persona_offset + g.n_personas]
        vec = table[idx.to(self.device)].mean(dim=0)
        return vec - table.mean(dim=0) if g.n_personas > 1 else vec

    def cold_user_scores(self, personas: Sequence[int]) -> torch.Tensor:
        g = self.graph
        return self.final_embeddings()[g.n_users:g.n_users + g.n_items] @ self._persona_vector(personas)

    def cold_item_scores(self, personas: Sequence[int]) -> torch.Tensor:
        return self.final_embeddings()[: self.graph.n_users] @ self._persona_vector(personas)
