"""The shop-level persona prior (core.labelers.shop_prior) and its use by EmbeddingLabeler.

Hand-made catalogues under the bag-of-words fake encoder of test_labelers_embedding, so the
similarities are known exactly: a shop whose names are full of one persona's words leans to it
against the bundled reference catalogue, a shift of the prior's log-odds by exactly
strength × lean, and fewer units of evidence per item leave the posterior nearer the prior.
"""
from __future__ import annotations

import numpy as np
import pytest

import core.labelers.embedding as emb
import core.labelers.shop_prior as shop_prior
from core.labelers.base import UserHistory
from core.labelers.embedding import NICHE, SHOP_THEMES, EmbeddingLabeler, regime_settings
from core.labelers.shop_prior import (
    EVEN_NEIGHBOURS,
    MIN_LEAN_ITEMS,
    PRIOR_BOUNDS,
    UNEVEN_FROM,
    UNEVEN_FULL,
    lean_prior,
    lean_unevenness,
    reference_names,
    regime_strength,
    shop_lean,
)
from core.personas import Persona, PersonaSet
from tests.core.test_labelers_embedding import BagOfWords

PERSONAS = PersonaSet([
    Persona("Vintage", "vintage retro antique"),
    Persona("Gardener", "rake hoe trowel seeds"),
    Persona("Pet", "dog cat kibble litter"),
])
VINTAGE, GARDENER, PET = range(3)
# a vintage shop: every name carries one vintage word (each in under 20% of the names, so kept)
THINGS = ["Rake", "Hoe", "Trowel", "Seeds", "Dog Bowl", "Cat Bed", "Kibble Scoop", "Litter Tray", "Lamp", "Clock",
          "Mirror", "Tin", "Jug", "Vase", "Frame", "Chair", "Stool", "Shelf"]
VINTAGE_SHOP = [f"{['Vintage', 'Retro', 'Antique', 'Old', 'Classic', 'Heritage'][i % 6]} {t}"
                for i, t in enumerate(THINGS)]
PLAIN_SHOP = THINGS


@pytest.fixture
def fake(monkeypatch):
    monkeypatch.setattr(emb, "_load_model", lambda path: BagOfWords())


def test_reference_catalogue_is_broad_and_fixed():
    names = reference_names()
    assert len(names) > 500 and len(set(names)) == len(names) and list(names) == sorted(names)
    assert reference_names() is names  # built once


def test_shop_lean_matches_brute_force_and_is_flat_for_a_uniform_lean():
    rng = np.random.default_rng(0)
    mean, ref = rng.random(5), rng.random((40, 5))
    lean = mean - ref.mean(axis=0)
    assert np.allclose(shop_lean(mean, ref), (lean - lean.mean()) / lean.std())
    assert np.array_equal(shop_lean(ref.mean(axis=0) + 0.3, ref), np.zeros(5))  # every persona leans alike


def test_lean_prior_shifts_log_odds_exactly_and_stays_a_probability():
    prior = np.array([0.2, 0.5, 0.05, 0.3])
    lean = np.array([1.0, -0.5, 2.0, 0.0])
    out = lean_prior(prior, lean, 0.7)
    assert np.allclose(np.log(out / (1 - out)), np.log(prior / (1 - prior)) + 0.7 * lean)
    assert np.allclose(lean_prior(prior, lean, 0.0), prior, rtol=1e-12, atol=0)
    extreme = lean_prior(prior, np.array([50.0, -50.0, 0.0, 0.0]), 1.0)
    assert extreme[0] == PRIOR_BOUNDS[1] and extreme[1] == PRIOR_BOUNDS[0]


