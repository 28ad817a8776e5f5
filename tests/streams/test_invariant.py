"""THE INVARIANT through the real broker: after the input drains, every user's streamed Ψ̂_raw
(read from the users table's changelog) is within the restated, relative bound of core's exact
Ψ_raw on the final graph and labels, ‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ ≤ (ε/2)‖Ψ_raw[u]‖₁ (so the user's
persona distribution is within ε in L1) — with one worker, and with two worker processes sharing
the partitions."""
from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from confluent_kafka import Consumer

from core.affinity import exact_affinity, prototype_matrix
from core.data import iter_events
from core.graph import BipartiteGraph
from core.incremental import psi_raw, threshold
from core.synthetic import make_shop
from streams.agents import ITEM_OPS, USER_OPS
from streams.metrics import measure_lag
from streams.records import label_record
from streams.tables import read_table
from streams.topics import Topics, create_topics

pytestmark = pytest.mark.broker

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "online_retail"


def group_lag(config, topics: Iterable[str]) -> int:
    """Total committed lag of the app's consumer group over `topics` (all partitions)."""
    consumer = Consumer({"bootstrap.servers": config.kafka_bootstrap, "group.id": config.app_id,
                         "enable.auto.commit": False, "log_level": 3})
    try:
        meta = consumer.list_topics(timeout=10).topics
        parts = [(t, p) for t in topics for p in meta[t].partitions]
        return sum(measure_lag(consumer, parts).values())
    finally:
        consumer.close()


def wait_group_stable(config, members: int, timeout: float = 60.0) -> None:
    """Block until the app's consumer group is Stable with `members` members, each assigned.

    Producing only then keeps a start-up rebalance out of the measured run: the invariant is
    about the arithmetic, and a worker joining mid-stream is the reliability tests' business.
    """
    from confluent_kafka import ConsumerGroupState
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": config.kafka_bootstrap, "log_level": 3})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            group = admin.describe_consumer_groups([config.app_id])[config.app_id].result(10)
            if (group.state == ConsumerGroupState.STABLE and len(group.members) == members
                    and all(m.assignment and m.assignment.topic_partitions for m in group.members)):
                return
        except Exception:  # the group does not exist yet
            pass
        time.sleep(0.5)
    raise AssertionError(f"consumer group {config.app_id} not stable with {members} members")


def wait_drained(config, n_users: int, timeout: float = 90.0) -> dict[str, Any]:
    """Block until the group has committed everything and every expected user is in the table
    with all its edges answered; return the users table."""
    names = Topics(config.topic_prefix)
    topics = [names.purchases, names.labels, names.name(USER_OPS), names.name(ITEM_OPS)]
    deadline = time.monotonic() + timeout
    users: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if group_lag(config, topics) == 0:
            time.sleep(1.5)  # a last commit's changelog writes, and pushes it caused
            if group_lag(config, topics) == 0:
                users = read_table(config.kafka_bootstrap, config.app_id, "users", timeout=max(30.0, timeout / 3))
                if len(users) >= n_users and all(
                    it.seq >= 0 for s in users.values() for it in s.items.values()
                ):
                    return users
        time.sleep(0.5)
    raise AssertionError(f"stream did not drain in {timeout}s ({len(users)} users read)")


def run_and_check(config, worker_factory, produce, frame: pd.DataFrame, labels: dict[str, list[int]],
                  n_personas: int, workers: int = 1, timeout: float = 90.0) -> dict[str, Any]:
    """Publish half the purchases, the labels, then the rest; drain; compare with exact Ψ_raw."""
    names = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, names.all(), config.partitions)
    procs = [worker_factory(config if i == 0 else _second(config, i)) for i in range(workers)]
    for proc in procs:
        proc.wait_ready(90)
    wait_group_stable(config, workers)
    events = list(iter_events(frame))
    half = len(events) // 2
    produce(config.kafka_bootstrap, names.purchases, events[:half])
    produce(config.kafka_bootstrap, names.labels,
            [label_record(u, p, [1.0] * len(p), "test") for u, p in labels.items()],
            key=lambda r: r["user"])
    produce(config.kafka_bootstrap, names.purchases, events[half:])
    graph = BipartiteGraph.from_frame(frame)
    users = wait_drained(config, graph.n_users, timeout)
    index = {str(u): i for i, u in enumerate(graph.user_ids)}
    phi = prototype_matrix(graph.n_users, {index[u]: p for u, p in labels.items() if u in index}, n_personas)
    exact = exact_affinity(graph, phi, hops=1)
    streamed = np.vstack([psi_raw(users[str(u)]) for u in graph.user_ids])
    assert_within_bound(streamed, exact, config.eps)
    assert exact.max() > 0.05  # the labels really propagated (not a trivially zero check)
    degrees = np.array([users[str(u)].degree for u in graph.user_ids])
    np.testing.assert_array_equal(degrees, graph.user_degree)
    counts = {str(u): sum(it.count for it in users[str(u)].items.values()) for u in graph.user_ids}
    assert counts == frame.groupby("user_id").size().astype(int).to_dict()
    return users


