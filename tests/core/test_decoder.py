"""The calibrated decoder: leave-one-out scores, thresholds and decision rules against brute force."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.affinity import exact_affinity, prototype_matrix, self_return
from core.decoder import (
    NEVER,
    PersonaDecoder,
    PersonaModel,
    decoder_features,
    fit_decoder,
    fit_persona_model,
    fit_thresholds,
    graph_share,
    loo_psi_raw,
    match_prevalence,
    select_personas,
    with_prior,
)
from core.gplr import assign_personas
from core.graph import BipartiteGraph


def random_graph(n_users: int, n_items: int, seed: int) -> BipartiteGraph:
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(n_users), 4)
    items = rng.integers(0, n_items, size=users.size)
    counts = rng.integers(1, 4, size=users.size)
    return BipartiteGraph.from_indices(np.repeat(users, counts), np.repeat(items, counts), n_users, n_items)


def dense_walk(g: BipartiteGraph, hops: int, weight: str) -> np.ndarray:
    a = g.weighted(weight).toarray()
    P = a / np.maximum(a.sum(1, keepdims=True), 1e-300)
    Pt = a.T / np.maximum(a.T.sum(1, keepdims=True), 1e-300)
    return sum(np.linalg.matrix_power(P @ Pt, h) for h in range(1, hops + 1)) / hops


@pytest.mark.parametrize("hops,weight", [(1, "binary"), (1, "count"), (2, "binary"), (3, "log")])
def test_self_return_is_the_walk_diagonal(hops: int, weight: str) -> None:
    g = random_graph(25, 10, seed=hops)
    users = np.array([0, 3, 7, 24])
    np.testing.assert_allclose(self_return(g, users, hops, weight, chunk=3),
                               np.diag(dense_walk(g, hops, weight))[users], atol=1e-12)


@pytest.mark.parametrize("hops", [1, 2])
def test_leave_one_out_equals_recomputation_without_the_prototype(hops: int) -> None:
    g = random_graph(30, 12, seed=5)
    protos = {1: [0], 4: [1, 2], 9: [2], 17: [0, 1], 22: [1]}
    loo = loo_psi_raw(g, protos, 3, hops=hops)
    for row, u in enumerate(protos):
        rest = {w: ps for w, ps in protos.items() if w != u}
        again = exact_affinity(g, prototype_matrix(g.n_users, rest, 3), hops)
        np.testing.assert_allclose(loo[row], again[u], atol=1e-12)


def test_graph_share_is_scale_free() -> None:
    psi = np.array([[0.2, 0.6, 0.2], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(graph_share(psi), [[0.2, 0.6, 0.2], [0, 0, 0]])
    np.testing.assert_allclose(graph_share(1e-4 * psi), graph_share(psi))
    with pytest.raises(ValueError):
        decoder_features(psi, np.zeros((2, 2)))


def brute_thresholds(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Lowest cut among the best F1 over all cuts 'p >= t', t in the observed values."""
    out = []
    for m in range(p.shape[1]):
        best, cut = -1.0, NEVER
        if y[:, m].any():
            for t in sorted(set(p[:, m]), reverse=True):
                pred = p[:, m] >= t
                f1 = 2 * (pred & y[:, m]).sum() / (pred.sum() + y[:, m].sum())
                if f1 >= best:
                    best, cut = f1, t
        out.append(cut)
    return np.array(out)


def test_f1_thresholds_equal_brute_force() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        p = np.round(rng.random((40, 4)), 1)  # ties on purpose
        y = rng.random((40, 4)) < [0.5, 0.2, 0.05, 0.0]
        np.testing.assert_allclose(fit_thresholds(p, y, "f1"), brute_thresholds(p, y))


def test_prevalence_thresholds_reproduce_prevalence() -> None:
    rng = np.random.default_rng(2)
    p = rng.random((50, 5))
    y = rng.random((50, 5)) < [0.6, 0.3, 0.1, 0.04, 0.0]
    t = fit_thresholds(p, y, "prevalence")
    np.testing.assert_array_equal((p >= t).sum(axis=0), y.sum(axis=0))
    assert t[4] == NEVER
    with pytest.raises(ValueError):
        fit_thresholds(p, y, "expected_f1")


