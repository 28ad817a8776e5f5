"""Reliability through the real broker: worker crash, bad input, LLM failure, broker restart.

Each test runs `gplr worker` as a subprocess against the embedded broker and checks what came out
on the topics against core's batch computation (exact Ψ, |Ψ − Ψ̂| ≤ ε), so a lost purchase (a
missing edge) or a double-applied push (a wrong score) shows up as a wrong persona score.
Labels are published on the labels topic up front (labeler "none"), so the expected result is
fixed; β = 0 and hysteresis 0 make the last update of each user its current Ψ̂ row.
"""
from __future__ import annotations

import base64
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from core.affinity import compute_affinity, prototype_matrix
from core.data import iter_events
from core.graph import BipartiteGraph
from core.synthetic import make_shop
from streams.broker import free_port
from streams.demo import LagWatcher
from streams.records import label_record
from streams.topics import Topics, create_topics

pytestmark = pytest.mark.broker

EPS = 0.05


def _shop(n_users: int = 120, seed: int = 3):
    return make_shop(n_users=n_users, n_items=60, n_personas=6, seed=seed)


def _labels_for(shop, share: float = 0.15, seed: int = 0) -> dict[str, tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    users = sorted(shop.user_truth)
    chosen = rng.choice(len(users), size=max(2, int(share * len(users))), replace=False)
    return {users[i]: tuple(shop.user_truth[users[i]]) for i in sorted(chosen)}


def _label_records(labels: dict[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    return [label_record(u, ps, [1.0] * len(ps), "test") for u, ps in labels.items()]


def _exact_psi(frame, labels: dict[str, tuple[int, ...]], n_personas: int) -> tuple[BipartiteGraph, np.ndarray]:
    graph = BipartiteGraph.from_frame(frame)
    row = {u: i for i, u in enumerate(graph.user_ids)}
    phi = prototype_matrix(graph.n_users, {row[u]: ps for u, ps in labels.items() if u in row}, n_personas)
    return graph, compute_affinity(graph, phi, method="exact", hops=1, beta=0.0)


def _last_updates(updates: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for update in updates:  # one partition per user: arrival order is publication order
        last[str(update["user"])] = update
    return last


def _check_against_exact(updates: list[dict[str, Any]], frame, labels, n_personas: int, k: int) -> int:
    """Every unlabeled user's last published top-k matches exact Ψ within ε; returns users checked."""
    graph, psi = _exact_psi(frame, labels, n_personas)
    last = _last_updates(updates)
    checked = 0
    for row, user in enumerate(graph.user_ids):
        if user in labels:
            continue
        exact = psi[row]
        update = last.get(str(user))
        if update is None or update["reason"] == "prior":  # no prototype reaches the user (yet)
            assert exact.max() <= EPS + 1e-9, f"{user}: no affinity published but exact max {exact.max():.3f}"
            continue
        published = {int(p["idx"]): float(p["score"]) for p in update["personas"]}
        for m, score in published.items():
            assert abs(score - exact[m]) <= EPS + 1e-6, f"{user}/{m}: {score} vs exact {exact[m]}"
        floor = min(published.values()) if len(published) == k else 0.0
        others = [m for m in range(n_personas) if m not in published]
        assert all(exact[m] <= floor + 2 * EPS + 1e-6 for m in others), f"{user}: top-{k} wrong"
        checked += 1
    return checked


def _config(make_config, broker, tmp_path: Path, **overrides):
    base = dict(labeler="none", hysteresis=0.0, beta=0.0, eps=EPS, top_k=3, partitions=2, decoder="graph",
                label_budget=0.0, label_sources=("test",))
    base.update(overrides)
    config = make_config(broker.bootstrap, tmp_path / "data", **base)
    create_topics(config.kafka_bootstrap, Topics(config.topic_prefix).public(), config.partitions)
    return config


def _updates(consume, config) -> list[dict[str, Any]]:
    return [u for u in consume(config.kafka_bootstrap, Topics(config.topic_prefix).persona_updates, timeout=30)
            if isinstance(u, dict)]


# -- worker crash ------------------------------------------------------------------------------
def _crash_at_first_update(config, produce, consume, worker_factory, shop, labels) -> int:
    """Labels and 70% of the shop's purchases to a worker killed at its first persona update (most
    of the backlog, and uncommitted work, pending); the other 30% sent while it is down. Returns
    the lag left at the kill."""
    topics = Topics(config.topic_prefix)
    produce(config.kafka_bootstrap, topics.labels, _label_records(labels))
    events = list(iter_events(shop.frame))
    cut = int(len(events) * 0.7)
    worker = worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, events[:cut])
    consume(config.kafka_bootstrap, topics.persona_updates, until=lambda r: len(r) >= 1, timeout=60)
    worker.kill()
    watcher = LagWatcher(config)
    try:
        lag = watcher.lag()
    finally:
        watcher.close()
    produce(config.kafka_bootstrap, topics.purchases, events[cut:])  # the stream goes on meanwhile
    return lag


# Was flaky (1 of 5 runs: a user's last top-3 not exact Ψ's): offsets committed before the rows'
# changelog records were acked let Faust's restart recovery roll an item row back under committed
# input (streams/_compat.py `changelog_written`).
def test_kill_9_mid_stream_then_restart_loses_and_duplicates_nothing(
        broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    shop = _shop(n_users=90)
    labels = _labels_for(shop)
    config = _config(make_config, broker, tmp_path)
    lag_at_kill = _crash_at_first_update(config, produce, consume, worker_factory, shop, labels)
    restarted = worker_factory(config).wait_ready()
    watcher = LagWatcher(config)
    assert watcher.wait_drained(timeout=90, settle=2.0), f"lag stuck at {watcher.lag()}:\n{restarted.log()[-3000:]}"
    watcher.close()
    print(f"lag when killed: {lag_at_kill}")
    checked = _check_against_exact(_updates(consume, config), shop.frame, labels, 6, config.top_k)
    assert checked > len(shop.user_truth) // 2


# -- bad input ---------------------------------------------------------------------------------
def _valid(event_id: str, user: str, item: str, ts: float) -> dict[str, Any]:
    return {"event_id": event_id, "user_id": user, "item_id": item, "item_name": item,
            "quantity": 1, "price": 2.5, "ts": ts}


BAD_RECORDS: list[tuple[bytes, str]] = [
    (b'{"event_id": "x1", "user_id": ', "malformed_json"),
    (b"[1, 2, 3]", "not_an_object"),
    (json.dumps({"event_id": "x2", "item_id": "i", "quantity": 1, "price": 1, "ts": 0}).encode(), "missing_field"),
    (json.dumps({**_valid("x3", "u", "i", 0), "quantity": "three"}).encode(), "wrong_type"),
    (json.dumps({**_valid("x4", "u", "i", 0), "quantity": -2}).encode(), "non_positive_quantity"),
    (json.dumps({**_valid("x5", "u", "i", 0), "item_name": "z" * 70_000}).encode(), "oversized"),
    (b"\xff\xfe not utf-8", "malformed_json"),
]


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _sample(body: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} ([0-9.e+-]+)$", body, re.M)
    return float(match.group(1)) if match else None


def test_bad_records_go_to_the_dlq_and_valid_ones_still_flow(
        broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    config = _config(make_config, broker, tmp_path, metrics_port=free_port())
    topics = Topics(config.topic_prefix)
    produce(config.kafka_bootstrap, topics.labels, _label_records({"proto": (1,)}))
    worker_factory(config).wait_ready()
    now = time.time()
    records: list[bytes] = [json.dumps(_valid("e0", "proto", "mug", now)).encode()]
    for i, (bad, _reason) in enumerate(BAD_RECORDS):
        records.append(bad)
        records.append(json.dumps(_valid(f"e{i + 1}", f"buyer{i}", "mug", now)).encode())
    produce(config.kafka_bootstrap, topics.purchases, records, key=lambda r: b"k")
    n_bad = len(BAD_RECORDS)
    dead = consume(config.kafka_bootstrap, topics.purchases_dlq, until=lambda r: len(r) >= n_bad, timeout=60)
    assert sorted(d["reason"] for d in dead) == sorted(r for _, r in BAD_RECORDS)
    originals = {bad for bad, _ in BAD_RECORDS}
    for d in dead:  # the exact bytes are kept: text when UTF-8, else base64
        raw = base64.b64decode(d["payload"]) if d["encoding"] == "base64" else d["payload"].encode()
        assert raw in originals, d["reason"]
    # every valid buyer of the prototype's item gets the prototype's persona
    buyers = {f"buyer{i}" for i in range(n_bad)}
    updates = consume(config.kafka_bootstrap, topics.persona_updates,
                      until=lambda r: buyers <= {u.get("user") for u in r if isinstance(u, dict)}, timeout=60)
    last = _last_updates([u for u in updates if isinstance(u, dict)])
    assert buyers <= set(last)
    assert all(last[b]["personas"][0]["idx"] == 1 for b in buyers)
    # the worker's /metrics counts the same dead letters and reports its consumer lag
    deadline = time.monotonic() + 20
    while True:
        body = _scrape(config.metrics_port)
        if "gplr_consumer_lag{" in body or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert _sample(body, "gplr_dlq_total", '{reason="malformed_json"}') == 2
    assert _sample(body, "gplr_dlq_total", '{reason="oversized"}') == 1
    assert _sample(body, "gplr_events_in_total") == len(records)
    assert f'gplr_consumer_lag{{partition="0",topic="{topics.purchases}"}}' in body


# -- LLM failure -------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", [pytest.param("down", marks=pytest.mark.slow), "garbage"])
def test_llm_failure_degrades_labeling_but_not_the_stream(
        failure, broker, tmp_path, make_config, produce, consume, worker_factory, fake_openai) -> None:
    shop = _shop(n_users=60, seed=5)
    labels = _labels_for(shop, share=0.1)
    if failure == "garbage":
        fake_openai.default = lambda body: "Sorry, as an AI I cannot { answer"
        base_url = fake_openai.base_url
    else:
        base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    config = _config(make_config, broker, tmp_path, labeler="openai", label_budget=1.0,
                     label_min_purchases=1, du_quantile=0.0, label_rate_per_min=0)
    env = {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "test", "GPLR_LLM_TIMEOUT_S": "2",
           "GPLR_LLM_MAX_RETRIES": "1", "GPLR_LLM_BACKOFF_S": "0.05"}
    topics = Topics(config.topic_prefix)
    produce(config.kafka_bootstrap, topics.labels, _label_records(labels))
    worker = worker_factory(config, **env).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, iter_events(shop.frame))
    watcher = LagWatcher(config)
    assert watcher.wait_drained(timeout=90, settle=3.0), f"stream stalled, lag {watcher.lag()}"
    watcher.close()
    assert worker.is_running()
    requests = consume(config.kafka_bootstrap, topics.label_requests, timeout=20)
    assert requests, "no label requests: the LLM path was not exercised"
    produced_labels = consume(config.kafka_bootstrap, topics.labels, timeout=20)
    assert all(not r.get("personas") for r in produced_labels if r.get("labelled_by") != "test")
    if failure == "garbage":
        assert fake_openai.requests, "the fake LLM was never called"
    checked = _check_against_exact(_updates(consume, config), shop.frame, labels, 6, config.top_k)
    assert checked > 0


# -- broker restart ----------------------------------------------------------------------------
@pytest.mark.slow
def test_worker_recovers_after_broker_restart(
        own_broker, tmp_path, make_config, produce, consume, worker_factory) -> None:
    shop = _shop(n_users=80, seed=7)
    labels = _labels_for(shop)
    config = _config(make_config, own_broker, tmp_path)
    topics = Topics(config.topic_prefix)
    produce(config.kafka_bootstrap, topics.labels, _label_records(labels))
    events = list(iter_events(shop.frame))
    half = len(events) // 2
    worker = worker_factory(config).wait_ready()
    produce(config.kafka_bootstrap, topics.purchases, events[:half])
    watcher = LagWatcher(config)
    assert watcher.wait_drained(timeout=60, settle=2.0)
    own_broker.restart()  # same port and data: clients reconnect
    produce(config.kafka_bootstrap, topics.purchases, events[half:])
    assert watcher.wait_drained(timeout=90, settle=3.0), f"no recovery, lag {watcher.lag()}"
    watcher.close()
    assert worker.is_running()
    checked = _check_against_exact(_updates(consume, config), shop.frame, labels, 6, config.top_k)
    assert checked > len(shop.user_truth) // 2
