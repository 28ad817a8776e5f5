"""A shop-level persona prior read off the catalogue itself: "this whole shop is vintage".

Why: the item votes are standardised per persona (so a persona whose definition is close to
everything does not win every item), which also removes what a shop *is*: on Online Retail GPT-4
puts Vintage, Seasonal, Unique/Novelty and Home Decor on 50–68% of customers while each of
them gets 6–9% of a user's item votes. The catalogue still carries that signal, but only
against a reference: a persona's mean similarity over the shop's product names is high either
because the shop leans to it or because its definition is generic. `shop_lean` compares it with
the same persona's mean similarity over a bundled neutral catalogue (`reference_names`: the
synthetic shops' department vocabularies and generic items, about 830 names), standardised
across personas; `lean_prior` shifts a prior's log-odds by `strength` × that lean. No labels.

Whether a shop is such a themed shop is read off the catalogue too: `lean_unevenness` compares
how unevenly the shop's lean (of the median name) spreads across the personas with the spread
of an *even* catalogue of the same personas (each persona's nearest reference names, pooled):
about 1 for a catalogue spread evenly over niche personas (twelve synthetic shops
0.66–1.28), 1.87 on Online Retail;
`regime_strength` maps it to [0, 1] (0 up to `UNEVEN_FROM`, 1 from `UNEVEN_FULL`), which moves
the embedding labeler from its niche to its shop-theme settings.

Measured (bench/labels.py, docs/RESULTS.md §6): on Online Retail the lean ranks GPT-4's
persona prevalence at Spearman 0.46; as the set model's prior shift (strength 1, each item half
a unit of evidence, item votes without per-persona calibration) the posterior rule goes
0.498 → 0.588 F1@5 (held-out 0.584, popularity 0.578); on the synthetic shops, whose planted
personas are niches, not shop-wide themes, that setting would cost 0.07–0.15, and their
unevenness keeps it off.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = ["reference_names", "shop_lean", "lean_prior", "lean_unevenness", "regime_strength", "PRIOR_BOUNDS",
           "EVEN_NEIGHBOURS", "UNEVEN_FROM", "UNEVEN_FULL", "MIN_LEAN_ITEMS"]

PRIOR_BOUNDS = (1e-3, 0.9)  # a shifted prior stays a probability the set model can use
EVEN_NEIGHBOURS = 30  # reference names per persona in the even catalogue of a persona set
UNEVEN_FROM = 1.4  # unevenness (× an even catalogue's) up to which a shop reads as even: strength 0
UNEVEN_FULL = 1.75  # unevenness from which a shop reads as leaning to a few themes: strength 1
MIN_LEAN_ITEMS = 100  # fewer names lean by chance (subsamples of 50 synthetic names reach 1.4): strength 0
MEDIAN_VARIANCE = np.pi / 2  # a median's sampling variance over a mean's (normal samples)


@lru_cache(maxsize=1)
def reference_names() -> tuple[str, ...]:
    """A neutral, multi-department catalogue: two modifiers × every noun of each built-in
    persona vocabulary (general and grocery) plus the generic items, sorted."""
    from core.synthetic import CATALOGUE, GENERIC_ITEMS, GROCERY

    names = {f"{m} {n}" for v in CATALOGUE + GROCERY for m in v.modifiers[:2] for n in v.nouns}
    return tuple(sorted(names | set(GENERIC_ITEMS)))


def shop_lean(catalogue_mean: np.ndarray, reference_similarity: np.ndarray) -> np.ndarray:
    """(|R|,) how much more the shop's names resemble each persona than the reference does,
    standardised across personas (zero everywhere when every persona leans alike).

    `catalogue_mean`: each persona's mean cosine similarity over the shop's catalogue;
    `reference_similarity`: reference names × personas cosine similarities.

    >>> shop_lean(np.array([0.3, 0.2, 0.1]), np.array([[0.1, 0.2, 0.1], [0.1, 0.2, 0.1]])).round(3).tolist()
    [1.414, -0.707, -0.707]
    """
    lean = np.asarray(catalogue_mean, dtype=np.float64) - np.asarray(reference_similarity).mean(axis=0)
    spread = lean.std()
    if spread < 1e-9:
        return np.zeros_like(lean)
    z: np.ndarray = (lean - lean.mean()) / spread
    return z


def lean_prior(prior: np.ndarray, lean: np.ndarray, strength: float) -> np.ndarray:
    """The prior with its log-odds shifted by `strength` × `lean`, kept within `PRIOR_BOUNDS`.

    >>> lean_prior(np.array([0.2, 0.2]), np.array([1.0, -1.0]), np.log(4.0)).round(3).tolist()
    [0.5, 0.059]
    """
    p = np.clip(np.asarray(prior, dtype=np.float64), 1e-12, 1 - 1e-12)
    shifted = np.log(p / (1.0 - p)) + strength * np.asarray(lean, dtype=np.float64)
    out: np.ndarray = np.clip(1.0 / (1.0 + np.exp(-shifted)), *PRIOR_BOUNDS)
    return out


def lean_unevenness(catalogue_similarity: np.ndarray, reference_similarity: np.ndarray,
                    neighbours: int = EVEN_NEIGHBOURS) -> float:
    """How unevenly the catalogue leans across the personas, in units of an even catalogue's.

    The lean here is each persona's *median* similarity over the shop's names minus its median
    over the reference: a theme most of the catalogue resembles moves the median, a niche with
    many items (a popular persona's) moves the mean but hardly the median. It varies across
    personas even in a shop spread evenly over them, because the definitions differ in reach.
    The yardstick: an *even catalogue of these personas*, each persona's `neighbours` most
    similar reference names pooled, whose lean's spread across personas is what evenness looks
    like for this persona set. The shop's spread has its sampling noise removed (a median over
    n names carries variance about pi/2 var/n). About 1 or less for a catalogue spread evenly
    over its personas (twelve synthetic shops: 0.66–1.28), well above for one whose names lean to a
    few of them (Online Retail: 1.87; docs/RESULTS.md §6).

    `catalogue_similarity`: shop names × personas cosine similarities; `reference_similarity`:
    reference names × personas.
    """
    shop = np.asarray(catalogue_similarity, dtype=np.float64)
    ref = np.asarray(reference_similarity, dtype=np.float64)
    if shop.ndim != 2 or ref.ndim != 2 or shop.shape[0] < 1 or ref.shape[0] < 1 or shop.shape[1] != ref.shape[1]:
        raise ValueError("lean_unevenness needs names × personas similarities of the shop and the reference, "
                         "each with at least one name, for the same personas")
    centre = np.median(ref, axis=0)
    lean = np.median(shop, axis=0) - centre
    noise = MEDIAN_VARIANCE * float(shop.var(axis=0).mean()) / shop.shape[0]
    spread = np.sqrt(max(float(lean.var()) - noise, 0.0))
    nearest = np.argsort(-ref, axis=0, kind="stable")[:neighbours]  # neighbours × personas
    even = np.median(ref[nearest.T.ravel()], axis=0) - centre
    yardstick = float(even.std())
    if yardstick < 1e-12:
        return 0.0 if spread < 1e-12 else float("inf")
    return float(spread / yardstick)


def regime_strength(unevenness: float, n_names: int) -> float:
    """0 for a catalogue spread evenly over its personas (unevenness ≤ `UNEVEN_FROM`, or fewer
    than `MIN_LEAN_ITEMS` names), 1 for one leaning to a few themes (≥ `UNEVEN_FULL`), linear
    between: how far the labeler moves from its niche settings to its shop-theme settings.

    >>> [round(regime_strength(u, 500), 6) for u in (0.9, 1.4, 1.575, 1.75, 3.0)]
    [0.0, 0.0, 0.5, 1.0, 1.0]
    >>> regime_strength(3.0, 5)
    0.0
    """
    if n_names < MIN_LEAN_ITEMS or not unevenness > UNEVEN_FROM:
        return 0.0
    return float(min(1.0, (unevenness - UNEVEN_FROM) / (UNEVEN_FULL - UNEVEN_FROM)))
