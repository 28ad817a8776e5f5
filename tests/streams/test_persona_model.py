"""The stream decides with the persona model (`core.decoder`) refitted on its own prototypes.

Through the real broker: labels published up front cross the label milestones, the refit worker
fits the model with the batch function and ships it through the `persona-model` table, every
worker re-decides its users. Afterwards both channels match the batch computation: Ψ̂_raw within
the relative bound (graph), the word-count text state exactly (text) and the zero-shot state up to
MiniLM's float noise between processes, and each user's published personas are the model's
decision on those rows.
"""
from __future__ import annotations

import numpy as np
import pytest

from core.graph import BipartiteGraph
from core.incremental import psi_raw
from core.item_channel import user_text_logits
from core.synthetic import make_shop
from streams.refit import milestone
from tests.streams.test_invariant import _labels_for, _shop_config, run_and_check, wait_model

pytestmark = pytest.mark.broker


def test_stream_decides_with_the_refitted_persona_model(stream_config, worker_factory, produce, tmp_path):
    shop = make_shop(n_users=150, n_items=80, n_personas=6, seed=3, mean_purchases=6)
    config = _shop_config(stream_config, shop, tmp_path, eps=0.1)
    labels = _labels_for(shop.user_truth, 0.15, 0)
    run_and_check(config, worker_factory, produce, shop.frame, labels, len(shop.personas))
    version = milestone(sum(len(p) for p in labels.values()))
    assert version >= 16
    model, users = wait_model(config, version, len(shop.user_truth))

    graph = BipartiteGraph.from_frame(shop.frame)
    batch_text = user_text_logits(graph, model.channel)  # text logits from the batch graph
    assert model.zero_shot is not None  # GPLR_ZERO_SHOT's default: its state rides in front of the words'
    head = model.decoder.n_personas + 1
    checked = 0
    for row, uid in enumerate(graph.user_ids):
        state = users[str(uid)]
        if state.label is not None:
            continue
        names = [it.name for it in state.items.values()]
        want = model.add_text(None, names)
        np.testing.assert_allclose(state.text[head:], want[head:], atol=1e-9)  # the word state: exact
        # Σ s(v) and n: the same votes to the bit in both processes (core.embedding_cache), summed one
        # item at a time in the worker: only the order of the float additions differs
        np.testing.assert_allclose(state.text[:head], want[:head], rtol=1e-12)
        np.testing.assert_allclose(model.channel.text_logit(state.text[head:]), batch_text[row], atol=1e-9)
        decided = model.decide_user(psi_raw(state), state.text, len(state.items))
        assert set(state.published) == set(decided.personas), uid
        checked += 1
    assert checked >= 100
    sizes = [len(users[str(u)].published) for u in graph.user_ids if users[str(u)].label is None]
    assert 1 <= min(sizes) and max(sizes) <= config.top_k
