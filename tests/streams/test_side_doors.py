"""Issue 9, failure 5: side doors are closed where labels take effect.

Forged `label-requests` make no LLM call; `labels` from unknown names or for users the worker
never asked about change nothing; `gplr_label_calls_total` counts HTTP calls; `/metrics` binds
loopback by default and serves a bounded number of connections.
"""
from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections import Counter

import pytest

from streams import metrics
from streams.broker import free_port
from streams.config import StreamConfig
from streams.demo import LagWatcher
from streams.records import label_record
from streams.tables import read_table
from streams.topics import Topics, create_topics
from tests.core.poison import valid
from tests.streams.test_reliability import _sample, _scrape

LLM_ENV = {"OPENAI_API_KEY": "test", "GPLR_LLM_TIMEOUT_S": "5", "GPLR_LLM_BACKOFF_S": "0.01"}


def _buyers(users: list[str], items: int = 3) -> list[bytes]:
    return [json.dumps(valid(f"{u}-{i}", u, f"item{i}", item_name=f"GARDEN TOOL {i}")).encode()
            for u in users for i in range(items)]


def _users_when(config, predicate, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        users = read_table(config.kafka_bootstrap, config.app_id, "users")
        if predicate(users) or time.monotonic() > deadline:
            return users
        time.sleep(0.5)


@pytest.mark.broker
def test_forged_label_requests_and_labels_change_nothing(
        broker, tmp_path, make_config, produce, consume, worker_factory, fake_openai) -> None:
    config = make_config(broker.bootstrap, tmp_path / "data", labeler="openai", label_budget=0.0,
                         label_sources=("curator",), metrics_port=free_port())
    topics = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, topics.all(), config.partitions)
    worker_factory(config, OPENAI_BASE_URL=fake_openai.base_url, **LLM_ENV).wait_ready(90)
    buyers = [f"b{i}" for i in range(6)]
    produce(config.kafka_bootstrap, topics.purchases, _buyers(buyers))
    _users_when(config, lambda u: all(b in u and len(u[b].items) == 3 for b in buyers))
    # 40 forged requests: buyers (never asked about) and users without a single purchase
    forged = [{"user": u, "history": [["GARDEN TOOL 0", 1]], "du_score": 9.9, "ts": 0}
              for u in buyers + [f"ghost{i}" for i in range(34)]]
    produce(config.kafka_bootstrap, topics.label_requests, forged, key=lambda r: r["user"])
    # labels: the worker's own labeler name for users it never asked about, an unknown name,
    # and one from the configured operator source (applied)
    produce(config.kafka_bootstrap, topics.labels,
            [label_record("b0", [1], [1.0], "openai"), label_record("ghost0", [2], [1.0], "openai"),
             label_record("b1", [1], [1.0], "mallory"), label_record("b2", [3], [0.9], "curator")],
            key=lambda r: r["user"])
    dead = consume(config.kafka_bootstrap, topics.purchases_dlq, until=lambda r: len(r) >= len(forged) + 3,
                   timeout=60)
    assert Counter((d["source"], d["reason"]) for d in dead) == {
        ("label-requests", "unrequested"): len(forged), ("user-ops", "unrequested_label"): 2,
        ("labels", "unknown_labeler"): 1}
    users = _users_when(config, lambda u: "b2" in u and u["b2"].label is not None)
    assert users["b2"].label_personas == (3,)  # the operator's label is applied
    assert all(users[b].label is None for b in ("b0", "b1", "b3", "b4", "b5"))
    assert not any(u.startswith("ghost") for u in users)  # forged labels made no prototype
    time.sleep(2)  # the labeler batches requests for up to a second
    assert fake_openai.requests == []  # no LLM call for any forged request
    assert _sample(_scrape(config.metrics_port), "gplr_label_calls_total") == 0


@pytest.mark.broker
def test_label_calls_metric_counts_http_calls(
        broker, tmp_path, make_config, produce, consume, worker_factory, fake_openai) -> None:
    """Requests reach the LLM in batches of several users, and one call of each batch fails
    once and is retried: the counter must equal the HTTP requests the server saw."""
    config = make_config(broker.bootstrap, tmp_path / "data", labeler="openai", label_budget=0.5,
                         label_min_purchases=2, du_quantile=0.0, label_rate_per_min=0, metrics_port=free_port())
    topics = Topics(config.topic_prefix)
    create_topics(config.kafka_bootstrap, topics.all(), config.partitions)
    fake_openai.script(fake_openai.fail(500))
    worker_factory(config, OPENAI_BASE_URL=fake_openai.base_url, GPLR_LLM_MAX_RETRIES="2", **LLM_ENV).wait_ready(90)
    produce(config.kafka_bootstrap, topics.purchases, _buyers([f"c{i}" for i in range(20)]))
    watcher = LagWatcher(config)
    assert watcher.wait_drained(timeout=90, settle=3.0)
    watcher.close()
    requests = consume(config.kafka_bootstrap, topics.label_requests, timeout=20)
    labels = consume(config.kafka_bootstrap, topics.labels, until=lambda r: len(r) >= len(requests), timeout=60)
    assert len(labels) == len(requests) >= 6 and sum(bool(r["personas"]) for r in labels) == len(requests)
    time.sleep(1)
    calls = _sample(_scrape(config.metrics_port), "gplr_label_calls_total")
    assert calls == len(fake_openai.requests) == len(requests) + 1  # one call per user, one retry


def test_metrics_server_binds_loopback_and_bounds_connections() -> None:
    assert StreamConfig().metrics_bind == "127.0.0.1"
    assert StreamConfig.from_env({"GPLR_METRICS_BIND": "0.0.0.0"}).metrics_bind == "0.0.0.0"
    server = metrics.start_metrics_server(free_port())
    try:
        assert server.server_address[0] == "127.0.0.1"
    finally:
        server.shutdown()
        server.server_close()
    port = free_port()
    server = metrics.BoundedMetricsServer("127.0.0.1", port, max_connections=4, timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(100)]
    try:
        time.sleep(0.5)
        assert threading.active_count() - before <= 4  # not a thread per connection
        time.sleep(1.5)  # idle clients are cut after the timeout, freeing the slots
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "gplr_events_in_total" in body
    finally:
        for sock in idle:
            sock.close()
        server.shutdown()
        server.server_close()
