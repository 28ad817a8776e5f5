"""The distilled item–persona channel: a user's text logit per persona from the words of what it bought.

Why: the LLM labels a user from the *words* of what they bought, while graph propagation only
sees shared items (see `core.word_personas`). Per user, count in how many of its distinct items
each word occurs, c_w; the user's features are the sublinear counts g(c_w) = 1 + ln c_w,
L2-normalised over all its words, and one logistic regression per persona is fitted on the
prototypes:

    text_logit[u] = b + W · g(c_u) / ‖g(c_u)‖.

Sublinear counts, not a mean of per-item vectors: a user with thirty Christmas items is not
thirty times as Christmassy as one with a single one (held-out F1@5 on Online Retail 0.703 vs
0.692 for the mean of items normalised, 5% budget, docs/RESULTS.md §2b). The stream keeps the
same quantity exactly, incrementally: a user's text state is its word counts plus the two sums
Σ_w W[w]·g(c_w) and Σ_w g(c_w)², packed in one array (`ItemChannel.add_text`); a new item
updates the counts of its own words and the sums are recomputed from the counts (O(words of the
user), vectorised); a refit recomputes the state once from the user's item names. A word is
identified by the CRC-32 of its text (`word_id`), in batch and stream alike, so both see the
same features by construction. Personas with fewer than two positive (or negative) prototypes
cannot be fitted; their logit is the constant logit of the prototype base rate.

Per item, s(v) = b + W · f(v) with f(v) the item's own words at 1/√(#words) (`item_scores`)
says how much an item speaks for a persona: the evidence shown next to a decision.

The fitted `ItemChannel` is small (only words with a non-zero weight are kept) and JSON-able
(`to_dict`/`from_dict`), so a worker can receive it through a Kafka table and score items it
has never seen (unknown words count in the norm, with no weight).

>>> import numpy as np
>>> from core.graph import BipartiteGraph
>>> g = BipartiteGraph.from_indices(np.arange(4), np.arange(4), 4, 4,
...     item_names=np.array(["red cake tin", "cake stand", "garden hose", "garden gnome"]))
>>> ch = fit_item_channel(g, {0: [0], 1: [0], 2: [1], 3: [1]}, 2)
>>> ch.item_scores(["cake slice", "garden chair"]).argmax(axis=1).tolist()
[0, 1]
>>> ch.text_logit(ch.add_text(None, ["cake slice", "cake box"])).argmax().item()
0
"""
from __future__ import annotations

import base64
import functools
import logging
import math
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
from numba import njit
from threadpoolctl import threadpool_limits

from core.graph import BipartiteGraph

__all__ = [
    "TOKEN_PATTERN",
    "ItemChannel",
    "tokens",
    "word_id",
    "name_word_ids",
    "word_matrix",
    "sublinear",
    "user_word_features",
    "fit_item_channel",
    "user_text_logits",
    "out_of_fold_text_logits",
    "base_rate_logit",
]

logger = logging.getLogger(__name__)

TOKEN_PATTERN = r"(?u)\b[^\W\d_]{3,}\b"  # words of 3+ letters; sizes and codes are noise
_TOKEN = re.compile(TOKEN_PATTERN)
#: Inverse-regularisation of the per-persona logistic regressions (chosen on Online Retail's
#: validation split among 1, 3, 10 for sublinear user word counts).
DEFAULT_C = 3.0


def tokens(name: str) -> list[str]:
    """The distinct lower-case words (3+ letters) of an item name, in order of appearance; a
    name without such a word (a code, an id) is one token of its own, "#" + the stripped name,
    so catalogues without descriptive names still get an item-level channel."""
    text = str(name).lower()
    words = list(dict.fromkeys(_TOKEN.findall(text)))
    if words:
        return words
    text = text.strip()
    return ["#" + text] if text else []


def word_id(word: str) -> int:
    """A word's identity in features and text states: CRC-32 of its UTF-8 text (the same in
    every process; two words that collide are one feature, in batch and stream alike)."""
    return zlib.crc32(word.encode("utf-8"))


