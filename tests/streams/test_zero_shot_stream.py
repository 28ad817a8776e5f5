"""The stream's zero-shot channel through the real broker: the refit ships the channel as catalogue
statistics (`core.zero_shot.CatalogueVotes`, no per-item lifts), the worker votes item names with
its own MiniLM, and every user's published personas are batch's decision with the same model on
the same state — including a persona no prototype holds, which only the channel can find.

A pet shop: bakers, gardeners and people who buy both are labeled; pet owners buy only pet goods
and nobody labeled holds "Pet Owners", so neither the graph nor the item-name channel (both learnt
from the labels) can give it; MiniLM reads it from the persona's definition.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.decoder import FEATURES, PersonaModel
from core.incremental import psi_raw
from core.personas import Persona, PersonaSet
from streams.refit import fit_graph_model, history_graph
from tests.streams.test_invariant import run_and_check, wait_settled

pytestmark = pytest.mark.broker

PERSONAS = PersonaSet([Persona("Home Bakers", "people who bake cakes, bread and pastries at home"),
                       Persona("Gardeners", "people who grow plants and flowers and look after their garden"),
                       Persona("Pet Owners", "people who care for their dogs and cats")])
POOLS = {
    "baker": ["round cake tin", "cake stand", "icing bag set", "bread loaf tin", "pastry cutter set", "rolling pin"],
    "gardener": ["garden hose reel", "garden gnome", "terracotta flower pot", "garden rake", "seed tray",
                 "watering can"],
    "pet": ["dog food bowl", "cat collar with bell", "dog lead", "cat scratching post", "dog chew toy",
            "cat litter tray"],
}
KINDS = ["baker"] * 16 + ["gardener"] * 16 + ["both"] * 10 + ["pet"] * 10
PET = 2


def pet_shop() -> tuple[pd.DataFrame, dict[str, list[int]], list[str]]:
    """(purchases, labels of every other baker / gardener / both, the pet owners' ids)."""
    rng = np.random.default_rng(7)
    ids = {name: f"I{j:02d}" for j, name in enumerate(n for pool in POOLS.values() for n in pool)}
    rows, labels = [], {}
    for u, kind in enumerate(KINDS):
        user = f"U{u:03d}"
        pool = POOLS["baker"] + POOLS["gardener"] if kind == "both" else POOLS[kind]
        for name in rng.choice(pool, size=4, replace=False):
            rows.append({"event_id": f"e{len(rows):05d}", "user_id": user, "item_id": ids[str(name)],
                         "item_name": str(name), "quantity": 1, "price": 2.5,
                         "ts": 1.7e9 + 60.0 * len(rows)})
        if kind != "pet" and u % 2 == 0:
            labels[user] = {"baker": [0], "gardener": [1], "both": [0, 1]}[kind]
    frame = pd.DataFrame(rows).sample(frac=1.0, random_state=3).reset_index(drop=True)  # users interleaved
    return frame, labels, [f"U{u:03d}" for u, k in enumerate(KINDS) if k == "pet"]


def test_the_worker_decides_with_the_zero_shot_channel_as_batch(stream_config, worker_factory, produce, tmp_path):
    from dataclasses import replace

    frame, labels, pets = pet_shop()
    path = tmp_path / "personas.json"
    path.write_text(PERSONAS.to_json())
    config = replace(stream_config, personas_path=path, worker_port=0, label_sources=("test",), eps=0.1)
    assert config.decoder == "model" and config.zero_shot  # the defaults
    assert sum(map(len, labels.values())) >= 16  # crosses the first refit milestone
    run_and_check(config, worker_factory, produce, frame, labels, len(PERSONAS))
    model, users = wait_settled(config, frame["user_id"].nunique(), timeout=240.0)

    assert model is not None and model.zero_shot is not None
    assert model.zero_shot.names == () and model.zero_shot.catalogue is not None  # statistics, not lifts
    assert model.decoder.coef[0, FEATURES.index("zero_shot")] > 0

    graph = history_graph(frame)  # batch: the same fit function on the same purchases and labels
    batch = fit_graph_model(graph, labels, len(PERSONAS), "expected_f1", config.top_k, PERSONAS)
    assert batch is not None
    # the same fit on the same features: MiniLM's votes are the same bits in the worker and here
    np.testing.assert_allclose(np.asarray(batch["decoder"]["coef"]), model.decoder.coef, rtol=1e-12, atol=1e-12)
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    streamed = np.vstack([psi_raw(users[str(u)]) for u in graph.user_ids])
    # batch's vectorised decision (features from the graph, names voted in this process) with the
    # shipped model on the streamed Ψ̂_raw: the same model and state as the worker's
    idx, _ = model.decide(graph, streamed)
    checked = 0
    for uid, row in index.items():
        state = users[uid]
        if state.label is not None:
            continue
        want = {int(i) for i in idx[row] if i >= 0}
        assert set(state.published) == want, uid
        decided = model.decide_user(psi_raw(state), state.text, len(state.items))  # the worker's own call
        assert set(decided.personas) == want, uid
        checked += 1
    assert checked == len(KINDS) - len(labels)
    assert not any(PET in p for p in labels.values())
    assert all(PET in users[u].published for u in pets)  # found through the channel alone:
    plain = fit_graph_model(graph, labels, len(PERSONAS), "expected_f1", config.top_k)  # GPLR_ZERO_SHOT=false
    assert plain is not None and not np.any(PersonaModel.from_dict(plain).decide(graph, streamed)[0] == PET)