def assert_within_bound(streamed: np.ndarray, exact: np.ndarray, eps: float) -> None:
    """‖Ψ̂_raw[u] − Ψ_raw[u]‖₁ ≤ (ε/2)‖Ψ_raw[u]‖₁ for every user, and the distributions within ε."""
    err = np.abs(streamed - exact).sum(axis=1)
    mass = exact.sum(axis=1)
    worst = int(np.argmax(err - threshold(eps) * mass))
    assert np.all(err <= threshold(eps) * mass + 1e-9), \
        f"user row {worst}: ‖Ψ̂ − Ψ‖₁ = {err[worst]:.3g} > (ε/2)·{mass[worst]:.3g}"
    reached = mass > 0
    q_s = streamed[reached] / np.maximum(streamed[reached].sum(axis=1, keepdims=True), 1e-300)
    q_e = exact[reached] / mass[reached, None]
    assert np.abs(q_s - q_e).sum(axis=1).max(initial=0.0) <= eps + 1e-9


def wait_model(config, version: int, n_users: int, timeout: float = 120.0):
    """The shipped persona model once every unlabeled user row was decided with `version`
    (streams.refit); returns (PersonaModel, users table)."""
    from core.decoder import PersonaModel

    deadline = time.monotonic() + timeout
    body, users = None, {}
    while time.monotonic() < deadline:
        body = read_table(config.kafka_bootstrap, config.app_id, "persona-model").get("current")
        if body and body["version"] == version:
            users = read_table(config.kafka_bootstrap, config.app_id, "users", timeout=max(30.0, timeout / 2))
            if len(users) >= n_users and all(s.text_version == version for s in users.values()
                                             if s.label is None):
                return PersonaModel.from_dict(body["model"]), users
        time.sleep(1.0)
    raise AssertionError(f"model v{version} not applied in {timeout}s (table: {body and body['version']})")


def wait_settled(config, n_users: int, timeout: float = 120.0):
    """After the input ended (call it once drained): the final refit (streams.refit, asked once the
    user side idled IDLE_REFIT_S) shipped and applied to every user; (PersonaModel or None, users)."""
    from streams.agents import REFIT
    from streams.refit import IDLE_REFIT_S
    from tests.kafka_fixtures import consume

    time.sleep(IDLE_REFIT_S + 1.5)  # the idle timer (1 s) has asked by now, if anything changed
    asked = max((r["milestone"] for r in consume(config.kafka_bootstrap, Topics(config.topic_prefix).name(REFIT),
                                                 timeout=10) if isinstance(r, dict)), default=0)
    if not asked:
        return None, read_table(config.kafka_bootstrap, config.app_id, "users")
    deadline = time.monotonic() + timeout
    while True:
        body = read_table(config.kafka_bootstrap, config.app_id, "persona-model").get("current")
        if body and body["version"] >= asked:
            model, users = wait_model(config, body["version"], n_users, max(10.0, deadline - time.monotonic()))
            time.sleep(1.0)  # the refreshed users' updates (sent with those rows)
            return model, users
        assert time.monotonic() < deadline, f"refit {asked} not shipped in {timeout}s"
        time.sleep(1.0)


def _second(config, i: int):
    from dataclasses import replace

    return replace(config, data_dir=Path(str(config.data_dir) + f"-w{i}"), worker_port=0)


