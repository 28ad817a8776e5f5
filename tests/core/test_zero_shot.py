"""The zero-shot channel (`core.zero_shot`) against brute force, and the decoder with it."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core.affinity import exact_affinity, prototype_matrix
from core.decoder import FEATURES, PersonaDecoder, PersonaModel, fit_persona_model
from core.graph import BipartiteGraph
from core.personas import Persona, PersonaSet
from core.zero_shot import FLOOR, ZeroShotChannel, item_lift, lift_feature, zero_shot_channel

PERSONAS = PersonaSet([Persona("Baker", "bakes cakes"), Persona("Gardener", "grows plants"),
                       Persona("Pet owner", "cares for dogs and cats")])
THEMES = {"cake": 0, "icing": 0, "garden": 1, "rake": 1, "dog": 2, "cat": 2}


class WordVotes:
    """A labeler double: each name votes 0.8 for the persona its theme word names, 0.1 for the others."""

    def __init__(self) -> None:
        self.calls = 0

    def item_persona_scores(self, names):  # noqa: ANN001 - the labeler's item interface
        self.calls += 1
        out = np.full((len(names), 3), 0.1)
        for i, name in enumerate(names):
            theme = next(THEMES[w] for w in str(name).split() if w in THEMES)
            out[i, theme] = 0.8
        return out


def random_channel(rng: np.random.Generator, n_items: int, m: int) -> tuple[list[str], ZeroShotChannel, np.ndarray]:
    names = [f"item {j}" for j in range(n_items)]
    votes = rng.dirichlet(np.ones(m), size=n_items)
    return names, ZeroShotChannel(tuple(names), item_lift(votes, votes.mean(axis=0))), votes


def test_user_features_equal_the_direct_mean_over_distinct_items() -> None:
    rng = np.random.default_rng(0)
    names, channel, votes = random_channel(rng, 9, 4)
    users = rng.integers(0, 7, 60)
    items = rng.integers(0, 9, 60)  # repeated (user, item) pairs: bought twice counts once
    g = BipartiteGraph.from_indices(users, items, 8, 9, item_names=np.array(names))  # user 7 buys nothing
    got = channel.user_features(g)
    base = votes.mean(axis=0)
    for u in range(8):
        bought = sorted(set(items[users == u].tolist()))
        for m in range(4):
            mean = sum(votes[v, m] / base[m] for v in bought) / len(bought) if bought else 1.0
            assert got[u, m] == pytest.approx(math.log(mean + FLOOR), rel=1e-12, abs=1e-12)


def test_the_running_state_equals_the_batch_feature_in_any_order() -> None:
    rng = np.random.default_rng(1)
    names, channel, _ = random_channel(rng, 12, 5)
    items = rng.choice(12, 7, replace=False)
    g = BipartiteGraph.from_indices(np.zeros(7, dtype=np.int64), items, 1, 12, item_names=np.array(names))
    want = channel.user_features(g)[0]
    for order in (items, items[::-1], rng.permutation(items)):
        state = None
        for j in order:  # one distinct item at a time, as the stream first sees them
            state = channel.add_items(state, [names[j]])
        np.testing.assert_allclose(channel.feature(state), want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(channel.feature(channel.add_items(None, [names[j] for j in items])), want, rtol=1e-12)
    np.testing.assert_allclose(channel.feature(None), np.log(1.0 + FLOOR))  # no item: an average item


def test_unknown_names_are_neutral_and_the_channel_round_trips() -> None:
    rng = np.random.default_rng(2)
    names, channel, _ = random_channel(rng, 5, 3)
    lifts = channel.item_lifts(["never seen", names[3]])
    np.testing.assert_array_equal(lifts[0], np.ones(3))
    np.testing.assert_array_equal(lifts[1], channel.lift[3])
    again = ZeroShotChannel.from_dict(channel.to_dict())
    assert again.names == channel.names
    np.testing.assert_array_equal(again.lift, channel.lift)
    with pytest.raises(ValueError, match="kind"):
        ZeroShotChannel.from_dict({"kind": "item_channel"})
    with pytest.raises(ValueError, match="one row per name"):
        ZeroShotChannel(("a", "b"), np.ones((3, 2)))
    with pytest.raises(ValueError, match="non-negative"):
        ZeroShotChannel(("a",), np.array([[-1.0, 1.0]]))


def test_the_channel_is_the_votes_over_their_catalogue_mean() -> None:
    votes = WordVotes()
    names = ["cake tin", "garden rake", "dog bowl", "cake tin", "icing bag"]  # one name twice
    channel = zero_shot_channel(names, PERSONAS, labeler=votes)
    assert channel.names == ("cake tin", "garden rake", "dog bowl", "icing bag")
    raw = votes.item_persona_scores(list(channel.names))
    np.testing.assert_allclose(channel.lift, raw / raw.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(lift_feature(channel.lift.sum(axis=0), 4), np.log(1.0 + FLOOR), rtol=1e-12)
    with pytest.raises(ValueError, match="at least one"):
        zero_shot_channel([], PERSONAS, labeler=votes)

    class Wrong:
        def item_persona_scores(self, names):  # noqa: ANN001
            return np.ones((len(names), 2))

    with pytest.raises(ValueError, match="do not match"):
        zero_shot_channel(names, PERSONAS, labeler=Wrong())


def pet_shop() -> tuple[BipartiteGraph, dict[int, list[int]], list[int]]:
    """Bakers, gardeners and both as prototypes; pet owners buy only pet items and no prototype
    holds the pet persona, so neither the item channel nor the graph can know it."""
    names = ["cake tin", "cake stand", "icing bag", "icing sugar", "garden hose", "garden gnome", "rake set",
             "garden rake", "dog bowl", "cat collar", "dog lead", "cat toy"]
    rng = np.random.default_rng(5)
    users, items, labels = [], [], {}
    kinds = ["baker"] * 14 + ["gardener"] * 14 + ["both"] * 8 + ["pet"] * 8
    for u, kind in enumerate(kinds):
        pool = {"baker": range(0, 4), "gardener": range(4, 8), "both": range(0, 8), "pet": range(8, 12)}[kind]
        bought = rng.choice(list(pool), size=3, replace=False)
        users += [u] * 3
        items += bought.tolist()
        if kind != "pet" and u % 2 == 0:
            labels[u] = {"baker": [0], "gardener": [1], "both": [0, 1]}[kind]
    g = BipartiteGraph.from_indices(np.array(users), np.array(items), len(kinds), len(names),
                                    item_names=np.array(names))
    return g, labels, [u for u, k in enumerate(kinds) if k == "pet"]


def test_only_the_zero_shot_channel_finds_a_persona_no_prototype_holds() -> None:
    g, labels, pets = pet_shop()
    channel = zero_shot_channel(g.item_names, PERSONAS, labeler=WordVotes())
    with_zs = fit_persona_model(g, labels, 3, prevalence=0.0, zero_shot=channel, max_personas=2)
    without = fit_persona_model(g, labels, 3, prevalence=0.0, max_personas=2)
    psi = exact_affinity(g, prototype_matrix(g.n_users, labels, 3))
    idx_zs, _ = with_zs.decide(g, psi)
    idx_no, _ = without.decide(g, psi)
    assert with_zs.decoder.coef[0, FEATURES.index("zero_shot")] > 0
    assert all(idx_zs[u, 0] == 2 for u in pets)  # the pet persona first for every pet owner
    assert not np.any(idx_no == 2)  # without the channel nobody ever gets it
    others = [u for u in range(g.n_users) if u not in pets and u not in labels]
    assert not np.any(idx_zs[others] == 2)  # and the channel gives it to nobody else
    # the stream's call on one user's running state is the batch decision
    for u in pets + others[:5]:
        names = [str(g.item_names[v]) for v in g.user_item[u].indices]
        text = None
        for name in names:  # one new item at a time, as the worker adds them
            text = with_zs.add_text(text, [name])
        snap = with_zs.decide_user(psi[u], text, len(names))
        assert snap.personas == tuple(int(i) for i in idx_zs[u] if i >= 0)
        np.testing.assert_allclose(text[:4], channel.add_items(None, names), rtol=1e-12)
    again = PersonaModel.from_dict(with_zs.to_dict())
    np.testing.assert_array_equal(again.decide(g, psi)[0], idx_zs)


def test_the_fourth_feature_enters_the_logit_linearly() -> None:
    rng = np.random.default_rng(3)
    coef = rng.normal(size=(3, 4))
    dec = PersonaDecoder(coef, rng.normal(size=3), np.zeros(3), np.full(3, 0.3), 3, "expected_f1")
    psi, text, zs = rng.random((4, 3)), rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    share = psi / psi.sum(axis=1, keepdims=True)
    want = text * coef[:, 0] + share * coef[:, 1] + np.sqrt(share) * coef[:, 2] + zs * coef[:, 3] + dec.intercept
    np.testing.assert_allclose(dec.logits(psi, text, zs), want, rtol=1e-12)
    np.testing.assert_allclose(dec.logits(psi, text), want - zs * coef[:, 3], rtol=1e-12)  # no channel: 0
    legacy = {**dec.to_dict(), "features": list(FEATURES[:3]), "coef": coef[:, :3].tolist()}
    old = PersonaDecoder.from_dict(legacy)  # a decoder stored before the channel: slope 0
    np.testing.assert_array_equal(old.coef[:, 3], 0.0)
    with pytest.raises(ValueError, match="differ in shape"):
        dec.logits(psi, text, zs[:, :2])


def test_building_one_catalogues_calibration_does_not_hold_up_another(monkeypatch) -> None:
    """A refit thread building the next catalogue's word calibration (seconds of MiniLM) must not
    block the worker voting under the current one (the old `_labeler` held the process lock
    throughout). A fake labeler stands in for MiniLM."""
    import threading
    import time

    import core.labelers.embedding as emb
    import core.zero_shot as zs
    from core.zero_shot import CatalogueVotes, _labeler

    release = threading.Event()

    class FakeLabeler:
        def __init__(self, personas, **_: object) -> None:
            self.personas = personas

        def word_calibration(self, size: int, words: dict) -> str:
            if size == 2:  # the next catalogue: slow until released
                release.wait(5)
            return f"calibration of {size}"

    monkeypatch.setattr(emb, "EmbeddingLabeler", FakeLabeler)
    monkeypatch.setattr(zs, "_LABELERS", {})
    monkeypatch.setattr(zs, "_CALIBS", zs.OrderedDict())
    personas = (("Pet", "dogs"), ("Cook", "pasta"))
    current, following = CatalogueVotes(personas, 1, (("dog", 1),)), CatalogueVotes(personas, 2, (("dog", 2),))
    assert _labeler(current)[1] == "calibration of 1"
    slow = threading.Thread(target=_labeler, args=(following,))
    slow.start()
    time.sleep(0.05)  # the slow build is under way
    labeler, calib = _labeler(current)
    still_building = slow.is_alive()  # the old code returned only after the slow build gave up
    release.set()
    slow.join()
    assert calib == "calibration of 1" and still_building
    assert _labeler(following)[1] == "calibration of 2" and _labeler(following)[0] is labeler
