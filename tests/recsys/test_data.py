"""Splits are disjoint and complete; persona tables align and drop unknown names."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from core.personas import Persona, PersonaSet
from recsys.data import (
    carve_validation,
    interactions,
    load_paper_split,
    load_persona_table,
    persona_matrix,
    split_frame,
)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(1, 20), st.floats(0.05, 0.9), st.integers(0, 10_000))
def test_carve_validation_partitions_each_user(n_users: int, n_items: int, frac: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    train = sp.csr_matrix((rng.random((n_users, n_items)) < 0.4).astype(np.float32))
    fit, valid = carve_validation(train, frac, seed)
    np.testing.assert_array_equal((fit + valid).toarray(), train.toarray())
    assert fit.multiply(valid).nnz == 0
    deg = np.diff(train.indptr)
    fit_deg, val_deg = np.diff(fit.indptr), np.diff(valid.indptr)
    assert np.all(fit_deg[deg > 0] >= 1)  # nobody loses all training edges
    np.testing.assert_array_equal(val_deg, np.minimum(np.ceil(frac * deg), np.maximum(deg - 1, 0)))


def test_carve_validation_is_seeded_and_rejects_bad_fraction() -> None:
    train = interactions(np.repeat(np.arange(5), 6), np.tile(np.arange(6), 5), 5, 6)
    a, b = carve_validation(train, 0.3, 1), carve_validation(train, 0.3, 1)
    assert (a[1] != b[1]).nnz == 0
    with pytest.raises(ValueError, match="fraction"):
        carve_validation(train, 1.0, 0)


def test_split_frame_covers_all_pairs(persona_shop) -> None:
    data, frame = persona_shop.data, persona_shop.shop.frame
    assert data.fit.multiply(data.valid).nnz == 0
    assert data.train.multiply(data.test).nnz == 0
    assert data.fit.nnz + data.valid.nnz + data.test.nnz == len(frame[["user_id", "item_id"]].drop_duplicates())
    # item names come from the frame, aligned with the columns
    assert set(data.item_names) <= set(frame["item_name"])


def test_split_frame_rejects_missing_columns() -> None:
    with pytest.raises(ValueError, match="item_id"):
        split_frame(pd.DataFrame({"user_id": ["a"]}))


def test_persona_table_alignment(tmp_path) -> None:
    ps = PersonaSet([Persona("A", ""), Persona("B", ""), Persona("C", "")])
    path = tmp_path / "p.csv"
    path.write_text("CustomerID,personas\n12.0,B|Ghost|A\n13,\n14,c\n")
    m = load_persona_table(path, "CustomerID", np.array(["14", "12", "99", "13"], dtype=object), ps)
    np.testing.assert_array_equal(m.toarray(), [[0, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="columns"):
        load_persona_table(path, "user", np.array(["1"]), ps)
    with pytest.raises(ValueError, match="out of range"):
        persona_matrix([(0, 3)], 3)


def test_paper_split_matches_readme(data_dir) -> None:
    data = load_paper_split(data_dir / "split.csv.gz")
    assert (data.n_users, data.n_items) == (4297, 3846)
    assert data.train.nnz == 208_956 and data.test.nnz == 54_311
    assert data.fit.nnz + data.valid.nnz == data.train.nnz
