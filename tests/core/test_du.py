"""DU sampling (Eq. 1) against hand-computed KL and entropy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from core.du import du_scores, normalise_rows, select_du

ALPHA = 1e-6


def smoothed(row: list[float]) -> list[float]:
    s = sum(row)
    m = len(row)
    q = [x / s if s > 0 else 0.0 for x in row]
    return [(x + ALPHA) / (sum(q) + m * ALPHA) for x in q]


def by_hand(row: list[float], q_hat: list[float]) -> float:
    q = smoothed(row)
    kl = sum(p * math.log(p / x) for p, x in zip(q_hat, q) if p > 0)
    h = -sum(x * math.log(x) for x in q)
    return kl + h


def test_two_personas_hand_computed() -> None:
    # Q_u = (0.75, 0.25), Q̂ = (0.5, 0.5): KL = 0.5·ln(4/3) = 0.143841, H = 0.562335.
    score = du_scores(np.array([[3.0, 1.0]]), np.array([0.5, 0.5]))[0]
    assert score == pytest.approx(0.5 * math.log(4 / 3) + 0.562335, abs=1e-5)
    assert score == pytest.approx(by_hand([3.0, 1.0], [0.5, 0.5]), rel=1e-12)


def test_three_personas_with_zeros_hand_computed() -> None:
    psi = np.array([[2.0, 1.0, 1.0], [0.0, 4.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    q_hat = [0.5, 0.5, 0.0]
    scores = du_scores(psi, np.array(q_hat))
    expected = [by_hand(list(r), q_hat) for r in psi]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    # the all-zero row is exactly uniform: KL(Q̂‖U) + log 3 = (log 3 − log 2) + log 3
    assert scores[2] == pytest.approx(2 * math.log(3) - math.log(2), abs=1e-9)
    assert scores[2] == pytest.approx(scores[3], abs=1e-9)
    # a zero where Q̂ > 0 is a large but finite penalty
    assert np.isfinite(scores[1]) and scores[1] > scores[0] > 0


def test_q_hat_may_be_counts_and_rows_sparse() -> None:
    psi = np.array([[1.0, 0.0, 3.0], [0.2, 0.3, 0.5]])
    dense = du_scores(psi, np.array([0.25, 0.25, 0.5]))
    from_counts = du_scores(sp.csr_matrix(psi), np.array([1.0, 1.0, 2.0]))
    np.testing.assert_allclose(dense, from_counts, rtol=1e-12)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="personas"):
        du_scores(np.ones((2, 3)), np.ones(2))
    with pytest.raises(ValueError, match="distribution"):
        du_scores(np.ones((2, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="non-negative"):
        du_scores(np.array([[1.0, -1.0]]), np.ones(2))
    with pytest.raises(ValueError, match="smoothing"):
        normalise_rows(np.ones((1, 2)), smoothing=0)


# Entries are 0 or at least 1e-6: scaling a value near the smallest double (5e-324) by < 1
# underflows to 0 and turns a one-hot row into an empty one, a floating-point artefact rather
# than a property of Eq. 1 (affinities are averages of label shares, never that small).
rows = arrays(np.float64, st.tuples(st.integers(1, 6), st.integers(2, 5)),
              elements=st.one_of(st.just(0.0), st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False)))


@settings(max_examples=60, deadline=None)
@given(rows, st.floats(0.01, 100))
def test_properties(psi: np.ndarray, scale: float) -> None:
    m = psi.shape[1]
    q_hat = np.arange(1, m + 1, dtype=float)
    scores = du_scores(psi, q_hat)
    assert np.all(np.isfinite(scores)) and np.all(scores >= -1e-9)  # KL ≥ 0 and H ≥ 0
    np.testing.assert_allclose(du_scores(psi * scale, q_hat), scores, rtol=1e-9, atol=1e-9)
    q = normalise_rows(psi)
    np.testing.assert_allclose(q.sum(axis=1), 1.0)


def test_select_du_picks_best_unlabeled_with_stable_ties() -> None:
    scores = np.array([0.5, 2.0, 2.0, 3.0, 2.0, 0.1])
    mask = np.array([True, True, True, False, True, True])
    assert select_du(scores, mask, 3).tolist() == [1, 2, 4]
    assert select_du(scores, np.array([5, 4, 0, 2]), 2).tolist() == [2, 4]
    assert select_du(scores, mask, 10).tolist() == [1, 2, 4, 0, 5]
    assert select_du(scores, mask, 0).tolist() == []


def test_select_du_rejects_bad_candidates() -> None:
    with pytest.raises(ValueError):
        select_du(np.ones(3), np.array([True, False]), 1)
    with pytest.raises(ValueError):
        select_du(np.ones(3), np.array([0, 3]), 1)
    with pytest.raises(ValueError):
        select_du(np.array([np.nan, 1.0]), np.array([True, True]), 1)
