"""Benchmark exact affinity vs RevAff on a synthetic graph at the paper's Instacart Full scale.

Instacart Full (paper Table 1): 206,209 users, 49,677 items, 13.3M edges; 51 personas, 5% of
users as prototypes with 1–5 personas each. Degrees are Zipf-like on both sides. The paper
reports 268.8 s (exact) and 77.7 s (RevAff, ε=0.02) on a 12-core Xeon.

    python bench/affinity.py            # full scale, 3 repeats
    python bench/affinity.py --quick    # 1/10 scale, 1 repeat, < 2 min

Prints a table, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numba
import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from core.affinity import exact_affinity, prototype_matrix, revaff_affinity  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402

FULL = {"users": 206_209, "items": 49_677, "edges": 13_300_000}
EPSILONS = (0.02, 0.05, 0.1)


def power_law_purchases(
    n_users: int, n_items: int, n_edges: int, rng: np.random.Generator,
    user_tail: float = 1.8, item_exponent: float = 0.9,
) -> tuple[np.ndarray, np.ndarray]:
    """Purchase events (user_idx, item_idx) whose distinct pairs number about `n_edges`.

    User activity is Pareto-tailed (index `user_tail`), item popularity Zipf (rank^-exponent,
    ranks shuffled over ids). Repeat purchases of a pair happen naturally, as in real baskets;
    draws are topped up until the distinct pairs reach the target.
    """
    activity = (1.0 - rng.random(n_users)) ** (-1.0 / user_tail)
    activity /= activity.sum()
    popularity = 1.0 / np.arange(1, n_items + 1) ** item_exponent
    cdf = np.cumsum(rng.permutation(popularity))
    cdf /= cdf[-1]
    users = np.empty(0, dtype=np.int64)
    items = np.empty(0, dtype=np.int64)
    draws, distinct = n_edges, 0
    for _ in range(12):
        per_user = rng.multinomial(draws, activity)
        new_u = np.repeat(np.arange(n_users, dtype=np.int64), per_user)
        new_i = np.minimum(np.searchsorted(cdf, rng.random(new_u.size)), n_items - 1)
        users, items = np.concatenate([users, new_u]), np.concatenate([items, new_i])
        gained, distinct = -distinct, _count_distinct(users * n_items + items)
        gained += distinct
        if distinct >= 0.995 * n_edges or gained == 0:
            break
        draws = int((n_edges - distinct) * draws / gained) + 1  # at the last round's yield
    return users, items


def _count_distinct(keys: np.ndarray) -> int:
    """Distinct values by sort + diff (numpy 2.4's hash-based np.unique is ~40x slower here)."""
    keys = np.sort(keys)
    return int(keys.size > 0) + int(np.count_nonzero(np.diff(keys)))


def random_labels(n_users: int, n_personas: int, share: float, rng: np.random.Generator) -> dict[int, list[int]]:
    """`share` of users as prototypes, each with 1–5 distinct random personas."""
    protos = rng.choice(n_users, size=max(1, int(round(share * n_users))), replace=False)
    ranked = np.argsort(rng.random((protos.size, n_personas)), axis=1)
    sizes = rng.integers(1, min(5, n_personas) + 1, size=protos.size)
    return {int(u): ranked[j, : sizes[j]].tolist() for j, u in enumerate(protos)}


def timed(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """Median wall seconds over `repeats` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def warm_up() -> None:
    """Compile (or load from cache) the numba kernels so no timing includes the JIT."""
    g = BipartiteGraph.from_indices(np.array([0, 1, 1]), np.array([0, 0, 1]), 2, 2)
    phi = prototype_matrix(2, {0: [0]}, 2)
    exact_affinity(g, phi, hops=2)
    revaff_affinity(g, phi, hops=2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1/10 scale, 1 repeat")
    ap.add_argument("--scale", type=float, default=None, help="fraction of full scale (overrides --quick's 0.1)")
    ap.add_argument("--hops", type=int, default=1, help="walk length ℓ̂ (default 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per method (default 3, quick 1)")
    ap.add_argument("--personas", type=int, default=51)
    ap.add_argument("--prototypes", type=float, default=0.05, help="share of users labeled")
    ap.add_argument("--weight", choices=("binary", "count", "log"), default="binary")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    scale = args.scale or (0.1 if args.quick else 1.0)
    repeats = args.repeats or (1 if args.quick or scale < 1 else 3)
    n_users, n_items, n_edges = (int(round(FULL[k] * scale)) for k in ("users", "items", "edges"))
    rng = np.random.default_rng(args.seed)

    warm_up()
    t0 = time.perf_counter()
    users, items = power_law_purchases(n_users, n_items, n_edges, rng)
    gen_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = BipartiteGraph.from_indices(users, items, n_users, n_items)
    build_seconds = time.perf_counter() - t0
    del users, items
    phi = prototype_matrix(n_users, random_labels(n_users, args.personas, args.prototypes, rng), args.personas)

    exact_s, psi = timed(lambda: exact_affinity(graph, phi, args.hops, args.weight), repeats)
    rows = []
    for eps in EPSILONS:
        secs, approx = timed(lambda eps=eps: revaff_affinity(graph, phi, args.hops, eps, args.weight), repeats)
        err = np.abs(approx - psi)
        rows.append({"eps": eps, "seconds": round(secs, 3), "max_abs_error": float(err.max()),
                     "mean_abs_error": float(err.mean())})
        del approx, err
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    result = {
        "users": graph.n_users, "items": graph.n_items, "edges": graph.n_edges,
        "events": int(graph.user_item.sum()), "personas": args.personas,
        "prototypes": int((phi.sum(axis=1) > 0).sum()), "hops": args.hops, "weight": args.weight,
        "dtype": "float64", "quick": args.quick, "repeats": repeats, "threads": numba.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "generate_seconds": round(gen_seconds, 3),
        "graph_build_seconds": round(build_seconds, 3), "exact_seconds": round(exact_s, 3),
        "peak_rss_mb": round(peak_rss_mb, 1), "revaff": rows,
        "paper_12core_xeon": {"exact_seconds": 268.8, "revaff_eps_0.02_seconds": 77.7},
    }
    table = Table(title=f"affinity: {result['users']:,} users, {result['items']:,} items, "
                        f"{result['edges']:,} edges, {args.personas} personas, ℓ̂={args.hops}")
    for col in ("method", "seconds", "max |err|", "mean |err|"):
        table.add_column(col, justify="right")
    table.add_row("graph build", f"{build_seconds:.2f}", "", "")
    table.add_row("exact", f"{exact_s:.2f}", "0", "0")
    for r in rows:
        table.add_row(f"RevAff ε={r['eps']}", f"{r['seconds']:.2f}", f"{r['max_abs_error']:.2e}",
                      f"{r['mean_abs_error']:.2e}")
    Console().print(table)
    print(f"peak RSS {peak_rss_mb:,.0f} MB, {result['threads']} threads, load {result['load_avg_1m']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
