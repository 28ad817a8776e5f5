"""LGCN, the low-pass graph convolution network (Yu et al., "Low-Pass Graph Convolutional
Network for Recommendation", AAAI 2022): filter the embeddings in the graph's spectral domain,
keeping only the k lowest frequencies, with a learnable gain per frequency:

    E_out = U diag(θ) Uᵀ E,   U = eigenvectors of the k largest eigenvalues of Â.

θ starts at 1 (an ideal low-pass filter). On the user–item–persona graph this is LGCN3 of the
GPLR paper (Section 6): persona nodes reshape the spectrum, so the basis carries persona signal.
"""
from __future__ import annotations

import torch
from torch import nn

from recsys.graph import RecGraph
from recsys.models.base import Recommender

__all__ = ["LGCN"]


class LGCN(Recommender):
    name = "lgcn"
    eigvals: torch.Tensor  # buffers (register_buffer)
    basis: torch.Tensor

    def __init__(self, graph: RecGraph, n_eigen: int = 128, residual: bool = False, **kwargs) -> None:
        super().__init__(graph, **kwargs)
        k = min(n_eigen, graph.n_nodes - 1)
        vals, vecs = graph.spectrum(k)
        self.register_buffer("eigvals", torch.as_tensor(vals, dtype=torch.float32), persistent=False)
        self.register_buffer("basis", torch.as_tensor(vecs, dtype=torch.float32), persistent=False)
        self.kernel = nn.Parameter(torch.ones(k))
        self.residual = residual

    def layers(self) -> list[torch.Tensor]:
        spectral = self.basis.T @ self.embedding  # k × d: graph Fourier coefficients
        return [self.embedding, self.basis @ (self.kernel[:, None] * spectral)]

    def combine(self, layers: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(layers).mean(dim=0) if self.residual else layers[-1]
