"""Honest full-ranking evaluation: every item is ranked for every evaluated user, the user's
known (training) items are masked out, and metrics are kept per user so they can be averaged
over seeds or compared with a paired t-test. Test data is only ever passed in here as `truth`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from scipy import stats

from recsys.metrics import f1_at_k, hit_matrix, ndcg_at_k
from recsys.models.base import RankingModel

__all__ = ["KS", "Evaluation", "topk_items", "evaluate", "paired_ttest", "aggregate"]

KS: tuple[int, ...] = (2, 5, 10, 20, 50, 100)


@dataclass
class Evaluation:
    """Per-user metric arrays (`"ndcg@10"`, `"f1@10"`, ...) aligned with `users`."""

    users: np.ndarray
    per_user: dict[str, np.ndarray] = field(default_factory=dict)

    def mean(self) -> dict[str, float]:
        return {k: float(v.mean()) if len(v) else 0.0 for k, v in self.per_user.items()}


def topk_items(model: RankingModel, users: np.ndarray, mask: sp.csr_matrix, k: int,
               batch_size: int = 1024, with_scores: bool = False) -> Any:
    """Indices of the k best-scored items per user, excluding the user's entries in `mask`
    (and, `with_scores`, their scores alongside)."""
    mask = sp.csr_matrix(mask)
    k = min(k, mask.shape[1])
    model.eval()
    out = np.empty((len(users), k), dtype=np.int64)
    values = np.empty((len(users), k), dtype=np.float64)
    with torch.no_grad():
        for lo in range(0, len(users), batch_size):
            batch = np.asarray(users[lo:lo + batch_size])
            scores = model.full_sort_scores(torch.as_tensor(batch, dtype=torch.long))
            seen = torch.as_tensor(mask[batch].toarray() > 0, device=scores.device)
            scores = scores.masked_fill(seen, float("-inf"))
            best = torch.topk(scores, k, dim=1)
            out[lo:lo + len(batch)] = best.indices.cpu().numpy()
            values[lo:lo + len(batch)] = best.values.cpu().numpy()
    return (out, values) if with_scores else out


def evaluate(model: RankingModel, truth: sp.csr_matrix, mask: sp.csr_matrix,
             ks: Iterable[int] = KS, users: np.ndarray | None = None) -> Evaluation:
    """NDCG@K and F1@K for every user with at least one `truth` item (or the given `users`)."""
    truth = sp.csr_matrix(truth)
    ks = sorted(set(ks))
    n_rel = np.diff(truth.indptr)
    users = np.flatnonzero(n_rel > 0) if users is None else np.asarray(users)
    depth = min(max(ks), truth.shape[1])
    if not len(users):
        return Evaluation(users, {f"{m}@{k}": np.zeros(0) for k in ks for m in ("ndcg", "f1")})
    top = topk_items(model, users, mask, depth)
    hits = hit_matrix(top, truth, users)
    if depth < max(ks):  # fewer items than K: nothing beyond them can be a hit
        hits = np.pad(hits, ((0, 0), (0, max(ks) - depth)))
    result = Evaluation(users)
    for k in ks:
        result.per_user[f"ndcg@{k}"] = ndcg_at_k(hits, n_rel[users], k)
        result.per_user[f"f1@{k}"] = f1_at_k(hits, n_rel[users], k)
    return result


def paired_ttest(a: Evaluation, b: Evaluation, metric: str = "ndcg@10") -> dict[str, Any]:
    """scipy.stats.ttest_rel of b − a over the same users (b better ⇒ positive t)."""
    if not np.array_equal(a.users, b.users):
        raise ValueError("paired test needs the same evaluated users in the same order")
    x, y = a.per_user[metric], b.per_user[metric]
    res = stats.ttest_rel(y, x)
    return {"metric": metric, "n_users": int(len(x)), "mean_a": float(x.mean()),
            "mean_b": float(y.mean()), "t": float(res.statistic), "p_value": float(res.pvalue)}


def aggregate(runs: Sequence[Evaluation]) -> dict[str, dict[str, float]]:
    """Mean and sample std (ddof=1; 0 for one run) over runs (seeds) of each metric's user mean."""
    if not runs:
        raise ValueError("nothing to aggregate")
    means = [r.mean() for r in runs]
    out = {}
    for key in means[0]:
        vals = np.array([m[key] for m in means])
        out[key] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
    return out
