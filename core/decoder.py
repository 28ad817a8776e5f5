"""One calibrated persona decoder for batch and stream.

Why: reading the top-5 of Ψ gives every user five personas whatever the evidence and favours
the common personas; Ψ's scale also depends on degrees and density, so no absolute cut-off
transfers between shops. Instead, per persona m, a small logistic model turns two scale-free
channels into a calibrated probability

    p[u, m] = σ(a_m · [t[u, m], g[u, m], √g[u, m], z[u, m]] + b_m),

with t the item channel's text logit (sublinear counts of the words of the user's items,
`core.item_channel`),
g = Ψ_raw[u, m] / Σ_m' Ψ_raw[u, m'] the user's share of graph affinity and z the label-free
zero-shot channel (`core.zero_shot`: the log of the mean over the user's items of MiniLM's vote
for the persona's definition over its catalogue share; 0 for every user when the model has no
zero-shot channel, so its slope is then 0 and the decoder is the three-feature one). It is fitted on the
prototypes with leave-one-out graph scores (a prototype's own label is removed from its Ψ_raw,
exactly, by linearity: `core.affinity.self_return`) and out-of-fold text logits, because an
unlabeled user never sees its own label. A persona is decided when p ≥ its own threshold
(fitted per persona on the same held-out scores), best first, at most `max_personas`, at least
one; so a niche persona needs only to beat its own cut-off, not a global one. The default rule
("expected_f1") instead keeps, per user, the top-k that maximises the expected F1 of the set
given the calibrated p — a variable number of personas with no global cut-off at all. Because
a per-user optimum over-assigns the common personas, the fitted intercepts are finally shifted
part of the way towards the prototypes' persona prevalence (`match_prevalence`). The shift
decides *which* personas (the ranking); *how many* is still the expected-F1 optimum of the
calibrated, unshifted probabilities along that ranking — shifting the sizes too grew the sets
(4.37 vs 4.20 personas on Online Retail) and cost validation F1 at the same prevalence TV.

A user with neither channel (no purchase and no prototype in reach) gets the prior — the
prototypes' base rates — through `with_prior`, the same fallback `core.gplr.assign_personas`
uses.

Batch calls `PersonaDecoder.decide` on matrices, the stream `PersonaModel.decide_user` on one
user's (Ψ_raw row, text state, degree[, zero-shot state]) — the same formula on the same
features; the fitted model is JSON-able (`to_dict`).
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from core.affinity import exact_affinity, prototype_matrix, self_return
from core.graph import BipartiteGraph, EdgeWeight
from core.incremental import PersonaSnapshot, with_prior
from core.item_channel import (
    DEFAULT_C,
    Features,
    ItemChannel,
    fit_item_channel,
    out_of_fold_text_logits,
    user_text_logits,
    user_word_features,
)
from core.zero_shot import ZeroShotChannel

__all__ = [
    "FEATURES",
    "RULES",
    "Rule",
    "PersonaDecoder",
    "PersonaModel",
    "graph_share",
    "decoder_features",
    "with_prior",
    "select_personas",
    "fit_thresholds",
    "fit_decoder",
    "match_prevalence",
    "DEFAULT_RULE",
    "PREVALENCE_MATCH",
    "loo_psi_raw",
    "fit_persona_model",
    "ZERO_SHOT",
]

logger = logging.getLogger(__name__)

FEATURES = ("text_logit", "graph_share", "sqrt_graph_share", "zero_shot")
LEGACY_FEATURES = FEATURES[:3]  # a decoder stored before the zero-shot channel
Rule = Literal["f1", "prevalence", "expected_f1"]
RULES: tuple[str, ...] = ("f1", "prevalence", "expected_f1")
NEVER = 2.0  # threshold of a persona no prototype has: no probability reaches it
#: Decision rule and prevalence-matching strength of `gplr label` and the stream, chosen on
#: Online Retail's validation split (bench/persona_quality.py, docs/RESULTS.md §2b).
DEFAULT_RULE = "expected_f1"
PREVALENCE_MATCH = 0.55
ZERO_SHOT = True  # `gplr label` adds the label-free zero-shot channel (core.zero_shot)
DECODER_C = 100.0  # features are O(0.1) shares: weak regularisation (C=1 flattened the graph channel)
MAX_PERSONAS = 5


# -- features ------------------------------------------------------------------------------------
def graph_share(psi_raw: np.ndarray) -> np.ndarray:
    """Ψ_raw rows divided by their sums (scale-free); rows no prototype reaches stay 0."""
    psi = np.atleast_2d(np.asarray(psi_raw, dtype=np.float64))
    sums = psi.sum(axis=1, keepdims=True)
    share: np.ndarray = np.divide(psi, sums, out=np.zeros_like(psi), where=sums > 0)
    return share


def _channels(psi_raw: np.ndarray, text_logit: np.ndarray, zero_shot: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clipped text logits, graph shares, zero-shot features — 0 when None), users × personas."""
    g = graph_share(psi_raw)
    t = np.clip(np.atleast_2d(np.asarray(text_logit, dtype=np.float64)), -20.0, 20.0)
    if t.shape != g.shape:
        raise ValueError(f"text logits {t.shape} and Ψ_raw {g.shape} differ in shape")
    z = np.zeros_like(g) if zero_shot is None else np.atleast_2d(np.asarray(zero_shot, dtype=np.float64))
    if z.shape != g.shape:
        raise ValueError(f"zero-shot features {z.shape} and Ψ_raw {g.shape} differ in shape")
    return t, g, z


