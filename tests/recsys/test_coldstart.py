"""The cold-start slices and the item-side NDCG against brute force."""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from recsys.coldstart import activity_ranking, cold_items, cold_users, item_side_ndcg
from recsys.data import RecData


def _data() -> RecData:
    # 4 users × 5 items; item 4 is never bought in training, item 3 only in training
    def m(rows: list[list[int]]) -> sp.csr_matrix:
        return sp.csr_matrix(np.array(rows, dtype=np.float32))

    fit = m([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0], [0, 0, 1, 0, 0]])
    valid = m([[0, 0, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]])
    test = m([[0, 0, 0, 0, 1], [0, 1, 0, 0, 0], [0, 0, 0, 0, 1], [0, 0, 0, 0, 0]])
    users, items = np.array(["a", "b", "c", "d"], dtype=object), np.array(list("vwxyz"), dtype=object)
    return RecData(users, items, fit, valid, test)


def test_slices() -> None:
    data = _data()
    # training degrees (fit + valid): 4, 1, 4, 2; user d has no test item
    assert cold_users(data, 3).tolist() == [1]
    assert cold_users(data, 4).tolist() == [0, 1, 2]
    assert cold_items(data).tolist() == [4]


def test_item_side_ndcg_matches_brute_force() -> None:
    data = _data()
    items = cold_items(data)
    # buyers of item 4 in test: users 0 and 2. Ranking c, a, d, b: hits at positions 1 and 2.
    scores = np.array([[0.5], [0.1], [0.9], [0.2]])
    assert item_side_ndcg(scores, data, items, k=2).tolist() == [1.0]
    # ranking d, b, a, c: hits at 3 and 4 → DCG@4 = 1/log2 4 + 1/log2 5, IDCG = 1 + 1/log2 3
    worst = np.array([[0.3], [0.4], [0.1], [0.9]])
    expected = (1 / np.log2(4) + 1 / np.log2(5)) / (1 + 1 / np.log2(3))
    np.testing.assert_allclose(item_side_ndcg(worst, data, items, k=4), [expected])
    # a constant column gets no credit for ties beyond user order: a, b, c, d → hits at 1 and 3
    flat = np.zeros((4, 1))
    np.testing.assert_allclose(item_side_ndcg(flat, data, items, k=4),
                               [(1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))])


def test_activity_reference_ranks_heavy_buyers_first() -> None:
    data = _data()
    scores = activity_ranking(data, np.array([4, 2]))
    assert scores.shape == (4, 2) and scores[:, 0].tolist() == [4.0, 1.0, 4.0, 2.0]
    assert item_side_ndcg(scores[:, :1], data, np.array([4]), k=2).tolist() == [1.0]
