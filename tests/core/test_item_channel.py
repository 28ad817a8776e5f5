"""The item–persona channel: sublinear word counts by hand, an exact incremental text state,
sklearn-equal fits, a small JSON form."""
from __future__ import annotations

import json
import math
import zlib
from collections import Counter

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from core.graph import BipartiteGraph
from core.item_channel import (
    ItemChannel,
    _fit,
    base_rate_logit,
    fit_item_channel,
    name_word_ids,
    out_of_fold_text_logits,
    tokens,
    user_text_logits,
    user_word_features,
    word_id,
    word_matrix,
)

NAMES = np.array(["christmas star", "christmas bauble", "garden hose", "garden rake", "christmas tree",
                  "garden spade", "12 x 30cm", "red christmas garden gnome"], dtype=object)


def shop() -> BipartiteGraph:
    # users 0-5 are labeled below; 6 and 7 buy mixtures; 8 buys an item whose name is a code
    users = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 6, 7, 7, 8, 8, 8])
    items = np.array([0, 1, 1, 4, 2, 3, 3, 5, 0, 4, 2, 5, 0, 2, 7, 4, 5, 6, 0, 0])
    return BipartiteGraph.from_indices(users, items, 9, 8, item_names=NAMES)


PROTOS = {0: [0], 1: [0], 4: [0, 2], 2: [1], 3: [1], 5: [1, 2]}


def brute_features(names: list[str]) -> dict[str, float]:
    """One user's features by hand: word → (1 + ln c_w) / ‖·‖, c_w = items whose name has w."""
    counts = Counter(w for n in names for w in set(tokens(n)))
    g = {w: 1 + math.log(c) for w, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in g.values()))
    return {w: v / norm for w, v in g.items()}


def test_tokens_words_and_code_names() -> None:
    assert tokens("Red RED christmas 12 Tin") == ["red", "christmas", "tin"]
    assert tokens(" 12 x 30cm ") == ["#12 x 30cm"]  # no word: the name is its own token
    assert tokens("   ") == []
    assert name_word_ids("tin red Tin").tolist() == sorted({word_id("tin"), word_id("red")})
    assert word_id("christmas") == zlib.crc32(b"christmas")


def test_user_features_are_sublinear_word_counts_by_hand() -> None:
    g = shop()
    x, ids, words = user_word_features(g)
    assert [word_id(w) for w in words] == ids.tolist() and list(ids) == sorted(ids)
    col = {w: j for j, w in enumerate(words)}
    dense = g.user_item.toarray() > 0
    for u in range(g.n_users):
        want = np.zeros(len(words))
        for w, v in brute_features(list(NAMES[dense[u]])).items():
            want[col[w]] = v
        np.testing.assert_allclose(x[u].toarray()[0], want, atol=1e-12)
    inc, _, _ = word_matrix(NAMES)
    assert inc.sum() == sum(len(tokens(n)) for n in NAMES)


def test_text_logit_by_hand_and_the_stream_state_equals_batch_in_any_order() -> None:
    g = shop()
    ch = fit_item_channel(g, PROTOS, 3, C=5.0)
    weight = dict(zip(ch.words, ch.coef))
    text = user_text_logits(g, ch)
    dense = g.user_item.toarray() > 0
    rng = np.random.default_rng(0)
    for u in range(g.n_users):
        names = list(NAMES[dense[u]])
        hand = ch.intercept + sum((v * weight[w] for w, v in brute_features(names).items() if w in weight),
                                  np.zeros(3))
        np.testing.assert_allclose(text[u], hand, atol=1e-12)
        state = None
        for name in rng.permutation(names):  # one purchase at a time, any order
            state = ch.add_text(state, [name])
        np.testing.assert_allclose(ch.text_logit(state), text[u], atol=1e-12)
        np.testing.assert_allclose(ch.text_logit(ch.add_text(None, names)), text[u], atol=1e-12)
    np.testing.assert_allclose(ch.text_logit(None), ch.intercept)  # no purchase
    np.testing.assert_allclose(ch.text_logit(ch.add_text(None, [])), ch.intercept)
    # per item: s(v) = b + Σ_w W[w] / √(#words)
    s = ch.item_scores(NAMES)
    for v, name in enumerate(NAMES):
        words = tokens(name)
        hand = ch.intercept + sum((weight[w] for w in words if w in weight), np.zeros(3)) / math.sqrt(len(words))
        np.testing.assert_allclose(s[v], hand, atol=1e-12)


def test_text_state_counts_repeated_words_sublinearly() -> None:
    ch = ItemChannel(("christmas", "garden"), np.array([[1.0], [-1.0]]), np.array([0.5]))
    one = ch.text_logit(ch.add_text(None, ["christmas star"]))  # g = (1, 1) over christmas, star
    np.testing.assert_allclose(one, 0.5 + 1 / math.sqrt(2))
    three = ch.add_text(ch.add_text(None, ["christmas star", "christmas tree"]), ["christmas bell", "garden"])
    g_c = 1 + math.log(3)  # christmas in 3 items; star, tree, bell, garden once each
    np.testing.assert_allclose(ch.text_logit(three), 0.5 + (g_c - 1) / math.sqrt(g_c ** 2 + 4))
    # names without any token (empty, blank) add nothing; a unicode word is a word
    np.testing.assert_allclose(ch.text_logit(ch.add_text(None, ["", "   "])), 0.5)
    np.testing.assert_array_equal(ch.add_text(three, [""]), three)
    crème = ch.add_text(None, ["Crème brûlée christmas"])
    np.testing.assert_allclose(ch.text_logit(crème), 0.5 + 1 / math.sqrt(3))
    with pytest.raises(ValueError):
        ch.text_logit(np.zeros(1))
    with pytest.raises(ValueError):
        ch.add_text(np.zeros(3), ["x"])  # 1 persona: sizes 2 + 2k only


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


def test_a_fit_that_keeps_no_words_scores_every_user_at_the_base_rates() -> None:
    # every prototype holds every persona: no persona is fittable, no word is kept (this
    # crashed the stream's refits when a channel with zero words was built)
    g = shop()
    ch = fit_item_channel(g, {0: [0, 1], 1: [0, 1], 2: [0, 1]}, 2)
    assert ch.words == () and ch.coef.shape == (0, 2)
    np.testing.assert_allclose(user_text_logits(g, ch), np.tile(ch.intercept, (g.n_users, 1)))


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
    assert len(ch.words) <= len(word_matrix(NAMES)[2])  # only words with a weight are kept
    with pytest.raises(ValueError):
        ItemChannel.from_dict({"kind": "something else"})
    for bad in ("not base64!", "AAAA"):  # garbage, and a wrong number of weights
        with pytest.raises(ValueError):
            ItemChannel.from_dict({**ch.to_dict(), "coef_f32": bad})
    with pytest.raises(ValueError):
        ItemChannel(("a",), np.array([[np.nan]]), np.array([0.0]))
    with pytest.raises(ValueError):
        ItemChannel.from_dict({**ch.to_dict(), "features": "mean_of_items"})  # an older model
    with pytest.raises(ValueError):
        ItemChannel(("tin", "tin"), np.zeros((2, 1)), np.zeros(1))  # one word id twice


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
