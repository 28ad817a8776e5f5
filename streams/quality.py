"""How good are the streamed personas? Yardsticks shared by `gplr demo` and the quality test.

The stream's personas are judged against three references on the same purchases, all scored
with the paper's F1@k (`recsys.metrics.f1_at_k`) over the users the stream did not label:

* `batch_same_prototypes`: batch Ψ (core.affinity, exact) from the *stream's* prototypes and
  ranked as the stream ranks (top-k of Ψ_raw · c, positive scores only). The stream keeps
  |Ψ − Ψ̂| ≤ ε, so any gap to this number is ε, hysteresis or unfinished propagation.
* `batch_gplr`: batch GPLR (core.gplr.run_gplr) with the same labeler, budget, ε, β and k but
  its own rounds: what the offline method reaches on this data (the paper's DU + graph decoder
  unless told; `gplr demo` passes the stream's decoder and sampling, i.e. the persona model).
* `popularity_baseline`: everyone gets the k most common personas, the bar any persona model
  must clear.

`worker_metrics` reads a worker's Prometheus endpoint so the cost of a setting (pushes and
messages per purchase) is measured beside its quality.
"""
from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from core.gplr import Decoder, Sampling

__all__ = ["f1_against_truth", "popularity_baseline", "batch_same_prototypes", "batch_gplr",
           "worker_metrics"]

logger = logging.getLogger(__name__)


def f1_against_truth(predicted: Mapping[str, Sequence[int]], truth: Mapping[str, Sequence[int]],
                     k: int, users: Iterable[str]) -> float:
    """Mean F1@k = 2|top-k ∩ T_u| / (k + |T_u|) over `users` (a user without personas scores 0).

    >>> f1_against_truth({"a": [0, 1]}, {"a": (1,), "b": (0,)}, 2, ["a", "b"])  # a: 2/3, b: 0
    0.3333333333333333
    """
    from recsys.metrics import f1_at_k

    users = list(users)
    if not users:
        return float("nan")
    hits = np.zeros((len(users), k), dtype=bool)
    n_rel = np.zeros(len(users))
    for row, user in enumerate(users):
        t = set(truth[user])
        n_rel[row] = len(t)
        for col, p in enumerate(list(predicted.get(user, ()))[:k]):
            hits[row, col] = p in t
    return float(np.mean(f1_at_k(hits, n_rel, k)))


def popularity_baseline(truth: Mapping[str, Sequence[int]], k: int) -> list[int]:
    """The k most common true personas (ties to the lower index)."""
    counts = np.bincount([p for ps in truth.values() for p in ps])
    return [int(p) for p in np.argsort(-counts, kind="stable")[:k]]


def _graph(frame: pd.DataFrame):
    from core.graph import BipartiteGraph

    return BipartiteGraph.from_frame(frame)


def batch_same_prototypes(frame: pd.DataFrame, prototypes: Mapping[str, Sequence[int]], n_personas: int,
                          k: int, beta: float, hops: int = 1) -> dict[str, list[int]]:
    """Top-k personas per user from exact batch Ψ with these prototypes, ranked like the stream
    (`core.incremental.rank_personas`); prototypes keep their labels. Keyed by user id."""
    from core.affinity import debias_weights, exact_affinity, label_distribution, prototype_matrix
    from core.incremental import rank_personas

    graph = _graph(frame)
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    labels = {index[u]: tuple(ps) for u, ps in prototypes.items() if u in index and ps}
    phi = prototype_matrix(graph.n_users, labels, n_personas)
    out = {str(u): list(prototypes[str(u)]) for u in graph.user_ids if str(u) in prototypes}
    if not labels:
        return out
    psi = exact_affinity(graph, phi, hops=hops)
    c = debias_weights(label_distribution(phi), beta)
    for i, u in enumerate(graph.user_ids):
        if i not in labels:
            out[str(u)] = list(rank_personas(psi[i], c, k).personas)
    return out


def batch_gplr(frame: pd.DataFrame, personas, labeler, budget: float, k: int, eps: float, beta: float,
               hops: int = 1, seed: int = 0, decoder: Decoder = "graph", sampling: Sampling = "du"
               ) -> tuple[dict[str, list[int]], set[str]]:
    """Batch GPLR (exact Ψ, 5 rounds) on the same purchases: (personas per user, prototypes);
    the paper's decoder and sampling unless told (the demo passes the stream's)."""
    from core.gplr import run_gplr

    graph = _graph(frame)
    result = run_gplr(graph, personas, labeler, budget, hops=hops, eps=eps, beta=beta, k=k, seed=seed,
                      decoder=decoder, sampling=sampling)
    predicted = {str(u): list(result.assignment.personas_of(i)) for i, u in enumerate(graph.user_ids)}
    return predicted, {str(graph.user_ids[i]) for i in result.prototypes}


def worker_metrics(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> dict[str, float]:
    """Unlabeled `gplr_*` counter/gauge samples from a worker's /metrics ({} if unreachable)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError as exc:
        logger.warning("worker metrics unreadable on port %d: %s", port, exc)
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("gplr_") and not sample.labels:
                out[sample.name] = float(sample.value)
    return out
