"""Why a customer holds a persona: the exact per-item (and per-prototype) decomposition of a score.

The graph score is a sum over the items a user bought, so it splits exactly into per-item
contributions; the text score is ranked per item:

* graph channel: Ψ_raw[u] = Σ_{v∈N(u)} P[u, v] · M[v], with M[v] = (1/ℓ̂) Σ_ℓ P'(P P')^{ℓ-1} L
  the value item v passes on (for ℓ̂ = 1 and binary edges, (1/d_u) Σ_v S[v]/d_v — what the
  stream's user row keeps per item as the told value M̃[v]). Item v's share of persona m is
  P[u,v]·M[v,m] / Ψ_raw[u,m]; the shares of a persona sum to 1. The de-bias weight c_m scales a
  whole column, so shares of Ψ and of Ψ_raw are the same.
* text channel (`core.item_channel`): the user's text logit reads sublinear word counts over all
  its items, not a sum over items; item v's evidence is its own lift s(v, m) − b_m (its words
  alone under the fitted model), its share that lift over the sum of the positive lifts — a
  ranking of the items by what each says on its own, not an exact decomposition.

A persona's evidence comes from the graph channel when some prototype reaches the user for it,
else from the text channel (when a persona model is in use): up to `TOP_ITEMS` items, largest
share first, ties by item id — the same rule in batch (`batch_evidence`) and in the stream
(`state_evidence`, from the user row alone: no per-item vector is added to stream state).

Each item's graph value further splits into the prototypes whose labels reached the user
(Ψ_raw is linear in L): `batch_prototypes` gives, per persona, the prototypes with the largest
share (K[u, w] · L[w, m] / Ψ_raw[u, m], K = (1/ℓ̂) Σ_ℓ (P P')^ℓ).

The zero-shot channel (`core.zero_shot`, when the persona model has one) is the decoder's fourth
feature z[u, m] = ln(mean over u's distinct items of s(v)[m] + FLOOR), s(v) the lift of MiniLM's
vote of item v's name for persona m (1 = as much as the shop's average item). `zero_shot_evidence`
gives, per listed persona, the decoder's own term of it — slope a_m · z[u, m], added to the
persona's logit (`PersonaDecoder.logits`; a basket of average items has z = ln(1 + FLOOR) ≈ 0, so
the term is what the names add or take away) —, the names' mean lift, and the items whose names
vote most for the persona (largest s(v)[m]; each with its share of Σ_v s(v)[m], the mean's exact
decomposition).

>>> import numpy as np
>>> [[e['item_id'], e['share'], e['channel']] for e in
...  user_evidence(["a", "b", "c"], ["Mug", "Tin", "Cup"], np.array([[0.1], [0.3], [0.0]]))[0]]
[['b', 0.75, 'graph'], ['a', 0.25, 'graph']]
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.affinity import _row_normalise_dense, prototype_matrix
from core.graph import BipartiteGraph, EdgeWeight
from core.incremental import UserState

__all__ = [
    "TOP_ITEMS",
    "TOP_PROTOTYPES",
    "shares",
    "user_evidence",
    "state_evidence",
    "item_values",
    "batch_evidence",
    "prototype_reach",
    "batch_prototypes",
    "result_evidence",
    "zero_shot_evidence",
]

TOP_ITEMS = 3
TOP_PROTOTYPES = 3
SHARE_DIGITS = 6  # shares as published
_ORDER_DIGITS = 9  # shares are ranked at this precision, so rounding noise never reorders ties


def shares(contrib: np.ndarray) -> np.ndarray:
    """Each column's positive part divided by its sum (rows × personas); an all-zero column
    stays zero. For non-negative contributions this is the exact share of the column's total."""
    c = np.maximum(np.atleast_2d(np.asarray(contrib, dtype=np.float64)), 0.0)
    total = c.sum(axis=0, keepdims=True)
    return np.asarray(np.divide(c, total, out=np.zeros_like(c), where=total > 0))


def _top(ids: Sequence[str], share: np.ndarray, k: int) -> list[int]:
    """Rows with a positive share, largest first (ties by id), at most k. Only the rows tied
    with or above the k-th largest share are sorted in Python (ids are strings)."""
    key = np.round(share, _ORDER_DIGITS)
    rows = np.flatnonzero(key > 0)
    if rows.size > k:
        kth = np.partition(key[rows], rows.size - k)[rows.size - k]
        rows = rows[key[rows] >= kth]
    return sorted(rows.tolist(), key=lambda r: (-key[r], str(ids[r])))[:k]