def test_expected_f1_rule_equals_enumeration() -> None:
    rng = np.random.default_rng(3)
    p = rng.random((60, 6)) ** 2
    idx, scores = select_personas(p, None, 5, "expected_f1")
    for u in range(60):
        order = np.argsort(-p[u], kind="stable")[:5]
        gains = [2 * p[u, order[:k]].sum() / (k + p[u].sum()) for k in range(1, 6)]
        k = int(np.argmax(gains)) + 1
        assert idx[u][idx[u] >= 0].tolist() == order[:k].tolist()
        np.testing.assert_allclose(scores[u][:k], p[u, order[:k]])


def test_threshold_rule_keeps_one_to_max() -> None:
    p = np.array([[0.9, 0.8, 0.7, 0.6, 0.55, 0.5], [0.1, 0.2, 0.05, 0.0, 0.0, 0.0],
                  [0.9, 0.8, 0.7, 0.0, 0.0, 0.0]])
    idx, scores = select_personas(p, np.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5]), 5, "f1")
    assert idx[0].tolist() == [0, 1, 2, 3, 4]  # capped at 5
    idx2, scores2 = select_personas(p[2:], np.array([0.5, 0.85, 0.5, 0.5, 0.5, 0.5]), 5, "f1")
    assert idx2[0].tolist() == [0, 2, -1, -1, -1] and scores2[0].tolist() == [0.9, 0.7, 0, 0, 0]
    assert idx[1].tolist() == [1, -1, -1, -1, -1] and scores[1, 0] == 0.2  # none passes: the best
    with pytest.raises(ValueError):
        select_personas(p, None, 5, "f1")
    with pytest.raises(ValueError):
        select_personas(p, np.zeros(6), 5, "nope")


def test_a_niche_persona_is_decided_by_its_own_cut() -> None:
    """Persona 2 is rare and even its own users score only p = 0.27; a global cut (0.5, or the
    common persona's) never picks it, its own threshold does, and a doubled one loses it again."""
    n = 100
    y = np.zeros((n, 3), dtype=bool)
    y[:60, 0] = True
    y[30:70, 1] = True
    y[:5, 2] = True
    text = np.where(y, [2.0, 2.0, -1.0], [-0.5, -0.5, -3.0])
    dec = PersonaDecoder(np.tile([1.0, 0.0, 0.0], (3, 1)), np.zeros(3), np.zeros(3), np.full(3, 0.3), 5, "f1")
    psi = np.zeros((n, 3))
    probs = dec.probabilities(psi, text, np.ones(n))
    cuts = fit_thresholds(probs, y, "f1")
    assert cuts[2] < 0.5 < cuts[0]
    fitted = PersonaDecoder(dec.coef, dec.intercept, cuts, dec.prior, 5, "f1")
    idx, _ = fitted.decide(psi, text, np.ones(n))
    chosen = (idx[:, :, None] == np.arange(3)).any(axis=1)
    np.testing.assert_array_equal(chosen[:70], y[:70])  # users 70+ carry nothing: they get their best
    np.testing.assert_array_equal(chosen[:, 2], y[:, 2])
    doubled = PersonaDecoder(dec.coef, dec.intercept, cuts * [1, 1, 2], dec.prior, 5, "f1")
    assert not (doubled.decide(psi, text, np.ones(n))[0] == 2).any()


def test_a_fitted_decoder_finds_a_rare_persona() -> None:
    rng = np.random.default_rng(4)
    n = 200
    y = np.zeros((n, 3), dtype=bool)
    y[:, 0] = rng.random(n) < 0.7
    y[:, 1] = rng.random(n) < 0.4
    y[:10, 2] = True  # 5%
    text = np.where(y, 1.0, -1.0) + rng.normal(0, 1.0, (n, 3)) * [0.7, 0.7, 0.5] + [0, 0, -2.5]
    psi = np.zeros((n, 3))
    for rule in ("f1", "expected_f1"):
        dec = fit_decoder(psi, text, y, rule=rule)
        idx, _ = dec.decide(psi, text, np.ones(n))
        chosen = (idx[:, :, None] == np.arange(3)).any(axis=1)
        assert chosen[:10, 2].sum() >= 8 and chosen[10:, 2].sum() <= 10


