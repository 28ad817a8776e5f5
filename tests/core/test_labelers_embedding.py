"""EmbeddingLabeler: per-persona calibration, word weighting and the user rule.

Most tests use a bag-of-words fake encoder (each word a fixed random direction, a text the
normalised sum of its words) so hand-made catalogues have exactly known geometry; the rest load
the real bundled MiniLM model once per module.
"""
from __future__ import annotations

import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core.labelers.embedding as emb
from core.labelers import histories_for, make_labeler
from core.labelers.base import UserHistory
from core.labelers.embedding import (
    EmbeddingLabeler,
    _mean_f1_by_threshold,
    calibrate_threshold,
    purchase_weights,
    select_personas,
    tokens,
)
from core.labelers.set_posterior import EPS
from core.personas import Persona, PersonaSet
from core.synthetic import default_personas, make_shop

DIM = 1024


class BagOfWords:
    """Fake sentence encoder: a text is the normalised sum of fixed random word directions."""

    def encode(self, texts, **_: object) -> np.ndarray:
        out = []
        for text in texts:
            v = np.zeros(DIM)
            for w in tokens(text):
                v += np.random.default_rng(zlib.crc32(w.encode())).standard_normal(DIM)
            out.append(v / max(np.linalg.norm(v), 1e-12))
        return np.asarray(out, dtype=np.float32)


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(emb, "_load_model", lambda path: BagOfWords())


GROCERY = PersonaSet([
    Persona("Organic", "organic organic organic"),
    Persona("Parent", "baby infant nappies formula"),
    Persona("Pet", "dog cat kibble litter"),
    Persona("Cook", "pasta rice flour sauce oil noodles lentils oats"),
])
ORGANIC, PARENT, PET, COOK = range(4)
STAPLES = ["Pasta", "Basmati Rice", "Bread Flour", "Tomato Sauce", "Olive Oil", "Egg Noodles", "Red Lentils",
           "Rolled Oats", "Penne Pasta", "Brown Rice", "Chickpea Flour", "Curry Sauce", "Sesame Oil", "Rice Noodles",
           "Green Lentils", "Oat Bran", "Pasta Shells", "Risotto Rice", "Soy Sauce", "Rapeseed Oil"]
# "Organic" in a third of the names (the grocery shop): the word describes the shop
CATALOGUE = ([f"Organic {n}" for n in STAPLES[:10]] + STAPLES + ["Organic Infant Formula", "Baby Nappies",
             "Infant Formula", "Dog Kibble", "Cat Litter", "Organic Dog Kibble"])


def test_a_generic_word_does_not_decide_the_label(fake):
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE)
    assert sum("organic" in tokens(n) for n in CATALOGUE) / len(CATALOGUE) > emb.DEFAULT_MAX_DF
    votes = labeler.item_persona_scores(["Organic Infant Formula", "Organic Dog Kibble", "Organic Pasta"])
    assert votes.argmax(axis=1).tolist() == [PARENT, PET, COOK]
    assert np.allclose(votes.sum(axis=1), 1.0)
    # the same catalogue without word weighting: "Organic" decides (what the issue measured)
    plain = EmbeddingLabeler(GROCERY, name_weight=1.0, max_df=1.0, calibration=0.0, catalogue=CATALOGUE)
    assert plain.item_persona_scores(["Organic Infant Formula"]).argmax() == ORGANIC


def test_frequent_words_are_dropped_from_the_name_and_rare_words_weigh_more(fake):
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE)
    calib = labeler._calib
    assert calib.frequent == {"organic"}
    assert labeler._strip("Organic Infant Formula", calib) == "Infant Formula"
    assert labeler._strip("Organic", calib) == "Organic"  # nothing else left: kept whole
    n = len(CATALOGUE)
    df = {w: sum(w in tokens(c) for c in CATALOGUE) for w in ("organic", "infant", "formula")}
    idf = {w: np.log((1 + n) / (1 + c)) for w, c in df.items()}
    assert calib.idf["organic"] == pytest.approx(idf["organic"]) and idf["organic"] < idf["infant"]
    enc = BagOfWords().encode
    words = sum(idf[w] * enc([w])[0] for w in ("infant", "formula"))  # "organic" is dropped here too
    mixed = 0.7 * enc(["Infant Formula"])[0] + 0.3 * words / np.linalg.norm(words)
    got = labeler.item_vectors(["Organic Infant Formula"], calib)[0]
    assert np.allclose(got, mixed / np.linalg.norm(mixed), atol=1e-6)


