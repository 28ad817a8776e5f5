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
from core.labelers.base import UserHistory
from core.labelers.embedding import EmbeddingLabeler
from core.labelers.shop_prior import PRIOR_BOUNDS, lean_prior, reference_names, shop_lean
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
    off = EmbeddingLabeler(PERSONAS, catalogue=VINTAGE_SHOP)
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