def test_a_vintage_shop_leans_vintage_and_a_plain_shop_does_not(fake):
    vintage = EmbeddingLabeler(PERSONAS, catalogue=VINTAGE_SHOP)
    plain = EmbeddingLabeler(PERSONAS, catalogue=PLAIN_SHOP)
    assert int(np.argmax(vintage.shop_lean())) == VINTAGE
    assert vintage.shop_lean()[VINTAGE] > plain.shop_lean()[VINTAGE] + 0.5
    # the labeler's lean is shop_lean of its own catalogue mean against the encoded reference
    ref = vintage.encode(list(reference_names())).astype(np.float64) @ vintage.persona_vectors().T
    assert np.allclose(vintage.shop_lean(), shop_lean(vintage._calib.mean, ref))


def test_shop_prior_raises_the_shop_wide_persona_and_is_off_by_default(fake):
    off = EmbeddingLabeler(PERSONAS, catalogue=VINTAGE_SHOP)  # 18 names: too few to lean, niche settings
    assert off.regime()["strength"] == 0.0 and off.settings() == NICHE
    on = EmbeddingLabeler(PERSONAS, catalogue=VINTAGE_SHOP, shop_prior=2.0)
    assert np.allclose(off.persona_prior(), emb.RHO0)
    assert np.allclose(on.persona_prior(), lean_prior(np.full(3, emb.RHO0), on.shop_lean(), 2.0))
    assert on.persona_prior()[VINTAGE] > emb.RHO0 > on.persona_prior()[PET]
    # a gardener who bought one rake: the vintage shop makes Vintage more probable for them too
    user = [UserHistory("g", (("Vintage Rake", 1),))]
    assert on.persona_posterior(user)[0, VINTAGE] > off.persona_posterior(user)[0, VINTAGE]
    users = [UserHistory(f"u{i}", ((VINTAGE_SHOP[i], 1), (VINTAGE_SHOP[i + 1], 1))) for i in range(10)]
    fitted = on.fit_prior(users)  # EM on the users, then the shop's lean on top
    assert np.allclose(fitted, lean_prior(on._prior, on.shop_lean(), 2.0))
    assert np.array_equal(fitted, on.persona_prior())


def test_less_evidence_per_item_keeps_the_posterior_nearer_the_prior(fake):
    full = EmbeddingLabeler(PERSONAS, catalogue=PLAIN_SHOP)
    half = EmbeddingLabeler(PERSONAS, catalogue=PLAIN_SHOP, evidence=0.5)
    user = [UserHistory("p", (("Dog Bowl", 1), ("Cat Bed", 1), ("Kibble Scoop", 1)))]
    p_full, p_half = full.persona_posterior(user)[0], half.persona_posterior(user)[0]
    assert p_full[PET] > p_half[PET] > emb.RHO0
    # three items at half weight are worth exactly one and a half items at full weight
    counts, _ = half._evidence(user)
    assert counts.sum() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        EmbeddingLabeler(PERSONAS, evidence=0.0)
    with pytest.raises(ValueError):
        EmbeddingLabeler(PERSONAS, shop_prior=-1.0)


# -- the label-free switch between the niche and the shop-theme settings ----------------------
def _median(values) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _brute_unevenness(shop: np.ndarray, ref: np.ndarray, k: int) -> float:
    """lean_unevenness written out with loops, persona by persona."""
    n, m = shop.shape
    lean, variances, even = [], [], []
    for r in range(m):
        lean.append(_median(shop[:, r]) - _median(ref[:, r]))
        mean = sum(shop[:, r]) / n
        variances.append(sum((x - mean) ** 2 for x in shop[:, r]) / n)
    pooled = [ref[i] for r in range(m) for i in sorted(range(len(ref)), key=lambda i: -ref[i, r])[:k]]
    for r in range(m):
        even.append(_median([row[r] for row in pooled]) - _median(ref[:, r]))
    lean_var = sum((x - sum(lean) / m) ** 2 for x in lean) / m
    spread = max(lean_var - np.pi / 2 * sum(variances) / m / n, 0.0) ** 0.5
    yardstick = (sum((x - sum(even) / m) ** 2 for x in even) / m) ** 0.5
    return spread / yardstick


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _world(seed: int, m: int = 8, dim: int = 16, per: int = 40, other: int = 400):
    """Persona directions and a reference catalogue: `per` names around each persona plus
    `other` unrelated names (a broad reference, like the bundled one)."""
    rng = np.random.default_rng(seed)
    personas = _unit(rng.standard_normal((m, dim)))
    own = _unit(personas[np.repeat(np.arange(m), per)] + 0.8 * rng.standard_normal((m * per, dim)) / np.sqrt(dim))
    return personas, np.vstack([own, _unit(rng.standard_normal((other, dim)))])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_unevenness_matches_brute_force(seed):
    personas, ref = _world(seed)
    rng = np.random.default_rng(seed)
    shop = ref[rng.choice(len(ref), 25, replace=False)] @ personas.T
    assert lean_unevenness(shop, ref @ personas.T, 5) == pytest.approx(_brute_unevenness(shop, ref @ personas.T, 5),
                                                                       rel=1e-9)
    assert lean_unevenness(shop, ref @ personas.T) == pytest.approx(
        _brute_unevenness(shop, ref @ personas.T, EVEN_NEIGHBOURS), rel=1e-9)


