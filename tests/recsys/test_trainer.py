"""The trainer (recsys.trainer) and its service (streams.trainer_service): state rebuilt from
topic records, configuration, ranking against brute force, persona cold start (users and
items), its own metrics endpoint, and one full cycle through the embedded broker."""
from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import iter_events
from core.synthetic import make_shop
from recsys.data import carve_validation, persona_matrix
from recsys.graph import build_graph
from recsys.models import make_model
from recsys.train import TrainConfig, fit
from recsys.trainer import (
    AUTO_CANDIDATES,
    GraphState,
    TrainerConfig,
    choose_models,
    recommend,
    recommendation_record,
    train_model,
)
from streams import metrics
from streams.broker import free_port
from streams.config import ConfigError
from streams.topics import Topics, create_topics
from streams.trainer_service import TrainerService, start_trainer_metrics, trainer_metric_names
from tests.kafka_fixtures import consume, make_config, produce

FAST = TrainerConfig(epochs=15, dim=16, n_eigen=32, top_k=5, metrics_port=0, patience=5, batch_size=256, lr=0.01)


def _update(user: str, shop, personas) -> dict:
    """A persona-updates body as the stream worker publishes it."""
    return {"user": user, "personas": [{"idx": m, "name": shop.personas[m].name, "score": 1.0} for m in personas],
            "previous": [], "reason": "label", "labelled_by": "test", "ts": 0.0, "source_ts": 0.0}


@pytest.fixture(scope="module")
def shop():
    return make_shop(n_users=120, n_items=70, n_personas=5, seed=4, mean_purchases=8)


@pytest.fixture(scope="module")
def state(shop) -> GraphState:
    st = GraphState(shop.personas)
    for event in iter_events(shop.frame):
        st.add_purchase(event.to_json())
    for u in sorted(shop.user_truth)[:60]:
        st.set_personas(_update(u, shop, shop.user_truth[u]))
    return st


# -- state -------------------------------------------------------------------------------------
def test_state_counts_edges_once(shop) -> None:
    st = GraphState(shop.personas)
    events = list(iter_events(shop.frame))
    added = sum(st.add_purchase(e.to_json()) for e in events)
    pairs = shop.frame[["user_id", "item_id"]].drop_duplicates()
    assert added == st.n_edges == st.new_edges == len(pairs)
    assert st.n_users == shop.frame["user_id"].nunique() and st.n_items == shop.frame["item_id"].nunique()
    assert not any(st.add_purchase(e.to_json()) for e in events[:50])  # replayed duplicates
    m = st.interactions()
    assert m.nnz == len(pairs) and m.shape == (st.n_users, st.n_items)
    u = st.user_ids.index(events[0].user_id)
    bought = set(shop.frame.loc[shop.frame["user_id"] == events[0].user_id, "item_id"])
    assert {st.item_ids[i] for i in m[u].indices} == bought
    assert st.changed == set(range(st.n_users))


def test_state_rejects_bad_records_and_keeps_going(shop) -> None:
    st = GraphState(shop.personas)
    assert not st.add_purchase(b"{not json")
    assert not st.add_purchase(json.dumps({"event_id": "e", "user_id": "u", "item_id": "i", "quantity": -1,
                                           "price": 1.0, "ts": 0}))
    assert not st.set_personas(b"[1, 2]")
    assert st.rejected == 3 and st.n_users == 0
    ok = {"event_id": "e1", "user_id": "u", "item_id": "i", "item_name": "Mug", "quantity": 1, "price": 1.0, "ts": 0}
    assert st.add_purchase(json.dumps(ok)) and st.item_names == ["Mug"]


