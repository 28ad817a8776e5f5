"""A refit given the personas ships the zero-shot channel, and the worker's calls on the shipped
model decide as the batch model does (no Kafka; MiniLM on a small synthetic catalogue)."""
from __future__ import annotations

import json

import numpy as np

from core.affinity import exact_affinity, prototype_matrix
from core.data import iter_events
from core.decoder import PersonaModel
from core.synthetic import make_shop
from streams.refit import build_graph, decode_model, encode_model, fit_stream_model


def test_a_refit_with_personas_ships_the_zero_shot_channel_the_worker_decides_with() -> None:
    shop = make_shop(n_users=160, n_items=60, n_personas=5, seed=4)
    purchases = [e.to_json() for e in iter_events(shop.frame)]
    prototypes = {u: shop.user_truth[u] for u in list(shop.user_truth)[:30]}
    plain = fit_stream_model(purchases, prototypes, 5, "expected_f1", 5)
    shipped = fit_stream_model(purchases, prototypes, 5, "expected_f1", 5, personas=shop.personas)
    assert plain is not None and "zero_shot" not in plain  # without the personas: the model as before
    assert shipped is not None and shipped["zero_shot"]["personas"] == 5
    # the catalogue's statistics, not per-item lifts: the worker votes names itself
    assert shipped["zero_shot"]["names"] == [] and shipped["zero_shot"]["catalogue"]["size"] == 60
    version, model = decode_model(encode_model(3, json.loads(json.dumps(shipped))))
    assert version == 3 and model.zero_shot is not None
    assert model.decoder.coef[0, 3] != 0.0  # the channel carries weight

    graph = build_graph(purchases)
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    rows = {index[u]: p for u, p in prototypes.items()}
    psi = exact_affinity(graph, prototype_matrix(graph.n_users, rows, 5))
    idx, _ = model.decide(graph, psi)
    again = PersonaModel.from_dict(shipped)
    np.testing.assert_array_equal(again.decide(graph, psi)[0], idx)
    for u in range(0, graph.n_users, 7):  # the worker: one new distinct item at a time
        text = None
        names = [str(graph.item_names[v]) for v in graph.user_item[u].indices]
        for name in names:
            text = model.add_text(text, [name])
        assert model.decide_user(psi[u], text, len(names)).personas == tuple(int(i) for i in idx[u] if i >= 0)