def test_per_persona_standardisation_matches_brute_force(fake, monkeypatch):
    monkeypatch.setattr(emb, "PRIOR_ITEMS", 0.0)  # no shrinkage: plain per-persona z-scores
    labeler = EmbeddingLabeler(GROCERY, calibration=1.0, catalogue=CATALOGUE)
    raw = labeler._similarity(CATALOGUE, labeler._calib)
    mu, sd = raw.mean(axis=0), raw.std(axis=0)
    expected = mu.mean() + (raw - mu) / np.maximum(sd, sd.mean()) * sd.mean()
    got = labeler.calibrated_similarity(CATALOGUE)
    assert np.allclose(got, expected)
    # every persona now has the same mean; spreads above the mean spread are brought down to it
    assert np.allclose(got.mean(axis=0), mu.mean())
    assert np.allclose(got.std(axis=0), np.minimum(sd, sd.mean())) and (sd < sd.mean()).any()
    half = EmbeddingLabeler(GROCERY, calibration=0.5, catalogue=CATALOGUE)
    assert np.allclose(half.calibrated_similarity(CATALOGUE), 0.5 * raw + 0.5 * expected)


def test_small_catalogues_are_shrunk_towards_the_mean_persona(fake):
    labeler = EmbeddingLabeler(GROCERY, calibration=1.0, catalogue=CATALOGUE[:3])
    raw = labeler._similarity(CATALOGUE[:3], labeler._calib)
    w = 3 / (3 + emb.PRIOR_ITEMS)
    assert np.allclose(labeler._calib.mean, w * raw.mean(axis=0) + (1 - w) * raw.mean())
    [one] = EmbeddingLabeler(GROCERY, catalogue=["Dog Kibble"]).item_persona_scores(["Dog Kibble"])
    assert one.argmax() == PET and np.isfinite(one).all()


BROAD = PersonaSet([
    Persona("Shopper", "pack"),  # the word every name shares: close to everything
    Persona("Pet", "dog cat kibble litter"),
    Persona("Parent", "baby infant nappies formula"),
    Persona("Cook", "pasta rice flour sauce oil noodles lentils oats"),
])


def test_a_persona_close_to_everything_does_not_win_everywhere(fake, monkeypatch):
    monkeypatch.setattr(emb, "PRIOR_ITEMS", 0.0)  # calibration alone, no shrinkage
    words = ["pasta", "rice", "flour", "sauce", "oil", "noodles", "lentils", "oats", "dog", "cat", "kibble",
             "litter", "baby", "infant", "nappies", "formula"]
    names = [f"{w.title()} Pack" for w in words]  # word weighting off: only calibration acts
    wins = {c: int((EmbeddingLabeler(BROAD, calibration=c, name_weight=1.0, max_df=1.0, catalogue=names)
                    .item_persona_scores(names).argmax(axis=1) == 0).sum()) for c in (0.0, 0.5, 1.0)}
    assert wins[0.0] == len(names) > wins[0.5] > wins[1.0] == 0
    full = EmbeddingLabeler(BROAD, calibration=1.0, name_weight=1.0, max_df=1.0, catalogue=names)
    assert full.item_persona_scores(["Dog Pack", "Baby Pack", "Rice Pack"]).argmax(axis=1).tolist() == [1, 2, 3]