def user_evidence(ids: Sequence[str], names: Sequence[str], graph_contrib: np.ndarray,
                  text_contrib: np.ndarray | None = None, k: int = TOP_ITEMS) -> list[list[dict[str, Any]]]:
    """Evidence per persona column of one user: rows are the user's items (`ids`, `names`),
    `graph_contrib[v, j]` item v's part of the graph score of the j-th persona, `text_contrib`
    (optional) its lift s(v) − b of the text logit. The graph channel explains a persona it
    reaches, else the text channel; items with no positive share are never listed."""
    g = shares(graph_contrib) if len(ids) else np.zeros((0, np.shape(graph_contrib)[-1]))
    t = None if text_contrib is None or not len(ids) else shares(text_contrib)
    out: list[list[dict[str, Any]]] = []
    for j in range(g.shape[1]):
        channel, col = "graph", g[:, j]
        if not (col > 0).any() and t is not None:
            channel, col = "text", t[:, j]
        out.append([{"item_id": str(ids[r]), "name": str(names[r]), "share": round(float(col[r]), SHARE_DIGITS),
                     "channel": channel} for r in _top(ids, col, k)])
    return out


def state_evidence(state: UserState, personas: Sequence[int],
                   text_vectors: Callable[[list[str]], np.ndarray] | None = None,
                   intercept: np.ndarray | None = None, k: int = TOP_ITEMS) -> dict[int, list[dict[str, Any]]]:
    """The stream's evidence for a user row: persona → items, from the told values M̃[v] the row
    already keeps per item (their sum is T[u] = d_u Ψ̂_raw[u]) and, with a persona model,
    `text_vectors(names)` (whose first |R| columns are s(v), `core.item_channel`) and the
    channel's `intercept` b. Nothing new is stored."""
    personas = [int(p) for p in personas]
    if not personas or not state.items:
        return {p: [] for p in personas}
    ids = list(state.items)
    rows = list(state.items.values())
    zero = np.zeros(state.n_personas)
    graph = np.vstack([zero if it.value is None else it.value for it in rows])[:, personas]
    text = None
    reached = (graph > 0).any(axis=0)
    if text_vectors is not None and intercept is not None and not reached.all():  # only when it is read
        s = np.asarray(text_vectors([it.name for it in rows]), dtype=np.float64)
        text = s[:, personas] - np.asarray(intercept, dtype=np.float64)[personas]
    found = user_evidence(ids, [it.name for it in rows], graph, text, k)
    return dict(zip(personas, found))


# -- batch ---------------------------------------------------------------------------------------
def item_values(graph: BipartiteGraph, phi: np.ndarray, hops: int = 1, weight: EdgeWeight = "binary") -> np.ndarray:
    """M (items × personas) with Ψ_raw = P · M exactly: (1/ℓ̂) Σ_ℓ P'(P P')^{ℓ-1} L."""
    P, Pt = graph.transitions(weight)
    y = np.asarray(Pt @ _row_normalise_dense(np.asarray(phi, dtype=np.float64)))
    acc = y.copy()
    for _ in range(hops - 1):
        y = np.asarray(Pt @ (P @ y))
        acc += y
    return acc / hops


def batch_evidence(graph: BipartiteGraph, idx: np.ndarray, values: np.ndarray,
                   text_scores: np.ndarray | None = None, intercept: np.ndarray | None = None,
                   weight: EdgeWeight = "binary", k: int = TOP_ITEMS) -> list[list[list[dict[str, Any]]]]:
    """Per user, per listed persona (`idx`, users × slots, −1 padded) its evidence items, from
    the item values `values` (`item_values`) and, with a persona model, the items' s(v)
    (`text_scores`, items × personas) and b (`intercept`)."""
    P, _ = graph.transitions(weight)
    text = None if text_scores is None or intercept is None else np.asarray(text_scores) - np.asarray(intercept)
    out: list[list[list[dict[str, Any]]]] = []
    for u in range(graph.n_users):
        ps = [int(p) for p in idx[u] if p >= 0]
        if not ps:
            out.append([])
            continue
        lo, hi = P.indptr[u], P.indptr[u + 1]
        cols = P.indices[lo:hi]
        g = P.data[lo:hi, None] * values[cols][:, ps]
        t = None if text is None else text[cols][:, ps]  # every weight is positive: P's edges are N(u)
        out.append(user_evidence(graph.item_ids[cols], graph.item_names[cols], g, t, k))
    return out


def prototype_reach(graph: BipartiteGraph, prototypes: Sequence[int] | np.ndarray, hops: int = 1,
                    weight: EdgeWeight = "binary") -> sp.csr_matrix:
    """K[:, prototypes] (users × prototypes, sparse), K = (1/ℓ̂) Σ_ℓ (P P')^ℓ: how much of each
    prototype's unit label reaches each user; Ψ_raw = K · L[prototypes]."""
    P, Pt = graph.transitions(weight)
    protos = np.asarray(prototypes, dtype=np.int64)
    x = sp.csr_matrix((np.ones(protos.size), (protos, np.arange(protos.size))), shape=(graph.n_users, protos.size))
    acc = sp.csr_matrix(x.shape)
    for _ in range(hops):
        x = (P @ (Pt @ x)).tocsr()
        acc = acc + x
    return sp.csr_matrix(acc / hops)


