"""Persona affinity Ψ: spread the few LLM-labeled prototypes' personas over the purchase graph.

GPLR (paper §3) scores every user u against every persona m by random walks of even length
user → item → user that start at u and stop at a prototype:

    Ψ = (1/ℓ̂) Σ_{ℓ=1..ℓ̂} (P P')^ℓ L,      L = row-normalised prototype matrix Φ,

with P (users → items) and P' (items → users) the row-stochastic transition matrices of
`BipartiteGraph.transitions`. `exact_affinity` evaluates it right to left with sparse × dense
products (never a users × users matrix); `revaff_affinity` (Algorithm 2) approximates it by a
thresholded reverse push from the prototypes with |Ψ − Ψ̂| ≤ ε entrywise. `compute_affinity`
multiplies by the de-bias weights c (Eq. 3) so that over-labeled personas do not swamp rare ones.

Examples
--------
>>> import numpy as np
>>> from core.graph import BipartiteGraph
>>> g = BipartiteGraph.from_indices(np.array([0, 1, 1, 2]), np.array([0, 0, 1, 1]), 3, 2)
>>> phi = prototype_matrix(3, {0: [0], 2: [1]}, 2)
>>> exact_affinity(g, phi).round(3).tolist()
[[0.5, 0.0], [0.25, 0.25], [0.0, 0.5]]
>>> idx, scores = top_personas(np.array([[0.1, 0.7, 0.2]]), 2)
>>> idx.tolist(), scores.tolist()
([[1, 2]], [[0.7, 0.2]])
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from core import _affinity_kernels as kernels
from core.graph import BipartiteGraph, EdgeWeight

__all__ = [
    "AFFINITY_METHODS",
    "prototype_matrix",
    "label_distribution",
    "debias_weights",
    "exact_affinity",
    "revaff_affinity",
    "compute_affinity",
    "self_return",
    "top_personas",
]

logger = logging.getLogger(__name__)


# -- labels ----------------------------------------------------------------------------------
def prototype_matrix(n_users: int, labels: Mapping[int, Sequence[int]], n_personas: int) -> np.ndarray:
    """Φ (users × personas, float64 0/1): row u marks the personas the labeler gave user u.

    Rows of users without labels are zero; a repeated persona in one label list counts once.
    Out-of-range users or personas raise ValueError (a silent drop would lose a paid label).
    """
    if n_users < 0 or n_personas < 1:
        raise ValueError(f"need n_users >= 0 and n_personas >= 1, got {n_users}, {n_personas}")
    phi = np.zeros((n_users, n_personas), dtype=np.float64)
    if not labels:
        return phi
    users = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
    lists = [np.asarray(v, dtype=np.int64).ravel() for v in labels.values()]
    rows = np.repeat(users, [a.size for a in lists])
    cols = np.concatenate(lists)
    if users.size and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"labeled user index out of range [0, {n_users})")
    if cols.size and (cols.min() < 0 or cols.max() >= n_personas):
        raise ValueError(f"persona index out of range [0, {n_personas})")
    phi[rows, cols] = 1.0
    return phi


def label_distribution(phi: np.ndarray) -> np.ndarray:
    """Q̂: the share of all (prototype, persona) labels that name each persona; sums to 1.

    Binary counts, not row-normalised: a prototype with three personas adds one label to each
    of them, because Q̂ estimates how often the labeler *uses* each persona (what DU sampling
    balances and de-biasing corrects). Non-binary Φ entries count as their value. With no
    labels at all the distribution is uniform (nothing is known yet).

    >>> label_distribution(np.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])).round(3).tolist()
    [0.667, 0.333, 0.0]
    """
    phi = _as_matrix(phi, "Φ")
    counts = phi.sum(axis=0)
    total = counts.sum()
    if total <= 0:
        return np.full(phi.shape[1], 1.0 / phi.shape[1])
    shares: np.ndarray = counts / total
    return shares


def debias_weights(q_hat: np.ndarray, beta: float) -> np.ndarray:
    """c_m = (min_{Q̂>0} Q̂ / Q̂_m)^β (Eq. 3), and c_m = 1 where Q̂_m = 0; all c_m ∈ (0, 1].

    β = 0 switches de-biasing off; larger β pushes the most-labeled personas down harder.

    >>> debias_weights(np.array([0.5, 0.25, 0.25, 0.0]), 1.0).tolist()
    [0.5, 1.0, 1.0, 1.0]
    """
    q = np.asarray(q_hat, dtype=np.float64).ravel()
    if not np.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta}")
    if q.size == 0 or not np.all(np.isfinite(q)) or np.any(q < 0):
        raise ValueError("Q̂ must be a non-empty vector of finite, non-negative numbers")
    c = np.ones_like(q)
    seen = q > 0
    if seen.any():
        c[seen] = (q[seen].min() / q[seen]) ** beta
    return c


# -- affinity --------------------------------------------------------------------------------
def exact_affinity(
    graph: BipartiteGraph, phi: np.ndarray, hops: int = 1, weight: EdgeWeight = "binary"
) -> np.ndarray:
    """Ψ_raw = (1/ℓ̂) Σ_{ℓ≤ℓ̂} (P P')^ℓ L exactly, as users × personas float64.

    Evaluated right to left, X_ℓ = P (P' X_{ℓ-1}) with X_0 = L, so each hop costs two sparse ×
    dense products of width |R|. The first P'·L is sparse × sparse because only prototype rows
    of L are non-zero; the P products run on a parallel numba kernel.
    """
    hops = _check_hops(hops)
    phi = _check_phi(graph, phi)
    P, Pt = graph.transitions(weight)
    L = _row_normalise_dense(phi)
    first = (Pt @ sp.csr_matrix(L)).toarray()  # items × personas; reads prototype columns only
    x = _spmm(P, first)
    acc = x
    for _ in range(hops - 1):
        x = _spmm(P, _spmm(Pt, x))
        acc = acc + x  # a new array, so `x` is never aliased
    return acc / hops if hops > 1 else acc


def revaff_affinity(
    graph: BipartiteGraph,
    phi: np.ndarray,
    hops: int = 1,
    eps: float = 0.05,
    weight: EdgeWeight = "binary",
) -> np.ndarray:
    """Ψ̂_raw by RevAff (Algorithm 2): reverse push per persona from its prototypes.

    Residuals move users → items (by P') → users (by P); on each half-hop only residuals above
    θ = ε/(2ℓ̂) are pushed, the rest are dropped. Guarantee: |Ψ_raw − Ψ̂_raw| ≤ ε entrywise.

    Proof. Let e_ℓ = X_ℓ − X̂_ℓ ≥ 0 be the hop-ℓ error (e_0 = 0, X̂_0 = L). Hop ℓ drops a
    user vector d_u ≤ θ before P' and an item vector d_v ≤ θ before P, so
    e_ℓ = P P' e_{ℓ-1} + P P' d_u + P d_v. P and P' are row-stochastic (empty rows are zero),
    so each output entry is a weighted mean of inputs: dropped mass is averaged, never
    amplified, and ‖e_ℓ‖∞ ≤ ‖e_{ℓ-1}‖∞ + 2θ = 2ℓθ. Hence
    ‖Ψ − Ψ̂‖∞ ≤ (1/ℓ̂) Σ_ℓ 2ℓθ = (ℓ̂+1)θ = (ℓ̂+1)ε/(2ℓ̂) ≤ ε.  ∎
    The de-bias weights satisfy c_m ≤ 1, so the de-biased error stays ≤ ε as well.
    """
    hops = _check_hops(hops)
    if not np.isfinite(eps) or eps <= 0:
        raise ValueError(f"eps must be a finite number > 0, got {eps}")
    phi = _check_phi(graph, phi)
    seeds = sp.csc_matrix(_row_normalise_dense(phi))  # column m: prototypes with L[u,m] > 0
    push: Any = kernels.revaff_push  # a numba dispatcher: its signature is not visible to mypy
    out = push(
        *_push_operators(graph, weight),
        *_index_arrays(seeds), seeds.data.astype(np.float64),
        graph.n_items, hops, eps / (2.0 * hops),
    )
    return np.ascontiguousarray(out.T)


AffinityMethod = Callable[[BipartiteGraph, np.ndarray, int, float, EdgeWeight], np.ndarray]

#: Ψ_raw implementations by name, all called as f(graph, Φ, hops, eps, weight).
AFFINITY_METHODS: dict[str, AffinityMethod] = {
    "exact": lambda graph, phi, hops, eps, weight: exact_affinity(graph, phi, hops, weight),
    "revaff": revaff_affinity,
}


def compute_affinity(
    graph: BipartiteGraph,
    phi: np.ndarray,
    method: str = "exact",
    hops: int = 1,
    eps: float = 0.05,
    beta: float = 0.0,
    weight: EdgeWeight = "binary",
) -> np.ndarray:
    """Ψ = Ψ_raw · diag(c): the de-biased affinity by `method` ("exact" or "revaff")."""
    try:
        run = AFFINITY_METHODS[method]
    except KeyError:
        raise ValueError(f"unknown affinity method {method!r}; choose from {sorted(AFFINITY_METHODS)}") from None
    c = debias_weights(label_distribution(phi), beta)
    psi = run(graph, phi, hops, eps, weight)
    psi *= c
    logger.debug("affinity %s: %d users x %d personas, hops=%d", method, *psi.shape, hops)
    return psi


def self_return(graph: BipartiteGraph, users: np.ndarray, hops: int = 1,
                weight: EdgeWeight = "binary", chunk: int = 256) -> np.ndarray:
    """D[u] = (1/ℓ̂) Σ_ℓ ((P P')^ℓ)[u, u] for each of `users`: how much of u's own label comes
    back to u in Ψ_raw.

    Ψ_raw is linear in L, so a prototype's leave-one-out affinity (its label removed, everyone
    else's kept) is exactly Ψ_raw[u] − D[u]·L[u] — what a decoder must be calibrated on, since
    unlabeled users never see their own label. ℓ̂ = 1 has the closed form
    Σ_v w_uv² / (d_u d_v); longer walks propagate the users' unit vectors, `chunk` at a time.
    """
    hops = _check_hops(hops)
    users = np.asarray(users, dtype=np.int64).ravel()
    if users.size and (users.min() < 0 or users.max() >= graph.n_users):
        raise ValueError(f"user index out of range [0, {graph.n_users})")
    if hops == 1:
        w = graph.weighted(weight)
        d_user = np.asarray(w.sum(axis=1)).ravel()
        d_item = np.bincount(w.indices, weights=w.data, minlength=graph.n_items)
        rows = np.repeat(np.arange(graph.n_users), np.diff(w.indptr))
        vals = w.data**2 / (d_user[rows] * d_item[w.indices])
        return np.bincount(rows, weights=vals, minlength=graph.n_users)[users]
    P, Pt = graph.transitions(weight)
    out = np.empty(users.size)
    for lo in range(0, users.size, chunk):
        part = users[lo: lo + chunk]
        unit = sp.csr_matrix((np.ones(part.size), (part, np.arange(part.size))), shape=(graph.n_users, part.size))
        x = _spmm(P, (Pt @ unit).toarray())
        acc = x.copy()
        for _ in range(hops - 1):
            x = _spmm(P, _spmm(Pt, x))
            acc += x
        out[lo: lo + chunk] = acc[part, np.arange(part.size)] / hops
    return out


def top_personas(psi: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, scores), users × k: each row's k best personas, best first.

    Equal scores are ordered by persona index, except that which of several personas tied at
    the k-th place makes the cut is unspecified. Scores of 0 mean "no evidence", not a match.
    """
    psi = np.asarray(psi, dtype=np.float64)
    if psi.ndim != 2 or np.isnan(psi).any():
        raise ValueError(f"Ψ must be a 2-d users × personas matrix without NaN, got shape {psi.shape}")
    n_personas = psi.shape[1]
    if not 1 <= k <= n_personas:
        raise ValueError(f"k must be in [1, {n_personas}], got {k}")
    part = np.argpartition(-psi, k - 1, axis=1)[:, :k]
    scores = np.take_along_axis(psi, part, axis=1)
    order = np.lexsort((part, -scores), axis=1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(scores, order, axis=1)


# -- helpers ---------------------------------------------------------------------------------
def _as_matrix(a: np.ndarray, name: str) -> np.ndarray:
    """2-d, float64, finite, non-negative, at least one column (else a clear ValueError)."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a 2-d users × personas matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"{name} must contain finite, non-negative numbers")
    return a


def _check_phi(graph: BipartiteGraph, phi: np.ndarray) -> np.ndarray:
    phi = _as_matrix(phi, "Φ")
    if phi.shape[0] != graph.n_users:
        raise ValueError(f"Φ has {phi.shape[0]} rows but the graph has {graph.n_users} users")
    return phi


def _check_hops(hops: int) -> int:
    if isinstance(hops, bool) or int(hops) != hops or hops < 1:
        raise ValueError(f"hops must be a positive integer, got {hops!r}")
    return int(hops)


def _row_normalise_dense(phi: np.ndarray) -> np.ndarray:
    """L: each prototype's unit mass split evenly over its personas; empty rows stay zero."""
    sums = phi.sum(axis=1, keepdims=True)
    return np.asarray(np.divide(phi, sums, out=np.zeros_like(phi), where=sums > 0))


def _spmm(a: sp.csr_matrix, dense: np.ndarray) -> np.ndarray:
    """CSR × dense on the parallel kernel (scipy's SpMM runs on one core)."""
    a = sp.csr_matrix(a)
    return kernels.spmm_csr_dense(
        a.indptr, a.indices, np.asarray(a.data, dtype=np.float64), np.ascontiguousarray(dense, dtype=np.float64)
    )


def _push_operators(graph: BipartiteGraph, weight: EdgeWeight) -> tuple[np.ndarray, ...]:
    """P'ᵀ indexed by user and Pᵀ indexed by item, as (indptr, indices, data) × 2.

    Reverse push walks the transitions backwards, so it needs them transposed. Built from the
    weighted matrix W directly (P'ᵀ[u,v] = w/d_v shares W's structure, Pᵀ[v,u] = w/d_u shares
    Wᵀ's), this costs one transpose instead of `transitions()` plus two CSR→CSC conversions.
    """
    w = graph.weighted(weight)
    d_user = np.asarray(w.sum(axis=1)).ravel()  # only indexed where an edge exists, so > 0
    d_item = np.bincount(w.indices, weights=w.data, minlength=graph.n_items)
    wt = w.T.tocsr()
    return (
        *_index_arrays(w), w.data / d_item[w.indices],
        *_index_arrays(wt), wt.data / d_user[wt.indices],
    )


def _index_arrays(m: sp.csc_matrix | sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
    """(indptr, indices) without copies: scipy's index dtype (int32 below 2³¹ entries) is kept."""
    return np.ascontiguousarray(m.indptr), np.ascontiguousarray(m.indices)