def test_a_niche_persona_passes_its_own_bar(fake):
    """One pet item among five cooking ones: a 10% share of votes, yet Pet is kept (lift rule)."""
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE, rule="lift")
    history = UserHistory("u", tuple((n, 1) for n in ["Pasta", "Rice", "Flour", "Pesto Sauce", "Penne Pasta",
                                                      "Dog Kibble"]))
    [result] = labeler.label([history])
    share = labeler.score_matrix([history])[0]
    base = labeler.persona_base()
    assert share[PET] < 0.25 and share[PET] >= labeler.threshold * base[PET]
    assert result.personas == (COOK, PET)  # cooking dominates the shop, yet is kept (bar capped)
    # a single global share cut-off at the same level would drop it
    assert share[PET] * len(GROCERY) < labeler.threshold


def test_unpinned_catalogue_grows_and_refits_pinned_does_not(fake):
    grow = EmbeddingLabeler(GROCERY)
    grow.item_persona_scores(CATALOGUE[:10])
    assert grow._calib.size == 10
    grow.item_persona_scores(CATALOGUE[:10])  # nothing new: no refit
    first = grow._calib
    grow.item_persona_scores(CATALOGUE[10:11])  # +10%: refit
    assert grow._calib is not first and grow._calib.size == 11
    pinned = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE[:10])
    before = pinned.item_persona_scores(["Dog Kibble"])
    pinned.item_persona_scores(CATALOGUE)
    assert pinned._calib.size == 10 and np.array_equal(pinned.item_persona_scores(["Dog Kibble"]), before)
    with pytest.raises(ValueError, match="no catalogue"):
        EmbeddingLabeler(GROCERY).persona_base()


def test_scores_are_the_quantity_weighted_mean_of_item_votes(fake):
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE)
    items = (("Dog Kibble", 7), ("Pasta", 1), ("Infant Formula", 2))
    votes = labeler.item_persona_scores([n for n, _ in items])
    w = np.array([1 + np.log(q) for _, q in items])
    got = labeler.score_matrix([UserHistory("u", items), UserHistory("e", ())])
    assert np.allclose(got[0], (w[:, None] * votes).sum(axis=0) / w.sum()) and np.all(got[1] == 0)
    names, weights = purchase_weights([UserHistory("u", items)])
    assert names == [n for n, _ in items] and np.allclose(weights.toarray(), w / w.sum())


def test_cut_off_bounds_and_empty_history(fake):
    history = [UserHistory("u", (("Pasta", 1), ("Dog Kibble", 1), ("Baby Nappies", 1)))]
    loose = EmbeddingLabeler(GROCERY, threshold=0.0, max_personas=3, catalogue=CATALOGUE, rule="lift")
    strict = EmbeddingLabeler(GROCERY, threshold=100.0, catalogue=CATALOGUE, rule="lift")
    assert len(loose.label(history)[0].personas) == 3
    [one] = strict.label(history)
    lift = strict.score_matrix(history)[0] / emb.persona_bar(strict.persona_base())
    assert one.personas == (int(np.argmax(lift)),)  # nobody passes: the best lift alone
    [empty] = loose.label([UserHistory("e", ())])
    assert empty.error == "empty_history" and not empty.ok
    with pytest.raises(ValueError):
        EmbeddingLabeler(GROCERY, calibration=1.5)
    with pytest.raises(ValueError, match="rule"):
        EmbeddingLabeler(GROCERY, rule="vote")