def test_persona_updates_match_names_then_indices(shop) -> None:
    st = GraphState(shop.personas)
    name = shop.personas[3].name
    assert st.set_personas({"user": "a", "personas": [{"idx": 0, "name": name}, {"idx": 1, "name": "Ghost"},
                                                       {"idx": 99}]})
    assert st.user_personas[0] == (1, 3)  # the name wins over idx 0; an unknown name falls back to idx
    assert not st.set_personas({"user": "a", "personas": [{"name": name}, {"idx": 1}]})  # same set
    assert st.set_personas(json.dumps({"personas": []}).encode(), key="a")  # key names the user
    assert 0 not in st.user_personas and st.persona_matrix() is None
    assert st.changed == {0}
    # the stream's stand-in for a user no prototype reaches yet adds no persona edges
    assert not st.set_personas({"user": "a", "reason": "prior", "personas": [{"idx": 2, "name": name}]})
    assert 0 not in st.user_personas


# -- configuration -----------------------------------------------------------------------------
def test_config_from_env() -> None:
    assert TrainerConfig.from_env({}) == TrainerConfig()
    env = {"GPLR_TRAIN_INTERVAL_S": "5", "GPLR_TRAIN_AFTER_EDGES": "7", "GPLR_TRAINER_MODEL": "LightGCN",
           "GPLR_RECS_K": "3", "GPLR_METRICS_PORT": "9200"}
    cfg = TrainerConfig.from_env(env)
    assert (cfg.interval_s, cfg.after_edges, cfg.model, cfg.top_k, cfg.metrics_port) == (5.0, 7, "lightgcn", 3, 9200)
    assert TrainerConfig.from_env({**env, "GPLR_TRAINER_METRICS_PORT": "9300"}).metrics_port == 9300
    with pytest.raises(ConfigError, match="GPLR_TRAIN_AFTER_EDGES"):
        TrainerConfig.from_env({"GPLR_TRAIN_AFTER_EDGES": "many"})
    with pytest.raises(ConfigError, match="GPLR_TRAINER_MODEL"):
        TrainerConfig.from_env({"GPLR_TRAINER_MODEL": "gpt"})
    with pytest.raises(ConfigError, match="GPLR_RECS_K"):
        TrainerConfig(top_k=0)


def test_choose_models() -> None:
    auto = TrainerConfig()
    assert choose_models(auto, True) == ("ease", "ease-persona") and choose_models(auto, False) == ("ease",)
    assert choose_models(replace(auto, model="lgcn3"), False) == ("lgcn",)
    assert choose_models(replace(auto, model="ease-persona"), False) == ("ease",)
    assert choose_models(replace(auto, model="mf"), True) == ("mf",)
    with pytest.raises(ConfigError, match="GPLR_TRAINER_RESELECT_EVERY"):
        TrainerConfig(reselect_every=0)


# -- ranking -----------------------------------------------------------------------------------
def test_recommendations_match_brute_force(state: GraphState) -> None:
    torch.set_num_threads(1)
    trained = train_model(state, FAST, version=1)
    assert trained.name in AUTO_CANDIDATES and trained.epochs >= 1 and 0.0 < trained.valid_ndcg <= 1.0
    # the winner is the better of the two on validation
    sel = trained.selection
    assert sel.valid_ndcg[trained.name] == max(sel.valid_ndcg.values()) and set(sel.valid_ndcg) == set(AUTO_CANDIDATES)
    users = np.arange(state.n_users)
    recs = recommend(trained, users, k=5)
    scores = trained.model.full_sort_scores(torch.as_tensor(users)).detach().numpy()
    known = trained.known.toarray() > 0
    for u in users:
        masked = np.where(known[u], -np.inf, scores[u])
        expected = np.sort(masked)[::-1][:5]
        got = [s for _, s in recs[int(u)]]
        assert np.allclose(got, expected, atol=1e-5)          # the 5 best unbought scores, in order
        assert not any(known[u, i] for i, _ in recs[int(u)])  # never an item already bought


def _with_newcomer(shop, persona: int) -> GraphState:
    """Every purchase, personas for half the users, and a newcomer known only by `persona`."""
    st = GraphState(shop.personas)
    for event in iter_events(shop.frame):
        st.add_purchase(event.to_json())
    for u in sorted(shop.user_truth)[:60]:
        st.set_personas(_update(u, shop, shop.user_truth[u]))
    st.set_personas(_update("newcomer", shop, (persona,)))
    return st


