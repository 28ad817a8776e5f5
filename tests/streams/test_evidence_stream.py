"""The stream's evidence (from a user row's told values and the shipped item channel) is the
batch evidence (`gplr label`) for the same state: through `LocalNetwork` in any delivery order
with duplicates, and through the worker's agent bodies (`StreamLogic`) into the JSON body of a
`persona-updates` record."""
from __future__ import annotations

import json

import numpy as np
import pytest

from core.affinity import exact_affinity, prototype_matrix, top_personas
from core.data import iter_events
from core.decoder import fit_persona_model
from core.evidence import TOP_ITEMS, batch_evidence, item_values, state_evidence
from core.graph import BipartiteGraph
from core.incremental import LocalNetwork, PersonaSnapshot, psi_raw
from core.synthetic import make_shop
from streams.agents import Out
from streams.records import encode_label, partition_for
from tests.streams.test_idempotence import Log, _logic, _purchase

M = 5  # the persona count of test_idempotence's `_logic`
EXACT = 1e-12  # ε so small that every item pushes on every change: the told values are exact


def _same(stream: list[dict], batch: list[dict]) -> None:
    assert [e["item_id"] for e in stream] == [e["item_id"] for e in batch]
    assert [e["channel"] for e in stream] == [e["channel"] for e in batch]
    assert [e["name"] for e in stream] == [e["name"] for e in batch]
    np.testing.assert_allclose([e["share"] for e in stream], [e["share"] for e in batch], atol=2e-6)


@pytest.fixture(scope="module")
def shop():
    return make_shop(n_users=90, n_items=45, n_personas=M, seed=4, mean_purchases=6)


def _labels(shop, seed: int, share: float = 0.2) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    users = sorted(shop.user_truth)
    pick = rng.choice(len(users), int(share * len(users)), replace=False)
    return {users[i]: sorted(shop.user_truth[users[i]]) for i in pick if shop.user_truth[users[i]]}


def _batch(shop, labels):
    graph = BipartiteGraph.from_frame(shop.frame)
    row = {str(u): i for i, u in enumerate(graph.user_ids)}
    phi = prototype_matrix(graph.n_users, {row[u]: p for u, p in labels.items()}, M)
    return graph, row, phi


@pytest.mark.parametrize("seed", [0, 1])
def test_local_network_evidence_equals_batch(shop, seed):
    labels = _labels(shop, seed)
    graph, row, phi = _batch(shop, labels)
    net = LocalNetwork(M, eps=EXACT)
    rng = np.random.default_rng(seed)
    for user, item, name in shop.frame[["user_id", "item_id", "item_name"]].astype(str).itertuples(index=False):
        net.purchase(user, item)
        net.user(user).items[item].name = name  # LocalNetwork keeps no names; the worker does
    for user, personas in labels.items():
        net.label(user, personas)
    net.deliver(rng=rng, dup=0.2)
    idx, _ = top_personas(exact_affinity(graph, phi), 3)
    batch = batch_evidence(graph, idx, item_values(graph, phi))
    compared = 0
    for user, u in row.items():
        stream = state_evidence(net.users[user], idx[u])
        for j, m in enumerate(idx[u]):
            _same(stream[int(m)], batch[u][j])
            compared += len(batch[u][j])
            assert len(stream[int(m)]) <= TOP_ITEMS
    assert compared > 3 * len(row)


def test_worker_persona_updates_carry_the_batch_evidence(shop):
    """Agent bodies over in-memory tables, messages in random order; then the shipped persona
    model decides and every user's published record is compared with batch on the same graph."""
    labels = _labels(shop, 3)
    graph, row, phi = _batch(shop, labels)
    logic = _logic(eps=EXACT)
    log = Log(logic, np.random.default_rng(3))
    for event in iter_events(shop.frame):
        log.append(_purchase(logic, event))
    for user, personas in labels.items():
        log.append([Out("user_ops", user, encode_label(user, personas, [], "t"),
                        partition_for(user, logic.config.partitions))])
    log.drain()
    model = fit_persona_model(graph, {row[u]: p for u, p in labels.items()}, M)
    logic.model, logic.model_version = model, 1
    idx = np.full((graph.n_users, M), -1)
    bodies = {}
    for user, u in row.items():
        state = logic.tables.users.get(user)
        snap = logic.snapshot(state, psi_raw(state))[0] if state.label is None else \
            PersonaSnapshot(state.label_personas, (1.0,) * len(state.label_personas))
        out = logic._update(user, state, snap, None, "replay", 0.0)
        bodies[user] = json.loads(json.dumps(out.value))  # what a consumer of the topic reads
        idx[u, : len(snap.personas)] = snap.personas
    batch = batch_evidence(graph, idx, item_values(graph, phi), model.channel.item_scores(list(graph.item_names)),
                           model.channel.intercept)
    channels = set()
    for user, u in row.items():
        personas = bodies[user]["personas"]
        assert [p["idx"] for p in personas] == [int(m) for m in idx[u] if m >= 0]
        for j, p in enumerate(personas):
            _same(p["evidence"], batch[u][j])
            channels.update(e["channel"] for e in p["evidence"])
            assert all(0 < e["share"] <= 1 for e in p["evidence"])
    assert channels == {"graph", "text"}, channels


@pytest.mark.broker
def test_persona_updates_carry_evidence_through_the_broker(stream_config, worker_factory, produce, tmp_path,
                                                           monkeypatch, capsys):
    """A real worker: every persona of every persona-updates record lists its evidence (items the
    customer bought, shares of the score, largest first), and `gplr explain USER` without --from
    prints the latest record from the topic."""
    from core.cli import main
    from streams.topic_io import latest_personas, read_topic
    from streams.topics import Topics
    from tests.streams.test_invariant import _labels_for, _shop_config, run_and_check, wait_settled

    shop = make_shop(n_users=100, n_items=60, n_personas=6, seed=5, mean_purchases=6)
    config = _shop_config(stream_config, shop, tmp_path, eps=0.05)
    users = run_and_check(config, worker_factory, produce, shop.frame, _labels_for(shop.user_truth, 0.15, 2),
                          len(shop.personas))
    wait_settled(config, len(users))  # the final refit's updates have been sent
    records = read_topic(config.kafka_bootstrap, Topics(config.topic_prefix).persona_updates)
    listed = 0
    for record in records:
        bought = users[record["user"]].items
        for p in record["personas"]:
            evidence = p["evidence"]
            assert len(evidence) <= TOP_ITEMS
            assert all(e["item_id"] in bought and e["name"] == bought[e["item_id"]].name for e in evidence)
            assert all(0 < e["share"] <= 1 for e in evidence) and sum(e["share"] for e in evidence) <= 1 + 1e-5
            assert [e["share"] for e in evidence] == sorted((e["share"] for e in evidence), reverse=True)
            listed += len(evidence)
    assert listed > len(records)
    latest = latest_personas(records)
    user, record = next((u, r) for u, r in sorted(latest.items()) if r["personas"] and r["personas"][0]["evidence"])
    monkeypatch.setenv("KAFKA_BOOTSTRAP", config.kafka_bootstrap)
    monkeypatch.setenv("GPLR_TOPIC_PREFIX", config.topic_prefix)
    capsys.readouterr()
    assert main(["explain", user, "--timeout", "30"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"customer {user} (stream; ")
    for p in record["personas"]:
        assert p["name"] in text and all(e["name"] in text for e in p["evidence"])