def test_posterior_rule_weighs_evidence_and_ignores_the_batch(fake):
    """The default rule: one pet item among five cooking ones is weak evidence, five are strong;
    a user's labels do not depend on who else is in the batch."""
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE)
    assert labeler.rule == "posterior"
    cook = ["Pasta", "Basmati Rice", "Bread Flour", "Tomato Sauce", "Olive Oil"]
    pets = ["Dog Kibble", "Cat Litter", "Organic Dog Kibble", "Dog Kibble Pack", "Cat Litter Tray"]
    one = UserHistory("one", tuple((n, 1) for n in cook + pets[:1]))
    many = UserHistory("many", tuple((n, 1) for n in cook + pets))
    prob = labeler.persona_posterior([one, many])
    assert prob[1, PET] > prob[0, PET] and prob[1, PET] > 0.5 and prob[1, COOK] > 0.5
    # brute force of the model for "many" and persona Cook given Pet (prior RHO0, EPS)
    names = cook + pets
    ratios = labeler.item_persona_scores(names) / labeler.persona_base()
    def log_post(subset):
        mix = ratios[:, subset].mean(axis=1)
        return np.log((1 - EPS) * mix + EPS).sum() + len(subset) * np.log(emb.RHO0 / (1 - emb.RHO0))
    odds = log_post([PET, COOK]) - log_post([PET])
    assert prob[1, COOK] == pytest.approx(1 / (1 + np.exp(-odds)))
    alone = labeler.label([many])[0]
    crowd = labeler.label([one, UserHistory("e", ()), many, UserHistory("p", (("Baby Nappies", 1),))])
    assert alone.personas == crowd[2].personas and np.allclose(alone.scores, crowd[2].scores)
    assert set(alone.personas) == {COOK, PET} and list(alone.scores) == sorted(alone.scores, reverse=True)
    assert crowd[1].error == "empty_history"


def test_fit_prior_re_estimates_item_ratios_from_their_buyers(fake):
    """Under the niche settings the users' item ratios are the names' mixed with those
    `refine_ratios` learns from who buys each item on the fitted users; items never seen there
    keep the name's ratio; refine=0 keeps the names' alone."""
    from core.labelers.set_posterior import refine_ratios

    users = [UserHistory(f"c{i}", ((STAPLES[i], 1), (STAPLES[i + 1], 2), ("Dog Kibble", 1))) for i in range(8)]
    users += [UserHistory(f"p{i}", (("Baby Nappies", 1), ("Infant Formula", 1), ("Organic Infant Formula", 1)))
              for i in range(4)]
    fitted = {w: EmbeddingLabeler(GROCERY, catalogue=CATALOGUE, refine=w) for w in (1.0, 0.5, 0.0)}
    assert EmbeddingLabeler(GROCERY, catalogue=CATALOGUE).refine == 1.0  # the niche default
    for lab in fitted.values():
        lab.fit_prior(users)
    _, counts, votes = fitted[1.0]._item_evidence(users)
    names_ratio = votes / fitted[1.0].persona_base()
    learned = refine_ratios(counts, names_ratio, votes)
    for w, lab in fitted.items():
        assert np.allclose(lab._evidence(users)[1], (1 - w) * names_ratio + w * learned)
    assert not np.allclose(learned, names_ratio)
    # an item none of the fitted users bought keeps its name's ratio
    new = [UserHistory("n", (("Cat Litter", 1), (STAPLES[0], 1)))]
    _, ratio = fitted[1.0]._evidence(new)
    own = fitted[1.0].item_persona_scores(["Cat Litter"])[0] / fitted[1.0].persona_base()
    assert np.allclose(ratio[0], own) and not np.allclose(ratio[1], names_ratio[0])
    with pytest.raises(ValueError):
        EmbeddingLabeler(GROCERY, refine=1.5)


def test_fit_prior_learns_which_personas_are_common_among_users(fake):
    # refine=0: the item ratios from the names alone (re-estimated from buyers, a persona that
    # 12 of 13 users hold would explain every purchase alike and carry no evidence)
    labeler = EmbeddingLabeler(GROCERY, catalogue=CATALOGUE, refine=0.0)
    assert np.allclose(labeler.persona_prior(), emb.RHO0)
    cooks = [UserHistory(f"c{i}", ((STAPLES[i], 1), (STAPLES[i + 1], 2))) for i in range(12)]
    parent = [UserHistory("p", (("Baby Nappies", 1), ("Infant Formula", 1)))]
    prior = labeler.fit_prior(cooks + parent)
    assert prior[COOK] > 1.5 * emb.RHO0 and max(prior[PARENT], prior[PET]) < emb.RHO0
    assert np.array_equal(labeler.persona_prior(), prior)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(2, 7), st.integers(1, 5), st.integers(0, 10**6))
