"""GPLR (paper Algorithm 1): label a small budget of prototype users with an LLM, propagate.

Rounds: the first round picks prototypes at random (seeded); each later round recomputes the
affinity Ψ from the labels so far and picks the users with the highest DU score (Eq. 1), or
random ones again for the ablation (`sampling="random"`). The final assignment keeps the
prototypes' own labels and gives everyone else

* `decoder="model"` (what `gplr label` and the stream use): the calibrated decoder of
  `core.decoder` over the graph share of Ψ_raw and the item–persona channel
  (`core.item_channel`), 1..k personas per user;
* `decoder="graph"` (the paper, this function's default): the top personas of Ψ
  (`assign_personas`);
* `decoder="words"`: word classifiers trained on the same prototypes (`core.word_personas`).

Budget accounting: the budget counts label *requests*. A user whose request failed (error or
no persona left after dropping names outside the set) spent its request, is never asked
again, is reported in `GPLRResult.failed`, and is assigned from Ψ like any unlabeled user.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from core.affinity import compute_affinity, debias_weights, label_distribution, prototype_matrix, top_personas
from core.decoder import DEFAULT_RULE, PREVALENCE_MATCH, RULES, PersonaModel, fit_persona_model, with_prior
from core.du import du_scores, select_du
from core.graph import BipartiteGraph, EdgeWeight
from core.labelers import histories_for
from core.labelers.base import Labeler, LabelResult
from core.personas import PersonaSet
from core.zero_shot import ZeroShotChannel, zero_shot_channel

__all__ = [
    "Assignment",
    "GPLRResult",
    "RoundInfo",
    "Progress",
    "assign_personas",
    "with_prototypes",
    "resolve_budget",
    "score_sets",
    "round_sizes",
    "run_gplr",
]

logger = logging.getLogger(__name__)

Sampling = Literal["du", "random"]
Method = Literal["exact", "revaff"]
Decoder = Literal["model", "graph", "words"]
DECODERS: tuple[str, ...] = ("model", "graph", "words")
#: progress(stage, done, total): stage is e.g. "round 2/5: labeling" or "affinity".
Progress = Callable[[str, int, int], None]

LABEL_BATCH = 32  # users per labeler call, so progress moves while an LLM works


@dataclass(frozen=True)
class Assignment:
    """Personas per user as a padded matrix: `idx[u, j]` is the j-th persona (-1 = none)."""

    idx: np.ndarray
    scores: np.ndarray
    llm_labelled: np.ndarray

    def personas_of(self, user: int) -> tuple[int, ...]:
        row = self.idx[user]
        return tuple(int(p) for p in row[row >= 0])

    def scores_of(self, user: int) -> tuple[float, ...]:
        row = self.idx[user]
        return tuple(float(s) for s in self.scores[user][row >= 0])

    def counts(self) -> np.ndarray:
        """Number of personas each user received."""
        counts: np.ndarray = (self.idx >= 0).sum(axis=1)
        return counts

    def as_matrix(self, n_personas: int) -> np.ndarray:
        """Boolean users × personas membership matrix."""
        out = np.zeros((self.idx.shape[0], n_personas), dtype=bool)
        rows, cols = np.nonzero(self.idx >= 0)
        out[rows, self.idx[rows, cols]] = True
        return out


@dataclass(frozen=True)
class RoundInfo:
    round: int
    sampling: str
    requested: int
    labeled: int
    failed: int
    q_hat: np.ndarray
    seconds: float


@dataclass
class GPLRResult:
    """`psi` is the graph affinity Ψ; `scores` what the assignment was read from (the persona
    model's calibrated probabilities, Ψ itself, or the word decoder's probabilities); `model`
    the fitted `core.decoder.PersonaModel` when `decoder="model"` (the stream can load it)."""

    psi: np.ndarray
    q_hat: np.ndarray
    prototypes: dict[int, tuple[int, ...]]
    failed: dict[int, str]
    assignment: Assignment
    labeler_stats: dict[str, int]
    rounds: list[RoundInfo] = field(default_factory=list)
    dropped_names: dict[str, int] = field(default_factory=dict)
    scores: np.ndarray | None = None
    model: PersonaModel | None = None


def score_sets(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Precision, recall and F1 of predicted persona sets against true ones (bool users × personas).

    `precision`/`recall`/`f1` average per user (a user with no hit scores 0; the paper's
    F1@k); `micro_*` pool all users' hits; `macro_f1` averages per-persona F1 over the
    personas that occur in `truth` or `pred`.
    """
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from truth {truth.shape}")
    if pred.shape[0] == 0:
        raise ValueError("no users to score")
    tp_u = (pred & truth).sum(axis=1)
    p_u = tp_u / np.maximum(pred.sum(axis=1), 1)
    r_u = tp_u / np.maximum(truth.sum(axis=1), 1)
    f_u = np.divide(2 * p_u * r_u, p_u + r_u, out=np.zeros_like(p_u), where=tp_u > 0)
    tp, n_pred, n_true = int(tp_u.sum()), int(pred.sum()), int(truth.sum())
    micro_p, micro_r = tp / max(n_pred, 1), tp / max(n_true, 1)
    tp_m = (pred & truth).sum(axis=0)
    denom = pred.sum(axis=0) + truth.sum(axis=0)
    seen = denom > 0
    return {
        "precision": float(p_u.mean()),
        "recall": float(r_u.mean()),
        "f1": float(f_u.mean()),
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": 0.0 if tp == 0 else 2 * micro_p * micro_r / (micro_p + micro_r),
        "macro_f1": float(np.mean(2 * tp_m[seen] / denom[seen])) if seen.any() else 0.0,
        "users": int(pred.shape[0]),
    }