def test_cold_user_known_only_by_personas(shop, state: GraphState) -> None:
    st = _with_newcomer(shop, 2)
    trained = train_model(st, FAST, version=1)
    new = st.user_ids.index("newcomer")
    recs = recommend(trained, np.array([new]), k=5)[new]
    assert len(recs) == 5
    expected = trained.persona_model()[0].cold_user_scores([2]).detach().numpy()
    assert [i for i, _ in recs] == list(np.argsort(-expected, kind="stable")[:5])
    # the persona's own items rank above the rest on average
    own = np.array([2 in shop.item_personas[st.item_ids[i]] for i in range(st.n_items)])
    assert expected[own].mean() > expected[~own].mean()


def test_cached_selection_costs_one_solve_and_a_plain_winner_leaves_cold_users_to_the_persona_model(
        shop, state: GraphState) -> None:
    first = train_model(state, FAST, version=1)
    again = train_model(state, FAST, version=2, previous=first)
    assert again.selection is first.selection and again.name == first.name and again.epochs == 1
    assert again.model.weights_ is first.model.weights_  # nothing changed: nothing recomputed
    # reselected after `reselect_every` cycles
    assert train_model(state, replace(FAST, reselect_every=2), version=3, previous=first).selection.version == 3
    # a plain winner: persona-only users are ranked (and named) by the persona variant
    st = _with_newcomer(shop, 3)
    plain_wins = replace(first, selection=replace(first.selection, winner="ease"))
    trained = train_model(st, FAST, version=2, previous=plain_wins)
    assert trained.name == "ease" and trained.cold_name == "ease-persona"
    new = st.user_ids.index("newcomer")
    recs = recommend(trained, np.array([0, new]), k=5)
    expected = trained.cold_model.cold_user_scores([3]).numpy()
    assert [i for i, _ in recs[new]] == list(np.argsort(-expected, kind="stable")[:5])
    assert recommendation_record(st, new, recs[new], trained)["model"] == "ease-persona"
    assert recommendation_record(st, 0, recs[0], trained)["model"] == "ease"


def test_new_item_with_labeled_personas_gets_recommended(shop) -> None:
    """An item nobody bought yet, connected only to the personas a labeler gave it, reaches the
    users of those personas (LGCN3's persona nodes; cold_item_scores ranks users for it)."""
    torch.set_num_threads(1)
    st = GraphState(shop.personas)
    for event in iter_events(shop.frame):
        st.add_purchase(event.to_json())
    users = st.user_ids
    user_p = persona_matrix([shop.user_truth[u] for u in users], len(shop.personas))
    known = st.interactions()
    n_i = known.shape[1]
    item_p = [shop.item_personas[i] for i in st.item_ids] + [(1,)]  # the new item: persona 1 only
    fit_m, valid = carve_validation(known, 0.1, 0)
    padded = lambda m: m.__class__((m.data, m.indices, m.indptr), shape=(m.shape[0], n_i + 1))  # noqa: E731
    graph = build_graph(padded(fit_m), user_p, persona_matrix(item_p, len(shop.personas)))
    model = make_model("lgcn3", graph, dim=16, n_eigen=32, seed=0)
    fit(model, padded(fit_m), padded(valid), TrainConfig(epochs=15, lr=5e-3, patience=15))
    has = np.array([1 in shop.user_truth[u] for u in users])
    scores = model.full_sort_scores(torch.arange(len(users))).detach().numpy()
    rank = (scores > scores[:, [n_i]]).sum(axis=1)  # 0 = the new item is the user's best
    assert np.median(rank[has]) < np.median(rank[~has])
    cold = model.cold_item_scores([1]).detach().numpy()
    assert cold[has].mean() > cold[~has].mean()