def test_mean_f1_matches_brute_force(n, m, max_personas, seed):
    rng = np.random.default_rng(seed)
    scores = rng.dirichlet(np.ones(m), size=n)
    base = rng.dirichlet(np.ones(m))
    truth = [tuple(rng.choice(m, size=rng.integers(1, m + 1), replace=False)) for _ in range(n)]
    grid = np.array([0.0, 0.5, 1.0, 1.3, 2.0, 3.0, 50.0])
    brute = []
    for t in grid:
        f = []
        for row, tr in zip(scores, truth):
            chosen = set(select_personas(row, base, t, max_personas)[0])
            f.append(2 * len(chosen & set(tr)) / (len(chosen) + len(tr)))
        brute.append(np.mean(f))
    assert np.allclose(_mean_f1_by_threshold(scores, base, truth, grid, max_personas), brute)


# -- the real bundled model ----------------------------------------------------------------
PERSONAS = default_personas(12)  # Busy Parent, ..., Pet Owner, ..., Eco-conscious Shopper
CHEF, PET_OWNER, GARDEN, PARENT_R, ECO = (PERSONAS.index_of(n) for n in (
    "Home Chef", "Pet Owner", "Gardener", "Busy Parent", "Eco-conscious Shopper"))


@pytest.fixture(scope="module")
def labeler() -> EmbeddingLabeler:
    shop = make_shop(n_users=50, n_items=240, n_personas=12, seed=5)
    lab = EmbeddingLabeler(PERSONAS, catalogue=[str(n) for n in shop.graph().item_names])
    return lab


def test_real_model_obvious_histories_get_obvious_personas(labeler):
    chef = UserHistory("c", (("Cast Iron Frying Pan", 3), ("Professional Chef Knife", 1)))
    pet = UserHistory("p", (("Puppy Chew Toy", 2), ("Cat Litter", 5)))
    both = UserHistory("b", (("Cast Iron Dutch Oven", 2), ("Gardening Gloves", 2), ("Seed Packets", 1)))
    r_chef, r_pet, r_both = labeler.label([chef, pet, both])
    assert r_chef.personas[0] == CHEF and r_pet.personas[0] == PET_OWNER
    assert set(r_both.personas[:2]) == {CHEF, GARDEN}
    assert all(np.all(np.diff(r.scores) <= 0) for r in (r_chef, r_pet, r_both))
    assert labeler.label_items(["Stainless Steel Saucepan Set", "Dog Feeding Bowl"])[0][0] == CHEF


def test_real_model_reads_a_synthetic_shop_as_niche(labeler):
    """A catalogue spread evenly over niche personas keeps the niche settings (strength 0)."""
    from core.labelers.shop_prior import UNEVEN_FROM

    regime = labeler.regime()
    assert 0.0 < regime["unevenness"] < UNEVEN_FROM and regime["strength"] == 0.0
    assert labeler.settings() == emb.NICHE


def test_real_model_organic_baby_food_is_a_parent_item():
    """The issue's case: "Organic" in a third of the names must not turn baby food into Eco."""
    base = ["Infant Formula", "Baby Wipes", "Nappies", "Dog Food", "Cat Litter", "Pasta", "Olive Oil",
            "Rice", "Coffee Beans", "Garden Hose", "Toothpaste", "Shampoo"]
    catalogue = base + [f"Organic {n}" for n in base[:6]]
    labeler = EmbeddingLabeler(PERSONAS, catalogue=catalogue)
    votes = labeler.item_persona_scores(["Organic Infant Formula", "Organic Dog Food"])
    assert votes.argmax(axis=1).tolist() == [PARENT_R, PET_OWNER]
    plain = EmbeddingLabeler(PERSONAS, name_weight=1.0, max_df=1.0, calibration=0.0, catalogue=catalogue)
    plain._cache = labeler._cache
    assert plain.item_persona_scores(["Organic Infant Formula"])[0, ECO] > votes[0, ECO]