def resolve_budget(budget: float | int, n_users: int) -> int:
    """A fraction in (0, 1) of the users (at least one) or an absolute count, capped at n."""
    if isinstance(budget, bool) or budget <= 0:
        raise ValueError(f"budget must be positive, got {budget!r}")
    if isinstance(budget, float) and budget <= 1.0:
        return min(n_users, max(1, math.ceil(budget * n_users - 1e-9)))
    if float(budget) != int(budget):
        raise ValueError(f"an absolute budget must be a whole number, got {budget!r}")
    return min(n_users, int(budget))


def round_sizes(total: int, rounds: int) -> list[int]:
    """Split `total` requests over `rounds` as evenly as possible, earlier rounds first."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    base, extra = divmod(total, rounds)
    return [base + (1 if r < extra else 0) for r in range(rounds)]


def assign_personas(
    psi: np.ndarray,
    k: int = 5,
    *,
    adaptive: float | None = None,
    min_score: float | None = None,
    min_k: int = 1,
    prototypes: Mapping[int, Sequence[int]] | None = None,
    prior: np.ndarray | None = None,
) -> Assignment:
    """Personas for every user from Ψ; prototypes keep their own labels.

    Fixed mode gives each user the `k` (at most |R|) highest-scoring personas with a positive score.
    Adaptive mode (`adaptive=r` in (0, 1]) keeps those scoring at least `r` × the row's best,
    at least `min_k` and at most `k` of them — the LLM itself gives a varying number.
    `min_score` is an absolute cut of the same kind (for calibrated probabilities, e.g. from
    `core.word_personas`); with both, a persona must pass both.
    A user with an all-zero row (no prototype reaches them) gets the top of `prior` (e.g. Q̂,
    the label distribution) when one is given, otherwise nothing.
    """
    psi = np.asarray(psi, dtype=np.float64)
    n_users, n_personas = psi.shape
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    k = min(k, n_personas)  # a persona set smaller than k: everyone may get all of them
    if adaptive is not None and not 0.0 < adaptive <= 1.0:
        raise ValueError(f"adaptive ratio must be in (0, 1], got {adaptive}")
    scores_src = psi if prior is None else with_prior(psi, prior, np.asarray(~(psi > 0).any(axis=1)))
    idx, scores = top_personas(scores_src, k)
    idx = np.asarray(idx, dtype=np.int64).copy()
    scores = np.asarray(scores, dtype=np.float64).copy()
    keep = scores > 0
    if adaptive is not None:
        keep &= scores >= adaptive * scores[:, :1]
    if min_score is not None:
        keep &= scores >= min_score
    if adaptive is not None or min_score is not None:
        keep[:, : max(1, min_k)] |= scores[:, : max(1, min_k)] > 0
    idx[~keep] = -1
    scores[~keep] = 0.0
    return with_prototypes(idx, scores, psi, prototypes)


def with_prototypes(idx: np.ndarray, scores: np.ndarray, source: np.ndarray,
                    prototypes: Mapping[int, Sequence[int]] | None) -> Assignment:
    """An `Assignment` of decided personas (`idx`/`scores`, -1 padded) in which prototypes keep
    their own labels (scored by `source`, the matrix the decision was read from)."""
    prototypes = dict(prototypes or {})
    n_users, k = idx.shape
    width = max([k] + [len(v) for v in prototypes.values()])
    idx = np.asarray(idx, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    if width > k:
        idx = np.pad(idx, ((0, 0), (0, width - k)), constant_values=-1)
        scores = np.pad(scores, ((0, 0), (0, width - k)))
    else:
        idx, scores = idx.copy(), scores.copy()
    labeled = np.zeros(n_users, dtype=bool)
    for u, personas in prototypes.items():
        labels = np.asarray(personas, dtype=np.int64)
        idx[u] = -1
        scores[u] = 0.0
        idx[u, : labels.size] = labels
        scores[u, : labels.size] = source[u, labels]
        labeled[u] = True
    return Assignment(idx, scores, labeled)


def _label_users(
    graph: BipartiteGraph,
    labeler: Labeler,
    users: np.ndarray,
    stage: str,
    progress: Progress | None,
) -> tuple[dict[int, tuple[int, ...]], dict[int, str], dict[str, int]]:
    """Ask the labeler about `users` in batches; split the answers into labels and failures."""
    labels: dict[int, tuple[int, ...]] = {}
    failed: dict[int, str] = {}
    dropped: dict[str, int] = {}
    if progress:
        progress(stage, 0, len(users))
    for start in range(0, len(users), LABEL_BATCH):
        batch = users[start : start + LABEL_BATCH]
        try:
            results = labeler.label(histories_for(graph, batch))
            if len(results) != len(batch):
                raise RuntimeError(f"returned {len(results)} results for {len(batch)} users")
        except Exception as exc:  # noqa: BLE001 - a broken batch must not lose the labels already paid for
            logger.warning("labeler %r failed on a batch of %d users: %s", labeler.name, len(batch), exc)
            results = [LabelResult(str(graph.user_ids[u]), (), error=f"labeler error: {exc}") for u in batch]
        for u, res in zip(batch, results):
            for name in res.dropped:
                dropped[name] = dropped.get(name, 0) + 1
            if res.ok:
                labels[int(u)] = tuple(dict.fromkeys(int(p) for p in res.personas))
            else:
                failed[int(u)] = res.error or "no persona in the set"
        if progress:
            progress(stage, min(start + LABEL_BATCH, len(users)), len(users))
    return labels, failed, dropped


def run_gplr(
    graph: BipartiteGraph,
    personas: PersonaSet,
    labeler: Labeler,
    budget: float | int = 0.05,
    rounds: int = 5,
    *,
    hops: int = 1,
    eps: float = 0.05,
    beta: float = 0.5,
    method: Method = "exact",
    weight: EdgeWeight = "binary",
    k: int = 5,
    adaptive: float | None = None,
    min_score: float | None = None,
    decoder: Decoder = "graph",
    rule: str = DEFAULT_RULE,
    prevalence: float = PREVALENCE_MATCH,
    sampling: Sampling = "du",
    seed: int = 0,
    exclude: np.ndarray | None = None,
    progress: Progress | None = None,
    zero_shot: bool | ZeroShotChannel = False,
) -> GPLRResult:
    """Algorithm 1. `exclude` (user indices) are never chosen as prototypes (held-out users).

    Sampling always uses Ψ. The final personas come from the fitted persona model
    (`decoder="model"`: `rule` picks the decision rule, `prevalence` how far decisions are
    moved towards the prototypes' persona prevalence, `k` caps the personas; `adaptive` and
    `min_score` do not apply), from Ψ (`decoder="graph"`, the paper) or from per-persona word
    classifiers (`decoder="words"`; pair it with `min_score`, e.g. 0.35). `zero_shot` (model
    decoder only): True adds the label-free zero-shot channel of the graph's item names
    (`core.zero_shot.zero_shot_channel`, MiniLM), or pass a fitted `ZeroShotChannel`.
    """
    if sampling not in ("du", "random"):
        raise ValueError(f"sampling must be 'du' or 'random', got {sampling!r}")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    n_users, n_personas = graph.n_users, len(personas)
    if n_users == 0:
        raise ValueError("the purchase graph has no users")
    rng = np.random.default_rng(seed)
    candidates = np.ones(n_users, dtype=bool)
    if exclude is not None:
        candidates[np.asarray(exclude, dtype=np.int64)] = False
    total = min(resolve_budget(budget, n_users), int(candidates.sum()))
    sizes = [s for s in round_sizes(total, rounds) if s > 0] or [0]
    labels: dict[int, tuple[int, ...]] = {}
    failed: dict[int, str] = {}
    dropped: dict[str, int] = {}
    infos: list[RoundInfo] = []
    psi = np.zeros((n_users, n_personas))
    q_hat = np.full(n_personas, 1.0 / n_personas)

    def refresh() -> None:
        nonlocal psi, q_hat
        if progress:
            progress("affinity", 0, 1)
        phi = prototype_matrix(n_users, labels, n_personas)
        q_hat = label_distribution(phi) if labels else np.full(n_personas, 1.0 / n_personas)
        psi = np.asarray(
            compute_affinity(graph, phi, method=method, hops=hops, eps=eps, beta=beta, weight=weight)
        )
        if progress:
            progress("affinity", 1, 1)

    for r, size in enumerate(sizes):
        t0 = time.perf_counter()
        pool = np.flatnonzero(candidates)
        how = "random" if r == 0 or sampling == "random" or not labels else "du"
        if how == "random":
            chosen = rng.choice(pool, size=min(size, pool.size), replace=False)
        else:
            chosen = select_du(du_scores(psi, q_hat), candidates, size)
        candidates[chosen] = False
        got, bad, drop = _label_users(graph, labeler, chosen, f"round {r + 1}/{len(sizes)}: labeling", progress)
        labels.update(got)
        failed.update(bad)
        for name, c in drop.items():
            dropped[name] = dropped.get(name, 0) + c
        if labels:
            refresh()
        infos.append(RoundInfo(r + 1, how, int(chosen.size), len(got), len(bad), q_hat.copy(),
                               time.perf_counter() - t0))
        logger.info("round %d (%s): %d requested, %d labeled, %d failed", r + 1, how, chosen.size, len(got), len(bad))
    if not labels:
        logger.warning("no prototype was labeled; every user gets an empty assignment")
    scores, model = psi, None
    if decoder == "model" and labels:
        if progress:
            progress("persona model", 0, 1)
        psi_raw = psi / debias_weights(q_hat, beta)  # c > 0: Ψ_raw back, scale-free for the decoder
        channel = zero_shot_channel(graph.item_names, personas) if zero_shot is True else zero_shot or None
        model = fit_persona_model(graph, labels, n_personas, psi_raw, hops=hops, weight=weight, seed=seed,
                                  rule=rule, max_personas=k, prevalence=prevalence, zero_shot=channel)
        scores = model.probabilities(graph, psi_raw)
        idx, decided = model.decide(graph, psi_raw)
        assignment = with_prototypes(idx, decided, scores, labels)
        if progress:
            progress("persona model", 1, 1)
    else:
        if decoder == "words" and labels:
            from core.word_personas import word_persona_scores  # sklearn only when asked for

            if progress:
                progress("word decoder", 0, 1)
            scores = word_persona_scores(graph, labels, n_personas)
            if progress:
                progress("word decoder", 1, 1)
        assignment = assign_personas(scores, k, adaptive=adaptive, min_score=min_score, prototypes=labels,
                                     prior=q_hat if labels else None)
    return GPLRResult(psi, q_hat, labels, failed, assignment, labeler.stats.as_dict(), infos, dropped, scores,
                      model)
