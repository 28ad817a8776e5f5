"""The set model of core.labelers.set_posterior against brute force on tiny instances."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from core.labelers.set_posterior import EPS, RHO0, expected_f1_sets, refine_ratios, set_posterior


def _log_posterior(weights: np.ndarray, ratios: np.ndarray, subset: tuple[int, ...], prior: np.ndarray,
                   eps: float) -> float:
    """Brute force: log p(purchases | S) + log-odds prior of S, relative to the empty set."""
    if not subset:
        return 0.0  # the empty set explains every purchase as the shop (ratio 1)
    mix = ratios[:, list(subset)].mean(axis=1)
    lik = float(np.sum(weights * np.log((1 - eps) * mix + eps)))
    return lik + float(sum(np.log(prior[r] / (1 - prior[r])) for r in subset))


def _greedy(weights, ratios, prior, eps, max_personas):
    chosen: tuple[int, ...] = ()
    current = 0.0
    for _ in range(min(max_personas, ratios.shape[1])):
        gains = [(_log_posterior(weights, ratios, chosen + (r,), prior, eps) - current, r)
                 for r in range(ratios.shape[1]) if r not in chosen]
        best = max(gains, key=lambda g: (g[0], -g[1]))  # ties: the lowest index, like argmax
        if best[0] <= 0 and chosen:
            break
        chosen += (best[1],)
        current += best[0]
    return chosen


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(2, 4), st.integers(1, 3), st.integers(0, 10**6))
def test_map_set_and_conditional_probabilities_match_brute_force(n_users, n_items, m, max_personas, seed):
    rng = np.random.default_rng(seed)
    eps = float(rng.uniform(0.05, 0.5))
    weights = rng.random((n_users, n_items)) * (rng.random((n_users, n_items)) < 0.7) * 3
    ratios = rng.gamma(0.7, 1.5, size=(n_items, m))
    prior = rng.uniform(0.05, 0.6, size=m)
    chosen, prob, used = set_posterior(sp.csr_matrix(weights), ratios, eps=eps, max_personas=max_personas,
                                       prior=prior)
    assert np.array_equal(used, prior)
    for u in range(n_users):
        greedy = _greedy(weights[u], ratios, prior, eps, max_personas)
        assert set(np.flatnonzero(chosen[u])) == set(greedy)
        base = _log_posterior(weights[u], ratios, greedy, prior, eps)
        for r in range(m):
            if r in greedy:
                rest = tuple(x for x in greedy if x != r)
                log_odds = base - _log_posterior(weights[u], ratios, rest, prior, eps)
            else:
                log_odds = _log_posterior(weights[u], ratios, greedy + (r,), prior, eps) - base
            assert prob[u, r] == pytest.approx(1 / (1 + np.exp(-log_odds)), rel=1e-9, abs=1e-12)


def test_the_prior_is_fitted_on_the_users_without_labels():
    rng = np.random.default_rng(3)
    # 40 users: persona 0 explains everyone's purchases, persona 2 only a few users'
    ratios = np.array([[4.0, 0.2, 0.1], [0.1, 0.2, 5.0], [0.5, 0.5, 0.5]])
    weights = np.zeros((40, 3))
    weights[:, 0] = rng.integers(2, 6, 40)
    weights[:5, 1] = 3
    weights[:, 2] = 1
    _, first, rho1 = set_posterior(sp.csr_matrix(weights), ratios, iters=1)
    assert np.allclose(rho1, np.clip(first.mean(axis=0), 1e-3, 0.9))  # one EM step: the mean probability
    _, prob, rho = set_posterior(sp.csr_matrix(weights), ratios)
    assert rho[0] > 0.8 > RHO0 > rho[2] and rho[1] < RHO0
    _, flat, _ = set_posterior(sp.csr_matrix(weights), ratios, prior=np.full(3, RHO0))
    assert np.allclose(flat, first)  # iteration one ran on the flat prior
    with pytest.raises(ValueError):
        set_posterior(sp.csr_matrix(weights), ratios, prior=np.array([0.5, 1.0, 0.2]))
    with pytest.raises(ValueError):
        set_posterior(sp.csr_matrix(weights), ratios, eps=0.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(1, 5), st.integers(0, 10**6))
def test_expected_f1_sets_match_brute_force(n, m, max_personas, seed):
    prob = np.random.default_rng(seed).random((n, m))
    got = expected_f1_sets(prob, max_personas)
    for u in range(n):
        order = np.argsort(-prob[u], kind="stable")
        scores = [2 * prob[u, order[:k]].sum() / (k + prob[u].sum()) for k in range(1, min(max_personas, m) + 1)]
        k = int(np.argmax(scores)) + 1
        assert set(np.flatnonzero(got[u])) == set(order[:k].tolist())
    # a doubled number of confident personas is kept whole; one confident persona alone
    assert expected_f1_sets(np.array([[0.9, 0.9, 0.9, 0.9, 0.05]])).sum() == 4
    assert expected_f1_sets(np.array([[0.9, 0.2, 0.1, 0.1, 0.05]])).sum() == 1


def _refine_brute(weights: np.ndarray, ratios: np.ndarray, votes: np.ndarray, rounds: int, pseudo: float,
                  eps: float) -> np.ndarray:
    """refine_ratios with loops over users, items and personas (soft sets from set_posterior)."""
    n, n_items = weights.shape
    m = ratios.shape[1]
    p_item = np.array([weights[:, j].sum() + pseudo for j in range(n_items)])
    p_item /= p_item.sum()
    for _ in range(rounds):
        _, prob, _ = set_posterior(sp.csr_matrix(weights), ratios, eps=eps)
        counts = np.zeros((n_items, m))
        for u in range(n):
            size = sum(prob[u])
            for j in range(n_items):
                if weights[u, j] == 0:
                    continue
                total = sum((1 - eps) * prob[u, r] * ratios[j, r] / size for r in range(m)) + eps
                for r in range(m):
                    counts[j, r] += weights[u, j] * (1 - eps) * prob[u, r] * ratios[j, r] / size / total
        given = counts + pseudo * votes
        given /= given.sum(axis=0, keepdims=True)
        ratios = given / p_item[:, None]
    return ratios


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(2, 4), st.integers(0, 3), st.integers(0, 10**6))
def test_refine_ratios_matches_brute_force(n_users, n_items, m, rounds, seed):
    rng = np.random.default_rng(seed)
    weights = rng.random((n_users, n_items)) * (rng.random((n_users, n_items)) < 0.6)
    votes = rng.dirichlet(np.ones(m), size=n_items)
    ratios = votes / votes.mean(axis=0)
    got = refine_ratios(sp.csr_matrix(weights), ratios, votes, rounds=rounds, pseudo=0.7)
    assert np.allclose(got, _refine_brute(weights, ratios, votes, rounds, 0.7, EPS), rtol=1e-9, atol=1e-12)
    if rounds == 0:
        assert np.array_equal(got, ratios)


def test_refine_ratios_learns_an_item_from_its_buyers():
    """Item 2's name leans to persona 0, but only persona-1 users (who buy items 1 and 3) buy it:
    the re-estimate moves it to persona 1 and sharpens the items whose buyers agree with them."""
    votes = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.2, 0.8]])
    ratios = votes / votes.mean(axis=0)
    weights = np.zeros((20, 4))
    weights[:10, 0] = 1.0
    weights[10:, [1, 2, 3]] = 1.0
    got = refine_ratios(sp.csr_matrix(weights), ratios, votes)
    assert ratios[2, 0] > ratios[2, 1] and got[2, 1] > got[2, 0]
    assert got[0, 0] / got[0, 1] > ratios[0, 0] / ratios[0, 1]  # agreeing buyers: a sharper item
    assert got[3, 1] / got[3, 0] > ratios[3, 1] / ratios[3, 0]
    with pytest.raises(ValueError):
        refine_ratios(sp.csr_matrix(weights), ratios, votes, rounds=-1)
    with pytest.raises(ValueError):
        refine_ratios(sp.csr_matrix(weights), ratios[:3], votes)