def test_each_name_is_encoded_once(labeler, monkeypatch):
    names = ["Rake", "Trowel", "Rake"]
    labeler.encode(names)
    calls = []
    monkeypatch.setattr(emb, "_load_model", lambda path: calls.append(path))
    again = labeler.encode(names)
    assert calls == [] and again.shape == (3, 384) and np.allclose(again[0], again[2])


def test_thread_safe_and_deterministic(labeler):
    histories = [UserHistory(str(i), ((f"Garden Trowel {i}", 1), ("Dog Collar", i + 1))) for i in range(8)]
    fresh = make_labeler("embedding", PERSONAS, catalogue=list(labeler._seen))
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda h: fresh.label([h])[0], histories))
    sequential = labeler.label(histories)
    assert [r.personas for r in parallel] == [r.personas for r in sequential]
    # batch composition changes float rounding inside the model, nothing more
    assert all(np.allclose(a.scores, b.scores, atol=1e-5) for a, b in zip(parallel, sequential))
    assert fresh.stats.calls == 8


def test_calibration_on_a_synthetic_shop_beats_popularity(labeler):
    shop = make_shop(n_users=80, n_items=60, n_personas=6, seed=3)
    graph = shop.graph()
    histories = histories_for(graph, range(graph.n_users))
    lab = EmbeddingLabeler(shop.personas)
    lab._cache = labeler._cache
    grid = [0.5, 1.0, 1.5, 2.0, 3.0]
    best = calibrate_threshold(lab, histories, shop.user_truth, grid)
    truth = [shop.user_truth[h.user_id] for h in histories]
    f1 = _mean_f1_by_threshold(lab.score_matrix(histories), lab.persona_base(), truth, np.array(grid),
                               lab.max_personas)
    assert best == grid[int(np.argmax(f1))]
    counts = np.bincount([p for t in truth for p in t], minlength=len(shop.personas))
    top = set(np.argsort(-counts)[:3].tolist())
    popularity_f1 = np.mean([2 * len(top & set(t)) / (3 + len(t)) for t in truth])
    assert f1.max() > popularity_f1 + 0.05
    with pytest.raises(ValueError):
        calibrate_threshold(lab, [], {})


class SlowBagOfWords(BagOfWords):
    """BagOfWords that takes `delay` seconds per encode call and records the calls' sizes."""

    def __init__(self, delay: float) -> None:
        self.delay, self.calls = delay, []

    def encode(self, texts, **kw: object) -> np.ndarray:
        import time

        self.calls.append(len(texts))
        time.sleep(self.delay)
        return super().encode(texts, **kw)


def test_a_short_encode_is_not_held_up_by_a_whole_catalogue(monkeypatch):
    """A worker's event loop voting one new name must not wait for a refit thread embedding a
    whole catalogue: no lock is held across the catalogue's model calls, so the short request
    gets in between two of them (the old code held the labeler's lock for the whole catalogue,
    so the one name came back only after it)."""
    import threading
    import time

    model = SlowBagOfWords(delay=0.05)
    monkeypatch.setattr(emb, "_load_model", lambda path: model)
    labeler = EmbeddingLabeler(GROCERY)
    catalogue = [f"{w} {i}" for i, w in enumerate(STAPLES * 16)]  # 320 names: 10 model calls, ≥ 0.5 s
    started = threading.Event()
    finished: dict[str, float] = {}

    def refit() -> None:
        started.set()
        labeler.encode(catalogue)
        finished["catalogue"] = time.monotonic()

    thread = threading.Thread(target=refit)
    thread.start()
    started.wait()
    time.sleep(0.02)  # the catalogue's first model call is under way
    one = labeler.encode(["Dog Kibble"])
    finished["one"] = time.monotonic()
    thread.join()
    assert finished["one"] < finished["catalogue"]
    # the same vectors as an encoder that saw everything at once (bag of words: exact)
    monkeypatch.setattr(emb, "_load_model", lambda path: BagOfWords())
    everything = EmbeddingLabeler(GROCERY)
    assert np.allclose(labeler.encode(catalogue), everything.encode(catalogue))
    assert np.allclose(one, everything.encode(["Dog Kibble"]))
