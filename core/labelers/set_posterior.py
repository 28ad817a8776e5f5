"""Users' persona sets from item evidence: a small generative model, its posterior, an F1 decision.

Why: averaging item votes and cutting at a bar ignores how much evidence a user has (two
purchases are not twenty) and how common each persona is among users. The model here is the
one a shop's purchases plausibly follow (and `core.synthetic` plants):

* a user holds a set S of personas, each persona r independently with prior `rho[r]`;
* each purchase is, with probability 1 - `eps`, an item of a persona drawn uniformly from S,
  else an item drawn regardless of personas; so the likelihood ratio of item j against the
  persona-free shop is ``(1 - eps) * mean_{r in S} L[j, r] + eps`` where
  ``L[j, r] = p(j | r) / p(j)`` (for soft item votes v: ``v[j, r] / mean_j v[:, r]``);
* purchases count with the caller's weights (here each distinct item about 1, so a user with
  many purchases has more evidence).

`set_posterior` finds each user's MAP set greedily (add the persona with the best posterior
gain while it is positive, 1..`max_personas`), then each persona's conditional posterior
probability given the rest of that set (add it or drop it). Given a `prior` that is all; without
one, the prior is fitted on these users: from `RHO0`, `iters` rounds of re-estimating `rho` as
the mean of the probabilities over the users (EM-like; no labels needed, so a labeler fits it
on a shop's unlabeled customers and then labels each user independently of the batch).
`expected_f1_sets` then keeps, per user, the k most probable personas with k maximising the
expected F1 ``2 * sum_{i<=k} p_(i) / (k + sum_r p_r)``.

Measured (bench/labels.py): with the planted item personas as L this rule reaches F1 0.79,
0.80, 0.76 and 0.89 on the four synthetic shops (the ceiling of any item labeler with this
user rule); with the embedding labeler's votes 0.73, 0.72, 0.68 and 0.80.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["set_posterior", "expected_f1_sets", "refine_ratios", "EPS", "RHO0", "REFINE_ROUNDS", "REFINE_PSEUDO"]

EPS = 0.1  # share of purchases assumed unrelated to the user's personas
RHO0 = 0.2  # prior probability of each persona before any users are seen
REFINE_ROUNDS = 5  # rounds of re-estimating item ratios from the buyers' persona posteriors
REFINE_PSEUDO = 1.0  # the item's own vote counts as this many purchases in the re-estimate


def _user_loglik(per_user: sp.csr_matrix, ratio: np.ndarray, eps: float) -> np.ndarray:
    """(users, columns) sum over a user's purchases of weight × log((1 - eps) ratio + eps);
    `per_user` is the users × purchases weight matrix, `ratio` purchases × columns."""
    return np.asarray(per_user @ np.log((1.0 - eps) * np.maximum(ratio, 0.0) + eps))


def set_posterior(
    weights: sp.spmatrix, likelihood: np.ndarray, *, eps: float = EPS, iters: int = 4,
    max_personas: int = 5, prior: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(users × personas) MAP sets, conditional posterior probabilities, and the prior used.

    `weights`: users × items evidence weights (a user with no purchase gets the prior alone);
    `likelihood`: items × personas ratios p(item | persona) / p(item), non-negative;
    `prior`: each persona's prior probability (fixed), or None to fit it on these users.
    """
    if not 0.0 < eps < 1.0 or max_personas < 1 or iters < 1:
        raise ValueError("eps must be in (0, 1), max_personas and iters at least 1")
    if prior is not None and (len(prior) != likelihood.shape[1] or not np.all((prior > 0) & (prior < 1))):
        raise ValueError("prior must hold one probability in (0, 1) per persona")
    coo = sp.csr_matrix(weights).tocoo()
    users, w = coo.row.astype(np.int64), coo.data.astype(np.float64)
    n, m = weights.shape[0], likelihood.shape[1]
    per_edge = np.asarray(likelihood, dtype=np.float64)[coo.col]  # E × m
    per_user = sp.csr_matrix((w, (users, np.arange(len(users)))), shape=(n, len(users)))

    def loglik(ratio: np.ndarray) -> np.ndarray:
        return _user_loglik(per_user, ratio, eps)

    rho = np.full(m, RHO0) if prior is None else np.asarray(prior, dtype=np.float64)
    rows = np.arange(n)
    for _ in range(1 if prior is not None else iters):
        log_prior = np.log(rho / (1.0 - rho))
        chosen = np.zeros((n, m), dtype=bool)
        size = np.zeros(n)
        mix = np.zeros(len(users))  # per purchase: mean ratio over the user's current set
        current = np.zeros(n)
        open_ = np.ones(n, dtype=bool)
        for _step in range(min(max_personas, m)):
            k = size[users][:, None]
            grown = (mix[:, None] * k + per_edge) / (k + 1.0)
            candidate = loglik(grown)
            gain = np.where(chosen, -np.inf, candidate - current[:, None] + log_prior)
            best = np.argmax(gain, axis=1)
            take = open_ & ((gain[rows, best] > 0) | (size == 0))
            if not take.any():
                break
            chosen[rows[take], best[take]] = True
            current[take] = candidate[take, best[take]]
            on_edge = take[users]
            mix[on_edge] = grown[on_edge, best[users][on_edge]]
            size[take] += 1
            open_ &= take
        k = size[users][:, None]
        added = loglik((mix[:, None] * k + per_edge) / (k + 1.0)) - current[:, None]
        without = np.where(k > 1, (mix[:, None] * k - per_edge) / np.maximum(k - 1.0, 1.0), 1.0)
        kept = current[:, None] - loglik(without)  # an empty set explains every item as the shop (ratio 1)
        log_odds = np.where(chosen, kept, added) + log_prior
        prob = 1.0 / (1.0 + np.exp(-np.clip(log_odds, -50.0, 50.0)))
        if prior is None and n:
            rho = np.clip(prob.mean(axis=0), 1e-3, 0.9)
    return chosen, prob, rho


