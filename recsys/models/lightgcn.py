"""LightGCN (He et al., "LightGCN: Simplifying and Powering Graph Convolution Network for
Recommendation", SIGIR 2020): E^(l+1) = Â E^(l), final = mean of layers 0..L."""
from __future__ import annotations

import torch

from recsys.graph import RecGraph, SparseOperator
from recsys.models.base import Recommender

__all__ = ["LightGCN"]


class LightGCN(Recommender):
    name = "lightgcn"

    def __init__(self, graph: RecGraph, n_layers: int = 3, **kwargs) -> None:
        super().__init__(graph, **kwargs)
        self.n_layers = n_layers
        self.adj = SparseOperator(graph.norm_adj)

    def layers(self) -> list[torch.Tensor]:
        out: list[torch.Tensor] = [self.embedding]
        for _ in range(self.n_layers):
            out.append(self.adj @ out[-1])
        return out

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(layers).mean(dim=0)
