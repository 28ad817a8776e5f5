"""The item–persona channel: exact mean-of-items arithmetic, sklearn-equal fits, a small JSON form."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from core.graph import BipartiteGraph
from core.item_channel import (
    SKETCH_WIDTH,
    ItemChannel,
    _fit,
    base_rate_logit,
    fit_item_channel,
    name_features,
    name_sketch,
    out_of_fold_text_logits,
    tokens,
    user_features_matrix,
    user_text_logits,
)

NAMES = np.array(["christmas star", "christmas bauble", "garden hose", "garden rake", "christmas tree",
                  "garden spade", "12 x 30cm", "red christmas garden gnome"], dtype=object)


def shop() -> BipartiteGraph:
    # users 0-5 are labeled below; 6 and 7 buy mixtures; 8 buys an item whose name is a code
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8])
    items = np.array([0, 1, 1, 4, 2, 3, 3, 5, 0, 4, 2, 5, 0, 2, 7, 4, 5, 6, 0, 0])
    return BipartiteGraph.from_indices(users, items, 9, 8, item_names=NAMES)


PROTOS = {0: [0], 1: [0], 4: [0, 2], 2: [1], 3: [1], 5: [1, 2]}


def test_tokens_words_and_code_names() -> None:
    assert tokens("Red RED christmas 12 Tin") == ["red", "christmas", "tin"]
    assert tokens(" 12 x 30cm ") == ["#12 x 30cm"]  # no word: the name is its own token
    assert tokens("   ") == []


def test_name_features_are_unit_rows_over_all_words() -> None:
    f, vocab = name_features(NAMES)
    norms = np.sqrt(np.asarray(f.multiply(f).sum(axis=1)).ravel())
    np.testing.assert_allclose(norms, 1.0)
    # a fixed vocabulary keeps the norm of the full name: unknown words still count
    g, _ = name_features(["christmas gnome"], {"christmas": 0})
    assert g.shape == (1, 1) and g[0, 0] == pytest.approx(1 / math.sqrt(2))


def test_plain_mean_channel_text_logit_is_the_mean_of_item_scores_by_hand() -> None:
    g = shop()
    ch = fit_item_channel(g, PROTOS, 3, C=5.0, sketch=0)
    s = ch.item_scores(g.item_names)
    # s(v) by hand: Σ_w coef[w] / √(#words) + b
    col = {w: j for j, w in enumerate(ch.words)}
    for v, name in enumerate(NAMES):
        words = tokens(name)
        hand = ch.intercept + sum(ch.coef[col[w]] for w in words if w in col) / math.sqrt(len(words))
        np.testing.assert_allclose(s[v], hand, atol=1e-12)
    text = user_text_logits(g, ch)
    dense = g.user_item.toarray() > 0
    for u in range(g.n_users):
        np.testing.assert_allclose(text[u], s[dense[u]].mean(axis=0), atol=1e-12)
    # the stream's form: a running sum of item vectors, divided by the degree
    total = ch.item_vectors(NAMES[dense[6]]).sum(axis=0)
    np.testing.assert_allclose(ch.text_logits(total / dense[6].sum())[0], text[6], atol=1e-12)


def test_sketched_text_logit_by_hand_and_fit_on_the_same_features() -> None:
    g = shop()
    ch = fit_item_channel(g, PROTOS, 3, C=5.0)
    assert ch.width == 3 + SKETCH_WIDTH
    s, k = ch.item_scores(NAMES), name_sketch(NAMES)
    dense = g.user_item.toarray() > 0
    text = user_text_logits(g, ch)
    for u in range(g.n_users):
        norm = np.linalg.norm(k[dense[u]].mean(axis=0))
        np.testing.assert_allclose(text[u], ch.intercept + (s[dense[u]].mean(axis=0) - ch.intercept) / norm,
                                   atol=1e-12)
    # what the model was fitted on: W·x_u + b with x_u = mean f / ‖mean k‖
    f, vocab = name_features(NAMES)
    x = user_features_matrix(g, f, SKETCH_WIDTH)
    full = np.zeros((len(vocab), 3))
    full[[vocab[w] for w in ch.words]] = ch.coef
    np.testing.assert_allclose(np.asarray(x @ full) + ch.intercept, text, atol=1e-12)
    # the stream's running sum of item vectors gives the same logits
    total = ch.item_vectors(NAMES[dense[6]]).sum(axis=0)
    np.testing.assert_allclose(ch.text_logits(total / dense[6].sum())[0], text[6], atol=1e-12)
    np.testing.assert_allclose(ch.text_logits(np.zeros((1, ch.width)))[0], ch.intercept)  # no purchase


def test_sketch_is_hashed_per_word_and_estimates_the_norm() -> None:
    a, b = name_sketch(["christmas star"]), name_sketch(["star christmas"])
    np.testing.assert_array_equal(a, b)  # word order does not matter
    assert np.linalg.norm(a) == pytest.approx(1.0)  # two words in different columns, 1/√2 each
    many = name_sketch([f"word{chr(97 + i)}{chr(97 + j)} thing" for i in range(26) for j in range(26)], 64)
    f, _ = name_features([f"word{chr(97 + i)}{chr(97 + j)} thing" for i in range(26) for j in range(26)])
    exact = np.linalg.norm(np.asarray(f.sum(axis=0)))
    assert abs(np.linalg.norm(many.sum(axis=0)) / exact - 1) < 0.3
    assert name_sketch(["x"], 0).shape == (1, 0)


def test_fit_equals_sklearn_logistic_regression() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((30, 50)) * (rng.random((30, 50)) < 0.2)
    y = rng.random((30, 3)) < np.array([0.3, 0.5, 0.05])
    y[:2, 2] = True  # two positives: fitted
    for C in (0.5, 30.0):
        coef, intercept = _fit(x, y, C)
        for p in range(3):
            ref = LogisticRegression(C=C, tol=1e-12, max_iter=10000).fit(x, y[:, p])
            np.testing.assert_allclose(coef[:, p], ref.coef_[0], atol=1e-4)
            assert intercept[p] == pytest.approx(ref.intercept_[0], abs=1e-4)


def test_unfittable_persona_is_its_base_rate_everywhere() -> None:
    g = shop()
    protos = {0: [0], 1: [0, 2], 2: [1], 3: [1]}  # persona 2 has one positive: not fittable
    ch = fit_item_channel(g, protos, 3)
    np.testing.assert_allclose(ch.item_scores(NAMES)[:, 2], base_rate_logit(1, 4))
    assert not ch.coef[:, 2].any()
    assert base_rate_logit(0, 4) < 0 < base_rate_logit(4, 4)  # finite at the extremes


def test_words_generalise_to_new_item_names() -> None:
    ch = fit_item_channel(shop(), PROTOS, 3)
    s = ch.item_scores(["christmas candle", "garden chair", "zzz unseen"])
    assert s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]
    np.testing.assert_allclose(s[2], ch.intercept)  # no known word: the intercept


def test_round_trip_through_json_and_determinism() -> None:
    g = shop()
    ch = fit_item_channel(g, PROTOS, 3)
    again = ItemChannel.from_dict(json.loads(json.dumps(ch.to_dict())))
    np.testing.assert_array_equal(again.item_scores(NAMES), ch.item_scores(NAMES))
    np.testing.assert_array_equal(fit_item_channel(g, PROTOS, 3).coef, ch.coef)
    assert len(ch.words) <= len(name_features(NAMES)[1])  # only words with a weight are kept
    with pytest.raises(ValueError):
        ItemChannel.from_dict({"kind": "something else"})
    for bad in ("not base64!", "AAAA"):  # garbage, and a wrong number of weights
        with pytest.raises(ValueError):
            ItemChannel.from_dict({**ch.to_dict(), "coef_f32": bad})
    with pytest.raises(ValueError):
        ItemChannel(("a",), np.array([[np.nan]]), np.array([0.0]))
    with pytest.raises(ValueError):
        ch.text_logits(np.zeros((1, ch.width + 1)))


def test_out_of_fold_logits_equal_refits_without_the_fold() -> None:
    g = shop()
    oof = out_of_fold_text_logits(g, PROTOS, 3, folds=3, seed=4, C=2.0)
    users = list(PROTOS)
    fold = np.random.default_rng(4).permutation(len(users)) % 3
    for f in range(3):
        train = {u: PROTOS[u] for u, k in zip(users, fold) if k != f}
        ch = fit_item_channel(g, train, 3, C=2.0)
        text = user_text_logits(g, ch)
        for row, (u, k) in enumerate(zip(users, fold)):
            if k == f:
                np.testing.assert_allclose(oof[row], text[u], atol=1e-9)


def test_bad_inputs() -> None:
    g = shop()
    with pytest.raises(ValueError):
        fit_item_channel(g, {}, 3)
    with pytest.raises(ValueError):
        fit_item_channel(g, PROTOS, 3, C=0)