@pytest.mark.parametrize("seed", [0, 2])
def test_an_even_catalogue_gets_strength_zero_and_a_leaning_one_more_the_more_it_leans(seed):
    personas, ref = _world(seed)
    sims, k = ref @ personas.T, 20
    even = ref[np.argsort(-sims, axis=0, kind="stable")[:k].T.ravel()]  # the even catalogue of these personas
    assert len(even) >= MIN_LEAN_ITEMS
    assert lean_unevenness(even @ personas.T, sims, k) <= 1.0  # itself, less its sampling noise
    assert regime_strength(lean_unevenness(even @ personas.T, sims, k), len(even)) == 0.0
    # a themed shop: every name drifts towards persona 0 ("every item a bit vintage"), more and more
    values = [lean_unevenness(_unit(even + step * personas[0]) @ personas.T, sims, k)
              for step in np.arange(0.0, 0.81, 0.05)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    rising = [u for u in values if u > 0]  # past the sampling noise: strictly more uneven each step
    assert len(rising) >= len(values) - 2 and all(b > a for a, b in zip(rising, rising[1:]))
    strengths = [regime_strength(u, len(even)) for u in values]
    assert strengths[0] == 0.0 and strengths[-1] == 1.0 and all(b >= a for a, b in zip(strengths, strengths[1:]))
    assert any(0.0 < s < 1.0 for s in strengths)  # a ramp, not a step


def test_a_popular_niche_moves_the_median_lean_less_than_a_theme():
    """Doubling one persona's own names (a popular niche) leans the shop less than letting every
    name drift towards that persona by as much on average (a theme)."""
    personas, ref = _world(0)
    sims, k = ref @ personas.T, 20
    even = ref[np.argsort(-sims, axis=0, kind="stable")[:k].T.ravel()]
    niche = np.vstack([even, even[:k]])  # persona 0's nearest names twice
    shift = float((niche @ personas[0]).mean() - (even @ personas[0]).mean())
    step = 0.0
    while float((_unit(even + step * personas[0]) @ personas[0]).mean() - (even @ personas[0]).mean()) < shift:
        step += 0.01
    theme = _unit(even + step * personas[0])
    assert lean_unevenness(niche @ personas.T, sims, k) < lean_unevenness(theme @ personas.T, sims, k)


def test_regime_strength_is_linear_between_its_bounds_and_settings_interpolate():
    mid = (UNEVEN_FROM + UNEVEN_FULL) / 2
    assert regime_strength(mid, MIN_LEAN_ITEMS) == pytest.approx(0.5)
    assert regime_strength(UNEVEN_FROM, 10_000) == 0.0 and regime_strength(UNEVEN_FULL, 10_000) == 1.0
    assert regime_strength(float("inf"), MIN_LEAN_ITEMS - 1) == 0.0  # too few names to lean
    assert regime_settings(0.0) == NICHE and regime_settings(1.0) == SHOP_THEMES
    quarter = regime_settings(0.25)
    assert all(quarter[k] == pytest.approx(0.75 * NICHE[k] + 0.25 * SHOP_THEMES[k]) for k in NICHE)
    with pytest.raises(ValueError):
        regime_settings(1.5)


def test_lean_unevenness_hostile_inputs():
    ref = np.random.default_rng(0).random((10, 3))
    for shop in (np.zeros((0, 3)), np.zeros((4, 2)), np.zeros(3)):
        with pytest.raises(ValueError, match="at least one name"):
            lean_unevenness(shop, ref)
    flat = np.full((10, 3), 0.2)  # the reference cannot tell the personas apart
    assert lean_unevenness(np.full((5, 3), 0.4), flat) == 0.0  # nor can the shop: even
    assert lean_unevenness(np.eye(3)[[0, 0, 0, 1]], flat) == float("inf")  # the shop can: leaning
    assert regime_strength(float("inf"), 5) == 0.0  # but five names are too few to say


def _lean_shop(theme_share: float, n: int = 120) -> list[str]:
    """`n` names; a `theme_share` of them carry one of six vintage words, the rest are plain
    things (no vintage word in over 20% of the names, so none is dropped as frequent)."""
    words = ["Vintage", "Retro", "Antique", "Old", "Classic", "Heritage"]
    things = [f"{a} {b}" for a in ("Blue", "Red", "Tall", "Small", "Oak", "Tin") for b in THINGS]
    return [f"{words[i % 6]} {t}" if i < theme_share * n else t for i, t in enumerate(things[:n])]


def test_the_labeler_reads_its_regime_off_the_catalogue(fake, monkeypatch):
    monkeypatch.setattr(shop_prior, "UNEVEN_FROM", 0.0)  # the fake encoder's reference is no even shop:
    monkeypatch.setattr(shop_prior, "UNEVEN_FULL", 50.0)  # test the wiring on a wide ramp
    seen = []
    for share in (0.3, 0.8, 0.9):  # vintage names: a minority, most, nearly all
        lab = EmbeddingLabeler(PERSONAS, catalogue=_lean_shop(share))
        regime = lab.regime()
        names = list(lab._seen)
        sims = lab._similarity(names, lab._calib)  # the raw cosines the statistic reads
        assert regime["unevenness"] == pytest.approx(lean_unevenness(sims, lab._reference_similarity()))
        strength = regime_strength(regime["unevenness"], len(names))
        assert regime["strength"] == strength and lab.settings() == regime_settings(strength)
        assert (lab.shop_prior, lab.evidence, lab.calibration) == tuple(regime_settings(strength)[k] for k in
                                                                        ("shop_prior", "evidence", "calibration"))
        seen.append(strength)
    # a minority of vintage names moves no median; most of them do, and more of them more
    assert seen[0] == 0.0 < seen[1] <= seen[2] < 1.0
    pinned = EmbeddingLabeler(PERSONAS, catalogue=_lean_shop(0.9), shop_prior=0.0, evidence=1.0)
    assert pinned.shop_prior == 0.0 and pinned.evidence == 1.0  # explicit settings win
    assert pinned.calibration == regime_settings(seen[2])["calibration"]  # the rest is the catalogue's
    fixed = EmbeddingLabeler(PERSONAS, catalogue=_lean_shop(0.9), **NICHE)
    assert fixed.regime()["unevenness"] == 0.0 and fixed.regime()["strength"] == 0.0  # nothing to choose


def test_a_tiny_catalogue_keeps_the_niche_settings(fake):
    for names in (["Vintage Lamp"], _lean_shop(1.0, MIN_LEAN_ITEMS - 1)):
        lab = EmbeddingLabeler(PERSONAS, catalogue=names)
        assert lab.regime()["strength"] == 0.0 and lab.settings() == NICHE
    with pytest.raises(ValueError, match="no catalogue"):
        EmbeddingLabeler(PERSONAS).regime()