@functools.lru_cache(maxsize=1 << 16)
def name_word_ids(name: str) -> np.ndarray:
    """The sorted distinct word ids of an item name (cached: the stream asks per purchase)."""
    ids = np.unique(np.fromiter((word_id(w) for w in tokens(name)), dtype=np.int64))
    ids.setflags(write=False)
    return ids


def base_rate_logit(positives: int, n: int) -> float:
    """logit of the smoothed base rate (positives + ½)/(n + 1): finite even at 0 or n."""
    p = (positives + 0.5) / (n + 1.0)
    return math.log(p / (1.0 - p))


def word_matrix(names: Iterable[str]) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """(items × words binary incidence, the sorted word ids of its columns, one word per column)."""
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    first: dict[int, str] = {}
    for row, name in enumerate(names):
        for w in tokens(name):
            first.setdefault(word_id(w), w)
        ids = name_word_ids(str(name))
        rows.append(np.full(ids.size, row, dtype=np.int64))
        cols.append(ids)
    n = len(rows)
    ids = np.array(sorted(first), dtype=np.int64)
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.searchsorted(ids, np.concatenate(cols)) if cols else np.zeros(0, dtype=np.int64)
    inc = sp.csr_matrix((np.ones(r.size), (r, c)), shape=(n, ids.size))
    return inc, ids, [first[int(i)] for i in ids]


def _g(counts: np.ndarray) -> np.ndarray:
    """g(c) = 1 + ln c for c ≥ 1, 0 for c = 0 (sublinear term frequency)."""
    c = np.asarray(counts, dtype=np.float64)
    return np.where(c > 0, 1.0 + np.log(np.maximum(c, 1.0)), 0.0)


def sublinear(counts: sp.csr_matrix) -> sp.csr_matrix:
    """Rows g(c)/‖g(c)‖ of a users × words count matrix (zero rows stay zero)."""
    x = sp.csr_matrix(counts, dtype=np.float64, copy=True)
    x.data = _g(x.data)
    norm = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
    return (sp.diags(np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)) @ x).tocsr()


def user_word_features(graph: BipartiteGraph) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """(users × words features g(c_u)/‖g(c_u)‖ over distinct items, word ids, words)."""
    inc, ids, words = word_matrix(str(n) for n in graph.item_names)
    counts = (graph.weighted("binary") @ inc).tocsr()
    return sublinear(counts), ids, words


@njit(cache=True)
def _add_words(text: np.ndarray, m: int, add_ids: np.ndarray, add_c: np.ndarray, w_ids: np.ndarray,
               w_rows: np.ndarray) -> np.ndarray:  # pragma: no cover - compiled
    """`ItemChannel.add_text`'s merge: the sorted (id, count) pairs of `text` plus `add_c` of the
    sorted `add_ids`, and both sums moved by each changed word's g(c_new) − g(c_old)."""
    k = (text.size - m - 1) // 2
    ids, counts = text[m + 1:m + 1 + k], text[m + 1 + k:]
    merged_ids = np.empty(k + add_ids.size)
    merged_c = np.empty(k + add_ids.size)
    head = text[:m + 1].copy()
    i = j = n = 0
    while i < k or j < add_ids.size:
        if j == add_ids.size or (i < k and ids[i] < add_ids[j]):
            merged_ids[n], merged_c[n] = ids[i], counts[i]
            i += 1
        else:
            c0 = 0.0
            if i < k and ids[i] == add_ids[j]:
                c0 = counts[i]
                i += 1
            c1 = c0 + add_c[j]
            g0 = 1.0 + math.log(c0) if c0 > 0 else 0.0
            g1 = 1.0 + math.log(c1)
            head[m] += g1 * g1 - g0 * g0
            q = np.searchsorted(w_ids, add_ids[j])
            if q < w_ids.size and w_ids[q] == add_ids[j]:
                for p in range(m):
                    head[p] += (g1 - g0) * w_rows[q, p]
            merged_ids[n], merged_c[n] = add_ids[j], c1
            j += 1
        n += 1
    return np.concatenate((head, merged_ids[:n], merged_c[:n]))