# -- metrics -----------------------------------------------------------------------------------
def test_trainer_metrics_endpoint_serves_only_trainer_metrics() -> None:
    names = trainer_metric_names()
    assert names == sorted(["gplr_trainer_last_train_seconds", "gplr_trainer_epochs",
                            "gplr_trainer_validation_ndcg", "gplr_trainer_recommendations_total",
                            "gplr_trainer_last_success_timestamp_seconds"])
    port = free_port()
    server = start_trainer_metrics(port, addr="127.0.0.1")
    try:
        metrics.TRAINER_EPOCHS.set(7)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    served = {line.split()[0].split("{")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "gplr_trainer_epochs 7.0" in text
    assert all(n.startswith("gplr_trainer_") for n in served)
    assert {n for n in names} <= served | {"gplr_trainer_recommendations_total"}
    assert start_trainer_metrics(0) is None


# -- end to end through the broker -------------------------------------------------------------
@pytest.mark.broker
def test_one_cycle_through_the_broker(broker, tmp_path: Path) -> None:  # noqa: F811
    torch.set_num_threads(1)
    shop = make_shop(n_users=80, n_items=60, n_personas=4, seed=9, mean_purchases=6)
    stream = make_config(broker.bootstrap, tmp_path / "data")
    topics = Topics(stream.topic_prefix)
    create_topics(stream.kafka_bootstrap, topics.public(), stream.partitions)
    produce(stream.kafka_bootstrap, topics.purchases, list(iter_events(shop.frame)) + [b"{broken"])
    labeled = sorted(shop.user_truth)[:30]
    produce(stream.kafka_bootstrap, topics.persona_updates,
            [_update(u, shop, shop.user_truth[u]) for u in labeled] + [_update("newcomer", shop, (1,))],
            key=lambda r: r["user"])
    service = TrainerService(stream, FAST)
    published = service.run(once=True)
    users = set(shop.user_truth) | {"newcomer"}
    assert published == len(users)
    records = consume(stream.kafka_bootstrap, topics.recommendations, until=lambda r: len(r) >= len(users))
    by_user = {r["user_id"]: r for r in records}
    assert set(by_user) == users and len(records) == len(users)
    bought = shop.frame.groupby("user_id")["item_id"].agg(set).to_dict()
    names = dict(zip(shop.frame["item_id"], shop.frame["item_name"]))
    for user, rec in by_user.items():
        ranked_by = service.trained.persona_model()[1] if user == "newcomer" else service.trained.name
        assert rec["model"] == ranked_by and rec["model_version"] == 1
        items = [it["item_id"] for it in rec["items"]]
        assert len(items) == FAST.top_k == len(set(items))
        assert not set(items) & bought.get(user, set())
        assert all(names[it["item_id"]] == it["item_name"] for it in rec["items"])
        scores = [it["score"] for it in rec["items"]]
        assert scores == sorted(scores, reverse=True)
    assert metrics.TRAINER_LAST_SUCCESS._value.get() > 0  # noqa: SLF001
    assert service.state.changed == set() and service.state.rejected == 1


@pytest.mark.broker
def test_service_retrains_after_new_edges_and_publishes_only_changed_users(broker, tmp_path: Path) -> None:  # noqa: F811
    import threading

    torch.set_num_threads(1)
    shop = make_shop(n_users=60, n_items=50, n_personas=4, seed=11, mean_purchases=6)
    stream = make_config(broker.bootstrap, tmp_path / "data")
    topics = Topics(stream.topic_prefix)
    create_topics(stream.kafka_bootstrap, topics.public(), stream.partitions)
    produce(stream.kafka_bootstrap, topics.purchases, list(iter_events(shop.frame)))
    service = TrainerService(stream, replace(FAST, after_edges=6, interval_s=3600.0))
    stop = threading.Event()
    worker = threading.Thread(target=service.run, kwargs={"stop": stop}, daemon=True)
    worker.start()
    try:
        n_users = shop.frame["user_id"].nunique()
        first = consume(stream.kafka_bootstrap, topics.recommendations, until=lambda r: len(r) >= n_users)
        assert len(first) == n_users and {r["model"] for r in first} == {"ease"}  # no personas yet
        bought = shop.frame.groupby("user_id")["item_id"].agg(set).to_dict()
        movers = sorted(bought)[:3]
        new = []
        for j, user in enumerate(movers):  # two items each that the user has not bought: 6 new edges
            fresh = [i for i in sorted(set(shop.frame["item_id"])) if i not in bought[user]][:2]
            new += [{"event_id": f"new-{j}-{i}", "user_id": user, "item_id": i, "item_name": i,
                     "quantity": 1, "price": 1.0, "ts": 2e9} for i in fresh]
        produce(stream.kafka_bootstrap, topics.purchases, new)
        records = consume(stream.kafka_bootstrap, topics.recommendations,
                          until=lambda r: len(r) >= n_users + len(movers), timeout=60)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert not worker.is_alive()
    second = [r for r in records if r["model_version"] == 2]
    assert sorted(r["user_id"] for r in second) == movers  # only users whose graph changed
    for r in second:
        got = {it["item_id"] for it in r["items"]}
        assert not got & (bought[r["user_id"]] | {e["item_id"] for e in new if e["user_id"] == r["user_id"]})


def test_trainer_command_refuses_without_a_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    from core.cli import main

    monkeypatch.setenv("KAFKA_BOOTSTRAP", "")
    with pytest.raises(SystemExit, match="KAFKA_BOOTSTRAP"):
        main(["trainer", "--once"])
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:9")
    monkeypatch.setenv("GPLR_TRAIN_INTERVAL_S", "soon")
    with pytest.raises(SystemExit, match="GPLR_TRAIN_INTERVAL_S"):
        main(["trainer", "--once"])


def test_failed_cycle_keeps_changes_and_backs_off(monkeypatch: pytest.MonkeyPatch, shop) -> None:
    from streams import trainer_service as trainer_module
    from streams.config import StreamConfig

    service = TrainerService(StreamConfig(kafka_bootstrap="127.0.0.1:9"), replace(FAST, after_edges=1))
    for event in list(iter_events(shop.frame))[:40]:
        service.state.add_purchase(event.to_json())
    changed, edges = set(service.state.changed), service.state.new_edges
    assert service._due(caught_up=True) and not service._due(caught_up=False)  # noqa: SLF001

    def broken(*_args, **_kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(trainer_module, "train_model", broken)
    assert service.cycle() == 0
    assert service.trained is None and service.state.changed == changed and service.state.new_edges == edges
    assert not service._due(caught_up=True)  # noqa: SLF001 - no hot retry loop


@pytest.mark.slow
@pytest.mark.broker
def test_trainer_command_serves_metrics_and_stops_on_sigterm(broker, tmp_path: Path) -> None:  # noqa: F811
    import os
    import signal
    import subprocess
    import sys

    shop = make_shop(n_users=50, n_items=40, n_personas=4, seed=1, mean_purchases=5)
    stream = make_config(broker.bootstrap, tmp_path / "data")
    topics = Topics(stream.topic_prefix)
    create_topics(stream.kafka_bootstrap, topics.public(), stream.partitions)
    produce(stream.kafka_bootstrap, topics.purchases, list(iter_events(shop.frame)))
    port = free_port()
    env = {**os.environ, **stream.as_env(), "GPLR_TRAINER_METRICS_PORT": str(port), "GPLR_TRAINER_EPOCHS": "5",
           "GPLR_RECS_K": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "core.cli", "trainer"], env=env,
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        n_users = shop.frame["user_id"].nunique()
        recs = consume(stream.kafka_bootstrap, topics.recommendations, until=lambda r: len(r) >= n_users, timeout=120)
        assert len(recs) == n_users and all(len(r["items"]) == 3 for r in recs)
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert f"gplr_trainer_recommendations_total {float(n_users)}" in text
        assert "gplr_events_in_total" not in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
