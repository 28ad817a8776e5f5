"""Distribution-uncertainty (DU) sampling of prototype users (paper Eq. 1).

    score(u) = KL(Q̂ ‖ Q_u) + H(Q_u)

Q̂ is the persona distribution of the labels gathered so far and Q_u is user u's affinity row
normalised to sum to one. A high KL term means u's propagated personas look unlike what has
been labeled (under-represented personas); a high entropy means propagation is unsure about
u. Both make u worth an LLM call.

Smoothing (why: the KL term is infinite whenever Q_u has a zero where Q̂ does not):

* every normalised row gets additive smoothing and is renormalised,
  ``Q_u = (Q_u + α) / (Σ Q_u + m·α)`` with ``α = smoothing`` (default 1e-6) and m personas;
* a row that is all zero (a user no prototype reaches, Σ Q_u = 0) thus becomes exactly uniform: it
  gets the maximal entropy ``log m`` and ranks as the most uncertain, which is what DU wants;
* zeros in Q̂ contribute nothing to the KL term (the convention 0·log 0 = 0);
* Q̂ itself is normalised here, so raw label counts may be passed in.

Examples
--------
>>> import numpy as np
>>> du_scores(np.array([[1.0, 1.0]]), np.array([0.5, 0.5])).round(6).tolist()
[0.693147]
>>> select_du(np.array([0.3, 0.9, 0.9, 0.1]), np.array([True, True, True, False]), 2).tolist()
[1, 2]
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

__all__ = ["du_scores", "select_du", "normalise_rows"]

logger = logging.getLogger(__name__)


def normalise_rows(rows: np.ndarray | sp.spmatrix, smoothing: float = 1e-6) -> np.ndarray:
    """Rows as smoothed probability distributions (see the module docstring for the rule)."""
    if smoothing <= 0:
        raise ValueError("smoothing must be positive (it keeps the KL term finite)")
    dense = np.asarray(sp.csr_matrix(rows).toarray() if sp.issparse(rows) else rows, dtype=np.float64)
    if dense.ndim != 2:
        raise ValueError(f"expected a 2-d matrix of affinity rows, got shape {dense.shape}")
    if np.any(dense < 0) or not np.all(np.isfinite(dense)):
        raise ValueError("affinity rows must be finite and non-negative")
    sums = dense.sum(axis=1, keepdims=True)
    q = np.divide(dense, sums, out=np.zeros_like(dense), where=sums > 0)
    # divide by the smoothed total, so an all-zero row becomes exactly uniform
    out: np.ndarray = (q + smoothing) / (q.sum(axis=1, keepdims=True) + dense.shape[1] * smoothing)
    return out


def du_scores(
    psi_rows: np.ndarray | sp.spmatrix, q_hat: np.ndarray, smoothing: float = 1e-6
) -> np.ndarray:
    """Eq. 1 for every row of `psi_rows` (users × personas); one vectorised pass."""
    q_hat = np.asarray(q_hat, dtype=np.float64).ravel()
    q = normalise_rows(psi_rows, smoothing)
    if q.shape[1] != q_hat.size:
        raise ValueError(f"Q̂ has {q_hat.size} personas, affinity rows have {q.shape[1]}")
    total = q_hat.sum()
    if total <= 0 or np.any(q_hat < 0) or not np.all(np.isfinite(q_hat)):
        raise ValueError("Q̂ must be a non-negative, non-zero distribution")
    p = q_hat / total
    support = p > 0
    log_q = np.log(q)
    # KL(p‖q_u) = Σ_{p>0} p (log p − log q_u); only p's support counts.
    kl = np.sum(p[support] * np.log(p[support])) - log_q[:, support] @ p[support]
    entropy = -np.sum(q * log_q, axis=1)
    scores: np.ndarray = kl + entropy
    return scores


def select_du(scores: np.ndarray, candidates: np.ndarray, n: int) -> np.ndarray:
    """Indices of the `n` highest-scoring candidates, best first; ties go to the lower index.

    `candidates` is a boolean mask over users (True = may be labeled) or an array of user
    indices. Fewer than `n` candidates returns them all.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if n < 0:
        raise ValueError("n must be non-negative")
    cand = np.asarray(candidates)
    if cand.dtype == bool:
        if cand.shape != scores.shape:
            raise ValueError("candidate mask must have one entry per user")
        idx = np.flatnonzero(cand)
    else:
        idx = np.unique(cand.astype(np.int64))  # sorted, so the stable sort breaks ties by index
        if idx.size and (idx[0] < 0 or idx[-1] >= scores.size):
            raise ValueError("candidate index out of range")
    if np.any(np.isnan(scores[idx])):
        raise ValueError("DU scores contain NaN")
    order = np.argsort(-scores[idx], kind="stable")
    return idx[order[:n]]