def batch_prototypes(graph: BipartiteGraph, idx: np.ndarray, labels: Mapping[int, Sequence[int]],
                     n_personas: int, persona_names: Sequence[str], hops: int = 1,
                     weight: EdgeWeight = "binary", k: int = TOP_PROTOTYPES) -> list[list[list[dict[str, Any]]]]:
    """Per user, per listed persona, the prototypes whose labels contributed most to its graph
    score: {user_id, labels (persona names), share} with shares of Ψ_raw[u, m]."""
    protos = np.fromiter(labels.keys(), dtype=np.int64, count=len(labels))
    if protos.size == 0:
        return [[[] for p in row if p >= 0] for row in idx]
    L = prototype_matrix(graph.n_users, labels, n_personas)[protos]
    L = L / L.sum(axis=1, keepdims=True)
    reach = prototype_reach(graph, protos, hops, weight)
    proto_ids = graph.user_ids[protos]
    label_names = [[persona_names[p] for p in labels[int(w)]] for w in protos]
    out: list[list[list[dict[str, Any]]]] = []
    for u in range(graph.n_users):
        ps = [int(p) for p in idx[u] if p >= 0]
        lo, hi = reach.indptr[u], reach.indptr[u + 1]
        cols = reach.indices[lo:hi]
        share = shares(reach.data[lo:hi, None] * L[cols][:, ps]) if ps else np.zeros((0, 0))
        ids = proto_ids[cols]
        out.append([[{"user_id": str(ids[r]), "labels": label_names[cols[r]],
                      "share": round(float(share[r, j]), SHARE_DIGITS)} for r in _top(ids, share[:, j], k)]
                    for j in range(len(ps))])
    return out


def result_evidence(graph: BipartiteGraph, result: Any, persona_names: Sequence[str], hops: int = 1,
                    weight: EdgeWeight = "binary") -> tuple[list[Any], list[Any]]:
    """(items, prototypes) per user for a `core.gplr.GPLRResult`: what `gplr label` writes."""
    idx = result.assignment.idx
    n_personas = len(persona_names)
    if not result.prototypes:
        empty: list[Any] = [[[] for p in row if p >= 0] for row in idx]
        return empty, empty
    values = item_values(graph, prototype_matrix(graph.n_users, result.prototypes, n_personas), hops, weight)
    text_scores = intercept = None
    if getattr(result, "model", None) is not None:
        text_scores = result.model.channel.item_scores(list(graph.item_names))
        intercept = result.model.channel.intercept
    items = batch_evidence(graph, idx, values, text_scores, intercept, weight)
    protos = batch_prototypes(graph, idx, result.prototypes, n_personas, persona_names, hops, weight)
    return items, protos


def zero_shot_evidence(graph: BipartiteGraph, idx: np.ndarray, model: Any,
                       k: int = TOP_ITEMS) -> list[list[dict[str, Any]]] | None:
    """Per user, per listed persona (`idx`, users × slots, −1 padded) the zero-shot channel's part
    of the decision (see the module docstring): {feature, mean_lift, slope, contribution,
    items: [{item_id, name, lift, share}]} with at most `k` items, largest lift
    first, ties by item id. None when `model` (a `core.decoder.PersonaModel`) has no zero-shot
    channel. The feature is `PersonaModel.zero_shot_features`, the slope the decoder's own."""
    from core.decoder import FEATURES
    from core.zero_shot import FLOOR

    channel = getattr(model, "zero_shot", None)
    if channel is None:
        return None
    feature = model.zero_shot_features(graph)  # exactly what the decision read
    slope = np.asarray(model.decoder.coef, dtype=np.float64)[:, FEATURES.index("zero_shot")]
    lift = channel.item_lifts([str(n) for n in graph.item_names])
    ui = sp.csr_matrix(graph.user_item)  # distinct items: the channel's mean is over them
    out: list[list[dict[str, Any]]] = []
    for u in range(graph.n_users):
        cols = ui.indices[ui.indptr[u]:ui.indptr[u + 1]]
        ids = graph.item_ids[cols]
        row = []
        for p in (int(p) for p in idx[u] if p >= 0):
            z, a = float(feature[u, p]), float(slope[p])
            col = lift[cols, p]
            share = shares(col[:, None])[:, 0]
            row.append({"feature": round(z, SHARE_DIGITS), "mean_lift": round(float(np.exp(z)) - FLOOR, SHARE_DIGITS),
                        "slope": round(a, SHARE_DIGITS), "contribution": round(a * z, SHARE_DIGITS),
                        "items": [{"item_id": str(ids[r]), "name": str(graph.item_names[cols[r]]),
                                   "lift": round(float(col[r]), SHARE_DIGITS),
                                   "share": round(float(share[r]), SHARE_DIGITS)} for r in _top(ids, col, k)]})
        out.append(row)
    return out