def decoder_features(psi_raw: np.ndarray, text_logit: np.ndarray, zero_shot: np.ndarray | None = None
                     ) -> np.ndarray:
    """users × personas × FEATURES."""
    t, g, z = _channels(psi_raw, text_logit, zero_shot)
    return np.stack([t, g, np.sqrt(g), z], axis=2)


def _no_evidence(psi_raw: np.ndarray, degree: np.ndarray) -> np.ndarray:
    """Users with no purchase and no prototype in reach (they get the prior)."""
    degree = np.atleast_1d(np.asarray(degree))
    empty: np.ndarray = (degree <= 0) & ~(np.atleast_2d(psi_raw) > 0).any(axis=1)
    return empty


# -- the decision rule ---------------------------------------------------------------------------
def select_personas(probs: np.ndarray, thresholds: np.ndarray | None, max_personas: int = MAX_PERSONAS,
                    rule: str = "f1", size_probs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(idx, scores), users × max_personas, padded with -1 / 0: the decided personas, best first.

    Threshold rules keep personas with p ≥ their threshold; "expected_f1" keeps the top-k that
    maximises the user's expected F1, 2·Σ_{j≤k} q_j / (k + Σ_j q_j), with q = `size_probs`
    (default `probs`) read along the order of `probs`: `probs` decide which personas, `size_probs`
    how many. Either way at least one persona (the most probable) and at most `max_personas`;
    ties go to the lower persona index.
    """
    p = np.atleast_2d(np.asarray(probs, dtype=np.float64))
    n, m = p.shape
    k = min(max_personas, m)
    if k < 1:
        raise ValueError(f"max_personas must be at least 1, got {max_personas}")
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]  # stable: ties keep the lower index first
    top = np.take_along_axis(p, order, axis=1)
    if rule == "expected_f1":
        q = p if size_probs is None else np.atleast_2d(np.asarray(size_probs, dtype=np.float64))
        if q.shape != p.shape:
            raise ValueError(f"size probabilities {q.shape} differ from probabilities {p.shape}")
        gain = 2 * np.cumsum(np.take_along_axis(q, order, axis=1), axis=1) / (
            np.arange(1, k + 1) + q.sum(axis=1, keepdims=True))
        keep = np.arange(k) <= gain.argmax(axis=1)[:, None]
    elif rule in ("f1", "prevalence"):
        if thresholds is None:
            raise ValueError(f"rule {rule!r} needs per-persona thresholds")
        keep = top >= np.asarray(thresholds, dtype=np.float64)[order]
        keep[:, 0] = True
    else:
        raise ValueError(f"unknown decision rule {rule!r}; choose from {RULES}")
    keep &= top > 0
    if k > 1 and np.any(keep[:, 1:] > keep[:, :-1]):  # a gap: kept personas first, still best first
        first = np.argsort(~keep, axis=1, kind="stable")
        keep = np.take_along_axis(keep, first, axis=1)
        order, top = np.take_along_axis(order, first, axis=1), np.take_along_axis(top, first, axis=1)
    return np.where(keep, order, -1), np.where(keep, top, 0.0)


def fit_thresholds(probs: np.ndarray, y: np.ndarray, rule: str = "f1") -> np.ndarray:
    """Per-persona thresholds on held-out probabilities of labeled users.

    "f1": the cut maximising that persona's F1 over the prototypes (the lowest such cut);
    "prevalence": the cut at which as many prototypes pass as carry the persona. A persona no
    prototype carries gets `NEVER`.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y, dtype=bool)
    if p.shape != y.shape or p.ndim != 2:
        raise ValueError(f"probabilities {p.shape} and labels {y.shape} must be equal 2-d shapes")
    out = np.full(p.shape[1], NEVER)
    for m in range(p.shape[1]):
        pos = int(y[:, m].sum())
        if pos == 0:
            continue
        order = np.argsort(-p[:, m], kind="stable")
        ps, ys = p[order, m], y[order, m]
        if rule == "prevalence":
            out[m] = ps[pos - 1]
            continue
        if rule != "f1":
            raise ValueError(f"thresholds are fitted for 'f1' or 'prevalence', not {rule!r}")
        last = np.r_[ps[1:] != ps[:-1], True]  # a cut keeps all of a tied group or none of it
        tp = np.cumsum(ys)[last]
        kept = np.flatnonzero(last) + 1
        f1 = 2 * tp / (kept + pos)
        out[m] = ps[last][f1.size - 1 - int(np.argmax(f1[::-1]))]  # the lowest of equally good cuts
    return out


