"""Our EASE against cornac's (optional extra `bench`): the same closed form on the same matrix."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from recsys.graph import build_graph
from recsys.models import make_model

cornac = pytest.importorskip("cornac")


def test_ease_equals_cornac_ease_at_the_same_lambda() -> None:
    from cornac.data import Dataset
    from cornac.models import EASE

    rng = np.random.default_rng(2)
    x = sp.csr_matrix((rng.random((60, 25)) < 0.15).astype(np.float32))
    dense = x.toarray()
    dense[np.arange(60), np.arange(60) % 25] = 1.0  # every user buys, every item is bought
    x = sp.csr_matrix(dense)
    coo = x.tocoo()
    dataset = Dataset.from_uir([(str(u), str(i), 1.0) for u, i in zip(coo.row, coo.col)], seed=0)
    theirs = EASE(lamb=7.0, posB=False, verbose=False).fit(dataset)
    ours = make_model("ease", build_graph(x), lam=7.0, device="cpu").solve(x)
    users = [dataset.uid_map[str(u)] for u in range(60)]
    items = np.array([dataset.iid_map[str(i)] for i in range(25)])
    expected = np.stack([np.asarray(theirs.score(u)).ravel()[items] for u in users])
    got = ours.full_sort_scores(torch.arange(60)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