def test_no_evidence_falls_back_to_the_prior_like_batch() -> None:
    prior = np.array([0.1, 0.5, 0.3])
    dec = PersonaDecoder(np.zeros((3, 3)), np.zeros(3), np.full(3, 0.2), prior, 5, "f1")
    psi = np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.1, 0.0, 0.0]])
    probs = dec.probabilities(psi, np.zeros((3, 3)), np.array([0, 2, 0]))
    np.testing.assert_allclose(probs[0], prior)  # nothing at all: the prior
    np.testing.assert_allclose(probs[1], 0.5)  # purchases but no prototype: the model (σ(0))
    np.testing.assert_allclose(probs[2], 0.5)
    np.testing.assert_allclose(with_prior(psi, prior, [True, False, False]), [prior, psi[1], psi[2]])
    a = assign_personas(psi, 2, prior=prior)
    assert a.personas_of(0) == (1, 2) and a.personas_of(2) == (0,)


def fitted_model() -> tuple[BipartiteGraph, PersonaModel, np.ndarray]:
    from core.synthetic import make_shop

    shop = make_shop(n_users=300, n_items=200, n_personas=5, seed=3)
    g = shop.graph()
    rng = np.random.default_rng(0)
    protos = {int(u): shop.user_truth[g.user_ids[u]] for u in rng.choice(g.n_users, 60, replace=False)}
    psi = exact_affinity(g, prototype_matrix(g.n_users, protos, 5))
    return g, fit_persona_model(g, protos, 5, psi, seed=1), psi


def test_one_user_equals_the_batch_row_and_survives_json() -> None:
    g, model, psi = fitted_model()
    idx, scores = model.decide(g, psi)
    again = PersonaModel.from_dict(json.loads(json.dumps(model.to_dict())))
    dense = g.user_item.toarray() > 0
    rng = np.random.default_rng(5)
    for u in range(0, g.n_users, 17):
        names = list(rng.permutation(g.item_names[dense[u]]))  # the stream's order is any order
        text = None
        for lo in range(0, len(names), 3):  # items arrive a few at a time
            text = again.add_text(text, names[lo:lo + 3])
        snap = again.decide_user(psi[u], text, int(dense[u].sum()))
        keep = idx[u] >= 0
        assert snap.personas == tuple(idx[u][keep].tolist())
        np.testing.assert_allclose(snap.scores, scores[u][keep], atol=1e-12)
        assert 1 <= len(snap.personas) <= 5 and all(0 <= s <= 1 for s in snap.scores)
    with pytest.raises(ValueError):
        PersonaDecoder.from_dict({**model.decoder.to_dict(), "features": ["x"]})


def test_model_fit_is_deterministic() -> None:
    g, model, psi = fitted_model()
    _, again, _ = fitted_model()
    assert json.dumps(model.to_dict()) == json.dumps(again.to_dict())


@pytest.mark.parametrize("rule", ["f1", "prevalence", "expected_f1"])
def test_rules_are_valid_on_a_shop(rule: str) -> None:
    g, model, psi = fitted_model()
    dec = model.decoder
    other = PersonaDecoder(dec.coef, dec.intercept, dec.thresholds, dec.prior, 3, rule)
    idx, scores = other.decide(psi, model.text_logits(g), g.user_degree)
    counts = (idx >= 0).sum(axis=1)
    assert counts.min() >= 1 and counts.max() <= 3
    assert np.all(np.diff(np.where(idx >= 0, scores, -1), axis=1) <= 0)  # best first


def test_decoder_validation() -> None:
    with pytest.raises(ValueError):
        PersonaDecoder(np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.zeros(2), 5, "nope")
    with pytest.raises(ValueError):
        PersonaDecoder(np.zeros((2, 3)), np.zeros(2), np.zeros(2), np.zeros(2), 0, "f1")
    with pytest.raises(ValueError):
        fit_decoder(np.zeros((3, 2)), np.zeros((3, 2)), np.zeros((3, 3), dtype=bool))