def expected_f1_sets(prob: np.ndarray, max_personas: int = 5) -> np.ndarray:
    """Boolean users × personas: the top-k personas by probability, k maximising expected F1.

    >>> expected_f1_sets(np.array([[0.9, 0.6, 0.1], [0.3, 0.1, 0.05]])).astype(int).tolist()
    [[1, 1, 0], [1, 0, 0]]
    """
    n, m = prob.shape
    top = min(max_personas, m)
    order = np.argsort(-prob, axis=1, kind="stable")[:, :top]
    ranked = np.take_along_axis(prob, order, axis=1)
    expected = 2.0 * np.cumsum(ranked, axis=1) / (np.arange(1, top + 1)[None, :] + prob.sum(axis=1, keepdims=True))
    k = np.argmax(expected, axis=1) + 1
    out = np.zeros((n, m), dtype=bool)
    keep = np.arange(top)[None, :] < k[:, None]
    out[np.repeat(np.arange(n), top)[keep.ravel()], order[keep]] = True
    return out


def refine_ratios(
    weights: sp.spmatrix, likelihood: np.ndarray, votes: np.ndarray, *, rounds: int = REFINE_ROUNDS,
    pseudo: float = REFINE_PSEUDO, eps: float = EPS, max_personas: int = 5,
) -> np.ndarray:
    """(items × personas) likelihood ratios re-estimated from who buys each item (EM).

    Why: an item's name can point to the wrong persona ("Gourmet Dog Treats" reads as a cook's),
    but its buyers' other purchases say whose it is. Each round: every user's persona
    probabilities under the current ratios (`set_posterior`, prior fitted on these users), a
    soft set with weights q[u, r]; each purchase's responsibility for persona r is
    ``(1 - eps) q[u, r] L[j, r] / sum_r q[u, r]`` over itself plus ``eps`` (the rest is noise),
    so ``p(j | r)`` = (the responsibilities of r on j + `pseudo` × the item's vote for r),
    normalised over items, and ``p(j)`` = (j's evidence + `pseudo`), normalised; the new ratio
    is their quotient. `votes`: items × personas, rows summing to 1 (the embedding's).
    ``rounds = 0`` returns `likelihood` unchanged.

    Measured on cached votes (docs/RESULTS.md §6): soft weights beat the MAP sets (hard 0/1
    weights) by 0.02–0.05 F1 on the synthetic shops; 5 rounds reach most of what 8 do.
    """
    if rounds < 0 or pseudo <= 0:
        raise ValueError("rounds must be >= 0 and pseudo > 0")
    ratio = np.asarray(likelihood, dtype=np.float64)
    votes = np.asarray(votes, dtype=np.float64)
    if votes.shape != ratio.shape or weights.shape[1] != ratio.shape[0]:
        raise ValueError("weights, likelihood and votes must agree on items and personas")
    coo = sp.csr_matrix(weights).tocoo()
    users, items, w = coo.row, coo.col, coo.data.astype(np.float64)
    bought = np.bincount(items, weights=w, minlength=ratio.shape[0])
    p_item = (bought + pseudo) / (bought + pseudo).sum()
    for _ in range(rounds):
        _, prob, _ = set_posterior(weights, ratio, eps=eps, max_personas=max_personas)
        member = prob[users]  # purchases × personas: the buyer's soft set
        size = np.maximum(member.sum(axis=1, keepdims=True), 1e-12)
        on = member * (1.0 - eps) * ratio[items] / size
        share = on / (on.sum(axis=1, keepdims=True) + eps)
        counts = np.zeros_like(ratio)
        np.add.at(counts, items, w[:, None] * share)
        p_given = counts + pseudo * votes
        p_given /= np.maximum(p_given.sum(axis=0, keepdims=True), 1e-300)
        ratio = p_given / p_item[:, None]
    return ratio