def _labels_for(truth: dict[str, tuple[int, ...]], share: float, seed: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(seed)
    users = sorted(truth)
    chosen = rng.choice(len(users), size=max(2, int(share * len(users))), replace=False)
    return {users[i]: list(truth[users[i]]) for i in sorted(chosen)}


@pytest.fixture
def shop():
    return make_shop(n_users=120, n_items=60, n_personas=6, seed=3, mean_purchases=6)


def _shop_config(stream_config, shop, tmp_path: Path, **overrides):
    from dataclasses import replace

    path = tmp_path / "personas.json"
    path.write_text(shop.personas.to_json())
    return replace(stream_config, personas_path=path, worker_port=0, label_sources=("test",), **overrides)


def test_invariant_synthetic_one_worker(stream_config, worker_factory, produce, shop, tmp_path):
    config = _shop_config(stream_config, shop, tmp_path, eps=0.1)
    run_and_check(config, worker_factory, produce, shop.frame, _labels_for(shop.user_truth, 0.15, 0),
                  len(shop.personas))


def test_invariant_synthetic_two_workers(broker, make_config, worker_factory, produce, shop, tmp_path):
    """Four partitions shared by two worker processes (each with its own RocksDB directory)."""
    config = _shop_config(make_config(broker.bootstrap, tmp_path / "data"), shop, tmp_path,
                          eps=0.05, partitions=4)
    run_and_check(config, worker_factory, produce, shop.frame, _labels_for(shop.user_truth, 0.15, 1),
                  len(shop.personas), workers=2)


@pytest.mark.skipif(not (SHARED / "online_retail.csv.gz").exists(), reason="shared Online Retail data absent")
def test_invariant_online_retail_slice(stream_config, worker_factory, produce, tmp_path):
    from dataclasses import replace

    from core.data import load_online_retail

    head = tmp_path / "head.csv"  # the first raw rows are enough: load only those
    pd.read_csv(SHARED / "online_retail.csv.gz", nrows=6000, dtype=str).to_csv(head, index=False)
    frame, _ = load_online_retail(head)
    customers = frame["user_id"].drop_duplicates().iloc[:60]
    part = frame[frame["user_id"].isin(customers)].sort_values("ts", kind="stable").iloc[:1000]
    personas = SHARED / "personas.json"
    truth = pd.read_csv(SHARED / "user_personas_gpt4.csv.gz")
    from core.personas import load_personas

    pset = load_personas(personas)
    labels: dict[str, list[int]] = {}
    for cid, names in zip(truth["CustomerID"], truth["personas"].fillna("")):
        key = str(int(cid)) if not isinstance(cid, str) else cid
        idx = [pset.index_of(n) for n in str(names).split("|")]
        if key in set(part["user_id"].astype(str)) and len(labels) < 8 and any(i is not None for i in idx):
            labels[key] = [i for i in idx if i is not None]
    assert labels, "no labeled customer in the slice"
    config = replace(stream_config, eps=0.1, personas_path=personas, worker_port=0, label_sources=("test",))
    run_and_check(config, worker_factory, produce, part, labels, len(pset))


def test_sparse_shop_slice_keeps_bound_and_persona_diversity(stream_config, worker_factory, produce, tmp_path):
    """A slice of the sparse 30-persona shop through the real broker at the default ε and
    hysteresis, graph decisions: the relative bound holds, and the last published persona sets
    (the users table's `published`) are not much more alike than the planted truth (top-set share
    ≤ 2× truth's). The persona model's decisions on the same shop are checked in
    tests/core/test_sparse_shop.py, and that the worker applies exactly that model to its rows in
    tests/streams/test_persona_model.py (a slice big enough for the model is too slow to read back
    here: 200 users and 20 prototypes for 30 personas leave even batch's model degenerate)."""
    from core.synthetic import make_sparse_shop, top_set_share

    shop = make_sparse_shop(n_users=200, n_items=4000, seed=5)
    config = _shop_config(stream_config, shop, tmp_path, decoder="graph")
    labels = _labels_for(shop.user_truth, 0.1, 2)
    users = run_and_check(config, worker_factory, produce, shop.frame, labels, len(shop.personas), timeout=300)
    scored = [u for u in sorted(shop.user_truth) if u not in labels]
    sets = [tuple(users[u].published) for u in scored]
    assert all(sets), "every unlabeled user got a persona set"
    stream, truth = top_set_share(sets), top_set_share(shop.user_truth[u] for u in scored)
    assert stream <= 2 * truth, f"stream top-set share {stream:.3f} vs truth {truth:.3f}"