def test_prevalence_matching_moves_decisions_to_the_labeled_shape() -> None:
    rng = np.random.default_rng(7)
    n, m = 400, 4
    prior = np.array([0.6, 0.3, 0.2, 0.1])
    # text logits that favour persona 0 for everyone: an expected-F1 rule over-assigns it. The set
    # sizes come from these (unshifted) probabilities, so they are calibrated to about the labels'
    # own size (mean Σp 1.35 vs Σ prior 1.2): matching moves only which personas are decided.
    text = rng.normal(0, 1, (n, m)) + np.array([1.0, -1.0, -1.5, -2.0])
    dec = PersonaDecoder(np.tile([1.0, 0.0, 0.0], (m, 1)), np.zeros(m), np.zeros(m), prior, 3, "expected_f1")
    psi, deg = np.zeros((n, m)), np.ones(n)

    def shares(d: PersonaDecoder) -> np.ndarray:
        idx, _ = d.decide(psi, text, deg)
        return np.bincount(idx[idx >= 0], minlength=m) / n

    before = shares(dec)
    assert match_prevalence(dec, psi, text, deg, 0.0) is dec
    full = shares(match_prevalence(dec, psi, text, deg, 1.0))
    half = shares(match_prevalence(dec, psi, text, deg, 0.5))
    target = prior * full.sum() / prior.sum()
    tv = lambda s: 0.5 * np.abs(s / s.sum() - prior / prior.sum()).sum()  # noqa: E731
    assert tv(full) < 0.03 < tv(before)
    assert tv(full) < tv(half) < tv(before)
    np.testing.assert_allclose(full, target, atol=0.03)
    with pytest.raises(ValueError):
        match_prevalence(dec, psi, text, deg, 1.5)


def brute_force_sets(rank: np.ndarray, size: np.ndarray, k: int) -> list[list[int]]:
    """Per user: the personas in order of `rank`, cut at the prefix length that maximises the
    expected F1 2·Σ size[prefix] / (len + Σ size) — enumerated, not vectorised."""
    out = []
    for u in range(rank.shape[0]):
        order = sorted(range(rank.shape[1]), key=lambda j: (-rank[u, j], j))[:k]
        gains = [2 * sum(size[u, order[:c]]) / (c + size[u].sum()) for c in range(1, k + 1)]
        out.append(order[:int(np.argmax(gains)) + 1])
    return out


def test_expected_f1_sizes_the_set_on_other_probabilities() -> None:
    rng = np.random.default_rng(11)
    p, q = rng.random((80, 7)), rng.random((80, 7)) ** 3  # q: much smaller sets than p would give
    idx, scores = select_personas(p, None, 5, "expected_f1", size_probs=q)
    want = brute_force_sets(p, q, 5)
    for u in range(80):
        assert idx[u][idx[u] >= 0].tolist() == want[u]
        np.testing.assert_allclose(scores[u][:len(want[u])], p[u, want[u]])  # ranked, scored by p
    assert (idx >= 0).sum() < (select_personas(p, None, 5, "expected_f1")[0] >= 0).sum()
    with pytest.raises(ValueError):
        select_personas(p, None, 5, "expected_f1", size_probs=q[:, :3])


def test_prevalence_shift_ranks_but_the_calibrated_probabilities_size() -> None:
    g, model, psi = fitted_model()
    dec, text = model.decoder, model.text_logits(g)
    assert np.any(dec.shift != 0)  # the default fit matches prevalence part of the way
    z = dec.logits(psi, text)
    calibrated = 1 / (1 + np.exp(-(z - dec.shift)))
    np.testing.assert_allclose(dec.probabilities(psi, text, g.user_degree, shifted=False), calibrated)
    np.testing.assert_allclose(dec.probabilities(psi, text, g.user_degree), 1 / (1 + np.exp(-z)))
    idx, _ = dec.decide(psi, text, g.user_degree)
    want = brute_force_sets(1 / (1 + np.exp(-z)), calibrated, dec.max_personas)
    assert [row[row >= 0].tolist() for row in idx] == want
    # the shift is what matching added to the intercepts; matching again keeps the calibration
    unshifted = PersonaDecoder(dec.coef, dec.intercept - dec.shift, dec.thresholds, dec.prior, dec.max_personas,
                               dec.rule)
    again = match_prevalence(unshifted, psi, text, g.user_degree, 0.5)
    np.testing.assert_allclose(again.intercept - again.shift, dec.intercept - dec.shift)
    # a decoder stored before the shift existed reads as unshifted
    old = {k: v for k, v in dec.to_dict().items() if k != "shift"}
    np.testing.assert_array_equal(PersonaDecoder.from_dict(old).shift, np.zeros(dec.n_personas))
    with pytest.raises(ValueError):
        PersonaDecoder(dec.coef, dec.intercept, dec.thresholds, dec.prior, 5, dec.rule, np.full(dec.n_personas, np.nan))