@dataclass(frozen=True)
class PersonaDecoder:
    """Fitted per-persona rule: p = σ(coef[m]·features + intercept[m]), decide p ≥ thresholds[m].

    `shift` is the part of `intercept` that prevalence matching added (`match_prevalence`): the
    "expected_f1" rule ranks personas by p but sizes the set on the calibrated σ(logit − shift).
    """

    coef: np.ndarray
    intercept: np.ndarray
    thresholds: np.ndarray
    prior: np.ndarray
    max_personas: int = MAX_PERSONAS
    rule: str = "f1"
    shift: np.ndarray = field(default_factory=lambda: np.zeros(0))  # empty: no shift

    def __post_init__(self) -> None:
        m = np.asarray(self.intercept).size
        if np.asarray(self.shift).size == 0:
            object.__setattr__(self, "shift", np.zeros(m))
        coef = np.asarray(self.coef, dtype=np.float64)
        if coef.shape == (m, len(LEGACY_FEATURES)):  # no zero-shot slope given: 0
            object.__setattr__(self, "coef", np.hstack([coef, np.zeros((m, 1))]))
        for name, shape in (("coef", (m, len(FEATURES))), ("intercept", (m,)), ("thresholds", (m,)),
                            ("prior", (m,)), ("shift", (m,))):
            value = np.asarray(getattr(self, name), dtype=np.float64).reshape(shape)
            if not np.all(np.isfinite(value)):
                raise ValueError(f"decoder {name} must be finite")
            object.__setattr__(self, name, value)
        if self.rule not in RULES:
            raise ValueError(f"unknown decision rule {self.rule!r}; choose from {RULES}")
        if self.max_personas < 1:
            raise ValueError("max_personas must be at least 1")

    @property
    def n_personas(self) -> int:
        return int(self.intercept.size)

    def logits(self, psi_raw: np.ndarray, text_logit: np.ndarray, zero_shot: np.ndarray | None = None
               ) -> np.ndarray:
        """z[u, m] = coef[m]·features[u, m] + intercept[m] (one formula for batch and stream)."""
        t, g, zs = _channels(psi_raw, text_logit, zero_shot)
        c = self.coef
        z: np.ndarray = t * c[:, 0] + g * c[:, 1] + np.sqrt(g) * c[:, 2] + zs * c[:, 3] + self.intercept
        return z

    def probabilities(self, psi_raw: np.ndarray, text_logit: np.ndarray, degree: np.ndarray,
                      shifted: bool = True, zero_shot: np.ndarray | None = None) -> np.ndarray:
        """p[u, m] in [0, 1] (with the prevalence shift; `shifted=False`: the calibrated ones);
        users with no purchase and no affinity get the prior."""
        z = self.logits(psi_raw, text_logit, zero_shot)
        return self._with_prior(z if shifted else z - self.shift, _no_evidence(psi_raw, degree))

    def _with_prior(self, z: np.ndarray, empty: np.ndarray) -> np.ndarray:
        """σ(z), the prior on rows `empty`."""
        return with_prior(1.0 / (1.0 + np.exp(-z)), self.prior, empty)

    def _select(self, z: np.ndarray, empty: np.ndarray, delta: np.ndarray | float = 0.0
                ) -> tuple[np.ndarray, np.ndarray]:
        """`select_personas` of logits z (+ a further shift δ): ranked by σ(z + δ), sized (expected
        F1) on the calibrated σ(z − shift); rows `empty` get the prior."""
        size = self._with_prior(z - self.shift, empty) if self.rule == "expected_f1" else None
        return select_personas(self._with_prior(z + delta, empty), self.thresholds, self.max_personas, self.rule,
                               size)

    def decide(self, psi_raw: np.ndarray, text_logit: np.ndarray, degree: np.ndarray,
               zero_shot: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectorised: (idx, scores), users × max_personas, best first, -1 / 0 padded; scores are
        the shifted probabilities the personas were ranked by."""
        return self._select(self.logits(psi_raw, text_logit, zero_shot), _no_evidence(psi_raw, degree))

    def decide_one(self, psi_raw: np.ndarray, text_logit: np.ndarray, degree: int,
                   zero_shot: np.ndarray | None = None) -> PersonaSnapshot:
        """One user's persona snapshot (the stream worker's call)."""
        zs = None if zero_shot is None else np.asarray(zero_shot, dtype=np.float64)[None, :]
        idx, scores = self.decide(np.asarray(psi_raw, dtype=np.float64)[None, :],
                                  np.asarray(text_logit, dtype=np.float64)[None, :], np.array([degree]), zs)
        keep = idx[0] >= 0
        return PersonaSnapshot(tuple(int(i) for i in idx[0][keep]), tuple(float(s) for s in scores[0][keep]))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "persona_decoder", "features": list(FEATURES), "coef": self.coef.tolist(),
                "intercept": self.intercept.tolist(), "thresholds": self.thresholds.tolist(),
                "prior": self.prior.tolist(), "max_personas": int(self.max_personas), "rule": self.rule,
                "shift": self.shift.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PersonaDecoder:
        if d.get("kind") != "persona_decoder":
            raise ValueError("not a persona decoder dict (kind != 'persona_decoder')")
        coef = np.asarray(d["coef"], dtype=np.float64)  # stored before the zero-shot channel: 3 columns
        if list(d.get("features", [])) not in (list(FEATURES), list(LEGACY_FEATURES)):
            raise ValueError(f"decoder features {d.get('features')} differ from this version's {list(FEATURES)}")
        return cls(coef, np.asarray(d["intercept"]), np.asarray(d["thresholds"]),
                   np.asarray(d["prior"]), int(d["max_personas"]), str(d["rule"]),
                   np.asarray(d.get("shift", [])))  # a decoder stored before the shift: none


def fit_decoder(
    psi_raw: np.ndarray,
    text_logit: np.ndarray,
    y: np.ndarray,
    *,
    rule: str = "f1",
    max_personas: int = MAX_PERSONAS,
    C: float = DECODER_C,
    per_persona: bool = False,
    zero_shot: np.ndarray | None = None,
) -> PersonaDecoder:
    """Fit the decoder on labeled users' held-out scores (rows: prototypes).

    `psi_raw` must be leave-one-out (`loo_psi_raw`) and `text_logit` out-of-fold; `zero_shot`
    (the prototypes' `core.zero_shot` features; label-free, so in-sample) may be None: its
    slope is then 0. The slopes
    are shared by all personas (pooled over prototype × persona pairs, with a persona's own
    intercept) unless `per_persona`, where a persona with at least 5 positives gets its own.
    """
    y = np.asarray(y, dtype=bool)
    x = decoder_features(psi_raw, text_logit, zero_shot)
    n, m, f = x.shape
    if y.shape != (n, m):
        raise ValueError(f"labels {y.shape} do not match scores {(n, m)}")
    if rule not in RULES:
        raise ValueError(f"unknown decision rule {rule!r}; choose from {RULES}")
    prior = (y.sum(axis=0) + 0.5) / (n + 1.0)
    onehot = np.tile(np.eye(m), (n, 1))
    design = np.hstack([x.reshape(n * m, f), onehot])
    target = y.reshape(n * m)
    coef = np.zeros((m, f))
    intercept = np.log(prior / (1 - prior))
    if 0 < target.sum() < target.size:
        from sklearn.linear_model import LogisticRegression  # sklearn only when fitting

        model = LogisticRegression(C=C, fit_intercept=False, max_iter=5000).fit(design, target)
        coef[:] = model.coef_[0, :f]
        intercept = model.coef_[0, f:].copy()
        # a persona with no positive (or no negative) prototype: its intercept alone is unbounded
        pos = y.sum(axis=0)
        flat = (pos == 0) | (pos == n)
        intercept[flat] = np.log(prior[flat] / (1 - prior[flat])) - x[:, flat, :].mean(axis=0) @ coef[0]
        if per_persona:
            for j in np.flatnonzero((pos >= 5) & (pos <= n - 5)):
                own = LogisticRegression(C=C, max_iter=5000).fit(x[:, j, :], y[:, j])
                coef[j], intercept[j] = own.coef_[0], own.intercept_[0]
    dec = PersonaDecoder(coef, intercept, np.zeros(m), prior, max_personas, rule)
    probs = dec.probabilities(psi_raw, text_logit, np.ones(n), zero_shot=zero_shot)
    thresholds = np.zeros(m) if rule == "expected_f1" else fit_thresholds(probs, y, rule)
    return PersonaDecoder(coef, intercept, thresholds, prior, max_personas, rule)


def match_prevalence(decoder: PersonaDecoder, psi_raw: np.ndarray, text_logit: np.ndarray, degree: np.ndarray,
                     strength: float = 0.5, iters: int = 30, zero_shot: np.ndarray | None = None
                     ) -> PersonaDecoder:
    """The decoder with its intercepts shifted so that its decisions over these (unlabeled)
    users move towards the prototypes' persona prevalence; `strength` in [0, 1] is the share of
    the full matching shift applied (0: unchanged, 1: prevalence matched).

    Why: a per-user F1-optimal rule over-assigns the common personas (every user "probably" has
    them), which makes many users' sets identical and under-serves the mid-frequency ones. The
    full shift δ solves decided-share(m) = π_m · (mean set size / Σπ) by a damped fixed point
    (δ += ½·log(target / share)); only the labels' shape is matched, not the set size.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if strength == 0.0 or np.asarray(psi_raw).shape[0] == 0:
        return decoder
    z = decoder.logits(psi_raw, text_logit, zero_shot)
    empty = _no_evidence(psi_raw, degree)
    pi = decoder.prior
    delta = np.zeros_like(pi)
    for _ in range(iters):
        idx, _ = decoder._select(z, empty, delta)
        share = np.bincount(idx[idx >= 0], minlength=pi.size) / idx.shape[0]
        target = pi * share.sum() / pi.sum()
        delta += 0.5 * (np.log(target + 1e-3) - np.log(share + 1e-3))
    return PersonaDecoder(decoder.coef, decoder.intercept + strength * delta, decoder.thresholds, decoder.prior,
                          decoder.max_personas, decoder.rule, decoder.shift + strength * delta)


# -- fitting from a graph ------------------------------------------------------------------------
def loo_psi_raw(graph: BipartiteGraph, prototypes: Mapping[int, Sequence[int]], n_personas: int,
                psi_raw: np.ndarray | None = None, hops: int = 1, weight: EdgeWeight = "binary") -> np.ndarray:
    """Ψ_raw of each prototype (rows in `prototypes` order) with its own label removed — equal to
    recomputing Ψ_raw without that prototype, by linearity (`self_return`)."""
    users = np.fromiter(prototypes.keys(), dtype=np.int64, count=len(prototypes))
    phi = prototype_matrix(graph.n_users, prototypes, n_personas)
    if psi_raw is None:
        psi_raw = exact_affinity(graph, phi, hops, weight)
    own = phi[users] / np.maximum(phi[users].sum(axis=1, keepdims=True), 1e-300)
    loo = np.asarray(psi_raw)[users] - self_return(graph, users, hops, weight)[:, None] * own
    out: np.ndarray = np.maximum(loo, 0.0)  # rounding may leave -1e-17
    return out


@dataclass(frozen=True)
class PersonaModel:
    """Item channel + decoder (+ the zero-shot channel, when fitted with one): everything needed
    to decide a user's personas from Ψ_raw."""

    channel: ItemChannel
    decoder: PersonaDecoder
    zero_shot: ZeroShotChannel | None = None

    def text_logits(self, graph: BipartiteGraph, features: Features | None = None) -> np.ndarray:
        """Every user's text logits (`core.item_channel.user_text_logits`)."""
        return user_text_logits(graph, self.channel, features)

    def item_vectors(self, names: Sequence[str]) -> np.ndarray:
        """Per-item text scores s(v) (`ItemChannel.item_scores`): the stream's evidence."""
        return self.channel.item_vectors(names)

    def add_text(self, text: np.ndarray | None, names: Sequence[str]) -> np.ndarray:
        """A user's text state after the new distinct items `names` (None: no item yet): the item
        channel's (`ItemChannel.add_text`), preceded, when the model has a zero-shot channel, by
        its running state [Σ s(v) (personas), n] (`ZeroShotChannel.add_items`) — one float array,
        so a stream row keeps both channels where it kept the text state."""
        if self.zero_shot is None:
            return self.channel.add_text(text, names)
        zs, words = self._split(text)
        return np.concatenate([self.zero_shot.add_items(zs, names), self.channel.add_text(words, names)])

    def _split(self, text: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(zero-shot state, item-channel state) of a combined text state (`add_text`)."""
        if text is None:
            return None, None
        head = self.decoder.n_personas + 1
        text = np.asarray(text, dtype=np.float64)
        if text.size < head:
            raise ValueError(f"text state of {text.size} values has no zero-shot state")
        return text[:head], text[head:]

    def zero_shot_features(self, graph: BipartiteGraph) -> np.ndarray | None:
        """Every user's zero-shot features (`ZeroShotChannel.user_features`); None without the channel."""
        return None if self.zero_shot is None else self.zero_shot.user_features(graph)

    def decide_user(self, psi_raw: np.ndarray, text: np.ndarray | None, degree: int) -> PersonaSnapshot:
        """The stream worker's call: one user's snapshot from its Ψ_raw row, its text state
        (`add_text` over its distinct items) and its number of distinct items."""
        if self.zero_shot is None:
            return self.decoder.decide_one(psi_raw, self.channel.text_logit(text), degree)
        zs, words = self._split(text)
        return self.decoder.decide_one(psi_raw, self.channel.text_logit(words), degree, self.zero_shot.feature(zs))

    def decide(self, graph: BipartiteGraph, psi_raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every user's (idx, scores) from the exact Ψ_raw of the graph."""
        return self.decoder.decide(psi_raw, self.text_logits(graph), graph.user_degree,
                                   self.zero_shot_features(graph))

    def probabilities(self, graph: BipartiteGraph, psi_raw: np.ndarray) -> np.ndarray:
        return self.decoder.probabilities(psi_raw, self.text_logits(graph), graph.user_degree,
                                          zero_shot=self.zero_shot_features(graph))

    def to_dict(self) -> dict[str, Any]:
        out = {"kind": "persona_model", "channel": self.channel.to_dict(), "decoder": self.decoder.to_dict()}
        if self.zero_shot is not None:  # the catalogue that votes for any name, not per-item lifts
            out["zero_shot"] = self.zero_shot.shipped().to_dict()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PersonaModel:
        if d.get("kind") != "persona_model":
            raise ValueError("not a persona model dict (kind != 'persona_model')")
        zs = d.get("zero_shot")
        return cls(ItemChannel.from_dict(d["channel"]), PersonaDecoder.from_dict(d["decoder"]),
                   None if zs is None else ZeroShotChannel.from_dict(zs))


def fit_persona_model(
    graph: BipartiteGraph,
    prototypes: Mapping[int, Sequence[int]],
    n_personas: int,
    psi_raw: np.ndarray | None = None,
    *,
    hops: int = 1,
    weight: EdgeWeight = "binary",
    folds: int = 5,
    seed: int = 0,
    text_C: float = DEFAULT_C,
    decoder_C: float = DECODER_C,
    rule: str = DEFAULT_RULE,
    max_personas: int = MAX_PERSONAS,
    per_persona: bool = False,
    prevalence: float = PREVALENCE_MATCH,
    zero_shot: ZeroShotChannel | None = None,
) -> PersonaModel:
    """Fit the item channel on all prototypes and the decoder on their held-out scores, then
    shift it `prevalence` of the way towards the prototypes' persona prevalence over the
    graph's other users (`match_prevalence`). With a `zero_shot` channel (`core.zero_shot`,
    label-free, fixed) its user features are the decoder's fourth feature.

    `psi_raw` is the exact, not de-biased Ψ_raw of all users for these prototypes (computed
    when omitted). Deterministic given the prototypes and `seed` (the fold split).
    """
    if not prototypes:
        raise ValueError("the persona model needs at least one labeled prototype")
    features = user_word_features(graph)
    channel = fit_item_channel(graph, prototypes, n_personas, C=text_C, features=features)
    text_oof = out_of_fold_text_logits(graph, prototypes, n_personas, folds=folds, seed=seed, C=text_C,
                                       features=features)
    psi_loo = loo_psi_raw(graph, prototypes, n_personas, psi_raw, hops, weight)
    y = prototype_matrix(len(prototypes), dict(enumerate(prototypes.values())), n_personas) > 0
    users = np.fromiter(prototypes, dtype=np.int64, count=len(prototypes))
    if zero_shot is not None and zero_shot.n_personas != n_personas:
        raise ValueError(f"the zero-shot channel has {zero_shot.n_personas} personas, not {n_personas}")
    zs = None if zero_shot is None else zero_shot.user_features(graph)
    decoder = fit_decoder(psi_loo, text_oof, y, rule=rule, max_personas=max_personas, C=decoder_C,
                          per_persona=per_persona, zero_shot=None if zs is None else zs[users])
    if prevalence > 0:
        if psi_raw is None:
            psi_raw = exact_affinity(graph, prototype_matrix(graph.n_users, prototypes, n_personas), hops, weight)
        rest = np.setdiff1d(np.arange(graph.n_users), users)
        text = user_text_logits(graph, channel, features)
        decoder = match_prevalence(decoder, np.asarray(psi_raw)[rest], text[rest], graph.user_degree[rest],
                                   prevalence, zero_shot=None if zs is None else zs[rest])
    return PersonaModel(channel, decoder, zero_shot)