@dataclass(frozen=True)
class ItemChannel:
    """text_logit = b + W·g(c)/‖g(c)‖ for any user's word counts c; `coef` is words × personas,
    `intercept` per persona."""

    words: tuple[str, ...]
    coef: np.ndarray
    intercept: np.ndarray
    # derived in __post_init__: the word ids sorted, as floats (the text state's form), and their W rows
    _ids: np.ndarray = field(init=False, repr=False, compare=False)
    _fids: np.ndarray = field(init=False, repr=False, compare=False)
    _rows: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        intercept = np.asarray(self.intercept, dtype=np.float64).ravel()
        # an explicit column count: a fit that keeps no words has a (0, m) weight matrix
        coef = np.asarray(self.coef, dtype=np.float64).reshape(len(self.words), intercept.size)
        if coef.shape[1] != intercept.size:
            raise ValueError(f"coef has {coef.shape[1]} personas, intercept {intercept.size}")
        if not (np.all(np.isfinite(coef)) and np.all(np.isfinite(intercept))):
            raise ValueError("item channel weights must be finite")
        ids = np.fromiter((word_id(w) for w in self.words), dtype=np.int64, count=len(self.words))
        order = np.argsort(ids, kind="stable")
        if np.any(np.diff(ids[order]) == 0):
            raise ValueError("item channel words must have distinct word ids")
        # float32 weights: the JSON form (base64 float32) then round-trips exactly and stays small
        coef = coef.astype("<f4").astype(np.float64)
        object.__setattr__(self, "coef", coef)
        object.__setattr__(self, "intercept", intercept)
        object.__setattr__(self, "_ids", ids[order])
        object.__setattr__(self, "_fids", ids[order].astype(np.float64))  # ids as the text state keeps them
        object.__setattr__(self, "_rows", np.ascontiguousarray(coef[order]))

    @property
    def n_personas(self) -> int:
        return int(self.intercept.size)

    def _weights(self, ids: np.ndarray) -> np.ndarray:
        """W rows of word ids (len(ids) × personas; zero for words without a weight)."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self._ids.size:
            return np.zeros((ids.size, self.n_personas))
        at = np.minimum(np.searchsorted(self._ids, ids), self._ids.size - 1)
        return np.where((self._ids[at] == ids)[:, None], self._rows[at], 0.0)

    def item_scores(self, names: Sequence[str]) -> np.ndarray:
        """s(v) = b + W·f(v) for each name (items × personas), f(v) its words at 1/√(#words):
        how much one item speaks for each persona (evidence; unknown words add 0)."""
        out = np.tile(self.intercept, (len(names), 1))
        for row, name in enumerate(names):
            ids = name_word_ids(str(name))
            if ids.size:
                out[row] += self._weights(ids).sum(axis=0) / math.sqrt(ids.size)
        return out

    def item_vectors(self, names: Sequence[str]) -> np.ndarray:
        """`item_scores` (kept under the name the worker's evidence cache calls)."""
        return self.item_scores(names)

    @property
    def width(self) -> int:
        """Columns of `item_vectors`."""
        return self.n_personas

    # -- the text state: a user's running word counts ------------------------------------------------
    def add_text(self, text: np.ndarray | None, names: Sequence[str]) -> np.ndarray:
        """A user's text state after buying the distinct items `names` (None: no item yet).

        The state is one float array [Σ_w W[w]·g(c_w) (personas), Σ_w g(c_w)², word ids, counts],
        ids sorted; `text_logit` reads it in O(personas). New items update the counts of their
        own words and add each changed word's g(c_new) − g(c_old) to the sums (a compiled merge,
        O(words of the user)), so the state equals the batch features up to rounding (1e-15),
        whatever the order of the items."""
        m = self.n_personas
        if not names and text is not None:
            return np.asarray(text, dtype=np.float64)
        if len(names) == 1:  # the stream's case: one new item, its ids already sorted and distinct
            add_ids = name_word_ids(str(names[0]))
            add_c = np.ones(add_ids.size)
        else:
            add_ids, counted = np.unique(np.concatenate([np.zeros(0, dtype=np.int64)]
                                                        + [name_word_ids(str(n)) for n in names]), return_counts=True)
            add_c = counted.astype(np.float64)
        text = np.zeros(m + 1) if text is None else np.asarray(text, dtype=np.float64)
        if text.size < m + 1 or (text.size - m - 1) % 2:
            raise ValueError(f"text state of {text.size} values does not fit {m} personas")
        return _add_words(text, m, add_ids.astype(np.float64), add_c, self._fids, self._rows)

    def text_logit(self, text: np.ndarray | None) -> np.ndarray:
        """The user's text logits (personas) from its text state: b + Σ W·g / ‖g‖ (b when empty)."""
        m = self.n_personas
        if text is None:
            return self.intercept.copy()
        text = np.asarray(text, dtype=np.float64)
        if text.size < m + 1:
            raise ValueError(f"text state of {text.size} values does not fit {m} personas")
        norm2 = text[m]
        return self.intercept + (text[:m] / math.sqrt(norm2) if norm2 > 0 else 0.0)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form for a Kafka table or a file: the weights as base64 of
        little-endian float32 (exact, about 4 bytes × words × personas × 4/3)."""
        return {"kind": "item_channel", "features": "sublinear_word_counts", "words": list(self.words),
                "coef_f32": base64.b64encode(self.coef.astype("<f4").tobytes()).decode("ascii"),
                "intercept": self.intercept.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ItemChannel:
        if d.get("kind") != "item_channel":
            raise ValueError("not an item channel dict (kind != 'item_channel')")
        if d.get("features") != "sublinear_word_counts":
            raise ValueError(f"item channel features {d.get('features')!r}: this version reads "
                             "'sublinear_word_counts' only (refit the model)")
        m = len(d["intercept"])
        try:
            raw = np.frombuffer(base64.b64decode(d["coef_f32"], validate=True), dtype="<f4")
            coef = raw.astype(np.float64).reshape(len(d["words"]), m)
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"item channel weights unreadable: {exc}") from None
        return cls(tuple(str(w) for w in d["words"]), coef, np.asarray(d["intercept"], dtype=np.float64))


def _label_matrix(prototypes: Mapping[int, Sequence[int]], n_personas: int) -> tuple[np.ndarray, np.ndarray]:
    users = np.fromiter(prototypes.keys(), dtype=np.int64, count=len(prototypes))
    y = np.zeros((users.size, n_personas), dtype=bool)
    for row, labels in enumerate(prototypes.values()):
        y[row, list(labels)] = True
    return users, y


def _fit(x: sp.csr_matrix, y: np.ndarray, C: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-persona L2-regularised logistic regressions on rows `x`: (coef features × personas,
    intercept).

    The objective is sklearn's (½‖w‖² + C Σ log-loss, intercept unpenalised). With n rows ≪
    features the optimum lies in the row space of x (representer theorem), so with
    x = U S Vᵀ the regression runs on the n-dimensional features U S with w = V β, solved by
    Newton's method with step halving: a few (n+1)² systems per persona. Deterministic.
    """
    n, m = y.shape
    coef = np.zeros((x.shape[1], m))
    pos = y.sum(axis=0)
    intercept = np.array([base_rate_logit(int(p), n) for p in pos], dtype=np.float64)
    fit = np.flatnonzero((pos >= 2) & (pos <= n - 2))
    if fit.size == 0:
        return coef, intercept
    gram = np.asarray((x @ x.T).todense()) if sp.issparse(x) else x @ x.T
    with threadpool_limits(1, user_api="blas"):  # small systems: BLAS threads only contend
        return _fit_kernel(x, y, C, gram, fit, coef, intercept)


def _fit_kernel(x: sp.csr_matrix, y: np.ndarray, C: float, gram: np.ndarray, fit: np.ndarray,
                coef: np.ndarray, intercept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = y.shape[0]
    evals, evecs = np.linalg.eigh(gram)
    keep = evals > 1e-10 * max(float(evals.max()), 1e-300)
    s = np.sqrt(evals[keep])
    design = np.hstack([evecs[:, keep] * s, np.ones((n, 1))])  # U S and the intercept column
    ridge = np.ones(design.shape[1])
    ridge[-1] = 0.0
    back = np.zeros((design.shape[1], fit.size))  # β per fitted persona, then w = xᵀ U S⁻¹ β
    for j, p in enumerate(fit):
        theta = np.zeros(design.shape[1])
        theta[-1] = intercept[p]
        back[:, j] = _newton_logistic(design, y[:, p].astype(np.float64), ridge / C, theta)
    coef[:, fit] = np.asarray(x.T @ (evecs[:, keep] / s) @ back[:-1])
    intercept[fit] = back[-1]
    return coef, intercept


def _newton_logistic(a: np.ndarray, y: np.ndarray, ridge: np.ndarray, theta: np.ndarray,
                     tol: float = 1e-10, max_iter: int = 100) -> np.ndarray:
    """argmin ½ Σ ridge_j θ_j² + Σ_i log-loss(y_i, a_i·θ) by damped Newton (strictly convex)."""

    def objective(t: np.ndarray) -> float:
        z = a @ t
        return 0.5 * float(ridge @ (t * t)) + float(np.sum(np.logaddexp(0.0, z) - y * z))

    value = objective(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (a @ theta)))
        grad = ridge * theta + a.T @ (p - y)
        hess = (a.T * (p * (1 - p))) @ a + np.diag(ridge) + 1e-12 * np.eye(theta.size)
        step = np.linalg.solve(hess, grad)
        rate = 1.0
        while True:
            trial = theta - rate * step
            new = objective(trial)
            if new <= value or rate < 1e-8:
                break
            rate *= 0.5
        theta, done = trial, value - new <= tol * max(1.0, abs(value))
        value = new
        if done:
            break
    return theta


Features = tuple[sp.csr_matrix, np.ndarray, list[str]]  # `user_word_features`


def fit_item_channel(
    graph: BipartiteGraph,
    prototypes: Mapping[int, Sequence[int]],
    n_personas: int,
    *,
    C: float = DEFAULT_C,
    features: Features | None = None,
) -> ItemChannel:
    """Fit the channel on the prototypes' labels and the words of the items they bought.

    `features` (`user_word_features(graph)`) may be passed to reuse them across refits.
    Deterministic.
    """
    if not prototypes:
        raise ValueError("the item channel needs at least one labeled prototype")
    if C <= 0:
        raise ValueError(f"C must be positive, got {C}")
    x, _, words = user_word_features(graph) if features is None else features
    users, y = _label_matrix(prototypes, n_personas)
    coef, intercept = _fit(x[users], y, C)
    kept = np.flatnonzero(np.any(coef != 0, axis=1))
    logger.debug("item channel: %d prototypes, %d of %d words kept", users.size, kept.size, len(words))
    return ItemChannel(tuple(words[j] for j in kept), coef[kept], intercept)


def user_text_logits(graph: BipartiteGraph, channel: ItemChannel, features: Features | None = None) -> np.ndarray:
    """Every user's text logits (users × personas): `channel.text_logit` of its text state, as a
    sparse product (the batch form of the stream's running counts). Users without purchases get
    the intercept (callers treat degree 0 as no text)."""
    x, ids, _ = user_word_features(graph) if features is None else features
    out: np.ndarray = np.asarray(x @ channel._weights(ids)) + channel.intercept
    return out


def out_of_fold_text_logits(
    graph: BipartiteGraph,
    prototypes: Mapping[int, Sequence[int]],
    n_personas: int,
    *,
    folds: int = 5,
    seed: int = 0,
    C: float = DEFAULT_C,
    features: Features | None = None,
) -> np.ndarray:
    """Text logits of the prototypes (rows in `prototypes` order) from channels fitted without
    them: K seeded folds, each scored by a channel fitted on the other K−1. This is what the
    decoder is calibrated on (an in-sample logit would be over-confident)."""
    x = (user_word_features(graph) if features is None else features)[0]
    users, y = _label_matrix(prototypes, n_personas)
    out = np.empty((users.size, n_personas))
    k = max(2, min(folds, users.size))
    fold = np.random.default_rng(seed).permutation(users.size) % k
    for f in range(k):
        test = fold == f
        if not test.any():
            continue
        coef, intercept = _fit(x[users[~test]], y[~test], C)
        out[test] = np.asarray(x[users[test]] @ coef) + intercept
    return out
