"""Cold-start protocol, where personas should matter most.

* Cold users: users with at most `max_purchases` training purchases (fit + validation) and at
  least one test item; the usual full-ranking NDCG@K over just those users (`evaluate(users=…)`).
* Cold items: items with no training purchase at all that someone buys in test. The question is
  item-side — who should see the new item first — so for each such item every user is ranked by
  the model's score of that item (its column of `full_sort_scores`; on a persona graph the item
  node is tied to its personas from the labeler, on a plain graph it is tied to nothing) and
  NDCG@K is taken against the item's test buyers. The reference without a model ranks users by
  how much they bought (`activity_ranking`).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from recsys.data import RecData
from recsys.metrics import hit_matrix, ndcg_at_k
from recsys.models.base import RankingModel

__all__ = ["cold_users", "cold_items", "item_side_ndcg", "model_item_scores", "activity_ranking"]


def cold_users(data: RecData, max_purchases: int = 3) -> np.ndarray:
    """Users with 1..`max_purchases` training items and at least one test item."""
    degree = np.diff(data.train.indptr)
    has_test = np.diff(data.test.indptr) > 0
    return np.flatnonzero((degree <= max_purchases) & has_test)


def cold_items(data: RecData) -> np.ndarray:
    """Items never bought in training that are bought in test."""
    train_pop = np.diff(data.train.tocsc().indptr)
    test_pop = np.diff(data.test.tocsc().indptr)
    return np.flatnonzero((train_pop == 0) & (test_pop > 0))


def model_item_scores(model: RankingModel, items: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """users × len(items): every user's score of each item in `items`."""
    n_users = model.graph.n_users
    out = np.empty((n_users, len(items)), dtype=np.float64)
    cols = torch.as_tensor(items, dtype=torch.long)
    model.eval()
    with torch.no_grad():
        for lo in range(0, n_users, batch_size):
            users = torch.arange(lo, min(lo + batch_size, n_users))
            scores = model.full_sort_scores(users)
            out[lo:lo + len(users)] = scores[:, cols.to(scores.device)].cpu().numpy()
    return out


def activity_ranking(data: RecData, items: np.ndarray) -> np.ndarray:
    """The model-free reference: every user's score of any item is her training purchase count."""
    degree = np.diff(data.train.indptr).astype(np.float64)
    return np.repeat(degree[:, None], len(items), axis=1)


def item_side_ndcg(scores: np.ndarray, data: RecData, items: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-item NDCG@K of ranking all users by `scores[:, j]` against item j's test buyers.

    Ties are broken by user index (stable), so a constant score column ranks users in index
    order — no model gets credit for a tie.
    """
    truth = sp.csr_matrix(data.test.T.tocsr()[items])
    order = np.argsort(-scores.T, axis=1, kind="stable")[:, :k]
    hits = hit_matrix(order, truth, np.arange(len(items)))
    return ndcg_at_k(hits, np.diff(truth.indptr), k)
