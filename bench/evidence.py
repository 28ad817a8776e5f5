"""What evidence costs: stream state, persona-updates size and compute, on Online Retail.

Setup: the paper's Online Retail graph, 5% of the customers (seeded) labeled with the recorded
GPT-4 personas, the persona model `gplr label` fits (`core.decoder`), and for every customer the
user row the stream worker would hold once every item has pushed its exact value (told value
M̃[v] = M[v] per item, the text-channel sum, the published personas). Measured side by side:

* state: the encoded row (`streams.tables.encode_state`) as it is — evidence needs nothing new,
  since the row already keeps each item's told value — against the same row also storing each
  item's text vector s(v) (|R| floats per item), the alternative issue 15 caps at +20%;
* persona-updates: the JSON body with and without the `evidence` lists;
* compute: `state_evidence` per published update against the decision itself (`decide_user`),
  and the batch `result_evidence` against the persona model's decision over all users.

    python bench/evidence.py [--quick] [--data DIR]     # DIR or $ONLINE_RETAIL_DATA

Prints a few lines, then one JSON object as the last line.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from core.affinity import exact_affinity, prototype_matrix  # noqa: E402
from core.data import load_online_retail  # noqa: E402
from core.decoder import fit_persona_model  # noqa: E402
from core.evidence import item_values, result_evidence, state_evidence  # noqa: E402
from core.gplr import with_prototypes  # noqa: E402
from core.graph import BipartiteGraph  # noqa: E402
from core.incremental import PersonaSnapshot, UserItem, UserState  # noqa: E402
from core.labelers.replay import normalise_id  # noqa: E402
from core.personas import load_personas, read_persona_labels  # noqa: E402
from core.stream_protocol import RECENT_IDS  # noqa: E402
from streams.records import persona_update  # noqa: E402
from streams.tables import _pack_user, _raw, encode_state  # noqa: E402

DEFAULT_DATA = Path(os.environ.get("ONLINE_RETAIL_DATA", Path(__file__).resolve().parents[1] / ".." / "shared"
                                   / "data" / "online_retail"))


def _rows(graph: BipartiteGraph, values: np.ndarray, add_text, users: np.ndarray) -> list[UserState]:  # noqa: ANN001
    """The worker's user rows after every item pushed its exact value."""
    m = values.shape[1]
    out = []
    for u in users:
        lo, hi = graph.user_item.indptr[u], graph.user_item.indptr[u + 1]
        cols = graph.user_item.indices[lo:hi]
        items = {str(graph.item_ids[v]): UserItem(int(c), 1, values[v].copy(), int(q), str(graph.item_names[v]))
                 for v, c, q in zip(cols, graph.user_item.data[lo:hi], graph.quantity[lo:hi])}
        st = UserState(m, items, total=values[cols].sum(axis=0), events=int(graph.user_item.data[lo:hi].sum()))
        st.text, st.text_items, st.text_version = add_text(None, [it.name for it in items.values()]), len(items), 1
        st.recent_ids = list(range(min(st.events, RECENT_IDS)))  # the dedup ids the row keeps
        out.append(st)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help="rows of 800 customers only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not (args.data / "online_retail.csv.gz").is_file():
        print(json.dumps({"error": f"data not found under {args.data}"}))
        sys.exit(1)
    frame, _ = load_online_retail(args.data / "online_retail.csv.gz", paper_filter=True)
    graph = BipartiteGraph.from_frame(frame)
    personas = load_personas(args.data / "personas.json")
    recorded = read_persona_labels(args.data / "user_personas_gpt4.csv.gz")
    rng = np.random.default_rng(args.seed)
    have = [u for u, uid in enumerate(graph.user_ids) if recorded.get(normalise_id(uid))]
    chosen = rng.choice(have, int(0.05 * graph.n_users), replace=False)
    labels = {int(u): [i for i in (personas.index_of(n) for n in recorded[normalise_id(graph.user_ids[u])])
                       if i is not None] for u in chosen}
    labels = {u: p for u, p in labels.items() if p}
    m = len(personas)

    t0 = time.perf_counter()
    phi = prototype_matrix(graph.n_users, labels, m)
    psi = exact_affinity(graph, phi)
    model = fit_persona_model(graph, labels, m, psi)
    idx, decided = model.decide(graph, psi)
    t_decide_batch = time.perf_counter() - t0
    result = SimpleNamespace(assignment=with_prototypes(idx, decided, psi, labels), prototypes=labels,
                             model=model)
    t0 = time.perf_counter()
    result_evidence(graph, result, personas.names)
    t_evidence_batch = time.perf_counter() - t0

    values = item_values(graph, phi)
    vectors = model.item_vectors(list(graph.item_names))
    users = np.arange(graph.n_users) if not args.quick else rng.choice(graph.n_users, 800, replace=False)
    rows = _rows(graph, values, model.add_text, users)
    cache = {str(n): v for n, v in zip(graph.item_names, vectors)}  # the worker's per-name cache

    def item_vectors(names: list[str]) -> np.ndarray:
        return np.vstack([cache[n] for n in names]) if names else np.zeros((0, vectors.shape[1]))

    now_bytes = plus_bytes = body_plain = body_evidence = 0
    t_decide = t_evidence = 0.0
    for u, st in zip(users, rows):
        t0 = time.perf_counter()
        snap = model.decide_user(st.total / len(st.items), st.text, len(st.items))
        t1 = time.perf_counter()
        ev = state_evidence(st, snap.personas, item_vectors, model.channel.intercept)
        t_evidence += time.perf_counter() - t1
        t_decide += t1 - t0
        st.published = dict(zip(snap.personas, snap.scores))
        now_bytes += len(encode_state(st))
        s_items = np.vstack([cache[it.name][:m] for it in st.items.values()])  # s(v) of each item
        plus_bytes += len(pickle.dumps(_pack_user(st) + (_raw(s_items),), protocol=pickle.HIGHEST_PROTOCOL))
        prev = PersonaSnapshot((), ())
        body_plain += len(json.dumps(persona_update(str(u), snap, prev, personas, "propagated", "propagation", 0.0)))
        body_evidence += len(json.dumps(persona_update(str(u), snap, prev, personas, "propagated", "propagation",
                                                       0.0, ev)))
    n = len(rows)
    summary = {
        "bench": "evidence", "users": n, "personas": m, "prototypes": len(labels),
        "state_bytes_per_user": round(now_bytes / n, 1),
        "state_growth_evidence": 0.0,
        "state_growth_if_rows_kept_s_v": round(plus_bytes / now_bytes - 1, 4),
        "update_bytes_plain": round(body_plain / n, 1), "update_bytes_with_evidence": round(body_evidence / n, 1),
        "stream_evidence_us": round(1e6 * t_evidence / n, 1), "stream_decide_us": round(1e6 * t_decide / n, 1),
        "stream_evidence_over_decide": round(t_evidence / t_decide, 3),
        "batch_evidence_s": round(t_evidence_batch, 2), "batch_affinity_model_decide_s": round(t_decide_batch, 2),
        "batch_evidence_over_decide": round(t_evidence_batch / t_decide_batch, 3),
    }
    print(f"state per user row {summary['state_bytes_per_user']:.0f} B; storing s(v) per item would add "
          f"{summary['state_growth_if_rows_kept_s_v']:.1%} (evidence adds 0: computed from the told values)")
    print(f"persona-updates body {summary['update_bytes_plain']:.0f} B -> "
          f"{summary['update_bytes_with_evidence']:.0f} B")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
